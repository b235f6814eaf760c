#!/usr/bin/env bash
# Creates (or updates) a virtual environment with everything safedl_ext needs, then builds
# the native extension in place. Idempotent: a stamp file skips the pip step when the
# requirements have not changed.
#
#   scripts/setup-venv.sh VENV [TORCH_SPEC]     e.g. scripts/setup-venv.sh .venv torch==2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH_SPEC=${2:-torch==2.13.0}
PY=${PYTHON_BOOTSTRAP:-python3}
DEPS=(setuptools wheel ninja "numpy>=1.24" "scikit-learn>=1.3" "tqdm>=4.60" "pillow>=9"
      "matplotlib>=3.7" "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6.100" "ruff>=0.5"
      # test/benchmark only: IBM ART, the anchor of the AC / SS baselines (tests/poison)
      "adversarial-robustness-toolbox==1.20.1")
stamp="$VENV/.safedl-deps"
want="$TORCH_SPEC ${DEPS[*]}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and alone: pip then finds the pinned wheel on local disk (see README).
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" install -q --disable-pip-version-check "${DEPS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, sklearn, pytest, hypothesis, matplotlib, art" # fail loudly if pip failed
  echo "$want" > "$stamp"
fi
# Build the extension in place against the venv's torch (no build isolation).
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import safedl_ext.ops as o; print('safedl_ext backend:', o.backend())"
