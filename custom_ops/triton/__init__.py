"""Triton kernels of the com.salr ops (installed as `salr_edge.triton`; reach them through `salr_edge.kernels`).

Importing this package imports triton but compiles nothing: kernels are built on first launch.
"""

from .bitmap_index import GROUP_COLS, build_group_offsets, encode_on_device
from .salr_linear import (
    GEMV_MAX_M,
    bitmap_decode_forward,
    fused_adapter_gemm_forward,
    get_autotune_config,
    get_dense_autotune_config,
    get_gemv_autotune_config,
    salr_linear_forward,
)

__all__ = [
    "GEMV_MAX_M",
    "GROUP_COLS",
    "bitmap_decode_forward",
    "build_group_offsets",
    "encode_on_device",
    "fused_adapter_gemm_forward",
    "get_autotune_config",
    "get_dense_autotune_config",
    "get_gemv_autotune_config",
    "salr_linear_forward",
]
