"""A ledger that fails at run time: the gateway keeps serving, spills the rows to disk, says so, catches up.

A SIGKILL during the outage loses no spilled row; a SQLite file deleted under the gateway is noticed.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ledger.store import Ledger
from tests.conftest import auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import BACKENDS, booked_rows, connect, ledger_database, row_count, spill_files
from tests.servers import UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"


@pytest.fixture(params=BACKENDS)
def gateway_with_ledger(
    request: pytest.FixtureRequest, upstream: ScriptedUpstream, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, str, Path]]:
    """A gateway, its ledger's URL and its spill folder."""
    spill_dir = tmp_path / "spill"
    with ledger_database(request.param, tmp_path) as url:
        config = gateway_config(upstream.base_url, ledger={"url": url, "spill_dir": str(spill_dir)})
        process = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
        try:
            yield process, url, spill_dir
        finally:
            process.stop()


def metric(gateway: GatewayProcess, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(gateway.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def test_rows_survive_a_ledger_outage(gateway_with_ledger: tuple[GatewayProcess, str, Path]) -> None:
    """Rows spill to a local file while the database fails, then are replayed: none waits in memory."""
    gateway, url, spill_dir = gateway_with_ledger
    ready = gateway.url + "/readyz"
    for _ in range(3):
        assert httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
    eventually(lambda: row_count(url) == 3, within_s=1.0, waiting_for="row_count(url) == 3")

    with connect(url) as database:
        database.execute("ALTER TABLE requests RENAME TO requests_away")  # every write now fails
        try:
            for _ in range(5):  # the gateway keeps serving
                response = httpx.post(gateway.url + CHAT_PATH, json=chat(stream=True), headers=auth_headers())
                assert response.status_code == 200
            # A stream's row is booked just after its caller has [DONE]: wait for all five.
            eventually(
                lambda: httpx.get(ready).json()["ledger_spilled"] == 5,
                within_s=2.0,
                waiting_for="httpx.get(ready).json()['ledger_spilled'] == 5",
            )
            response = httpx.get(ready)
            assert response.status_code == 503
            assert response.json()["ledger"] == "failing" and response.json()["ledger_queue"] == 0
            assert re.search(
                r"ledger unavailable \((Programming|Operational)Error\); rows go to the spill file in "
                + re.escape(str(spill_dir)),
                gateway.logs(),
            )
            [spilled] = spill_files(spill_dir)
            assert len(spilled.read_bytes().splitlines()) == 5
            assert metric(gateway, "gateway_ledger_rows_spilled_total") == 5
        finally:
            database.execute("ALTER TABLE requests_away RENAME TO requests")

    eventually(
        lambda: httpx.get(ready).status_code == 200,
        within_s=5.0,
        waiting_for="httpx.get(ready).status_code == 200",
    )  # asked again with backoff up to 2 s
    assert row_count(url) == 8
    assert httpx.get(ready).json()["ledger_spilled"] == 0 and spill_files(spill_dir) == []
    assert "ledger writes recovered; replaying 5 spilled rows" in gateway.logs()
    assert metric(gateway, "gateway_ledger_rows_replayed_total") == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sigkill_during_an_outage_loses_no_spilled_row(
    backend: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """Rows spilled during an outage outlive a SIGKILL: the next gateway on that folder books each once."""
    with ledger_database(backend, tmp_path) as url:
        config = gateway_config(upstream.base_url, ledger={"url": url, "spill_dir": str(tmp_path / "spill")})
        first = GatewayProcess(dict(config), tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
        try:
            assert httpx.post(first.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
            eventually(lambda: row_count(url) == 1, within_s=2.0, waiting_for="row_count(url) == 1")
            with connect(url) as database:
                database.execute("ALTER TABLE requests RENAME TO requests_away")
                for index in range(20):
                    sent = httpx.post(
                        first.url + CHAT_PATH, json=chat(stream=index % 2 == 0), headers=auth_headers()
                    )
                    assert sent.status_code == 200
                eventually(
                    lambda: httpx.get(first.url + "/readyz").json()["ledger_spilled"] == 20,
                    within_s=5.0,
                    waiting_for="httpx.get(first.url + '/readyz').json()['ledger_spilled'] == 20",
                )
                assert first.process is not None
                first.process.kill()  # SIGKILL: no shutdown, no flush
                first.process.wait()
                database.execute("ALTER TABLE requests_away RENAME TO requests")
        finally:
            first.stop()
        assert row_count(url) == 1 and len(spill_files(tmp_path / "spill")) == 1

        second = GatewayProcess(dict(config), tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
        try:
            eventually(lambda: row_count(url) == 21, within_s=5.0, waiting_for="row_count(url) == 21")
            assert "ledger: replayed 20 rows left in" in second.logs()
            assert spill_files(tmp_path / "spill") == []
        finally:
            second.stop()
        ledger = Ledger(url)
        try:
            rows = booked_rows(ledger)
        finally:
            ledger.close()
        cost = rows[0]["cost_nanos"]
        assert cost > 0 and sum(row["cost_nanos"] for row in rows) == 21 * cost
        assert len({row["row_id"] for row in rows}) == 21


def test_a_deleted_sqlite_file_is_noticed_and_a_ledger_put_back_is_used(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """No row goes into the deleted file's inode; once a ledger is at the path again, rows go there."""
    path = tmp_path / "ledger.db"
    config = gateway_config(upstream.base_url, ledger={"url": f"sqlite:///{path}"})
    gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
    ready = gateway.url + "/readyz"
    try:
        for _ in range(2):
            assert httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
        eventually(
            lambda: row_count(f"sqlite:///{path}") == 2,
            within_s=2.0,
            waiting_for="row_count(f'sqlite:///{path}') == 2",
        )
        old = sqlite3.connect(path)  # sees the deleted file's inode, WAL included
        with sqlite3.connect(tmp_path / "backup.db") as backup:
            old.backup(backup)
        path.unlink()

        for _ in range(3):
            assert httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers()).status_code == 200
        eventually(
            lambda: httpx.get(ready).json()["ledger_spilled"] == 3,
            within_s=2.0,
            waiting_for="httpx.get(ready).json()['ledger_spilled'] == 3",
        )
        response = httpx.get(ready)
        assert response.status_code == 503 and response.json()["ledger"] == "file_replaced"
        assert f"ledger: the file {path} was deleted or replaced; rows go to the spill file" in gateway.logs()
        assert old.execute("SELECT count(*) FROM requests").fetchone() == (2,)  # nothing into the old inode
        old.close()

        (tmp_path / "backup.db").rename(path)  # the operator puts a ledger back
        eventually(
            lambda: httpx.get(ready).status_code == 200,
            within_s=5.0,
            waiting_for="httpx.get(ready).status_code == 200",
        )
        assert row_count(f"sqlite:///{path}") == 5
        assert f"ledger: {path} names a ledger again; writing to it" in gateway.logs()
    finally:
        gateway.stop()


def test_with_the_spill_file_failing_too_the_queue_has_a_bound(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """Database down and spill folder unusable: callers are still served; rows past the bound are lost,
    counted and logged; the rows kept are written once the database is back."""
    not_a_folder = tmp_path / "spill"
    not_a_folder.write_text("a file where the spill folder should be")
    url = f"sqlite:///{tmp_path}/ledger.db"
    config = gateway_config(
        upstream.base_url, ledger={"url": url, "spill_dir": str(not_a_folder), "max_queued_rows": 3}
    )
    gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
    ready = gateway.url + "/readyz"
    try:
        with connect(url) as database:
            database.execute("ALTER TABLE requests RENAME TO requests_away")
            try:
                for _ in range(5):
                    sent = httpx.post(gateway.url + CHAT_PATH, json=chat(), headers=auth_headers())
                    assert sent.status_code == 200
                eventually(
                    lambda: metric(gateway, "gateway_ledger_rows_lost_total") == 2,
                    within_s=2.0,
                    waiting_for="metric(gateway, 'gateway_ledger_rows_lost_total') == 2",
                )
                body = httpx.get(ready).json()
                assert body["ledger"] == "failing" and body["ledger_spill"] == "failing"
                assert body["ledger_queue"] == 3 and body["ledger_spilled"] == 0
                assert "ledger: cannot write the spill file in" in gateway.logs()
                assert (
                    "ledger: queue full (3 rows): 1 booked rows lost since the last report" in gateway.logs()
                )
            finally:
                database.execute("ALTER TABLE requests_away RENAME TO requests")
        eventually(
            lambda: httpx.get(ready).status_code == 200,
            within_s=5.0,
            waiting_for="httpx.get(ready).status_code == 200",
        )
        assert row_count(url) == 3
    finally:
        gateway.stop()
