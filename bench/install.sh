#!/usr/bin/env bash
# What the benchmarks need, installed where missing: Debian's nginx, its echo module and wrk; the
# project with its test and bench extras in .venv (httpx for the minimal_httpx proxy, py-spy); and, unless
# --no-litellm is among the arguments, LiteLLM's proxy (pinned, see litellm_proxy.py) in its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null \
   || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
  apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-echo wrk
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet -e '.[test,bench]'
case " $* " in
  *" --no-litellm "*) ;;
  *)
    litellm_version=$(sed -n 's/^PINNED = "\([^"]*\)".*/\1/p' bench/litellm_proxy.py)
    if [ ! -x bench/.venv-litellm/bin/litellm ]; then
      python3 -m venv bench/.venv-litellm
      bench/.venv-litellm/bin/pip install --quiet "litellm[proxy]==${litellm_version}"
    fi
    ;;
esac
