"""Callers who try to stop a worker: key guessing, bodies that fill memory, bodies built to be slow.

Failed authentications are counted, logged and, from one address, slowed down to 429 without ever
slowing a valid key; request bodies held at once stay within `server.max_inflight_body_bytes`; and a
body up to `server.max_body_bytes` built to be slow to check does not stop the event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.asgi import BodyBudget
from gateway.auth import AddressLimiter
from gateway.errors import Overloaded
from tests.conftest import auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import rows_of_request
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
ADMIN_KEY = "sk-admin-hostile-77d0"
METRICS_TOKEN = "metrics-hostile-3b9e"


def metric(gateway: GatewayProcess, name: str, labels: str) -> float:
    text = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    match = re.search(rf"^{name}_total\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from `address` (any of 127.0.0.0/8 reaches the gateway)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


# --- failed authentication -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "METRICS_TOKEN": METRICS_TOKEN}
    config = gateway_config(upstream.base_url, metrics={"token_env": "METRICS_TOKEN"})
    process = GatewayProcess(config, tmp_path_factory.mktemp("guarded"), env).start()
    yield process
    process.stop()


def test_failed_authentications_are_counted_by_route_kind_and_logged_without_the_key(
    guarded: GatewayProcess,
) -> None:
    wrong = {"Authorization": "Bearer sk-guess-0123456789"}
    attempts = [("chat", "POST", CHAT_PATH), ("api", "GET", "/v1/models"), ("admin", "GET", "/admin/keys")]
    attempts.append(("metrics", "GET", "/metrics"))
    before = {kind: metric(guarded, "gateway_auth_failures", f'route="{kind}"') for kind, _, _ in attempts}
    with from_address("127.0.0.3") as client:
        for _, method, path in attempts:
            assert client.request(method, guarded.url + path, headers=wrong).status_code == 401
    for kind, _, _ in attempts:
        assert metric(guarded, "gateway_auth_failures", f'route="{kind}"') == before[kind] + 1
    line = re.compile(r"auth: \d+ failed authentications? from \d+ address")
    # The line is written at once for a first failure; the log is another process's: polled.
    eventually(
        guarded.logs, until=line.search, within_s=5.0, waiting_for="the failed-authentication log line"
    )
    assert line.search(guarded.logs()), guarded.logs()[-2000:]
    assert "sk-guess" not in guarded.logs()


def test_an_address_that_keeps_failing_gets_429_but_its_valid_key_still_works(
    guarded: GatewayProcess,
) -> None:
    wrong = {"Authorization": "Bearer sk-guess-again"}
    with from_address("127.0.0.4") as guesser, from_address("127.0.0.5") as neighbour:
        statuses = [guesser.post(guarded.url + CHAT_PATH, headers=wrong).status_code for _ in range(150)]
        assert statuses[:100] == [401] * 100  # a burst of 100 failures is allowed, then 10 a second
        assert 429 in statuses[100:]
        limited = guesser.get(guarded.url + "/v1/models", headers=wrong)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        valid = guesser.post(guarded.url + CHAT_PATH, json=chat(), headers=auth_headers())
        assert valid.status_code == 200  # the same address, with a valid key: never slowed
        assert guesser.get(guarded.url + "/v1/models", headers=auth_headers()).status_code == 200
        assert neighbour.post(guarded.url + CHAT_PATH, headers=wrong).status_code == 401  # its own bucket


def test_the_limiter_refills_and_keeps_a_bounded_table() -> None:
    now = [0.0]
    limiter = AddressLimiter(burst=3, per_second=2, max_addresses=2, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one attempt back
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    assert limiter.allow("b") and limiter.allow("c")  # the table keeps two: "a" is dropped
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]  # a full bucket again


# --- memory for request bodies -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_budget(
    upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Room for one body of about 3 KB at a time; a request waits at most 1 s for room."""
    config = gateway_config(
        upstream.base_url,
        server={"max_inflight_body_bytes": 3000, "client_timeout_s": 1},
        metrics={"token_env": "METRICS_TOKEN"},
    )
    env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "METRICS_TOKEN": METRICS_TOKEN}
    process = GatewayProcess(config, tmp_path_factory.mktemp("budget"), env).start()
    yield process
    process.stop()


def held_stream(gateway: GatewayProcess, request_id: str, started: threading.Event) -> threading.Thread:
    """A stream of a 2 KB body whose upstream holds after its first event, until its gate opens."""
    body = chat("scenario:stream_gated", stream=True, x_padding="p" * 2000)

    def run() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "POST", gateway.url + CHAT_PATH, json=body, headers=auth_headers(request_id=request_id)
            ) as response,
        ):
            for _ in response.iter_bytes():
                started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    return thread


