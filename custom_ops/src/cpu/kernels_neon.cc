// AArch64 NEON kernels (Advanced SIMD is mandatory on AArch64, so no run-time check is needed).
//
// The batch-1 path mirrors the AVX2 one: a 16-byte table lookup (tbl) expands the fp16 values of one bitmap
// byte into 8 dense lanes, zeroing the lanes of unset bits (out-of-range indices read as 0), then fcvtl
// widens to fp32 and fmla accumulates; two rows per pass share the x loads. The prefill path reuses the
// driver's (column, value) lists with a 64-output register block (16 q registers of the 32 available).
// Decode-to-buffer and extraction use the portable loops: they are not on the batch-1 critical path.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace salr {
namespace {

struct NeonTables {
  uint8_t expand_f16[256][16];  // tbl indices: lane j <- value rank(j) (2 bytes), 0xFF -> 0
  uint8_t expand_f32[256][32];  // tbl2 indices for fp32 values (4 bytes per lane)
  uint8_t bytes_f16[256];
  uint8_t bytes_f32[256];
  constexpr NeonTables() : expand_f16(), expand_f32(), bytes_f16(), bytes_f32() {
    for (int b = 0; b < 256; ++b) {
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        const bool set = (b >> j) & 1;
        for (int q = 0; q < 2; ++q) expand_f16[b][2 * j + q] = set ? static_cast<uint8_t>(2 * r + q) : 0xFF;
        for (int q = 0; q < 4; ++q) expand_f32[b][4 * j + q] = set ? static_cast<uint8_t>(4 * r + q) : 0xFF;
        r += set;
      }
      bytes_f16[b] = static_cast<uint8_t>(2 * r);
      bytes_f32[b] = static_cast<uint8_t>(4 * r);
    }
  }
};
constexpr NeonTables kTab;

struct F8 {
  float32x4_t lo, hi;
};

template <ValueType V>
inline F8 expand(const uint8_t* p, unsigned b) {
  F8 w;
  if constexpr (V == ValueType::kFloat16) {
    const uint8x16_t raw = vld1q_u8(p);
    const uint8x16_t dense = vqtbl1q_u8(raw, vld1q_u8(kTab.expand_f16[b]));
    const float16x8_t h = vreinterpretq_f16_u8(dense);
    w.lo = vcvt_f32_f16(vget_low_f16(h));
    w.hi = vcvt_high_f32_f16(h);
  } else {
    uint8x16x2_t raw;
    raw.val[0] = vld1q_u8(p);
    raw.val[1] = vld1q_u8(p + 16);
    w.lo = vreinterpretq_f32_u8(vqtbl2q_u8(raw, vld1q_u8(kTab.expand_f32[b])));
    w.hi = vreinterpretq_f32_u8(vqtbl2q_u8(raw, vld1q_u8(kTab.expand_f32[b] + 16)));
  }
  return w;
}

template <ValueType V>
constexpr int64_t kValueSize = V == ValueType::kFloat16 ? 2 : 4;

template <ValueType V>
inline unsigned value_bytes(unsigned b) {
  return V == ValueType::kFloat16 ? kTab.bytes_f16[b] : kTab.bytes_f32[b];
}

template <ValueType V, int R>
inline void rows_unstructured(const uint8_t* const* bm, const uint8_t** vp, const float* x, int64_t width,
                              float* out) {
  float32x4_t acc[R][2];
  const uint8_t* v[R];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = vdupq_n_f32(0.f);
    v[r] = vp[r];
  }
  for (int64_t g = 0; g < width; ++g) {
    if ((g & 15) == 0) {
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(v[r] + 8192);
        __builtin_prefetch(bm[r] + g + 2048);
      }
    }
    const float32x4_t x0 = vld1q_f32(x + 8 * g);
    const float32x4_t x1 = vld1q_f32(x + 8 * g + 4);
    for (int r = 0; r < R; ++r) {
      const unsigned b = bm[r][g];
      const F8 w = expand<V>(v[r], b);
      v[r] += value_bytes<V>(b);
      acc[r][0] = vfmaq_f32(acc[r][0], w.lo, x0);
      acc[r][1] = vfmaq_f32(acc[r][1], w.hi, x1);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
}

template <ValueType V>
float row_tail(const SparseWeight& w, int64_t n, const float* x) {
  const uint8_t* row = w.bitmap + n * w.width;
  int64_t pos = w.row_offsets[n];
  float acc = 0.f;
  for (int64_t g = 0; g < w.width; ++g) {
    unsigned b = row[g];
    while (b) {
      const int j = __builtin_ctz(b);
      const float v = V == ValueType::kFloat16 ? half_to_float(static_cast<const uint16_t*>(w.values)[pos])
                                               : static_cast<const float*>(w.values)[pos];
      ++pos;
      acc += v * x[8 * g + j];
      b &= b - 1;
    }
  }
  return acc;
}

