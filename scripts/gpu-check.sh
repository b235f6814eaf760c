#!/usr/bin/env bash
# On a machine with a GPU: build in place with CUDA, run the CUDA tests, run the GPU
# benchmarks; results go to ${RESULTS:-bench/results}/gpu-<date>.json (and the pytest log).
# Uses the python on PATH (or $PYTHON) as it is: the GPU machine may have no network.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
stamp=$(date +%Y-%m-%d)
export SAFEDL_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-8}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")} \
  FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace || exit 1
rc=0
if "$PY" -c "import pytest, hypothesis, sklearn" 2>/dev/null; then
  "$PY" -m pytest tests -q -m cuda -p no:cacheprovider --junitxml="$RESULTS/gpu-tests-$stamp.xml" \
    2>&1 | tee "$RESULTS/gpu-tests-$stamp.log" || rc=1
else
  echo "pytest/hypothesis/scikit-learn missing on this machine: CUDA tests NOT run" | tee "$RESULTS/gpu-tests-$stamp.log"
  rc=1
fi
"$PY" bench/gpu_bench.py --out "$RESULTS/gpu-$stamp.json" || rc=1
exit $rc
