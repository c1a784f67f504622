// x86-64 AVX2 + FMA + F16C kernels, chosen at run time (the library itself is built for baseline x86-64).
//
// Everything after the target pragma is compiled for AVX2 and lives in an anonymous namespace: no inline
// function or template instantiation from this file can be picked by the linker for code that runs on a
// CPU without AVX2. Only avx2_kernels() is visible, and it checks the CPU before handing the set out.
#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "q24_layout.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")

namespace salr {
namespace {

// Lookup tables indexed by a bitmap byte b (bit j <-> column 8g + j). The rank of column j is the number of
// kept columns before it, i.e. the index of its value among the byte's values.
struct Tables {
  // pshufb control: lane j takes fp16 value rank(j) (bytes 2r, 2r+1); 0x80 zeroes the lanes of unset bits,
  // so the shuffle itself produces the zeros and no blend or mask is needed.
  alignas(16) uint8_t expand_f16[256][16];
  // vpermps control for fp32 values: the rank of lane j, or INT32_MIN for an unset bit. vpermps reads only the
  // low 3 bits, and the sign bit then serves as the blendv mask that zeroes the lane: one table load a byte
  // instead of a control and a mask (5-7% at 50% and 2:4, fp32 values, 4096^2, M = 1, 2 threads, from DRAM).
  alignas(32) int32_t perm_f32[256][8];
  // 2:4 fp16 path: the column inside its nibble (0-3) of each of the byte's 4 values, in value order (the
  // low nibble's 2, then the high nibble's 2): half of a vpermilps control (rows_two_four_f16).
  alignas(16) int32_t pos24[256][4];
  // Columns of the set bits, compacted (extract_row).
  alignas(8) uint8_t positions[256][8];
  // Bytes of values a bitmap byte owns: the value pointer then advances with one add.
  uint8_t bytes_f16[256];
  uint8_t bytes_f32[256];
  constexpr Tables()
      : expand_f16(),
        perm_f32(),
        pos24(),
        positions(),
        bytes_f16(),
        bytes_f32() {
    for (int b = 0; b < 256; ++b) {
      for (int half = 0; half < 2; ++half) {
        int slot = 0;
        for (int j = 0; j < 4 && slot < 2; ++j) {
          if ((b >> (4 * half + j)) & 1) {
            pos24[b][2 * half + slot] = j;
            ++slot;
          }
        }
      }
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        if ((b >> j) & 1) {
          expand_f16[b][2 * j] = static_cast<uint8_t>(2 * r);
          expand_f16[b][2 * j + 1] = static_cast<uint8_t>(2 * r + 1);
          perm_f32[b][j] = r;
          positions[b][r] = static_cast<uint8_t>(j);
          ++r;
        } else {
          expand_f16[b][2 * j] = expand_f16[b][2 * j + 1] = 0x80;
          perm_f32[b][j] = INT32_MIN;
        }
      }
      bytes_f16[b] = static_cast<uint8_t>(2 * r);
      bytes_f32[b] = static_cast<uint8_t>(4 * r);
    }
  }
};
constexpr Tables kTab;

// Distances of the software prefetches (DESIGN.md section 5: without them even L3-resident data streams at
// DRAM speed; the hardware prefetcher does not follow several interleaved streams of irregular stride).
constexpr int64_t kPrefetchValueBytes = 8192;
constexpr int64_t kPrefetchBitmapBytes = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dense 8 lanes of one bitmap byte from fp16 values at p (reads 16 bytes: caller guarantees they exist).
inline __m256 expand_f16(const uint8_t* p, unsigned b) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kTab.expand_f16[b]));
  return _mm256_cvtph_ps(_mm_shuffle_epi8(raw, ctl));
}

// Same for fp32 values (reads 32 bytes).
inline __m256 expand_f32(const uint8_t* p, unsigned b) {
  const __m256 raw = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTab.perm_f32[b]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(raw, ctl), _mm256_setzero_ps(), _mm256_castsi256_ps(ctl));
}

template <ValueType V>
inline __m256 expand(const uint8_t* p, unsigned b) {
  if constexpr (V == ValueType::kFloat16) {
    return expand_f16(p, b);
  } else {
    return expand_f32(p, b);
  }
}

template <ValueType V>
inline unsigned value_bytes(unsigned b) {
  return V == ValueType::kFloat16 ? kTab.bytes_f16[b] : kTab.bytes_f32[b];
}

template <ValueType V>
constexpr int64_t kValueSize = V == ValueType::kFloat16 ? 2 : 4;

