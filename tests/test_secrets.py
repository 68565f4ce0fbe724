"""Secrets from the environment: each is read the same way, and none is ever shown.

A secret put in the environment from a file (`export KEY=$(cat key.txt)` keeps no newline, but
`env_file`s, Kubernetes secrets written with `echo` and `docker run --env-file` often do) must work as
the bare value, whichever secret it is. A ledger URL's password never appears in what the gateway
prints, in any of the forms a PostgreSQL URL can carry it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main
from tests.conftest import chat
from tests.scenarios import play
from tests.servers import MODEL, GatewayProcess, ScriptedUpstream, gateway_config

UPSTREAM = "sk-upstream-from-a-file-5d1c"
ADMIN = "admin-from-a-file-9b2e"
METRICS = "metrics-from-a-file-77aa"
CALLER = "sk-gw-dora-from-a-file-0c4f"


@pytest.fixture(scope="module")
def own_upstream() -> Iterator[ScriptedUpstream]:
    """An upstream of this module's own: what it records is sent with these tests' token only."""
    server = ScriptedUpstream(play).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["\n", "\r\n"], ids=["lf", "crlf"])
def gateway_with_secrets_from_files(
    request: pytest.FixtureRequest, own_upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    upstream = own_upstream
    newline = request.param
    config = gateway_config(
        upstream.base_url,
        upstream={"token_env": "UP_TOKEN", "require_token": True},
        admin={"key_env": "ADMIN_KEY"},
        metrics={"token_env": "METRICS_TOKEN"},
        auth={"keys": [{"name": "dora", "key_env": "DORA_KEY"}]},
    )
    env = {
        "UP_TOKEN": UPSTREAM + newline,
        "ADMIN_KEY": ADMIN + newline,
        "METRICS_TOKEN": METRICS + newline,
        "DORA_KEY": CALLER + newline,
    }
    process = GatewayProcess(config, tmp_path_factory.mktemp("secrets"), env).start()
    yield process
    process.stop()


def test_every_secret_loses_its_trailing_newline(
    gateway_with_secrets_from_files: GatewayProcess, own_upstream: ScriptedUpstream
) -> None:
    gateway, upstream = gateway_with_secrets_from_files, own_upstream
    client = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=CALLER, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}]
    )
    sent = upstream.find(raw.headers["x-request-id"])
    assert [request.headers["authorization"] for request in sent] == [f"Bearer {UPSTREAM}"]

    admin = httpx.get(gateway.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    assert admin.status_code == 200
    metrics = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"})
    assert metrics.status_code == 200 and b"gateway_requests" in metrics.content
    wrong = httpx.get(gateway.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}x"})
    assert wrong.status_code == 401


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gw:s3cr3t-pw@127.0.0.1:9/ledger",
        "postgresql://gw:s3cr3t@pw@127.0.0.1:9/ledger",  # a password holding "@"
        "postgresql://gw@127.0.0.1:9/ledger?password=s3cr3t-pw",
        "postgresql://127.0.0.1:9/ledger?sslmode=disable&password=s3cr3t-pw&user=gw",
        "postgresql://127.0.0.1:9/ledger?sslmode=disable&PASSWORD=s3cr3t-pw",
    ],
)
@pytest.mark.parametrize("source", ["file", "env"])
def test_a_ledger_url_password_is_never_printed(tmp_path: Path, url: str, source: str) -> None:
    """Nothing listens on port 9: every command fails to open the ledger, and says so without the
    password, whether the URL is in the file or in the environment."""
    ledger = {"url": url} if source == "file" else {"url_env": "LEDGER_URL"}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config(ledger=ledger)))
    env = {"LEDGER_URL": url + "\n", "GATEWAY_CONFIG": ""}
    for command in (["serve"], ["usage"], ["keys", "list"]):
        result = CliRunner().invoke(main, [*command, "--config", str(path)], env=env)
        assert result.exit_code != 0, command
        assert "s3cr3t" not in result.output and "pw@" not in result.output, (command, result.output)
        assert "***" in result.output or "ledger" in result.output, (command, result.output)


def test_a_relative_sqlite_ledger_is_the_config_folders(tmp_path: Path) -> None:
    """`sqlite:///./gateway.db` means the file beside the config, from whichever folder it runs."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (config_dir / "gateway.yaml").write_text(
        yaml.safe_dump(gateway_config(ledger={"url": "sqlite:///./gateway.db"}))
    )
    gateway = GatewayProcess({}, elsewhere)
    gateway.config_path = config_dir / "gateway.yaml"
    gateway.start()
    try:
        answer = httpx.post(
            gateway.url + "/v1/openai/chat/completions",
            json=chat(),
            headers={"Authorization": "Bearer sk-gw-test-caller-7f3a9c"},
        )
        assert answer.status_code == 200
    finally:
        gateway.stop()
    assert (config_dir / "gateway.db").exists()
    assert not (elsewhere / "gateway.db").exists()
    assert not (elsewhere / "ledger-spill").exists()
