#!/usr/bin/env bash
# Compiles and links the CUDA kernels against a CUDA build of torch (no GPU needed), then
# imports the result and asserts the CUDA kernels are registered with the dispatcher.
# The build goes to a folder outside the package, so the CPU build in place is untouched.
#
#   PYTHON=/path/to/cuda-venv/bin/python scripts/check-cuda-build.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-build-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-2}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }
"$PY" -c "import torch; assert torch.version.cuda, 'need a CUDA build of torch, got ' + torch.__version__; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
LIB=$(ls "$OUT"/lib/safedl_ext/_C*.so | head -n 1)
SAFEDL_LIBRARY="$LIB" SAFEDL_REQUIRE_NATIVE=1 PYTHONPATH="$PWD" "$PY" - <<'PY'
import torch
from safedl_ext import ops
assert ops.backend() == "native", ops.native_error()
assert ops.has_cuda_kernels(), "CUDA kernels of safedl::pgd_step_ are not registered"
OPS = ("pgd_step_", "srht_project", "gram_update_", "gram_symmetrize", "gmm1d_em",
       "xent_seed", "xent_seed_backward")
for op in OPS:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"safedl::{op}", key), (op, key)
print("CUDA build OK: safedl::{" + ", ".join(OPS) + "} have CPU and CUDA kernels (torch",
      torch.__version__ + ")")
PY
