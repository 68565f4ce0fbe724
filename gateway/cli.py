"""The `gateway` command: a thin layer over `Config`, the app and uvicorn."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys

import click
import uvicorn

from gateway.app import create_app
from gateway.config import CONFIG_ENV, Config, ConfigError, SimulatorConfig, load_config
from gateway.simulator import start_simulator

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
@click.option(
    "--port", type=int, default=None, help="Port to bind (default: server.port; 0 picks a free one)."
)
def serve(config_path: str | None, host: str | None, port: int | None) -> None:
    """Run the gateway."""
    config = _load(config_path)
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host or config.server.host,
            port=config.server.port if port is None else port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_level=config.server.log_level,
            access_log=config.server.access_log,
            timeout_graceful_shutdown=math.ceil(config.server.shutdown_grace_s),
            server_header=False,
            proxy_headers=False,  # the gateway reads no client address: skip the per-request middleware
        )
    )
    server.run()
    if not server.started:
        sys.exit(3)


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


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as error:
        click.echo(f"gateway: {error}", err=True)
        sys.exit(2)
