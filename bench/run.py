"""The benchmark in one command: nginx as a fake upstream; every system side by side in one run.

    bench/run.sh [--duration 8] [--quick] [--no-litellm] [--json bench/results/latest.json]

Starts nginx (see `fake_upstream.py`), then measures, one system at a time: nginx directly, the
gateway (one worker), the gateway with one worker per core (throughput only: the scaling case), the
minimal FastAPI + aiohttp proxy and the same on httpx (`minimal_proxy.py`), and LiteLLM's proxy
(`litellm.py`, its own virtualenv). A proxied system is started once per upstream behaviour
(instant, 50 ms, SSE), pointed at that nginx location, and stopped after its cases. Plain requests
are driven by wrk with `post.lua`; streams by `sse_client.py`. The CPU time a system's processes
use during the throughput case is read from /proc. Prints the tables and the derived figures (see
`report.py`) and writes everything to a JSON file.
Exit status: 0 for a valid run, 1 if any case had errors, 2 if the run could not be done at all.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import fake_upstream
import litellm_proxy as litellm
import processes
import report
import sse_client

from gateway.cli import raise_open_files_limit

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CHAT_PATH = "/v1/openai/chat/completions"
WARMUP_S = 1
SSE_CONCURRENCY = 32
SSE_TOTAL = 1000
PROBE_BODY = json.dumps(
    {"model": fake_upstream.MODEL, "messages": [{"role": "user", "content": "Hi"}]}
).encode()
PROBE_HEADERS = sse_client.HEADERS
PACKAGES = ("gateway", "aiohttp", "fastapi", "uvicorn", "uvloop", "httptools", "orjson", "httpx")
WORKERS = os.cpu_count() or 1  # the scaling case: one gateway worker per core
THROUGHPUT_ONLY = {"gateway_workers"}
PACED = {"direct", "gateway", "minimal"}  # the systems also measured on the paced upstream


class BenchError(RuntimeError):
    """A case could not be measured (a process did not start, wrk printed no result, a bad answer)."""


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the finally blocks run and clean up
    duration = 2 if args.quick else args.duration
    raise_open_files_limit()  # 1,000 streams through a proxy take 2,000 sockets; children inherit it
    systems = [system for system in report.SYSTEMS if system != "litellm" or not args.no_litellm]
    try:
        require_tools()
        meta = run_meta(duration, args.quick)
        results, logs = run_all(systems, duration)
    except (BenchError, processes.StartFailed) as error:
        print(f"benchmark could not run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    meta["load_average_after"] = os.getloadavg()
    if args.no_litellm:
        results["litellm"] = {"skipped": "not run (--no-litellm)"}
    full = report.build(results, meta, logs)
    print("\n" + report.format_text(full))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(full, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    return 0 if full["valid"] else 1


def run_all(systems: list[str], duration: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every case of every system, against one nginx that lives for the whole run; and the logs."""
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        try:
            with nginx(workdir) as nginx_url, paced_upstream(workdir) as paced_url:
                results = {
                    system: measure(system, nginx_url, paced_url, workdir, duration) for system in systems
                }
        finally:
            logs = collect_logs(workdir)
            for name, text in logs.items():
                print(f"--- output of {name} ---\n{text}", file=sys.stderr)
    return results, logs


def collect_logs(workdir: Path, lines: int = 40) -> dict[str, str]:
    """The last lines of every process log that is not empty (the servers run at log level warning)."""
    logs = {}
    for path in sorted(workdir.glob("*.log")):
        text = path.read_text(errors="replace").strip()
        if text:
            logs[path.stem] = "\n".join(text.splitlines()[-lines:])
    return logs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark: nginx directly, the gateway, the minimal proxy.")
    parser.add_argument("--duration", type=int, default=8, help="seconds per case (default 8)")
    parser.add_argument("--quick", action="store_true", help="2 s per case: a smoke check")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument(
        "--json", type=Path, default=BENCH_DIR / "results" / "latest.json", help="result file"
    )
    return parser.parse_args()


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


@contextmanager
def nginx(workdir: Path) -> Iterator[str]:
    """Run the fake upstream; yield its base URL (`http://127.0.0.1:PORT`)."""
    port = processes.free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(fake_upstream.nginx_conf(port, workdir))
    argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    base = f"http://127.0.0.1:{port}"
    with processes.running(argv, f"{base}/healthz", workdir / "nginx.log"):
        yield base