// R rows (1 or 2) of an unstructured bitmap against one x: the rows share every x load, and their value
// pointers form independent add chains, so the core overlaps two decode streams.
template <ValueType V, int R>
inline void rows_unstructured(const uint8_t* const* bm, const uint8_t** vp, const float* x, int64_t width,
                              float* out) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const uint8_t* v[R];
  for (int r = 0; r < R; ++r) v[r] = vp[r];
  int64_t g = 0;
  for (; g + 8 <= width; g += 8) {
    if ((g & 15) == 0) {
      for (int r = 0; r < R; ++r) {
        // 16 bytes of a half-full bitmap own 128 value bytes in fp16, 256 in fp32: one prefetch per line.
        for (int64_t line = 0; line < 2 * kValueSize<V>; ++line) {
          _mm_prefetch(reinterpret_cast<const char*>(v[r] + kPrefetchValueBytes + 64 * line), _MM_HINT_T0);
        }
        _mm_prefetch(reinterpret_cast<const char*>(bm[r] + g + kPrefetchBitmapBytes), _MM_HINT_T0);
      }
    }
    // 8 bitmap bytes in one load, taken apart with shifts, and the value pointer advanced by popcnt instead of
    // a table: the loop is bound by its loads (a control, the values and x for every byte), and these two
    // loads per byte cost 11-16% at 50% and 70% (4096^2, M = 1, 2 threads, weights from DRAM).
    uint64_t bits[R];
    for (int r = 0; r < R; ++r) std::memcpy(&bits[r], bm[r] + g, 8);
    for (int j = 0; j < 8; j += 2) {
      const __m256 x0 = _mm256_loadu_ps(x + 8 * (g + j));
      const __m256 x1 = _mm256_loadu_ps(x + 8 * (g + j) + 8);
      for (int r = 0; r < R; ++r) {
        const unsigned b0 = static_cast<unsigned>(bits[r] >> (8 * j)) & 255u;
        const unsigned b1 = static_cast<unsigned>(bits[r] >> (8 * j + 8)) & 255u;
        const __m256 w0 = expand<V>(v[r], b0);
        v[r] += kValueSize<V> * __builtin_popcount(b0);
        const __m256 w1 = expand<V>(v[r], b1);
        v[r] += kValueSize<V> * __builtin_popcount(b1);
        acc[r][0] = _mm256_fmadd_ps(w0, x0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, x1, acc[r][1]);
      }
    }
  }
  for (; g < width; ++g) {
    const __m256 x0 = _mm256_loadu_ps(x + 8 * g);
    for (int r = 0; r < R; ++r) {
      const unsigned b0 = bm[r][g];
      acc[r][0] = _mm256_fmadd_ps(expand<V>(v[r], b0), x0, acc[r][0]);
      v[r] += value_bytes<V>(b0);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// The 4 fp32 values of a 2:4 byte b, in lanes 0-3 of `four`, moved to the lanes of their columns.
inline __m256 expand4_f32(__m256 four, unsigned b) {
  const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTab.perm_f32[b]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(four, ctl), _mm256_setzero_ps(), _mm256_castsi256_ps(ctl));
}

// 2:4 rows with fp32 values: every byte owns exactly 4 values, so byte g's values start at 4g and one
// 32-byte load feeds two bytes (16 columns) with no popcount chain.
template <int R>
inline void rows_two_four_f32(const uint8_t* const* bm, const uint8_t** vp, const float* x, int64_t width,
                              float* out) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= width; g += 2) {
    if ((g & 15) == 0) {
      for (int r = 0; r < R; ++r) {
        for (int line = 0; line < 4; ++line) {  // 16 bytes own 64 fp32 values: 4 lines
          _mm_prefetch(reinterpret_cast<const char*>(vp[r] + 16 * g + kPrefetchValueBytes + 64 * line), _MM_HINT_T0);
        }
        _mm_prefetch(reinterpret_cast<const char*>(bm[r] + g + kPrefetchBitmapBytes), _MM_HINT_T0);
      }
    }
    const __m256 x0 = _mm256_loadu_ps(x + 8 * g);
    const __m256 x1 = _mm256_loadu_ps(x + 8 * g + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 raw = _mm256_loadu_ps(reinterpret_cast<const float*>(vp[r] + 16 * g));  // b0's 4 | b1's 4
      acc[r][0] = _mm256_fmadd_ps(expand4_f32(raw, bm[r][g]), x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(expand4_f32(_mm256_permute2f128_ps(raw, raw, 0x11), bm[r][g + 1]), x1, acc[r][1]);
    }
  }
  if (g < width) {  // odd width: the last byte's 4 values are the last values of the row, load only them
    const __m256 x0 = _mm256_loadu_ps(x + 8 * g);
    for (int r = 0; r < R; ++r) {
      const __m256 raw = _mm256_castps128_ps256(_mm_loadu_ps(reinterpret_cast<const float*>(vp[r] + 16 * g)));
      acc[r][0] = _mm256_fmadd_ps(expand4_f32(raw, bm[r][g]), x0, acc[r][0]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// 2:4 rows with fp16 values. Instead of expanding w to 16 lanes (two conversions per 16 columns), the 8
// values of a byte pair (16 columns) become 8 fp32 lanes with one conversion, in memory order
// [b0 lo, b0 hi | b1 lo, b1 hi] (2 values per nibble), and the x of their columns are gathered to match.
// vpermilps gathers only inside 128-bit halves, so x arrives split per pair as xa = [cols 0-3 | 8-11] and
// xb = [cols 4-7 | 12-15] (split_pairs, once per block of rows): one control [pos24[b0] | pos24[b1]] then
// gathers the lo nibbles' x from xa and the hi nibbles' from xb, and a blend joins them. Against gathering
// from plain x, which needed a byte shuffle per pair to put the values in the gathered order, this took 3-6%
// off one core's time (`kernel_selftest --bench 2048 4096 1 2:4 f16`, alternating runs, min of 5).
template <int R>
inline void rows_two_four_f16(const uint8_t* const* bm, const uint8_t** vp, const float* x, const float* xs,
                              int64_t width, float* out) {
  const char* tab = reinterpret_cast<const char*>(kTab.pos24);
  // One byte pair (16 columns) of row r into accumulator acc; xa, xb: the pair's x, split as in xs.
  const auto pair = [&](int r, int64_t h, __m256 xa, __m256 xb, __m256& acc) {
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp[r] + 8 * h)));
    const __m256i ctl = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tab + (size_t{bm[r][h]} << 4)))),
        _mm_load_si128(reinterpret_cast<const __m128i*>(tab + (size_t{bm[r][h + 1]} << 4))), 1);
    acc = _mm256_fmadd_ps(w, _mm256_blend_ps(_mm256_permutevar_ps(xa, ctl), _mm256_permutevar_ps(xb, ctl), 0xCC), acc);
  };
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= width; g += 16) {
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(vp[r] + 8 * g + kPrefetchValueBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vp[r] + 8 * g + kPrefetchValueBytes + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bm[r] + g + kPrefetchBitmapBytes), _MM_HINT_T0);
    }
    for (int64_t h = g; h < g + 16; h += 4) {
      const __m256 x0 = _mm256_loadu_ps(xs + 8 * h);
      const __m256 x1 = _mm256_loadu_ps(xs + 8 * h + 8);
      for (int r = 0; r < R; ++r) pair(r, h, x0, x1, a0[r]);
      const __m256 x2 = _mm256_loadu_ps(xs + 8 * h + 16);
      const __m256 x3 = _mm256_loadu_ps(xs + 8 * h + 24);
      for (int r = 0; r < R; ++r) pair(r, h + 2, x2, x3, a1[r]);
    }
  }
  for (; g + 2 <= width; g += 2) {
    const __m256 x0 = _mm256_loadu_ps(xs + 8 * g);
    const __m256 x1 = _mm256_loadu_ps(xs + 8 * g + 8);
    for (int r = 0; r < R; ++r) pair(r, g, x0, x1, a0[r]);
  }
  if (g < width) {  // odd width: the last byte's 4 values are the last values of the row, load only them
    const __m256 x0 = _mm256_loadu_ps(x + 8 * g);
    for (int r = 0; r < R; ++r) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vp[r] + 8 * g));
      const __m256 w = _mm256_cvtph_ps(_mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(kTab.expand_f16[bm[r][g]]))));
      a0[r] = _mm256_fmadd_ps(w, x0, a0[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
}

// x for rows_two_four_f16: per whole 16 columns, [0-3 | 8-11] then [4-7 | 12-15].
inline void split_pairs(const float* x, int64_t width, float* xs) {
  for (int64_t g = 0; g + 2 <= width; g += 2) {
    const __m256 x0 = _mm256_loadu_ps(x + 8 * g);
    const __m256 x1 = _mm256_loadu_ps(x + 8 * g + 8);
    _mm256_storeu_ps(xs + 8 * g, _mm256_permute2f128_ps(x0, x1, 0x20));
    _mm256_storeu_ps(xs + 8 * g + 8, _mm256_permute2f128_ps(x0, x1, 0x31));
  }
}

// One row with scalar decoding: the last rows of the matrix, whose vector loads would run past `values`.
template <ValueType V>
float row_tail(const SparseWeight& w, int64_t n, const float* x) {
  const uint8_t* row = w.bitmap + n * w.width;
  int64_t pos = w.row_offsets[n];
  float acc = 0.f;
  for (int64_t g = 0; g < w.width; ++g) {
    unsigned b = row[g];
    while (b) {
      const int j = __builtin_ctz(b);
      float v;
      if constexpr (V == ValueType::kFloat16) {
        v = _cvtsh_ss(static_cast<const uint16_t*>(w.values)[pos++]);
      } else {
        v = static_cast<const float*>(w.values)[pos++];
      }
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
  // Unstructured loads read up to 8 values from the current position; only rows ending within 8 values of
  // the end of `values` cannot use them. 2:4 loads stay inside their row.
  const int64_t safe_end = w.two_four ? w.nnz : w.nnz - 8;
  // Split once per block of rows: 2 shuffles per 16 columns, against 2 per row and 16 columns in the loop.
  thread_local std::vector<float> split;
  const float* xs = nullptr;
  if (w.two_four && V == ValueType::kFloat16) {
    if (static_cast<int64_t>(split.size()) < 8 * w.width) split.resize(static_cast<size_t>(8 * w.width));
    split_pairs(x, w.width, split.data());
    xs = split.data();
  }
  int64_t n = n0;
  for (; n + 2 <= n1 && off[n + 2] <= safe_end; n += 2) {
    const uint8_t* bm[2] = {w.bitmap + n * w.width, w.bitmap + (n + 1) * w.width};
    const uint8_t* vp[2] = {values + off[n] * kValueSize<V>, values + off[n + 1] * kValueSize<V>};
    if (w.two_four && V == ValueType::kFloat16) {
      rows_two_four_f16<2>(bm, vp, x, xs, w.width, y + (n - n0));
    } else if (w.two_four) {
      rows_two_four_f32<2>(bm, vp, x, w.width, y + (n - n0));
    } else {
      rows_unstructured<V, 2>(bm, vp, x, w.width, y + (n - n0));
    }
  }
  for (; n < n1; ++n) {
    if (off[n + 1] <= safe_end) {
      const uint8_t* bm[1] = {w.bitmap + n * w.width};
      const uint8_t* vp[1] = {values + off[n] * kValueSize<V>};
      if (w.two_four && V == ValueType::kFloat16) {
        rows_two_four_f16<1>(bm, vp, x, xs, w.width, y + (n - n0));
      } else if (w.two_four) {
        rows_two_four_f32<1>(bm, vp, x, w.width, y + (n - n0));
      } else {
        rows_unstructured<V, 1>(bm, vp, x, w.width, y + (n - n0));
      }
    } else {
      y[n - n0] = row_tail<V>(w, n, x);
    }
  }
}

// Rows of W against M activation rows: each bitmap byte is expanded once and multiplied into M accumulators,
// so for M = 8 the FMAs, not the decode, set the pace. K is walked in blocks of kSmallSpan bytes (512
// columns: 8 rows of x in 16 KiB stay in L1, where whole rows, 128 KiB at K = 4096, do not), with each
// row's accumulators parked in `park` between blocks. One row at a time: two rows would need 2 M
// accumulators, more than the 16 registers hold for M = 8.
constexpr int64_t kSmallSpan = 64;
constexpr int64_t kSmallRows = 32;

template <ValueType V, int M>
void rows_small_m(const SparseWeight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const uint8_t* values = static_cast<const uint8_t*>(w.values);
  // expand reads up to 8 values from a row's current position: rows ending closer than that to the end of
  // `values` (a suffix, the offsets never decrease) are done by row_tail
  int64_t safe = n1;
  while (safe > n0 && w.row_offsets[safe] > w.nnz - 8) --safe;
  alignas(32) float park[kSmallRows][M][8];
  alignas(32) float xs[kSmallSpan][M][8];
  const uint8_t* vp[kSmallRows];
  for (int64_t r0 = n0; r0 < safe; r0 += kSmallRows) {
    const int64_t rows = std::min(kSmallRows, safe - r0);
    for (int64_t r = 0; r < rows; ++r) vp[r] = values + w.row_offsets[r0 + r] * kValueSize<V>;
    std::memset(park, 0, sizeof(park));
    for (int64_t g0 = 0; g0 < w.width; g0 += kSmallSpan) {
      const int64_t g1 = std::min(g0 + kSmallSpan, w.width);
      // The block of x, interleaved so that one byte's M vectors are 256 contiguous bytes: rows of x a power
      // of two apart (16 KiB at K = 4096) all map to the same L1 sets and evicted each other.
      for (int64_t g = g0; g < g1; ++g) {
        for (int i = 0; i < M; ++i) _mm256_store_ps(xs[g - g0][i], _mm256_loadu_ps(x + i * ldx + 8 * g));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* bm = w.bitmap + (r0 + r) * w.width;
        const uint8_t* v = vp[r];
        __m256 acc[M];
        for (int i = 0; i < M; ++i) acc[i] = _mm256_load_ps(park[r][i]);
        // This row's next block (its values as if half full), read after every row's current one: the rows
        // interleave, more streams than the hardware prefetcher follows. Prefetches never fault.
        constexpr int64_t kBlockValueBytes = kSmallSpan * 4 * kValueSize<V>;
        for (int64_t q = 0; q < kBlockValueBytes; q += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(v + kBlockValueBytes + q), _MM_HINT_T0);
        }
        _mm_prefetch(reinterpret_cast<const char*>(bm + g1), _MM_HINT_T0);
        for (int64_t g = g0; g < g1; ++g) {
          const unsigned b = bm[g];
          const __m256 wv = expand<V>(v, b);
          v += value_bytes<V>(b);
          for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(wv, _mm256_load_ps(xs[g - g0][i]), acc[i]);
        }
        vp[r] = v;
        for (int i = 0; i < M; ++i) _mm256_store_ps(park[r][i], acc[i]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < M; ++i) y[i * ldy + (r0 + r - n0)] = hsum(_mm256_load_ps(park[r][i]));
    }
  }
  for (int64_t n = safe; n < n1; ++n) {
    for (int i = 0; i < M; ++i) y[i * ldy + (n - n0)] = row_tail<V>(w, n, x + i * ldx);
  }
}

template <ValueType V>
void gemm_rows_small_t(const SparseWeight& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, int64_t n0,
                       int64_t n1) {
  switch (m) {
    case 8: rows_small_m<V, 8>(w, x, ldx, y, ldy, n0, n1); break;
    case 7: rows_small_m<V, 7>(w, x, ldx, y, ldy, n0, n1); break;
    case 6: rows_small_m<V, 6>(w, x, ldx, y, ldy, n0, n1); break;
    case 5: rows_small_m<V, 5>(w, x, ldx, y, ldy, n0, n1); break;
    case 4: rows_small_m<V, 4>(w, x, ldx, y, ldy, n0, n1); break;
    case 3: rows_small_m<V, 3>(w, x, ldx, y, ldy, n0, n1); break;
    case 2: rows_small_m<V, 2>(w, x, ldx, y, ldy, n0, n1); break;
    default: rows_small_m<V, 1>(w, x, ldx, y, ldy, n0, n1); break;
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
  const uint8_t* values = static_cast<const uint8_t*>(w.values);
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned b = row[g];
    if (pos + 8 <= w.nnz) {
      _mm256_storeu_ps(out, expand<V>(values + pos * kValueSize<V>, b));
      pos += __builtin_popcount(b);
    } else {
      for (int j = 0; j < 8; ++j) {
        float v = 0.f;
        if ((b >> j) & 1u) {
          if constexpr (V == ValueType::kFloat16) {
            v = _cvtsh_ss(static_cast<const uint16_t*>(w.values)[pos++]);
          } else {
            v = static_cast<const float*>(w.values)[pos++];
          }
        }
        out[j] = v;
      }
    }
    out += 8;
  }
  return pos;
}

int64_t decode_row_f32(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, float* out) {
  return w.vtype == ValueType::kFloat16 ? decode_row_t<ValueType::kFloat16>(w, n, g0, g1, pos, out)
                                        : decode_row_t<ValueType::kFloat32>(w, n, g0, g1, pos, out);
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

int64_t extract_row(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, int shift, int32_t* idx,
                    float* val) {
  const uint8_t* row = w.bitmap + n * w.width;
  const __m128i sh = _mm_cvtsi32_si128(shift);
  int64_t cnt = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned b = row[g];
    const __m256i cols = _mm256_add_epi32(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTab.positions[b]))),
        _mm256_set1_epi32(static_cast<int32_t>(8 * g)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + cnt), _mm256_sll_epi32(cols, sh));
    cnt += __builtin_popcount(b);
  }
  // The prefill walks a chunk of rows one K block at a time: 32 interleaved streams, more than the hardware
  // prefetcher follows, so each row asks for its next block now (it is read a whole chunk's work later).
  // Prefetches never fault, so reaching past the last row is harmless.
  const char* next = static_cast<const char*>(w.values) + (pos + cnt) * (w.vtype == ValueType::kFloat16 ? 2 : 4);
  for (int q = 0; q < 4; ++q) _mm_prefetch(next + 64 * q, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + g1), _MM_HINT_T0);
  if (w.vtype == ValueType::kFloat16) {
    f16_to_f32(static_cast<const uint16_t*>(w.values) + pos, val, cnt);
  } else if (cnt > 0) {  // values may be null when the weight keeps nothing
    std::memcpy(val, static_cast<const float*>(w.values) + pos, sizeof(float) * cnt);
  }
  return cnt;
}

