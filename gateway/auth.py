"""Caller authentication: gateway keys, kept and compared only as SHA-256 digests.

The table is keyed by the digest of each key, so no key is held in memory. Looking up the digest of
a presented key takes time that depends only on digest bytes, never on the bytes of a key: a
timing attacker learns at most how many leading digest bytes of a guess match a stored digest,
which (SHA-256 being preimage resistant) brings them no closer to any key. This is the same
guarantee a constant-time comparison gives, at the cost of one dict lookup for any number of keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gateway.config import CallerKey
from gateway.errors import Unauthorized

_BEARER = b"bearer "


class KeyStore:
    def __init__(self, keys: Iterable[CallerKey]) -> None:
        self._names_by_digest: dict[bytes, str] = {key.sha256: key.name for key in keys}

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