template <ValueType V>
void gemv_rows_t(const SparseWeight& w, const float* x, float* y, int64_t n0, int64_t n1) {
  const uint8_t* values = static_cast<const uint8_t*>(w.values);
  const int64_t* off = w.row_offsets;
  // Loads read 8 values (16 or 32 bytes) from the current position: rows ending within 8 values of the end
  // of `values` take the scalar path.
  const int64_t safe_end = w.nnz - 8;
  int64_t n = n0;
  for (; n + 2 <= n1 && off[n + 2] <= safe_end; n += 2) {
    const uint8_t* bm[2] = {w.bitmap + n * w.width, w.bitmap + (n + 1) * w.width};
    const uint8_t* vp[2] = {values + off[n] * kValueSize<V>, values + off[n + 1] * kValueSize<V>};
    rows_unstructured<V, 2>(bm, vp, x, w.width, y + (n - n0));
  }
  for (; n < n1; ++n) {
    if (off[n + 1] <= safe_end) {
      const uint8_t* bm[1] = {w.bitmap + n * w.width};
      const uint8_t* vp[1] = {values + off[n] * kValueSize<V>};
      rows_unstructured<V, 1>(bm, vp, x, w.width, y + (n - n0));
    } else {
      y[n - n0] = row_tail<V>(w, n, x);
    }
  }
}

void gemv_rows(const SparseWeight& w, const float* x, float* y, int64_t n0, int64_t n1) {
  if (w.vtype == ValueType::kFloat16) {
    gemv_rows_t<ValueType::kFloat16>(w, x, y, n0, n1);
  } else {
    gemv_rows_t<ValueType::kFloat32>(w, x, y, n0, n1);
  }
}

template <int MI, int NJ>
inline void dot_block(int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                      bool accumulate) {
  float32x4_t acc[MI][NJ];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = vdupq_n_f32(0.f);
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    float32x4_t wv[NJ];
    for (int j = 0; j < NJ; ++j) wv[j] = vld1q_f32(w + j * ldw + k);
    for (int i = 0; i < MI; ++i) {
      const float32x4_t xv = vld1q_f32(x + i * ldx + k);
      for (int j = 0; j < NJ; ++j) acc[i][j] = vfmaq_f32(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MI; ++i) {
    for (int j = 0; j < NJ; ++j) {
      float s = vaddvq_f32(acc[i][j]);
      for (int64_t t = k; t < len; ++t) s += x[i * ldx + t] * w[j * ldw + t];
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + s : s;
    }
  }
}

template <int MI>
inline void dot_rows(int64_t n, int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                     int64_t ldy, bool accumulate) {
  constexpr int kNJ = MI == 1 ? 4 : 2;
  int64_t j = 0;
  for (; j + kNJ <= n; j += kNJ) dot_block<MI, kNJ>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate);
  for (; j < n; ++j) dot_block<MI, 1>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate);
}

void dot_nt(int64_t m, int64_t n, int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
            int64_t ldy, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) dot_rows<4>(n, len, x + i * ldx, ldx, w, ldw, y + i * ldy, ldy, accumulate);
  switch (m - i) {
    case 3: dot_rows<3>(n, len, x + i * ldx, ldx, w, ldw, y + i * ldy, ldy, accumulate); break;
    case 2: dot_rows<2>(n, len, x + i * ldx, ldx, w, ldw, y + i * ldy, ldy, accumulate); break;
    case 1: dot_rows<1>(n, len, x + i * ldx, ldx, w, ldw, y + i * ldy, ldy, accumulate); break;
    default: break;
  }
}

template <int NV>
inline void axpy_nv(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc) {
  float32x4_t a[2 * NV];
  for (int q = 0; q < 2 * NV; ++q) a[q] = vld1q_f32(acc + 4 * q);
  for (int64_t i = 0; i < cnt; ++i) {
    const float v = val[i];
    const float* xp = xt + off[i];
    for (int q = 0; q < 2 * NV; ++q) a[q] = vfmaq_n_f32(a[q], vld1q_f32(xp + 4 * q), v);
  }
  for (int q = 0; q < 2 * NV; ++q) vst1q_f32(acc + 4 * q, a[q]);
}

