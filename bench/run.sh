#!/usr/bin/env bash
# The benchmark in one command: installs what it needs (Debian's nginx with the echo module and wrk,
# the project in .venv), then runs bench/run.py. Arguments go to run.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null \
   || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
  apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-echo wrk
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet -e '.[test]'  # the test extras bring httpx for minimal_httpx
exec .venv/bin/python bench/run.py "$@"