@contextmanager
def paced_upstream(workdir: Path) -> Iterator[str]:
    """Run `paced_upstream.py` (the SSE stream on an absolute schedule); yield its base URL."""
    port = processes.free_port()
    argv = [sys.executable, str(BENCH_DIR / "paced_upstream.py"), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with processes.running(argv, f"{base}/healthz", workdir / "paced-upstream.log"):
        yield base


def measure(system: str, nginx_url: str, paced_url: str, workdir: Path, duration: int) -> dict[str, Any]:
    """All cases of one system; a system that fails is recorded as failed and the run goes on."""
    cases: dict[str, Any] = {}
    try:
        if system == "litellm" and (missing := litellm.missing()):
            return {"skipped": missing}
        with serve(system, "instant", nginx_url, workdir) as server:
            probe(server.url)
            cases["warmup_instant"] = wrk(server.url, 32, WARMUP_S)
            cpu_before = server.cpu_seconds()
            cases["instant_c32"] = wrk(server.url, 32, duration)
            cpu_after = server.cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                cases["instant_c32"]["cpu_s"] = cpu_after - cpu_before
            show(system, "instant_c32", cases["instant_c32"])
        if system in THROUGHPUT_ONLY:
            return cases
        with serve(system, "slow", nginx_url, workdir) as server:
            probe(server.url)
            cases["warmup_slow"] = wrk(server.url, 32, WARMUP_S)
            cases["slow_c1"] = show(system, "slow_c1", wrk(server.url, 1, duration))
            cases["slow_c32"] = show(system, "slow_c32", wrk(server.url, 32, duration))
        with serve(system, "sse", nginx_url, workdir) as server:
            cases["sse_c1"] = show(system, "sse_c1", sse_client.run(server.url, 1, SSE_TOTAL, duration))
            streams = sse_client.run(server.url, SSE_CONCURRENCY, SSE_TOTAL, duration)
            cases["sse_c32"] = show(system, "sse_c32", streams)
        if system in PACED:
            with serve(system, "paced", paced_url, workdir) as server:
                streams = sse_client.run(server.url, 1, SSE_TOTAL, duration)
                cases["sse_paced_c1"] = show(system, "sse_paced_c1", streams)
    except (BenchError, processes.StartFailed) as error:
        print(f"{system}: FAILED: {error}", file=sys.stderr)
        return {**cases, "failed": str(error)}
    return cases


@dataclass(frozen=True)
class Server:
    """A system being measured: its chat completions URL, and its process (None for nginx directly)."""

    url: str
    process: subprocess.Popen[bytes] | None

    def cpu_seconds(self) -> float | None:
        """CPU time its processes have used so far (None for nginx directly: not measured)."""
        return None if self.process is None else processes.cpu_seconds(self.process.pid)


@contextmanager
def serve(
    system: str, kind: str, nginx_url: str, workdir: Path, server_settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run `system` in front of nginx's `kind` location (instant, slow, sse, ...) until the block ends;
    `server_settings` go into the gateway's `server` section (choices.py: loop, http)."""
    upstream_base = f"{nginx_url}/{kind}/v1/openai"
    if system == "direct":
        yield Server(upstream_base + "/chat/completions", None)
        return
    port = processes.free_port()
    log = workdir / f"{system}-{kind}.log"
    path, ready_path, env = CHAT_PATH, "/healthz", None
    if system in ("gateway", "gateway_workers"):
        workers = WORKERS if system == "gateway_workers" else 1
        config_path = workdir / f"{system}-{kind}.yaml"
        argv = gateway_argv(upstream_base, port, config_path, workdir, workers, server_settings)
        env = {**os.environ, "DEEPINFRA_TOKEN": "bench-upstream-token"}
    elif system == "litellm":
        argv = litellm.argv(upstream_base, port, workdir / f"litellm-{kind}.yaml")
        path, ready_path, env = litellm.CHAT_PATH, litellm.READY_PATH, litellm.environment()
    else:
        argv = [sys.executable, str(BENCH_DIR / "minimal_proxy.py"), "--port", str(port)]
        argv += ["--upstream", upstream_base + "/chat/completions"]
        argv += ["--client", "httpx" if system == "minimal_httpx" else "aiohttp"]
    base = f"http://127.0.0.1:{port}"
    with processes.running(argv, base + ready_path, log, env=env, cwd=workdir) as process:
        yield Server(base + path, process)


def gateway_argv(
    upstream_base: str,
    port: int,
    config_path: Path,
    workdir: Path,
    workers: int = 1,
    server_settings: dict[str, str] | None = None,
) -> list[str]:
    """Write the gateway's config (JSON is YAML) and return the command that serves it."""
    server = {"log_level": "warning", "access_log": False, "shutdown_grace_s": 2, **(server_settings or {})}
    config = {
        "upstream": {"base_url": upstream_base},
        "server": server,
        "ledger": {"url": f"sqlite:///{workdir}/{config_path.stem}.db"},
        "auth": {"keys": [{"name": "bench", "key": "sk-bench"}]},
    }
    config_path.write_text(json.dumps(config, indent=2))
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port)]
    return [*argv, "--workers", str(workers)] if workers > 1 else argv