void axpy_block(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc, int nvec) {
  switch (nvec) {
    case 1: axpy_nv<1>(off, val, cnt, xt, acc); break;
    case 2: axpy_nv<2>(off, val, cnt, xt, acc); break;
    case 3: axpy_nv<3>(off, val, cnt, xt, acc); break;
    case 4: axpy_nv<4>(off, val, cnt, xt, acc); break;
    case 5: axpy_nv<5>(off, val, cnt, xt, acc); break;
    case 6: axpy_nv<6>(off, val, cnt, xt, acc); break;
    case 7: axpy_nv<7>(off, val, cnt, xt, acc); break;
    default: axpy_nv<8>(off, val, cnt, xt, acc); break;
  }
}

// R rows x 8 NV columns: 4 R NV q-register accumulators (at most 24 of the 32), the W entry as a scalar operand.
template <int R, int NV>
inline void dense_rn(const float* w, int64_t ldw, int64_t len, const float* xt, int64_t stride, float* acc,
                     int64_t ldacc) {
  float32x4_t a[R][2 * NV];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 2 * NV; ++q) a[r][q] = vld1q_f32(acc + r * ldacc + 4 * q);
  for (int64_t k = 0; k < len; ++k) {
    float32x4_t x[2 * NV];
    for (int q = 0; q < 2 * NV; ++q) x[q] = vld1q_f32(xt + k * stride + 4 * q);
    for (int r = 0; r < R; ++r) {
      const float v = w[r * ldw + k];
      for (int q = 0; q < 2 * NV; ++q) a[r][q] = vfmaq_n_f32(a[r][q], x[q], v);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 2 * NV; ++q) vst1q_f32(acc + r * ldacc + 4 * q, a[r][q]);
}

template <int NV>
void dense_nv(const float* w, int64_t ldw, int rows, int64_t len, const float* xt, int64_t stride, float* acc,
              int64_t ldacc) {
  switch (rows) {
    case 6: dense_rn<6, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
    case 5: dense_rn<5, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
    case 4: dense_rn<4, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
    case 3: dense_rn<3, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
    case 2: dense_rn<2, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
    default: dense_rn<1, NV>(w, ldw, len, xt, stride, acc, ldacc); break;
  }
}

void dense_block(const float* w, int64_t ldw, int rows, int64_t len, const float* xt, int64_t stride, float* acc,
                 int64_t ldacc, int nvec) {
  if (nvec >= 2) {
    dense_nv<2>(w, ldw, rows, len, xt, stride, acc, ldacc);
  } else {
    dense_nv<1>(w, ldw, rows, len, xt, stride, acc, ldacc);
  }
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(src + i));
    vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(h)));
    vst1q_f32(dst + i + 4, vcvt_high_f32_f16(h));
  }
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // fcvtn rounds to nearest even (the default FPCR mode), like float_to_half
    const float16x8_t h = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i)), vld1q_f32(src + i + 4));
    vst1q_u16(dst + i, vreinterpretq_u16_f16(h));
  }
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

float32x4_t load4_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

void dot_rows_f16_neon(const uint16_t* a, int64_t rows, int64_t lda, int64_t len, const float* x, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* ar = a + r * lda;
    float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
    for (int64_t c = 0; c < len; c += 8) {
      acc0 = vfmaq_f32(acc0, load4_f16(ar + c), vld1q_f32(x + c));
      acc1 = vfmaq_f32(acc1, load4_f16(ar + c + 4), vld1q_f32(x + c + 4));
    }
    out[r] = vaddvq_f32(vaddq_f32(acc0, acc1));
  }
}

void panels_f16_neon(const AdapterPanels& p, const float* t, float* y, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* panel = p.b + 8 * p.offsets[g];
    const float* tg = t + p.first[g];
    float* yg = y + 8 * (g - g0);
    float32x4_t lo = vld1q_f32(yg), hi = vld1q_f32(yg + 4);
    for (int64_t r = 0; r < p.offsets[g + 1] - p.offsets[g]; ++r) {
      lo = vfmaq_n_f32(lo, load4_f16(panel + 8 * r), tg[r]);
      hi = vfmaq_n_f32(hi, load4_f16(panel + 8 * r + 4), tg[r]);
    }
    vst1q_f32(yg, lo);
    vst1q_f32(yg + 4, hi);
  }
}

}  // namespace

const KernelSet* neon_kernels() {
  static const KernelSet ks = {"neon",     gemv_rows,  scalar_kernels().decode_row_f32, scalar_kernels().extract_row,
                               dot_nt,     axpy_block, dense_block, f16_to_f32,         f32_to_f16,
                               // quantized weights: portable dequantization, then the NEON float kernels
                               // (no integer path yet: null sends batch 1 through the float path too)
                               dequantize_values, nullptr, nullptr, dot_rows_f16_neon, panels_f16_neon,
                               nullptr};  // no gemm_rows_small yet: small batches expand rows into a buffer
  return &ks;
}

}  // namespace salr

#endif  // __aarch64__
