#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: set up, lint the contracts (and their
# compatibility with the previous commit), lint, format-check and type-check the code, prove generated
# files are fresh, then unit, integration and end-to-end tests (real Redis, Envoy, ONNX Runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
step "buf lint"
.tools/node_modules/.bin/buf lint
step "buf breaking (protos/ against the previous commit)"
scripts/buf_breaking.sh
step "generated stubs are fresh (scripts/gen_protos.py --check)"
.venv/bin/python scripts/gen_protos.py --check
step "architecture rules (lint-imports: layers, no serving->tools imports, no cycles)"
.venv/bin/lint-imports
step "ruff check (lint)"
.venv/bin/ruff check .
step "ruff format --check"
.venv/bin/ruff format --check .
step "mypy (infermesh.client strict; services.runtime, features, scoring, ranking, jobs; gateway)"
.venv/bin/mypy
step "envoy/local.json is fresh"
.venv/bin/python -m infermesh.envoy check && echo "envoy/local.json is up to date"
step "docs/cli.md and docs/settings.md are fresh"
.venv/bin/python -m infermesh.cli_doc --check && .venv/bin/python -m infermesh.settings_doc --check \
  && echo "docs/cli.md and docs/settings.md are up to date"
step "deploy/: overlays, Kubernetes 1.32 schemas, Envoy configs, hadolint"
scripts/validate_deploy.sh
step "pytest"
mkdir -p test-artifacts
exec .venv/bin/python -m pytest "$@"