def test_a_body_with_no_room_gets_503_overloaded_and_is_booked(
    small_budget: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    holder = f"hold-{uuid.uuid4()}"
    thread = held_stream(small_budget, holder, threading.Event())
    overloaded_before = metric(small_budget, "gateway_overloaded", 'resource="body_memory"')
    try:
        response = httpx.post(
            small_budget.url + CHAT_PATH, json=chat(x_padding="q" * 2000), headers=auth_headers(), timeout=10
        )
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "overloaded" and error["type"] == "server_error"
        assert metric(small_budget, "gateway_overloaded", 'resource="body_memory"') == overloaded_before + 1
        assert upstream.find(response.headers["x-request-id"]) == []
        small = httpx.post(small_budget.url + CHAT_PATH, json=chat(), headers=auth_headers(), timeout=10)
        assert small.status_code == 200  # a body that fits in what is left goes ahead
    finally:
        upstream.gate(holder).set()
        thread.join(10)
    assert httpx.post(small_budget.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
    refused = rows_of_request(small_budget.ledger_url, response.headers["x-request-id"], within_s=5.0)
    assert [(row["outcome"], row["status"], row["cost_nanos"]) for row in refused] == [("rejected", 503, 0)]


def test_a_waiting_body_goes_ahead_as_soon_as_room_frees(
    small_budget: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    holder = f"hold-{uuid.uuid4()}"
    thread = held_stream(small_budget, holder, threading.Event())
    waiter = f"wait-{uuid.uuid4()}"
    answer: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                small_budget.url + CHAT_PATH,
                json=chat(x_padding="w" * 2000),
                headers=auth_headers(request_id=waiter),
                timeout=10,
            )
        )
    )
    sender.start()
    upstream.gate(holder).set()  # whether the second body was already in line or not, it gets room
    thread.join(10)
    sender.join(10)
    assert answer[0].status_code == 200
    assert [r.headers["x-request-id"] for r in upstream.requests[-2:]] == [holder, waiter]


async def test_the_budget_serves_in_order_and_wakes_waiters_when_room_frees() -> None:
    refused: list[int] = []
    budget = BodyBudget(100, wait_s=30, on_overload=lambda: refused.append(1))
    assert budget.try_take(60)
    assert not budget.try_take(50)
    big = asyncio.create_task(budget.take(50))
    await asyncio.sleep(0)  # the task is in line
    assert not budget.try_take(10)  # room for 10, but a request waits before it
    small = asyncio.create_task(budget.take(10))
    await asyncio.sleep(0)
    budget.give_back(60)
    await asyncio.wait_for(asyncio.gather(big, small), 5)
    assert budget.free_bytes == 40 and refused == []


async def test_a_waiter_that_gives_up_leaves_the_line() -> None:
    refused: list[int] = []
    budget = BodyBudget(100, wait_s=0.01, on_overload=lambda: refused.append(1))
    assert budget.try_take(100)
    with pytest.raises(Overloaded):
        await budget.take(80)
    assert refused == [1]
    budget.give_back(100)
    assert budget.try_take(100)  # nobody is left in line


# --- bodies built to be slow to check ----------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The default bounds (a body of up to 20 MiB), on the simulator."""
    process = GatewayProcess(gateway_config(), tmp_path_factory.mktemp("roomy")).start()
    yield process
    process.stop()


def slow_bodies() -> dict[str, bytes]:
    head = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], ' % MODEL.encode()
    return {
        # 1.2 million keys, the last one given twice (80,000 took 50 s before the check was linear).
        "duplicate_key": head
        + b'"x": {'
        + b", ".join(b'"k%d": 0' % i for i in range(1_200_000))
        + b', "k0": 1}}',
        # Eight million numbers and a key given twice at the end: the whole body is walked twice.
        "numbers": head + b'"x": [' + b"1," * 8_000_000 + b'1], "x": 0}',
        # Many messages, each checked.
        "messages": b'{"model": "%s", "messages": [' % MODEL.encode()
        + b'{"role": "user", "content": "a"}, ' * 500_000
        + b'{"role": "user", "content": 5}]}',
    }


def server_has_read_everything(gateway_port: int, client_port: int) -> bool:
    """The gateway's side of our connection has nothing left unread (Linux's /proc/net/tcp)."""
    local, remote = f"0100007F:{gateway_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16) == 0
    return False


@pytest.mark.parametrize("kind", ["duplicate_key", "numbers", "messages"])
def test_the_event_loop_answers_while_a_slow_body_is_checked(roomy: GatewayProcess, kind: str) -> None:
    """/healthz, asked once the gateway holds all of the slow body, is answered before that body is."""
    raw = slow_bodies()[kind]
    port = int(roomy.url.rsplit(":", 1)[1])
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CALLER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(head + raw)
        eventually(  # the kernel's view of another process's socket: polled
            lambda: server_has_read_everything(port, slow.getsockname()[1]),
            within_s=5.0,
            every_s=0.001,
            waiting_for="the gateway to read the whole body",
        )
        with httpx.Client(timeout=60) as client:
            assert client.get(roomy.url + "/healthz").status_code == 200
        unanswered, _, _ = select.select([slow], [], [], 0)
        assert unanswered == [], "the slow body was answered before /healthz"
        status, error = read_json_answer(slow)
    assert status == 400
    assert error["error"]["code"] in ("duplicate_key", "invalid_type")


def read_json_answer(connection: socket.socket) -> tuple[int, dict[str, Any]]:
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        body += connection.recv(65536)
    return int(head.split(b" ", 2)[1]), json.loads(body)
