"""What gateway/http_guard.py and gateway/workers.py take from uvicorn's internals, checked one by one.

Both extend private parts of uvicorn: http_guard subclasses the httptools protocol (its parser hooks,
its per-request state), workers subclasses the multiprocess supervisor (how it reads its sockets and
replaces its workers). None of it is a public API, and a minor release may change any of it. The
end-to-end tests would then fail in ways that say little, or a limit would quietly stop holding: here
each assertion names one thing the gateway relies on, so an upgrade that changes it fails loudly.
pyproject.toml pins uvicorn to the series these pass on.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import signal
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess

import gateway.workers
from gateway.http_guard import GuardedHttpToolsProtocol, guarded_protocol
from gateway.workers import OneSocketPerWorker

# --- the httptools protocol (http_guard.py) ---------------------------------------------------------

# The hooks GuardedHttpToolsProtocol overrides, each calling uvicorn's own: name -> parameters.
OVERRIDDEN_HOOKS = {
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "on_headers_complete": ["self"],
    "on_body": ["self", "body"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
    "send_400_response": ["self", "msg"],
}


@pytest.mark.parametrize("hook", sorted(OVERRIDDEN_HOOKS))
def test_each_hook_the_guard_overrides_is_uvicorns_with_the_same_parameters(hook: str) -> None:
    assert hook in vars(HttpToolsProtocol), f"uvicorn's HttpToolsProtocol no longer defines {hook}"
    assert list(inspect.signature(getattr(HttpToolsProtocol, hook)).parameters) == OVERRIDDEN_HOOKS[hook]


def test_uvicorn_builds_each_connection_with_the_keywords_guarded_protocol_passes_on() -> None:
    # Server.startup calls `config.http_protocol_class(config=, server_state=, app_state=, _loop=)`.
    parameters = list(inspect.signature(HttpToolsProtocol.__init__).parameters)
    assert parameters == ["self", "config", "server_state", "app_state", "_loop"]
    factory = guarded_protocol(client_timeout_s=60, max_connections=10)
    config = _config(http=factory)
    config.load()
    assert config.http_protocol_class is factory  # a factory, not a name, is used as it is


class RecordingTransport(asyncio.Transport):
    """A connection's transport that keeps what is written and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


received: list[dict[str, Any]] = []  # what echo was told when the caller left


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body and answers it back; stops at once if the caller left."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            received.append(message)
            break
        body += message["body"]
        if not message["more_body"]:
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


def _config(**settings: Any) -> uvicorn.Config:
    return uvicorn.Config(echo, lifespan="off", ws="none", proxy_headers=False, log_config=None, **settings)


class Connection:
    """One guarded connection as uvicorn's server makes it, on a transport that records."""

    def __init__(self) -> None:
        factory = guarded_protocol(client_timeout_s=60, max_connections=10)
        config = _config(http=factory)
        config.load()
        self.server_state = ServerState()
        self.app_state: dict[str, Any] = {}
        self.transport = RecordingTransport()
        # As uvicorn's Server.startup makes the protocol of each connection:
        self.protocol: GuardedHttpToolsProtocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=asyncio.get_running_loop(),
        )
        self.protocol.connection_made(self.transport)

    async def answered(self) -> None:
        """Wait until the app has answered every request (pipelined ones start as the one before ends)."""
        while self.server_state.tasks:
            await asyncio.gather(*self.server_state.tasks)

    async def close(self) -> None:
        self.protocol.connection_lost(None)
        await self.answered()


@pytest.fixture
async def connection() -> AsyncIterator[Connection]:
    received.clear()
    made = Connection()
    yield made
    await made.close()


async def test_a_request_sets_the_state_the_guard_reads(connection: Connection) -> None:
    protocol = connection.protocol
    assert protocol.loop is asyncio.get_running_loop() and protocol.transport is connection.transport
    assert protocol.app_state is connection.app_state  # where the lifespan's metrics counter is found
    protocol.data_received(b"POST /v1/x?y=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nab")
    # The head as the parser reported it (http_guard's _head_size measures these).
    assert protocol.url == b"/v1/x?y=1"
    assert protocol.headers == [(b"host", b"a"), (b"content-length", b"4")]
    cycle = protocol.cycle
    assert isinstance(cycle, RequestResponseCycle) and cycle.scope is protocol.scope
    assert cycle.more_body and not cycle.response_started and not cycle.response_complete
    assert cycle.keep_alive and not cycle.disconnected and not cycle.waiting_for_100_continue
    assert isinstance(cycle.message_event, asyncio.Event)
    assert protocol.flow.read_paused is False and protocol.pipeline == deque()
    assert protocol not in protocol._limit.idle  # the app has a request of this connection
    protocol.data_received(b"cd")  # on_body, then on_message_complete
    await connection.answered()
    assert cycle.response_complete and connection.transport.written.endswith(b"\r\n\r\nabcd")
    assert protocol in protocol._limit.idle  # uvicorn called on_response_complete: idle again


async def test_a_request_that_expects_100_continue_is_marked_so(connection: Connection) -> None:
    connection.protocol.data_received(
        b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
    )
    assert connection.protocol.cycle.waiting_for_100_continue  # http_guard: not the caller's delay


