"""The ORT-free kernel self-test (custom_ops/tests/kernel_selftest.cc) passes on this machine.

It checks every kernel set the CPU offers (scalar, AVX2 here) against a float64 reference on odd shapes, the
batch-1 integer path against the scalar integer path, the adapter layouts the ORT kernel keeps, and the
activation quantizer's bytes on non-finite input. Built here with the host compiler (no ORT headers needed),
the same sources as CMake's `salr_kernel_selftest` target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CUSTOM_OPS = Path(__file__).resolve().parents[2] / "custom_ops"


def test_kernel_selftest_passes(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    sources = [CUSTOM_OPS / "tests" / "kernel_selftest.cc", *sorted((CUSTOM_OPS / "src" / "cpu").glob("kernels_*.cc"))]
    sources += [CUSTOM_OPS / "src" / "cpu" / name for name in ("sparse_linear.cc", "format.cc", "q24_layout.cc")]
    binary = tmp_path / "salr_kernel_selftest"
    subprocess.run([cxx, "-O1", "-std=c++17", "-pthread", f"-I{CUSTOM_OPS / 'include'}",
                    f"-I{CUSTOM_OPS / 'src' / 'cpu'}", *map(str, sources), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=600)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed) or run.stdout[-2000:]
    assert "PASSED: 0 failure(s)" in run.stdout
