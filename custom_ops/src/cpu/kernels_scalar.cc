// Portable kernels: the reference every SIMD set is tested against, and the fallback on CPUs without one.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "q24_layout.h"

namespace salr {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: mant * 2^-24 is exact in float
      const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Round to nearest even, as F16C's vcvtps2ph with imm 0 does, so every kernel set rounds alike.
uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {  // |f| >= 65536, inf or nan
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 113u << 23) {  // result is subnormal or zero: let float addition do the rounding
    const uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float magic;
    std::memcpy(&magic, &magic_bits, 4);
    float a;
    std::memcpy(&a, &u, 4);
    a += magic;
    uint32_t ab;
    std::memcpy(&ab, &a, 4);
    o = ab - magic_bits;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu;
    u += mant_odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

namespace {

template <ValueType V>
inline float value_at(const void* values, int64_t i) {
  if constexpr (V == ValueType::kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(values)[i]);
  } else {
    return static_cast<const float*>(values)[i];
  }
}

template <ValueType V>
void gemv_rows_t(const SparseWeight& w, const float* x, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.bitmap + n * w.width;
    int64_t pos = w.row_offsets[n];
    float acc = 0.f;
    for (int64_t g = 0; g < w.width; ++g) {
      unsigned b = row[g];
      while (b) {
        const int j = __builtin_ctz(b);
        acc += value_at<V>(w.values, pos++) * x[8 * g + j];
        b &= b - 1;
      }
    }
    y[n - n0] = acc;
  }
}

void gemv_rows(const SparseWeight& w, const float* x, float* y, int64_t n0, int64_t n1) {
  if (w.vtype == ValueType::kFloat16) {
    gemv_rows_t<ValueType::kFloat16>(w, x, y, n0, n1);
  } else {
    gemv_rows_t<ValueType::kFloat32>(w, x, y, n0, n1);
  }
}

template <ValueType V>
int64_t decode_row_t(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, float* out) {
  const uint8_t* row = w.bitmap + n * w.width;
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned b = row[g];
    for (int j = 0; j < 8; ++j) *out++ = ((b >> j) & 1u) ? value_at<V>(w.values, pos++) : 0.f;
  }
  return pos;
}

int64_t decode_row_f32(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, float* out) {
  return w.vtype == ValueType::kFloat16 ? decode_row_t<ValueType::kFloat16>(w, n, g0, g1, pos, out)
                                        : decode_row_t<ValueType::kFloat32>(w, n, g0, g1, pos, out);
}

template <ValueType V>
int64_t extract_row_t(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, int shift,
                      int32_t* idx, float* val) {
  const uint8_t* row = w.bitmap + n * w.width;
  int64_t cnt = 0;
  for (int64_t g = g0; g < g1; ++g) {
    unsigned b = row[g];
    while (b) {
      idx[cnt] = static_cast<int32_t>((8 * g + __builtin_ctz(b)) << shift);
      val[cnt] = value_at<V>(w.values, pos + cnt);
      ++cnt;
      b &= b - 1;
    }
  }
  return cnt;
}

int64_t extract_row(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, int shift, int32_t* idx,
                    float* val) {
  return w.vtype == ValueType::kFloat16 ? extract_row_t<ValueType::kFloat16>(w, n, g0, g1, pos, shift, idx, val)
                                        : extract_row_t<ValueType::kFloat32>(w, n, g0, g1, pos, shift, idx, val);
}

template <ValueType V>
void gemm_rows_small_t(const SparseWeight& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, int64_t n0,
                       int64_t n1) {
  float acc[kSmallRowsM];
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc, acc + m, 0.f);
    const uint8_t* row = w.bitmap + n * w.width;
    int64_t pos = w.row_offsets[n];
    for (int64_t g = 0; g < w.width; ++g) {
      for (unsigned b = row[g]; b != 0; b &= b - 1) {
        const float v = value_at<V>(w.values, pos++);
        const int64_t col = 8 * g + __builtin_ctz(b);
        for (int i = 0; i < m; ++i) acc[i] += v * x[i * ldx + col];
      }
    }
    for (int i = 0; i < m; ++i) y[i * ldy + (n - n0)] = acc[i];
  }
}

void gemm_rows_small(const SparseWeight& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
  if (w.vtype == ValueType::kFloat16) {
    gemm_rows_small_t<ValueType::kFloat16>(w, x, ldx, m, y, ldy, n0, n1);
  } else {
    gemm_rows_small_t<ValueType::kFloat32>(w, x, ldx, m, y, ldy, n0, n1);
  }
}

void dot_nt(int64_t m, int64_t n, int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
            int64_t ldy, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float* xi = x + i * ldx;
      const float* wj = w + j * ldw;
      float acc = 0.f;
      for (int64_t k = 0; k < len; ++k) acc += xi[k] * wj[k];
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + acc : acc;
    }
  }
}

void axpy_block(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc, int nvec) {
  const int len = 8 * nvec;
  for (int64_t i = 0; i < cnt; ++i) {
    const float v = val[i];
    const float* xp = xt + off[i];
    for (int j = 0; j < len; ++j) acc[j] += v * xp[j];
  }
}

