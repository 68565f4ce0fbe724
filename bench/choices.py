"""What each library choice buys, measured: the event loop, the HTTP parser, the JSON library.

    bench/choices.sh [--duration 8] [--rounds 2] [--json bench/results/choices.json]

The gateway is served with each of `server.loop` (uvloop, asyncio) and `server.http` (httptools,
h11), one worker, every feature on, in front of nginx's instant location, and loaded with wrk at
32 connections (the throughput case of `run.py`); the variants take turns, `--rounds` times, so
that a drift of the machine hits them all alike. Each figure is requests per second and the CPU
time of the gateway's process per request. JSON: orjson against the standard library's `json`,
in this process, on what the gateway parses and writes per request (a chat request body, a vision
request with a 64 KiB image, a completion reply), in microseconds per call.
The upstream client is compared by `run.py` (the minimal proxy on aiohttp and on httpx).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

import fake_upstream
import orjson
import processes
import run

VARIANTS = (("uvloop", "httptools"), ("asyncio", "httptools"), ("uvloop", "h11"))


def main() -> int:
    parser = argparse.ArgumentParser(description="What the gateway's library choices buy.")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk case (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every variant (default 2)")
    parser.add_argument("--json", type=Path, default=run.BENCH_DIR / "results" / "choices.json")
    args = parser.parse_args()
    try:
        run.require_tools()
        servers = measure_servers(args.duration, args.rounds)
    except (run.BenchError, processes.StartFailed) as error:
        print(f"could not run: {error}", file=sys.stderr)
        return 2
    report = {"meta": run.run_meta(args.duration, quick=False), "servers": servers, "json": measure_json()}
    print("\n" + format_text(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    errors = sum(sum(case["errors"].values()) for cases in servers.values() for case in cases)
    return 1 if errors else 0


def measure_servers(duration: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {f"{loop}+{http}": [] for loop, http in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="gateway-choices-") as tmp:
        workdir = Path(tmp)
        with run.nginx(workdir) as nginx_url:
            for _ in range(rounds):
                for loop, http in VARIANTS:
                    results[f"{loop}+{http}"].append(one_case(loop, http, nginx_url, workdir, duration))
    return results


def one_case(loop: str, http: str, nginx_url: str, workdir: Path, duration: int) -> dict[str, Any]:
    server_settings = {"loop": loop, "http": http}
    with run.serve("gateway", "instant", nginx_url, workdir, server_settings) as server:
        run.probe(server.url)
        run.wrk(server.url, 32, run.WARMUP_S)
        cpu_before = server.cpu_seconds()
        result = run.wrk(server.url, 32, duration)
        cpu_after = server.cpu_seconds()
    assert cpu_before is not None and cpu_after is not None
    result["cpu_us_per_request"] = (cpu_after - cpu_before) * 1e6 / max(result["requests"], 1)
    print(
        f"{loop}+{http}: {result['rps']:,.0f} req/s, {result['cpu_us_per_request']:.0f} us CPU a request",
        flush=True,
    )
    return result


def measure_json() -> dict[str, dict[str, float]]:
    """Microseconds per call, best of 5 repeats, for orjson and the standard library."""
    request = {"model": fake_upstream.MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
    image = base64.b64encode(bytes(range(256)) * 256).decode()  # 64 KiB of image, base64
    vision = {
        "model": fake_upstream.MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                ],
            }
        ],
    }
    reply = fake_upstream.completion()
    cases = {
        "parse a chat request": (orjson.dumps(request), "loads"),
        "parse a 64 KiB vision request": (orjson.dumps(vision), "loads"),
        "write a completion reply": (reply, "dumps"),
    }
    figures = {}
    for name, (value, kind) in cases.items():
        fast = orjson.loads if kind == "loads" else orjson.dumps
        slow = json.loads if kind == "loads" else json.dumps
        figures[name] = {"orjson_us": _best_us(fast, value), "json_us": _best_us(slow, value)}
    return figures


def _best_us(function: Any, value: Any) -> float:
    timer = timeit.Timer(lambda: function(value))
    number, _ = timer.autorange()
    return min(timer.repeat(5, number)) / number * 1e6


def format_text(report: dict[str, Any]) -> str:
    lines = [f"{'server (loop+http)':<22}{'req/s@32':>12}{'CPU us/req':>12}   (median of rounds)"]
    base = None
    for name, cases in report["servers"].items():
        rps = statistics.median(case["rps"] for case in cases)
        cpu = statistics.median(case["cpu_us_per_request"] for case in cases)
        base = base or rps
        lines.append(f"{name:<22}{rps:>12,.0f}{cpu:>12,.0f}   {rps / base:.2f}x the default")
    lines.append("")
    lines.append(f"{'JSON, us a call':<32}{'orjson':>10}{'json':>10}")
    for name, figures in report["json"].items():
        ratio = figures["json_us"] / figures["orjson_us"]
        lines.append(
            f"{name:<32}{figures['orjson_us']:>10.2f}{figures['json_us']:>10.2f}   orjson {ratio:.1f}x faster"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
