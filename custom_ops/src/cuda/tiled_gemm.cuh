// Tiled GEMM of the CUDA kernels (prefill, M > kGemvMaxM): decode the bitmap into shared memory, then MMA.
//
// One 128-thread block computes a 64 x 64 tile of Y [M, N] over up to two K segments:
//
//   sparse segment (kSparse):  Y += X [M, K] · W [N, K]ᵀ      W in the bitmap format
//   dense segment:             Y += Xd [M, Kd] · Wd [N, Kd]ᵀ  (SALRLinear: H = X·A_catᵀ and B_cat; also the
//                                                              plain dense GEMMs of FusedAdapterGemm)
//
// Per 64-column K step t (stage s = t % 2 of a double-buffered shared-memory ring):
//   load   (step t+1, cp.async, in flight during step t):  X tile 64x64, and either the W tile's 64 rows x 8
//          bitmap bytes plus each row's packed values of that tile (a contiguous slice found through the
//          derived tile offsets, copied in aligned 16-byte pieces), or a dense Wd tile
//   decode (step t): thread (row, byte) expands 8 columns: value position = slice start + popcount of the
//          tile's earlier bytes + set bits below, zeros where pruned  ->  dense W tile in shared memory
//   MMA    (step t): fp16: WMMA 16x16x16 tensor-core fragments, 4 warps x (32x32); fp32: SIMT FMA 8x4 per
//          thread (no TF32, to keep the fp32 contract). Accumulation is fp32 in both.
// The epilogue adds the bias and writes Y once, with masks for the M/N tails.
//
// Shapes need no alignment: a copy is a cp.async only where the source rows are 16-byte aligned (the host
// sets the *_vec flags), otherwise plain predicated loads; tails zero-fill. Included by .cu files only.
#pragma once

#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bitmap_index.h"
#include "cuda_common.h"
#include "device_utils.cuh"

namespace salr {
namespace Cuda {
namespace tiled {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 64;
constexpr int kThreads = 128;
static_assert(kBK == cuda_index::kTileCols, "one K step must be one tile of the tile-offset table");
static_assert(kThreads == 2 * kBN, "values are staged by two threads per weight row");

constexpr size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Row padding in elements: keeps every row 16-byte aligned (cp.async, WMMA ldm) and staggers banks.
template <typename T>
struct Pad;
template <>
struct Pad<half> {
  static constexpr int value = 8;
};
template <>
struct Pad<float> {
  static constexpr int value = 4;
};

// Dynamic shared memory: [X stage 0 | X stage 1 | W stage 0 | W stage 1 | decoded W | shift 0 | shift 1];
// the epilogue reuses it from the start. Every region is 128-byte aligned (WMMA needs 32).
template <typename T, typename V>
struct Layout {
  static constexpr int kLd = kBK + Pad<T>::value;   // row stride of X, Wd and decoded W tiles (elements)
  static constexpr int kVecV = 16 / sizeof(V);       // values per 16-byte copy
  static constexpr int kValStride = kBK + kVecV;     // staged values per row: slice + alignment slack
  static constexpr size_t kX = round_up(sizeof(T) * kBM * kLd, 128);
  static constexpr size_t kBitmapBytes = kBN * cuda_index::kTileBytes;
  static constexpr size_t kSparse = round_up(kBitmapBytes + sizeof(V) * kBN * kValStride, 128);
  static constexpr size_t kDense = round_up(sizeof(T) * kBN * kLd, 128);
  static constexpr size_t kW = kSparse > kDense ? kSparse : kDense;
  static constexpr size_t kDecoded = round_up(sizeof(T) * kBN * kLd, 128);
  static constexpr size_t kShift = round_up(sizeof(int) * kBN, 128);
  static constexpr int kCLd = kBN + 4;  // fp32 epilogue tile row stride
  static constexpr size_t kC = sizeof(float) * kBM * kCLd;
  static constexpr size_t kMain = 2 * kX + 2 * kW + kDecoded + 2 * kShift;
  static constexpr size_t kBytes = kMain > kC ? kMain : kC;

