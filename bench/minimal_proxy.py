"""The floor of docs/performance.md: the least a FastAPI proxy on aiohttp can do, to compare the gateway with.

It reads the body, parses it with `orjson.loads`, checks one field (`model` is a string), forwards the
raw bytes with one shared `aiohttp.ClientSession`, and relays the answer: a JSON body whole, a stream
chunk by chunk as it arrives. No auth, no validation beyond that, no accounting.

Run: `python bench/minimal_proxy.py --port 8002 --upstream http://127.0.0.1:8001/v1/openai/chat/completions`
(uvicorn, uvloop, httptools, one worker, no access log). `GET /healthz` answers 200.

`--client httpx` makes the same proxy on a stock `httpx.AsyncClient` instead: the measurement
behind the gateway's choice of upstream client.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

UPSTREAM_HEADERS = {"Authorization": "Bearer bench-upstream-token", "Content-Type": "application/json"}


def create_app(upstream_url: str, client: str = "aiohttp") -> FastAPI:
    if client == "httpx":
        return _create_httpx_app(upstream_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
        yield
        await app.state.session.close()

    app = _app_with_healthz(lifespan)

    @app.post("/v1/openai/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        if (rejected := _check(body)) is not None:
            return rejected
        session: aiohttp.ClientSession = request.app.state.session
        upstream = await session.post(upstream_url, data=body, headers=UPSTREAM_HEADERS)
        if upstream.content_type == "text/event-stream":
            return StreamingResponse(_relay(upstream), upstream.status, media_type="text/event-stream")
        content = await upstream.read()
        upstream.release()
        return Response(content, upstream.status, media_type="application/json")

    return app


def _create_httpx_app(upstream_url: str) -> FastAPI:
    """The same proxy with a stock httpx.AsyncClient (httpcore's pool)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            app.state.client = client
            yield

    app = _app_with_healthz(lifespan)

    @app.post("/v1/openai/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        if (rejected := _check(body)) is not None:
            return rejected
        client: httpx.AsyncClient = request.app.state.client
        upstream_request = client.build_request("POST", upstream_url, content=body, headers=UPSTREAM_HEADERS)
        upstream = await client.send(upstream_request, stream=True)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                _relay_httpx(upstream), upstream.status_code, media_type="text/event-stream"
            )
        content = await upstream.aread()
        await upstream.aclose()
        return Response(content, upstream.status_code, media_type="application/json")

    return app


async def _relay_httpx(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


async def _relay(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


def _app_with_healthz(lifespan: Any) -> FastAPI:
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _check(body: bytes) -> JSONResponse | None:
    """All the minimal proxy checks: the body is a JSON object whose `model` is a string."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _bad_request("body is not JSON")
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return _bad_request("model must be a string")
    return None


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, 400)


def main() -> None:
    parser = argparse.ArgumentParser(description="The minimal FastAPI + aiohttp proxy (the floor).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream chat completions URL")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.client),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
