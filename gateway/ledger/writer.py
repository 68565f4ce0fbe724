"""Booking off the request path: rows go on a queue, a thread writes them to the ledger in batches.

`book()` is a non-blocking put, the only thing the request path does. The thread waits for a row,
lets more gather for `linger_s` (0.1 s: few, large transactions keep the thread's share of the
interpreter lock small, which is what keeps the event loop's latency flat), and writes them in
one transaction: a row is in the database about a tenth of a second after its request ended.

Nothing a row holds and no state of the database stops the books (SPEC §7). When a batch fails,
the writer asks the database to take a known-good row (`Ledger.ping`):
- it does: the batch holds rows it refuses. The batch is split in halves until those rows are
  found; everything else is written, and the refused rows go to `dead-letter.jsonl` (logged once
  each, counted), never retried.
- it does not (down, unreachable, table gone), or the SQLite path names another file or none: the
  ledger is unavailable. Rows go to this writer's spill file (fsync'd per batch, see `spill`) and
  the writer asks again, with backoff up to `max_backoff_s`. Once the database answers, the spill
  file is replayed (inserts are idempotent) and removed.
Spill files left by writers that are no longer running (killed, or stopped during an outage) are
replayed by whichever writer claims them: at start, when the database is back, and every 10 s.

The queue holds at most `max_queued_rows`; a row booked when it is full is lost, counted and logged
(at most once per 10 s). With the spill working, the queue stays near empty in an outage too.
A hard kill loses what is in memory: the rows of the last `linger_s` plus one write or spill.
On close, what is queued goes to the database, else to the spill file.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from gateway.ledger.spill import DeadLetters, SpilledBatch, SpillFile, claim_orphans, read_batches
from gateway.ledger.store import Ledger, LedgerRow

logger = logging.getLogger("gateway.ledger")

_STOP = object()
OK = "ok"
FAILING = "failing"  # the database does not take rows: they spill
FILE_REPLACED = "file_replaced"  # the SQLite path names another file, or none: rows spill
STOPPED = "stopped"  # the writer thread is not running
_MIN_BACKOFF_S = 0.05
_ORPHAN_SCAN_S = 10.0
_LOSS_LOG_INTERVAL_S = 10.0


class WriterObserver(Protocol):
    """Told what happened to the rows (the metrics): from the writer thread, except `rows_lost`,
    which `book()` reports from the caller's thread."""

    def rows_written(self, rows: Sequence[LedgerRow]) -> None: ...

    def write_failed(self) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def rows_dead_lettered(self, count: int) -> None: ...

    def rows_spilled(self, count: int) -> None: ...

    def rows_replayed(self, count: int) -> None: ...

    def rows_lost(self, count: int) -> None: ...


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        *,
        spill_dir: str | Path,
        observer: WriterObserver | None = None,
        max_queued_rows: int = 100_000,
        batch_size: int = 5000,
        linger_s: float = 0.1,
        max_backoff_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._observer = observer
        self._max_queued_rows = max_queued_rows
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: list[LedgerRow] = []
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._deadline: float | None = None
        self._spill = SpillFile(Path(spill_dir))
        self._dead_letters = DeadLetters(Path(spill_dir))
        self._file = ledger.file_identity()
        self._state = OK
        self._backoff_s = _MIN_BACKOFF_S
        self._next_probe = 0.0
        self._next_orphan_scan = 0.0
        self.spill_failing = False
        self._lost_unlogged = 0
        self._next_loss_log = 0.0

    def start(self) -> None:
        self._file = self._ledger.file_identity()  # the file the ledger was opened (and migrated) on
        self._thread.start()

    def book(self, row: LedgerRow) -> None:
        if self._queue.qsize() + len(self._pending) < self._max_queued_rows:  # the rows in memory
            self._queue.put(row)
        else:
            self._lose(row)

    @property
    def alive(self) -> bool:
        """The writer thread runs (it stops only at close)."""
        return self._thread.is_alive()

    @property
    def state(self) -> str:
        """ok, failing (rows spill), file_replaced (SQLite; rows spill) or stopped."""
        return self._state if self._thread.is_alive() else STOPPED

    @property
    def depth(self) -> int:
        """Rows booked, in memory, not yet written or spilled."""
        return self._queue.qsize() + len(self._pending)

    @property
    def spilled_rows(self) -> int:
        """Rows in this writer's spill file, waiting for the database."""
        return self._spill.rows_waiting

    def close(self, timeout_s: float = 15.0) -> None:
        """Write everything queued (else spill it; retrying up to `timeout_s`), then stop the thread."""
        self._deadline = self._clock() + timeout_s
        self._queue.put(_STOP)
        self._thread.join(timeout_s + 1)
        if self.depth:
            logger.error("ledger: %d booked rows could be neither written nor spilled", self.depth)
            self._observe(lambda observer: observer.rows_lost(self.depth))

    # --- the writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._replay_orphans()
            self._loop()
        finally:
            self._let_go_of_spill_file()

    def _loop(self) -> None:
        stopping = False
        while True:
            stopping = self._collect(block=not self._pending and not stopping) or stopping
            self._check_on_ledger()
            if self._pending:
                self._flush()
            self._observe(lambda observer: observer.queue_depth(self.depth))
            if self._pending:  # neither the database nor the spill file took them: wait, retry
                if stopping and self._deadline is not None and self._clock() > self._deadline:
                    return
                time.sleep(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
            elif stopping and self._queue.empty():
                return

    def _collect(self, *, block: bool) -> bool:
        """Move queued rows into the pending batch; True once the stop marker has been taken."""
        if len(self._pending) >= self._batch_size:
            return False
        try:
            item = self._queue.get(timeout=self._wait_s()) if block else self._queue.get_nowait()
        except queue.Empty:
            return False
        if item is _STOP:
            return True
        assert isinstance(item, LedgerRow)
        self._pending.append(item)  # counted in `depth` at every moment
        # Let rows gather by sleeping, then take them all at once: waiting on the queue instead
        # would wake this thread (and take the interpreter lock from the event loop) once a row.
        time.sleep(self._linger_s)
        while len(self._pending) < self._batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            assert isinstance(item, LedgerRow)
            self._pending.append(item)
        return False

    def _wait_s(self) -> float:
        """How long an idle writer waits for a row: not past the next time it asks the database."""
        if self._state == OK:
            return 0.5
        return min(0.5, max(0.01, self._next_probe - self._clock()))

    def _flush(self) -> None:
        """The pending batch to the database, else to the spill file; kept only if both fail."""
        rows = self._pending
        if self._state == OK and self._file_in_place():
            rows = self._place(rows)[1]
        if rows:
            rows = self._spill_rows(rows)
        self._pending = rows

    def _place(self, rows: list[LedgerRow]) -> tuple[int, list[LedgerRow]]:
        """Write rows, setting aside those the database refuses. Returns how many were written, and
        the rows not tried because the database became unavailable."""
        try:
            self._ledger.insert(rows)
        except Exception as error:  # a refused row may fail in the driver: UnicodeEncodeError, OverflowError
            return self._after_failure(rows, error)
        self._observe(lambda observer: observer.rows_written(rows))
        return len(rows), []

    def _after_failure(self, rows: list[LedgerRow], error: Exception) -> tuple[int, list[LedgerRow]]:
        self._observe(lambda observer: observer.write_failed())
        if not self._ledger_answers():
            self._enter_outage(type(error).__name__)
            return 0, rows
        if len(rows) == 1:
            self._set_aside(rows[0], error)
            return 0, []
        half = len(rows) // 2  # the database answers: the batch holds rows it refuses; find them
        written, unplaced = self._place(rows[:half])
        if unplaced:  # unavailable meanwhile: the second half is not tried
            return written, unplaced + rows[half:]
        more, unplaced = self._place(rows[half:])
        return written + more, unplaced

    def _ledger_answers(self) -> bool:
        """The database takes a known-good row now (on the file the ledger was opened on)."""
        if self._ledger.file_identity() != self._file:
            return False
        try:
            self._ledger.ping()
        except SQLAlchemyError:
            return False
        return True

    def _file_in_place(self) -> bool:
        """SQLite: the path still names the ledger's file (a stat per batch). Else rows would go to a
        deleted file's inode, lost once it is closed, or into a file that is not this ledger."""
        if self._ledger.file_identity() == self._file:
            return True
        self._enter_outage("file replaced")
        return False

    def _enter_outage(self, cause: str) -> None:
        replaced = self._ledger.file_identity() != self._file
        state = FILE_REPLACED if replaced else FAILING
        if self._state != state and replaced:
            logger.error(
                "ledger: the file %s was deleted or replaced; rows go to the spill file in %s until "
                "a ledger is at that path again",
                self._ledger.sqlite_path,
                self._spill.directory,
            )
        elif self._state != state:
            logger.error(
                "ledger unavailable (%s); rows go to the spill file in %s until it is back",
                cause,
                self._spill.directory,
            )
        self._state = state
        self._backoff_s = _MIN_BACKOFF_S
        self._next_probe = self._clock() + self._backoff_s

    def _check_on_ledger(self) -> None:
        """Out of order: ask the database again when due. In order: look for orphans now and then."""
        now = self._clock()
        if self._state != OK and now >= self._next_probe:
            self._try_recover()
        elif self._state == OK and now >= self._next_orphan_scan:
            self._next_orphan_scan = now + _ORPHAN_SCAN_S
            self._replay_orphans()

    def _try_recover(self) -> None:
        if not self._ledger_is_back():
            self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
            self._next_probe = self._clock() + self._backoff_s
            return
        logger.warning("ledger writes recovered; replaying %d spilled rows", self._spill.rows_waiting)
        self._state = OK
        self._backoff_s = _MIN_BACKOFF_S
        self._replay_own()
        if self._state == OK:
            self._replay_orphans()

    def _ledger_is_back(self) -> bool:
        """The database takes rows. SQLite whose path names another file: if that file is a ledger
        (it takes a row), it is the ledger from now on; a missing file is not made anew here."""
        identity = self._ledger.file_identity()
        if identity is None or identity == self._file:
            return identity == self._file and self._ledger_answers()
        self._ledger.reopen()  # drop connections to the old file
        self._file, previous = identity, self._file
        if self._ledger_answers():
            logger.warning("ledger: %s names a ledger again; writing to it", self._ledger.sqlite_path)
            return True
        self._file = previous
        return False

    # --- spill, replay, dead letters ------------------------------------------------------------------

    def _spill_rows(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        """Append rows to the spill file; the rows it could not take."""
        try:
            self._spill.append(rows)
        except OSError as error:
            if not self.spill_failing:
                logger.error(
                    "ledger: cannot write the spill file in %s (%s); %d rows kept in memory",
                    self._spill.directory,
                    type(error).__name__,
                    len(rows),
                )
            self.spill_failing = True
            return rows
        if self.spill_failing:
            logger.warning("ledger: the spill file takes rows again")
        self.spill_failing = False
        self._observe(lambda observer: observer.rows_spilled(len(rows)))
        return []

    def _replay_own(self) -> None:
        path = self._spill.path
        if path is None:
            return
        for batch in read_batches(path, self._spill.replayed_to, self._batch_size):
            if not self._replay(batch, path):
                return  # unavailable again: the rest waits for the next recovery
            self._spill.replayed(batch)
        self._spill.remove()

    def _replay_orphans(self) -> None:
        for claimed in claim_orphans(self._spill.directory, self._spill.path):
            replayed = 0
            for batch in read_batches(claimed.path, 0, self._batch_size):
                if not self._replay(batch, claimed.path):
                    claimed.release()  # for the next recovery, or another writer
                    return
                replayed += len(batch.rows)
            claimed.remove()
            logger.warning("ledger: replayed %d rows left in %s by a stopped writer", replayed, claimed.path)

    def _replay(self, batch: SpilledBatch, source: Path) -> bool:
        """Write a batch read back from a spill file; False if the database became unavailable."""
        for line in batch.unreadable:
            self._set_aside_line(line, source)
        written, unplaced = self._place(batch.rows)
        if written:
            self._observe(lambda observer: observer.rows_replayed(written))
        return not unplaced

    def _set_aside(self, row: LedgerRow, error: Exception) -> None:
        reason = type(error).__name__  # its message may quote the row: not logged
        try:
            self._dead_letters.add_row(row, reason)
        except OSError as failure:
            logger.error(
                "ledger: row %r (request %.200r) refused by the database (%s) and lost: cannot write %s (%s)",
                row.row_id,
                row.request_id,
                reason,
                self._dead_letters.path,
                type(failure).__name__,
            )
            self._observe(lambda observer: observer.rows_lost(1))
            return
        logger.error(
            "ledger: row %r (request %.200r) refused by the database (%s); set aside in %s",
            row.row_id,
            row.request_id,
            reason,
            self._dead_letters.path,
        )
        self._observe(lambda observer: observer.rows_dead_lettered(1))

    def _set_aside_line(self, line: bytes, source: Path) -> None:
        try:
            self._dead_letters.add_line(line, source)
        except OSError as failure:
            logger.error("ledger: an unreadable line of %s is lost (%s)", source, type(failure).__name__)
            return
        logger.error("ledger: an unreadable line of %s set aside in %s", source, self._dead_letters.path)

    def _let_go_of_spill_file(self) -> None:
        """At stop: rows still spilled stay in the file (the next writer to start replays them)."""
        if self._spill.rows_waiting:
            logger.warning(
                "ledger: %d rows stay in %s; replayed when the ledger takes rows again",
                self._spill.rows_waiting,
                self._spill.path,
            )
            self._spill.release()
        else:
            self._spill.remove()

    # --- the caller's side ---------------------------------------------------------------------------

    def _lose(self, row: LedgerRow) -> None:
        """The queue is full: the row is lost. Logged at most once per 10 s, with the count since."""
        self._observe(lambda observer: observer.rows_lost(1))
        self._lost_unlogged += 1
        now = self._clock()
        if now >= self._next_loss_log:
            logger.error(
                "ledger: queue full (%d rows): %d booked rows lost since the last report, the latest "
                "of request %.200r",
                self._max_queued_rows,
                self._lost_unlogged,
                row.request_id,
            )
            self._lost_unlogged = 0
            self._next_loss_log = now + _LOSS_LOG_INTERVAL_S

    def _observe(self, call: Callable[[WriterObserver], None]) -> None:
        """Tell the observer (the metrics); its failure (a bug, a full disk) must never stop the books."""
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            logger.exception("ledger: the metrics observer failed")
