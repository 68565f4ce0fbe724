"""The writer thread outlives what happens to its files: a spill file deleted under it, entries of the
spill folder it cannot read, a SQLite path that no longer leads anywhere, a spill file it cannot make.

A real LedgerWriter over a real ledger; every fault is made for real, on the file system. (The tests
run as root too, where a chmod takes nothing away: the unreadable entries are a symlink loop, a
folder and a FIFO where a spill file would be.)
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger.spill import SpillFile
from gateway.ledger.store import Ledger
from gateway.ledger.writer import LedgerWriter
from gateway.metrics import Metrics
from tests.eventually import eventually
from tests.ledgers import BACKENDS, connect, count_rows, ledger_database, requests_table_away, spill_files
from tests.test_ledger import row
from tests.test_ledger_faults import metric


@pytest.fixture(params=BACKENDS)
def ledger_and_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Ledger, str]]:
    with ledger_database(request.param, tmp_path) as url:
        ledger = Ledger(url)
        ledger.migrate()
        yield ledger, url
        ledger.close()


def test_a_spill_file_deleted_during_an_outage_is_still_replayed_whole(
    ledger_and_url: tuple[Ledger, str], tmp_path: Path
) -> None:
    """The writer reads its spill file back through the descriptor it holds: rows spilled before and
    after the file was deleted are all written once the database is back."""
    ledger, url = ledger_and_url
    spill_dir = tmp_path / "spill"
    metrics = Metrics(models=["m"], user_labels=False)
    writer = LedgerWriter(ledger, spill_dir=spill_dir, observer=metrics, linger_s=0.01)
    writer.start()
    try:
        with requests_table_away(url):
            for cost in (1, 2, 3):
                writer.book(row(cost_nanos=cost))
            eventually(lambda: writer.spilled_rows == 3, waiting_for="writer.spilled_rows == 3")
            [spilled] = spill_files(spill_dir)
            spilled.unlink()  # a clean-up script, an operator
            writer.book(row(cost_nanos=4))
            eventually(lambda: writer.spilled_rows == 4, waiting_for="writer.spilled_rows == 4")
        eventually(lambda: count_rows(ledger) == 4, within_s=5, waiting_for="count_rows(ledger) == 4")
        assert writer.state == "ok" and writer.spilled_rows == 0
        writer.book(row(cost_nanos=5))  # and the writer goes on
        eventually(lambda: count_rows(ledger) == 5, waiting_for="count_rows(ledger) == 5")
    finally:
        writer.close()
    assert ledger.usage("key")[0].cost_nanos == 15
    assert metric(metrics, "gateway_ledger_rows_lost_total") == 0
    assert spill_files(spill_dir) == []


def test_entries_of_the_spill_folder_that_cannot_be_read_are_left_alone(
    ledger_and_url: tuple[Ledger, str], tmp_path: Path
) -> None:
    """Named like spill files, but not readable ones: skipped at every scan, never fatal; the real
    orphan beside them is replayed and the writer goes on."""
    ledger, _ = ledger_and_url
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    loop = spill_dir / "spill-1-loop.jsonl"
    loop.symlink_to(loop.name)  # opening it fails: too many levels of symbolic links
    (spill_dir / "spill-2-folder.jsonl").mkdir()
    os.mkfifo(spill_dir / "spill-3-fifo.jsonl")  # opening it for reading would wait for a writer
    orphan = SpillFile(spill_dir)
    orphan.append([row(cost_nanos=5)])
    orphan.release()
    writer = LedgerWriter(ledger, spill_dir=spill_dir, linger_s=0.01)
    writer.start()
    try:
        writer.book(row(cost_nanos=7))
        eventually(lambda: count_rows(ledger) == 2, waiting_for="count_rows(ledger) == 2")
        assert writer.state == "ok"
    finally:
        writer.close()
    assert ledger.usage("key")[0].cost_nanos == 12
    assert sorted(path.name for path in spill_files(spill_dir)) == [
        "spill-1-loop.jsonl",
        "spill-2-folder.jsonl",
        "spill-3-fifo.jsonl",
    ]


def test_a_sqlite_path_through_a_folder_that_became_a_file_is_noticed(tmp_path: Path) -> None:
    """stat() fails with NotADirectoryError, not FileNotFoundError: the ledger's file is not there,
    rows spill; once the folder is back, they are written."""
    folder = tmp_path / "ledgers"
    folder.mkdir()
    ledger = Ledger(f"sqlite:///{folder}/ledger.db")
    ledger.migrate()
    writer = LedgerWriter(ledger, spill_dir=tmp_path / "spill", linger_s=0.01)
    writer.start()
    try:
        writer.book(row(cost_nanos=1))
        eventually(lambda: count_rows(ledger) == 1, waiting_for="count_rows(ledger) == 1")
        folder.rename(tmp_path / "ledgers-away")
        folder.write_text("a file where the ledger's folder was")
        writer.book(row(cost_nanos=2))
        eventually(lambda: writer.spilled_rows == 1, waiting_for="writer.spilled_rows == 1")
        assert writer.state == "file_replaced"
        folder.unlink()
        (tmp_path / "ledgers-away").rename(folder)
        eventually(lambda: writer.state == "ok", within_s=5, waiting_for="writer.state == 'ok'")
        assert count_rows(ledger) == 2 and ledger.usage("key")[0].cost_nanos == 3
    finally:
        writer.close()
        ledger.close()


def test_a_spill_file_that_cannot_be_made_leaves_no_descriptor_and_no_file(tmp_path: Path) -> None:
    """Descriptors run out between opening the new file and syncing its folder: the file is removed
    and its descriptor closed, at every attempt (the writer tries again after each backoff)."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    spill = SpillFile(spill_dir)
    next_fd = os.open(os.devnull, os.O_RDONLY)
    os.close(next_fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (next_fd + 1, hard))  # room for the file, not its folder
    try:
        for _ in range(3):
            with pytest.raises(OSError, match="Too many open files"):
                spill.append([row()])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert list(spill_dir.iterdir()) == []
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(next_fd)  # closed again
    spill.append([row()])  # with descriptors to spare, it is made
    assert len(spill_files(spill_dir)) == 1 and spill.rows_waiting == 1
    spill.remove()
    assert list(spill_dir.iterdir()) == []


