// Launchers of the CUDA BitmapDecode kernel and of the device-side validation of a bitmap weight.
// Host-only declarations (the ORT glue includes this with the host compiler).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_common.h"

namespace salr {
namespace Cuda {

// Checks every invariant of a weight whose bytes are only on the device (a warp per row) and, when
// `tile_offsets` is not null, fills its tile-offset table (bitmap_index.h). `error_word` must hold
// cuda_index::kNoError before the launch; the lowest failing row and its FormatError are atomicMin'ed
// into it. Reads only within [rows, width] bytes and [rows + 1] offsets; `values` is never read.
void LaunchValidateBitmapKernel(cudaStream_t stream, const uint8_t* bitmap, const int64_t* row_offsets,
                                int64_t rows, int64_t cols, int64_t nnz, int32_t* tile_offsets,
                                uint64_t* error_word);

// out [rows, cols] (the values' type) = the dense W, zeros where pruned.
void LaunchBitmapDecodeKernel(cudaStream_t stream, const BitmapWeightView& w, void* out, const uint64_t* error_word);

}  // namespace Cuda
}  // namespace salr
