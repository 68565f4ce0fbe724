"""Plain-ASGI plumbing for the hot path: request headers, the body under a size limit and a memory
budget shared by the requests of a worker, the caller's hang-up as a scoped cancel, responses."""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gateway.errors import GatewayError, InvalidRequest, Overloaded, PayloadTooLarge
from gateway.ids import new_id
from gateway.ledger.schema import REQUEST_ID_CHARS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
_JSON = (b"content-type", b"application/json")
# Printable ASCII, and no longer than the ledger's column: an id is booked, sent upstream and echoed.
_VALID_REQUEST_ID = re.compile(rb"[\x20-\x7e]{1,%d}" % REQUEST_ID_CHARS)


class ClientGone(Exception):
    """The caller hung up before its response was complete (while its body arrived, or later)."""


@dataclass(slots=True)
class RequestHeaders:
    authorization: bytes | None = None
    content_length: int | None = None
    request_id: bytes | None = None
    authorization_twice: bool = False

    def the_authorization(self) -> bytes | None:
        """The one Authorization header; two are refused (which one counts would be a guess)."""
        if self.authorization_twice:
            raise InvalidRequest(
                "The request has two Authorization headers; send one.", param=None, code="duplicate_header"
            )
        return self.authorization


def read_headers(scope: Scope) -> RequestHeaders:
    """The few request headers the gateway uses, in one pass over the list."""
    found = RequestHeaders()
    for name, value in scope["headers"]:
        if name == b"authorization":
            found.authorization_twice = found.authorization is not None
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


class BodyBudget:
    """The bytes of request bodies one worker holds at once (`server.max_inflight_body_bytes`).

    A request reserves its body's size before reading it. With room, that is an int subtraction;
    without, the request waits in line (first come, first served: a big body is not passed over by
    small ones for ever), woken when a request ends and gives its bytes back; after `wait_s` in
    line it gets 503 overloaded.
    """

    def __init__(self, limit_bytes: int, wait_s: float, on_overload: Callable[[], None]) -> None:
        self.limit_bytes = limit_bytes
        self.free_bytes = limit_bytes
        self._wait_s = wait_s
        self._on_overload = on_overload
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, size: int) -> bool:
        if size <= self.free_bytes and not self._waiting:
            self.free_bytes -= size
            return True
        return False

    async def take(self, size: int) -> None:
        """Wait in line for `size` bytes; Overloaded if they are not free within `wait_s`."""
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((size, room))
        try:
            async with asyncio.timeout(self._wait_s):
                await room
        except BaseException as error:
            if room.done() and not room.cancelled():
                self.give_back(size)  # granted just as the wait ended: not used
            else:
                room.cancel()
                self._serve_waiting()  # it may have been first in line
            if isinstance(error, TimeoutError):
                self._on_overload()
                raise Overloaded(
                    f"The gateway holds as many request bodies as it may and none ended within "
                    f"{self._wait_s:g} s; try again shortly."
                ) from None
            raise

    def give_back(self, size: int) -> None:
        self.free_bytes += size
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self._waiting:
            size, room = self._waiting[0]
            if not room.cancelled():
                if size > self.free_bytes:
                    return
                self.free_bytes -= size
                room.set_result(None)
            self._waiting.popleft()


class BodyHold:
    """One request's share of the budget: what it has reserved, given back when the request ends."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    async def grow_to(self, size: int) -> None:
        # A body over the whole budget (max_body_bytes set above it) may take the whole budget.
        extra = min(size, self._budget.limit_bytes) - self.held
        if extra <= 0:
            return
        if not self._budget.try_take(extra):
            await self._budget.take(extra)
        self.held += extra

    def release(self) -> None:
        self._budget.give_back(self.held)
        self.held = 0


async def read_body(
    receive: Receive, content_length: int | None, limit: int, hold: BodyHold | None = None
) -> bytes:
    """The whole request body, or PayloadTooLarge as soon as it is known to exceed `limit`.

    With a `hold`, the body's bytes are reserved before they are read: all of them at once when the
    Content-Length says how many, else as they arrive."""
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    if hold is not None and content_length is not None:
        await hold.grow_to(content_length)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message, no copy
        if len(body) > limit:
            raise _too_large(limit)
        if hold is not None and content_length is None:
            await hold.grow_to(len(body))
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        if hold is not None and content_length is None:
            await hold.grow_to(size)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    if hold is not None and content_length is None:
        await hold.grow_to(size)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


class ResponseSend:
    """The ASGI `send` of one response, recording how far the response got: every later decision
    (answer an error, end a stream with an error event, book the request) reads these flags.

    A flag is set once the server took the message: uvicorn's `send` waits (for a slow reader) only
    before it writes, so a send cut short by a cancel has written nothing."""

    __slots__ = ("_send", "complete", "event_stream", "finished_at", "started", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.status = 0  # the status sent, once started
        self.event_stream = False  # an SSE stream: begun, it can still end with an error event
        self.complete = False
        self.finished_at: float | None = None  # when the last body message went out

    async def __call__(self, message: Message) -> None:
        await self._send(message)
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        elif not message.get("more_body", False):
            self.complete, self.finished_at = True, time.monotonic()

    async def start_event_stream(self, headers: list[tuple[bytes, bytes]]) -> None:
        await self({"type": "http.response.start", "status": 200, "headers": headers})
        self.event_stream = True


class CallerWatch:
    """Runs the body of an `async with` until it ends or the caller hangs up, whichever comes first,
    as starlette's StreamingResponse races its response against `listen_for_disconnect`.

    A task group holds a watcher that reads `receive`: when the caller hangs up before its response
    is complete, the watcher raises ClientGone, the group cancels the body (that cancel belongs to
    the group and ends with it), and ClientGone comes out of the `async with`. A caller that hangs
    up once its response is complete has left nothing undone. With `delay_s`, the watcher starts
    that much later, from a timer (a caller that left earlier is noticed then, at once): most plain
    answers are back by then, and a timer costs far less than a task per request.
    """

    __slots__ = ("_delay_s", "_group", "_receive", "_response", "_timer", "_watcher")

    def __init__(self, receive: Receive, response: ResponseSend, *, delay_s: float = 0.0) -> None:
        self._receive = receive
        self._response = response
        self._delay_s = delay_s
        self._group = asyncio.TaskGroup()
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        await self._group.__aenter__()
        if self._delay_s:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start)
        else:
            self._start()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()  # the body ended: nothing left to watch for
        try:
            await self._group.__aexit__(kind, error, traceback)
        except BaseExceptionGroup as errors:
            # A task group reports what ended it as a group: ClientGone (first, if the caller left)
            # or the body's own error, raised here as itself (outside the `except`: not chained).
            first = errors.exceptions[0]
        else:
            return
        raise first

    def _start(self) -> None:
        self._watcher = self._group.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._response.complete:
            raise ClientGone


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: bytes,
    extra_headers: Sequence[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode()), (REQUEST_ID_HEADER, request_id)]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError, request_id: bytes) -> None:
    await send_json(send, error.status, error.to_json(), request_id, error.headers())
