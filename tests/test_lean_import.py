import subprocess
import sys


def test_import_salr_edge_loads_no_heavy_backend():
    code = ("import sys, salr_edge; heavy = [m for m in ('transformers', 'onnxruntime', 'triton', 'onnx') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
