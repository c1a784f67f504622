// CUDA SALRLinear: a warp-per-row GEMV that reads the bitmap directly (decode phase, M <= kGemvMaxM) and
// the tiled decode-into-shared-memory + MMA GEMM of tiled_gemm.cuh (prefill).
#include "salr_linear_impl.cuh"

#include <cuda_fp16.h>

#include "bitmap_index.h"
#include "device_utils.cuh"
#include "tiled_gemm.cuh"

namespace salr {
namespace Cuda {
namespace {

constexpr int kGemvWarps = 4;  // rows per 128-thread block

template <typename T, typename V>
struct GemvParams {
  const T* x = nullptr;  // [m, k]
  int64_t m = 0;
  int64_t k = 0;
  const uint8_t* bitmap = nullptr;
  const V* values = nullptr;
  const int64_t* row_offsets = nullptr;
  int64_t n = 0;
  int64_t width = 0;
  bool bitmap_words = false;  // width % 4 == 0 and 4-byte aligned base: one 32-bit load per word
  const T* h = nullptr;       // [m, rank]
  const T* b_cat = nullptr;   // [n, rank]
  int64_t rank = 0;
  const T* bias = nullptr;
  T* y = nullptr;  // [m, n]
  const uint64_t* error_word = nullptr;
};

// Decode phase: memory-bound, so each weight byte is read once and every activation row (up to MB) is
// served from it. A warp owns a row; per pass each lane takes one 32-bit bitmap word (32 columns), a warp
// scan of the words' popcounts gives each lane the position of its first value, and the lane walks its
// set bits. The row's values are read once, by consecutive lanes in consecutive ranges.
template <typename T, typename V, int MB>
__global__ void __launch_bounds__(32 * kGemvWarps) sparse_gemv_kernel(const GemvParams<T, V> p) {
  if (p.error_word != nullptr && *p.error_word != cuda_index::kNoError) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= p.n) return;  // whole warps leave together; no block barrier follows
  const uint8_t* row = p.bitmap + n * p.width;
  int64_t base = p.row_offsets[n];
  float acc[MB];
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = 0.f;

