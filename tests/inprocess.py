"""The gateway inside the test process: its ASGI app, driven through httpx's `ASGITransport`, in front
of a function upstream (a handler the test gives, served by aiohttp on a real socket in the same
event loop). A request takes a millisecond or two; no subprocess, no thread of the test's own.

Only the public app is used: HTTP in, ledger rows and /metrics out. The app is built with
`create_app(parse_config(...))` as `gateway serve` builds it, and started and stopped through the
ASGI lifespan protocol as a server does (httpx's ASGITransport sends requests only). What needs a
real server (uvicorn's HTTP handling, http_guard, workers, signals, the SDKs end to end) stays in
the subprocess tier (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import parse_config
from tests.eventually import eventually_async
from tests.scenarios import COMPLETION_BYTES, TRICKY_WRITES
from tests.servers import CALLER_KEY, UPSTREAM_TOKEN, UpstreamRequest, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
REQUEST_ID = "x-request-id"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# A handler still waiting when its test ends (an answer the gateway never closed) is not waited for.
_SHUTDOWN_TIMEOUT_S = 0.5


# --- the function upstream --------------------------------------------------------------------------


async def complete(request: web.BaseRequest) -> web.StreamResponse:
    """The usual answer: a completion, or for a stream DeepInfra's events in awkward writes."""
    if (await request.json()).get("stream") is True:
        return await sse(TRICKY_WRITES)(request)
    return web.Response(body=COMPLETION_BYTES, content_type="application/json")


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    """Always `body` with `status`, as JSON unless `headers` name another Content-Type."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(
            status=status, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )

    return handler


def sse(writes: list[bytes], *, end: bool = True) -> Handler:
    """A 200 event stream, one write (and one chunk) per piece; without `end`, it then stays open."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in writes:
            await response.write(piece)
        if not end:
            await asyncio.Event().wait()  # until the gateway closes the connection (cancelled then)
        await response.write_eof()
        return response

    return handler


