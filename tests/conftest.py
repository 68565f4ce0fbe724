"""Shared servers: a scripted upstream, a gateway in front of it, and a gateway on its simulator; and
the in-process tier's function upstream and gateway app (tests/inprocess.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.inprocess import FunctionUpstream, InProcessGateway, in_process_gateway
from tests.scenarios import play
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

BOB_KEY = "sk-gw-bob-by-sha256"
CAROL_KEY = "sk-gw-carol-from-env"
READ_TIMEOUT_S = 1.5
MAX_BODY_BYTES = 1_048_576


@pytest.fixture(scope="session")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream(play).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway with an upstream token, in front of the scripted upstream."""
    config = gateway_config(
        upstream.base_url,
        upstream={"read_timeout_s": READ_TIMEOUT_S, "connect_timeout_s": 2},
        server={"max_body_bytes": MAX_BODY_BYTES},
        auth={
            "keys": [
                {"name": "alice", "key": CALLER_KEY},
                {"name": "bob", "key_sha256": hashlib.sha256(BOB_KEY.encode()).hexdigest()},
                {"name": "carol", "key_env": "CAROL_KEY"},
            ]
        },
    )
    env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "CAROL_KEY": CAROL_KEY}
    process = GatewayProcess(config, tmp_path_factory.mktemp("gateway"), env).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def sim_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway as a fresh install runs it: no upstream token, so the built-in simulator."""
    process = GatewayProcess(gateway_config(), tmp_path_factory.mktemp("sim")).start()
    yield process
    process.stop()


# In-process fixtures live for a module, on the module's event loop: a test module using them marks
# its tests `pytest.mark.asyncio(loop_scope="module")`.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_upstream() -> AsyncIterator[FunctionUpstream]:
    upstream = await FunctionUpstream().start()
    yield upstream
    await upstream.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_gateway(
    local_upstream: FunctionUpstream, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessGateway]:
    """The `gateway` fixture's limits and timeouts, in the test process, in front of `local_upstream`."""
    async with in_process_gateway(
        local_upstream,
        tmp_path_factory.mktemp("in-process"),
        upstream={"read_timeout_s": READ_TIMEOUT_S, "connect_timeout_s": 2},
        server={"max_body_bytes": MAX_BODY_BYTES},
    ) as gateway:
        yield gateway


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=auth_headers(), timeout=10) as http:
        yield http


def auth_headers(key: str = CALLER_KEY, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return headers


def chat(content: str = "Hello!", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}
