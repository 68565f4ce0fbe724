"""Configuration: one frozen, typed object, loaded once from YAML plus secrets from the environment.

This is the only module that reads the environment. Every other module gets the `Config` it needs
passed in explicitly. A config error raises `ConfigError` with a message naming the offending key.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.ledger.schema import KEY_NAME_CHARS, MODEL_CHARS

CONFIG_ENV = "GATEWAY_CONFIG"
METRICS_DIR_ENV = (
    "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode (set by `serve --workers`)
)
DEFAULT_MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"

# Strict: YAML's `true` is not 1, and `0` or "no" is not false; a number may be written 5 or 5.0.
Whole = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
PositiveSeconds = Annotated[Number, Field(gt=0)]
UsdPerMillionTokens = Annotated[Decimal, Field(ge=0)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Section):
    base_url: str = "https://api.deepinfra.com/v1/openai"
    token_env: str = "DEEPINFRA_TOKEN"
    require_token: Flag = False
    connect_timeout_s: PositiveSeconds = 5
    read_timeout_s: PositiveSeconds = 600
    # A deadline for the whole upstream answer (an upstream that drips a byte at a time never trips
    # read_timeout_s); None: no deadline, a stream may run for as long as it sends.
    total_timeout_s: PositiveSeconds | None = None
    max_connections: Annotated[Whole, Field(ge=1)] = 1000

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        if "@" in value.split("/", 3)[2]:
            raise ValueError("must not hold credentials: the token comes from upstream.token_env")
        return value.rstrip("/")

    @property
    def chat_completions_url(self) -> str:
        return f"{self.base_url}/chat/completions"


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[Whole, Field(ge=0, le=65535)] = 8000
    max_body_bytes: Annotated[Whole, Field(ge=1)] = 20_971_520
    # Request bodies held in memory at once, over all requests of a worker: beyond it a request waits
    # for room (503 overloaded after client_timeout_s).
    max_inflight_body_bytes: Annotated[Whole, Field(ge=1)] = 268_435_456
    # Caller connections open at once per worker; beyond it the oldest idle one is closed. None:
    # derived from the open-files limit (each stream holds two descriptors: caller and upstream).
    max_connections: Annotated[Whole, Field(ge=1)] | None = None
    shutdown_grace_s: Annotated[Number, Field(ge=0)] = 30
    client_timeout_s: PositiveSeconds = 60  # for a request's head, and between two reads of its body
    workers: Annotated[Whole, Field(ge=1)] = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: Flag = False
    # uvloop and httptools are the fast defaults (docs/design.md, "Why these libraries"); the pure-Python
    # ones are there for platforms without those wheels, and for the benchmark that compares them.
    loop: Literal["uvloop", "asyncio"] = "uvloop"
    http: Literal["httptools", "h11"] = "httptools"


class ModelConfig(_Section):
    name: Annotated[str, Field(min_length=1, max_length=MODEL_CHARS)]  # as the ledger's model column
    input_usd_per_mtok: UsdPerMillionTokens
    output_usd_per_mtok: UsdPerMillionTokens


def _default_models() -> tuple[ModelConfig, ...]:
    price = Decimal("0.049")
    return (ModelConfig(name=DEFAULT_MODEL, input_usd_per_mtok=price, output_usd_per_mtok=price),)


LEDGER_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


class LedgerConfig(_Section):
    url: str = "sqlite:///./gateway.db"  # a relative SQLite path is taken from the config file's folder
    url_env: str | None = (
        None  # env var holding the URL instead (a PostgreSQL password stays out of the file)
    )
    # Rows the database cannot take now (it is down) are appended here, fsync'd, and replayed when
    # it is back; rows it refuses for good go to dead-letter.jsonl here. Relative: to the config's folder.
    spill_dir: str = "./ledger-spill"
    max_queued_rows: Annotated[Whole, Field(ge=1)] = 100_000  # rows held in memory, waiting for a write

    @field_validator("url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        return _ledger_url(url)


def _ledger_url(url: str) -> str:
    """SQLite or PostgreSQL, the two ledgers the gateway is built and tested on."""
    if not url.startswith(LEDGER_SCHEMES):  # nothing of the value is shown: it may be a password
        raise ValueError("must start with sqlite:/// or postgresql://")
    return url


class AdminConfig(_Section):
    key_env: str = "GATEWAY_ADMIN_KEY"


class MetricsConfig(_Section):
    """/metrics, in Prometheus' text format."""

    token_env: str | None = None  # env var holding a token that /metrics then requires (Bearer)
    user_labels: Flag = False  # a `user` label on the per-request series: one series per end user


