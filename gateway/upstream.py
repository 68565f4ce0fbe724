"""Open upstream: send a checked request to the upstream endpoint and check what comes back.

`Upstream.open` returns a checked answer as a value, or raises one mapped `GatewayError`:

- `JsonAnswer`: a whole JSON answer, read under a bound and parsed; an error's body already in
  OpenAI's error shape (completed if upstream left parts out) and without the upstream token;
- `EventStream`: a 200 `text/event-stream` answer, not compressed, whose events are still to come.

The upstream client is aiohttp's: measured 8-11x the throughput of httpx's pool under concurrency
on the same proxy (see docs/design.md, the library choices). Every aiohttp error becomes a `GatewayError`
in one place (`Upstream.translate`, applied by the `with` block around every use of the client, as
httpx's `map_httpcore_exceptions` does), with a message that names no secret.

What upstream sends is bounded: a JSON answer or an SSE event over `max_answer_bytes` (the
configured `server.max_body_bytes`) is a 502, as is a compressed answer that inflates past it or a
compressed stream. An error body and the headers passed on never show the upstream token, in any
case or escaping; a 2xx answer and stream events are relayed as upstream sent them (byte for byte).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from prometheus_client import Gauge

from gateway.config import UpstreamConfig
from gateway.errors import GatewayError, Overloaded, UpstreamTimeout, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.validate import ChatRequest, parse_json

logger = logging.getLogger("gateway.upstream")

_PASSED_HEADERS = ("retry-after",)
_NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)  # the process's or the system's open-files limit
_INFLATED_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib's wbits for "either header, detected"
# Upstream's address is looked up again after this long: a moved endpoint is followed within minutes.
_DNS_CACHE_S = 300
# An upstream that says [DONE] and then neither ends its body nor closes within this is closed.
_AFTER_DONE_WAIT_S = 1.0


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """A whole JSON answer of upstream's, checked: `body` is what the caller may be sent (for an
    error, in OpenAI's shape and without the token); `payload` is the body parsed as upstream sent
    it; `headers` are upstream's headers the caller may see."""

    status: int
    body: bytes
    payload: Any
    headers: tuple[tuple[bytes, bytes], ...]


class EventStream:
    """A 200 `text/event-stream` answer, not compressed, its events still to come. The relay reads it
    (`read`: errors mapped like any other) and then closes it (`close`)."""

    __slots__ = ("_response", "_upstream", "content_type")

    def __init__(self, response: aiohttp.ClientResponse, upstream: Upstream, content_type: bytes) -> None:
        self._response = response
        self._upstream = upstream
        self.content_type = content_type  # upstream's, as the caller may see it

    @property
    def max_event_bytes(self) -> int:
        return self._upstream.max_answer_bytes

    @property
    def in_flight(self) -> Gauge:
        """The streams being relayed to callers now (a metric)."""
        return self._upstream.metrics.streams_in_flight

    async def read(self) -> bytes:
        """What upstream sent since the last read (b"" at its end)."""
        with self._upstream.client_errors_mapped:
            return await self._response.content.readany()

    def event_too_large(self) -> UpstreamUnavailable:
        return self._upstream.bad_response(
            f"The upstream sent an SSE event over {self.max_event_bytes} bytes."
        )

    def ended_before_done(self) -> UpstreamUnavailable:
        return self._upstream.bad_response("The upstream stream ended before its [DONE] event.")

    async def read_to_end(self) -> bool:
        """Read what upstream sends after [DONE] (normally just the end of the body); True if it ended.
        Not an error to report if it does not: its connection is just not reused."""
        try:
            async with asyncio.timeout(_AFTER_DONE_WAIT_S):
                while await self._response.content.readany():
                    pass
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

    def close(self, *, reusable: bool = False) -> None:
        """Done with it: its connection goes back to the pool if `reusable` (read to its end), else
        is closed (upstream stops generating what nobody will read)."""
        if reusable:
            self._response.release()
        else:
            self._response.close()


