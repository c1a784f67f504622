// Error handling and launcher argument types shared by the CUDA launchers (.cu) and the ORT glue (cuda_ops.cc).
// Host-only C++: the ORT glue is compiled by the host compiler.
//
// Every CUDA runtime call and every kernel launch goes through SALR_CUDA_CHECK / SALR_CUDA_CHECK_LAUNCH. A
// failure throws CudaError; the ORT glue catches it at the kernel boundary and returns it as an ORT error
// status naming the op, so no cudaError_t is ever dropped and no exception crosses the C ABI.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace salr {
namespace Cuda {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) {
    throw CudaError(std::string("CUDA call `") + expr + "` failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
  }
}

// Element type of activations (T) or values (V).
enum class DType : uint8_t { kFloat32, kFloat16 };

inline size_t dtype_size(DType t) { return t == DType::kFloat16 ? 2 : 4; }

// A bitmap-encoded weight W [rows, cols] in device memory (DESIGN.md section 2), plus its derived tile
// offsets (bitmap_index.h; null where a kernel does not need them).
struct BitmapWeightView {
  const uint8_t* bitmap = nullptr;       // [rows, width]
  const void* values = nullptr;          // [nnz] of vtype
  const int64_t* row_offsets = nullptr;  // [rows + 1]
  const int32_t* tile_offsets = nullptr;  // [rows, tile_count(cols) + 1]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t width = 0;
  int64_t nnz = 0;
  DType vtype = DType::kFloat16;
};

// Kernels that read a weight validated on the device take `error_word`: null when the weight was
// validated on the host, else the word the validation kernel wrote earlier on the same stream. A kernel
// that finds it set (not cuda_index::kNoError) returns before reading anything, so a malformed weight is
// an error status, never an out-of-bounds access.

}  // namespace Cuda
}  // namespace salr

#define SALR_CUDA_CHECK(expr) ::salr::Cuda::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a <<<...>>> launch: configuration errors (too much shared memory, bad grid) surface here.
#define SALR_CUDA_CHECK_LAUNCH() ::salr::Cuda::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
