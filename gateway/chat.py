"""The chat completions endpoint, as a pipeline: authenticate, validate, forward and relay, book.

It is a plain ASGI callable rather than a FastAPI route: this is the hot path, and FastAPI's
routing and dependency machinery would cost more than everything else the gateway does here.
Every request with a valid key is booked exactly once, whatever its end (the `finally` below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from gateway.accounting import Booking
from gateway.asgi import (
    BodyBudget,
    BodyHold,
    ClientGone,
    Receive,
    Scope,
    Send,
    read_body,
    read_headers,
    request_id_for,
    send_error,
)
from gateway.auth import FailedAuthentications, KeyStore
from gateway.config import Config, ModelConfig
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    Overloaded,
    ShuttingDown,
    Unauthorized,
)
from gateway.ledger.store import LedgerRow
from gateway.relay import RelayResult, Upstream, relay_completion, relay_stream
from gateway.validate import ChatRequest, check_chat_request, parse_json_object

logger = logging.getLogger("gateway.chat")

CHAT_PATHS = frozenset({"/v1/openai/chat/completions", "/v1/chat/completions"})
# Bodies above this are parsed and checked on a thread: the event loop serves other requests
# meanwhile (a 20 MiB body of tiny keys takes a few hundred ms to parse and check).
CHECK_ON_A_THREAD_BYTES = 1_048_576


class Bookkeeper(Protocol):
    """Where finished requests go (the ledger writer's `book`)."""

    def book(self, row: LedgerRow) -> None: ...


class ChatCompletions:
    def __init__(
        self,
        config: Config,
        keys: KeyStore,
        upstream: Upstream,
        failures: FailedAuthentications,
        bodies: BodyBudget,
    ) -> None:
        self._keys = keys
        self._upstream = upstream
        self._failures = failures
        self._bodies = bodies
        self._models: dict[str, ModelConfig] = {model.name: model for model in config.models}
        self._max_body_bytes = config.server.max_body_bytes
        self.books: Bookkeeper | None = None  # set in the lifespan, once the ledger is open
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = read_headers(scope)
        request_id = request_id_for(headers.request_id)
        try:
            key_name = self._keys.authenticate(headers.the_authorization())
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Method {scope['method']} is not allowed here; use POST.")
        except Unauthorized as error:  # no valid key: nobody to book it to
            await send_error(send, self._failures.refuse(error, scope.get("client"), "chat"), request_id)
            return
        except GatewayError as error:
            await send_error(send, error, request_id)
            return
        booking = Booking(request_id.decode(), key_name)
        result = RelayResult(outcome="error", status=500)  # the relay fills it in as it learns
        hold = BodyHold(self._bodies)
        self._enter()
        try:
            await self._handle(booking, result, request_id, receive, send, headers.content_length, hold)
        except GatewayError as error:
            result.fail(error)
            if isinstance(error, Overloaded):  # refused before anything was done: no upstream failure
                result.outcome = "rejected"
            await send_error(send, error, request_id)
        except ClientGone:
            result.outcome, result.status = "client_disconnected", 499
        except asyncio.CancelledError:  # the server's shutdown grace ran out
            if not result.delivered and result.outcome != "shutdown":
                result.outcome, result.status = "shutdown", 503
            if not result.delivered and not result.upstream_answered:  # no answer begun: say why
                # (uvicorn refuses a second response start if the relay's had just gone out)
                with contextlib.suppress(RuntimeError):
                    await send_error(send, ShuttingDown("The gateway is shutting down."), request_id)
            # Answered (a stream ends with its error event) and booked below: the cancel has done
            # its work, and passed on it would make the server log a traceback for each request.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        except Exception:
            # A bug, not a request problem: log it, and answer in OpenAI's shape if nothing was sent yet
            # (if a response had started, send_error raises and the server closes the connection).
            logger.exception("unexpected error in chat completions (request %s)", booking.request_id)
            await send_error(send, GatewayError("The gateway failed to handle this request."), request_id)
        finally:
            hold.release()
            if self.books is not None:
                self.books.book(booking.row(result))
            self._leave()

    async def _handle(
        self,
        booking: Booking,
        result: RelayResult,
        request_id: bytes,
        receive: Receive,
        send: Send,
        content_length: int | None,
        hold: BodyHold,
    ) -> None:
        raw = await read_body(receive, content_length, self._max_body_bytes, hold)
        if len(raw) > CHECK_ON_A_THREAD_BYTES:
            request = await asyncio.to_thread(self._checked, booking, raw)
        else:
            request = self._checked(booking, raw)
        booking.model = request.model
        if request.stream:
            await relay_stream(self._upstream, request, request_id, receive, send, result)
        else:
            await relay_completion(self._upstream, request, request_id, receive, send, result)

    def _checked(self, booking: Booking, raw: bytes) -> ChatRequest:
        """Parse and check the body; the parsed body is kept for the books, refused or not."""
        booking.body = body = parse_json_object(raw)
        try:
            return check_chat_request(body, raw, self._models)
        except InvalidRequest as error:
            if error.param == "user":  # a text the ledger may not hold: booked without it
                booking.body = {**body, "user": None}
            raise

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (their rows booked), at most `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
