// Launchers of the dense CUDA GEMMs: the FusedAdapterGemm op, and H = X·A_catᵀ for SALRLinear.
// Host-only declarations (the ORT glue includes this with the host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_common.h"

namespace salr {
namespace Cuda {

// C [m, n] = A [m, k] · B [n, k]ᵀ, type `t` in and out, fp32 accumulation; zeros when k == 0.
void LaunchDenseNTKernel(cudaStream_t stream, DType t, const void* a, int64_t m, int64_t k, const void* b, int64_t n,
                         void* c);

// Y [m, n] = (X [m, k] · A_cat [r, k]ᵀ) · B_cat [n, r]ᵀ; `h` is scratch for m x r elements of type `t`.
void LaunchFusedAdapterGemmKernel(cudaStream_t stream, DType t, const void* x, int64_t m, int64_t k,
                                  const void* a_cat, int64_t r, const void* b_cat, int64_t n, void* h, void* y);

}  // namespace Cuda
}  // namespace salr
