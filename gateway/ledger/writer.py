"""Booking off the request path: rows go on a queue, a thread writes them to the ledger in batches.

`book()` is a non-blocking put, the only thing the request path does. The thread waits for a row,
lets more gather for `linger_s` (0.1 s: few, large transactions keep the thread's share of the
interpreter lock small, which is what keeps the event loop's latency flat), and writes them in
one transaction: a row is in the database about a tenth of a second after its request ended. If
the database fails, the rows stay queued and the thread retries with backoff, reporting the
failure in `/readyz` and the logs. On close the queue is flushed. A hard kill loses what is still
queued: at most the rows of the last `linger_s` plus one write.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.ledger.store import Ledger, LedgerRow

logger = logging.getLogger("gateway.ledger")

_STOP = object()


class WriterObserver(Protocol):
    """Told, from the writer thread, what happened to the rows (the metrics)."""

    def rows_written(self, rows: Sequence[LedgerRow]) -> None: ...

    def write_failed(self) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        *,
        observer: WriterObserver | None = None,
        batch_size: int = 5000,
        linger_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._ledger = ledger
        self._observer = observer
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._max_backoff_s = max_backoff_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: list[LedgerRow] = []
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._deadline: float | None = None
        self.failing = False
        self.write_errors = 0

    def start(self) -> None:
        self._thread.start()

    def book(self, row: LedgerRow) -> None:
        self._queue.put(row)

    @property
    def alive(self) -> bool:
        """The writer thread runs (it stops only at close)."""
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Rows booked but not yet written."""
        return self._queue.qsize() + len(self._pending)

    def close(self, timeout_s: float = 15.0) -> None:
        """Write everything queued (retrying up to `timeout_s`), then stop the thread."""
        self._deadline = time.monotonic() + timeout_s
        self._queue.put(_STOP)
        self._thread.join(timeout_s + 1)
        if self.depth:
            logger.error("ledger: %d booked rows could not be written before shutdown", self.depth)

    def _run(self) -> None:
        stopping = False
        backoff = 0.05
        while True:
            stopping = self._collect(block=not self._pending and not stopping) or stopping
            self._observe(lambda observer: observer.queue_depth(self.depth))
            if self._pending:
                if self._write():
                    backoff = 0.05
                elif stopping and self._deadline is not None and time.monotonic() > self._deadline:
                    return
                else:
                    time.sleep(backoff)  # the database is down: wait before the retry
                    backoff = min(backoff * 2, self._max_backoff_s)
            if stopping and not self._pending and self._queue.empty():
                return

    def _collect(self, *, block: bool) -> bool:
        """Move queued rows into the pending batch; True once the stop marker has been taken."""
        try:
            item = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
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

    def _write(self) -> bool:
        try:
            self._ledger.insert(self._pending)
        except Exception as error:  # any database failure: keep the rows, retry, say so
            self.write_errors += 1
            self._observe(lambda observer: observer.write_failed())
            if not self.failing:
                logger.error(
                    "ledger write failed (%s); %d rows kept queued, retrying",
                    type(error).__name__,
                    self.depth,
                )
            self.failing = True
            return False
        if self.failing:
            logger.warning("ledger writes recovered; %d rows written", len(self._pending))
        self.failing = False
        written, self._pending = self._pending, []
        self._observe(lambda observer: observer.rows_written(written))
        self._observe(lambda observer: observer.queue_depth(self.depth))
        return True

    def _observe(self, call: Callable[[WriterObserver], None]) -> None:
        """Tell the observer (the metrics); its failure (a bug, a full disk) must never stop the books."""
        if self._observer is None:
            return
        try:
            call(self._observer)
        except Exception:
            logger.exception("ledger: the metrics observer failed")
