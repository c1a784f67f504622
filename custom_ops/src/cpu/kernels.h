// CPU kernels of the com.salr ops, independent of ONNX Runtime.
//
// Nothing here includes ORT headers: the ORT glue (cpu_ops.cc) validates inputs, converts activations to
// fp32 and hands work to these functions through a Runner, and the standalone NEON test driver
// (custom_ops/tests/kernel_selftest.cc) calls them with a serial Runner.
//
// Contract shared by every kernel (the caller guarantees it; nothing here re-validates):
// - the SparseWeight passed the checks of format.h (offsets, popcounts, padding bits);
// - activation rows `x` are fp32 with a row stride `ldx >= width * 8` floats whose tail past K is zero,
//   so vector loads of whole bitmap groups never leave the buffer and never multiply garbage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace salr {

enum class ValueType : uint8_t { kFloat32, kFloat16 };

// A validated bitmap-encoded weight W [rows, cols] (DESIGN.md section 2).
struct SparseWeight {
  const uint8_t* bitmap = nullptr;      // [rows, width]
  const void* values = nullptr;         // [nnz], fp16 bits or fp32
  const int64_t* row_offsets = nullptr;  // [rows + 1]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t width = 0;  // ceil(cols / 8)
  int64_t nnz = 0;
  ValueType vtype = ValueType::kFloat16;
  // Every aligned group of 4 columns keeps exactly 2 and cols % 8 == 0: each bitmap byte then owns
  // exactly 4 values, so value offsets are fixed and the popcount chain disappears.
  bool two_four = false;
  // Format v2 (quantized values): 0 for float values (vtype applies); 8: int8 q; 4: packed nibbles, value i
  // in byte i / 2 (low nibble first), q = nibble - 8. Value i is q_i * scales[i / group_size].
  int bits = 0;
  const uint16_t* scales = nullptr;  // fp16 [ceil(nnz / group_size)]
  int64_t group_size = 0;
  // The integer path's packed copy (q24_layout.h), or null: the driver then packs one per call.
  const uint8_t* q24 = nullptr;
};

// q of quantized value i (format v2).
inline int quantized_at(const SparseWeight& w, int64_t i) {
  if (w.bits == 8) return static_cast<const int8_t*>(w.values)[i];
  const uint8_t byte = static_cast<const uint8_t*>(w.values)[i >> 1];
  return static_cast<int>((i & 1) ? (byte >> 4) : (byte & 0x0f)) - 8;
}

// Whether the batch-1 integer path applies to a quantized weight: 2:4 rows of whole 64-column steps,
// groups of whole steps that never span rows (each row holds K/2 values).
inline bool int_path_applies(const SparseWeight& w) {
  return w.bits != 0 && w.two_four && w.cols % 64 == 0 && w.group_size % 32 == 0 && (w.cols / 2) % w.group_size == 0;
}

// The compact batch-1 form of a constant adapter whose factors are all exactly fp16 values (exported graphs
// cast them from fp16): half the bytes of the fp32 factors, read as one contiguous stream. A in fp16
// [rank, a_stride] with each row's tail past K zeroed; B as one panel per 8 outputs g holding only the ranks
// where that group's B is non-zero, [first[g], first[g] + offsets[g + 1] - offsets[g]), each as 8 fp16
// (outputs past N zero) at b + 8 * offsets[g].
struct AdapterPanels {
  const uint16_t* a = nullptr;  // null: no compact form
  int64_t a_stride = 0;         // a multiple of 8, >= K
  const uint16_t* b = nullptr;
  const int64_t* offsets = nullptr;  // [ceil(N / 8) + 1], in ranks
  const int32_t* first = nullptr;    // [ceil(N / 8)]
};

// Owns the arrays of an AdapterPanels.
struct AdapterPanelStore {
  std::vector<uint16_t> a, b;
  std::vector<int64_t> offsets;
  std::vector<int32_t> first;
  int64_t a_stride = 0;
  AdapterPanels view() const {
    return a.empty() ? AdapterPanels{} : AdapterPanels{a.data(), a_stride, b.data(), offsets.data(), first.data()};
  }
};

