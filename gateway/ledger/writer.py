"""Booking off the request path: rows go on a queue, a thread writes them to the ledger in batches.

`book()` is a non-blocking put, the only thing the request path does. The thread waits for a row,
lets more gather for `linger_s` (0.1 s: few, large transactions keep the thread's share of the
interpreter lock small, which is what keeps the event loop's latency flat), and writes them in
one transaction: a row is in the database about a tenth of a second after its request ended.

Nothing a row holds and no state of the database stops the books (SPEC §7). When a batch fails,
the error says whose fault it is:
- the database is unavailable (a lost connection, a locked SQLite file, a database shutting down:
  `_OUTAGE_ERRORS`), or the SQLite path names another file or none: rows go to this writer's spill
  file (fsync'd per batch, see `spill`) and the writer asks again, with backoff up to
  `max_backoff_s`. Once the database answers, the spill file is replayed (inserts are idempotent)
  and removed; the rows booked meanwhile are written between its batches, so a long replay never
  fills the queue.
- the rows' values (`_DATA_ERRORS`: too long, out of range, not encodable), or any other error while
  the database takes a known-good row (`Ledger.ping`): the batch is split in halves until the
  refused rows are found; everything else is written. A refused row is tried once more alone (the
  error may have been a passing one), then goes to `dead-letter.jsonl` (counted, logged at most once
  per `_LOG_INTERVAL_S`), never retried.
Spill files left by writers that are no longer running (killed, or stopped during an outage) are
replayed by whichever writer claims them: at start, when the database is back, and every
`_ORPHAN_SCAN_S`.

The thread never ends before `close()`: an unexpected error in a step (a bug, a spill file it
cannot read) is logged once and handled as an outage (rows spill, the database is asked again).
The queue holds at most `max_queued_rows`; a row booked when it is full is lost, counted and logged
(at most once per `_LOG_INTERVAL_S`). With the spill working, the queue stays near empty in an
outage too.
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

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)

from gateway.ledger.spill import ClaimedFile, DeadLetters, SpilledBatch, SpillFile, claim_orphans
from gateway.ledger.store import Ledger, LedgerRow

logger = logging.getLogger("gateway.ledger")

_STOP = object()
OK = "ok"
FAILING = "failing"  # the database does not take rows: they spill
FILE_REPLACED = "file_replaced"  # the SQLite path names another file, or none: rows spill
STOPPED = "stopped"  # the writer thread is not running

_LINGER_S = 0.1  # rows gather this long before a write (see above)
_BATCH_ROWS = 5000  # rows per transaction at most: after an outage the queue is written in bounded steps
_MAX_QUEUED_ROWS = 100_000  # as ledger.max_queued_rows' default: a bound on the rows held in memory
_CLOSE_TIMEOUT_S = 15.0  # at shutdown, writing (else spilling) what is queued may take this long
# While the database is unavailable it is asked again after a backoff that doubles from the first to
# the last of these: a recovery is noticed within 2 s, and a down database is not hammered.
_MIN_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0
# An idle writer wakes this often (and at least this much apart, when a probe of the database is due):
# to ask an unavailable database again, and to look for spill files orphaned by stopped writers.
_IDLE_WAKE_S = 0.5
_MIN_WAKE_S = 0.01
_ORPHAN_SCAN_S = 10.0  # spill files of stopped writers are looked for this often
_LOG_INTERVAL_S = 10.0  # rows lost or refused are logged at most this often (with the count since)

# The database cannot take rows now, whatever they hold: rows spill and are written later.
_OUTAGE_ERRORS = (OperationalError, InterfaceError, DisconnectionError)
# The rows' values are at fault: the database refuses them (DataError, IntegrityError), or its driver
# cannot send them (UnicodeEncodeError for a lone surrogate, OverflowError for SQLite's 2^63).
_DATA_ERRORS = (DataError, IntegrityError, ValueError, TypeError, OverflowError)


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
        max_queued_rows: int = _MAX_QUEUED_ROWS,
        batch_size: int = _BATCH_ROWS,
        linger_s: float = _LINGER_S,
        max_backoff_s: float = _MAX_BACKOFF_S,
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
        self._stopping = False  # the stop marker has been taken from the queue
        self._deadline: float | None = None
        self._spill = SpillFile(Path(spill_dir))
        self._dead_letters = DeadLetters(Path(spill_dir))
        self._file = ledger.file_identity()
        self._state = OK
        self._backoff_s = _MIN_BACKOFF_S
        self._next_probe = 0.0
        self._next_orphan_scan = 0.0
        self._fault_logged = False
        self.spill_failing = False
        self._losses = _LogThrottle(clock)  # rows lost to a full queue
        self._refusals = _LogThrottle(clock)  # rows refused, set aside in dead-letter.jsonl
        self._refusals_lost = _LogThrottle(clock)  # rows refused that dead-letter.jsonl did not take
        self._unreadable_lines = _LogThrottle(clock)  # spill files' lines that are not rows

    def start(self) -> None:
        self._file = self._ledger.file_identity()  # the file the ledger was opened (and migrated) on
        self._thread.start()

    def book(self, row: LedgerRow) -> None:
        if self._queue.qsize() + len(self._pending) < self._max_queued_rows:  # the rows in memory
            self._queue.put(row)
        else:
            self._lose(row)

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

    def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
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
            self._guarded(self._replay_orphans)
            self._loop()
        finally:
            self._let_go_of_spill_file()

    def _loop(self) -> None:
        while True:
            self._guarded(self._step)
            self._observe(lambda observer: observer.queue_depth(self.depth))
            if self._pending:  # neither the database nor the spill file took them: wait, retry
                if self._out_of_time():
                    return
                time.sleep(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
            elif self._stopping and self._queue.empty():
                return

    def _step(self) -> None:
        self._collect(block=not self._pending and not self._stopping)
        self._check_on_ledger()
        if self._pending:
            self._flush()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step; an error it did not expect (a bug, a spill file it cannot read) never ends the
        thread: it is logged once (until the ledger is caught up again) and handled as an outage."""
        try:
            step()
        except Exception:
            if not self._fault_logged:
                logger.exception(
                    "ledger: unexpected error in the writer; rows go to the spill file in %s and the "
                    "database is asked again",
                    self._spill.directory,
                )
                self._fault_logged = True
            if self._state == OK:
                self._state = FAILING
            self._next_probe = self._clock() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)

    def _out_of_time(self) -> bool:
        """Closing, and past the time `close()` allows."""
        return self._stopping and self._deadline is not None and self._clock() > self._deadline

    def _collect(self, *, block: bool, linger: bool = True) -> None:
        """Move queued rows into the pending batch, up to `batch_size`; the stop marker sets `_stopping`.
        With `block`, wait for the first row; with `linger`, let more gather after it."""
        first = True
        while len(self._pending) < self._batch_size:
            try:
                item = (
                    self._queue.get(timeout=self._wait_s()) if first and block else self._queue.get_nowait()
                )
            except queue.Empty:
                return
            if item is _STOP:
                self._stopping = True
                return
            assert isinstance(item, LedgerRow)
            self._pending.append(item)  # counted in `depth` at every moment
            if first and linger:
                # Let rows gather by sleeping, then take them all at once: waiting on the queue instead
                # would wake this thread (and take the interpreter lock from the event loop) once a row.
                time.sleep(self._linger_s)
            first = False

    def _wait_s(self) -> float:
        """How long an idle writer waits for a row: not past the next time it asks the database."""
        if self._state == OK:
            return _IDLE_WAKE_S
        return min(_IDLE_WAKE_S, max(_MIN_WAKE_S, self._next_probe - self._clock()))

    def _flush(self) -> None:
        """The pending batch to the database, else to the spill file; kept only if both fail."""
        rows = self._pending
        if self._state == OK and self._file_in_place():
            rows = self._place(rows)[1]
        if rows:
            rows = self._spill_rows(rows)
        self._pending = rows

    def _place(self, rows: list[LedgerRow], *, retried: bool = False) -> tuple[int, list[LedgerRow]]:
        """Write rows, setting aside those the database refuses. Returns how many were written, and
        the rows not tried because the database became unavailable."""
        try:
            self._ledger.insert(rows)
        except Exception as error:  # a refused row may fail in the driver: UnicodeEncodeError, OverflowError
            return self._after_failure(rows, error, retried)
        self._observe(lambda observer: observer.rows_written(rows))
        return len(rows), []

    def _after_failure(
        self, rows: list[LedgerRow], error: Exception, retried: bool
    ) -> tuple[int, list[LedgerRow]]:
        self._observe(lambda observer: observer.write_failed())
        if not self._refused(error):
            self._enter_outage(type(error).__name__)
            return 0, rows
        if len(rows) == 1 and not retried:
            return self._place(rows, retried=True)  # once more: the error may have been a passing one
        if len(rows) == 1:
            self._set_aside(rows[0], error)
            return 0, []
        half = len(rows) // 2  # the batch holds rows the database refuses: find them
        written, unplaced = self._place(rows[:half])
        if unplaced:  # unavailable meanwhile: the second half is not tried
            return written, unplaced + rows[half:]
        more, unplaced = self._place(rows[half:])
        return written + more, unplaced

    def _refused(self, error: Exception) -> bool:
        """The rows are at fault, not the database: a data error, or any error but an outage's while
        the database takes a known-good row (on the file the ledger was opened on)."""
        lost_connection = isinstance(error, DBAPIError) and error.connection_invalidated
        if lost_connection or isinstance(error, _OUTAGE_ERRORS):
            return False
        if isinstance(error, _DATA_ERRORS):
            return self._ledger.file_identity() == self._file
        return self._ledger_answers()

    def _ledger_answers(self) -> bool:
        """The database takes a known-good row now (on the file the ledger was opened on)."""
        if self._ledger.file_identity() != self._file:
            return False
        try:
            self._ledger.ping()
        except Exception:  # whatever fails, the database did not take the row
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
        self._replay_own()
        if self._state == OK:
            self._replay_orphans()
        if self._state == OK:  # caught up (an unexpected error in a replay leaves by raising)
            self._backoff_s = _MIN_BACKOFF_S
            self._fault_logged = False

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
        for batch in self._spill.batches(self._batch_size):
            if not self._replay(batch, path):
                return  # unavailable again: the rest waits for the next recovery
            self._spill.replayed(batch)
            if not self._write_booked_meanwhile():
                return
        self._remove_replayed(self._spill, path)

    def _replay_orphans(self) -> None:
        for claimed in claim_orphans(self._spill.directory, self._spill.path):
            try:
                replayed = self._replay_claimed(claimed)
                if replayed is not None:
                    self._remove_replayed(claimed, claimed.path)
                    logger.warning(
                        "ledger: replayed %d rows left in %s by a stopped writer", replayed, claimed.path
                    )
            finally:
                claimed.release()  # one not replayed whole stays, for a later recovery or another writer
            if replayed is None:
                return

    def _replay_claimed(self, claimed: ClaimedFile) -> int | None:
        """The rows of a stopped writer's file written: how many; None if the replay had to stop."""
        replayed = 0
        for batch in claimed.batches(self._batch_size):
            if not (self._replay(batch, claimed.path) and self._write_booked_meanwhile()):
                return None
            replayed += len(batch.rows)
        return replayed

    def _replay(self, batch: SpilledBatch, source: Path) -> bool:
        """Write a batch read back from a spill file; False if the database became unavailable."""
        for line in batch.unreadable:
            self._set_aside_line(line, source)
        written, unplaced = self._place(batch.rows)
        if written:
            self._observe(lambda observer: observer.rows_replayed(written))
        return not unplaced

    def _write_booked_meanwhile(self) -> bool:
        """Between two replayed batches: the rows booked meanwhile go to the database (else to the
        spill file) now, so that a long replay never fills the queue. False if the replay must stop:
        the database became unavailable, or the time `close()` allows is up."""
        self._collect(block=False, linger=False)
        if self._pending:
            self._flush()  # spills only once the database is unavailable: the replay stops then
        return self._state == OK and not self._out_of_time()

    def _remove_replayed(self, spilled: SpillFile | ClaimedFile, path: Path) -> None:
        """Delete a replayed spill file. One that cannot be deleted (its folder made read-only) is
        replayed again later, which writes nothing twice."""
        try:
            spilled.remove()
        except OSError as error:
            logger.warning(
                "ledger: cannot remove the replayed spill file %s (%s); replayed again later",
                path,
                type(error).__name__,
            )

    def _set_aside(self, row: LedgerRow, error: Exception) -> None:
        reason = type(error).__name__  # its message may quote the row: not logged
        try:
            self._dead_letters.add_row(row, reason)
        except (OSError, ValueError, TypeError) as failure:  # the file, or a value JSON cannot hold
            self._observe(lambda observer: observer.rows_lost(1))
            if lost := self._refusals_lost.count():
                logger.error(
                    "ledger: %d rows refused by the database and lost since the last report: cannot "
                    "write %s (%s); the latest: row %r (request %.200r, %s)",
                    lost,
                    self._dead_letters.path,
                    type(failure).__name__,
                    row.row_id,
                    row.request_id,
                    reason,
                )
            return
        self._observe(lambda observer: observer.rows_dead_lettered(1))
        if refused := self._refusals.count():
            logger.error(
                "ledger: %d rows refused by the database since the last report, set aside in %s; the "
                "latest: row %r (request %.200r, %s)",
                refused,
                self._dead_letters.path,
                row.row_id,
                row.request_id,
                reason,
            )

    def _set_aside_line(self, line: bytes, source: Path) -> None:
        try:
            self._dead_letters.add_line(line, source)
        except OSError as failure:
            kept = f"lost ({type(failure).__name__})"
        else:
            kept = f"set aside in {self._dead_letters.path}"
        if count := self._unreadable_lines.count():
            logger.error(
                "ledger: %d unreadable lines of spill files since the last report; the latest, of %s, %s",
                count,
                source,
                kept,
            )

    def _let_go_of_spill_file(self) -> None:
        """At stop: rows still spilled stay in the file (the next writer to start replays them)."""
        if self._spill.rows_waiting:
            logger.warning(
                "ledger: %d rows stay in %s; replayed when the ledger takes rows again",
                self._spill.rows_waiting,
                self._spill.path,
            )
            self._spill.release()
        elif self._spill.path is not None:
            self._remove_replayed(self._spill, self._spill.path)

    # --- the caller's side ---------------------------------------------------------------------------

    def _lose(self, row: LedgerRow) -> None:
        """The queue is full: the row is lost. Logged at most once per `_LOG_INTERVAL_S`, with the
        count since."""
        self._observe(lambda observer: observer.rows_lost(1))
        if lost := self._losses.count():
            logger.error(
                "ledger: queue full (%d rows): %d booked rows lost since the last report, the latest "
                "of request %.200r",
                self._max_queued_rows,
                lost,
                row.request_id,
            )

    def _observe(self, call: Callable[[WriterObserver], None]) -> None:
        """Tell the observer (the metrics); its failure (a bug, a full disk) must never stop the books."""
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            logger.exception("ledger: the metrics observer failed")


class _LogThrottle:
    """Counts events of one kind and says when to log them: the first at once, then at most once per
    `_LOG_INTERVAL_S`, with how many happened since the last line."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._unlogged = 0
        self._next_line = 0.0

    def count(self) -> int:
        """Count one event; return how many to log now (0: not yet)."""
        self._unlogged += 1
        now = self._clock()
        if now < self._next_line:
            return 0
        due, self._unlogged = self._unlogged, 0
        self._next_line = now + _LOG_INTERVAL_S
        return due
