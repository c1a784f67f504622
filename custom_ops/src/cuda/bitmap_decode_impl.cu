// CUDA BitmapDecode, and the device-side validation of bitmap weights that are not constant initializers
// (those are validated once on the host when ORT constructs the kernel).
#include "bitmap_decode_impl.cuh"

#include <cuda_fp16.h>

#include "bitmap_index.h"
#include "device_utils.cuh"

namespace salr {
namespace Cuda {
namespace {

constexpr int kWarps = 4;  // rows per 128-thread block

// Warp per row: lane 0 checks the row's offsets and padding byte; lanes take 64-column tiles, a warp scan
// of the tiles' popcounts gives the tile-offset table, and the row's total is compared with its offsets.
__global__ void __launch_bounds__(32 * kWarps)
    validate_bitmap_kernel(const uint8_t* bitmap, const int64_t* row_offsets, int64_t rows, int64_t cols,
                           int64_t nnz, int32_t* tile_offsets, unsigned long long* error_word) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= rows) return;
  const int64_t width = cuda_index::bitmap_width(cols);
  const int64_t tiles = cuda_index::tile_count(cols);
  const uint8_t* row = bitmap + n * width;
  int64_t count = 0;
  for (int64_t t0 = 0; t0 < tiles; t0 += 32) {
    const int64_t t = t0 + lane;
    const int c = t < tiles ? cuda_index::popcount64(cuda_index::row_tile(row, width, t)) : 0;
    const int inclusive = warp_inclusive_scan(c, lane);
    if (t < tiles && tile_offsets != nullptr) {
      tile_offsets[n * (tiles + 1) + t] = static_cast<int32_t>(count + inclusive - c);
    }
    count += __shfl_sync(kFullMask, inclusive, 31);
  }
  if (lane != 0) return;
  if (tile_offsets != nullptr) tile_offsets[n * (tiles + 1) + tiles] = static_cast<int32_t>(count);
  cuda_index::FormatError err = cuda_index::check_row_offsets(n, rows, row_offsets, nnz);
  if (err == cuda_index::FormatError::kNone && (row[width - 1] & cuda_index::padding_mask(cols)) != 0) {
    err = cuda_index::FormatError::kPadding;
  }
  if (err == cuda_index::FormatError::kNone && count != row_offsets[n + 1] - row_offsets[n]) {
    err = cuda_index::FormatError::kPopcount;
  }
  if (err != cuda_index::FormatError::kNone) {
    atomicMin(error_word, static_cast<unsigned long long>(cuda_index::pack_error(n, err)));
  }
}

// Warp per row, 32 columns per lane and pass (the GEMV's scan); writes every column, zeros included.
template <typename V>
__global__ void __launch_bounds__(32 * kWarps)
    bitmap_decode_kernel(const uint8_t* bitmap, const V* values, const int64_t* row_offsets, int64_t rows,
                         int64_t cols, V* out, const uint64_t* error_word) {
  if (error_word != nullptr && *error_word != cuda_index::kNoError) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= rows) return;
  const int64_t width = cuda_index::bitmap_width(cols);
  const uint8_t* row = bitmap + n * width;
  V* dst = out + n * cols;
  int64_t base = row_offsets[n];
  const int64_t words = (width + 3) / 4;
  for (int64_t w0 = 0; w0 < words; w0 += 32) {
    const int64_t wi = w0 + lane;
    const uint32_t word = wi < words ? cuda_index::row_word(row, width, wi) : 0u;
    const int count = __popc(word);
    const int inclusive = warp_inclusive_scan(count, lane);
    int64_t idx = base + inclusive - count;
    for (int b = 0; b < 32; ++b) {
      const int64_t col = wi * 32 + b;
      if (wi < words && col < cols) dst[col] = ((word >> b) & 1u) ? values[idx++] : convert<V>(0.f);
    }
    base += __shfl_sync(kFullMask, inclusive, 31);
  }
}

}  // namespace

void LaunchValidateBitmapKernel(cudaStream_t stream, const uint8_t* bitmap, const int64_t* row_offsets,
                                int64_t rows, int64_t cols, int64_t nnz, int32_t* tile_offsets,
                                uint64_t* error_word) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "atomicMin works on the packed error word");
  validate_bitmap_kernel<<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
      bitmap, row_offsets, rows, cols, nnz, tile_offsets, reinterpret_cast<unsigned long long*>(error_word));
  SALR_CUDA_CHECK_LAUNCH();
}

void LaunchBitmapDecodeKernel(cudaStream_t stream, const BitmapWeightView& w, void* out, const uint64_t* error_word) {
  if (w.rows == 0 || w.cols == 0) return;
  const int64_t blocks = (w.rows + kWarps - 1) / kWarps;
  if (w.vtype == DType::kFloat16) {
    bitmap_decode_kernel<half><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        w.bitmap, static_cast<const half*>(w.values), w.row_offsets, w.rows, w.cols, static_cast<half*>(out),
        error_word);
  } else {
    bitmap_decode_kernel<float><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        w.bitmap, static_cast<const float*>(w.values), w.row_offsets, w.rows, w.cols, static_cast<float*>(out),
        error_word);
  }
  SALR_CUDA_CHECK_LAUNCH();
}

}  // namespace Cuda
}  // namespace salr
