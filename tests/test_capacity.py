"""Capacity: many concurrent streams through one process; a burst of connections over the workers."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
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


def test_workers_share_the_connections_of_a_burst(tmp_path: Path) -> None:
    """A client pool opening its connections at once is spread over the workers, not piled on one."""
    gateway = GatewayProcess(gateway_config(server={"workers": 2}), tmp_path).start()
    try:
        workers = gateway.worker_pids()
        assert len(workers) == 2
        host, port = gateway.url.removeprefix("http://").split(":")
        connections = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(CONNECTIONS)]
        for connection in connections:  # all connected at once, as a client pool opening does
            connection.connect()
        before = {pid: _cpu_ticks(pid) for pid in workers}
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(_many_requests, connections))
        used = {pid: _cpu_ticks(pid) - before[pid] for pid in workers}
    finally:
        gateway.stop()
    assert all(ticks >= 0.1 * sum(used.values()) for ticks in used.values()), used


CONNECTIONS = 16
_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
_HEADERS = {"Authorization": f"Bearer {CALLER_KEY}", "Content-Type": "application/json"}


def _many_requests(connection: http.client.HTTPConnection) -> None:
    """Requests one after another on one kept-alive connection."""
    with contextlib.closing(connection):
        for _ in range(40):
            connection.request("POST", "/v1/openai/chat/completions", body=_BODY, headers=_HEADERS)
            response = connection.getresponse()
            response.read()
            assert response.status == 200


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
