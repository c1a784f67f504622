// Dense CUDA GEMMs C = A·Bᵀ: the two GEMMs of FusedAdapterGemm and SALRLinear's H = X·A_catᵀ. Few rows
// (decode phase) take a warp-per-output-column GEMV; more rows take the tiled GEMM's dense segment.
#include "fused_adapter_gemm_impl.cuh"

#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "salr_linear_impl.cuh"
#include "tiled_gemm.cuh"

namespace salr {
namespace Cuda {
namespace {

constexpr int kGemvWarps = 4;

// C [m, n] = A [m, k] · B [n, k]ᵀ for m <= MB: warp j owns column j of C; lanes stride over k so that the
// row of B (the large operand: A_cat, or B_cat) is read coalesced, once.
template <typename T, int MB>
__global__ void __launch_bounds__(32 * kGemvWarps)
    dense_gemv_kernel(const T* a, int64_t m, int64_t k, const T* b, int64_t n, T* c) {
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (j >= n) return;
  float acc[MB];
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = 0.f;
  for (int64_t kk = lane; kk < k; kk += 32) {
    const float bv = to_f32(b[j * k + kk]);
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      if (i < m) acc[i] = fmaf(to_f32(a[i * k + kk]), bv, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = warp_sum(acc[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      if (i < m) c[i * n + j] = from_f32<T>(acc[i]);
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int MB>
void launch_gemv(cudaStream_t stream, const T* a, int64_t m, int64_t k, const T* b, int64_t n, T* c) {
  const int64_t blocks = (n + kGemvWarps - 1) / kGemvWarps;
  dense_gemv_kernel<T, MB><<<static_cast<unsigned>(blocks), 32 * kGemvWarps, 0, stream>>>(a, m, k, b, n, c);
  SALR_CUDA_CHECK_LAUNCH();
}

template <typename T>
void dense_nt(cudaStream_t stream, const T* a, int64_t m, int64_t k, const T* b, int64_t n, T* c) {
  if (m <= 1) {
    launch_gemv<T, 1>(stream, a, m, k, b, n, c);
  } else if (m <= 2) {
    launch_gemv<T, 2>(stream, a, m, k, b, n, c);
  } else if (m <= 4) {
    launch_gemv<T, 4>(stream, a, m, k, b, n, c);
  } else if (m <= kGemvMaxM) {
    launch_gemv<T, 8>(stream, a, m, k, b, n, c);
  } else {
    tiled::GemmParams<T, T> p;
    p.y = c;
    p.ldy = n;
    p.m = m;
    p.n = n;
    p.xd = a;
    p.ldxd = k;
    p.wd = b;
    p.ldwd = k;
    p.kd = k;
    p.xd_vec = aligned(a, 16) && (k * sizeof(T)) % 16 == 0;
    p.wd_vec = aligned(b, 16) && (k * sizeof(T)) % 16 == 0;
    tiled::launch_tiled_gemm<T, T, false>(p, stream);
  }
}

}  // namespace

void LaunchDenseNTKernel(cudaStream_t stream, DType t, const void* a, int64_t m, int64_t k, const void* b, int64_t n,
                         void* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    SALR_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<size_t>(m * n) * dtype_size(t), stream));
    return;
  }
  if (t == DType::kFloat16) {
    dense_nt<half>(stream, static_cast<const half*>(a), m, k, static_cast<const half*>(b), n, static_cast<half*>(c));
  } else {
    dense_nt<float>(stream, static_cast<const float*>(a), m, k, static_cast<const float*>(b), n,
                    static_cast<float*>(c));
  }
}

void LaunchFusedAdapterGemmKernel(cudaStream_t stream, DType t, const void* x, int64_t m, int64_t k,
                                  const void* a_cat, int64_t r, const void* b_cat, int64_t n, void* h, void* y) {
  if (m == 0 || n == 0) return;
  if (r == 0) {
    SALR_CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(m * n) * dtype_size(t), stream));
    return;
  }
  LaunchDenseNTKernel(stream, t, x, m, k, a_cat, r, h);  // H [m, r]
  LaunchDenseNTKernel(stream, t, h, m, r, b_cat, n, y);  // Y [m, n]
}

}  // namespace Cuda
}  // namespace salr