// Register-blocked y[i][j] (+)= x_i . w_j for MI activation rows and NJ weight rows.
template <int MI, int NJ>
inline void dot_block(int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                      bool accumulate) {
  __m256 acc[MI][NJ];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    __m256 wv[NJ];
    for (int j = 0; j < NJ; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MI; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MI; ++i) {
    for (int j = 0; j < NJ; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < len; ++t) s += x[i * ldx + t] * w[j * ldw + t];
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + s : s;
    }
  }
}

template <int MI>
inline void dot_rows(int64_t n, int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw, float* y,
                     int64_t ldy, bool accumulate) {
  // One activation row has a single FMA chain per output: several weight rows keep several chains in flight,
  // and a remainder runs as blocks, not row by row (batch-1 adapter inputs: rank 11 = 8 + 3 rows; three
  // single-chain rows had cost more than the eight before them).
  constexpr int kNJ = MI == 1 ? 8 : 2;
  int64_t j = 0;
  for (; j + kNJ <= n; j += kNJ) dot_block<MI, kNJ>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate);
  if constexpr (kNJ > 4) {
    if (n - j >= 4) {
      dot_block<MI, 4>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate);
      j += 4;
    }
  }
  switch (n - j) {
    case 3: dot_block<MI, 3>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate); break;
    case 2: dot_block<MI, 2>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate); break;
    case 1: dot_block<MI, 1>(len, x, ldx, w + j * ldw, ldw, y + j, ldy, accumulate); break;
    default: break;
  }
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