async def test_each_message_gets_a_new_scope_at_its_first_byte(connection: Connection) -> None:
    # http_guard tells a head that began after a request ended in the same read by this.
    protocol = connection.protocol
    protocol.data_received(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\nho")
    assert protocol.cycle.scope["path"] == "/a" and protocol.scope is not protocol.cycle.scope


async def test_a_pipelined_request_waits_in_the_pipeline_with_reading_paused(connection: Connection) -> None:
    protocol = connection.protocol
    protocol.data_received(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\n\r\n")
    assert len(protocol.pipeline) == 1 and protocol.flow.read_paused
    await connection.answered()
    assert connection.transport.written.count(b"HTTP/1.1 200 OK\r\n") == 2


async def test_bytes_the_parser_refuses_go_to_send_400_response(connection: Connection) -> None:
    connection.protocol.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = bytes(connection.transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")  # the guard's answer, not uvicorn's text
    assert orjson.loads(body)["error"]["code"] == "invalid_http"


async def test_a_cycle_marked_disconnected_tells_the_app_the_caller_left(connection: Connection) -> None:
    protocol = connection.protocol
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(0)  # the app reads "ab" and waits for more
    written = len(connection.transport.written)
    protocol.cycle.disconnected = True  # as http_guard's _refuse does for a body's broken framing
    protocol.cycle.message_event.set()
    await connection.answered()
    assert received == [{"type": "http.disconnect"}]
    assert len(connection.transport.written) == written  # what the app sent afterwards was dropped


async def test_a_cycle_without_keep_alive_closes_its_connection_once_answered(
    connection: Connection,
) -> None:
    connection.protocol.data_received(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    connection.protocol.cycle.keep_alive = False  # as http_guard's _refuse does once an answer began
    await connection.answered()
    assert connection.transport.written.startswith(b"HTTP/1.1 200 OK") and connection.transport.closed


# --- the multiprocess supervisor (workers.py) -------------------------------------------------------


def test_the_supervisor_takes_a_config_and_the_sockets_to_share() -> None:
    assert list(inspect.signature(Multiprocess.__init__).parameters) == ["self", "config", "sockets"]
    assert isinstance(inspect.getattr_static(uvicorn_multiprocess.Process, "pid"), property)
    for hook in ("run", "keep_subprocess_alive", "handle_signals"):  # OneSocketPerWorker extends these
        assert hook in vars(Multiprocess), f"uvicorn's Multiprocess no longer defines {hook}"


class FakeWorker:
    """Stands in for uvicorn's worker `Process` (no process is started): keeps the sockets it got."""

    _pids = itertools.count(10_000)

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.pid = next(self._pids)
        self.exitcode: int | None = None
        self.alive = True
        made.append(self)

    def start(self) -> None:
        pass

    def is_alive(self, timeout: float = 5) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False

    def terminate(self) -> None:
        self.alive = False

    def join(self) -> None:
        pass


made: list[FakeWorker] = []


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Iterator[OneSocketPerWorker]:
    """A two-worker supervisor whose workers are FakeWorkers; the signal handlers it installs are put
    back afterwards, and every socket it made is closed."""
    catchable = [sig for sig in signal.Signals if sig not in (signal.SIGKILL, signal.SIGSTOP)]
    handlers = {sig: signal.getsignal(sig) for sig in catchable}
    monkeypatch.setattr(uvicorn_multiprocess, "Process", FakeWorker)
    made.clear()
    supervisor = OneSocketPerWorker(_config(host="127.0.0.1", port=0, workers=2))
    try:
        yield supervisor
    finally:
        supervisor._port_holder.close()
        for worker in made:
            for sock in worker.sockets:
                sock.close()
        for sig, handler in handlers.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def test_each_worker_started_gets_a_socket_of_its_own(
    supervisor: OneSocketPerWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone: list[int] = []
    monkeypatch.setattr(gateway.workers.multiprocess, "mark_process_dead", gone.append)
    supervisor.init_processes()
    assert supervisor.processes == made and len(made) == 2
    first, second = made
    assert first.sockets[0] is not second.sockets[0]
    port = supervisor._port_holder.getsockname()[1]
    assert {sock.getsockname()[1] for worker in made for sock in worker.sockets} == {port}
    supervisor.keep_subprocess_alive()  # marks the workers it has seen
    second.alive = False
    supervisor.keep_subprocess_alive()  # replaces the dead worker, with a socket of its own
    assert len(made) == 3 and supervisor.processes == [first, made[2]]
    assert made[2].sockets[0] not in (first.sockets[0], second.sockets[0])
    assert gone == [second.pid]  # prometheus_client told that the dead worker's values are gone


def test_the_supervisor_loop_runs_the_hooks_the_workers_module_extends(
    supervisor: OneSocketPerWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone: list[int] = []
    monkeypatch.setattr(gateway.workers.multiprocess, "mark_process_dead", gone.append)
    turns = 0
    keep_subprocess_alive = supervisor.keep_subprocess_alive

    def one_turn() -> None:
        """After the loop's first turn: as if SIGTTOU (retire a worker), then SIGTERM (stop) came."""
        nonlocal turns
        keep_subprocess_alive()
        turns += 1
        if turns == 1:
            supervisor.signal_queue.extend([signal.SIGTTOU, signal.SIGTERM])

    monkeypatch.setattr(supervisor, "keep_subprocess_alive", one_turn)
    supervisor.run()
    assert turns == 2 and len(made) == 2
    assert gone == [made[1].pid]  # the worker SIGTTOU retired, seen after handle_signals
    assert supervisor._port_holder.fileno() == -1  # run() let go of the port
