// Host check of the CUDA kernels' index arithmetic (custom_ops/src/cuda/bitmap_index.h), no GPU needed.
//
// The header's SALR_HD functions are the ones the kernels call; this driver compiles them with a host
// compiler (SALR_HD = inline) and replays, lane by lane, the three ways the kernels walk a weight:
//   - the warp-per-row GEMV / BitmapDecode: 32-bit words per lane, warp scan of popcounts, set-bit walk;
//   - the tiled GEMM: tile offsets -> value slice staged in aligned 16-byte pieces (zero-filled past nnz)
//     -> per (row, byte) decode through staged_position;
//   - the validation kernel: tile-offset table and the first broken invariant per row.
// Every path must find each kept value at the index a naive decoder gives, never read past nnz, and
// never stage more than the shared-memory slice holds (64 + one piece per row).
//
// Build and run (tests/custom_ops/test_cuda_build.py does this):
//   g++ -std=c++17 -O1 -x c++ -I custom_ops/src/cuda custom_ops/tests/bitmap_index_selftest.cc -o selftest
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bitmap_index.h"

using namespace salr::cuda_index;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && failures++ < 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

struct Weight {
  int64_t n, k, width;
  std::vector<uint8_t> bitmap;
  std::vector<int64_t> offsets;
  std::vector<int64_t> values;  // value i == i: a wrong index shows as a wrong value
  std::vector<int64_t> dense;   // dense[n * k + c] = value index of a kept column, else -1
};

Weight make_weight(std::mt19937& rng, int64_t n, int64_t k, double density) {
  Weight w{n, k, bitmap_width(k), {}, {}, {}, {}};
  w.bitmap.assign(n * w.width, 0);
  w.offsets.assign(n + 1, 0);
  w.dense.assign(n * k, -1);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t r = 0; r < n; ++r) {
    const double d = r % 5 == 1 ? 1.0 : r % 5 == 2 ? 0.0 : density;  // dense and empty rows too
    for (int64_t c = 0; c < k; ++c) {
      if (u(rng) < d) {
        w.bitmap[r * w.width + c / 8] |= static_cast<uint8_t>(1u << (c % 8));
        w.dense[r * k + c] = static_cast<int64_t>(w.values.size());
        w.values.push_back(static_cast<int64_t>(w.values.size()));
      }
    }
    w.offsets[r + 1] = static_cast<int64_t>(w.values.size());
  }
  return w;
}

std::string where(const Weight& w, int64_t r, int64_t c) {
  return "N=" + std::to_string(w.n) + " K=" + std::to_string(w.k) + " row " + std::to_string(r) + " col " +
         std::to_string(c);
}

// The first invariant broken, scanning rows in order (what the host validation reports and what the
// device kernel's atomicMin of pack_error(row, code) selects).
uint64_t first_error(const Weight& w, std::vector<int32_t>* table) {
  const int64_t tiles = tile_count(w.k);
  table->assign(w.n * (tiles + 1), -1);
  for (int64_t r = 0; r < w.n; ++r) {
    const FormatError e = fill_row_tile_offsets(r, w.n, w.bitmap.data(), w.offsets.data(),
                                                static_cast<int64_t>(w.values.size()), w.k, table->data());
    if (e != FormatError::kNone) return pack_error(r, e);
  }
  return kNoError;
}

