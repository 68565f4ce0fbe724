"""`gateway serve --workers N`: uvicorn's supervisor, with a listening socket of its own per worker.

uvicorn binds one socket and hands it to every worker: a new connection goes to whichever worker is
in accept() first, and a burst of them (a client's connection pool opening at once) can all land on
one worker while the others idle. Measured with wrk's 32 keep-alive connections and two workers, all
32 went to one worker in 2 runs out of 4, and two workers served no more than one. Here each worker
gets its own socket bound to the same port with SO_REUSEPORT, and the kernel spreads new
connections over the listening sockets by a hash of their addresses.

A worker ends with its supervisor, however the supervisor ended (SIGKILL included): otherwise its
workers would keep the port and serve on, unsupervised, beside the gateway started in its place. On
Linux the kernel sends the worker SIGTERM when the supervisor dies (prctl PR_SET_PDEATHSIG); elsewhere
a thread watches the worker's parent. Either way the worker shuts down as on SIGTERM: it stops
accepting, lets the requests it holds finish within `server.shutdown_grace_s`, and books them.

This extends uvicorn's private supervisor class: pyproject.toml pins uvicorn to the releases it is
tested on, and tests/test_uvicorn_contract.py checks each part of uvicorn it relies on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.app import GatewayApp, app_from_environment

logger = logging.getLogger("uvicorn.error")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Without PR_SET_PDEATHSIG a worker looks at its parent this often: it stops within about a second
# of its supervisor.
_PARENT_CHECK_S = 1.0


def worker_app_factory() -> Any:
    """The app factory for `uvicorn.Config(factory=True)`: picklable, it carries the supervisor's pid
    to each worker, where it runs as the worker loads its app."""
    return functools.partial(worker_app, supervisor_pid=os.getpid())


def worker_app(supervisor_pid: int) -> GatewayApp:
    end_with_supervisor(supervisor_pid)
    return app_from_environment()


def end_with_supervisor(supervisor_pid: int) -> None:
    """Have SIGTERM sent to this process when its parent, the supervisor, ends."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != supervisor_pid:  # it died before prctl took effect: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
    else:
        threading.Thread(target=_watch_parent, args=(supervisor_pid,), daemon=True).start()


def _watch_parent(supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:  # an orphan is adopted by another process
        time.sleep(_PARENT_CHECK_S)
    os.kill(os.getpid(), signal.SIGTERM)


class OneSocketPerWorker(Multiprocess):
    """uvicorn's `Multiprocess` (starting, restarting and stopping workers, signals), except that
    every read of `self.sockets`, which it does once for each worker it starts, binds a new socket:
    each worker, first or replacement, listens on a socket of its own. A worker's socket closes when
    uvicorn drops the dead worker it belonged to.

    It also tells prometheus_client when a worker has gone (died and replaced, or retired by SIGHUP
    or SIGTTOU): otherwise the gauges a dead worker left in the metrics directory, such as the
    streams it was relaying when it died, would count in /metrics for as long as the server runs."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._port_holder = _reuse_port_socket(config.host, config.port)  # keeps the port ours
        self._address = (config.host, self._port_holder.getsockname()[1])
        logger.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", *self._address)
        self._worker_pids: set[int] = set()
        super().__init__(config, sockets=[])

    @property
    def sockets(self) -> list[socket.socket]:
        sock = _reuse_port_socket(*self._address)
        sock.set_inheritable(True)
        return [sock]

    @sockets.setter
    def sockets(self, value: list[socket.socket]) -> None:
        """uvicorn's __init__ stores the one socket it would share; there is none to store."""

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._port_holder.close()

    # uvicorn's supervisor loop replaces dead workers in keep_subprocess_alive and retires workers
    # in the signal handlers: after either, whichever pid is gone is marked dead.
    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone_workers()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_gone_workers()

    def _forget_gone_workers(self) -> None:
        pids = {process.pid for process in self.processes if process.pid is not None}
        for pid in self._worker_pids - pids:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        self._worker_pids = pids


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other sockets may bind too (SO_REUSEPORT), not listening
    yet: a worker's server starts listening on it. Port 0 binds a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
