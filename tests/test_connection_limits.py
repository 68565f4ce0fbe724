"""Connections cannot take every file descriptor: past `server.max_connections` (by default half of
the open-files limit left after a reserve) the oldest idle connection is closed for a new one, a
connection whose request is being answered never is, and with none idle a new one gets 503.

Each gateway here runs under a hard open-files limit it cannot lift, and is flooded with raw sockets
that never send a byte, as a client exhausting descriptors would.
"""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.cli import RESERVED_FILES
from tests.conftest import auth_headers, chat
from tests.eventually import eventually
from tests.servers import GatewayProcess, gateway_config

OPEN_FILES = 160
CAP = (OPEN_FILES - RESERVED_FILES) // 2  # the default for this limit: 48
FLOOD = OPEN_FILES  # as many sockets as the gateway may open files: without the cap, none is left
STREAM = {"latency_ms": 0, "tokens_per_s": 10, "reply_tokens": 20}  # a stream of 2 s


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = gateway_config(simulator=STREAM)
    process = GatewayProcess(config, tmp_path_factory.mktemp("limited"))
    process.start(open_files_hard_limit=OPEN_FILES)
    yield process
    process.stop()


def address(gateway: GatewayProcess) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


def flood(stack: ExitStack, gateway: GatewayProcess, count: int) -> list[socket.socket]:
    """`count` connections that send nothing (each closed when `stack` ends)."""
    return [stack.enter_context(socket.create_connection(address(gateway), timeout=10)) for _ in range(count)]


def wait_closed_by_gateway(sockets: list[socket.socket], at_least: int) -> int:
    """Poll until at least `at_least` of `sockets` were closed by the gateway; return how many were."""
    closed: set[socket.socket] = set()

    def count_closed() -> int:  # select waits up to 0.1 s: the poll's own pause
        readable, _, _ = select.select([s for s in sockets if s not in closed], [], [], 0.1)
        closed.update(s for s in readable if s.recv(1) == b"")
        return len(closed)

    return eventually(
        count_closed,
        until=lambda count: count >= at_least,
        within_s=10,
        every_s=0,
        waiting_for=f"the gateway to close {at_least} of {len(sockets)} connections",
    )


def test_the_default_cap_is_half_the_open_files_left_after_a_reserve(limited: GatewayProcess) -> None:
    assert re.search(rf"at most {CAP} caller connections open at once per worker", limited.logs())


def test_an_idle_connection_flood_cannot_take_every_descriptor(limited: GatewayProcess) -> None:
    with ExitStack() as stack:
        idle = flood(stack, limited, FLOOD)
        for _ in range(5):  # a fresh connection each time, while the flood holds its sockets
            response = httpx.post(
                limited.url + "/v1/openai/chat/completions", json=chat(), headers=auth_headers()
            )
            assert response.status_code == 200
        assert wait_closed_by_gateway(idle, at_least=FLOOD - CAP) <= FLOOD - CAP + 5  # oldest first
        # The newest ones are still open: what was closed was the oldest.
        readable, _, _ = select.select(idle[-(CAP - 5) :], [], [], 0)
        assert readable == []


def test_a_connection_whose_answer_is_streaming_is_never_closed_for_room(limited: GatewayProcess) -> None:
    body = chat(stream=True)
    with (
        ExitStack() as stack,
        httpx.stream(
            "POST", limited.url + "/v1/openai/chat/completions", json=body, headers=auth_headers()
        ) as streamed,
    ):
        chunks = streamed.iter_raw()
        received = next(chunks)  # the stream has begun
        idle = flood(stack, limited, 2 * FLOOD)
        wait_closed_by_gateway(idle, at_least=2 * FLOOD - CAP)
        received += b"".join(chunks)
    assert received.endswith(b"data: [DONE]\n\n") and received.count(b'"content":') >= 20


def test_with_no_connection_idle_a_new_one_is_answered_503(tmp_path: Path) -> None:
    config = gateway_config(simulator=STREAM, server={"max_connections": 2})
    gateway = GatewayProcess(config, tmp_path).start()
    url = gateway.url + "/v1/openai/chat/completions"
    try:
        with (
            httpx.stream("POST", url, json=chat(stream=True), headers=auth_headers()) as first,
            httpx.stream("POST", url, json=chat(stream=True), headers=auth_headers()) as second,
        ):
            streams = [first.iter_raw(), second.iter_raw()]  # kept: a dropped iterator ends its stream
            assert all(next(stream) for stream in streams)  # both streaming: nothing is idle
            with socket.create_connection(address(gateway), timeout=10) as refused:
                answer = b""
                while chunk := refused.recv(65536):
                    answer += chunk
            assert all(b"".join(stream).endswith(b"data: [DONE]\n\n") for stream in streams)
        head, _, error = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert orjson.loads(error)["error"]["code"] == "overloaded"
        assert httpx.post(url, json=chat(), headers=auth_headers()).status_code == 200  # room again
    finally:
        gateway.stop()


def test_connections_closed_for_room_are_counted_in_metrics(limited: GatewayProcess) -> None:
    with ExitStack() as stack:
        idle = flood(stack, limited, FLOOD)
        wait_closed_by_gateway(idle, at_least=FLOOD - CAP)
    text = httpx.get(limited.url + "/metrics", headers=auth_headers()).text
    evicted = re.search(
        r'^gateway_connections_closed_total\{reason="idle_evicted"\} (\S+)$', text, re.MULTILINE
    )
    assert evicted is not None and float(evicted.group(1)) >= FLOOD - CAP
