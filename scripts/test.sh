#!/usr/bin/env bash
# Install what the tests need (Python pins; Debian's chromium for the browser test and postgresql
# for the Edge-executor fleet test) and run every test. GPU tests are opt-in: pytest -m gpu.
# Tests run in parallel, one worker per core (at most 4; one for GPU tests): tests/conftest.py.
# MI300X_CERT_TEST_WORKERS=0 runs them in this process.
source "$(dirname "$0")/_env.sh"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
  if [ -n "$missing" ]; then
    echo "[test] apt-get install$missing" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >&2 \
      || echo "[test] could not install$missing; tests that need them will say so" >&2
  fi
fi
workers="${MI300X_CERT_TEST_WORKERS:-auto}"
if [ "$workers" = 0 ]; then
  exec python -m pytest "$@"
fi
exec python -m pytest -n "$workers" --dist loadscope "$@"
