"""Rows the database refuses, a full queue, spill files left behind: a real LedgerWriter over a real
ledger, on both backends.

A refused row is set aside in the dead-letter file (and counted, logged at most once per 10 s); the
rows around it are written; the writer goes on. A database that fails for a moment (a dropped
connection, a locked file) sets no row aside. A row booked when the queue is full is lost, counted
and logged, never waited for. Spill files of writers no longer alive are replayed by the next writer;
a live writer's are not; rows booked during a long replay are written meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ledger.spill import DEAD_LETTER_FILE, SpillFile, encode_row
from gateway.ledger.store import Ledger, LedgerRow
from gateway.ledger.writer import LedgerWriter
from gateway.metrics import Metrics
from tests.eventually import eventually
from tests.ledgers import BACKENDS, booked_rows, connect, count_rows, ledger_database, spill_files
from tests.test_ledger import row

NOV_25 = 1_795_564_800_000_000

# Each poison value, and the backends that refuse it (SQLite stores any text of any length).
POISON: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "lone surrogate in user": ({"user": "Zo\ud83d"}, BACKENDS),
    "lone surrogate in model": ({"model": "m\udc80"}, BACKENDS),
    "lone surrogate in key_name": ({"key_name": "\ud800alice"}, BACKENDS),
    "NUL in user": ({"user": "a\x00b"}, ("postgresql",)),
    "10,000-character user": ({"user": "u" * 10_000}, ("postgresql",)),
    "300-character request id": ({"request_id": "r" * 300}, ("postgresql",)),
    "2^70 prompt tokens": ({"prompt_tokens": 2**70}, BACKENDS),
    "2^64 cost": ({"cost_nanos": 2**64}, BACKENDS),
}


@pytest.fixture(params=BACKENDS)
def backend_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Ledger]]:
    with ledger_database(request.param, tmp_path) as url:
        ledger = Ledger(url)
        ledger.migrate()
        yield request.param, ledger
        ledger.close()


def metric(metrics: Metrics, name: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def dead_letters(spill_dir: Path) -> list[dict[str, Any]]:
    path = spill_dir / DEAD_LETTER_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("poison", POISON)
def test_a_refused_row_is_set_aside_and_the_rows_around_it_are_written(
    backend_ledger: tuple[str, Ledger], tmp_path: Path, poison: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend, ledger = backend_ledger
    fields, refused_on = POISON[poison]
    metrics = Metrics(models=["m"], user_labels=False)
    spill_dir = tmp_path / "spill"
    writer = LedgerWriter(ledger, spill_dir=spill_dir, observer=metrics, linger_s=0.01)
    writer.start()
    bad = row(**fields)
    good = [row(cost_nanos=cost) for cost in range(1, 101)]
    for booked in [*good[:50], bad, *good[50:]]:  # one batch: the bad row in the middle
        writer.book(booked)
    refused = backend in refused_on
    eventually(
        lambda: count_rows(ledger) == (100 if refused else 101),
        within_s=10,
        waiting_for="count_rows(ledger) == (100 if refused else 101)",
    )

    after = [row(cost_nanos=1000), row(cost_nanos=2000)]  # the writer goes on
    for booked in after:
        writer.book(booked)
    eventually(
        lambda: count_rows(ledger) == (102 if refused else 103),
        within_s=10,
        waiting_for="count_rows(ledger) == (102 if refused else 103)",
    )
    assert writer.state == "ok" and writer.depth == 0 and writer.spilled_rows == 0
    writer.close()

    assert ledger.usage("key")[0].cost_nanos == sum(range(1, 101)) + 3000 + (0 if refused else bad.cost_nanos)
    set_aside = dead_letters(spill_dir)
    if refused:
        assert [entry["row"]["row_id"] for entry in set_aside] == [bad.row_id]
        assert LedgerRow(**set_aside[0]["row"]) == bad  # kept whole: a lone surrogate, 2^70 too
        assert metric(metrics, "gateway_ledger_rows_dead_lettered_total") == 1
        logged = [r.getMessage() for r in caplog.records if "refused by the database" in r.getMessage()]
        assert len(logged) == 1 and bad.row_id in logged[0] and bad.request_id[:190] in logged[0]
    else:
        assert set_aside == [] and metric(metrics, "gateway_ledger_rows_dead_lettered_total") == 0
        assert next(r for r in booked_rows(ledger) if r["row_id"] == bad.row_id)["user"] == bad.user
    assert metric(metrics, "gateway_ledger_rows_spilled_total") == 0


def test_many_refused_rows_in_one_batch_are_all_found(
    backend_ledger: tuple[str, Ledger], tmp_path: Path
) -> None:
    """Bisecting finds every bad row of a big batch; each good one is written exactly once."""
    _, ledger = backend_ledger
    spill_dir = tmp_path / "spill"
    writer = LedgerWriter(ledger, spill_dir=spill_dir, linger_s=0.05)
    writer.start()
    bad_rows = {index: row(user="\udfff", cost_nanos=7) for index in (0, 13, 14, 500, 2999)}
    booked = [bad_rows.get(index) or row(cost_nanos=index) for index in range(3000)]
    for each in booked:
        writer.book(each)
    writer.close()
    good = [each for each in booked if each not in bad_rows.values()]
    assert count_rows(ledger) == len(good)
    assert ledger.usage("key")[0].cost_nanos == sum(each.cost_nanos for each in good)
    assert sorted(e["row"]["row_id"] for e in dead_letters(spill_dir)) == sorted(
        each.row_id for each in bad_rows.values()
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_queue_loses_rows_counted_and_logged_without_waiting(
    backend_ledger: tuple[str, Ledger], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer is not running yet: nothing leaves the queue, as when it is stuck."""
    _, ledger = backend_ledger
    metrics = Metrics(models=["m"], user_labels=False)
    clock = Clock()
    writer = LedgerWriter(
        ledger, spill_dir=tmp_path / "spill", observer=metrics, max_queued_rows=10, clock=clock
    )
    caplog.set_level(logging.ERROR, "gateway.ledger")
    for cost in range(25):
        writer.book(row(cost_nanos=cost))  # never blocks: rows 10..24 are lost
    assert writer.depth == 10
    assert metric(metrics, "gateway_ledger_rows_lost_total") == 15
    lost_lines = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert len(lost_lines) == 1 and "1 booked rows lost" in lost_lines[0]  # rate-limited: once, at first

    clock.now += 10  # the next report, with the count since the last one
    writer.book(row())
    lost_lines = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert len(lost_lines) == 2 and "15 booked rows lost" in lost_lines[1]

    writer.start()
    writer.close()
    assert count_rows(ledger) == 10 and ledger.usage("key")[0].cost_nanos == sum(range(10))


