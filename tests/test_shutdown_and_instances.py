"""Graceful shutdown loses no row; several instances on one PostgreSQL ledger add up exactly."""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.ledger.store import Ledger
from tests.conftest import auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import BACKENDS, booked_rows, ledger_database, postgres_database
from tests.scenarios import USAGE
from tests.servers import UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
ADMIN_KEY = "sk-admin-instances"


def all_rows(url: str) -> list[dict[str, Any]]:
    ledger = Ledger(url)
    try:
        return booked_rows(ledger)
    finally:
        ledger.close()


def hold_stream(url: str, request_id: str, first_event: threading.Event, received: dict[str, bytes]) -> None:
    """Open a stream that upstream never finishes; keep what arrives until the gateway ends it."""
    body = chat("scenario:stream_hold", stream=True, user="u-held")
    with (
        httpx.Client(base_url=url, headers=auth_headers(request_id=request_id), timeout=30) as client,
        client.stream("POST", CHAT_PATH, json=body) as response,
    ):
        data = b""
        for chunk in response.iter_raw():
            data += chunk
            first_event.set()
        received[request_id] = data


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_database(request.param, tmp_path) as url:
        yield url


def test_sigterm_ends_open_streams_with_an_error_event_and_books_every_request(
    upstream: ScriptedUpstream, tmp_path: Path, ledger_url: str
) -> None:
    config = gateway_config(upstream.base_url, server={"shutdown_grace_s": 1}, ledger={"url": ledger_url})
    gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
    for _ in range(5):  # finished before the signal
        assert (
            httpx.post(gateway.url + CHAT_PATH, json=chat(user="u-done"), headers=auth_headers()).status_code
            == 200
        )
    received: dict[str, bytes] = {}
    threads, started = [], []
    for _ in range(3):
        first_event = threading.Event()
        thread = threading.Thread(
            target=hold_stream, args=(gateway.url, str(uuid.uuid4()), first_event, received)
        )
        thread.start()
        threads.append(thread)
        started.append(first_event)
    assert all(event.wait(10) for event in started)
    # And one plain request that upstream never answers: it must get a 503 of its own.
    waiting_id = str(uuid.uuid4())
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                gateway.url + CHAT_PATH,
                json=chat("scenario:stall"),
                headers=auth_headers(request_id=waiting_id),
                timeout=30,
            )
        )
    )
    waiting.start()
    # Upstream has it (another thread's record: polled).
    eventually(lambda: upstream.find(waiting_id), within_s=10, waiting_for="upstream to have the request")

    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    for thread in [*threads, waiting]:
        thread.join(15)
    # uvicorn re-raises the signal it caught once its shutdown is done: exiting "by SIGTERM" is normal.
    assert gateway.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway.logs()
    assert "Traceback" not in gateway.logs() and "Exception in ASGI application" not in gateway.logs()
    (answer,) = answers
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"

    assert len(received) == 3
    for data in received.values():
        last = data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "shutting_down"
        assert b"[DONE]" not in data
    rows = all_rows(gateway.ledger_url)
    assert sorted(r["outcome"] for r in rows) == ["ok"] * 5 + ["shutdown"] * 4
    held = [r for r in rows if r["outcome"] == "shutdown"]
    assert {r["request_id"] for r in held} == {*received, waiting_id}
    streamed = [r for r in held if r["request_id"] != waiting_id]
    assert all(r["usage_source"] == "estimated" and r["completion_tokens"] == 1 for r in streamed)


@pytest.fixture
def two_instances(
    upstream: ScriptedUpstream, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, GatewayProcess, str]]:
    with postgres_database() as url:
        env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
        first = GatewayProcess(gateway_config(upstream.base_url, ledger={"url": url}), tmp_path, env).start()
        second = GatewayProcess(gateway_config(upstream.base_url, ledger={"url": url}), tmp_path, env).start()
        try:
            yield first, second, url
        finally:
            first.stop()
            second.stop()


