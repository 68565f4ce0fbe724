"""A small SSE load client: N concurrent streaming chat requests, timed one by one.

Each stream is a POST with `"stream": true`. Per stream it measures the time to the first byte of
the body (TTFB) and to the end of the stream (total), and checks that the stream was a 200 that ended
with `data: [DONE]`; any other ending is a failure, counted by reason. Streams are started until
`total` have been started or `duration_s` has passed, whichever comes first, keeping `concurrency`
open at a time; the workers start 2 ms apart, so that the streams do not all begin at the same moment
(the client's own burst would otherwise show up as TTFB). A warm-up round of one stream per
connection goes first: its failures count, its timings do not. The client runs on uvloop.

Also runnable on its own: `python bench/sse_client.py URL [--concurrency 32] [--total 1000] [--duration 8]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"
BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "stream": True})
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
DONE = b"data: [DONE]\n\n"
STREAM_TIMEOUT_S = 30.0
STAGGER_S = 0.002  # worker i starts i * 2 ms late, so that streams do not all start at the same moment


@dataclass
class Streams:
    """What the streams of one run did: timings (seconds) of the good ones, failures by reason."""

    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


async def one_stream(
    session: aiohttp.ClientSession, url: str, streams: Streams, headers: dict[str, str] = HEADERS
) -> None:
    """Run one streaming request; record its timings, or why it failed."""
    timings = await read_stream(session, url, headers=headers)
    if isinstance(timings, str):
        streams.failures[timings] += 1
    else:
        streams.ttfb.append(timings[0])
        streams.total.append(timings[1])


async def read_stream(
    session: aiohttp.ClientSession,
    url: str,
    on_first_byte: Callable[[], None] | None = None,
    headers: dict[str, str] = HEADERS,
) -> tuple[float, float] | str:
    """One streaming request read to its end: (seconds to the first byte, to the end), or why it failed."""
    started = time.perf_counter()
    first_byte: float | None = None
    tail = b""
    try:
        async with session.post(url, data=BODY, headers=headers) as response:
            async for chunk in response.content.iter_any():
                if first_byte is None:
                    first_byte = time.perf_counter()
                    if on_first_byte is not None:
                        on_first_byte()
                tail = (tail + chunk)[-len(DONE) :]
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__
    ended = time.perf_counter()
    if status != 200:
        return f"HTTP {status}"
    if first_byte is None or not tail.endswith(DONE):
        return "no [DONE] at the end"
    return first_byte - started, ended - started


async def run_streams(
    url: str, concurrency: int, total: int, duration_s: float, headers: dict[str, str] = HEADERS
) -> dict[str, Any]:
    """Warm up, then run up to `total` streams for at most `duration_s`; return the summary."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warmup = Streams()
        await asyncio.gather(*(one_stream(session, url, warmup, headers) for _ in range(concurrency)))
        streams = Streams()
        tickets = iter(range(total))
        deadline = time.perf_counter() + duration_s

        async def worker(index: int) -> None:
            await asyncio.sleep(index * STAGGER_S)
            while time.perf_counter() < deadline and next(tickets, None) is not None:
                await one_stream(session, url, streams, headers)

        started = time.perf_counter()
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarize(streams, warmup, concurrency, elapsed)


def run(
    url: str, concurrency: int, total: int, duration_s: float, headers: dict[str, str] = HEADERS
) -> dict[str, Any]:
    """`run_streams` on uvloop (installed with uvicorn[standard]): half the client CPU of asyncio's loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_streams(url, concurrency, total, duration_s, headers))


def summarize(streams: Streams, warmup: Streams, concurrency: int, elapsed_s: float) -> dict[str, Any]:
    """The run as plain data: counts, failures and p50/p99 in milliseconds."""
    return {
        "concurrency": concurrency,
        "streams": len(streams.total) + sum(streams.failures.values()),
        "ok": len(streams.total),
        "failures": dict(streams.failures),
        "warmup_failures": dict(warmup.failures),
        "elapsed_s": round(elapsed_s, 3),
        "ttfb_ms": {"p50": _ms(streams.ttfb, 50), "p99": _ms(streams.ttfb, 99)},
        "total_ms": {"p50": _ms(streams.total, 50), "p99": _ms(streams.total, 99)},
    }


def _ms(seconds: list[float], pct: float) -> float | None:
    return round(percentile(seconds, pct) * 1e3, 3) if seconds else None


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the chat completions URL")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--total", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    summary = run(args.url, args.concurrency, args.total, args.duration)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
