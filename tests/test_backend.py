"""Loading the extension: one warning and the references without it, an error when the
native build is required."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from safedl_ext import ops, attacks
    x0 = torch.rand(4, 3); xa = x0.clone(); g = torch.randn(4, 3)
    ops.pgd_step_(xa, x0, g, 0.1, 0.05)
    assert float((xa - x0).abs().max()) <= 0.05 + 1e-7
print(ops.backend(), sum("native extension unavailable" in str(w.message) for w in caught))
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=120)


def test_missing_extension_falls_back_with_one_warning():
    out = _run({"SAFEDL_LIBRARY": "/nonexistent/_C.so", "SAFEDL_REQUIRE_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "1"]


def test_missing_extension_is_an_error_when_required():
    out = _run({"SAFEDL_LIBRARY": "/nonexistent/_C.so", "SAFEDL_REQUIRE_NATIVE": "1"})
    assert out.returncode != 0
    assert "SAFEDL_REQUIRE_NATIVE" in out.stderr


@pytest.mark.skipif(os.environ.get("SAFEDL_REQUIRE_NATIVE", "0") in ("", "0"),
                    reason="only meaningful where the native build is required")
def test_native_backend_loads():
    out = _run({})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["native", "0"]