class StaticKey(_Section):
    """A caller key from the config file: the key itself, its SHA-256, or the env var holding it."""

    name: Annotated[str, Field(min_length=1, max_length=KEY_NAME_CHARS)]  # as the ledger's key_name column
    key: SecretStr | None = None
    key_sha256: str | None = None
    key_env: str | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> StaticKey:
        given = [self.key is not None, self.key_sha256 is not None, self.key_env is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of key, key_sha256, key_env")
        if self.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.key_sha256):
            raise ValueError("key_sha256 must be 64 hex digits")
        return self


class AuthConfig(_Section):
    keys: tuple[StaticKey, ...] = ()

    @field_validator("keys")
    @classmethod
    def _unique_names(cls, keys: tuple[StaticKey, ...]) -> tuple[StaticKey, ...]:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate key names: {', '.join(duplicates)}")
        return keys


class SimulatorConfig(_Section):
    """The built-in upstream simulator, used when no upstream token is set."""

    latency_ms: Annotated[Number, Field(ge=0)] = 150
    tokens_per_s: Annotated[Number, Field(ge=0)] = 100
    reply_tokens: Annotated[Whole, Field(ge=0)] = 24
    usage_style: Literal["deepinfra", "openai"] = "deepinfra"


class CallerKey(_Section):
    """A resolved caller key: only its name and SHA-256 digest are kept."""

    name: str
    sha256: bytes


class Secrets(_Section):
    """Secrets resolved from the environment; never read from the file, never printed."""

    upstream_token: SecretStr | None = None
    admin_key: SecretStr | None = None
    metrics_token: SecretStr | None = None
    caller_keys: tuple[CallerKey, ...] = ()


class Config(_Section):
    upstream: UpstreamConfig = UpstreamConfig()
    server: ServerConfig = ServerConfig()
    models: Annotated[tuple[ModelConfig, ...], Field(min_length=1)] = Field(default_factory=_default_models)
    ledger: LedgerConfig = LedgerConfig()
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    auth: AuthConfig = AuthConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    secrets: Secrets = Field(default=Secrets(), exclude=True)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        return models

    @property
    def uses_simulator(self) -> bool:
        """No upstream token: the gateway serves from its built-in simulator."""
        return self.secrets.upstream_token is None


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file at `path` (or $GATEWAY_CONFIG) and resolve secrets from `environ`."""
    env = os.environ if environ is None else environ
    path = path or env.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config file: pass --config PATH or set {CONFIG_ENV}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    return parse_config(text, env, base_dir=Path(path).absolute().parent)


def parse_config(text: str, environ: Mapping[str, str], base_dir: Path | None = None) -> Config:
    """The config in `text`; relative paths in it (a SQLite ledger, the spill folder) are taken from
    `base_dir`, the config file's folder, so that every command finds the same files wherever it runs."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # Where and what, but not PyYAML's quote of the line: it may hold a key.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigError(f"config is not valid YAML: {problem}{where}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping of sections (upstream, server, models, ...)")
    if "secrets" in raw:
        raise ConfigError("secrets: unknown key (secrets come from environment variables)")
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    return config.model_copy(
        update={"secrets": _resolve_secrets(config, environ), "ledger": _ledger(config, environ, base_dir)}
    )


def _ledger(config: Config, environ: Mapping[str, str], base_dir: Path | None) -> LedgerConfig:
    url = config.ledger.url
    if config.ledger.url_env is not None:
        from_env = env_secret(environ, config.ledger.url_env)  # it may hold a password
        if not from_env:
            raise ConfigError(f"ledger.url_env: environment variable {config.ledger.url_env} is not set")
        try:
            url = _ledger_url(from_env)
        except ValueError as error:
            raise ConfigError(f"ledger.url_env: the URL in {config.ledger.url_env} {error}") from None
    if base_dir is None:
        return config.ledger.model_copy(update={"url": url})
    return config.ledger.model_copy(
        update={
            "url": _sqlite_url_from(url, base_dir),
            "spill_dir": str(base_dir / Path(config.ledger.spill_dir).expanduser()),
        }
    )


