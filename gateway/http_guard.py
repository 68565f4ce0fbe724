"""uvicorn's httptools protocol with the limits a server facing the network needs, and OpenAI-shaped
errors for requests that never reach the app.

uvicorn puts no bound on a request's head (httptools grows a header value by concatenation: a
100 MB header took 11 s of one core and stalled every other request) and no time limit on a client
that sends its request slowly or stops halfway: with enough of them the gateway runs out of file
descriptors. Here:

- the request line and headers may take at most `MAX_HEAD_BYTES`: beyond that, 431;
- a new connection, or a request begun on a kept-alive one, must finish its head within
  `client_timeout_s` (408; a connection that sent nothing is just closed);
- while a request body is arriving, `client_timeout_s` may pass between two reads at most: then the
  connection is closed, and the app sees the caller leave (the request is booked as such).

A response being sent is never cut: a stream may run for minutes after the request has arrived.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.asgi import REQUEST_ID_HEADER
from gateway.ids import new_id

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; browsers and SDKs send a few hundred bytes
_LINGER_S = 2.0


def guarded_protocol(client_timeout_s: float) -> Any:
    """The protocol factory for `uvicorn.Config(http=...)` (picklable, for worker processes)."""
    return functools.partial(GuardedHttpToolsProtocol, client_timeout_s=client_timeout_s)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, client_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_timeout_s = client_timeout_s
        self._in_head = True  # between requests, or inside a request's line and headers
        self._head_bytes = 0  # bytes of the head being read
        self._framing_bytes = 0  # bytes after the head that are not body (chunk sizes, trailers)
        self._body_bytes = 0  # of the request being read
        self._completed_in_read = False  # a request ended inside the bytes being parsed
        self._refused = False  # answered with an error: what else arrives is read and dropped
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and self._timer is None and not self._busy():
            self._arm(self._head_too_slow)  # the first byte of a request on a kept-alive connection
        in_body, body_before = not self._in_head, self._body_bytes
        self._completed_in_read = False
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if not self._in_head:  # inside a body: its clock restarts at each read
            if in_body and not self._completed_in_read:  # all of this read belongs to the request
                self._framing_bytes += len(data) - (self._body_bytes - body_before)
            if self._framing_bytes > MAX_HEAD_BYTES + self._body_bytes:  # e.g. a 100 MB trailer
                self._too_large("The request's chunk framing and trailers are far larger than its body.")
                return
            self._arm(self._body_stalled)
            return
        # Still in a head: count what arrived (all of it, unless a pipelined request ended inside it,
        # whose bytes are not this head's: then count from the next read; the bound moves by one read).
        self._head_bytes += 0 if self._completed_in_read else len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large(f"The request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB.")

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head, self._head_bytes, self._framing_bytes, self._body_bytes = False, 0, 0, 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head, self._completed_in_read = True, True  # the next request's timer: at its first byte
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and self._head_bytes and self._timer is None and not self.transport.is_closing():
            self._arm(self._head_too_slow)  # a head that began while the answer before it was going out

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: 400 in OpenAI's error shape, not uvicorn's plain text."""
        self._refuse(400, "Bad Request", "invalid_http", "The request is not valid HTTP/1.1.")

    # --- timers --------------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """A request is being handled on this connection: its answer is the app's to give."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self, handler: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self._client_timeout_s, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._busy():
            return  # on_response_complete starts the clock again if a head is still pending
        if self._head_bytes == 0:
            self.transport.close()  # nothing of a request arrived: an idle connection, not an error
            return
        self._refuse(
            408,
            "Request Timeout",
            "request_timeout",
            f"The request line and headers did not arrive within {self._client_timeout_s:g} s.",
        )

    def _body_stalled(self) -> None:
        """The app is reading this body: closing makes it see the caller leave, and book that."""
        self._timer = None
        if self.transport.is_closing():
            return
        # Not the caller's delay: uvicorn stopped reading until the app catches up (a big body, a
        # queued request), or the caller waits for "100 Continue", which the app has not asked for yet.
        app_behind = self.flow is not None and self.flow.read_paused
        if app_behind or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self._arm(self._body_stalled)
            return
        self.transport.close()

    def _too_large(self, message: str) -> None:
        self._refuse(431, "Request Header Fields Too Large", "request_header_fields_too_large", message)

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        """Answer with an error and end the connection. While the app handles a request here, the
        answer is its own: a response going out ends, and then the connection; a request still being
        read (its trailer too large) is cut, and the app sees the caller leave."""
        if self._refused or self.transport.is_closing():
            return
        self._disarm()
        self._refused = True
        if self._busy():
            if self.cycle.response_started:
                self.cycle.keep_alive = False
            else:
                self.transport.close()
            return
        body = orjson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"%s: %s\r\nconnection: close\r\n\r\n"
            % (status, reason.encode(), len(body), REQUEST_ID_HEADER, new_id().encode())
        )
        self.transport.write(head + body)
        # Close our side after the answer, but keep reading (and dropping) for a moment: closing with
        # unread bytes would make the kernel reset the connection, and the caller might lose the answer.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)
