"""LiteLLM's proxy as one of the benchmark's systems: the most used open-source gateway of this kind.

It lives in its own virtualenv (`bench/.venv-litellm`, made by `run.sh`: its dependencies must not
mix with the gateway's), runs one worker with no database, a master key (so that auth is on, as on
the gateway) and one model routed to the same nginx location as every other system. Offline, it
needs its local cost map and no tokenizer download (else every stream waits on a model hub it
cannot reach); its own log is at error level, as the others run at warning with no access log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fake_upstream

VENV = Path(__file__).resolve().parent / ".venv-litellm"
PINNED = "1.108.7"  # run.sh installs this version: figures from different versions do not compare
CHAT_PATH = "/v1/chat/completions"  # LiteLLM has no /v1/openai/... route
READY_PATH = "/health/liveliness"  # answers without a key (/health needs one)
OFFLINE_ENVIRONMENT = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches the cost map from GitHub at start
    "HF_HUB_OFFLINE": "1",  # else each stream of a llama-3 model retries a tokenizer download
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOG": "ERROR",  # no per-request access log, like the other systems
    "NO_DOCS": "True",
}


def missing() -> str | None:
    """Why LiteLLM cannot be measured here, or None if it can."""
    if not (VENV / "bin" / "litellm").exists():
        return f"not installed in {VENV} (bench/run.sh installs it unless --no-litellm)"
    return None


def version() -> str | None:
    found = sorted((VENV / "lib").glob("python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


def environment() -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENVIRONMENT}


def argv(upstream_base: str, port: int, config_path: Path) -> list[str]:
    """Write LiteLLM's config (JSON is YAML) and return the command that serves it, one worker."""
    config = {
        "model_list": [
            {
                "model_name": fake_upstream.MODEL,
                "litellm_params": {
                    "model": f"openai/{fake_upstream.MODEL}",
                    "api_base": upstream_base,
                    "api_key": "bench-upstream-token",
                },
            }
        ],
        "litellm_settings": {"set_verbose": False, "disable_hf_tokenizer_download": True},
        "general_settings": {"master_key": "sk-bench"},
    }
    config_path.write_text(json.dumps(config, indent=2))
    command = [str(VENV / "bin" / "litellm"), "--config", str(config_path)]
    return [*command, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
