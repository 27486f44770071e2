#!/usr/bin/env bash
# Sets up everything infermesh needs on a fresh machine, idempotently:
#   .venv with the project and its bench extra (matplotlib: `infermesh bench --plot`), or with
#   --dev its dev extra (bench, the test tools, ruff, mypy, kubectl); redis-server; and the
#   buf CLI (tests only).
# Usage: scripts/bootstrap.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
python=${PYTHON:-python3}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# Python >= 3.11 and a virtualenv of the project's own.
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "infermesh needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  if ! "$python" -m venv .venv; then
    # Debian's python3 leaves venv's pip bootstrap (ensurepip) to the python3-venv package.
    command -v apt-get >/dev/null || exit 1
    rm -rf .venv
    say "installing python3-venv (apt-get)"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv .venv
  fi
fi
extras="[bench]"
[ "$dev" = 1 ] && extras="[dev]"
stamp=".venv/.installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing infermesh$extras into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --editable ".$extras"
  touch "$stamp"
fi

# redis-server: `infermesh up` and the tests start their own.
if ! command -v redis-server >/dev/null; then
  if command -v apt-get >/dev/null; then
    say "installing redis-server (apt-get)"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
      || { echo "could not install redis-server; install it yourself or set REDIS_URL" >&2; exit 1; }
  else
    echo "redis-server not found: install it (e.g. 'brew install redis') or set REDIS_URL to a running Redis" >&2
    exit 1
  fi
fi

# buf (proto lint) for the tests, from the npm package, into .tools/.
if [ "$dev" = 1 ] && [ ! -x .tools/node_modules/.bin/buf ]; then
  if ! command -v npm >/dev/null; then
    if command -v apt-get >/dev/null; then
      say "installing npm (apt-get) for the buf CLI"
      as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    else
      echo "npm not found: install Node.js/npm so the tests can fetch the buf CLI" >&2
      exit 1
    fi
  fi
  say "installing the buf CLI into .tools/"
  npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
fi

# Chromium (headless) for the trace view's screenshot test.
if [ "$dev" = 1 ] && ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null; then
    say "installing chromium (apt-get) for the trace view test"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || { echo "could not install chromium; the trace view test needs it" >&2; exit 1; }
  else
    echo "chromium not found: install it so the trace view test can take its screenshot" >&2; exit 1
  fi
fi
