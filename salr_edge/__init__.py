"""salr-edge: sparse + low-rank compression of LLMs for edge devices.

Heavy dependencies (transformers, onnxruntime, triton) load lazily, so `import salr_edge` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
