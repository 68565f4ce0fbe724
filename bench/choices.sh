#!/usr/bin/env bash
# What each library choice buys (event loop, HTTP parser, JSON): see bench/choices.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install.sh --no-litellm
exec .venv/bin/python bench/choices.py "$@"