def test_two_instances_on_one_postgresql_ledger_add_up_exactly(
    two_instances: tuple[GatewayProcess, GatewayProcess, str],
) -> None:
    first, second, url = two_instances
    plan = [
        (instance, kind, f"u-{n % 5}")
        for n in range(120)
        for instance, kind in [((first, second)[n % 2], ("plain", "stream")[n // 2 % 2])]
    ]

    def send(step: tuple[GatewayProcess, str, str]) -> int:
        instance, kind, user = step
        body = chat("hi", user=user, stream=kind == "stream")
        with httpx.Client(timeout=30) as client:
            response = client.post(instance.url + CHAT_PATH, json=body, headers=auth_headers())
        return response.status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert set(pool.map(send, plan)) == {200}

    rows = eventually(
        lambda: all_rows(url),
        until=lambda rows: len(rows) >= len(plan),
        within_s=1.0,
        waiting_for=f"{len(plan)} rows in the shared ledger",
    )
    assert len(rows) == len(plan)
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for instance in (first, second):
            totals = admin.get(instance.url + "/admin/usage", params={"group_by": "key"}).json()["data"]
            assert totals == [
                {
                    "key": "alice",
                    "requests": len(plan),
                    "prompt_tokens": USAGE["prompt_tokens"] * len(plan),
                    "completion_tokens": USAGE["completion_tokens"] * len(plan),
                    "total_tokens": USAGE["total_tokens"] * len(plan),
                    "estimated_cost": float(Decimal("0.0000268") * len(plan)),
                }
            ]
            text = admin.get(instance.url + "/admin/usage", params={"group_by": "key"}).text
            exact = format((Decimal("0.0000268") * len(plan)).normalize(), "f")
            assert f'"estimated_cost":{exact}' in text  # exact decimal text, never a float's

        # A key issued on one instance works on the other; revoked on one, refused by the other in 1 s.
        key = admin.post(first.url + "/admin/keys", json={"name": "shared"}).json()["key"]

        def second_says() -> int:
            return httpx.post(second.url + CHAT_PATH, json=chat(), headers=auth_headers(key)).status_code

        eventually(
            second_says, until=lambda status: status == 200, within_s=1.0, waiting_for="the key to work"
        )
        assert admin.delete(first.url + "/admin/keys/shared").status_code == 200
        eventually(
            second_says, until=lambda status: status == 401, within_s=1.0, waiting_for="the key refused"
        )


def test_worker_processes_share_one_ledger_and_one_key_set(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gateway = GatewayProcess(gateway_config(upstream.base_url, server={"workers": 2}), tmp_path, env).start()
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            key = admin.post(gateway.url + "/admin/keys", json={"name": "team"}).json()["key"]

            def workers_say() -> set[int]:  # 12 fresh connections land on both workers
                return {
                    httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers(key)).status_code
                    for _ in range(12)
                }

            eventually(
                workers_say, until=lambda codes: codes == {200}, within_s=1.0, waiting_for="the key to work"
            )
            assert admin.delete(gateway.url + "/admin/keys/team").status_code == 200
            eventually(
                workers_say, until=lambda codes: codes == {401}, within_s=1.0, waiting_for="the key refused"
            )

            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = list(
                    pool.map(
                        lambda n: (
                            httpx.post(
                                gateway.url + CHAT_PATH, json=chat(user=f"w{n % 3}"), headers=auth_headers()
                            ).status_code
                        ),
                        range(60),
                    )
                )
            assert set(statuses) == {200}

            def booked_requests() -> int:
                totals = admin.get(gateway.url + "/admin/usage", params={"group_by": "user"}).json()["data"]
                return sum(r["requests"] for r in totals if r["user"] in ("w0", "w1", "w2"))

            eventually(
                booked_requests,
                until=lambda count: count == 60,
                within_s=1.0,
                waiting_for="every request in the report",
            )
        assert len(set(re.findall(r"Started server process \[(\d+)\]", gateway.logs()))) == 2
    finally:
        gateway.stop()


def test_workers_end_with_their_supervisor_and_free_the_port(tmp_path: Path) -> None:
    """A supervisor killed outright cannot stop its workers: they end on their own (the kernel sends
    them SIGTERM), so a gateway started in its place can bind the port (one worker binds it without
    SO_REUSEPORT: a worker left behind would make that fail)."""
    first = GatewayProcess(gateway_config(server={"workers": 2}), tmp_path).start()
    workers = first.worker_pids()
    assert len(workers) == 2
    assert first.process is not None
    first.process.kill()
    first.stop()
    eventually(
        lambda: [pid for pid in workers if is_running(pid)],
        until=lambda running: not running,
        within_s=10,
        waiting_for="the workers to end",
    )
    port = int(first.url.rsplit(":", 1)[1])
    second = GatewayProcess(gateway_config(), tmp_path).start(port=port)
    try:
        assert httpx.get(second.url + "/healthz").status_code == 200
    finally:
        second.stop()


def is_running(pid: int) -> bool:
    """Neither gone nor a zombie (an ended process its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