  static __device__ T* x(unsigned char* s, int stage) { return reinterpret_cast<T*>(s + stage * kX); }
  static __device__ unsigned char* w(unsigned char* s, int stage) { return s + 2 * kX + stage * kW; }
  static __device__ T* decoded(unsigned char* s) { return reinterpret_cast<T*>(s + 2 * kX + 2 * kW); }
  static __device__ int* shift(unsigned char* s, int stage) {
    return reinterpret_cast<int*>(s + 2 * kX + 2 * kW + kDecoded + stage * kShift);
  }
};

template <typename T, typename V>
struct GemmParams {
  // Y [m, n] (row stride ldy), bias [n] or null
  T* y = nullptr;
  int64_t ldy = 0;
  const T* bias = nullptr;
  int64_t m = 0;
  int64_t n = 0;
  // sparse segment: X [m, k] (row stride ldx) · W [n, k]ᵀ
  const T* x = nullptr;
  int64_t ldx = 0;
  int64_t k = 0;
  const uint8_t* bitmap = nullptr;
  const V* values = nullptr;
  const int64_t* row_offsets = nullptr;
  const int32_t* tile_offsets = nullptr;
  int64_t width = 0;
  int64_t nnz = 0;
  // dense segment: Xd [m, kd] (row stride ldxd) · Wd [n, kd]ᵀ (row stride ldwd); absent when kd == 0
  const T* xd = nullptr;
  int64_t ldxd = 0;
  const T* wd = nullptr;
  int64_t ldwd = 0;
  int64_t kd = 0;
  // which sources may be copied with 16-byte (8-byte for the bitmap) cp.async: aligned base and row stride
  bool x_vec = false;
  bool values_vec = false;
  bool bitmap_vec = false;
  bool xd_vec = false;
  bool wd_vec = false;
  const uint64_t* error_word = nullptr;
};

template <typename T>
__device__ __forceinline__ T zero() {
  return from_f32<T>(0.f);
}

// rows x kBK tile of src [rows_total, cols_total] (row stride ld) at (row0, col0) -> dst (row stride kLd).
template <typename T, int kRows, int kLd>
__device__ __forceinline__ void load_dense_tile(T* dst, const T* src, int64_t ld, int64_t rows_total,
                                                int64_t cols_total, int64_t row0, int64_t col0, bool vec) {
  constexpr int kE = 16 / sizeof(T);
  constexpr int kChunksPerRow = kBK / kE;
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int cc = (c % kChunksPerRow) * kE;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + cc;
    T* d = dst + r * kLd + cc;
    const bool live = gr < rows_total && gc < cols_total;
    if (vec) {
      const int64_t left = live ? cols_total - gc : 0;
      const int bytes = static_cast<int>(sizeof(T) * (left < kE ? left : kE));
      cp_async_16(d, live ? src + gr * ld + gc : src, bytes);
    } else {
      for (int e = 0; e < kE; ++e) d[e] = (live && gc + e < cols_total) ? src[gr * ld + gc + e] : zero<T>();
    }
  }
}

// Sparse step t: the tile's bitmap bytes and each row's value slice -> W stage; slice shifts -> shift stage.
template <typename T, typename V>
__device__ __forceinline__ void load_sparse_tile(const GemmParams<T, V>& p, unsigned char* smem, int stage,
                                                 int64_t t, int64_t tiles, int64_t n0) {
  using L = Layout<T, V>;
  unsigned char* bits = L::w(smem, stage);
  V* vals = reinterpret_cast<V*>(bits + L::kBitmapBytes);
  int* shift = L::shift(smem, stage);
  const int64_t g0 = t * cuda_index::kTileBytes;
  for (int r = threadIdx.x; r < kBN; r += kThreads) {
    const int64_t n = n0 + r;
    unsigned char* d = bits + r * cuda_index::kTileBytes;
    if (p.bitmap_vec) {  // width % 8 == 0: every tile is 8 whole bytes of the row
      cp_async_8(d, n < p.n ? p.bitmap + n * p.width + g0 : p.bitmap, n < p.n ? 8 : 0);
    } else {
      for (int i = 0; i < cuda_index::kTileBytes; ++i) {
        d[i] = (n < p.n && g0 + i < p.width) ? p.bitmap[n * p.width + g0 + i] : 0;
      }
    }
  }
  const int r = threadIdx.x >> 1;
  const int part = threadIdx.x & 1;
  const int64_t n = n0 + r;
  int64_t start = 0;
  int64_t end = 0;
  if (n < p.n) {
    const int64_t row_start = p.row_offsets[n];
    const int32_t* to = p.tile_offsets + n * (tiles + 1) + t;
    start = row_start + to[0];
    end = row_start + to[1];
  }
  V* row_vals = vals + r * L::kValStride;
  if (p.values_vec) {
    // Copy whole aligned 16-byte pieces covering [start, end); the decode skips the first `shift` values.
    const cuda_index::StagedSlice slice = cuda_index::staged_slice(start, end, L::kVecV);
    if (part == 0) shift[r] = slice.shift;
    for (int64_t c = part; c < slice.chunks; c += 2) {
      const int64_t g = slice.aligned + c * L::kVecV;
      const int64_t left = p.nnz - g;  // > 0: g < end <= nnz
      cp_async_16(row_vals + c * L::kVecV, p.values + g,
                  static_cast<int>(sizeof(V) * (left < L::kVecV ? left : L::kVecV)));
    }
  } else {
    if (part == 0) shift[r] = 0;
    for (int64_t i = start + part; i < end; i += 2) row_vals[i - start] = p.values[i];
  }
}

template <typename T, typename V, bool kSparse>
__device__ __forceinline__ void load_stage(const GemmParams<T, V>& p, unsigned char* smem, int stage, int64_t t,
                                           int64_t sparse_tiles, int64_t m0, int64_t n0) {
  using L = Layout<T, V>;
  if (kSparse && t < sparse_tiles) {
    load_dense_tile<T, kBM, L::kLd>(L::x(smem, stage), p.x, p.ldx, p.m, p.k, m0, t * kBK, p.x_vec);
    load_sparse_tile<T, V>(p, smem, stage, t, sparse_tiles, n0);
  } else {
    const int64_t col0 = (t - sparse_tiles) * kBK;
    load_dense_tile<T, kBM, L::kLd>(L::x(smem, stage), p.xd, p.ldxd, p.m, p.kd, m0, col0, p.xd_vec);
    load_dense_tile<T, kBN, L::kLd>(reinterpret_cast<T*>(L::w(smem, stage)), p.wd, p.ldwd, p.n, p.kd, n0, col0,
                                    p.wd_vec);
  }
}

// Stage 1: the W stage's bitmap bytes + values -> dense decoded tile [kBN][kLd] of T.
template <typename T, typename V>
__device__ __forceinline__ void decode_stage(unsigned char* smem, int stage) {
  using L = Layout<T, V>;
  const unsigned char* bits = L::w(smem, stage);
  const V* vals = reinterpret_cast<const V*>(bits + L::kBitmapBytes);
  const int* shift = L::shift(smem, stage);
  T* out = L::decoded(smem);
  for (int q = threadIdx.x; q < kBN * cuda_index::kTileBytes; q += kThreads) {
    const int r = q / cuda_index::kTileBytes;
    const int g = q % cuda_index::kTileBytes;
    const uint64_t tile = *reinterpret_cast<const uint64_t*>(bits + r * cuda_index::kTileBytes);
    const uint32_t byte = static_cast<uint32_t>(tile >> (8 * g)) & 0xFFu;
    // Position of the byte's first kept column (cuda_index::staged_position, advanced bit by bit).
    const V* src = vals + r * L::kValStride + cuda_index::staged_position(shift[r], tile, g, 0);
    alignas(16) T col[8];
    int pos = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) col[j] = ((byte >> j) & 1u) ? convert<T>(src[pos++]) : zero<T>();
    // 8 columns = 16 (fp16) or 32 (fp32) bytes at a 16-byte aligned address: vector stores.
    const uint4* from = reinterpret_cast<const uint4*>(col);
    uint4* to = reinterpret_cast<uint4*>(out + r * L::kLd + 8 * g);
#pragma unroll
    for (int v = 0; v < static_cast<int>(sizeof(col) / sizeof(uint4)); ++v) to[v] = from[v];
  }
}

// Stage 2 for fp16: tensor cores. Warp w owns rows 32 (w / 2) .. +32 and columns 32 (w % 2) .. +32.
template <int kLd>
struct WmmaTile {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];