void check_formulas() {
  expect(bitmap_width(1) == 1 && bitmap_width(8) == 1 && bitmap_width(9) == 2, "bitmap_width");
  expect(tile_count(1) == 1 && tile_count(64) == 1 && tile_count(65) == 2 && tile_count(545) == 9, "tile_count");
  expect(padding_mask(8) == 0 && padding_mask(5) == 0xE0 && padding_mask(1) == 0xFE, "padding_mask");
  expect(bits_below(0xFF, 0) == 0 && bits_below(0xFF, 7) == 7 && bits_below(0x0B, 3) == 2, "bits_below");
  expect(tile_bytes_before(0xFFFFFFFFFFFFFFFFull, 7) == 56 && tile_bytes_before(0x0101, 1) == 1, "tile_bytes_before");
  const uint8_t row[5] = {0x01, 0x02, 0x04, 0x08, 0x10};
  expect(row_word(row, 5, 0) == 0x08040201u && row_word(row, 5, 1) == 0x10u, "row_word little-endian, bounded");
  expect(row_tile(row, 5, 0) == 0x1008040201ull, "row_tile bounded");
  expect(pack_error(2, FormatError::kPopcount) < pack_error(3, FormatError::kOffsetsStart),
         "the lowest row wins atomicMin");
  expect(error_row(pack_error(123456789, FormatError::kPadding)) == 123456789 &&
             error_code(pack_error(123456789, FormatError::kPadding)) == FormatError::kPadding,
         "pack/unpack");
  const StagedSlice s = staged_slice(13, 13 + 64, 8);
  expect(s.aligned == 8 && s.shift == 5 && s.chunks == 9, "staged_slice worst case: 9 pieces of 8 halves");
  expect(staged_slice(16, 16, 8).chunks == 0, "empty slice stages nothing");
}

// Warp-per-row walk of sparse_gemv_kernel / bitmap_decode_kernel, lanes replayed in order.
void check_gemv_walk(const Weight& w) {
  for (int64_t r = 0; r < w.n; ++r) {
    const uint8_t* row = w.bitmap.data() + r * w.width;
    int64_t base = w.offsets[r];
    int64_t visited = 0;
    const int64_t words = (w.width + 3) / 4;
    for (int64_t w0 = 0; w0 < words; w0 += 32) {
      uint32_t word[32];
      int inclusive[32];
      for (int lane = 0; lane < 32; ++lane) {
        word[lane] = w0 + lane < words ? row_word(row, w.width, w0 + lane) : 0u;
        inclusive[lane] = popcount32(word[lane]) + (lane ? inclusive[lane - 1] : 0);
      }
      for (int lane = 0; lane < 32; ++lane) {
        int64_t idx = base + inclusive[lane] - popcount32(word[lane]);
        for (uint32_t bits = word[lane]; bits != 0; bits &= bits - 1) {
          const int64_t col = (w0 + lane) * 32 + __builtin_ctz(bits);
          expect(col < w.k, "GEMV walk reaches a column past K: " + where(w, r, col));
          expect(col < w.k && w.dense[r * w.k + col] == idx, "GEMV value index: " + where(w, r, col));
          expect(idx == value_index(w.offsets[r], row, col), "value_index: " + where(w, r, col));
          ++idx;
          ++visited;
        }
      }
      base += inclusive[31];
    }
    expect(visited == w.offsets[r + 1] - w.offsets[r], "GEMV visits every kept entry once: " + where(w, r, -1));
  }
}

