#!/usr/bin/env bash
# On a host with an NVIDIA GPU: the GPU tests and the scoring benchmark on CUDA, with their
# output kept in one folder (default ./gpu-check): nvidia-smi.txt, gpu-tests.log,
# models-bench-cuda.txt, models-bench-cpu.txt (the same model and batch sizes on the CPU).
#
# Needs the project with onnxruntime-gpu importable by $PYTHON (default .venv/bin/python,
# else python3): `pip install -e '.[gpu,dev]'`, or, on a host without an index, the same
# packages installed elsewhere and put on PYTHONPATH together with this checkout and
# services/genproto.
# Usage: scripts/gpu_check.sh [OUT_DIR] [SECONDS_PER_BENCH_ROW]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
seconds=${2:-3}
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"

if ! "$python" - <<'EOF'
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__}: {', '.join(providers)}")
if "CUDAExecutionProvider" not in providers:
    sys.exit("no CUDAExecutionProvider: install onnxruntime-gpu (the `gpu` extra) on a host with an NVIDIA GPU")
EOF
then
  exit 1
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"

status=0
echo "==> GPU tests (tests/e2e/test_scoring_gpu.py)"
"$python" -m pytest -p no:cacheprovider -m gpu -v tests/e2e/test_scoring_gpu.py 2>&1 | tee "$out/gpu-tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# A model repository of the reference MLP (random weights: throughput does not depend on them).
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
"$python" - "$repo" <<'EOF'
import sys
from pathlib import Path
from services.scoring import modelgen
modelgen.write_version(Path(sys.argv[1]), "ranker", 1, modelgen.mlp_model(0))
EOF
for provider in cuda cpu; do
  echo "==> models bench --provider $provider"
  "$python" -m infermesh.cli models bench --repository "$repo" --provider "$provider" \
    --batch-sizes 1,256,4096,65536 --seconds "$seconds" --concurrency 8 2>&1 | tee "$out/models-bench-$provider.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "==> results in $out/ (exit $status)"
exit $status
