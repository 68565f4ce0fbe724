"""The `gateway` command: config errors stop `serve` at once naming the key; `simulate` serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect

from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config
from gateway.ledger.store import sqlalchemy_url
from tests.conftest import auth_headers
from tests.ledgers import BACKENDS, POSTGRES, ledger_database
from tests.servers import MODEL, GatewayProcess, gateway_config

EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"


def serve_with(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = CliRunner().invoke(main, ["serve", "--config", str(config)], env=env or {})
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("server:\n  prot: 8000\n", "server.prot: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("upstream:\n  read_timeout_s: soon\n", "upstream.read_timeout_s"),
        ("upstream:\n  connect_timeout_s: -1\n", "upstream.connect_timeout_s"),
        ("upstream:\n  base_url: api.deepinfra.com\n", "upstream.base_url"),
        ("server:\n  max_body_bytes: [1]\n", "server.max_body_bytes"),
        ("models: []\n", "models"),
        ("models:\n  - name: m\n    input_usd_per_mtok: 1\n", "models[0].output_usd_per_mtok"),
        ("auth:\n  keys:\n    - name: a\n", "auth.keys[0]"),
        ("auth:\n  keys:\n    - {name: a, key: k1}\n    - {name: a, key: k2}\n", "auth.keys"),
        ("auth:\n  keys:\n    - {name: a, key_env: NOT_SET_ANYWHERE}\n", "auth.keys[0].key_env"),
        ("auth:\n  keys:\n    - {name: a, key_sha256: abc}\n", "auth.keys[0]"),
        ("upstream:\n  require_token: true\n", "upstream.token_env"),
        ("ledger:\n  url_env: NO_SUCH_LEDGER_VAR\n", "ledger.url_env"),
        ("secrets: {}\n", "secrets: unknown key"),
        ("- just\n- a list\n", "mapping"),
        ("server: [\n", "not valid YAML"),
        ("server:\n  port: true\n", "server.port: Input should be a valid integer"),
        ("server:\n  max_body_bytes: true\n", "server.max_body_bytes"),
        ("upstream:\n  require_token: 0\n", "upstream.require_token"),
        ("upstream:\n  require_token: 'no'\n", "upstream.require_token"),
        ("simulator:\n  latency_ms: true\n", "simulator.latency_ms"),
        ("ledger:\n  url: mysql://u@h/db\n", "ledger.url: Value error, must start with sqlite:///"),
        ("ledger:\n  url: notaurl\n", "ledger.url"),
        ("models:\n  - {name: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1, x: 1}\n", "models[0].x"),
    ],
)
def test_config_errors_stop_serve_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    code, output = serve_with(tmp_path, text)
    assert code == 2
    assert named in output
    assert "Uvicorn running" not in output


def test_config_errors_never_echo_a_key(tmp_path: Path) -> None:
    code, output = serve_with(tmp_path, "auth:\n  keys:\n    - {name: a, key: [sk-gw-secret-value]}\n")
    assert code == 2 and "auth.keys[0].key" in output
    assert "sk-gw-secret-value" not in output


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('auth: {keys: [{name: alice, key: "sk-gw-secret-value}', "not valid YAML"),  # PyYAML quotes lines
        ("upstream:\n  base_url: https://user:sk-gw-secret-value@api.deepinfra.com\n", "upstream.base_url"),
    ],
)
def test_config_errors_never_quote_a_secret(tmp_path: Path, text: str, named: str) -> None:
    code, output = serve_with(tmp_path, text)
    assert code == 2 and named in output
    assert "sk-gw-secret-value" not in output


def test_config_errors_say_one_thing_once_and_never_echo_a_database_password(tmp_path: Path) -> None:
    code, output = serve_with(tmp_path, "ledger:\n  url: mysql://gw:hunter2@db/ledger\n")
    assert code == 2 and "ledger.url" in output and "hunter2" not in output
    assert "Traceback" not in output
    code, output = serve_with(
        tmp_path, "models:\n  - {name: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1, x: 1}\n"
    )
    assert output.count(";") == 0 and "models[0].x: unknown key" in output  # no "at least 1 item" echo


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve"], env={"GATEWAY_CONFIG": ""})
    assert result.exit_code == 2 and "--config" in result.output
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "cannot read config file" in result.output


def test_the_example_config_is_valid_and_documents_the_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.uses_simulator
    assert config.upstream.base_url == "https://api.deepinfra.com/v1/openai"
    assert config.upstream.read_timeout_s == 600 and config.server.max_body_bytes == 20_971_520
    assert config.models[0].input_usd_per_mtok == Decimal("0.049")
    # Every key of the typed config appears in the example file.
    text = EXAMPLE.read_text()
    for section_name, section in parse_config("{}", {}).model_dump(exclude={"models", "auth"}).items():
        assert f"\n{section_name}:" in text
        for key in section:
            assert re.search(rf"^\s+{key}:", text, re.MULTILINE), f"{section_name}.{key} is not documented"


def test_ledger_url_from_env(tmp_path: Path) -> None:
    config = parse_config("ledger:\n  url_env: LEDGER\n", {"LEDGER": "postgresql://u:pw@db:5432/x"})
    assert config.ledger.url == "postgresql://u:pw@db:5432/x"


def test_config_from_env_var_and_token_from_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  token_env: MY_TOKEN\n  require_token: true\n")
    config = load_config(None, environ={"GATEWAY_CONFIG": str(path), "MY_TOKEN": "sk-upstream-xyzzy"})
    assert not config.uses_simulator
    assert config.secrets.upstream_token is not None
    assert "sk-upstream-xyzzy" not in repr(config)
    with pytest.raises(ConfigError, match="MY_TOKEN is not set"):
        load_config(path, environ={})


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    command = [sys.executable, "-m", "gateway", "simulate", "--port", "0", "--latency-ms", "0",
               "--tokens-per-s", "0", "--reply-tokens", "5", "--usage-style", "openai"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    url = ""
    for line in process.stderr:
        if (match := re.search(r"http://127\.0\.0\.1:(\d+)", line)) and match.group(1) != "0":
            url = f"http://127.0.0.1:{match.group(1)}/v1/openai"
            break
    yield url
    process.terminate()
    process.wait(10)
    process.stderr.close()


def test_simulate_serves_deepinfra_shaped_answers(simulator: str) -> None:
    client = openai.OpenAI(base_url=simulator, api_key="anything", max_retries=0)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.usage.model_extra is not None and completion.usage.model_extra["estimated_cost"] > 0

    plain = list(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True)
    )
    assert all(chunk.usage is None for chunk in plain)  # openai style: usage only when asked
    asked = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens == 5


def test_usage_from_another_folder_reads_the_ledger_serve_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///./ledger.db` names a file beside the config file, wherever a command runs."""
    gateway = GatewayProcess(gateway_config(ledger={"url": "sqlite:///./ledger.db"}), tmp_path).start()
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "user": "u-relative"}
        answer = httpx.post(gateway.url + "/v1/openai/chat/completions", json=body, headers=auth_headers())
        assert answer.status_code == 200
    finally:
        gateway.stop()  # a graceful stop writes every row
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["usage", "--config", str(gateway.config_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [row["user"] for row in json.loads(result.output)["data"]] == ["u-relative"]
    assert list(elsewhere.iterdir()) == []


READ_COMMANDS = [["usage"], ["keys", "list"], ["keys", "revoke", "someone"]]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_commands_that_read_never_create_a_ledger_file(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("ledger:\n  url: sqlite:///./absent.db\n")
    result = CliRunner().invoke(main, [*command, "--config", str(config)])
    assert result.exit_code == 4
    assert f"no ledger file at {tmp_path / 'absent.db'}" in result.output
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_commands_that_read_never_create_tables(tmp_path: Path, backend: str, command: list[str]) -> None:
    with ledger_database(backend, tmp_path) as url:
        if backend == "sqlite":
            Path(url.removeprefix("sqlite:///")).touch()  # a file, but no ledger in it
        config = tmp_path / "config.yaml"
        config.write_text(f"ledger:\n  url: {url}\n")
        result = CliRunner().invoke(main, [*command, "--config", str(config)])
        assert result.exit_code == 4
        assert "lacks the gateway's tables" in result.output and "gateway serve" in result.output
        engine = create_engine(sqlalchemy_url(url))
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()


def test_a_ledger_that_cannot_be_opened_is_named_without_its_password(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"ledger:\n  url: {POSTGRES.replace('//postgres@', '//postgres:hunter2@')}/gw_absent\n")
    result = CliRunner().invoke(main, ["usage", "--config", str(config)])
    assert result.exit_code == 4 and "cannot open the ledger at postgresql://postgres:***@" in result.output
    assert "hunter2" not in result.output


def test_names_longer_than_the_ledgers_columns_are_config_errors_naming_the_field() -> None:
    """A model's name is booked in a 500-character column, a static key's in a 200-character one."""

    def config(model: str, key: str) -> str:
        return (
            f"models:\n  - {{name: {model}, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}\n"
            f"auth:\n  keys:\n    - {{name: {key}, key: sk-gw-k}}\n"
        )

    parsed = parse_config(config("m" * 500, "k" * 200), {})
    assert len(parsed.models[0].name) == 500 and len(parsed.auth.keys[0].name) == 200
    with pytest.raises(ConfigError, match=r"models\[0\]\.name: String should have at most 500 characters"):
        parse_config(config("m" * 501, "k"), {})
    too_long = r"auth\.keys\[0\]\.name: String should have at most 200 characters"
    with pytest.raises(ConfigError, match=too_long):
        parse_config(config("m", "k" * 201), {})


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "name must be a non-empty string"),
        ("   ", "name must be a non-empty string"),
        ("k" * 201, "name must be printable and at most 200 characters"),
        ("tab\there", "name must be printable and at most 200 characters"),
        ("nul\x00here", "name must be printable and at most 200 characters"),
    ],
)
def test_keys_create_checks_the_name_as_the_admin_api_does(tmp_path: Path, name: str, problem: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("ledger:\n  url: sqlite:///./ledger.db\n")
    result = CliRunner().invoke(main, ["keys", "create", "--config", str(config), name])
    assert result.exit_code == 2  # a usage error, as a bad option is
    assert f"Error: Invalid value for NAME: {problem}" in result.output
    assert not (tmp_path / "ledger.db").exists()  # refused before the ledger is opened


def test_keys_create_takes_a_name_as_long_as_the_column(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("ledger:\n  url: sqlite:///./ledger.db\n")
    result = CliRunner().invoke(main, ["keys", "create", "--config", str(config), "k" * 200])
    assert result.exit_code == 0 and result.output.startswith("sk-gw-")


def test_serve_with_h11_says_caller_connections_are_not_capped(tmp_path: Path) -> None:
    gateway = GatewayProcess(gateway_config(server={"http": "h11", "max_connections": 5}), tmp_path).start()
    try:
        logs = gateway.logs()
    finally:
        gateway.stop()
    assert "server.http is h11: caller connections are not capped" in logs
    assert "caller connections open at once per worker" not in logs