// acc[0 : 8 NV] += val[i] * xt[off[i] ...]. The accumulators are named variables, not an array: GCC does not
// keep an array of 8 __m256 in registers and would store all of them on every iteration. Narrow blocks
// (NV <= 4) alternate two accumulator sets so that one FMA chain's latency hides behind the other's; the
// full block has 8 chains already and takes two entries per iteration for the loop overhead alone
// (4.75 against 4.2 G FMA/s in an L1-resident loop on Zen 3).
#define SALR_ACC_LIST(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int NV>
inline void axpy_nv(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc) {
#define SALR_DECL(q) __m256 a##q = NV > q ? _mm256_loadu_ps(acc + 8 * q) : _mm256_setzero_ps(); \
  __m256 b##q = _mm256_setzero_ps();
  SALR_ACC_LIST(SALR_DECL)
#undef SALR_DECL
  int64_t i = 0;
  for (; i + 2 <= cnt; i += 2) {
    const __m256 v0 = _mm256_broadcast_ss(val + i);
    const __m256 v1 = _mm256_broadcast_ss(val + i + 1);
    const float* x0 = xt + off[i];
    const float* x1 = xt + off[i + 1];
    if constexpr (NV <= 4) {
#define SALR_STEP(q) if constexpr (NV > q) { a##q = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x0 + 8 * q), a##q); \
                                            b##q = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x1 + 8 * q), b##q); }
      SALR_ACC_LIST(SALR_STEP)
#undef SALR_STEP
    } else {
#define SALR_STEP(q) if constexpr (NV > q) a##q = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x0 + 8 * q), a##q);
      SALR_ACC_LIST(SALR_STEP)
#undef SALR_STEP
#define SALR_STEP(q) if constexpr (NV > q) a##q = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x1 + 8 * q), a##q);
      SALR_ACC_LIST(SALR_STEP)
#undef SALR_STEP
    }
  }
  for (; i < cnt; ++i) {
    const __m256 v = _mm256_broadcast_ss(val + i);
    const float* xp = xt + off[i];
#define SALR_STEP(q) if constexpr (NV > q) a##q = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + 8 * q), a##q);
    SALR_ACC_LIST(SALR_STEP)
#undef SALR_STEP
  }
#define SALR_STORE(q) if constexpr (NV > q) _mm256_storeu_ps(acc + 8 * q, _mm256_add_ps(a##q, b##q));
  SALR_ACC_LIST(SALR_STORE)
#undef SALR_STORE
}
#undef SALR_ACC_LIST

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

