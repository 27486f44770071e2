#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: set up, lint the contracts, prove generated
# files are fresh, then unit, integration and end-to-end tests (real Redis, Envoy, ONNX Runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
step "buf lint"
.tools/node_modules/.bin/buf lint
step "generated stubs are fresh (scripts/gen_protos.py --check)"
.venv/bin/python scripts/gen_protos.py --check
step "architecture rules (lint-imports: layers, no serving->tools imports, no cycles)"
.venv/bin/lint-imports
step "envoy/local.json is fresh"
.venv/bin/python -m infermesh.envoy check && echo "envoy/local.json is up to date"
step "deploy/: overlays, Kubernetes 1.32 schemas, Envoy configs, hadolint"
scripts/validate_deploy.sh
step "pytest"
mkdir -p test-artifacts
exec .venv/bin/python -m pytest "$@"
