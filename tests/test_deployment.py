"""The container files: the Dockerfile lints clean and installs as the README does; compose runs two
instances on one PostgreSQL ledger. (No Docker engine runs on these machines: this is what can be checked.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.config import load_config

ROOT = Path(__file__).parent.parent


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_like_the_readme_and_runs_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "pip install ." in readme and re.search(r"RUN pip install --no-cache-dir \.", dockerfile)
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert re.search(r'^CMD \["gateway", "serve"', dockerfile, re.MULTILINE)


def test_compose_runs_two_instances_on_one_postgresql_ledger() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateways = [name for name in compose["services"] if name.startswith("gateway")]
    assert len(gateways) == 2
    config_path = ROOT / "deploy" / "compose-config.yaml"
    for name in gateways:
        service = compose["services"][name]
        assert any(volume.startswith("./deploy/compose-config.yaml:") for volume in service["volumes"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    ledger_url = compose["services"][gateways[0]]["environment"]["GATEWAY_LEDGER_URL"]
    assert ledger_url.startswith("postgresql://") and "@postgres:5432/" in ledger_url
    environ = {"ALICE_GATEWAY_KEY": "k", "GATEWAY_ADMIN_KEY": "a", "GATEWAY_LEDGER_URL": ledger_url}
    assert load_config(config_path, environ=environ).ledger.url == ledger_url
    assert "postgresql://" not in config_path.read_text()  # the password stays out of the file
