"""Plain-ASGI plumbing for the hot path: request headers, the body under a size limit, responses."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError, PayloadTooLarge
from gateway.ids import new_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
_JSON = (b"content-type", b"application/json")
_VALID_REQUEST_ID = re.compile(rb"[\t\x20-\x7e]{1,1024}")  # a header value's characters, bounded


class ClientGone(Exception):
    """The caller hung up before the request body arrived."""


@dataclass(slots=True)
class RequestHeaders:
    authorization: bytes | None = None
    content_length: int | None = None
    request_id: bytes | None = None


def read_headers(scope: Scope) -> RequestHeaders:
    """The few request headers the gateway uses, in one pass over the list."""
    found = RequestHeaders()
    for name, value in scope["headers"]:
        if name == b"authorization":
            found.authorization = value
        elif name == b"content-length":
            found.content_length = int(value) if value.isdigit() else None
        elif name == REQUEST_ID_HEADER:
            found.request_id = value
    return found


def request_id_for(caller_id: bytes | None) -> bytes:
    """The caller's x-request-id when it is a sane header value, else a new one."""
    if caller_id is not None and _VALID_REQUEST_ID.fullmatch(caller_id):
        return caller_id
    return new_id().encode()


async def read_body(receive: Receive, content_length: int | None, limit: int) -> bytes:
    """The whole request body, or PayloadTooLarge as soon as it is known to exceed `limit`."""
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message, no copy
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), (REQUEST_ID_HEADER, request_id)]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError, request_id: bytes) -> None:
    extra = None
    if error.status == 401:
        extra = [(b"www-authenticate", b"Bearer")]
    elif error.status == 405:
        extra = [(b"allow", b"POST")]
    await send_json(send, error.status, error.to_json(), request_id, extra)
