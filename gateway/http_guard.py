"""uvicorn's httptools protocol with the limits a server facing the network needs, and OpenAI-shaped
errors for requests that never reach the app.

uvicorn puts no bound on a request's head (httptools grows a header value by concatenation: a
100 MB header took 11 s of one core and stalled every other request) and no time limit on a client
that sends its request slowly or stops halfway: with enough of them the gateway runs out of file
descriptors. Here:

- the request line and headers may take at most `MAX_HEAD_BYTES`: beyond that, 431, whether the
  head arrives in one read, in many, or behind another request on the same read;
- a new connection, or a request begun on a kept-alive one, must finish its head within
  `client_timeout_s` (408; a connection that sent nothing is just closed);
- while a request body is arriving, `client_timeout_s` may pass between two reads at most: then the
  connection is closed, and the app sees the caller leave (the request is booked as such);
- a request whose framing breaks while its body arrives (a bad chunk size line, a chunk longer than
  its size) is answered 400 in OpenAI's shape, and the app sees the caller leave;
- a server process keeps at most `max_connections` caller connections open (each can hold a file
  descriptor for upstream too): a new one beyond that closes the oldest idle connection (one the
  app has no request of: it sent nothing yet, part of a head, or is kept alive between requests),
  or, when none is idle, is answered 503 `overloaded` and closed at once.

A response being sent is never cut: a stream may run for minutes after the request has arrived.

This extends uvicorn's private protocol class: pyproject.toml pins uvicorn to the releases it is
tested on, and tests/test_uvicorn_contract.py checks each part of uvicorn it relies on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.asgi import REQUEST_ID_HEADER
from gateway.errors import GatewayError, HeadTooLarge, InvalidRequest, Overloaded, RequestTimeout
from gateway.ids import new_id

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; browsers and SDKs send a few hundred bytes
# Lifespan state (uvicorn hands it to every connection) may hold, under this key, the prometheus
# Counter (label `reason`) that counts the connections closed to stay within `max_connections`.
CONNECTIONS_CLOSED_STATE = "gateway.connections_closed"
# After an error, what the caller still sends is read and dropped for this long before the close:
# closing with unread bytes resets the connection, and the caller might lose the answer.
_LINGER_S = 2.0
_NO_ROOM = "The gateway has no room for another connection now; retry shortly."
_HEAD_TOO_LARGE = f"The request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB."

logger = logging.getLogger("gateway")


def guarded_protocol(client_timeout_s: float, max_connections: int) -> Any:
    """The protocol factory for `uvicorn.Config(http=...)`. Picklable: each worker process unpickles
    its own copy, and so gets a `ConnectionLimit` of its own."""
    return functools.partial(
        GuardedHttpToolsProtocol, client_timeout_s=client_timeout_s, limit=ConnectionLimit(max_connections)
    )


class ConnectionLimit:
    """The caller connections of one server process: how many are open, and which are idle, oldest
    first (an ordered dict: O(1) to add, drop or take the oldest)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self.idle: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()
        self._warned = False

    def __reduce__(self) -> tuple[type[ConnectionLimit], tuple[int]]:
        return (ConnectionLimit, (self.max_connections,))  # a worker starts with no connections

    def admit(self, connection: GuardedHttpToolsProtocol) -> bool:
        """Count a new connection, closing the oldest idle one if there is no room; False: no room,
        and none idle."""
        if self.open >= self.max_connections:
            if not self.idle:
                return False
            oldest, _ = self.idle.popitem(last=False)
            oldest.evict()
            self.open -= 1
        self.open += 1
        self.idle[connection] = None
        return True

    def release(self, connection: GuardedHttpToolsProtocol) -> None:
        self.open -= 1
        self.idle.pop(connection, None)

    def warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "server.max_connections (%d) reached: closing idle connections, refusing new ones "
                "when none is idle (counted in gateway_connections_closed; logged once)",
                self.max_connections,
            )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was answered with an error."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, client_timeout_s: float, limit: ConnectionLimit, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_timeout_s = client_timeout_s
        self._limit = limit
        self._counted = False  # counted in `limit` (until it closes, or is evicted)
        self._in_head = True  # between requests, or inside a request's line and headers
        self._head_bytes = 0  # bytes of the reads this head took so far (all of them, if it began one)
        self._head_began_mid_read = False  # a request ended in a read, and this head began after it
        self._read_bytes = 0  # of the read being parsed
        self._framing_bytes = 0  # bytes after the head that are not body (chunk sizes, trailers)
        self._body_bytes = 0  # of the request being read
        self._completed_in_read = False  # a request ended inside the bytes being parsed
        self._refused = False  # answered with an error: what else arrives is read and dropped
        self._deferred: GatewayError | None = None  # an error to answer after the app's answers
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._limit.admit(self):
            self._close_for_limit("over_limit")
            self._answer(Overloaded(_NO_ROOM), linger=False)
            return
        self._counted = True
        self._arm(self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self._limit.release(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a new connection: the app has no request of this one."""
        self._counted = False
        self._close_for_limit("idle_evicted")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and self._timer is None and not self._busy():
            self._arm(self._head_too_slow)  # the first byte of a request on a kept-alive connection
        in_body, body_before = not self._in_head, self._body_bytes
        self._completed_in_read, self._read_bytes = False, len(data)
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if not self._in_head:  # inside a body: its clock restarts at each read
            if in_body and not self._completed_in_read:  # all of this read belongs to the request
                self._framing_bytes += len(data) - (self._body_bytes - body_before)
            if self._framing_bytes > MAX_HEAD_BYTES + self._body_bytes:  # e.g. a 100 MB trailer
                self._refuse(
                    HeadTooLarge("The request's chunk framing and trailers are far larger than its body.")
                )
                return
            self._arm(self._body_stalled)
            return
        # Still in a head: count what arrived. When a request ended inside this read, the next head's
        # share of it is unknown: count from the next read (on_headers_complete measures that head).
        # A head began after it if uvicorn made a new scope (at the message's first byte).
        if self._completed_in_read:
            self._head_began_mid_read = self.scope is not self.cycle.scope
        else:
            self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HeadTooLarge(_HEAD_TOO_LARGE))

    def on_headers_complete(self) -> None:
        self._disarm()
        # The head is at most the reads it took (this one included): only a large one is measured.
        could_be_large = self._head_bytes + self._read_bytes > MAX_HEAD_BYTES or self._head_began_mid_read
        if could_be_large and self._head_size() > MAX_HEAD_BYTES:
            self._refuse(HeadTooLarge(_HEAD_TOO_LARGE))
            raise _Refused  # stops the parser: the app never sees this request
        self._in_head, self._head_began_mid_read = False, False
        self._head_bytes, self._framing_bytes, self._body_bytes = 0, 0, 0
        self._limit.idle.pop(self, None)  # the app has a request of this connection now
        super().on_headers_complete()

    def _head_size(self) -> int:
        """The head as the parser reported it: the request target and every header line (padding
        around header values aside: it is counted while a head is incomplete, never kept)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head, self._completed_in_read = True, True  # the next request's timer: at its first byte
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.cycle.response_complete or self.transport.is_closing():
            return  # a pipelined request started, or closing
        if self._deferred is not None:  # refused while the requests before it were answered
            self._answer(self._deferred)
            return
        if self._counted:
            self._limit.idle[self] = None  # idle again, the newest
        if self._in_head and self._head_begun() and self._timer is None:
            self._arm(self._head_too_slow)  # a head that began while the answer before it was going out

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: 400 in OpenAI's error shape, not uvicorn's plain text."""
        self._refuse(InvalidRequest("The request is not valid HTTP/1.1.", code="invalid_http"))

    # --- timers --------------------------------------------------------------------------------------

    def _head_begun(self) -> bool:
        return self._head_bytes > 0 or self._head_began_mid_read

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
        if not self._head_begun():
            self.transport.close()  # nothing of a request arrived: an idle connection, not an error
            return
        self._refuse(
            RequestTimeout(
                f"The request line and headers did not arrive within {self._client_timeout_s:g} s."
            )
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

    def _refuse(self, error: GatewayError) -> None:
        """Answer with an error and end the connection. While the app handles a request here: if the
        error is in what follows it (a pipelined request), the app's answers go out first, then this
        one; if it is in the request's own body (its framing), the caller gets the error and the app
        sees the caller leave, unless the app has answered already: then its answer ends the connection."""
        if self._refused or self.transport.is_closing():
            return
        self._disarm()
        self._refused = True
        if self._busy():
            cycle = self.cycle
            if not cycle.more_body:
                self._deferred = error  # written by on_response_complete
                return
            if cycle.response_started:
                cycle.keep_alive = False
                return
            if self.pipeline:  # a queued request's body, behind one being answered: no room for ours
                self.transport.close()
                return
            cycle.disconnected = True  # what the app sends now is dropped; its next receive: "gone"
            cycle.message_event.set()
        self._answer(error)

    def _answer(self, error: GatewayError, *, linger: bool = True) -> None:
        """Write an error in OpenAI's shape and close: after `_LINGER_S` of reading and dropping what
        the caller still sends (`linger`), or at once."""
        body = error.to_json()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (REQUEST_ID_HEADER, new_id().encode()),
            *error.headers(),
            (b"connection", b"close"),
        ]
        head = b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode())
        head += b"".join(b"%s: %s\r\n" % header for header in headers)
        self.transport.write(head + b"\r\n" + body)
        if not linger:
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def _close_for_limit(self, reason: str) -> None:
        """Count a connection closed to stay within `max_connections` (`reason`: idle_evicted or
        over_limit), in /metrics when the app put its counter in the lifespan state."""
        self._limit.warn_once()
        counter = self.app_state.get(CONNECTIONS_CLOSED_STATE)
        if counter is not None:
            counter.labels(reason).inc()
