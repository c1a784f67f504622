// The packed weight layout of the batch-1 2:4 integer path (int_path_applies).
//
// The bitmap + values of format v2 are compact (0.375 bytes a weight for int4) but costly to decode on the
// fly: per 64-column step a gather control must be built from bitmap nibbles and the nibbles of the values
// re-interleaved. This layout holds the same information in two bytes a step more (the scale widened to fp32),
// arranged so the AVX2 kernel decodes a step in a few instructions. It is built once per constant weight at
// kernel construction (per call for weights that are graph inputs).
//
// Rows are stored in pairs (2i, 2i + 1) with their steps interleaved, so the kernel, which computes a pair at a
// time, reads one sequential stream; an odd last row stands alone. Row n, step s (columns 64s .. 64s + 63;
// value j = the j-th kept column of the step, j < 32) starts at byte q24_step_offset(w, n, s):
//   [0, 8)       position codes: bits 2Q, 2Q + 1 of byte k hold the column of value j = 8Q + k inside its
//                aligned group of 4 columns (2:4: values 2g and 2g + 1 lie in group g)
//   [8, 8 + V)   values, V = q24_value_bytes(bits): int8 q_0 .. q_31; int4: byte i = (q_i & 15) | (q_(16+i) & 15) << 4,
//                two's complement nibbles (the kernels read them as the signed bytes 16 q and fold 1/16 into
//                the activation scales)
//   [8 + V, +4)  fp32 scale of the step's group (a copy: groups of 64 or more values repeat it per step), widened
//                from the file's fp16 so the kernel broadcasts it straight from memory: two bytes a step more
//                than the file, for three fewer instructions per row and step
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "large_pages.h"

namespace salr {

constexpr int64_t q24_value_bytes(int bits) { return bits == 8 ? 32 : 16; }
constexpr int64_t q24_step_bytes(int bits) { return 8 + q24_value_bytes(bits) + 4; }

// Bytes from one step of row n to its next step: two steps inside a pair, one for a lone last row.
inline int64_t q24_step_stride(const SparseWeight& w, int64_t n) {
  return ((n | 1) < w.rows ? 2 : 1) * q24_step_bytes(w.bits);
}

inline int64_t q24_step_offset(const SparseWeight& w, int64_t n, int64_t s) {
  const int64_t step = q24_step_bytes(w.bits);
  return (n & ~int64_t{1}) * (w.cols / 64) * step + (n & 1) * step + s * q24_step_stride(w, n);
}

// The packed copy of a weight for which int_path_applies(w) holds.
LargeBytes pack_q24(const SparseWeight& w);

// The integer path's activations for one row x [K], prepared once per call (by the set's quantize_q24):
// quantized to int8 per 32-column block, then per 64-column step the int8 columns in the order 0-15, 32-47,
// 16-31, 48-63 (xp: one ymm then holds columns 0-15 | 32-47, the next 16-31 | 48-63) and 8 fp32 scales
// [A x4, B x4] (xs8; A, B: the step's two 32-column blocks), divided by 16 for int4 (values read as 16 q).
struct Q24Activations {
  std::vector<int8_t> xp;
  std::vector<float> xs8;
};
Q24Activations prepare_q24_activations(const KernelSet& ks, const float* x, int64_t k, int bits);

// Where column c of the row lies in Q24Activations::xp.
inline int64_t q24_activation_index(int64_t c) {
  constexpr int64_t kSegment[4] = {0, 32, 16, 48};
  return (c & ~int64_t{63}) + kSegment[(c >> 4) & 3] + (c & 15);
}

}  // namespace salr