// Tiled GEMM: tile offsets -> staged slice (pieces of `vec` values) -> decode_stage's positions.
void check_tiled_walk(const Weight& w, const std::vector<int32_t>& table, int vec) {
  const int64_t tiles = tile_count(w.k);
  const int64_t nnz = static_cast<int64_t>(w.values.size());
  const int64_t staged_capacity = kTileCols + vec;  // Layout::kValStride
  for (int64_t r = 0; r < w.n; ++r) {
    const uint8_t* row = w.bitmap.data() + r * w.width;
    for (int64_t t = 0; t < tiles; ++t) {
      int64_t before = 0;
      for (int64_t c = 0; c < t * kTileCols; ++c) before += w.dense[r * w.k + c] >= 0;
      expect(table[r * (tiles + 1) + t] == before, "tile offset: " + where(w, r, t * kTileCols));
      const int64_t start = w.offsets[r] + table[r * (tiles + 1) + t];
      const int64_t end = w.offsets[r] + table[r * (tiles + 1) + t + 1];
      const StagedSlice s = staged_slice(start, end, vec);
      expect(s.chunks * vec <= staged_capacity, "staged slice overflows shared memory: " + where(w, r, t));
      std::vector<int64_t> staged(static_cast<size_t>(staged_capacity), -2);
      for (int64_t c = 0; c < s.chunks; ++c) {
        const int64_t g = s.aligned + c * vec;
        expect(g < nnz, "a staged piece starts past nnz: " + where(w, r, t));
        for (int e = 0; e < vec; ++e) staged[c * vec + e] = g + e < nnz ? w.values[g + e] : -3;  // zero-fill
      }
      const uint64_t tile = row_tile(row, w.width, t);
      for (int g = 0; g < kTileBytes; ++g) {
        for (int j = 0; j < 8; ++j) {
          const int64_t col = t * kTileCols + 8 * g + j;
          const bool kept = (tile >> (8 * g + j)) & 1u;
          if (col >= w.k) {
            expect(!kept, "a bit past K is set in a tile: " + where(w, r, col));
            continue;
          }
          expect(kept == (w.dense[r * w.k + col] >= 0), "tile bit: " + where(w, r, col));
          if (!kept) continue;
          const int pos = staged_position(s.shift, tile, g, j);
          expect(pos < s.chunks * vec, "staged position outside the staged pieces: " + where(w, r, col));
          expect(pos < s.chunks * vec && staged[pos] == w.dense[r * w.k + col],
                 "tiled decode value (vec " + std::to_string(vec) + "): " + where(w, r, col));
        }
      }
    }
  }
}

void check_errors(std::mt19937& rng) {
  std::vector<int32_t> table;
  Weight w = make_weight(rng, 9, 77, 0.5);
  expect(first_error(w, &table) == kNoError, "well-formed weight passes");

  Weight bad = w;
  bad.offsets[0] = 1;
  expect(first_error(bad, &table) == pack_error(0, FormatError::kOffsetsStart), "offsets start");
  bad = w;
  bad.values.pop_back();
  expect(first_error(bad, &table) == pack_error(8, FormatError::kOffsetsEnd), "offsets end");
  bad = w;
  bad.offsets[4] = bad.offsets[5] + 1;
  expect(first_error(bad, &table) == pack_error(3, FormatError::kPopcount), "row 3 ends late: popcount");
  bad = w;
  bad.offsets[3] = 0;  // row 2 decreases (row 1 is fully dense and keeps its count)
  expect(first_error(bad, &table) == pack_error(2, FormatError::kOffsetsDecreasing), "decreasing offsets");
  bad = w;
  bad.bitmap[6 * w.width + w.width - 1] |= 0x80;  // column 79 of a K = 77 row
  expect(first_error(bad, &table) == pack_error(6, FormatError::kPadding), "padding bit");
  bad = w;
  bad.bitmap[5 * w.width] ^= 0x01;
  expect(first_error(bad, &table) == pack_error(5, FormatError::kPopcount), "popcount");
  bad = w;
  bad.offsets[8] += 1;                   // row 7 popcount and row 8 ...
  bad.bitmap[4 * w.width] ^= 0x01;       // ... but row 4 breaks first
  expect(first_error(bad, &table) == pack_error(4, FormatError::kPopcount), "the lowest broken row is reported");
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  check_formulas();
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {7, 64}, {5, 65}, {9, 545}, {4, 127}, {6, 128}, {33, 200}, {2, 2100}};
  for (const auto& shape : shapes) {
    for (double density : {0.0, 0.3, 0.5, 1.0}) {
      const Weight w = make_weight(rng, shape[0], shape[1], density);
      std::vector<int32_t> table;
      expect(first_error(w, &table) == kNoError, "valid weight rejected: " + where(w, -1, -1));
      check_gemv_walk(w);
      for (int vec : {8, 4, 1}) check_tiled_walk(w, table, vec);  // fp16 pieces, fp32 pieces, plain loads
    }
  }
  check_errors(rng);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("bitmap_index selftest: all checks passed\n");
  return 0;
}