def test_spill_files_of_dead_writers_are_replayed_and_a_live_writers_is_left_alone(
    backend_ledger: tuple[str, Ledger], tmp_path: Path
) -> None:
    """A killed writer's file (torn last line and all) is claimed at start; a locked one is not."""
    _, ledger = backend_ledger
    spill_dir = tmp_path / "spill"
    dead, live = SpillFile(spill_dir), SpillFile(spill_dir)
    dead_rows, live_rows = [row(cost_nanos=1), row(cost_nanos=2), row(cost_nanos=3)], [row(cost_nanos=40)]
    dead.append(dead_rows[:2])
    assert dead.path is not None
    with dead.path.open("ab") as file:
        file.write(b"not a row\n")  # a complete line that is not a row: set aside
    dead.append(dead_rows[2:])
    with dead.path.open("ab") as file:
        file.write(encode_row(row(cost_nanos=1000))[:30])  # the torn tail of a write cut by a kill
    dead.release()  # its process is gone: the lock with it
    live.append(live_rows)  # its process lives: it holds the lock

    writer = LedgerWriter(ledger, spill_dir=spill_dir)
    writer.start()
    writer.close()
    assert count_rows(ledger) == 3 and ledger.usage("key")[0].cost_nanos == 6
    assert [entry["line"] for entry in dead_letters(spill_dir)] == ["not a row"]
    assert sorted(spill_dir.glob("spill-*.jsonl")) == [live.path]

    live.release()
    writer = LedgerWriter(ledger, spill_dir=spill_dir)
    writer.start()
    writer.close()
    assert count_rows(ledger) == 4 and ledger.usage("key")[0].cost_nanos == 46
    assert list(spill_dir.glob("spill-*.jsonl")) == []


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused by the database" in r.getMessage()]


