"""Many concurrent streams through one gateway process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai

from tests.servers import CALLER_KEY, MODEL, GatewayProcess, gateway_config

STREAMS = 150
SOFT_LIMIT = 128  # each stream holds three sockets here (caller, and both ends of the simulator's)


def test_more_concurrent_streams_than_the_usual_open_files_limit_allows(tmp_path: Path) -> None:
    """Started with a soft limit far below what the streams need, the gateway lifts it to the hard
    limit: every stream is open at the same moment, and every one ends with its usage."""
    config = gateway_config(simulator={"latency_ms": 0, "tokens_per_s": 4, "reply_tokens": 8})  # 2 s a stream
    gateway = GatewayProcess(config, tmp_path).start(open_files_soft_limit=SOFT_LIMIT)
    try:
        first_bytes, ends, usages = asyncio.run(_run_streams(gateway.url))
    finally:
        gateway.stop()
    assert len(usages) == STREAMS and all(usage is not None for usage in usages)
    assert max(first_bytes) < min(ends), "the streams were not all open at once"


async def _run_streams(url: str) -> tuple[list[float], list[float], list[object]]:
    limits = httpx.Limits(max_connections=STREAMS)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http_client:
        client = openai.AsyncOpenAI(
            base_url=url + "/v1/openai", api_key=CALLER_KEY, http_client=http_client, max_retries=0
        )
        results = await asyncio.gather(*(_one_stream(client) for _ in range(STREAMS)))
    first_bytes, ends, usages = zip(*results, strict=True)
    return list(first_bytes), list(ends), list(usages)


async def _one_stream(client: openai.AsyncOpenAI) -> tuple[float, float, object]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    first_byte = time.monotonic()  # the SDK returns once the response has started
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    return first_byte, time.monotonic(), usage
