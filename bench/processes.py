"""Starting and stopping the benchmark's server processes, so that none is left behind.

Each process runs in its own process group (session), with its output in a log file. `running()`
is a context manager: it waits until the process answers its readiness URL, and on the way out,
whatever happened, it sends SIGTERM to the whole group, then SIGKILL if the group lingers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0


class StartFailed(RuntimeError):
    """A process exited or did not become ready; the message ends with its log."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(
    argv: list[str],
    ready_url: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` until the with-block ends; yield once `ready_url` answers 200."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        _wait_ready(process, ready_url, log_path)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL if it is still there after `STOP_GRACE_S`."""
    _signal_group(process, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    _signal_group(process, signal.SIGKILL)  # and any child the leader left behind
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartFailed(f"{process.args!r} exited with {process.returncode}:\n{_tail(log_path)}")
        if _answers_200(url):
            return
        time.sleep(0.05)
    raise StartFailed(f"{process.args!r} not ready at {url} after {READY_TIMEOUT_S:g} s:\n{_tail(log_path)}")


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (a server and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except OSError:
            continue  # it exited while we looked
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def cpu_seconds(pgid: int) -> float:
    """User + system CPU time used so far by the live processes of a group."""
    ticks = 0
    for pid in group_pids(pgid):
        with suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pgid: int) -> int:
    """Resident memory of the live processes of a group, summed."""
    total = 0
    for pid in group_pids(pgid):
        with suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ..., utime (11), stime (12), ...]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()
