"""Real servers for the tests: the gateway as a subprocess, and a scripted upstream on a raw socket.

The scripted upstream speaks HTTP/1.1 by hand so that a test controls every byte and every write:
events split across writes, a UTF-8 character split in two, comments, a connection dropped
mid-stream. It records what the gateway sent, and notices when the gateway closes a connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.eventually import eventually

MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"
CALLER_KEY = "sk-gw-test-caller-7f3a9c"
UPSTREAM_TOKEN = "sk-upstream-secret-4e1d8b"


# --- the gateway as a real process -----------------------------------------------------------------


class GatewayProcess:
    """`gateway serve` in a subprocess on a free port; its output is kept for inspection."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = tmp / f"gateway-{id(self)}.yaml"
        config.setdefault("ledger", {}).setdefault("url", f"sqlite:///{tmp}/ledger-{id(self)}.db")
        self.ledger_url: str = config["ledger"]["url"]
        self._workers = int(config.get("server", {}).get("workers", 1))
        self.config_path.write_text(yaml.safe_dump(config))
        self._cwd = tmp
        self.log_path = tmp / f"gateway-{id(self)}.log"
        self._env = {k: v for k, v in os.environ.items() if k not in ("DEEPINFRA_TOKEN", "GATEWAY_CONFIG")}
        self._env.update(env or {})
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(
        self,
        timeout: float = 20,
        open_files_soft_limit: int | None = None,
        open_files_hard_limit: int | None = None,
        port: int = 0,
    ) -> GatewayProcess:
        """Start and wait until every worker serves; optionally with lower limits on open files (a
        lower hard limit is one the gateway cannot lift), or on a given port."""
        self._log = log = self.log_path.open("wb")
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)]
        command += ["--port", str(port)]

        def lower_open_files_limit() -> None:  # runs in the child, before the gateway starts
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            hard = hard if open_files_hard_limit is None else open_files_hard_limit
            soft = min(soft if open_files_soft_limit is None else open_files_soft_limit, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env,
            cwd=self._cwd,
            preexec_fn=lower_open_files_limit,
        )
        announced = self._wait_for(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout)
        # With several workers the parent announces the port before the workers listen: wait for each.
        self._wait_for(rb"(?:Application startup complete[^\n]*\n[\s\S]*){%d}" % self._workers, timeout)
        self.url = f"http://127.0.0.1:{int(announced)}"
        return self

    def _wait_for(self, pattern: bytes, timeout: float) -> bytes:
        """Follow the log until `pattern` appears (the server announces its port once it listens)."""
        process = self.process
        assert process is not None
        with self.log_path.open("rb") as log:
            seen = b""

            def log_so_far() -> bytes:  # a file: there is no event to await
                nonlocal seen
                seen += log.read()
                if process.poll() is not None and not re.search(pattern, seen):
                    raise RuntimeError(f"gateway exited with {process.returncode}:\n{seen.decode()}")
                return seen

            eventually(
                log_so_far,
                until=lambda text: re.search(pattern, text),
                within_s=timeout,
                waiting_for=f"{pattern!r} in the gateway's log",
            )
        match = re.search(pattern, seen)
        assert match is not None
        return match.group(match.lastindex or 0)

    def worker_pids(self) -> list[int]:
        """With --workers: the supervisor's worker processes (not multiprocessing's resource tracker)."""
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [
            int(child)
            for child in children
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
        ]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()


def gateway_config(base_url: str | None = None, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"log_level": "info"},
        "auth": {"keys": [{"name": "alice", "key": CALLER_KEY}]},
        "simulator": {"latency_ms": 0, "tokens_per_s": 0, "reply_tokens": 12},
    }
    if base_url is not None:
        config["upstream"] = {"base_url": base_url}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


# --- the scripted upstream --------------------------------------------------------------------------


@dataclass
class UpstreamRequest:
    """A request as an upstream of the tests received it (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        # The standard parser: it takes what the gateway may forward and orjson refuses (an escaped
        # lone surrogate in a key, say).
        return json.loads(self.body)


class Connection:
    """One accepted connection: helpers to answer in plain, chunked or close-delimited HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.keep_alive = True

    async def json(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        await self.plain(status, body, "application/json", headers)

    async def plain(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        head = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        await self.raw(_head(status, head) + body)

    async def start_chunked(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        await self.raw(_head(status, {"Content-Type": content_type, "Transfer-Encoding": "chunked"}))

    async def chunk(self, data: bytes) -> None:
        await self.raw(b"%x\r\n%s\r\n" % (len(data), data))

    async def end_chunked(self) -> None:
        await self.raw(b"0\r\n\r\n")

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def drop(self) -> None:
        """Cut the connection without finishing the response."""
        self.keep_alive = False
        self.writer.transport.abort()

    async def wait_closed_by_peer(self) -> None:
        """Return when the gateway closes this connection."""
        while await self.reader.read(65536):
            pass
        self.keep_alive = False


Handler = Callable[["ScriptedUpstream", UpstreamRequest, Connection], Awaitable[None]]


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class ScriptedUpstream:
    """An upstream on its own thread and event loop; `handler` decides each answer."""

    handler: Handler
    requests: list[UpstreamRequest] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _gates: dict[str, threading.Event] = field(default_factory=dict)
    _closed: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/openai"

    def start(self) -> ScriptedUpstream:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10), "scripted upstream did not start"
        return self

    def _run(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))  # asyncio.run cancels what is left and closes the loop

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            assert self._thread is not None
            self._thread.join(10)

    def find(self, request_id: str) -> list[UpstreamRequest]:
        return [r for r in self.requests if r.headers.get("x-request-id") == request_id]

    # Cross-thread signals: tests open gates the handler waits on, and wait for closes it saw.
    def gate(self, name: str) -> threading.Event:
        return self._gates.setdefault(name, threading.Event())

    def closed(self, name: str) -> threading.Event:
        return self._closed.setdefault(name, threading.Event())

    async def wait_gate(self, name: str, timeout: float = 10) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self.gate(name).wait, timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer)
        try:
            while connection.keep_alive:
                request = await _read_request(reader)
                if request is None:
                    break
                self.requests.append(request)
                await self.handler(self, request, connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> UpstreamRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return UpstreamRequest(method, path, headers, body)
