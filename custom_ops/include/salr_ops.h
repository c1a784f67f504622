// Public names of the com.salr custom-op library (libsalr_ops.so).
//
// The same strings are defined once in Python (export/ops_schema.py and tests/custom_ops/reference.py);
// tests/custom_ops/test_domain_constants.py parses this file and checks that they agree, so keep each
// constant a plain `inline constexpr char NAME[] = "...";` line.
#pragma once

namespace salr {

inline constexpr char kDomain[] = "com.salr";
inline constexpr int kOpsetVersion = 1;

inline constexpr char kBitmapDecodeOp[] = "BitmapDecode";
inline constexpr char kFusedAdapterGemmOp[] = "FusedAdapterGemm";
inline constexpr char kSALRLinearOp[] = "SALRLinear";
inline constexpr char kSALRLinearQOp[] = "SALRLinearQ";

// Attribute holding K (in_features) on BitmapDecode and SALRLinear.
inline constexpr char kInFeaturesAttr[] = "in_features";
// Attributes of SALRLinearQ: value bits (4 or 8) and the number of consecutive non-zeros sharing a scale.
inline constexpr char kBitsAttr[] = "bits";
inline constexpr char kGroupSizeAttr[] = "group_size";

// Newest version of the bitmap weight format the kernels read (DESIGN.md section 2; version 2 adds int8 /
// int4 values with fp16 group scales, custom_ops/README.md).
inline constexpr int kBitmapFormatVersion = 2;

}  // namespace salr
