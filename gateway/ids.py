"""Unique ids for ledger rows and requests, cheap enough to make one per request.

An id is 32 hex characters: the wall clock in microseconds (13), a random tag drawn once per
process (11), and a per-process counter (8). Ids made later sort later, so the ledger's primary key
grows at its end (a random uuid4 key scatters inserts over the whole index, which costs the
database about twice as much per row), and making one needs no system call (uuid4 reads the OS's
random source each time). Two processes share a tag with a chance of 1 in 2^44, and even then
their ids collide only if they are made in the same microsecond with the same counter value.
"""

from __future__ import annotations

import itertools
import os
import time

_TAG_HEX_DIGITS = 11


def _new_tag() -> str:
    return os.urandom(8).hex()[:_TAG_HEX_DIGITS]


_tag = _new_tag()
_counter = itertools.count()


def _after_fork() -> None:
    """A forked child must not share its parent's tag (and so its ids)."""
    global _tag, _counter
    _tag, _counter = _new_tag(), itertools.count()


if hasattr(os, "register_at_fork"):  # not on Windows, where there is no fork either
    os.register_at_fork(after_in_child=_after_fork)


def new_id(wall_us: int | None = None) -> str:
    """A new unique id; `wall_us` is the time it stands for (now if not given)."""
    if wall_us is None:
        wall_us = time.time_ns() // 1000
    return f"{wall_us:013x}{_tag}{next(_counter) & 0xFFFFFFFF:08x}"