// R rows x 8 NV columns of accumulators in registers (at most 6 x 2 = 12 of the 16 ymm): per k, NV loads of
// X^T, R broadcasts of W and R * NV FMAs, so two FMA ports stay busy with 12 independent chains. Named
// variables, not an array: GCC spilled the array form to the stack on every FMA (it ran at 0.5 FMA/cycle).
#define SALR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int R, int NV>
inline void dense_rn(const float* w, int64_t ldw, int64_t len, const float* xt, int64_t stride, float* acc,
                     int64_t ldacc) {
#define SALR_DECL(r) __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps(); \
  if constexpr (R > r) { a##r##0 = _mm256_loadu_ps(acc + r * ldacc); \
                         if constexpr (NV > 1) a##r##1 = _mm256_loadu_ps(acc + r * ldacc + 8); }
  SALR_ROWS(SALR_DECL)
#undef SALR_DECL
  for (int64_t k = 0; k < len; ++k) {
    const __m256 x0 = _mm256_loadu_ps(xt + k * stride);
    const __m256 x1 = NV > 1 ? _mm256_loadu_ps(xt + k * stride + 8) : x0;
#define SALR_STEP(r) if constexpr (R > r) { const __m256 v = _mm256_broadcast_ss(w + r * ldw + k); \
                                            a##r##0 = _mm256_fmadd_ps(v, x0, a##r##0); \
                                            if constexpr (NV > 1) a##r##1 = _mm256_fmadd_ps(v, x1, a##r##1); }
    SALR_ROWS(SALR_STEP)
#undef SALR_STEP
  }
#define SALR_STORE(r) if constexpr (R > r) { _mm256_storeu_ps(acc + r * ldacc, a##r##0); \
                                             if constexpr (NV > 1) _mm256_storeu_ps(acc + r * ldacc + 8, a##r##1); }
  SALR_ROWS(SALR_STORE)
#undef SALR_STORE
}
#undef SALR_ROWS

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

// ---- quantized values (bitmap format v2) ---------------------------------------------------------------

// 8 packed nibbles (4 bytes at p, low nibble first) -> 8 int32 lanes q = nibble - 8.
inline __m256i unpack8_int4(const uint8_t* p) {
  uint32_t four;
  std::memcpy(&four, p, 4);
  const __m128i v = _mm_cvtsi32_si128(static_cast<int>(four));
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i q = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
  return _mm256_sub_epi32(_mm256_cvtepu8_epi32(q), _mm256_set1_epi32(8));
}

void dequant(const SparseWeight& w, int64_t v0, int64_t v1, float* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(w.values);
  float* o = out - v0;  // o[i] is value i
  // one division for the whole range: a divide per group cost more than the group's conversions
  for (int64_t i = v0, group = v0 / w.group_size; i < v1; ++group) {
    const int64_t end = std::min(v1, (group + 1) * w.group_size);
    const float scale = _cvtsh_ss(w.scales[group]);
    const __m256 sv = _mm256_set1_ps(scale);
    if (w.bits == 4 && (i & 1)) {  // a run starting on a high nibble: one value, then whole bytes
      o[i] = static_cast<float>(quantized_at(w, i)) * scale;
      ++i;
    }
    for (; i + 8 <= end; i += 8) {  // reads values [i, i + 8) only, all below end <= nnz
      const __m256i q = w.bits == 8
          ? _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i)))
          : unpack8_int4(bytes + i / 2);
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sv));
    }
    for (; i < end; ++i) o[i] = static_cast<float>(quantized_at(w, i)) * scale;
  }
}

