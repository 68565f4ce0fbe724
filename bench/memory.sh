#!/usr/bin/env bash
# The memory benchmark: RSS per concurrent stream (1,000 slow streams), then a soak at steady load
# (10 minutes unless told otherwise). Arguments go to memory.py (e.g. --soak-minutes 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install.sh --no-litellm
exec .venv/bin/python bench/memory.py "$@"
