"""One way to wait for what happens elsewhere: a row another process books, a socket it closes.

`eventually` (and `eventually_async` inside the event loop) calls a probe until its value passes a
check and returns that value. On timeout it fails with what it waited for and the last value seen
(or the last error it was told to ignore), so that a failure says what was missing, not just "not
within 1 s". Polling is for state that no event announces across a process or thread boundary.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

# The spec gives a booked row one second to show; the default leaves room for a loaded machine.
DEFAULT_WITHIN_S = 2.0
DEFAULT_EVERY_S = 0.02
_SHOWN_CHARS = 2000  # of the last value, in a failure: its end (a log's latest lines, the newest rows)


class _Waiting:
    """The deadline of one wait, and what it saw last."""

    def __init__(self, waiting_for: str, within_s: float) -> None:
        self.waiting_for = waiting_for
        self.within_s = within_s
        self.deadline = time.monotonic() + within_s
        self.last: Any = "nothing: the probe never returned"

    def saw(self, value: Any) -> None:
        shown = repr(value)
        self.last = shown if len(shown) <= _SHOWN_CHARS else "..." + shown[-_SHOWN_CHARS:]

    def failed_with(self, error: BaseException) -> None:
        self.last = f"the probe raised {type(error).__name__}: {error}"

    def over(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self) -> AssertionError:
        return AssertionError(f"waited {self.within_s:g} s for {self.waiting_for}; last: {self.last}")


def eventually(
    probe: Callable[[], T],
    *,
    waiting_for: str,
    until: Callable[[T], object] = bool,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """The first value of `probe()` for which `until(value)` is true (by default: a truthy value).
    Errors of the `ignoring` types count as "not yet"; any other goes up at once."""
    waiting = _Waiting(waiting_for, within_s)
    while True:
        try:
            value = probe()
        except ignoring as error:
            waiting.failed_with(error)
        else:
            if until(value):
                return value
            waiting.saw(value)
        if waiting.over():
            raise waiting.failure()
        time.sleep(every_s)


@overload
async def eventually_async(
    probe: Callable[[], Awaitable[T]],
    *,
    waiting_for: str,
    until: Callable[[T], object] = ...,
    within_s: float = ...,
    every_s: float = ...,
    ignoring: tuple[type[Exception], ...] = ...,
) -> T: ...


@overload
async def eventually_async(
    probe: Callable[[], T],
    *,
    waiting_for: str,
    until: Callable[[T], object] = ...,
    within_s: float = ...,
    every_s: float = ...,
    ignoring: tuple[type[Exception], ...] = ...,
) -> T: ...


async def eventually_async(
    probe: Callable[[], Any],
    *,
    waiting_for: str,
    until: Callable[[Any], object] = bool,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    ignoring: tuple[type[Exception], ...] = (),
) -> Any:
    """`eventually` inside the event loop: it sleeps without blocking the loop, and `probe` may be a
    coroutine function (awaited) or a plain one (the state of something running in the loop)."""
    waiting = _Waiting(waiting_for, within_s)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as error:
            waiting.failed_with(error)
        else:
            if until(value):
                return value
            waiting.saw(value)
        if waiting.over():
            raise waiting.failure()
        await asyncio.sleep(every_s)
