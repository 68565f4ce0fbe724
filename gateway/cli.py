"""The `gateway` command: a thin layer over `Config`, the app and uvicorn."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
import uvicorn
from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from gateway.admin import valid_key_name
from gateway.app import LedgerUnreachable, create_app, open_ledger
from gateway.config import (
    CONFIG_ENV,
    METRICS_DIR_ENV,
    Config,
    ConfigError,
    SimulatorConfig,
    load_config,
    redact_url,
)
from gateway.errors import InvalidRequest
from gateway.http_guard import guarded_protocol
from gateway.ledger.schema import metadata
from gateway.ledger.store import GROUPS, KeyNameTaken, KeyNotFound, Ledger
from gateway.reports import FORMATS, as_csv, as_json, as_table, usage_query
from gateway.simulator import start_simulator
from gateway.workers import OneSocketPerWorker, worker_app_factory

# Descriptors a worker needs besides its caller and upstream sockets: listening socket, ledger
# connections, spill and metrics files, logs, the event loop's own.
RESERVED_FILES = 64
# The open-files limit taken for "unlimited": macOS refuses RLIM_INFINITY as a soft limit, and
# Linux's default ceiling (fs.nr_open) is this.
_UNLIMITED_FILES = 1_048_576
# server.max_connections' default where there is no open-files limit to derive it from (not POSIX).
_CONNECTIONS_WITHOUT_FILE_LIMIT = 10_000

config_option = click.option(
    "--config",
    "config_path",
    envvar=CONFIG_ENV,
    type=click.Path(dir_okay=False),
    help=f"YAML config file (default: ${CONFIG_ENV}).",
)


@click.group()
@click.version_option(package_name="gateway")
def main() -> None:
    """An OpenAI-compatible gateway in front of DeepInfra."""


@main.command()
@config_option
@click.option("--host", default=None, help="Address to bind (default: server.host).")
@click.option("--port", type=int, default=None, help="Port to bind (default: server.port; 0: a free one).")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes (default: server.workers)."
)
def serve(config_path: str | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the gateway."""
    config = _load(config_path)
    with _ledger(config):  # an unreachable ledger stops the start here, with a clear message
        pass
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )
    raise_open_files_limit()
    workers = workers or config.server.workers
    settings: dict[str, Any] = {
        "host": host or config.server.host,
        "port": config.server.port if port is None else port,
        "loop": config.server.loop,
        "http": _http_protocol(config),
        "lifespan": "on",
        "log_level": config.server.log_level,
        "access_log": config.server.access_log,
        "timeout_graceful_shutdown": math.ceil(config.server.shutdown_grace_s),
        "server_header": False,
        "proxy_headers": False,  # the gateway reads no client address: skip the per-request middleware
    }
    if workers > 1:
        # Each worker process builds its own app from the same file (named in the environment), and
        # keeps its metrics in files of a directory of this run, which /metrics on any worker adds up.
        assert config_path is not None  # _load succeeded: click took it from --config or $GATEWAY_CONFIG
        os.environ[CONFIG_ENV] = os.path.abspath(config_path)
        with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as metrics_dir:
            os.environ[METRICS_DIR_ENV] = metrics_dir  # read by prometheus_client as a worker imports it
            factory = worker_app_factory()  # each worker's app ends with this process, however it ends
            OneSocketPerWorker(uvicorn.Config(factory, factory=True, workers=workers, **settings)).run()
        return
    server = uvicorn.Server(uvicorn.Config(create_app(config), **settings))
    server.run()
    if not server.started:
        sys.exit(3)


def _http_protocol(config: Config) -> Any:
    """httptools with the gateway's limits on request heads, slow clients and connections
    (gateway/http_guard.py); h11 as uvicorn has it, without them."""
    log = logging.getLogger("gateway")
    if config.server.http == "h11":
        log.warning(
            "server.http is h11: caller connections are not capped (server.max_connections is not "
            "enforced), nor are request heads or slow clients (server.client_timeout_s)"
        )
        return "h11"
    max_connections = config.server.max_connections or connections_for_open_files()
    log.info(
        "at most %d caller connections open at once per worker (server.max_connections)", max_connections
    )
    return guarded_protocol(config.server.client_timeout_s, max_connections)


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one (workers inherit it). Each stream holds two
    sockets, the caller's and upstream's: at the usual soft limit of 1,024, the 512th concurrent
    stream would fail with "too many open files" on a machine that allows far more."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            logging.getLogger("gateway").warning("could not raise the open-files limit: %s", error)