async def never_answers(request: web.BaseRequest) -> web.StreamResponse:
    """No answer at all, until the gateway closes the connection."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@dataclass
class FunctionUpstream:
    """An upstream whose answers come from handler functions, on 127.0.0.1 in the test's event loop.

    `default` answers every request, except those whose request id a test gave a handler of its
    own with `will_answer`. Every request is recorded; a request whose connection the gateway
    closed before its answer was complete is noted in `closed` (aiohttp cancels its handler).
    """

    default: Handler = complete
    requests: list[UpstreamRequest] = field(default_factory=list)
    closed: set[str] = field(default_factory=set)
    _handlers: dict[str, Handler] = field(default_factory=dict)
    _runner: web.ServerRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/openai"

    async def start(self) -> FunctionUpstream:
        server = web.Server(self._serve, handler_cancellation=True)
        self._runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def will_answer(self, handler: Handler) -> str:
        """A new request id; the request that carries it is answered by `handler`."""
        request_id = str(uuid.uuid4())
        self._handlers[request_id] = handler
        return request_id

    def find(self, request_id: str) -> list[UpstreamRequest]:
        return [r for r in self.requests if r.headers.get(REQUEST_ID) == request_id]

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(UpstreamRequest(request.method, request.path, headers, body))
        request_id = headers.get(REQUEST_ID, "")
        try:
            return await self._handlers.get(request_id, self.default)(request)
        except asyncio.CancelledError:
            self.closed.add(request_id)
            raise


# --- the gateway in the test process ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Start `app` as a server does (the ASGI lifespan protocol), stop it at the end; yields the state
    its lifespan set up, which a server hands to every request."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"}, "state": state}
    running: asyncio.Future[None] = asyncio.ensure_future(app(scope, to_app.get, from_app.put))
    await _lifespan_step(running, to_app, from_app, "startup")
    try:
        yield state
    finally:
        await _lifespan_step(running, to_app, from_app, "shutdown")
        await running


async def _lifespan_step(
    running: asyncio.Future[None], to_app: asyncio.Queue[Message], from_app: asyncio.Queue[Message], step: str
) -> None:
    await to_app.put({"type": f"lifespan.{step}"})
    answered = asyncio.ensure_future(from_app.get())
    either: list[asyncio.Future[Any]] = [answered, running]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not answered.done():
        answered.cancel()
        running.result()  # the app's own error, if it raised one
        raise RuntimeError(f"the app ended during lifespan {step}")
    message = answered.result()
    if message["type"] != f"lifespan.{step}.complete":
        with contextlib.suppress(Exception):
            await running
        raise RuntimeError(f"lifespan {step} failed: {message.get('message', '')}")


def with_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """What uvicorn does for each request: a shallow copy of the lifespan's state in its scope."""

    async def app_with_state(scope: Message, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return app_with_state


@dataclass
class InProcessGateway:
    """A running app and a client for it that sends the caller key; ledger rows and metrics out."""

    app: ASGIApp
    client: httpx.AsyncClient
    upstream: FunctionUpstream
    ledger_path: Path

    async def chat(
        self,
        body: dict[str, Any] | bytes,
        *,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST `body` (a dict as JSON) to the chat endpoint, with a new request id unless given."""
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        sent = {REQUEST_ID: request_id or str(uuid.uuid4()), **(headers or {})}
        return await self.client.post(CHAT_PATH, content=content, headers=sent)

    def rows_of(self, request_id: str) -> list[dict[str, Any]]:
        """The request's rows in the ledger, read with the standard library (no gateway code)."""
        with contextlib.closing(sqlite3.connect(self.ledger_path)) as database:
            database.row_factory = sqlite3.Row
            found = database.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,))
            return [dict(row) for row in found]

    async def booked(self, request_id: str) -> dict[str, Any]:
        """The one row booked for the request, once the ledger's writer thread has written it."""

        (row,) = await eventually_async(
            lambda: self.rows_of(request_id), waiting_for=f"the row of request {request_id}"
        )
        return row

    async def metrics(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    async def hang_up(
        self, body: dict[str, Any], request_id: str, *, after: Callable[[list[Message]], bool]
    ) -> list[Message]:
        """Send a chat request the way a server hands it to the app, and have the caller disconnect
        once `after(messages sent so far)` holds (httpx's transport cannot hang up halfway); returns
        what the app sent."""
        content = orjson.dumps(body)
        headers = [
            (b"host", b"gateway.test"),
            (b"authorization", f"Bearer {CALLER_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (REQUEST_ID.encode(), request_id.encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": CHAT_PATH,
            "raw_path": CHAT_PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40_000),
            "server": ("gateway.test", 80),
        }
        sent: list[Message] = []
        gone = asyncio.Event()
        requests = iter([{"type": "http.request", "body": content, "more_body": False}])

        async def receive() -> Message:
            request = next(requests, None)
            if request is not None:
                return request
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if after(sent):
                gone.set()

        if after(sent):
            gone.set()
        await self.app(scope, receive, send)
        return sent


@contextlib.asynccontextmanager
async def in_process_gateway(
    function_upstream: FunctionUpstream, tmp: Path, env: dict[str, str] | None = None, **sections: Any
) -> AsyncIterator[InProcessGateway]:
    """The gateway's app in front of `function_upstream`, with a SQLite ledger in `tmp`; config
    `sections` as for `gateway_config` (auth: alice with the caller key, unless given)."""
    config = gateway_config(function_upstream.base_url, **sections)
    ledger_path = tmp / "ledger.db"
    config.setdefault("ledger", {}).setdefault("url", f"sqlite:///{ledger_path}")
    environment = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, **(env or {})}
    app = create_app(parse_config(yaml.safe_dump(config), environment, base_dir=tmp))
    async with lifespan(app) as state:
        served = with_state(app, state)
        transport = httpx.ASGITransport(app=served)
        headers = {"Authorization": f"Bearer {CALLER_KEY}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway.test", headers=headers, timeout=10
        ) as client:
            yield InProcessGateway(served, client, function_upstream, ledger_path)
