"""Forward a checked request upstream and relay the answer to the caller.

The upstream client is aiohttp's: measured 8-11x the throughput of httpx's pool under concurrency
on the same proxy (see README, "Why these libraries"). Every aiohttp error is translated to a
`GatewayError` here and nowhere else, with a message that names no secret.

Non-streamed answers are returned with upstream's status and JSON body (with `usage.estimated_cost`
filled in from the price table when upstream gave none, and usage the gateway does not believe
replaced by what it books). Streams are relayed byte for byte as they arrive; once the caller has
the headers, a failure becomes one SSE error event and the stream ends.

What upstream sends is bounded: a JSON answer or an SSE event over `max_answer_bytes` (the
configured `server.max_body_bytes`) is a 502, as is a compressed answer that inflates past it or a
compressed stream. An upstream error body reaches the caller in OpenAI's error shape (completed if
upstream left parts out), and nothing relayed shows the upstream token, in any case or escaping.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.accounting import (
    believed_cost,
    believed_tokens,
    billed_usd,
    completion_text,
    estimate_prompt_tokens,
    estimate_tokens,
)
from gateway.asgi import REQUEST_ID_HEADER, Receive, Send, send_json
from gateway.config import UpstreamConfig
from gateway.errors import GatewayError, Overloaded, UpstreamTimeout, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.sse import StreamTap, StreamTooLarge
from gateway.validate import ChatRequest, parse_json

logger = logging.getLogger("gateway.relay")

_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_PASSED_HEADERS = ("retry-after",)
_NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)  # the process's or the system's open-files limit
_INFLATED_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib's wbits for "either header, detected"


@dataclass(slots=True)
class RelayResult:
    """How a request ended, for the books (see accounting.Outcome)."""

    outcome: str  # ok | rejected | upstream_error | timeout | client_disconnected | shutdown | error
    status: int
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    cost_added: bool = False  # the gateway filled in estimated_cost from the price table
    upstream_answered: bool = False  # upstream began an answer that may be billed
    delivered: bool = False  # the caller has its whole answer (a later cancel does not change how it ended)
    content_chunks: int = 0
    first_byte_at: float | None = None
    finished_at: float | None = None  # when the caller's response was complete
    service_tier: Any = None

    def fail(self, error: GatewayError) -> None:
        """The gateway answered with an error of its own."""
        self.status = error.status
        if isinstance(error, UpstreamTimeout):
            self.outcome = "timeout"
        elif isinstance(error, Overloaded):  # refused for want of room: nothing went upstream
            self.outcome = "rejected"
        else:
            self.outcome = "upstream_error" if error.status >= 500 else "rejected"


class Upstream:
    """The upstream endpoint: one aiohttp session, its URL and the injected token."""

    def __init__(
        self, config: UpstreamConfig, token: str, metrics: Metrics, *, max_answer_bytes: int
    ) -> None:
        self.url = config.chat_completions_url
        self.metrics = metrics
        self.max_answer_bytes = max_answer_bytes
        self._config = config
        self._authorization = f"Bearer {token}"
        self._token = TokenFilter(token)
        self._session: aiohttp.ClientSession | None = None

    async def start(self, base_url: str | None = None) -> None:
        """Open the client session; `base_url` overrides the configured one (the in-process simulator)."""
        if base_url is not None:
            self.url = f"{base_url.rstrip('/')}/chat/completions"
        timeout = aiohttp.ClientTimeout(
            total=self._config.total_timeout_s,  # None: no deadline, and no timer per request
            sock_connect=self._config.connect_timeout_s,
            sock_read=self._config.read_timeout_s,
        )
        connector = aiohttp.TCPConnector(limit=self._config.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            headers={"User-Agent": "gateway", "Accept-Encoding": "identity"},
            cookie_jar=aiohttp.DummyCookieJar(),  # an upstream cookie must never pass between callers
            auto_decompress=False,  # aiohttp would inflate without a bound: read_answer does, with one
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def started(self) -> bool:
        return self._session is not None and not self._session.closed

    async def post(self, body: bytes, request_id: bytes) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() was not called"
        headers = {
            "Authorization": self._authorization,
            "Content-Type": "application/json",
            "X-Request-Id": request_id.decode("ascii"),
        }
        try:
            return await self._session.post(self.url, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self.translate(error) from None

    async def read_answer(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body of a non-streamed answer, never more than max_answer_bytes of it (inflated
        with that bound if upstream compressed it); a 502 if it is larger, or coded otherwise."""
        try:
            length = response.content_length
            if length is not None and length > self.max_answer_bytes:
                raise self._too_large()
            inflater = self._inflater(response)
            if inflater is None and length is not None:
                return await response.read()  # the usual answer: the parser stops at Content-Length
            return await self._read_bounded(response, inflater)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self.translate(error) from None
        finally:
            response.release()  # a body not read to its end closes the connection

    async def _read_bounded(
        self, response: aiohttp.ClientResponse, inflater: zlib._Decompress | None
    ) -> bytes:
        room = self.max_answer_bytes
        parts = []
        async for chunk in response.content.iter_any():
            if inflater is not None:
                try:
                    chunk = inflater.decompress(chunk, room + 1)  # a byte past the room tells "too large"
                except zlib.error:
                    raise self.bad_response("The upstream's compressed answer is corrupt.") from None
            room -= len(chunk)
            if room < 0:
                raise self._too_large()
            parts.append(chunk)
        if inflater is not None and not inflater.eof:
            raise self.bad_response("The upstream's compressed answer was cut short.")
        return b"".join(parts)

    def _inflater(self, response: aiohttp.ClientResponse) -> zlib._Decompress | None:
        """A decompressor for the answer's Content-Encoding; None for none; a 502 for any other."""
        coding = response.headers.get("Content-Encoding")
        if coding is None or coding.strip().lower() in ("", "identity"):
            return None
        if coding.strip().lower() in _INFLATED_CODINGS:
            return zlib.decompressobj(_GZIP_OR_ZLIB)
        raise self.bad_response(
            "The upstream compressed its answer in an encoding the gateway does not read."
        )

    def refuse_compressed_stream(self, response: aiohttp.ClientResponse) -> None:
        """A stream is relayed as it comes: one that upstream compressed (though asked for identity)
        would have to be inflated event by event. It is refused instead, as a 502."""
        coding = response.headers.get("Content-Encoding")
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            response.close()
            raise self.bad_response("The upstream compressed its stream, though asked not to.")

    def _too_large(self) -> UpstreamUnavailable:
        return self.bad_response(f"The upstream's answer is over {self.max_answer_bytes} bytes.")

    def translate(self, error: BaseException) -> GatewayError:
        """The one place where HTTP-client failures become gateway errors."""
        if isinstance(error, aiohttp.ClientConnectorError) and error.os_error.errno in _NO_DESCRIPTOR:
            logger.warning("no file descriptor left for an upstream connection")
            self.metrics.overloaded.labels("file_descriptors").inc()
            return Overloaded("The gateway has no room for another upstream connection; try again shortly.")
        logger.warning("upstream request failed: %s", type(error).__name__)
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            self.metrics.upstream_error("connect_timeout")
            return UpstreamUnavailable(
                f"The upstream did not accept a connection within {self._config.connect_timeout_s:g} s."
            )
        if isinstance(error, TimeoutError):
            return self._timed_out(error)
        if isinstance(error, aiohttp.ClientConnectorError):
            self.metrics.upstream_error("unreachable")
            return UpstreamUnavailable("The upstream could not be reached.")
        return self.bad_response("The upstream connection failed before its answer was complete.")

    def _timed_out(self, error: TimeoutError) -> UpstreamTimeout:
        """aiohttp's read timeout has its own class; its total deadline is a plain TimeoutError."""
        total = self._config.total_timeout_s
        if total is not None and not isinstance(error, aiohttp.SocketTimeoutError):
            self.metrics.upstream_error("total_timeout")
            return UpstreamTimeout(f"The upstream did not finish its answer within {total:g} s.")
        self.metrics.upstream_error("read_timeout")
        return UpstreamTimeout(f"The upstream sent nothing for {self._config.read_timeout_s:g} s.")

    def bad_response(self, message: str) -> UpstreamUnavailable:
        """An answer the gateway cannot relay (cut, not JSON, not SSE, a redirect): counted, and a 502."""
        self.metrics.upstream_error("bad_response")
        return UpstreamUnavailable(message, code="upstream_bad_response")

    def error_body(self, status: int, payload: Any, body: bytes) -> bytes:
        """An upstream error's JSON body as the caller gets it: in OpenAI's shape (completed if upstream
        left parts out) and without the token; byte for byte when it is both already (the usual)."""
        in_shape = _in_openai_shape(payload)
        may_hold_token = self._token.may_hold(body)
        if in_shape and not may_hold_token:
            return body
        shaped = payload if in_shape else _completed_error(payload, status)
        try:
            clean = self._token.scrubbed(shaped) if may_hold_token else shaped
        except RecursionError:
            raise self.bad_response(
                f"The upstream answered HTTP {status} with JSON nested too deeply."
            ) from None
        if in_shape and clean == payload:
            return body
        return _dumps(clean)

    def passed_header(self, value: str) -> bytes | None:
        """A header value of upstream's as the caller may see it: printable ASCII (else dropped), with
        the token starred."""
        if not (value.isascii() and value.isprintable()):
            return None
        return self._token.scrubbed_ascii(value).encode()

    def passed_headers(self, response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
        passed = []
        for name in _PASSED_HEADERS:
            value = response.headers.get(name)
            clean = None if value is None else self.passed_header(value)
            if clean is not None:
                passed.append((name.encode(), clean))
        return passed


class TokenFilter:
    """Finds the upstream token in what upstream sends back, in any letter case and any JSON escaping
    (`\\u0073k-...`): a byte check first, that only says "it cannot be there" for plain ASCII text."""

    def __init__(self, token: str) -> None:
        self._lower = token.lower().encode()
        self._lower_text = token.lower()
        self._text = re.compile(re.escape(token), re.IGNORECASE) if token else None

    def may_hold(self, body: bytes) -> bool:
        if self._text is None:
            return False
        return not body.isascii() or b"\\" in body or self._lower in body.lower()

    def scrubbed_text(self, text: str) -> str:
        return text if self._text is None else self._text.sub("***", text)

    def scrubbed_ascii(self, text: str) -> str:
        """The same for ASCII text, where a lowercase search is exact: no regex when it is not there."""
        return self.scrubbed_text(text) if self._lower_text in text.lower() else text

    def scrubbed(self, value: Any) -> Any:
        """Parsed JSON with the token starred in every string, keys included."""
        if isinstance(value, str):
            return self.scrubbed_text(value)
        if isinstance(value, dict):
            return {self.scrubbed_text(key): self.scrubbed(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.scrubbed(item) for item in value]
        return value


def _in_openai_shape(payload: Any) -> bool:
    """{"error": {"message": str, "type": str, "param": ..., "code": ...}}: what strict clients parse."""
    error = payload.get("error") if isinstance(payload, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
    )


def _completed_error(payload: Any, status: int) -> dict[str, Any]:
    """An error body in OpenAI's shape, keeping everything upstream said (its message first of all)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    completed: dict[str, Any] = dict(error) if isinstance(error, dict) else {}
    completed["message"] = _error_message(payload, error, status)
    if not isinstance(completed.get("type"), str):
        completed["type"] = _error_type(status)
    completed.setdefault("param", None)
    completed.setdefault("code", None)
    return {**payload, "error": completed} if isinstance(payload, dict) else {"error": completed}


def _error_message(payload: Any, error: Any, status: int) -> str:
    """Upstream's message, wherever it put it: error.message, error, message, detail (FastAPI's)."""
    if isinstance(payload, str):
        return payload
    found = error.get("message") if isinstance(error, dict) else error
    if found is None and isinstance(payload, dict):
        found = payload.get("message", payload.get("detail"))
    if isinstance(found, str):
        return found
    if found is not None:
        return _dumps(found).decode()  # a list of validation errors, say: kept as its JSON text
    return f"The upstream answered HTTP {status}."


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _dumps(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:  # what only the standard parser took (an integer over 64 bits, ...)
        return json.dumps(payload, separators=(",", ":")).encode()


async def relay_completion(
    upstream: Upstream,
    request: ChatRequest,
    request_id: bytes,
    receive: Receive,
    send: Send,
    result: RelayResult,
) -> None:
    """Forward a non-streamed request; answer with upstream's status and JSON body.

    A caller that gives up waiting has its upstream request closed, as with streams: generation it
    will never read is not paid for. The watch starts after a short delay: most answers are back
    by then, and a timer costs far less than a watching task per request.
    """
    watch = DisconnectWatch(receive, delay_s=_PLAIN_WATCH_DELAY_S)
    try:
        response = await upstream.post(request.upstream_body, request_id)
        await _relay_json(upstream, response, request, request_id, send, result, watch)
    except asyncio.CancelledError:
        if not watch.caller_left:
            raise
        watch.absorb_cancel()
        result.outcome, result.status = "client_disconnected", 499
    finally:
        watch.stop()


async def _relay_json(
    upstream: Upstream,
    response: aiohttp.ClientResponse,
    request: ChatRequest,
    request_id: bytes,
    send: Send,
    result: RelayResult,
    watch: DisconnectWatch,
) -> None:
    body = await upstream.read_answer(response)
    status = response.status
    if 300 <= status < 400:
        raise upstream.bad_response(f"The upstream answered with a redirect (HTTP {status}).")
    try:
        payload = parse_json(body)
    except ValueError:
        raise upstream.bad_response(
            f"The upstream answered HTTP {status} with a body that is not JSON."
        ) from None
    result.outcome, result.status = ("ok" if status < 400 else "upstream_error"), status
    if status >= 400:
        upstream.metrics.upstream_error("http_4xx" if status < 500 else "http_5xx")
        body = upstream.error_body(status, payload, body)
    if status < 400 and isinstance(payload, dict):
        result.upstream_answered = True
        result.service_tier = payload.get("service_tier")
        body = _with_estimated_cost(payload, body, request, result)
    await send_json(send, status, body, request_id, upstream.passed_headers(response))
    result.delivered, result.finished_at = True, time.monotonic()


def _with_estimated_cost(
    payload: dict[str, Any], body: bytes, request: ChatRequest, result: RelayResult
) -> bytes:
    """Usage with `estimated_cost`, as booked. Upstream's bytes go out as they came when it gave
    believable tokens and cost (the usual); else the usage is rewritten: tokens believed but no
    believable cost, the price table's cost; no believable tokens, the gateway's estimate of them."""
    usage: Any = payload.get("usage")
    tokens = believed_tokens(usage)
    if tokens is not None and believed_cost(usage.get("estimated_cost")):
        result.usage = usage
        return body
    if tokens is None:
        result.usage_estimated = True
        tokens = estimate_prompt_tokens(request.body), estimate_tokens(completion_text(payload))
        usage = {}  # upstream's figures are not relayed beside the gateway's own
    prompt, completion = tokens
    usage = {
        **usage,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated_cost": float(billed_usd(request.model, prompt, completion)),
    }
    result.cost_added = True
    payload["usage"] = result.usage = usage
    return _dumps(payload)


async def relay_stream(
    upstream: Upstream,
    request: ChatRequest,
    request_id: bytes,
    receive: Receive,
    send: Send,
    result: RelayResult,
) -> None:
    """Forward a streamed request and relay its events as they come; close upstream if the caller leaves.

    If the server cancels the relay (shutdown past its grace period), an open stream is ended with
    an SSE error event before the cancel goes on, and the result says what was delivered.
    """
    watch = DisconnectWatch(receive)
    tap = StreamTap(
        withhold_usage_only=not request.caller_wants_usage, max_event_bytes=upstream.max_answer_bytes
    )
    try:
        response = await upstream.post(request.upstream_body, request_id)
        # Anything but a 200 event stream is read as JSON: an error relayed, a redirect or a 204 a 502.
        if response.status != 200 or not response.content_type.startswith("text/event-stream"):
            await _relay_json(upstream, response, request, request_id, send, result, watch)
            return
        upstream.refuse_compressed_stream(response)
        reusable = False
        in_flight = upstream.metrics.streams_in_flight
        in_flight.inc()
        try:
            last = await _pump_events(upstream, response, tap, request_id, send, result)
            watch.stop()  # the end of the response is not a disconnect
            await send({"type": "http.response.body", "body": last})
            result.delivered, result.finished_at = True, time.monotonic()
            in_flight.dec()
            # The caller's response ended with [DONE]; upstream's own end (normally right behind it)
            # is read now, so that its connection can go back to the pool. Any other is closed at once.
            reusable = result.outcome == "ok" and await _read_to_end(response)
        finally:
            if not result.delivered:
                in_flight.dec()
            if reusable:
                response.release()
            else:
                response.close()
    except asyncio.CancelledError:
        _note_stream(result, tap)
        if result.delivered:
            pass  # the caller has its whole answer; a cancel during the drain changes nothing for it
        elif not watch.caller_left:
            result.outcome = "shutdown"
            if result.upstream_answered:
                await send({"type": "http.response.body", "body": _error_event(_SHUTTING_DOWN)})
        elif tap.done:  # the caller had everything, [DONE] included, and hung up: that is a success
            result.outcome = "ok"
        else:
            result.outcome, result.status = "client_disconnected", 499
        if not watch.caller_left:
            raise
        watch.absorb_cancel()
    finally:
        watch.stop()


async def _read_to_end(response: aiohttp.ClientResponse) -> bool:
    """Read what upstream sends after [DONE] (normally just the end of the body); True if it ended."""
    try:
        async with asyncio.timeout(_AFTER_DONE_WAIT_S):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        return False
    return True


_PLAIN_WATCH_DELAY_S = 0.25
_AFTER_DONE_WAIT_S = 1.0  # an upstream that says [DONE] and then neither ends nor closes is closed

_SHUTTING_DOWN = UpstreamUnavailable(
    "The gateway is shutting down; the stream was ended.", code="shutting_down"
)


async def _pump_events(
    upstream: Upstream,
    response: aiohttp.ClientResponse,
    tap: StreamTap,
    request_id: bytes,
    send: Send,
    result: RelayResult,
) -> bytes:
    """Relay events until [DONE] or upstream's end; return the last bytes to send (an error event on
    failure). The read that carries [DONE] is returned rather than sent, to go out with the end."""
    content_type = upstream.passed_header(response.headers.get("content-type", ""))
    headers = [
        (b"content-type", content_type or b"text/event-stream"),
        (REQUEST_ID_HEADER, request_id),
        *_SSE_HEADERS,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    result.status = response.status
    result.upstream_answered = True
    failure: GatewayError | None = None
    last = b""
    try:
        async for chunk in response.content.iter_any():
            out = tap.feed(chunk)
            if out and result.first_byte_at is None:
                result.first_byte_at = time.monotonic()
            if tap.done:  # these events end with [DONE]: they are the caller's last bytes
                last = out
                break
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except (aiohttp.ClientError, TimeoutError) as error:
        failure = upstream.translate(error)
    except StreamTooLarge:
        failure = upstream.bad_response(
            f"The upstream sent an SSE event over {upstream.max_answer_bytes} bytes."
        )
    if failure is None and not tap.done:
        last = tap.rest()  # upstream ended: a final [DONE] may lack its blank line
    _note_stream(result, tap)
    if tap.done:
        result.outcome = "ok"
        return last
    if failure is None:
        failure = upstream.bad_response("The upstream stream ended before its [DONE] event.")
    result.outcome = "timeout" if isinstance(failure, UpstreamTimeout) else "upstream_error"
    return _error_event(failure)


def _note_stream(result: RelayResult, tap: StreamTap) -> None:
    result.usage = tap.usage
    result.content_chunks = tap.content_chunks
    result.service_tier = tap.service_tier


def _error_event(error: GatewayError) -> bytes:
    """What ends a failed stream: one SSE error event (a cut event's partial bytes were never sent)."""
    return b"data: " + error.to_json() + b"\n\n"


class DisconnectWatch:
    """Cancels the relaying task the moment the caller hangs up, so the upstream request closes at once.

    The relay checks `caller_left` when it sees CancelledError: a cancel from here is a disconnect
    to book; any other cancel (shutdown) goes on up. With `delay_s`, watching starts that much
    later (a caller that left earlier is noticed then, at once).
    """

    def __init__(self, receive: Receive, delay_s: float = 0.0) -> None:
        self.caller_left = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._armed = True
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if delay_s:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.caller_left = True
        if self._armed and self._task is not None:
            self._task.cancel()

    def absorb_cancel(self) -> None:
        """The relay has handled our cancel: let the task carry on (to book the request)."""
        if self._task is not None:
            self._task.uncancel()

    def stop(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
