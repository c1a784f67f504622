// Device helpers of the CUDA kernels: fp16/fp32 conversion, warp reductions and scans, cp.async wrappers.
// Included by .cu files only.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace salr {
namespace Cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ half from_f32<half>(float v) { return __float2half_rn(v); }

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  return from_f32<To>(to_f32(v));
}
template <>
__device__ __forceinline__ half convert<half, half>(half v) { return v; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

// Inclusive prefix sum over the warp's lanes.
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

// ---- cp.async (sm_80+): global -> shared copies that bypass registers, so the next tile's loads are in
// flight while the current tile is computed. `bytes` < size zero-fills the rest of the destination and
// reads only `bytes` bytes, which is how tails are loaded without reading past a tensor's end. Older
// architectures get synchronous copies with the same semantics.

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
#else
  auto* d = static_cast<unsigned char*>(smem);
  const auto* s = static_cast<const unsigned char*>(gmem);
  for (int i = 0; i < 16; ++i) d[i] = i < bytes ? s[i] : 0;
#endif
}

__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
#else
  auto* d = static_cast<unsigned char*>(smem);
  const auto* s = static_cast<const unsigned char*>(gmem);
  for (int i = 0; i < 8; ++i) d[i] = i < bytes ? s[i] : 0;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace Cuda
}  // namespace salr