// The compact form of fp32 A [rank, k] and B [n, rank], or an empty store when some entry is not exactly an
// fp16 value (the fp32 factors are then used as they are). Both forms multiply the same numbers; only the
// order of the additions differs.
AdapterPanelStore adapter_panels(const float* a, const float* b, int64_t n, int64_t k, int64_t rank);

// Low-rank adapter and bias of SALRLinear, already in fp32.
struct AdapterTerms {
  const float* a = nullptr;  // [rank, K]
  const float* b = nullptr;  // [N, rank]
  // B^T [rank, N] (row stride b_t_stride), when the caller keeps one (a constant B). Batch 1 then adds B t
  // to 64 outputs at a time with rank x 8 independent FMAs over contiguous rows, instead of a rank-long dot
  // product per output.
  const float* b_t = nullptr;
  int64_t b_t_stride = 0;
  // Optional, with b_t: for each 8 outputs g, the ranks [spans[2g], spans[2g+1]) outside which B^T is zero
  // there. A layer fused from several (block-diagonal B, export/fusion.py) then adds only its own ranks.
  const int32_t* b_t_spans = nullptr;
  int64_t rank = 0;
  const float* bias = nullptr;  // [N] or null
  // Optional: the compact form of the same a and b, which batch 1 then reads instead; the call's tasks
  // compute A x in shares of ranks beside each other, so no pass over A runs on the calling thread alone.
  AdapterPanels panels;
};

// B [n, rank] transposed (AdapterTerms::b_t, stride n): rank * n floats.
std::vector<float> adapter_transposed(const float* b, int64_t n, int64_t rank);
// AdapterTerms::b_t_spans of B [n, rank]: 2 * ceil(n / 8) ints.
std::vector<int32_t> adapter_rank_spans(const float* b, int64_t n, int64_t rank);

// Runs fn(arg, i) for i in [0, tasks), possibly in parallel; returns after all finished.
struct Runner {
  void (*run)(void* self, int64_t tasks, void (*fn)(void*, int64_t), void* arg) = nullptr;
  void* self = nullptr;
  void operator()(int64_t tasks, void (*fn)(void*, int64_t), void* arg) const { run(self, tasks, fn, arg); }
};
Runner serial_runner();

