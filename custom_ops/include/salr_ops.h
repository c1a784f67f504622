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

// Attribute holding K (in_features) on BitmapDecode and SALRLinear.
inline constexpr char kInFeaturesAttr[] = "in_features";

// Version of the bitmap weight format the kernels read (DESIGN.md section 2).
inline constexpr int kBitmapFormatVersion = 1;

}  // namespace salr
