#!/usr/bin/env bash
# Configure, build and test the CMake build of the native ops (CMakeLists.txt).
#
#   scripts/cmake-test.sh [BUILD_DIR]            # default BUILD_DIR: build-cmake
#   SAFEDL_SANITIZE=1 scripts/cmake-test.sh build-asan
#   SAFEDL_WITH_CUDA=1 scripts/cmake-test.sh build-cuda
#
# Environment:
#   PYTHON            python whose torch is built against (default: python)
#   SAFEDL_SANITIZE   1/true/on: ASan + UBSan build (-fsanitize=address,undefined)
#   SAFEDL_WITH_CUDA  1/true/on: also build csrc/**/*.cu (needs nvcc and a CUDA torch)
#   BUILD_TYPE        CMake build type (default: Release)
#   JOBS              parallel build jobs (default: 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-build-cmake}"
PYTHON="${PYTHON:-python}"
JOBS="${JOBS:-2}"
BUILD_TYPE="${BUILD_TYPE:-Release}"

on_off() {
  case "$(printf '%s' "${1:-0}" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) echo ON ;;
    *) echo OFF ;;
  esac
}
SANITIZE="$(on_off "${SAFEDL_SANITIZE:-0}")"
WITH_CUDA="$(on_off "${SAFEDL_WITH_CUDA:-0}")"

# Where torch's CMake config lives, the libstdc++ ABI it was built with, and (for CUDA)
# the header and library folders of the nvidia wheels that the CUDA torch ships with:
# ATen's CUDA headers include cuBLAS headers, libtorch links libnvrtc.
TORCH_INFO="$("$PYTHON" - <<'EOF'
import glob, os, sys
import torch
print(torch.utils.cmake_prefix_path)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
for sub in ("include", "lib"):
    dirs = []
    for base in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(base, "nvidia", "*", sub))))
    print(";".join(d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
EOF
)"
TORCH_PREFIX="$(sed -n 1p <<<"$TORCH_INFO")"
TORCH_ABI="$(sed -n 2p <<<"$TORCH_INFO")"
NVIDIA_INCLUDES="$(sed -n 3p <<<"$TORCH_INFO")"
NVIDIA_LIBS="$(sed -n 4p <<<"$TORCH_INFO")"

args=(
  -S "$ROOT" -B "$BUILD_DIR"
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE"
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
  -DSAFEDL_GLIBCXX_USE_CXX11_ABI="$TORCH_ABI"
  -DSAFEDL_SANITIZE="$SANITIZE"
  -DSAFEDL_WITH_CUDA="$WITH_CUDA"
)
if [[ "$WITH_CUDA" == ON ]]; then
  args+=(-DSAFEDL_EXTRA_INCLUDE_DIRS="$NVIDIA_INCLUDES" -DSAFEDL_CUDA_LIBRARY_DIRS="$NVIDIA_LIBS")
  if [[ -z "${CUDACXX:-}" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    args+=(-DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
  fi
fi

echo "+ cmake ${args[*]}"
cmake "${args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"

# The test executables are themselves linked with -fsanitize, so the ASan runtime loads
# first without LD_PRELOAD, and LeakSanitizer stays on (libtorch reports no leaks).
# UBSan findings fail the test: CMakeLists.txt sets UBSAN_OPTIONS=halt_on_error=1 on it.
cd "$BUILD_DIR"
ctest --output-on-failure -j "$JOBS"
