"""Caller authentication: gateway keys, kept and compared only as SHA-256 digests.

Every route outside the open ones is authenticated in one place, `Authenticator` (called by
`app.GatewayApp`), which yields who sent the request: a `Caller` (a gateway key, with the limits that
apply to it) or `ADMIN` (the admin key, for the admin API).

The table is keyed by the digest of each key, so no key is held in memory. Looking up the digest of
a presented key takes time that depends only on digest bytes, never on the bytes of a key: a
timing attacker learns at most how many leading digest bytes of a guess match a stored digest,
which (SHA-256 being preimage resistant) brings them no closer to any key. This is the same
guarantee a constant-time comparison gives, at the cost of one dict lookup for any number of keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.asgi import RequestHeaders
from gateway.config import CallerKey
from gateway.errors import GatewayError, RateLimited, Unauthorized

logger = logging.getLogger("gateway.auth")

_BEARER = b"bearer "
# FastAPI routes find the request's Caller (or ADMIN) as `request.state.caller`.
CALLER_STATE = "caller"
# Which kind of route a failed authentication was for (counted and logged by kind).
RouteKind = Literal["chat", "api", "admin", "metrics"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request with a gateway key: what it is booked to, and what may limit it."""

    key_name: str
    team: str | None = None
    # What the admission stage checks for this caller (budgets, rate limits); none apply yet.
    limits: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Admin:
    """Whoever holds the admin key: the admin API (and the dashboard's data through it)."""


ADMIN = Admin()


class Authenticator:
    """The one place credentials are checked, for every route outside the open ones.

    Two Authorization headers are refused (400) before any key is looked at; a failed authentication
    goes through FailedAuthentications (counted, logged, 429 for an address that fails too often).
    """

    def __init__(self, keys: KeyStore, admin_key: AdminKey, failures: FailedAuthentications) -> None:
        self._keys = keys
        self._admin_key = admin_key
        self._failures = failures

    def caller(self, headers: RequestHeaders, route: RouteKind, client: Any) -> Caller:
        """The Caller of a gateway key's route, else the GatewayError to answer."""
        authorization = headers.the_authorization()
        try:
            return self._keys.authenticate(authorization)
        except Unauthorized as error:
            raise self._failures.refuse(error, client, route) from None

    def admin(self, headers: RequestHeaders, client: Any) -> Admin:
        """ADMIN for the admin key, else the GatewayError to answer."""
        authorization = headers.the_authorization()
        try:
            self._admin_key.check(authorization)
        except Unauthorized as error:
            raise self._failures.refuse(error, client, "admin") from None
        return ADMIN


class KeyStore:
    """Static keys from the config, plus the keys issued in the ledger (refreshed by the app)."""

    def __init__(self, keys: Iterable[CallerKey]) -> None:
        self._static: dict[bytes, Caller] = {key.sha256: Caller(key.name) for key in keys}
        self.static_names = frozenset(caller.key_name for caller in self._static.values())
        self._callers_by_digest = dict(self._static)
        self._reads_begun = 0
        self._read_applied = 0

    def begin_read(self) -> int:
        """Number a read of the issued keys from the ledger; pass the number to `set_issued`."""
        self._reads_begun += 1
        return self._reads_begun

    def set_issued(self, keys: Iterable[CallerKey], read: int) -> None:
        """Replace the issued keys (revoked ones are simply absent); static keys always stay.

        Reads are applied in the order they began, not the order they finished: a read that began
        before a key was issued or revoked, and finished after a later read, is dropped, so it
        cannot undo the change. (All on the event loop: no lock needed.)
        """
        if read <= self._read_applied:
            return
        self._read_applied = read
        self._callers_by_digest = {**{key.sha256: Caller(key.name) for key in keys}, **self._static}

    def authenticate(self, authorization: bytes | None) -> Caller:
        """The key's Caller for an `Authorization: Bearer <key>` header value, else raise 401."""
        if authorization is None:
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        if authorization[:7].lower() != _BEARER:
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        caller = self._callers_by_digest.get(digest)
        if caller is None:
            raise Unauthorized("Invalid API key.")
        return caller