def _sqlite_url_from(url: str, base_dir: Path) -> str:
    """A SQLite URL with a relative path (`sqlite:///./x.db`, `sqlite:///x.db`) made absolute against
    `base_dir`; any other URL as it is."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path is None or path.startswith("/") or path.startswith(":memory:") or path == "":
        return url
    return "sqlite:///" + str((base_dir / path).resolve())


def redact_url(url: str) -> str:
    """A database URL safe to print: the password starred in every form it can take
    (`user:pw@host`, up to the last "@" since a password may hold one; `?password=`, `&password=`)."""
    url = re.sub(r"://([^:/@]*):.*@", r"://\1:***@", url)
    return re.sub(r"([?&;]password=)[^&;#]*", r"\1***", url, flags=re.IGNORECASE)


def env_secret(environ: Mapping[str, str], name: str) -> str | None:
    """A secret from the environment, the same way for every secret: surrounding whitespace (the
    newline of `$(cat secret-file)` or of a mounted secret) is not part of it; empty means unset."""
    return (environ.get(name) or "").strip() or None


def _resolve_secrets(config: Config, environ: Mapping[str, str]) -> Secrets:
    token = env_secret(environ, config.upstream.token_env)
    if token is None and config.upstream.require_token:
        raise ConfigError(
            f"upstream.token_env: environment variable {config.upstream.token_env} is not set "
            "and upstream.require_token is true"
        )
    admin_key = env_secret(environ, config.admin.key_env)
    metrics_token = None
    if config.metrics.token_env is not None:
        metrics_token = env_secret(environ, config.metrics.token_env)
        if metrics_token is None:
            raise ConfigError(
                f"metrics.token_env: environment variable {config.metrics.token_env} is not set"
            )
    caller_keys = []
    for index, static in enumerate(config.auth.keys):
        caller_keys.append(CallerKey(name=static.name, sha256=_static_key_digest(static, index, environ)))
    digests = [key.sha256 for key in caller_keys]
    if len(set(digests)) != len(digests):
        raise ConfigError("auth.keys: two keys have the same value")
    return Secrets(
        upstream_token=SecretStr(token) if token else None,
        admin_key=SecretStr(admin_key) if admin_key else None,
        metrics_token=SecretStr(metrics_token) if metrics_token else None,
        caller_keys=tuple(caller_keys),
    )


def _static_key_digest(static: StaticKey, index: int, environ: Mapping[str, str]) -> bytes:
    if static.key_sha256 is not None:
        return bytes.fromhex(static.key_sha256)
    if static.key_env is not None:
        value = env_secret(environ, static.key_env)
        if not value:
            raise ConfigError(f"auth.keys[{index}].key_env: environment variable {static.key_env} is not set")
        return hashlib.sha256(value.encode()).digest()
    assert static.key is not None
    return hashlib.sha256(static.key.get_secret_value().encode()).digest()


def _describe(error: ValidationError) -> str:
    """One line per problem, each naming the key as `section.key` or `auth.keys[0].name`."""
    lines = []
    problems = error.errors()
    for problem in problems:
        loc = problem["loc"]
        if problem["type"] == "too_short" and any(p["loc"][: len(loc)] == loc != p["loc"] for p in problems):
            continue  # "models: at least 1 item" only echoes a bad item, which has its own line
        key = _dotted(loc)
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            value = problem.get("input")
            # Values under auth may be keys, a URL may hold a password: never echo them.
            hidden = (
                isinstance(value, dict | list)
                or problem["type"] == "missing"
                or key.startswith(("auth", "ledger", "upstream.base_url"))
            )
            shown = "" if hidden else f" (got {value!r})"
            lines.append(f"{key}: {problem['msg']}{shown}")
    return "invalid config: " + "; ".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after[_exactly_one_source()]",):
            out += f".{part}" if out else str(part)
    return out or "(top level)"