def probe(url: str) -> None:
    """One request before the load: it must be a 200 carrying the fake upstream's reply."""
    request = urllib.request.Request(url, data=PROBE_BODY, headers=PROBE_HEADERS, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except OSError as error:  # urllib's HTTPError (non-2xx) is an OSError too
        raise BenchError(f"probe POST {url} failed: {error}") from None
    reply = json.loads(body) if body.startswith(b"{") else {}
    choices = reply.get("choices") or [{}]
    content = choices[0].get("message", {}).get("content")
    if status != 200 or content != fake_upstream.REPLY_CONTENT:
        raise BenchError(f"probe POST {url}: HTTP {status}, unexpected body {body[:300]!r}")


def wrk(url: str, connections: int, duration: int) -> dict[str, Any]:
    """Run wrk with post.lua and return the numbers from its `BENCH {...}` line, plus req/s."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    argv += ["-s", str(BENCH_DIR / "post.lua"), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    result = parse_wrk(done.stdout + done.stderr, done.returncode)
    result["connections"] = connections
    return result


def parse_wrk(output: str, returncode: int) -> dict[str, Any]:
    """The numbers of wrk's `BENCH {...}` line (see post.lua), plus req/s."""
    lines = [line for line in output.splitlines() if line.startswith("BENCH ")]
    if returncode != 0 or not lines:
        raise BenchError(f"wrk exited {returncode} without a result:\n{output}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("BENCH "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def show(system: str, case: str, result: dict[str, Any]) -> dict[str, Any]:
    """Print one progress line for a finished case; return the result unchanged."""
    if "latency_us" in result:
        p50, p99 = result["latency_us"]["p50"] / 1000, result["latency_us"]["p99"] / 1000
        errors = sum(result["errors"].values())
        figures = f"{result['rps']:,.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
    else:
        ttfb, total = result["ttfb_ms"]["p50"], result["total_ms"]["p50"]
        errors = sum(result["failures"].values()) + sum(result["warmup_failures"].values())
        figures = f"{result['ok']} streams  TTFB p50 {ttfb} ms  total p50 {total} ms"
    print(f"{system:<15} {case:<12} {figures}  errors {errors}", flush=True)
    return result


def require_tools() -> None:
    """nginx, its echo module and wrk must be installed (Debian: nginx libnginx-mod-http-echo wrk)."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not Path(fake_upstream.ECHO_MODULE).exists():
        missing.append(fake_upstream.ECHO_MODULE)
    if missing:
        raise BenchError(f"not installed: {', '.join(missing)}")


def run_meta(duration: int, quick: bool) -> dict[str, Any]:
    """When, where and with what this run was made."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s_per_case": duration,
        "quick": quick,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "nginx": _output(["nginx", "-v"]),
        "wrk": _output(["wrk", "-v"]).split("\n")[0],
        "git_commit": _output(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]),
        "gateway_uncommitted_changes": bool(
            _output(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "gateway"])
        ),
        "packages": {name: importlib.metadata.version(name) for name in PACKAGES},
        "sse": {"concurrency": SSE_CONCURRENCY, "max_streams": SSE_TOTAL},
        "gateway_workers": WORKERS,
        "litellm": litellm.version(),
    }


def _output(argv: list[str]) -> str:
    """What a command prints (stdout and stderr), or "" if it is not there."""
    if shutil.which(argv[0]) is None:
        return ""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


if __name__ == "__main__":
    sys.exit(main())