  __device__ void zero_init() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.f);
  }

  // c += X tile [kBM][kLd] · W tile [kBN][kLd]ᵀ; W rows are matrix_b's columns (col_major, ldm = kLd).
  __device__ void mma(const half* x, const half* w) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], x + (wm * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], w + (wn * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }

  // Through shared memory (fragment layouts are opaque), then coalesced row-wise stores with bias.
  template <typename P>
  __device__ void store(const P& p, unsigned char* smem, int64_t m0, int64_t n0, int c_ld) {
    using namespace nvcuda;
    float* cs = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * c_ld + wn * 32 + j * 16, c[i][j], c_ld,
                                wmma::mem_row_major);
      }
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int r = e / kBN;
      const int col = e % kBN;
      const int64_t gm = m0 + r;
      const int64_t gn = n0 + col;
      if (gm < p.m && gn < p.n) {
        const float bias = p.bias != nullptr ? to_f32(p.bias[gn]) : 0.f;
        p.y[gm * p.ldy + gn] = from_f32<half>(cs[r * c_ld + col] + bias);
      }
    }
  }
};

// Stage 2 for fp32: SIMT FMA. Thread (tm, tn) = (tid / 16, tid % 16) owns rows tm + 8i, columns tn + 16j.
template <int kLd>
struct SimtTile {
  float c[8][4];

