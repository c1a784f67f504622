// Index arithmetic of the bitmap format (DESIGN.md section 2) shared by the CUDA kernels and their host code.
//
// Everything here is plain C++ marked SALR_HD: nvcc compiles it for host and device, and a host compiler
// compiles it with SALR_HD = inline, which is how tests/custom_ops/test_cuda_build.py exercises the same
// functions on a machine without a GPU (custom_ops/tests/bitmap_index_selftest.cc).
//
// Derived indexing (allowed by the format, never stored): the tiled GEMM reads the weight in tiles of
// kTileCols = 64 columns (8 bitmap bytes). tile_offsets[n * (tiles + 1) + t] is the number of kept entries
// of row n before column 64 t, so tile t's values are values[row_offsets[n] + tile_offsets[.. t] ..
// row_offsets[n] + tile_offsets[.. t + 1]). The table is int32: a row holds at most K < 2^31 entries.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SALR_HD __host__ __device__ __forceinline__
#else
#define SALR_HD inline
#endif

namespace salr {
namespace cuda_index {

constexpr int kTileCols = 64;
constexpr int kTileBytes = kTileCols / 8;

SALR_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

SALR_HD int popcount64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __popcll(v);
#else
  return __builtin_popcountll(v);
#endif
}

// Bytes per bitmap row: ceil(K / 8).
SALR_HD int64_t bitmap_width(int64_t k) { return (k + 7) / 8; }

// 64-column tiles per row: ceil(K / 64). The tile-offset table has tile_count + 1 entries per row.
SALR_HD int64_t tile_count(int64_t k) { return (k + kTileCols - 1) / kTileCols; }

// Bits of the last bitmap byte that lie past column K - 1 (must be 0), or 0 when K % 8 == 0.
SALR_HD uint32_t padding_mask(int64_t k) { return (k % 8) ? (0xFFu << (k % 8)) & 0xFFu : 0u; }

// Kept entries of `byte` in bit positions below j (0 <= j < 8): the column's rank inside its byte.
SALR_HD int bits_below(uint32_t byte, int j) { return popcount32(byte & ((1u << j) - 1u)); }

// Kept entries of a tile's bytes before byte g (0 <= g < 8); `tile` holds the tile's 8 bitmap bytes,
// byte 0 least significant (a little-endian load of the row's bytes).
SALR_HD int tile_bytes_before(uint64_t tile, int g) {
  return g == 0 ? 0 : popcount64(tile & ((uint64_t{1} << (8 * g)) - 1));
}

// Bitmap word w of a row: bytes 4w .. 4w+3 (little-endian), bytes at or past `width` read as 0. Bit b of
// the word is column 32 w + b.
SALR_HD uint32_t row_word(const uint8_t* row, int64_t width, int64_t w) {
  uint32_t word = 0;
  for (int i = 0; i < 4; ++i) {
    const int64_t g = 4 * w + i;
    if (g < width) word |= static_cast<uint32_t>(row[g]) << (8 * i);
  }
  return word;
}

// The 8 bytes of tile t of a row (bytes 8t .. 8t+7), bytes at or past `width` read as 0.
SALR_HD uint64_t row_tile(const uint8_t* row, int64_t width, int64_t t) {
  uint64_t tile = 0;
  for (int i = 0; i < kTileBytes; ++i) {
    const int64_t g = kTileBytes * t + i;
    if (g < width) tile |= static_cast<uint64_t>(row[g]) << (8 * i);
  }
  return tile;
}

// Index in `values` of column c of row n, given the row's first value index and its bitmap bytes; only
// meaningful when the column is kept. Reference form of what the kernels compute incrementally.
SALR_HD int64_t value_index(int64_t row_start, const uint8_t* row, int64_t c) {
  int64_t before = 0;
  for (int64_t g = 0; g < c / 8; ++g) before += popcount32(row[g]);
  return row_start + before + bits_below(row[c / 8], static_cast<int>(c % 8));
}

// A tile's value slice [start, end) as the tiled GEMM stages it: whole aligned pieces of `vec` values
// (16 bytes) starting at `aligned` <= start, so a row's first kept value sits `shift` values into the
// staged copy. `chunks` pieces cover the slice; none starts at or past `end` (so none starts past nnz).
struct StagedSlice {
  int64_t aligned;
  int shift;
  int64_t chunks;
};

SALR_HD StagedSlice staged_slice(int64_t start, int64_t end, int vec) {
  StagedSlice s;
  s.aligned = start - start % vec;  // start >= 0
  s.shift = static_cast<int>(start - s.aligned);
  s.chunks = end > start ? (end - s.aligned + vec - 1) / vec : 0;
  return s;
}

// Position, inside a staged slice, of the kept column j of byte g of a tile.
SALR_HD int staged_position(int shift, uint64_t tile, int g, int j) {
  return shift + tile_bytes_before(tile, g) + bits_below(static_cast<uint32_t>(tile >> (8 * g)) & 0xFFu, j);
}

// ---- invariants ------------------------------------------------------------------------------------------

// The first broken invariant of a weight (in the order they are checked), also the code a device-side
// validation kernel reports through its error word.
enum class FormatError : uint32_t {
  kNone = 0,
  kOffsetsStart = 1,       // row_offsets[0] != 0
  kOffsetsEnd = 2,         // row_offsets[N] != len(values)
  kOffsetsDecreasing = 3,  // row_offsets[n + 1] < row_offsets[n]
  kPadding = 4,            // a bit past column K - 1 is set
  kPopcount = 5,           // popcount of row n != row_offsets[n + 1] - row_offsets[n]
};

// Device validation packs (row, code) into one word so that atomicMin keeps the lowest failing row (the
// message is then deterministic); kNoError (all ones) means every row passed.
constexpr uint64_t kNoError = ~uint64_t{0};
SALR_HD uint64_t pack_error(int64_t row, FormatError code) {
  return (static_cast<uint64_t>(row) << 8) | static_cast<uint64_t>(code);
}
SALR_HD FormatError error_code(uint64_t packed) { return static_cast<FormatError>(packed & 0xFFu); }
SALR_HD int64_t error_row(uint64_t packed) { return static_cast<int64_t>(packed >> 8); }

// Checks of row n that need only its offsets and its popcount: offsets start/end and monotonicity.
SALR_HD FormatError check_row_offsets(int64_t n, int64_t rows, const int64_t* row_offsets, int64_t nnz) {
  if (n == 0 && row_offsets[0] != 0) return FormatError::kOffsetsStart;
  if (n == rows - 1 && row_offsets[rows] != nnz) return FormatError::kOffsetsEnd;
  if (row_offsets[n + 1] < row_offsets[n]) return FormatError::kOffsetsDecreasing;
  return FormatError::kNone;
}

// Fills row n's tile offsets (tile_count(k) + 1 entries) and checks its padding bits and popcount.
// Serial reference of what the device validation kernel computes with a warp per row.
inline FormatError fill_row_tile_offsets(int64_t n, int64_t rows, const uint8_t* bitmap, const int64_t* row_offsets,
                                         int64_t nnz, int64_t k, int32_t* tile_offsets) {
  const FormatError offsets = check_row_offsets(n, rows, row_offsets, nnz);
  if (offsets != FormatError::kNone) return offsets;
  const int64_t width = bitmap_width(k);
  const int64_t tiles = tile_count(k);
  const uint8_t* row = bitmap + n * width;
  if (row[width - 1] & padding_mask(k)) return FormatError::kPadding;
  int64_t count = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    tile_offsets[n * (tiles + 1) + t] = static_cast<int32_t>(count);
    count += popcount64(row_tile(row, width, t));
  }
  tile_offsets[n * (tiles + 1) + tiles] = static_cast<int32_t>(count);
  if (count != row_offsets[n + 1] - row_offsets[n]) return FormatError::kPopcount;
  return FormatError::kNone;
}

}  // namespace cuda_index
}  // namespace salr
