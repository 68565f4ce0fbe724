"""The built-in upstream simulator: an OpenAI/DeepInfra-compatible chat completions server.

It stands in for DeepInfra in the demo, the tests and the benchmark: configurable latency (time to
first token), tokens per second and reply length; DeepInfra-shaped `usage` with `estimated_cost`;
SSE streams ending in `data: [DONE]`. With `usage_style: deepinfra` usage rides on the last content
chunk, as DeepInfra sends it; with `openai` it comes as a separate empty-`choices` chunk, and only
when the request asked for it with `stream_options.include_usage`.

It runs on aiohttp's web server so that `gateway serve` can start it inside its own event loop
(no second process, no signal handlers taken over).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from gateway.accounting import billed_usd, estimate_prompt_tokens
from gateway.config import ModelConfig, SimulatorConfig
from gateway.errors import GatewayError

_WORDS = (
    "The quick brown fox jumps over the lazy dog while a patient gateway counts every token it relays "
    "and books the cost to the right caller, to the nano-dollar."
).split()
_FALLBACK_PRICE = Decimal("0.049")
# Larger than any body the gateway forwards (its server.max_body_bytes, 20 MiB by default): the
# gateway's limit is the one a caller meets, never the simulator's.
_MAX_BODY_BYTES = 64 * 1024 * 1024
_ID_HEX_DIGITS = 24  # chatcmpl-<24 hex digits>, as long as OpenAI's ids


@dataclass(frozen=True)
class Reply:
    tokens: list[str]
    finish_reason: str


def create_simulator_app(settings: SimulatorConfig, models: Iterable[ModelConfig] = ()) -> web.Application:
    simulator = _Simulator(settings, {model.name: model for model in models})
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    for prefix in ("/v1/openai", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", simulator.chat_completions)
        app.router.add_get(f"{prefix}/models", simulator.list_models)
    return app


class _Simulator:
    def __init__(self, settings: SimulatorConfig, models: dict[str, ModelConfig]) -> None:
        self._settings = settings
        self._models = models

    async def list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "simulator"} for name in self._models
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(_BadRequest("Request body is not valid JSON."))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(_BadRequest("messages is required."))
        reply = self._reply(body)
        prompt_tokens = estimate_prompt_tokens(body)
        usage = self._usage(body.get("model"), prompt_tokens, len(reply.tokens))
        if self._settings.latency_ms:
            await asyncio.sleep(self._settings.latency_ms / 1000)
        if body.get("stream") is True:
            return await self._stream(request, body, reply, usage)
        await self._pace(len(reply.tokens))
        return web.Response(
            body=orjson.dumps(_completion(body, reply, usage)), content_type="application/json"
        )

    def _reply(self, body: dict[str, Any]) -> Reply:
        length = self._settings.reply_tokens
        finish_reason = "stop"
        for field in ("max_tokens", "max_completion_tokens"):  # the old name and OpenAI's newer one
            limit = body.get(field)
            if isinstance(limit, int) and limit < length:
                length, finish_reason = limit, "length"
        words = itertools.islice(itertools.cycle(_WORDS), length)
        return Reply(tokens=[f" {word}" for word in words], finish_reason=finish_reason)

    def _usage(self, model_name: Any, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        model = self._models.get(model_name) if isinstance(model_name, str) else None
        if model is None:
            model = ModelConfig(
                name="?", input_usd_per_mtok=_FALLBACK_PRICE, output_usd_per_mtok=_FALLBACK_PRICE
            )
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "estimated_cost": float(billed_usd(model, prompt_tokens, completion_tokens)),
        }

    async def _pace(self, tokens: int) -> None:
        if self._settings.tokens_per_s and tokens:
            await asyncio.sleep(tokens / self._settings.tokens_per_s)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply, usage: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the gateway closed it (its caller left)
            await self._events(response, body, reply, usage)
        return response

    async def _events(
        self, response: web.StreamResponse, body: dict[str, Any], reply: Reply, usage: dict[str, Any]
    ) -> None:
        chunk = _chunk_maker(body)
        gap = 1 / self._settings.tokens_per_s if self._settings.tokens_per_s else 0
        await response.write(chunk({"role": "assistant", "content": ""}))
        for token in reply.tokens:
            if gap:
                await asyncio.sleep(gap)
            await response.write(chunk({"content": token}))
        options = body.get("stream_options")
        asked_for_usage = isinstance(options, dict) and options.get("include_usage") is True
        if self._settings.usage_style == "deepinfra":
            await response.write(chunk({}, reply.finish_reason, usage=usage))
        else:
            await response.write(chunk({}, reply.finish_reason))
            if asked_for_usage:
                await response.write(chunk(None, usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


def _chunk_maker(body: dict[str, Any]) -> Any:
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:_ID_HEX_DIGITS]}"
    created = int(time.time())
    model = body.get("model")

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Any = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        event: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            event["usage"] = usage
        return b"data: " + orjson.dumps(event) + b"\n\n"

    return chunk


def _completion(body: dict[str, Any], reply: Reply, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:_ID_HEX_DIGITS]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(reply.tokens)},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": usage,
    }


class _BadRequest(GatewayError):
    """A request the simulator cannot answer: it checks only what it needs, and names no code."""

    status = 400
    error_type = "invalid_request_error"


def _error(error: GatewayError) -> web.Response:
    return web.Response(
        body=error.to_json(), status=error.status, content_type="application/json", charset="utf-8"
    )


class RunningSimulator:
    """A simulator serving inside the current event loop."""

    def __init__(self, runner: web.AppRunner, base_url: str) -> None:
        self._runner = runner
        self.base_url = base_url

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_simulator(
    settings: SimulatorConfig, models: Iterable[ModelConfig], host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    runner = web.AppRunner(create_simulator_app(settings, models), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningSimulator(runner, f"http://{host}:{bound_port}/v1/openai")