Answer = JsonAnswer | EventStream


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
        self.client_errors_mapped = _ClientErrorsMapped(self)

    async def start(self, base_url: str | None = None) -> None:
        """Open the client session; `base_url` overrides the configured one (the in-process simulator)."""
        if base_url is not None:
            self.url = f"{base_url.rstrip('/')}/chat/completions"
        timeout = aiohttp.ClientTimeout(
            total=self._config.total_timeout_s,  # None: no deadline, and no timer per request
            sock_connect=self._config.connect_timeout_s,
            sock_read=self._config.read_timeout_s,
        )
        connector = aiohttp.TCPConnector(limit=self._config.max_connections, ttl_dns_cache=_DNS_CACHE_S)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            headers={"User-Agent": "gateway", "Accept-Encoding": "identity"},
            cookie_jar=aiohttp.DummyCookieJar(),  # an upstream cookie must never pass between callers
            auto_decompress=False,  # aiohttp would inflate without a bound: _read_answer does, with one
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def started(self) -> bool:
        return self._session is not None and not self._session.closed

    async def open(self, request: ChatRequest, request_id: bytes) -> Answer:
        """Send `request` upstream; its answer, checked. For a stream request, anything but a 200
        event stream is read as JSON: an error relayed, a redirect or a 204 a 502."""
        with self.client_errors_mapped:
            response = await self._post(request.upstream_body, request_id)
            if (
                request.stream
                and response.status == 200
                and response.content_type.startswith("text/event-stream")
            ):
                return self._event_stream(response)
            return await self._json_answer(response)

    async def _post(self, body: bytes, request_id: bytes) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() was not called"
        headers = {
            "Authorization": self._authorization,
            "Content-Type": "application/json",
            "X-Request-Id": request_id.decode("ascii"),
        }
        return await self._session.post(self.url, data=body, headers=headers, allow_redirects=False)

    def _event_stream(self, response: aiohttp.ClientResponse) -> EventStream:
        """A stream is relayed as it comes: one that upstream compressed (though asked for identity)
        would have to be inflated event by event. It is refused instead, as a 502."""
        if _content_coding(response) != "identity":
            response.close()
            raise self.bad_response("The upstream compressed its stream, though asked not to.")
        content_type = self.passed_header(response.headers.get("content-type", ""))
        return EventStream(response, self, content_type or b"text/event-stream")

    async def _json_answer(self, response: aiohttp.ClientResponse) -> JsonAnswer:
        body = await self._read_answer(response)
        status = response.status
        if 300 <= status < 400:
            raise self.bad_response(f"The upstream answered with a redirect (HTTP {status}).")
        try:
            payload = parse_json(body)
        except ValueError:
            raise self.bad_response(
                f"The upstream answered HTTP {status} with a body that is not JSON."
            ) from None
        if status >= 400:
            self.metrics.upstream_error("http_4xx" if status < 500 else "http_5xx")
            body = self._error_body(status, payload, body)
        return JsonAnswer(status, body, payload, self._passed_headers(response))

    async def _read_answer(self, response: aiohttp.ClientResponse) -> bytes:
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
        coding = _content_coding(response)
        if coding == "identity":
            return None
        if coding in _INFLATED_CODINGS:
            return zlib.decompressobj(_GZIP_OR_ZLIB)
        raise self.bad_response(
            "The upstream compressed its answer in an encoding the gateway does not read."
        )

    def _too_large(self) -> UpstreamUnavailable:
        return self.bad_response(f"The upstream's answer is over {self.max_answer_bytes} bytes.")

    def translate(self, error: aiohttp.ClientError | TimeoutError) -> GatewayError:
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

    def _error_body(self, status: int, payload: Any, body: bytes) -> bytes:
        """An upstream error's JSON body as the caller gets it: in OpenAI's shape (completed if upstream
        left parts out) and without the token; byte for byte when it is both already (the usual)."""
        in_shape = _in_openai_shape(payload)
        may_hold_token = self._token.may_hold(body)
        if in_shape and not may_hold_token:
            return body
        try:
            shaped = payload if in_shape else _completed_error(payload, status)
            clean = self._token.scrubbed(shaped) if may_hold_token else shaped
            if in_shape and clean == payload:
                return body
            return json_bytes(clean)
        except (RecursionError, NestedTooDeeply):
            raise self.bad_response(
                f"The upstream answered HTTP {status} with JSON nested too deeply."
            ) from None

    def passed_header(self, value: str) -> bytes | None:
        """A header value of upstream's as the caller may see it: printable ASCII (else dropped), with
        the token starred."""
        if not (value.isascii() and value.isprintable()):
            return None
        return self._token.scrubbed_ascii(value).encode()

    def _passed_headers(self, response: aiohttp.ClientResponse) -> tuple[tuple[bytes, bytes], ...]:
        passed = []
        for name in _PASSED_HEADERS:
            value = response.headers.get(name)
            clean = None if value is None else self.passed_header(value)
            if clean is not None:
                passed.append((name.encode(), clean))
        return tuple(passed)


class _ClientErrorsMapped:
    """`with` it around every use of the HTTP client: its errors come out as the gateway's own
    (`Upstream.translate`). It keeps no state, so one serves every request."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, aiohttp.ClientError | TimeoutError):
            raise self._upstream.translate(error) from None


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
        return json_bytes(found).decode()  # a list of validation errors, say: kept as its JSON text
    return f"The upstream answered HTTP {status}."


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _content_coding(response: aiohttp.ClientResponse) -> str:
    """The answer's Content-Encoding, lowercased; "identity" when there is none."""
    return response.headers.get("Content-Encoding", "").strip().lower() or "identity"


class NestedTooDeeply(ValueError):
    """Parsed JSON from upstream too deep to be written again."""


def json_bytes(payload: Any) -> bytes:
    """JSON parsed from upstream, written again: what only the standard parser read (an integer over
    64 bits, nesting deeper than orjson writes, ...) is written by the standard writer."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        try:
            return json.dumps(payload, separators=(",", ":")).encode()
        except RecursionError:
            raise NestedTooDeeply from None