// The integer path on the packed layout and activations of q24_layout.h: one ymm of a step's activations holds
// columns 0-15 | 32-47, the next 16-31 | 48-63. A row's step control [q0, q1 | q2, q3] (q_i: 8 byte indices
// into 16-column segment i) then gathers the 32 kept activations in value order with one in-lane shuffle of
// each ymm and a blend: lane 0 = values 0-15 (columns 0-31), lane 1 = values 16-31 (columns 32-63). The
// control comes from the 8 code bytes broadcast to the 4 qwords, shifted right by 0, 2, 4, 6 bits (qword Q
// holds the codes of values 8Q..8Q+7), masked to 2 bits and offset by the group's first column inside its
// segment.
struct Q24Constants {
  __m256i code_shift, two_bits, group_offset, nibble_shift, high_nibble, ones16;
};

inline Q24Constants q24_constants() {
  Q24Constants k;
  k.code_shift = _mm256_setr_epi64x(0, 2, 4, 6);
  k.two_bits = _mm256_set1_epi8(3);
  k.group_offset = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12,
                                    0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  k.nibble_shift = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);  // lane 0: low nibbles, lane 1: high nibbles
  k.high_nibble = _mm256_set1_epi8(static_cast<char>(0xf0));
  k.ones16 = _mm256_set1_epi16(1);
  return k;
}

