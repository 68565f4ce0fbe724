"""Rows kept on local disk: spill files (the database is unavailable) and dead letters (it refused them).

Both are JSON lines in `ledger.spill_dir`, written with `ensure_ascii`: any row can be written, a
lone surrogate or a 2^70 token count included, and no line holds a raw newline, so every line ends
with the only newline in it. A line without its newline is the torn tail of a write cut by a kill:
it is skipped (its rows were never acknowledged, as rows in memory are not).

Each writer appends to its own `spill-<pid>-<random>.jsonl`, fsync'd per batch, and holds an
exclusive `flock` on it for as long as it lives. A file whose lock can be taken belongs to nobody
alive (its writer was killed, or stopped while the database was down): any writer may claim it,
replay its rows (inserts are idempotent) and delete it. `dead-letter.jsonl` is shared, appended
whole lines at a time (O_APPEND), and never read by the gateway: it is for an operator.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gateway.ledger.store import LedgerRow

DEAD_LETTER_FILE = "dead-letter.jsonl"
SPILL_GLOB = "spill-*.jsonl"
_ROW_FIELDS = tuple(field.name for field in fields(LedgerRow))


def encode_row(row: LedgerRow) -> bytes:
    return _json_line(_row_dict(row))


def decode_row(line: bytes) -> LedgerRow:
    """A row from one complete line; ValueError or TypeError if it is not one."""
    values = json.loads(line)
    if not isinstance(values, dict):
        raise TypeError("not an object")
    return LedgerRow(**values)


@dataclass
class SpilledBatch:
    rows: list[LedgerRow]
    end: int  # the offset just past the batch's last line
    unreadable: list[bytes]  # complete lines that are not rows (never written by this version)


def read_batches(path: Path, start: int, batch_size: int) -> Iterator[SpilledBatch]:
    """The rows of a spill file from offset `start`, `batch_size` at a time; a torn last line ends it."""
    with path.open("rb") as file:
        file.seek(start)
        batch = SpilledBatch([], start, [])
        for line in file:
            if not line.endswith(b"\n"):
                break  # the torn tail of a write cut short: never acknowledged
            try:
                batch.rows.append(decode_row(line))
            except (ValueError, TypeError):
                batch.unreadable.append(line)
            batch.end += len(line)
            if len(batch.rows) >= batch_size:
                yield batch
                batch = SpilledBatch([], batch.end, [])
        if batch.rows or batch.unreadable:
            yield batch


class SpillFile:
    """This writer's spill file: made on first use, locked while this writer lives, removed once replayed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self.replayed_to = 0  # the rows before this offset are in the database
        self.rows_waiting = 0  # rows appended and not yet replayed

    def append(self, rows: Sequence[LedgerRow]) -> None:
        """Append rows and fsync; on failure (OSError) the file is as it was before."""
        fd = self._fd if self._fd is not None else self._create()
        data = b"".join(encode_row(row) for row in rows)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, self._size)  # no half line for the next append to land behind
            raise
        self._size += len(data)
        self.rows_waiting += len(rows)

    def replayed(self, batch: SpilledBatch) -> None:
        self.replayed_to = batch.end
        self.rows_waiting = max(0, self.rows_waiting - len(batch.rows))

    def remove(self) -> None:
        """Delete the file (every row in it is in the database), then let go of its lock."""
        if self.path is not None and self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
        self.path, self._fd, self._size, self.replayed_to, self.rows_waiting = None, None, 0, 0, 0

    def release(self) -> None:
        """Close without deleting: a file with rows left becomes an orphan that the next writer replays."""
        if self._fd is not None:
            os.close(self._fd)
        self.path, self._fd, self._size, self.replayed_to, self.rows_waiting = None, None, 0, 0, 0

    def _create(self) -> int:
        # Made under a name no claimer looks at, locked, then renamed: nobody can claim it empty.
        make_directory(self.directory)
        name = f"spill-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        hidden = self.directory / f".{name}.new"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, self.directory / name)
        _fsync_directory(self.directory)  # the file's name survives a power cut too
        self.path, self._fd, self._size = self.directory / name, fd, 0
        return fd


@dataclass
class ClaimedFile:
    """A spill file of a writer no longer alive, locked by this one while it replays it."""

    path: Path
    fd: int

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    def release(self) -> None:
        os.close(self.fd)


def claim_orphans(directory: Path, own: Path | None) -> Iterator[ClaimedFile]:
    """Spill files nobody holds, each locked before it is yielded. The caller removes or releases it."""
    try:
        paths = sorted(directory.glob(SPILL_GLOB))
    except OSError:
        return
    for path in paths:
        if path != own:
            claimed = _try_claim(path)
            if claimed is not None:
                yield claimed


def _try_claim(path: Path) -> ClaimedFile | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another writer replayed and removed it meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The lock is on the file opened; the path must still name it (not removed since the open).
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return ClaimedFile(path, fd)
    except OSError:  # BlockingIOError: a live writer holds it; FileNotFoundError: just removed
        pass
    os.close(fd)
    return None


def spilled_files(directory: Path) -> int:
    """How many spill files the folder holds (this writer's, other live writers', orphans)."""
    try:
        return sum(1 for _ in directory.glob(SPILL_GLOB))
    except OSError:
        return 0


class DeadLetters:
    """`dead-letter.jsonl`: rows the database refused, one JSON line each, never retried."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DEAD_LETTER_FILE

    def add_row(self, row: LedgerRow, error: str) -> None:
        self._append({"at_us": _now_us(), "error": error, "row": _row_dict(row)})

    def add_line(self, line: bytes, source: Path) -> None:
        """A spill file's line that is not a row: kept as text for an operator to look at."""
        text = line.decode("utf-8", "surrogateescape").rstrip("\n")
        self._append({"at_us": _now_us(), "error": "unreadable", "file": source.name, "line": text})

    def _append(self, entry: dict[str, Any]) -> None:
        make_directory(self.path.parent)
        line = _json_line(entry)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _row_dict(row: LedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _ROW_FIELDS}


def _json_line(value: dict[str, Any]) -> bytes:
    """One line whatever the value holds: ASCII only (a lone surrogate becomes \\udc80), no raw newline."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def make_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_us() -> int:
    return time.time_ns() // 1000