def test_refused_rows_are_logged_at_most_once_per_10_s_with_the_count(
    backend_ledger: tuple[str, Ledger], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused row goes to the dead-letter file; the log has one line per 10 s saying how many."""
    _, ledger = backend_ledger
    spill_dir = tmp_path / "spill"
    clock = Clock()
    writer = LedgerWriter(ledger, spill_dir=spill_dir, linger_s=0.01, clock=clock)
    writer.start()
    refused = [row(prompt_tokens=2**70) for _ in range(5)]  # too big for either backend
    for each in refused:
        writer.book(each)
    eventually(
        lambda: len(dead_letters(spill_dir)) == 5,
        within_s=10,
        waiting_for="len(dead_letters(spill_dir)) == 5",
    )
    [line] = refusal_lines(caplog)  # the first at once
    assert line.startswith("ledger: 1 rows refused by the database") and refused[0].row_id in line

    clock.now += 10
    latest = row(prompt_tokens=2**70)
    writer.book(latest)
    eventually(
        lambda: len(dead_letters(spill_dir)) == 6,
        within_s=10,
        waiting_for="len(dead_letters(spill_dir)) == 6",
    )
    writer.close()
    _, second = refusal_lines(caplog)
    assert second.startswith("ledger: 5 rows refused by the database since the last report")
    assert latest.row_id in second and latest.request_id in second
    assert [entry["row"]["row_id"] for entry in dead_letters(spill_dir)] == [
        each.row_id for each in [*refused, latest]
    ]


def waiting_insert(url: str) -> int | None:
    """The PostgreSQL backend of an INSERT into requests that waits for a lock, if there is one."""
    with connect(url) as database:
        found = database.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO requests%'"
        ).fetchone()
    return None if found is None else int(found[0])


def test_a_dropped_postgresql_connection_sets_no_row_aside(tmp_path: Path) -> None:
    """The writer's connection is terminated during its INSERT (as a restart or a failover would): the
    row is retried, never taken for one the database refuses, even though the next ping succeeds."""
    spill_dir = tmp_path / "spill"
    metrics = Metrics(models=["m"], user_labels=False)
    with ledger_database("postgresql", tmp_path) as url:
        ledger = Ledger(url)
        ledger.migrate()
        writer = LedgerWriter(ledger, spill_dir=spill_dir, observer=metrics, linger_s=0.01)
        writer.start()
        try:
            writer.book(row(cost_nanos=1))
            eventually(lambda: count_rows(ledger) == 1, waiting_for="count_rows(ledger) == 1")
            with psycopg.connect(url) as locker:  # in a transaction until the block ends
                locker.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
                writer.book(row(cost_nanos=2))  # its INSERT waits for the lock
                pid = eventually(lambda: waiting_insert(url), waiting_for="the writer's INSERT, waiting")
                locker.execute("SELECT pg_terminate_backend(%s)", (pid,))
            eventually(lambda: count_rows(ledger) == 2, within_s=5, waiting_for="count_rows(ledger) == 2")
            assert writer.state == "ok" and writer.spilled_rows == 0
        finally:
            writer.close()
        assert ledger.usage("key")[0].cost_nanos == 3
        ledger.close()
    assert dead_letters(spill_dir) == [] and metric(metrics, "gateway_ledger_rows_dead_lettered_total") == 0
    assert metric(metrics, "gateway_ledger_write_errors_total") >= 1


def test_a_locked_sqlite_file_sets_no_row_aside(tmp_path: Path) -> None:
    """Another process holds the write lock past the busy timeout (10 s): "database is locked" is the
    database failing for a while, not the row; the row is written once the lock is let go."""
    spill_dir = tmp_path / "spill"
    metrics = Metrics(models=["m"], user_labels=False)
    with ledger_database("sqlite", tmp_path) as url:
        ledger = Ledger(url)
        ledger.migrate()
        writer = LedgerWriter(ledger, spill_dir=spill_dir, observer=metrics, linger_s=0.01)
        writer.start()
        try:
            writer.book(row(cost_nanos=1))
            eventually(lambda: count_rows(ledger) == 1, waiting_for="count_rows(ledger) == 1")
            with connect(url) as locker:
                locker.execute("BEGIN IMMEDIATE")  # the write lock, as another worker's long write
                writer.book(row(cost_nanos=2))
                eventually(
                    lambda: metric(metrics, "gateway_ledger_write_errors_total") >= 1,
                    within_s=15,
                    waiting_for="the writer's INSERT to fail: database is locked",
                )
                locker.execute("ROLLBACK")
            eventually(lambda: count_rows(ledger) == 2, within_s=5, waiting_for="count_rows(ledger) == 2")
            assert writer.state == "ok" and writer.spilled_rows == 0
        finally:
            writer.close()
        assert ledger.usage("key")[0].cost_nanos == 3
        ledger.close()
    assert dead_letters(spill_dir) == [] and metric(metrics, "gateway_ledger_rows_dead_lettered_total") == 0


REPLAYED_ROWS = 20_000  # 400 batches of 50: a replay that takes a while


def test_rows_booked_during_a_long_replay_are_written_meanwhile(
    backend_ledger: tuple[str, Ledger], tmp_path: Path
) -> None:
    """A large spill file is replayed batch by batch; the rows booked meanwhile go to the database
    between its batches, so a queue far smaller than the replay never fills."""
    _, ledger = backend_ledger
    spill_dir = tmp_path / "spill"
    metrics = Metrics(models=["m"], user_labels=False)
    orphan = SpillFile(spill_dir)
    orphan.append([row(cost_nanos=1) for _ in range(REPLAYED_ROWS)])
    orphan.release()  # its writer is gone: replayed by the next one, at start
    writer = LedgerWriter(
        ledger, spill_dir=spill_dir, observer=metrics, max_queued_rows=100, batch_size=50, linger_s=0.01
    )
    writer.start()
    booked = 0
    while spill_files(spill_dir):  # the replay runs
        writer.book(row(cost_nanos=1000))
        booked += 1
        time.sleep(0.001)
    writer.close()
    assert booked > 300  # three times what the queue holds were booked during the replay
    assert metric(metrics, "gateway_ledger_rows_lost_total") == 0
    assert count_rows(ledger) == REPLAYED_ROWS + booked
    assert ledger.usage("key")[0].cost_nanos == REPLAYED_ROWS + 1000 * booked
