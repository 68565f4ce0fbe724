"""A ledger that fails at run time: the gateway keeps serving, keeps the rows, says so, and catches up."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from gateway.ledger.store import Ledger
from tests.conftest import auth_headers, chat
from tests.ledgers import BACKENDS, ledger_database
from tests.servers import UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"


@pytest.fixture(params=BACKENDS)
def gateway_with_ledger(
    request: pytest.FixtureRequest, upstream: ScriptedUpstream, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, str]]:
    with ledger_database(request.param, tmp_path) as url:
        config = gateway_config(upstream.base_url, ledger={"url": url})
        process = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
        try:
            yield process, url
        finally:
            process.stop()


@contextmanager
def connect(url: str) -> Iterator[Any]:
    """A plain connection of the test's own to the ledger database, outside the gateway."""
    if url.startswith("sqlite:///"):
        database = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield database
        finally:
            database.close()
    else:
        with psycopg.connect(url, autocommit=True) as database:
            yield database


def within(seconds: float, condition: Callable[[], bool]) -> None:
    """Poll another process's state (no event crosses processes), for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def row_count(url: str) -> int:
    ledger = Ledger(url)
    try:
        return ledger.count_rows()
    finally:
        ledger.close()


def test_rows_survive_a_ledger_outage(gateway_with_ledger: tuple[GatewayProcess, str]) -> None:
    gateway, url = gateway_with_ledger
    ready = gateway.url + "/readyz"
    for _ in range(3):
        assert httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
    within(1.0, lambda: row_count(url) == 3)

    with connect(url) as database:
        database.execute("ALTER TABLE requests RENAME TO requests_away")  # every write now fails
        try:
            for _ in range(5):  # the gateway keeps serving
                response = httpx.post(gateway.url + CHAT_PATH, json=chat(stream=True), headers=auth_headers())
                assert response.status_code == 200
            # A stream's row is booked just after its caller has [DONE]: wait for all five.
            within(2.0, lambda: httpx.get(ready).json()["ledger_queue"] == 5)
            response = httpx.get(ready)
            assert response.status_code == 503
            assert response.json()["ledger"] == "failing" and response.json()["ledger_queue"] == 5
            assert re.search(
                r"ledger write failed \((Programming|Operational)Error\); \d rows kept queued, retrying",
                gateway.logs(),
            )
        finally:
            database.execute("ALTER TABLE requests_away RENAME TO requests")

    within(5.0, lambda: httpx.get(ready).status_code == 200)  # retries back off up to 2 s
    assert row_count(url) == 8
    assert "ledger writes recovered" in gateway.logs()
