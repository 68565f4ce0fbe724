"""Caller authentication: gateway keys, kept and compared only as SHA-256 digests.

The table is keyed by the digest of each key, so no key is held in memory. Looking up the digest of
a presented key takes time that depends only on digest bytes, never on the bytes of a key: a
timing attacker learns at most how many leading digest bytes of a guess match a stored digest,
which (SHA-256 being preimage resistant) brings them no closer to any key. This is the same
guarantee a constant-time comparison gives, at the cost of one dict lookup for any number of keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from gateway.config import CallerKey
from gateway.errors import Unauthorized

_BEARER = b"bearer "


class KeyStore:
    """Static keys from the config, plus the keys issued in the ledger (refreshed by the app)."""

    def __init__(self, keys: Iterable[CallerKey]) -> None:
        self._static: dict[bytes, str] = {key.sha256: key.name for key in keys}
        self.static_names = frozenset(self._static.values())
        self._names_by_digest = dict(self._static)
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
        self._names_by_digest = {**{key.sha256: key.name for key in keys}, **self._static}

    def authenticate(self, authorization: bytes | None) -> str:
        """Return the key's name for an `Authorization: Bearer <key>` header value, else raise 401."""
        if authorization is None:
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        if authorization[:7].lower() != _BEARER:
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        name = self._names_by_digest.get(digest)
        if name is None:
            raise Unauthorized("Invalid API key.")
        return name


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

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    def check(self, authorization: bytes | None) -> None:
        if self._digest is not None and not hmac.compare_digest(
            _presented_digest(authorization), self._digest
        ):
            raise Unauthorized("Invalid metrics token: send it as 'Authorization: Bearer <token>'.")


def _presented_digest(authorization: bytes | None) -> bytes:
    """SHA-256 of the bearer token in an Authorization header value (of nothing, if there is none)."""
    presented = b""
    if authorization is not None and authorization[:7].lower() == _BEARER:
        presented = authorization[7:].strip()
    return hashlib.sha256(presented).digest()