class AdminKey:
    """The one admin key, from the environment; None disables the admin API."""

    def __init__(self, key: str | None) -> None:
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def check(self, authorization: bytes | None) -> None:
        if self._digest is None:
            raise Unauthorized("The admin API is disabled: no admin key is set (admin.key_env).")
        if not hmac.compare_digest(_presented_digest(authorization), self._digest):
            raise Unauthorized("Invalid admin key.")


class MetricsToken:
    """The token /metrics requires, from the environment; None leaves /metrics open."""

    def __init__(self, token: str | None, failures: FailedAuthentications) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None
        self._failures = failures

    @property
    def required(self) -> bool:
        return self._digest is not None

    def check(self, authorization: bytes | None, client: Any) -> None:
        if self._digest is not None and not hmac.compare_digest(
            _presented_digest(authorization), self._digest
        ):
            error = Unauthorized("Invalid metrics token: send it as 'Authorization: Bearer <token>'.")
            raise self._failures.refuse(error, client, "metrics")


class FailedAuthentications:
    """What happens on every failed authentication (a 401): it is counted by route kind (chat, api,
    admin, metrics), logged (one line every `log_every_s` at most, with counts, never a key), and an
    address failing too often gets 429 instead (see AddressLimiter). A valid key is checked before
    any of this, so it is never slowed, whatever its address did."""

    def __init__(
        self, count: Callable[[str], None], limiter: AddressLimiter, log_every_s: float = 10.0
    ) -> None:
        self._count = count
        self._limiter = limiter
        self._log_every_s = log_every_s
        self._by_route: Counter[str] = Counter()
        self._addresses: set[str] = set()
        self._last_line_at = -log_every_s
        self._line_due: asyncio.TimerHandle | None = None

    def refuse(self, error: Unauthorized, client: Any, route: RouteKind) -> GatewayError:
        """The answer to a failed authentication from `client` (the ASGI scope's (host, port))."""
        address = client[0] if client else "unknown"
        self._count(route)
        self._note(address, route)
        if self._limiter.allow(address):
            return error
        return RateLimited("Too many failed authentications from this address; try again in a second.")

    def _note(self, address: str, route: str) -> None:
        self._by_route[route] += 1
        if len(self._addresses) < _MAX_LOGGED_ADDRESSES:
            self._addresses.add(address)
        if self._line_due is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_line_at + self._log_every_s - loop.time())
            self._line_due = loop.call_later(delay, self._log_line)

    def _log_line(self) -> None:
        routes = ", ".join(f"{route}: {count}" for route, count in sorted(self._by_route.items()))
        addresses = len(self._addresses)
        logger.warning(
            "auth: %d failed authentications from %s address%s (%s)",
            sum(self._by_route.values()),
            f"{addresses}+" if addresses >= _MAX_LOGGED_ADDRESSES else addresses,
            "" if addresses == 1 else "es",
            routes,
        )
        self._by_route.clear()
        self._addresses.clear()
        self._last_line_at = asyncio.get_running_loop().time()
        self._line_due = None


_MAX_LOGGED_ADDRESSES = 10_000


class AddressLimiter:
    """A token bucket per client address for failed authentications: `burst` at once, then
    `per_second`. The table keeps the `max_addresses` that failed most recently (an address
    dropped from it starts again with a full bucket)."""

    def __init__(
        self,
        burst: int = 100,
        per_second: float = 10.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert per_second >= 1, "RateLimited's retry-after of 1 s promises another attempt within a second"
        self._burst = float(burst)
        self._per_second = per_second
        self._max_addresses = max_addresses
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address: (tokens, when), oldest first

    def allow(self, address: str) -> bool:
        """Take one failed attempt from the address's bucket; False if it is empty."""
        now = self._clock()
        tokens, then = self._buckets.pop(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._per_second)
        allowed = tokens >= 1
        self._buckets[address] = (tokens - 1 if allowed else tokens, now)  # now the most recent
        if len(self._buckets) > self._max_addresses:
            del self._buckets[next(iter(self._buckets))]  # the one quiet the longest
        return allowed


def _presented_digest(authorization: bytes | None) -> bytes:
    """SHA-256 of the bearer token in an Authorization header value (of nothing, if there is none)."""
    presented = b""
    if authorization is not None and authorization[:7].lower() == _BEARER:
        presented = authorization[7:].strip()
    return hashlib.sha256(presented).digest()
