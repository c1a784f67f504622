"""`salr_edge.export` and `salr_edge.runtime` import nothing heavy until used (style rule 14)."""

from __future__ import annotations

import subprocess
import sys


def test_export_and_runtime_imports_are_lean():
    code = ("import sys, salr_edge.export, salr_edge.runtime; "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'onnxscript', 'onnxruntime_genai') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
