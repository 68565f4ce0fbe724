"""Admit: the stage between a checked request and upstream, the one that may refuse it for who sent it.

Budgets and rate limits go here: each checks the caller's limits (`Caller.limits`) against the
request and raises the GatewayError that refuses it (429 `RateLimited` for a rate, say), which the
pipeline answers and books as `rejected`. It runs for every request, before anything is sent
upstream: it stays synchronous and cheap (no await, no allocation, no round trip on the way through).
Nothing is refused today.
"""

from __future__ import annotations

from gateway.auth import Caller
from gateway.validate import ChatRequest


def admit(caller: Caller, request: ChatRequest) -> None:
    """Let the request through, or raise the GatewayError that refuses it."""
