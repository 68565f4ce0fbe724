"""Rows kept on local disk: spill files (the database is unavailable) and dead letters (it refused them).

Both are JSON lines in `ledger.spill_dir`, written with `ensure_ascii`: any row can be written, a
lone surrogate or a 2^70 token count included, and no line holds a raw newline, so every line ends
with the only newline in it. A line without its newline is the torn tail of a write cut by a kill:
it is skipped (its rows were never acknowledged, as rows in memory are not).

Each writer appends to its own `spill-<pid>-<random>.jsonl`, fsync'd per batch, and holds an
exclusive `flock` on it for as long as it lives. A file whose lock can be taken belongs to nobody
alive (its writer was killed, or stopped while the database was down): any writer may claim it,
replay its rows (inserts are idempotent) and delete it. A spill file is read back through the
descriptor that holds its lock, not by its path: one deleted or replaced meanwhile is still replayed
whole, and its path is deleted only if it still names that file. `dead-letter.jsonl` is shared,
appended whole lines at a time (O_APPEND), and never read by the gateway: it is for an operator.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.ledger.store import ROW_FIELDS, LedgerRow, row_values

DEAD_LETTER_FILE = "dead-letter.jsonl"
SPILL_GLOB = "spill-*.jsonl"


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


def _read_batches(fd: int, start: int, batch_size: int) -> Iterator[SpilledBatch]:
    """The rows of the spill file open as `fd`, from offset `start`, `batch_size` at a time; a torn
    last line ends it. Read through a copy of the descriptor, which shares its offset: harmless, a
    spill file is only appended to (O_APPEND) and read by the thread that holds it."""
    with os.fdopen(os.dup(fd), "rb") as file:
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

    def batches(self, batch_size: int) -> Iterator[SpilledBatch]:
        """The rows not yet replayed (none if there is no file)."""
        if self._fd is None:
            return iter(())
        return _read_batches(self._fd, self.replayed_to, batch_size)

    def replayed(self, batch: SpilledBatch) -> None:
        self.replayed_to = batch.end
        self.rows_waiting = max(0, self.rows_waiting - len(batch.rows))

    def remove(self) -> None:
        """Delete the file (every row in it is in the database), then let go of its lock. If the
        delete fails (OSError), the lock is let go all the same: the file is an orphan then."""
        try:
            if self.path is not None and self._fd is not None:
                _unlink_if_same(self.path, self._fd)
        finally:
            self.release()

    def release(self) -> None:
        """Close without deleting: a file with rows left becomes an orphan that the next writer replays."""
        if self._fd is not None:
            os.close(self._fd)
        self.path, self._fd, self._size, self.replayed_to, self.rows_waiting = None, None, 0, 0, 0

    def _create(self) -> int:
        # Made under a name no claimer looks at, locked, then renamed: nobody can claim it empty.
        # Readable too: its rows are read back through this descriptor (see the module's docstring).
        make_directory(self.directory)
        name = f"spill-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        hidden, path = self.directory / f".{name}.new", self.directory / name
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        made = hidden
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, path)
            made = path
            _fsync_directory(self.directory)  # the file's name survives a power cut too
        except OSError:
            # Each retry would otherwise leave a descriptor open and an empty file locked for good.
            with suppress(OSError):
                made.unlink()
            os.close(fd)
            raise
        self.path, self._fd, self._size = path, fd, 0
        return fd


@dataclass
class ClaimedFile:
    """A spill file of a writer no longer alive, locked by this one while it replays it."""

    path: Path
    fd: int

    def batches(self, batch_size: int) -> Iterator[SpilledBatch]:
        return _read_batches(self.fd, 0, batch_size)

    def remove(self) -> None:
        """Delete it (every row in it is in the database), then let go of it, even if the delete fails."""
        try:
            _unlink_if_same(self.path, self.fd)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of it (it stays for the next claimer); once only, whatever the caller did before."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    """The spill file at `path`, locked; None if it is not one to replay now: held by a live writer,
    removed meanwhile by another claimer, or not a readable regular file (a folder, a symlink loop,
    no read permission), which is left alone, never fatal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO there must not hang it
    except OSError:
        return None
    try:
        opened = os.fstat(fd)
        if stat.S_ISREG(opened.st_mode):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The lock is on the file opened; the path must still name it (not removed since the open).
            if os.stat(path).st_ino == opened.st_ino:
                return ClaimedFile(path, fd)
    except OSError:  # BlockingIOError: a live writer holds it; FileNotFoundError: just removed
        pass
    os.close(fd)
    return None


def _unlink_if_same(path: Path, fd: int) -> None:
    """Delete `path` if it still names the file open as `fd`, not one put there since."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return
    opened = os.fstat(fd)
    if (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino):
        path.unlink(missing_ok=True)


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
    return dict(zip(ROW_FIELDS, row_values(row), strict=True))


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