template <int BITS>
inline __m256i step_values(const uint8_t* v, const Q24Constants& k) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  } else {  // 16 q as signed bytes: value i in byte i (i < 16, low nibble) or byte i - 16 (high nibble)
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm256_and_si256(_mm256_sllv_epi32(b, k.nibble_shift), k.high_nibble);
  }
}

// One row-step: 8 fp32 partial sums (dword lanes 0-3: columns 0-31, 4-7: columns 32-63) of the row's 32 kept
// activations times its 32 values, before scaling. maddubs needs an unsigned operand: |w| and x with w's sign.
template <int BITS>
inline __m256 step_dot(const uint8_t* p, __m256i x0, __m256i x1, const Q24Constants& k) {
  long long codes;
  std::memcpy(&codes, p, 8);
  const __m256i code = _mm256_set1_epi64x(codes);
  const __m256i ctl = _mm256_add_epi8(_mm256_and_si256(_mm256_srlv_epi64(code, k.code_shift), k.two_bits),
                                      k.group_offset);
  const __m256i xg = _mm256_blend_epi32(_mm256_shuffle_epi8(x0, ctl), _mm256_shuffle_epi8(x1, ctl), 0xCC);
  const __m256i wq = step_values<BITS>(p + 8, k);
  const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(xg, wq));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, k.ones16));
}

// ROWS rows of the integer path (two pairs, a pair, or a lone row), their step s at rp[r] + s * stride (rows
// 2 and 3 are the next pair's, a second stream). Work and bytes follow the non-zeros: half the multiply-adds
// of a dense int8 dot product, 28 bytes per 64 columns for int4. xs8 holds per step [A x4, B x4], the
// activation scales of the step's two 32-column blocks (over 16 for int4). Prefetches run `prefetch` bytes
// ahead in each stream.
template <int BITS, int ROWS>
inline void rows_q24(const uint8_t* const* rp, int64_t stride, int64_t prefetch, const int8_t* xp, const float* xs8,
                     int64_t steps, float* out) {
  constexpr int64_t kScaleAt = 8 + q24_value_bytes(BITS);
  const Q24Constants k = q24_constants();
  __m256 acc[ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64 * s));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64 * s + 32));
    const __m256 sx = _mm256_loadu_ps(xs8 + 8 * s);
    // unconditional: a branch here cost more than the repeated prefetch of a line
    _mm_prefetch(reinterpret_cast<const char*>(rp[0] + stride * s + prefetch), _MM_HINT_T0);
    if constexpr (ROWS == 4) {
      _mm_prefetch(reinterpret_cast<const char*>(rp[2] + stride * s + prefetch), _MM_HINT_T0);
    }
#pragma GCC unroll 4  // the accumulators must stay in registers
    for (int r = 0; r < ROWS; ++r) {
      const uint8_t* p = rp[r] + stride * s;
      const __m256 scale = _mm256_mul_ps(sx, _mm256_broadcast_ss(reinterpret_cast<const float*>(p + kScaleAt)));
      acc[r] = _mm256_fmadd_ps(step_dot<BITS>(p, x0, x1, k), scale, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] = hsum(acc[r]);
}

template <int BITS>
void gemv_rows_q24_t(const SparseWeight& w, const int8_t* xp, const float* xs8, float* y, int64_t n0, int64_t n1) {
  const int64_t steps = w.cols / 64;
  // two pairs ahead in the stream; 4096 x 4096 in DRAM, 2 threads: 2-4x faster than no software prefetch
  // and ahead of 1, 2 and 4 KiB (one pair ahead and the T1/NTA hints: within the machine's noise)
  const int64_t prefetch = 4 * steps * q24_step_bytes(BITS);
  auto lone_row = [&](int64_t n) {
    const uint8_t* rp = w.q24 + q24_step_offset(w, n, 0);
    rows_q24<BITS, 1>(&rp, q24_step_stride(w, n), prefetch, xp, xs8, steps, y + (n - n0));
  };
  int64_t n = n0;
  if (n < n1 && (n & 1)) lone_row(n++);
  // two pairs at a time: the step's activations and scales, loaded once, serve four rows (12-18% fewer
  // cycles than one pair on SmolLM2's shapes, where the kernel is compute-bound)
  for (; n + 3 < n1; n += 4) {
    const uint8_t* rp[4] = {w.q24 + q24_step_offset(w, n, 0), w.q24 + q24_step_offset(w, n + 1, 0),
                            w.q24 + q24_step_offset(w, n + 2, 0), w.q24 + q24_step_offset(w, n + 3, 0)};
    rows_q24<BITS, 4>(rp, q24_step_stride(w, n), prefetch, xp, xs8, steps, y + (n - n0));
  }
  for (; n + 1 < n1; n += 2) {
    const uint8_t* rp[2] = {w.q24 + q24_step_offset(w, n, 0), w.q24 + q24_step_offset(w, n + 1, 0)};
    rows_q24<BITS, 2>(rp, q24_step_stride(w, n), prefetch, xp, xs8, steps, y + (n - n0));
  }
  if (n < n1) lone_row(n);
}

