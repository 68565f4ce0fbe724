"""Memory: resident memory per concurrent stream, and flat memory over a soak at steady load.

    bench/memory.sh [--streams 1000] [--soak-minutes 10] [--json bench/results/memory.json]

Part 1, streams (about a minute): the gateway, then the minimal proxy as a reference, each against
nginx's `/trickle` location (32 events 0.5 s apart, 16 s a stream). After a warm-up of 32 short
streams, its resident memory is read (RSS, every process of its group); then a bounded client opens
`--streams` streams and keeps exactly that many open; once every one has its first event, RSS is
read every 0.2 s for 2 s while they stay open (the highest reading counts). Per stream:
(RSS open - RSS before) / streams. Every stream must then end with `data: [DONE]`.

Part 2, soak (`--soak-minutes`, 0 skips it): the gateway alone under steady load for that long: wrk
with 32 connections on the 50 ms upstream (about 600 requests a second) and 16 concurrent streams
of the `/sse` location, back to back, every request booked in the ledger. RSS is read every 5 s.
Minute 1 is the warm-up (pools, caches and allocator arenas fill); the memory is flat when the
median of the last minute is within max(2 MiB, 2 %) of the median of minute 2.

Exit status: 0 if every target was met, 1 if one was missed or a request failed, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import processes
import run
import sse_client
import uvloop

from gateway.cli import raise_open_files_limit

KIB = 1024
MIB = 1024 * KIB
PER_STREAM_TARGET_KIB = 30
FLAT_TOLERANCE = (2 * MIB, 0.02)
SAMPLE_EVERY_S = 0.2
SAMPLES_WHILE_OPEN = 10
SOAK_SAMPLE_EVERY_S = 5.0
SOAK_STREAMS = 16
OPEN_TIMEOUT_S = 60.0
# The gateway passes the caller's X-Request-Id upstream; nginx's /mixed location answers these with a stream.
STREAM_HEADERS = {**sse_client.HEADERS, "X-Request-Id": "sse-soak"}


def main() -> int:
    parser = argparse.ArgumentParser(description="Memory per concurrent stream, and a soak.")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent slow streams (default 1000)")
    parser.add_argument("--soak-minutes", type=float, default=10, help="soak length; 0 skips it (default 10)")
    parser.add_argument("--json", type=Path, default=run.BENCH_DIR / "results" / "memory.json")
    args = parser.parse_args()
    raise_open_files_limit()  # 1,000 streams through a proxy take 2,000 sockets; children inherit it
    try:
        run.require_tools()
        report = measure_all(args.streams, args.soak_minutes)
    except (run.BenchError, processes.StartFailed) as error:
        print(f"memory benchmark could not run: {error}", file=sys.stderr)
        return 2
    print("\n" + format_text(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    return 0 if report["valid"] and all(t["verdict"] == "met" for t in report["targets"]) else 1


def measure_all(streams: int, soak_minutes: float) -> dict[str, Any]:
    meta = run.run_meta(0, quick=False)
    with tempfile.TemporaryDirectory(prefix="gateway-memory-") as tmp:
        workdir = Path(tmp)
        with run.nginx(workdir) as nginx_url:
            per_stream = {
                system: streams_case(system, nginx_url, workdir, streams) for system in ("gateway", "minimal")
            }
            soak = soak_case(nginx_url, workdir, soak_minutes) if soak_minutes > 0 else None
        logs = run.collect_logs(workdir)
    failures = [
        f"{system}: {reason} {count}"
        for system, case in per_stream.items()
        for reason, count in case["failures"].items()
    ]
    if soak is not None:
        failures += [f"soak: {reason} {count}" for reason, count in soak["failures"].items() if count]
    return {
        "meta": {**meta, "streams": streams, "soak_minutes": soak_minutes},
        "valid": not failures,
        "errors": failures,
        "streams": per_stream,
        "soak": soak,
        "targets": targets(per_stream, soak),
        "process_output": logs,
    }


def streams_case(system: str, nginx_url: str, workdir: Path, count: int) -> dict[str, Any]:
    """RSS before and while `count` slow streams are open through `system`."""
    with run.serve(system, "trickle", nginx_url, workdir) as server:
        assert server.process is not None
        pgid = server.process.pid
        warmup = sse_client.run(server.url, 32, 32, 30)  # fills pools and caches with short-lived streams
        if warmup["failures"] or warmup["warmup_failures"]:
            raise run.BenchError(f"{system}: warm-up streams failed: {warmup}")
        before = processes.rss_bytes(pgid)
        held = hold_streams(server.url, count, lambda: processes.rss_bytes(pgid))
    open_rss = max(held["rss_samples"])
    result = {
        "rss_before_bytes": before,
        "rss_open_bytes": open_rss,
        "per_stream_kib": (open_rss - before) / count / KIB,
        **held,
    }
    print(
        f"{system:<8} {count} streams open: RSS {before / MIB:.1f} -> {open_rss / MIB:.1f} MiB, "
        f"{result['per_stream_kib']:.1f} KiB a stream, failures {dict(held['failures'])}",
        flush=True,
    )
    return result


def hold_streams(url: str, count: int, read_rss: Any) -> dict[str, Any]:
    """Open `count` streams; once all have their first byte, sample RSS; then read them to the end."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_hold_streams(url, count, read_rss))