// One instruction-set flavour of the inner loops. The drivers in sparse_linear.cc pick a set once.
struct KernelSet {
  const char* name;
  // y[n - n0] = W[n, :] . x for n in [n0, n1)  (batch-1 decode step).
  void (*gemv_rows)(const SparseWeight& w, const float* x, float* y, int64_t n0, int64_t n1);
  // Expands bitmap bytes [g0, g1) of row n, whose first value is values[pos], into 8 * (g1 - g0)
  // dense floats. Returns the value position after the last byte.
  int64_t (*decode_row_f32)(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, float* out);
  // Column indices shifted left by `shift` (offsets of rows of X^T at a stride of 2^shift floats) and fp32
  // values of the kept entries of row n in bytes [g0, g1); idx has room for 8 * (g1 - g0). Returns the count.
  int64_t (*extract_row)(const SparseWeight& w, int64_t n, int64_t g0, int64_t g1, int64_t pos, int shift,
                         int32_t* idx, float* val);
  // y[i * ldy + j] (+)= x[i, :len] . w[j, :len] for i < m, j < n.
  void (*dot_nt)(int64_t m, int64_t n, int64_t len, const float* x, int64_t ldx, const float* w, int64_t ldw,
                 float* y, int64_t ldy, bool accumulate);
  // acc[0 : 8 * nvec] += sum_i val[i] * xt[off[i] : off[i] + 8 * nvec]. Offsets, not indices times a
  // stride: the multiply would cost an integer op per kept entry in the prefill's inner loop.
  void (*axpy_block)(const int32_t* off, const float* val, int64_t cnt, const float* xt, float* acc, int nvec);
  // acc[r * ldacc + j] += sum_{k < len} w[r * ldw + k] * xt[k * stride + j] for r < rows <= 6, j < 8 * nvec,
  // nvec 1 or 2: the dense prefill microkernel (decoded rows of W against a block of X^T).
  void (*dense_block)(const float* w, int64_t ldw, int rows, int64_t len, const float* xt, int64_t stride,
                      float* acc, int64_t ldacc, int nvec);
  void (*f16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  void (*f32_to_f16)(const float* src, uint16_t* dst, int64_t n);
  // Quantized weights: fp32 values [v0, v1) (v1 - v0 of them) of w, dequantized.
  void (*dequant)(const SparseWeight& w, int64_t v0, int64_t v1, float* out);
  // Batch-1 integer path (int_path_applies(w), w.q24 set): y[n - n0] = W[n, :] . x for n in [n0, n1), with x
  // prepared by quantize_q24: xp [K], xs8 [K / 8]. Null: the set has none.
  void (*gemv_rows_q24)(const SparseWeight& w, const int8_t* xp, const float* xs8, float* y, int64_t n0, int64_t n1);
  // The integer path's activations of one row x [K] (K % 64 == 0), laid out as q24_layout.h describes. Every
  // set with gemv_rows_q24 has it, and all produce the same bytes.
  void (*quantize_q24)(const float* x, int64_t k, int bits, int8_t* xp, float* xs8);
  // out[r] = a[r, :len] . x[:len] for r < rows: a fp16 with row stride lda, len % 8 == 0 (AdapterPanels::a).
  void (*dot_rows_f16)(const uint16_t* a, int64_t rows, int64_t lda, int64_t len, const float* x, float* out);
  // y[8 (g - g0) + j] += sum_r t[first[g] + r] * panel_g[r][j] for the whole groups g in [g0, g1), j < 8.
  void (*panels_f16)(const AdapterPanels& p, const float* t, float* y, int64_t g0, int64_t g1);
  // y[i * ldy + n - n0] = W[n, :] . x[i, :] for n in [n0, n1) and i < m <= kSmallRowsM (x rows at stride ldx):
  // each row of W is decoded once, in registers, for all m activation rows. Null: the set has none (the
  // small-batch driver then expands rows of W into a buffer instead).
  void (*gemm_rows_small)(const SparseWeight& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                          int64_t n0, int64_t n1);
};

// The most activation rows one gemm_rows_small call takes (one accumulator register per row).
constexpr int kSmallRowsM = 8;

const KernelSet& scalar_kernels();
const KernelSet* avx2_kernels();  // null unless built for x86-64
const KernelSet* neon_kernels();  // null unless built for aarch64
// The fastest set this CPU runs. $SALR_KERNELS=scalar|avx2|neon forces one; it is read on every call
// (kernels pick their set when ORT constructs them), so tests can compare sets in one process.
const KernelSet& best_kernels();

// Y [m, N] = X [m, K] W^T + (X A^T) B^T + bias, all fp32. y has row stride N.
void sparse_linear(const KernelSet& ks, const SparseWeight& w, const AdapterTerms& ad, const float* x, int64_t m,
                   int64_t ldx, float* y, const Runner& runner);

// Y [m, n] = X [m, len] W [n, len]^T, fp32, parallel over n (and over m when n is small).
void dense_nt(const KernelSet& ks, int64_t m, int64_t n, int64_t len, const float* x, int64_t ldx, const float* w,
              int64_t ldw, float* y, int64_t ldy, const Runner& runner);

// W [rows, cols] dense, in the values' own type (fp16 bits or fp32).
void bitmap_decode(const SparseWeight& w, void* out, const Runner& runner);

// Portable pieces of the quantized path, shared by the sets that have no SIMD version of them.
void dequantize_values(const SparseWeight& w, int64_t v0, int64_t v1, float* out);
// The portable quantize_q24: per 32-column block xs = max|x| / 127, q = round-half-even(x / xs) clamped to
// [-127, 127] (0 for an all-zero block; NaN columns are ignored by the max and give -127).
void quantize_q24(const float* x, int64_t k, int bits, int8_t* xp, float* xs8);

// Portable dot_rows_f16 and panels_f16, for the sets that have no SIMD version.
void dot_rows_f16(const uint16_t* a, int64_t rows, int64_t lda, int64_t len, const float* x, float* out);
void panels_f16(const AdapterPanels& p, const float* t, float* y, int64_t g0, int64_t g1);

// IEEE half <-> float, round to nearest even; portable reference used by the scalar set.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

}  // namespace salr
