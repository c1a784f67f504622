"""The domain, op names and opset version in custom_ops/include/salr_ops.h equal the Python ones."""

from __future__ import annotations

import re
from pathlib import Path

from . import reference

HEADER = Path(__file__).resolve().parents[2] / "custom_ops" / "include" / "salr_ops.h"


def _header_constants() -> dict[str, str]:
    text = HEADER.read_text()
    consts = dict(re.findall(r'inline constexpr char (k\w+)\[\] = "([^"]*)";', text))
    consts.update(re.findall(r"inline constexpr int (k\w+) = (\d+);", text))
    return consts


def test_header_matches_reference():
    c = _header_constants()
    assert c["kDomain"] == reference.SALR_DOMAIN == "com.salr"
    assert int(c["kOpsetVersion"]) == reference.OPSET_VERSION == 1
    assert c["kBitmapDecodeOp"] == reference.BITMAP_DECODE
    assert c["kFusedAdapterGemmOp"] == reference.FUSED_ADAPTER_GEMM
    assert c["kSALRLinearOp"] == reference.SALR_LINEAR
    assert c["kSALRLinearQOp"] == reference.SALR_LINEAR_Q == "SALRLinearQ"
    assert c["kInFeaturesAttr"] == reference.IN_FEATURES_ATTR
    assert c["kBitsAttr"] == reference.BITS_ATTR == "bits"
    assert c["kGroupSizeAttr"] == reference.GROUP_SIZE_ATTR == "group_size"
    assert int(c["kBitmapFormatVersion"]) == 2  # v2: int8 / int4 values with fp16 group scales


def test_reference_op_classes_are_named_after_the_ops():
    names = {cls.__name__ for cls in reference.REFERENCE_OPS}
    assert names == {reference.BITMAP_DECODE, reference.FUSED_ADAPTER_GEMM, reference.SALR_LINEAR,
                     reference.SALR_LINEAR_Q}
    assert all(cls.op_domain == reference.SALR_DOMAIN for cls in reference.REFERENCE_OPS)