async def _hold_streams(url: str, count: int, read_rss: Any) -> dict[str, Any]:
    failures: Counter[str] = Counter()
    opened = 0
    all_open = asyncio.Event()

    def on_first_byte() -> None:
        nonlocal opened
        opened += 1
        if opened == count:
            all_open.set()

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        await asyncio.sleep(index * sse_client.STAGGER_S / 2)  # 1,000 streams begin over 1 s
        timings = await sse_client.read_stream(session, url, on_first_byte)
        if isinstance(timings, str):  # why it failed
            failures[timings] += 1
            on_first_byte()  # a failed stream will not open: do not wait for it

    connector = aiohttp.TCPConnector(limit=count)
    timeout = aiohttp.ClientTimeout(total=OPEN_TIMEOUT_S + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session, index)) for index in range(count)]
        await asyncio.wait_for(all_open.wait(), OPEN_TIMEOUT_S)
        samples = []
        for _ in range(SAMPLES_WHILE_OPEN):
            samples.append(read_rss())
            await asyncio.sleep(SAMPLE_EVERY_S)
        await asyncio.gather(*tasks)
    return {"rss_samples": samples, "failures": dict(failures)}


def soak_case(nginx_url: str, workdir: Path, minutes: float) -> dict[str, Any]:
    """The gateway under steady load for `minutes`, its RSS read every few seconds."""
    duration = int(minutes * 60)
    samples: list[tuple[float, int]] = []
    with run.serve("gateway", "mixed", nginx_url, workdir) as server:
        assert server.process is not None
        pgid = server.process.pid
        streams: dict[str, Any] = {}
        stream_thread = threading.Thread(
            target=lambda: streams.update(
                sse_client.run(server.url, SOAK_STREAMS, 10**9, duration, STREAM_HEADERS)
            )
        )
        argv = ["wrk", "-t1", "-c32", f"-d{duration}s", "--timeout", "10s"]
        argv += ["-s", str(run.BENCH_DIR / "post.lua"), server.url]
        started = time.monotonic()
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        stream_thread.start()
        while load.poll() is None:
            samples.append((time.monotonic() - started, processes.rss_bytes(pgid)))
            print(f"soak {samples[-1][0]:6.0f} s  RSS {samples[-1][1] / MIB:.1f} MiB", flush=True)
            time.sleep(SOAK_SAMPLE_EVERY_S)
        stream_thread.join()
        wrk_result = run.parse_wrk(load.communicate()[0], load.returncode)
    return summarize_soak(samples, wrk_result, streams)


def summarize_soak(
    samples: list[tuple[float, int]], wrk_result: dict[str, Any], streams: dict[str, Any]
) -> dict[str, Any]:
    second = [rss for at, rss in samples if 60 <= at < 120]
    last_start = samples[-1][0] - 60
    last = [rss for at, rss in samples if at >= last_start]
    baseline = statistics.median(second or [rss for _, rss in samples])
    final = statistics.median(last)
    allowed = max(FLAT_TOLERANCE[0], FLAT_TOLERANCE[1] * baseline)
    failures = {**wrk_result["errors"], **streams.get("failures", {})}
    return {
        "rss_minute_2_median_bytes": baseline,
        "rss_last_minute_median_bytes": final,
        "rss_max_bytes": max(rss for _, rss in samples),
        "growth_bytes": final - baseline,
        "allowed_growth_bytes": allowed,
        "requests": wrk_result["requests"],
        "streams": streams.get("ok", 0),
        "failures": failures,
        "samples": samples,
    }


def targets(per_stream: dict[str, Any], soak: dict[str, Any] | None) -> list[dict[str, Any]]:
    gateway = per_stream["gateway"]["per_stream_kib"]
    checks = [
        {
            "target": "gateway resident memory per concurrent stream (KiB)",
            "value": round(gateway, 1),
            "limit": f"<= {PER_STREAM_TARGET_KIB}",
            "verdict": "met" if gateway <= PER_STREAM_TARGET_KIB else "MISSED",
        }
    ]
    if soak is not None:
        checks.append(
            {
                "target": "soak: RSS growth, minute 2 to the last minute (MiB)",
                "value": round(soak["growth_bytes"] / MIB, 2),
                "limit": f"<= {soak['allowed_growth_bytes'] / MIB:.2f}",
                "verdict": "met" if soak["growth_bytes"] <= soak["allowed_growth_bytes"] else "MISSED",
            }
        )
    return checks


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"{'system':<9}{'RSS before':>12}{'RSS open':>12}{'per stream':>12}"
        f"   ({report['meta']['streams']} streams)"
    ]
    for system, case in report["streams"].items():
        lines.append(
            f"{system:<9}{case['rss_before_bytes'] / MIB:>9.1f} MiB{case['rss_open_bytes'] / MIB:>9.1f} MiB"
            f"{case['per_stream_kib']:>8.1f} KiB"
        )
    soak = report["soak"]
    if soak is not None:
        lines.append(
            f"soak {report['meta']['soak_minutes']:g} min: {soak['requests']:,} requests + "
            f"{soak['streams']:,} streams; RSS median minute 2 "
            f"{soak['rss_minute_2_median_bytes'] / MIB:.1f} MiB, last minute "
            f"{soak['rss_last_minute_median_bytes'] / MIB:.1f} MiB, max {soak['rss_max_bytes'] / MIB:.1f} MiB"
        )
    lines.append("targets:")
    for check in report["targets"]:
        lines.append(f"  {check['verdict']:<7} {check['target']:<55} {check['value']:>8}  ({check['limit']})")
    if report["valid"]:
        lines.append("VALID: every request answered 2xx and every stream ended with data: [DONE].")
    else:
        lines.append("NOT VALID: " + "; ".join(report["errors"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