void dense_block(const float* w, int64_t ldw, int rows, int64_t len, const float* xt, int64_t stride, float* acc,
                 int64_t ldacc, int nvec) {
  const int width = 8 * nvec;
  for (int r = 0; r < rows; ++r) {
    float* a = acc + r * ldacc;
    for (int64_t k = 0; k < len; ++k) {
      const float v = w[r * ldw + k];
      const float* xp = xt + k * stride;
      for (int j = 0; j < width; ++j) a[j] += v * xp[j];
    }
  }
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// The integer path's arithmetic, in its plainest form, on the packed layout (q24_layout.h): per 32-column
// block an exact integer dot product scaled by the block's activation scale, per step by the group's scale.
void gemv_rows_q24(const SparseWeight& w, const int8_t* xp, const float* xs8, float* y, int64_t n0, int64_t n1) {
  const int64_t steps = w.cols / 64;
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t s = 0; s < steps; ++s) {
      const uint8_t* p = w.q24 + q24_step_offset(w, n, s);
      const uint8_t* v = p + 8;
      int32_t dot[2] = {0, 0};  // columns 0-31, 32-63 of the step
      for (int j = 0; j < 32; ++j) {
        const int64_t col = 64 * s + 4 * (j / 2) + ((p[j % 8] >> (2 * (j / 8))) & 3);
        const int q = w.bits == 8 ? static_cast<int8_t>(v[j])
                                  : static_cast<int8_t>(j < 16 ? v[j] << 4 : v[j - 16] & 0xf0);  // 16 q
        dot[j / 16] += q * xp[q24_activation_index(col)];
      }
      float scale;
      std::memcpy(&scale, v + q24_value_bytes(w.bits), 4);
      acc += (static_cast<float>(dot[0]) * xs8[8 * s] + static_cast<float>(dot[1]) * xs8[8 * s + 4]) * scale;
    }
    y[n - n0] = acc;
  }
}

void run_serial(void*, int64_t tasks, void (*fn)(void*, int64_t), void* arg) {
  for (int64_t i = 0; i < tasks; ++i) fn(arg, i);
}

}  // namespace

void dequantize_values(const SparseWeight& w, int64_t v0, int64_t v1, float* out) {
  for (int64_t i = v0, group = v0 / w.group_size, left = w.group_size - v0 % w.group_size; i < v1; ++i) {
    *out++ = static_cast<float>(quantized_at(w, i)) * half_to_float(w.scales[group]);
    if (--left == 0) {  // no division per value
      ++group;
      left = w.group_size;
    }
  }
}

void quantize_q24(const float* x, int64_t k, int bits, int8_t* xp, float* xs8) {
  const float unpack = bits == 4 ? 1.f / 16.f : 1.f;  // int4 values are read as 16 q
  for (int64_t b = 0; b < k; b += 32) {
    float amax = 0.f;
    for (int64_t c = b; c < b + 32; ++c) amax = std::fmax(amax, std::fabs(x[c]));
    const float scale = amax / 127.f;
    for (int i = 0; i < 4; ++i) xs8[b / 8 + i] = scale * unpack;
    for (int64_t c = b; c < b + 32; ++c) {
      // nearbyint rounds half to even under the default rounding mode, as the SIMD conversions do
      xp[q24_activation_index(c)] =
          scale > 0.f ? static_cast<int8_t>(std::fmin(127.f, std::fmax(-127.f, std::nearbyint(x[c] / scale)))) : 0;
    }
  }
}

void dot_rows_f16(const uint16_t* a, int64_t rows, int64_t lda, int64_t len, const float* x, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0.f;
    for (int64_t c = 0; c < len; ++c) acc += half_to_float(a[r * lda + c]) * x[c];
    out[r] = acc;
  }
}

void panels_f16(const AdapterPanels& p, const float* t, float* y, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* panel = p.b + 8 * p.offsets[g];
    const float* tg = t + p.first[g];
    float* yg = y + 8 * (g - g0);
    for (int64_t r = 0; r < p.offsets[g + 1] - p.offsets[g]; ++r) {
      for (int j = 0; j < 8; ++j) yg[j] += tg[r] * half_to_float(panel[8 * r + j]);
    }
  }
}

Runner serial_runner() {
  Runner r;
  r.run = run_serial;
  return r;
}

const KernelSet& scalar_kernels() {
  static const KernelSet ks = {"scalar",   gemv_rows,   decode_row_f32, extract_row,       dot_nt,
                               axpy_block, dense_block, f16_to_f32,     f32_to_f16,        dequantize_values,
                               gemv_rows_q24, quantize_q24, dot_rows_f16, panels_f16, gemm_rows_small};
  return ks;
}

#if !defined(__x86_64__)
const KernelSet* avx2_kernels() { return nullptr; }
#endif
#if !defined(__aarch64__)
const KernelSet* neon_kernels() { return nullptr; }
#endif

const KernelSet& best_kernels() {
  const char* force = std::getenv("SALR_KERNELS");
  if (force && std::strcmp(force, "scalar") == 0) return scalar_kernels();
  if (force && std::strcmp(force, "avx2") == 0 && avx2_kernels()) return *avx2_kernels();
  if (force && std::strcmp(force, "neon") == 0 && neon_kernels()) return *neon_kernels();
  if (const KernelSet* ks = avx2_kernels()) return *ks;
  if (const KernelSet* ks = neon_kernels()) return *ks;
  return scalar_kernels();
}

}  // namespace salr