def faults_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "unexpected error in the writer" in r.getMessage()]


def test_an_unexpected_error_in_the_writer_is_an_outage_not_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Descriptors run out just as the database is back: the replay of the spill file cannot even
    begin (EMFILE). Logged once with its traceback, handled as an outage; once descriptors are free
    again, the spilled rows are written."""
    with ledger_database("sqlite", tmp_path) as url:
        ledger = Ledger(url)
        ledger.migrate()
        writer = LedgerWriter(ledger, spill_dir=tmp_path / "spill", linger_s=0.01, max_backoff_s=0.2)
        writer.start()
        try:
            writer.book(row(cost_nanos=1))
            eventually(lambda: count_rows(ledger) == 1, waiting_for="count_rows(ledger) == 1")
            with connect(url) as database:  # kept open throughout: closing it would free descriptors
                database.execute("ALTER TABLE requests RENAME TO requests_away")
                writer.book(row(cost_nanos=2))
                eventually(lambda: writer.spilled_rows == 1, waiting_for="writer.spilled_rows == 1")
                next_fd = os.open(os.devnull, os.O_RDONLY)
                os.close(next_fd)
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (next_fd, hard))  # no descriptor left
                try:
                    database.execute("ALTER TABLE requests_away RENAME TO requests")
                    eventually(
                        lambda: faults_logged(caplog),
                        within_s=5,
                        waiting_for="the writer's failed replay in the log",
                    )
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            eventually(lambda: writer.state == "ok", within_s=5, waiting_for="writer.state == 'ok'")
            assert count_rows(ledger) == 2 and writer.spilled_rows == 0
        finally:
            writer.close()
        [logged] = faults_logged(caplog)
        assert logged.exc_info is not None and "Too many open files" in str(logged.exc_info[1])
        ledger.close()