  __device__ void zero_init() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = 0.f;
  }

  __device__ void mma(const float* x, const float* w) {
    const int tm = threadIdx.x / 16;
    const int tn = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float a[8];
      float b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = x[(tm + 8 * i) * kLd + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = w[(tn + 16 * j) * kLd + kk];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }

  template <typename P>
  __device__ void store(const P& p, unsigned char*, int64_t m0, int64_t n0, int) {
    const int tm = threadIdx.x / 16;
    const int tn = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t gm = m0 + tm + 8 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gn = n0 + tn + 16 * j;
        if (gm < p.m && gn < p.n) p.y[gm * p.ldy + gn] = c[i][j] + (p.bias != nullptr ? p.bias[gn] : 0.f);
      }
    }
  }
};

template <typename T, typename V, bool kSparse>
__global__ void __launch_bounds__(kThreads) tiled_gemm_kernel(const GemmParams<T, V> p) {
  if (p.error_word != nullptr && *p.error_word != cuda_index::kNoError) return;  // uniform: before any barrier
  using L = Layout<T, V>;
  using Tile = typename std::conditional<std::is_same<T, half>::value, WmmaTile<L::kLd>, SimtTile<L::kLd>>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t sparse_tiles = kSparse ? cuda_index::tile_count(p.k) : 0;
  const int64_t total = sparse_tiles + (p.kd + kBK - 1) / kBK;

  Tile acc;
  acc.zero_init();
  if (total > 0) {
    load_stage<T, V, kSparse>(p, smem, 0, 0, sparse_tiles, m0, n0);
    cp_async_commit();
    for (int64_t t = 0; t < total; ++t) {
      const int s = static_cast<int>(t & 1);
      if (t + 1 < total) load_stage<T, V, kSparse>(p, smem, s ^ 1, t + 1, sparse_tiles, m0, n0);
      cp_async_commit();  // possibly empty, so that "all but the newest group" is always step t's group
      cp_async_wait<1>();
      __syncthreads();
      const T* w;
      if (kSparse && t < sparse_tiles) {
        decode_stage<T, V>(smem, s);
        __syncthreads();
        w = L::decoded(smem);
      } else {
        w = reinterpret_cast<const T*>(L::w(smem, s));
      }
      acc.mma(L::x(smem, s), w);
      __syncthreads();  // stage s and the decoded tile are overwritten by the next step's loads / decode
    }
    cp_async_wait<0>();
  }
  acc.store(p, smem, m0, n0, L::kCLd);
}

// Launch on `stream`; checks the grid limits and opts in to more than 48 KiB of shared memory.
template <typename T, typename V, bool kSparse>
void launch_tiled_gemm(const GemmParams<T, V>& p, cudaStream_t stream) {
  using L = Layout<T, V>;
  const int64_t grid_n = (p.n + kBN - 1) / kBN;
  const int64_t grid_m = (p.m + kBM - 1) / kBM;
  if (grid_m > 65535 || grid_n > 0x7FFFFFFF) {
    throw CudaError("tiled GEMM: M = " + std::to_string(p.m) + " rows exceed the grid limit of " +
                    std::to_string(65535 * kBM));
  }
  SALR_CUDA_CHECK(cudaFuncSetAttribute(tiled_gemm_kernel<T, V, kSparse>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L::kBytes)));
  tiled_gemm_kernel<T, V, kSparse>
      <<<dim3(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m)), kThreads, L::kBytes, stream>>>(p);
  SALR_CUDA_CHECK_LAUNCH();
}

}  // namespace tiled
}  // namespace Cuda
}  // namespace salr
