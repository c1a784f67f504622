// CUDA execution-provider registrations of the com.salr ops (built with SALR_CUDA=ON).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace salr {
namespace Cuda {

// Adds the CUDAExecutionProvider kernels of SALRLinear, BitmapDecode and FusedAdapterGemm to `domain`, with
// the CPU kernels' input and attribute contracts: SALRLinear (X, values) in {(f32, f32), (f32, f16),
// (f16, f16)}, BitmapDecode values in {f32, f16}, FusedAdapterGemm X in {f32, f16}.
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace Cuda
}  // namespace salr
