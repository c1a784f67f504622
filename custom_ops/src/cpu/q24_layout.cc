#include "q24_layout.h"

#include <cstring>

namespace salr {

LargeBytes pack_q24(const SparseWeight& w) {
  const int64_t steps = w.cols / 64;
  LargeBytes out(static_cast<size_t>(w.rows * steps * q24_step_bytes(w.bits)));
  for (int64_t n = 0; n < w.rows; ++n) {
    const uint8_t* row = w.bitmap + n * w.width;
    int64_t pos = w.row_offsets[n];
    for (int64_t s = 0; s < steps; ++s) {
      uint8_t* p = out.data() + q24_step_offset(w, n, s);
      int8_t q[32];
      int j = 0;
      for (int64_t c = 64 * s; c < 64 * s + 64; ++c) {
        if (!((row[c >> 3] >> (c & 7)) & 1u)) continue;
        p[j % 8] = static_cast<uint8_t>(p[j % 8] | (c % 4) << (2 * (j / 8)));
        q[j++] = static_cast<int8_t>(quantized_at(w, pos++));
      }
      uint8_t* v = p + 8;
      if (w.bits == 8) {
        std::memcpy(v, q, 32);
      } else {
        for (int i = 0; i < 16; ++i) v[i] = static_cast<uint8_t>((q[i] & 15) | (q[16 + i] & 15) << 4);
      }
      // every step lies in one group: group_size is a multiple of 32 and rows hold whole groups
      const float scale = half_to_float(w.scales[(pos - 1) / w.group_size]);
      std::memcpy(v + q24_value_bytes(w.bits), &scale, 4);
    }
  }
  return out;
}

Q24Activations prepare_q24_activations(const KernelSet& ks, const float* x, int64_t k, int bits) {
  Q24Activations a;
  a.xp.resize(static_cast<size_t>(k));
  a.xs8.resize(static_cast<size_t>(k / 8));
  ks.quantize_q24(x, k, bits, a.xp.data(), a.xs8.data());
  return a;
}

}  // namespace salr
