"""Build of safedl_ext's native extension (``safedl_ext._C``).

CPU sources are always built. CUDA sources are added when torch is a CUDA build and a
CUDA toolkit is found (``CUDA_HOME``), or when ``FORCE_CUDA=1``; neither needs a GPU.
``DEBUG=1`` builds with ``-O0 -g``. Build without isolation so the installed torch is
the one compiled against::

    pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in {"1", "true", "yes", "on"}


def _nvidia_include_dirs() -> list[str]:
    """Header folders of the ``nvidia`` wheels that the CUDA build of torch ships with.

    ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare nvcc toolkit may
    lack; the CUDA build of torch installs them under ``site-packages/nvidia/*/include``.
    """
    dirs: list[str] = []
    for base in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extensions() -> tuple[list, dict]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    force_cuda = _flag("FORCE_CUDA")
    # A usable toolkit has nvcc and the runtime headers. torch guesses CUDA_HOME from the
    # nvcc on PATH, which may be a wrapper script outside the toolkit (/usr/local/bin/nvcc
    # gives /usr/local): such a guess is not a toolkit.
    toolkit = CUDA_HOME is not None and all(
        os.path.exists(os.path.join(CUDA_HOME, *p))
        for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )
    with_cuda = force_cuda or (torch.version.cuda is not None and toolkit)
    if force_cuda and not toolkit:
        raise RuntimeError(
            f"FORCE_CUDA=1 but CUDA_HOME={CUDA_HOME!r} is not a CUDA toolkit: set CUDA_HOME to "
            "the toolkit folder (the one holding bin/nvcc and include/), e.g. "
            "/usr/local/cuda-13.0"
        )
    if with_cuda and torch.version.cuda is None:
        raise RuntimeError(
            "CUDA sources requested but the installed torch is a CPU build "
            f"({torch.__version__}); install a CUDA build of torch"
        )

    csrc = ROOT / "csrc"
    cpp = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: BuildExtension picks the standard the installed torch needs
    # (C++17 for torch 2.13, C++20 for 2.14).
    # -fno-trapping-math: nothing reads floating-point exception flags, and without it GCC
    # will not turn the selects of the GMM E-step into vector blends (no vectorisation).
    cxx = [*opt, "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    extra_link = ["-fopenmp"]
    include_dirs = [str(csrc)]
    kwargs: dict = {
        "name": "safedl_ext._C",
        "include_dirs": include_dirs,
        "extra_link_args": extra_link,
        "py_limited_api": False,
    }
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: Ampere and Hopper, plus PTX for anything newer.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        include_dirs.extend(_nvidia_include_dirs())
        nvcc = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            nvcc.append("-G")
        ext = CUDAExtension(
            sources=cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs
        )
    else:
        ext = CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"safedl_ext: building with_cuda={with_cuda} debug={debug}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["safedl_ext", "safedl_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
