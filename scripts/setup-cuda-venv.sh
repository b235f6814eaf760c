#!/usr/bin/env bash
# A venv with the CUDA build of torch (5.5 GB, from local disk) for the CUDA compile check.
#   scripts/setup-cuda-venv.sh VENV [TORCH_SPEC]
set -euo pipefail
VENV=${1:?venv path}
TORCH_SPEC=${2:-torch==2.14.1}
stamp="$VENV/.safedl-deps"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$TORCH_SPEC" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" numpy setuptools wheel ninja \
    2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch; assert torch.version.cuda, torch.__version__"
  echo "$TORCH_SPEC" > "$stamp"
fi
