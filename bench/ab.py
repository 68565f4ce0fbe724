"""A/B of two versions of the gateway, alternating, against one nginx: what a change costs.

    .venv/bin/python bench/ab.py --base 568f579 [--rounds 4] [--duration 8]

The machine's speed drifts by tens of percent between runs (see docs/performance.md, runs N-P), far more
than most changes cost. So both versions, and the minimal proxy as a yardstick of the machine, run
in turns in one session against one nginx: base, head, minimal, then head, base, minimal, ... Each
turn measures the throughput case (32 connections, instant upstream: req/s and CPU per request) and
the latency case (one connection, 50 ms upstream: p50 and p99), nginx directly beside them. The base
is the gateway package of a commit (`git archive`), run from a temporary folder ahead of the
installed one on PYTHONPATH; head is the working tree. Medians of the turns are printed and written
to bench/results/ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import processes
import run

from gateway.cli import raise_open_files_limit


def main() -> int:
    parser = argparse.ArgumentParser(description="A/B of two gateway versions, alternating turns.")
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8, help="seconds per case")
    parser.add_argument("--json", type=Path, default=run.BENCH_DIR / "results" / "ab.json")
    args = parser.parse_args()
    raise_open_files_limit()
    run.require_tools()
    results: dict[str, list[dict[str, float]]] = {"base": [], "head": [], "minimal": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp:
        workdir = Path(tmp)
        base_src = export(args.base, workdir / "base-src")
        with run.nginx(workdir) as nginx_url:
            for turn in range(args.rounds):
                order = ["base", "head"] if turn % 2 == 0 else ["head", "base"]
                for variant in [*order, "minimal"]:
                    source = base_src if variant == "base" else None
                    figures = measure(variant, source, nginx_url, workdir, args.duration)
                    results[variant].append(figures)
                    print(f"turn {turn + 1} {variant:<8} {format_figures(figures)}", flush=True)
                direct = run.wrk(f"{nginx_url}/slow/v1/openai/chat/completions", 1, args.duration)
                results["direct"].append(latency(direct))
    summary = {name: medians(turns) for name, turns in results.items()}
    print("\nmedians of the turns:")
    for name, figures in summary.items():
        print(f"  {name:<8} {format_figures(figures)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"base": args.base, "turns": results, "medians": summary}, indent=2))
    return 0


def export(commit: str, folder: Path) -> Path:
    """The gateway package of `commit`, unpacked into `folder` (which then goes on PYTHONPATH)."""
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(run.REPO_DIR), "archive", commit, "gateway"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def measure(
    variant: str, source: Path | None, nginx_url: str, workdir: Path, duration: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    with server(variant, source, "instant", nginx_url, workdir) as (url, process):
        run.probe(url)
        run.wrk(url, 32, run.WARMUP_S)
        cpu_before = processes.cpu_seconds(process.pid)
        result = run.wrk(url, 32, duration)
        cpu_after = processes.cpu_seconds(process.pid)
        figures["rps"] = result["rps"]
        if cpu_before is not None and cpu_after is not None:
            figures["cpu_us_per_request"] = (cpu_after - cpu_before) * 1e6 / result["requests"]
    with server(variant, source, "slow", nginx_url, workdir) as (url, _):
        run.wrk(url, 1, run.WARMUP_S)
        figures.update(latency(run.wrk(url, 1, duration)))
    return figures


@contextmanager
def server(
    variant: str, source: Path | None, kind: str, nginx_url: str, workdir: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    upstream_base = f"{nginx_url}/{kind}/v1/openai"
    port = processes.free_port()
    env = dict(os.environ)
    if variant == "minimal":
        argv = [sys.executable, str(run.BENCH_DIR / "minimal_proxy.py"), "--port", str(port)]
        argv += ["--upstream", upstream_base + "/chat/completions", "--client", "aiohttp"]
    else:
        config_path = workdir / f"{variant}-{kind}.yaml"
        argv = run.gateway_argv(upstream_base, port, config_path, workdir)
        env["DEEPINFRA_TOKEN"] = "bench-upstream-token"
        if source is not None:  # ahead of the installed (editable) package
            env["PYTHONPATH"] = f"{source}{os.pathsep}{env.get('PYTHONPATH', '')}"
    base = f"http://127.0.0.1:{port}"
    log = workdir / f"{variant}-{kind}.log"
    with processes.running(argv, base + "/healthz", log, env=env, cwd=workdir) as process:
        yield base + run.CHAT_PATH, process


def latency(result: dict[str, Any]) -> dict[str, float]:
    return {"p50_ms": result["latency_us"]["p50"] / 1000, "p99_ms": result["latency_us"]["p99"] / 1000}


def medians(turns: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for turn in turns for key in turn})
    return {key: statistics.median(turn[key] for turn in turns if key in turn) for key in keys}


def format_figures(figures: dict[str, float]) -> str:
    parts = []
    if "rps" in figures:
        parts.append(f"{figures['rps']:>8,.0f} req/s")
    if "cpu_us_per_request" in figures:
        parts.append(f"{figures['cpu_us_per_request']:>6.0f} us CPU/req")
    parts.append(f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms (1 conn, 50 ms upstream)")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
