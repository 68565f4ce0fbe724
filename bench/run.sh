#!/usr/bin/env bash
# The benchmark in one command: installs what it needs (Debian's nginx with the echo module and wrk,
# the project in .venv, LiteLLM's proxy in its own bench/.venv-litellm unless --no-litellm), then runs
# bench/run.py. Arguments go to run.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install.sh "$@"
exec .venv/bin/python bench/run.py "$@"