// The same bytes as the portable quantize_q24 (kernels.h): an IEEE division and round-half-even, max and min
// ordered so that NaN columns behave as std::fmax / std::fmin make them behave there.
void quantize_q24(const float* x, int64_t k, int bits, int8_t* xp, float* xs8) {
  const float unpack = bits == 4 ? 1.f / 16.f : 1.f;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-127.f);
  const __m256 hi = _mm256_set1_ps(127.f);
  for (int64_t b = 0; b < k; b += 32) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + b + 8 * i);
      amax = _mm256_max_ps(_mm256_and_ps(v[i], abs_mask), amax);  // a NaN operand yields amax
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float scale = _mm_cvtss_f32(m) / 127.f;
    for (int i = 0; i < 4; ++i) xs8[b / 8 + i] = scale * unpack;
    const __m256 sv = _mm256_set1_ps(scale);
    for (int seg = 0; seg < 2; ++seg) {
      __m128i bytes = _mm_setzero_si128();
      if (scale > 0.f) {
        __m256i q[2];
        for (int h = 0; h < 2; ++h) {
          const __m256 r =
              _mm256_round_ps(_mm256_div_ps(v[2 * seg + h], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          // NaN -> -127, as fmin(127, fmax(-127, NaN)) in the portable version
          q[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);  // columns 0-15 in order
        bytes = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
      }
      const int64_t col = b + 16 * seg;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xp + q24_activation_index(col)), bytes);  // 16 in a row
    }
  }
}

void gemv_rows_q24(const SparseWeight& w, const int8_t* xp, const float* xs8, float* y, int64_t n0, int64_t n1) {
  if (w.bits == 8) {
    gemv_rows_q24_t<8>(w, xp, xs8, y, n0, n1);
  } else {
    gemv_rows_q24_t<4>(w, xp, xs8, y, n0, n1);
  }
}

// ---- compact adapters (AdapterPanels) ------------------------------------------------------------------

inline __m256 load8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

void dot_rows_f16(const uint16_t* a, int64_t rows, int64_t lda, int64_t len, const float* x, float* out) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {  // two rows share each x load
    const uint16_t* a0 = a + r * lda;
    const uint16_t* a1 = a0 + lda;
    __m256 s00 = _mm256_setzero_ps(), s01 = _mm256_setzero_ps(), s10 = _mm256_setzero_ps(),
           s11 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= len; c += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
      s00 = _mm256_fmadd_ps(load8_f16(a0 + c), x0, s00);
      s01 = _mm256_fmadd_ps(load8_f16(a0 + c + 8), x1, s01);
      s10 = _mm256_fmadd_ps(load8_f16(a1 + c), x0, s10);
      s11 = _mm256_fmadd_ps(load8_f16(a1 + c + 8), x1, s11);
    }
    if (c < len) {
      const __m256 x0 = _mm256_loadu_ps(x + c);
      s00 = _mm256_fmadd_ps(load8_f16(a0 + c), x0, s00);
      s10 = _mm256_fmadd_ps(load8_f16(a1 + c), x0, s10);
    }
    out[r] = hsum(_mm256_add_ps(s00, s01));
    out[r + 1] = hsum(_mm256_add_ps(s10, s11));
  }
  if (r < rows) {
    const uint16_t* a0 = a + r * lda;
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t c = 0; c < len; c += 8) s0 = _mm256_fmadd_ps(load8_f16(a0 + c), _mm256_loadu_ps(x + c), s0);
    out[r] = hsum(s0);
  }
}

void panels_f16(const AdapterPanels& p, const float* t, float* y, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* panel = p.b + 8 * p.offsets[g];
    const float* tg = t + p.first[g];
    const int64_t ranks = p.offsets[g + 1] - p.offsets[g];
    float* yg = y + 8 * (g - g0);
    __m256 acc0 = _mm256_loadu_ps(yg), acc1 = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= ranks; r += 2) {  // two chains: the FMA latency is not the bound
      acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(tg + r), load8_f16(panel + 8 * r), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(tg + r + 1), load8_f16(panel + 8 * r + 8), acc1);
    }
    if (r < ranks) acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(tg + r), load8_f16(panel + 8 * r), acc0);
    _mm256_storeu_ps(yg, _mm256_add_ps(acc0, acc1));
  }
}

const KernelSet kAvx2 = {"avx2",     gemv_rows,   decode_row_f32, extract_row, dot_nt,
                         axpy_block, dense_block, f16_to_f32,     f32_to_f16,  dequant,
                         gemv_rows_q24, quantize_q24, dot_rows_f16, panels_f16, gemm_rows_small};

}  // namespace
}  // namespace salr

#pragma GCC pop_options

namespace salr {

const KernelSet* avx2_kernels() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
                         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  return ok ? &kAvx2 : nullptr;
}

}  // namespace salr

#endif  // __x86_64__