  const int64_t words = (p.width + 3) / 4;
  for (int64_t w0 = 0; w0 < words; w0 += 32) {
    const int64_t wi = w0 + lane;
    uint32_t word = 0;
    if (wi < words) {
      word = p.bitmap_words ? __ldg(reinterpret_cast<const uint32_t*>(row) + wi)
                            : cuda_index::row_word(row, p.width, wi);
    }
    const int count = __popc(word);
    const int inclusive = warp_inclusive_scan(count, lane);
    const int total = __shfl_sync(kFullMask, inclusive, 31);
    int64_t idx = base + inclusive - count;
    while (word != 0) {
      const int bit = __ffs(static_cast<int>(word)) - 1;
      word &= word - 1;
      const int64_t col = wi * 32 + bit;  // < K: padding bits are 0 (validated)
      const float v = to_f32(p.values[idx++]);
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        if (i < p.m) acc[i] = fmaf(v, to_f32(p.x[i * p.k + col]), acc[i]);
      }
    }
    base += total;
  }
  // Low-rank term: lanes stride over R; H is tiny and stays in L1/L2.
  for (int64_t r = lane; r < p.rank; r += 32) {
    const float b = to_f32(p.b_cat[n * p.rank + r]);
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      if (i < p.m) acc[i] = fmaf(to_f32(p.h[i * p.rank + r]), b, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = warp_sum(acc[i]);
  if (lane == 0) {
    const float bias = p.bias != nullptr ? to_f32(p.bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      if (i < p.m) p.y[i * p.n + n] = from_f32<T>(acc[i] + bias);
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, typename V, int MB>
void launch_gemv(const GemvParams<T, V>& p, cudaStream_t stream) {
  const int64_t blocks = (p.n + kGemvWarps - 1) / kGemvWarps;
  sparse_gemv_kernel<T, V, MB><<<static_cast<unsigned>(blocks), 32 * kGemvWarps, 0, stream>>>(p);
  SALR_CUDA_CHECK_LAUNCH();
}

template <typename T, typename V>
void launch(cudaStream_t stream, const BitmapWeightView& w, const void* x, int64_t m, const void* h,
            const void* b_cat, int64_t rank, const void* bias, void* y, const uint64_t* error_word) {
  if (m <= kGemvMaxM) {
    GemvParams<T, V> p;
    p.x = static_cast<const T*>(x);
    p.m = m;
    p.k = w.cols;
    p.bitmap = w.bitmap;
    p.values = static_cast<const V*>(w.values);
    p.row_offsets = w.row_offsets;
    p.n = w.rows;
    p.width = w.width;
    p.bitmap_words = w.width % 4 == 0 && aligned(w.bitmap, 4);
    p.h = static_cast<const T*>(h);
    p.b_cat = static_cast<const T*>(b_cat);
    p.rank = rank;
    p.bias = static_cast<const T*>(bias);
    p.y = static_cast<T*>(y);
    p.error_word = error_word;
    if (m <= 1) {
      launch_gemv<T, V, 1>(p, stream);
    } else if (m <= 2) {
      launch_gemv<T, V, 2>(p, stream);
    } else if (m <= 4) {
      launch_gemv<T, V, 4>(p, stream);
    } else {
      launch_gemv<T, V, 8>(p, stream);
    }
    return;
  }
  if (w.tile_offsets == nullptr) throw CudaError("SALRLinear: the tiled GEMM needs the weight's tile offsets");
  tiled::GemmParams<T, V> p;
  p.y = static_cast<T*>(y);
  p.ldy = w.rows;
  p.bias = static_cast<const T*>(bias);
  p.m = m;
  p.n = w.rows;
  p.x = static_cast<const T*>(x);
  p.ldx = w.cols;
  p.k = w.cols;
  p.bitmap = w.bitmap;
  p.values = static_cast<const V*>(w.values);
  p.row_offsets = w.row_offsets;
  p.tile_offsets = w.tile_offsets;
  p.width = w.width;
  p.nnz = w.nnz;
  p.x_vec = aligned(x, 16) && (w.cols * sizeof(T)) % 16 == 0;
  p.values_vec = aligned(w.values, 16);
  p.bitmap_vec = aligned(w.bitmap, 8) && w.width % 8 == 0;
  if (rank > 0) {
    p.xd = static_cast<const T*>(h);
    p.ldxd = rank;
    p.wd = static_cast<const T*>(b_cat);
    p.ldwd = rank;
    p.kd = rank;
    p.xd_vec = aligned(h, 16) && (rank * sizeof(T)) % 16 == 0;
    p.wd_vec = aligned(b_cat, 16) && (rank * sizeof(T)) % 16 == 0;
  }
  p.error_word = error_word;
  tiled::launch_tiled_gemm<T, V, true>(p, stream);
}

}  // namespace

void LaunchSALRLinearKernel(cudaStream_t stream, DType t, const BitmapWeightView& w, const void* x, int64_t m,
                            const void* h, const void* b_cat, int64_t rank, const void* bias, void* y,
                            const uint64_t* error_word) {
  if (m == 0 || w.rows == 0) return;
  if (t == DType::kFloat16 && w.vtype == DType::kFloat16) {
    launch<half, half>(stream, w, x, m, h, b_cat, rank, bias, y, error_word);
  } else if (t == DType::kFloat32 && w.vtype == DType::kFloat32) {
    launch<float, float>(stream, w, x, m, h, b_cat, rank, bias, y, error_word);
  } else if (t == DType::kFloat32 && w.vtype == DType::kFloat16) {
    launch<float, half>(stream, w, x, m, h, b_cat, rank, bias, y, error_word);
  } else {
    throw CudaError("SALRLinear: fp16 activations need fp16 values (the op's type contract)");
  }
}

}  // namespace Cuda
}  // namespace salr
