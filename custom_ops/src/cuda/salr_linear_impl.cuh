// Launchers of the CUDA SALRLinear kernels: Y = X·Wᵀ + (X·A_catᵀ)·B_catᵀ (+ bias), W in the bitmap format.
// Host-only declarations (the ORT glue includes this with the host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_common.h"

namespace salr {
namespace Cuda {

// At most this many activation rows take the warp-per-row GEMV (decode phase); more take the tiled GEMM.
constexpr int64_t kGemvMaxM = 8;

// Y [m, N] = X [m, K] · Wᵀ + H [m, R] · B_catᵀ + bias, all device pointers in activation type `t`:
// `h` = X·A_catᵀ computed before (LaunchDenseNTKernel; ignored when rank == 0), `bias` may be null, and
// `w.tile_offsets` must be set when m > kGemvMaxM. Throws CudaError.
void LaunchSALRLinearKernel(cudaStream_t stream, DType t, const BitmapWeightView& w, const void* x, int64_t m,
                            const void* h, const void* b_cat, int64_t rank, const void* bias, void* y,
                            const uint64_t* error_word);

}  // namespace Cuda
}  // namespace salr
