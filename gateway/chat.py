"""The chat completions endpoint: the request path as stages, each one call in `_stages` below.

    authenticate       auth.Authenticator, called by app.GatewayApp: the Caller this handler gets
    read and validate  asgi.read_body under the BodyBudget, then validate.check_chat_request
    admit              admission.admit: may refuse (budgets and rate limits go there)
    open upstream      upstream.Upstream.open: a checked JsonAnswer or EventStream, or one error
    relay              relay.relay: the answer to the caller, JSON or SSE byte for byte
    book               accounting.Booking.row: one ledger row, its outcome decided from the Facts

The caller hanging up cancels opening and relaying (asgi.CallerWatch); the server's own cancel at the
end of its shutdown grace is met in one place (`__call__`). Every request with a valid key is booked
exactly once, whatever its end (the `finally` in `__call__`).

It is a plain ASGI callable rather than a FastAPI route: this is the hot path, and FastAPI's
routing and dependency machinery would cost more than everything else the gateway does here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from gateway.accounting import Booking, Facts
from gateway.admission import admit
from gateway.asgi import (
    BodyBudget,
    BodyHold,
    CallerWatch,
    ClientGone,
    Receive,
    RequestHeaders,
    ResponseSend,
    Scope,
    Send,
    read_body,
    request_id_for,
    send_error,
)
from gateway.auth import Caller
from gateway.config import Config, ModelConfig
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ShuttingDown,
    UpstreamUnavailable,
)
from gateway.ledger.store import LedgerRow
from gateway.relay import relay, relay_error
from gateway.upstream import Upstream
from gateway.validate import ChatRequest, check_chat_request, parse_json_object

logger = logging.getLogger("gateway.chat")

CHAT_PATHS = frozenset({"/v1/openai/chat/completions", "/v1/chat/completions"})
# Bodies above this are parsed and checked on a thread: the event loop serves other requests
# meanwhile (a 20 MiB body of tiny keys takes a few hundred ms to parse and check).
CHECK_ON_A_THREAD_BYTES = 1_048_576
# A plain request's caller is watched for hanging up from this long on (a stream's at once): most
# answers are back by then, and a timer costs far less than a watching task per request.
PLAIN_WATCH_DELAY_S = 0.25

_SHUTTING_DOWN = ShuttingDown("The gateway is shutting down.")
_STREAM_SHUT_DOWN = UpstreamUnavailable(
    "The gateway is shutting down; the stream was ended.", code="shutting_down"
)


class Bookkeeper(Protocol):
    """Where finished requests go (the ledger writer's `book`)."""

    def book(self, row: LedgerRow) -> None: ...


class ChatCompletions:
    def __init__(self, config: Config, upstream: Upstream, bodies: BodyBudget) -> None:
        self._upstream = upstream
        self._bodies = bodies
        self._models: dict[str, ModelConfig] = {model.name: model for model in config.models}
        self._max_body_bytes = config.server.max_body_bytes
        self.books: Bookkeeper | None = None  # set in the lifespan, once the ledger is open
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, caller: Caller, headers: RequestHeaders
    ) -> None:
        request_id = request_id_for(headers.request_id)
        if scope["method"] != "POST":  # after authentication, as for every route; not booked
            await send_error(
                send, MethodNotAllowed(f"Method {scope['method']} is not allowed here; use POST."), request_id
            )
            return
        response = ResponseSend(send)
        booking = Booking(request_id.decode(), caller.key_name)
        facts = Facts()
        hold = BodyHold(self._bodies)
        self._enter()
        try:
            await self._stages(
                caller, booking, facts, request_id, receive, response, headers.content_length, hold
            )
        except ClientGone:
            facts.caller_left = True
        except GatewayError as error:
            facts.error = error
            await relay_error(response, error, request_id)
        except asyncio.CancelledError:
            # The server's shutdown grace ran out (uvicorn cancels the handler): answer 503, or end an
            # open stream with its error event, and book below (a caller with its whole answer already
            # keeps how it ended). The cancel has then done its work: passed on, it would make the
            # server log a traceback for each request.
            if not response.complete:
                facts.shutdown = True
                await relay_error(response, _SHUTTING_DOWN, request_id, in_stream=_STREAM_SHUT_DOWN)
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        except Exception as error:
            # A bug, not a request problem: logged, and told to the caller as far as its response allows.
            facts.error = error
            logger.exception("unexpected error in chat completions (request %s)", booking.request_id)
            failed = GatewayError("The gateway failed to handle this request.")
            await relay_error(response, failed, request_id)
        finally:
            hold.release()
            if self.books is not None:
                self.books.book(booking.row(facts, response))
            self._leave()

    async def _stages(
        self,
        caller: Caller,
        booking: Booking,
        facts: Facts,
        request_id: bytes,
        receive: Receive,
        send: ResponseSend,
        content_length: int | None,
        hold: BodyHold,
    ) -> None:
        raw = await read_body(receive, content_length, self._max_body_bytes, hold)
        if len(raw) > CHECK_ON_A_THREAD_BYTES:
            request = await asyncio.to_thread(self._checked, booking, raw)
        else:
            request = self._checked(booking, raw)
        admit(caller, request)
        async with CallerWatch(receive, send, delay_s=0.0 if request.stream else PLAIN_WATCH_DELAY_S):
            answer = await self._upstream.open(request, request_id)
            await relay(answer, request, request_id, send, facts)

    def _checked(self, booking: Booking, raw: bytes) -> ChatRequest:
        """Parse and check the body; the parsed body is kept for the books, refused or not."""
        booking.body = body = parse_json_object(raw)
        try:
            request = check_chat_request(body, raw, self._models)
        except InvalidRequest as error:
            if error.param == "user":  # a text the ledger may not hold: booked without it
                booking.body = {**body, "user": None}
            raise
        booking.model = request.model
        return request

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
