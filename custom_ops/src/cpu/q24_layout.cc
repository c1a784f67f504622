#include "q24_layout.h"

#include <cstring>

namespace salr {

std::vector<uint8_t> pack_q24(const SparseWeight& w) {
  const int64_t steps = w.cols / 64;
  std::vector<uint8_t> out(static_cast<size_t>(w.rows * steps * q24_step_bytes(w.bits)));
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
      std::memcpy(v + q24_value_bytes(w.bits), &w.scales[(pos - 1) / w.group_size], 2);
    }
  }
  return out;
}

Q24Activations prepare_q24_activations(const float* x, int64_t k, int bits) {
  std::vector<int8_t> xq(static_cast<size_t>(k));
  std::vector<float> xs(static_cast<size_t>(k / 32));
  quantize_activations(x, k, xq.data(), xs.data());
  Q24Activations a;
  a.xp.resize(static_cast<size_t>(k));
  a.xs8.resize(static_cast<size_t>(k / 8));
  for (int64_t c = 0; c < k; ++c) a.xp[q24_activation_index(c)] = xq[c];
  const float unpack = bits == 4 ? 1.f / 16.f : 1.f;
  for (int64_t b = 0; b < k / 32; ++b) {
    for (int i = 0; i < 4; ++i) a.xs8[4 * b + i] = xs[b] * unpack;
  }
  return a;
}

}  // namespace salr