def connections_for_open_files() -> int:
    """The default of `server.max_connections`: half of the open-files limit left after
    `RESERVED_FILES`, since a stream holds two descriptors, the caller's socket and upstream's."""
    try:
        import resource  # POSIX only
    except ImportError:
        return _CONNECTIONS_WITHOUT_FILE_LIMIT
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = _UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft
    return max(1, (soft - RESERVED_FILES) // 2)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8001, show_default=True)
@click.option(
    "--latency-ms",
    type=float,
    default=SimulatorConfig().latency_ms,
    show_default=True,
    help="Delay before the first token.",
)
@click.option(
    "--tokens-per-s",
    type=float,
    default=SimulatorConfig().tokens_per_s,
    show_default=True,
    help="Generation speed; 0 sends every token at once.",
)
@click.option(
    "--reply-tokens",
    type=int,
    default=SimulatorConfig().reply_tokens,
    show_default=True,
    help="Length of each reply (capped by the request's max_tokens).",
)
@click.option(
    "--usage-style",
    type=click.Choice(["deepinfra", "openai"]),
    default="deepinfra",
    show_default=True,
    help="deepinfra: usage on the last content chunk; openai: a separate chunk, when asked.",
)
def simulate(
    host: str, port: int, latency_ms: float, tokens_per_s: float, reply_tokens: int, usage_style: str
) -> None:
    """Run the built-in upstream simulator (a fake DeepInfra) on its own."""
    try:
        settings = SimulatorConfig.model_validate(
            {
                "latency_ms": latency_ms,
                "tokens_per_s": tokens_per_s,
                "reply_tokens": reply_tokens,
                "usage_style": usage_style,
            }
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    asyncio.run(_run_simulator(settings, host, port))


async def _run_simulator(settings: SimulatorConfig, host: str, port: int) -> None:
    simulator = await start_simulator(settings, Config().models, host, port)
    click.echo(f"simulator: serving {simulator.base_url}/chat/completions (Ctrl-C stops)", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await simulator.stop()


@main.command()
@config_option
@click.option("--group-by", type=click.Choice(GROUPS), default="user", show_default=True)
@click.option(
    "--since", default=None, help="ISO 8601 date or time (UTC unless an offset is given), inclusive."
)
@click.option("--until", default=None, help="ISO 8601 date or time, exclusive.")
@click.option("--format", "output", type=click.Choice(FORMATS), default="table", show_default=True)
def usage(config_path: str | None, group_by: str, since: str | None, until: str | None, output: str) -> None:
    """Print who spent what: totals per user, key, model or day (the same as GET /admin/usage)."""
    try:
        query = usage_query(group_by, since, until)
    except InvalidRequest as error:
        raise click.BadParameter(
            error.message, param_hint=f"--{(error.param or '').replace('_', '-')}"
        ) from None
    with _existing_ledger(_load(config_path)) as ledger:
        totals = ledger.usage(query.group_by, query.since_us, query.until_us)
    if output == "json":
        click.echo(as_json(query.group_by, totals).decode())
    elif output == "csv":
        click.echo(as_csv(query.group_by, totals), nl=False)
    else:
        click.echo(as_table(query.group_by, totals), nl=False)


@main.group()
def keys() -> None:
    """Issue, list and revoke gateway keys (kept in the ledger database)."""


@keys.command("create")
@config_option
@click.argument("name")
def keys_create(config_path: str | None, name: str) -> None:
    """Issue a key for NAME and print it (the only time it is shown)."""
    try:
        valid_key_name(name)  # the admin API's check
    except InvalidRequest as error:
        raise click.BadParameter(error.message, param_hint="NAME") from None
    config = _load(config_path)
    if name in {key.name for key in config.auth.keys}:
        raise click.ClickException(f"a key named {name!r} is defined in the config file")
    try:
        with _ledger(config) as ledger:
            click.echo(ledger.create_key(name))
    except KeyNameTaken:
        raise click.ClickException(
            f"a key named {name!r} exists or was revoked; names are never reused"
        ) from None


@keys.command("list")
@config_option
def keys_list(config_path: str | None) -> None:
    """List keys (never the keys themselves)."""
    config = _load(config_path)
    for static in config.auth.keys:
        click.echo(f"{static.name}\tconfig")
    with _existing_ledger(config) as ledger:
        issued = ledger.list_keys()
    for key in issued:
        state = "revoked" if key.revoked_us is not None else "active"
        click.echo(f"{key.name}\tissued\t{state}")


@keys.command("revoke")
@config_option
@click.argument("name")
def keys_revoke(config_path: str | None, name: str) -> None:
    """Revoke the issued key NAME: every gateway rejects it within a second."""
    try:
        with _existing_ledger(_load(config_path)) as ledger:
            ledger.revoke_key(name)
    except KeyNotFound:
        raise click.ClickException(f"no issued key is named {name!r}") from None
    click.echo(f"revoked {name}")


@contextmanager
def _ledger(config: Config) -> Iterator[Ledger]:
    """The ledger, migrated; an unreachable one ends the command with a clear message (exit 4)."""
    ledger = Ledger(config.ledger.url)
    try:
        try:
            open_ledger(ledger, config.ledger.url)
        except LedgerUnreachable as error:
            click.echo(f"gateway: {error}", err=True)
            sys.exit(4)
        yield ledger
    finally:
        ledger.close()


@contextmanager
def _existing_ledger(config: Config) -> Iterator[Ledger]:
    """The ledger as it is, for commands that only read it (or change a row of it): never created,
    never migrated. One that is not there ends the command with a clear message (exit 4)."""
    ledger = Ledger(config.ledger.url)
    try:
        if ledger.sqlite_path is not None and not ledger.sqlite_path.exists():
            _no_ledger(f"no ledger file at {ledger.sqlite_path} (ledger.url)")
        try:
            tables = set(inspect(ledger.engine).get_table_names())
        except SQLAlchemyError as error:
            _no_ledger(f"cannot open the ledger at {redact_url(config.ledger.url)} ({type(error).__name__})")
        if not tables >= set(metadata.tables):
            _no_ledger(f"the ledger at {redact_url(config.ledger.url)} lacks the gateway's tables")
        yield ledger
    finally:
        ledger.close()


def _no_ledger(problem: str) -> NoReturn:
    click.echo(f"gateway: {problem}: `gateway serve` creates (or upgrades) it", err=True)
    sys.exit(4)


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as error:
        click.echo(f"gateway: {error}", err=True)
        sys.exit(2)
