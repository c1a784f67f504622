#include "format.h"

#include <cstring>
#include <sstream>

namespace salr {
namespace {

// Bytes whose two nibbles keep exactly 2 of 4 columns each: the byte owns exactly 4 values.
struct TwoFourTable {
  bool ok[256];
  constexpr TwoFourTable() : ok() {
    for (int b = 0; b < 256; ++b) {
      int lo = 0, hi = 0;
      for (int j = 0; j < 4; ++j) {
        lo += (b >> j) & 1;
        hi += (b >> (j + 4)) & 1;
      }
      ok[b] = lo == 2 && hi == 2;
    }
  }
};
constexpr TwoFourTable kTwoFour;

int64_t row_popcount(const uint8_t* row, int64_t width) {
  int64_t count = 0;
  int64_t g = 0;
  for (; g + 8 <= width; g += 8) {
    uint64_t word;
    std::memcpy(&word, row + g, 8);
    count += __builtin_popcountll(word);
  }
  for (; g < width; ++g) count += __builtin_popcount(row[g]);
  return count;
}

std::string prefix(const char* op, const char* input) {
  return std::string(op) + ": input '" + input + "': ";
}

// Lengths of the quantized values and of the scales for nnz = row_offsets[N] values (already checked
// against the bitmap), and the unused high nibble of an odd int4 count.
std::string check_quantized_values(const char* op, const BitmapTensors& t, int64_t nnz) {
  std::ostringstream err;
  const int64_t want_values = t.bits == 8 ? nnz : nnz / 2 + nnz % 2;
  if (t.values_shape[0] != want_values) {
    err << prefix(op, "values") << "expected " << want_values << (t.bits == 8 ? " int8 values" : " bytes of packed int4")
        << " for nnz = row_offsets[N] = " << nnz << ", got shape " << shape_to_string(t.values_shape);
    return err.str();
  }
  if (t.bits == 4 && nnz % 2 == 1 && (static_cast<const uint8_t*>(t.values)[want_values - 1] >> 4) != 0) {
    err << prefix(op, "values") << "expected the unused high nibble of the last byte to be 0 (nnz = " << nnz
        << " is odd), got byte 0x" << std::hex << int(static_cast<const uint8_t*>(t.values)[want_values - 1]);
    return err.str();
  }
  const int64_t groups = nnz / t.group_size + (nnz % t.group_size != 0);
  if (t.scales_shape.size() != 1 || t.scales_shape[0] != groups) {
    err << prefix(op, "scales") << "expected shape [ceil(nnz / group_size)] = [" << groups << "] (nnz = " << nnz
        << ", group_size = " << t.group_size << "), got " << shape_to_string(t.scales_shape);
    return err.str();
  }
  return std::string();
}

}  // namespace

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

std::string check_bitmap_weight(const char* op, int64_t in_features, const BitmapTensors& t, SparseWeight* out) {
  std::ostringstream err;
  if (in_features < 1) {
    err << op << ": attribute 'in_features' must be >= 1, got " << in_features;
    return err.str();
  }
  const int64_t k = in_features;
  const int64_t width = (k + 7) / 8;
  if (t.bitmap_shape.size() != 2) {
    err << prefix(op, "bitmap") << "expected rank 2 [N, ceil(in_features/8)], got shape "
        << shape_to_string(t.bitmap_shape);
    return err.str();
  }
  const int64_t n = t.bitmap_shape[0];
  if (t.bitmap_shape[1] != width) {
    err << prefix(op, "bitmap") << "expected width ceil(in_features/8) = " << width << " (in_features = " << k
        << "), got shape " << shape_to_string(t.bitmap_shape);
    return err.str();
  }
  if (t.offsets_shape.size() != 1 || t.offsets_shape[0] != n + 1) {
    err << prefix(op, "row_offsets") << "expected shape [N + 1] = [" << n + 1 << "], got "
        << shape_to_string(t.offsets_shape);
    return err.str();
  }
  if (t.values_shape.size() != 1) {
    err << prefix(op, "values") << "expected rank 1, got shape " << shape_to_string(t.values_shape);
    return err.str();
  }
  if (t.bits != 0 && t.bits != 4 && t.bits != 8) {
    err << op << ": attribute 'bits' must be 4 or 8, got " << t.bits;
    return err.str();
  }
  if (t.bits != 0 && t.group_size < 1) {
    err << op << ": attribute 'group_size' must be >= 1, got " << t.group_size;
    return err.str();
  }
  const int64_t* off = t.row_offsets;
  // quantized values: nnz comes from the offsets (checked against the popcounts below), then the lengths
  const int64_t nnz = t.bits == 0 ? t.values_shape[0] : off[n];
  if (off[0] != 0) {
    err << prefix(op, "row_offsets") << "expected row_offsets[0] = 0, got " << off[0];
    return err.str();
  }
  if (t.bits == 0 && off[n] != nnz) {
    err << prefix(op, "row_offsets") << "expected row_offsets[N] = len(values) = " << nnz << ", got " << off[n];
    return err.str();
  }
  for (int64_t r = 0; r < n; ++r) {
    if (off[r + 1] < off[r]) {
      err << prefix(op, "row_offsets") << "expected non-decreasing offsets, got row_offsets[" << r
          << "] = " << off[r] << " > row_offsets[" << r + 1 << "] = " << off[r + 1];
      return err.str();
    }
  }
  const uint8_t pad_mask = (k % 8) ? static_cast<uint8_t>(0xFFu << (k % 8)) : 0;
  bool two_four = (k % 8) == 0;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = t.bitmap + r * width;
    if (pad_mask && (row[width - 1] & pad_mask)) {
      err << prefix(op, "bitmap") << "expected padding bits past in_features = " << k
          << " to be 0, got byte 0x" << std::hex << int(row[width - 1]) << std::dec << " at row " << r;
      return err.str();
    }
    const int64_t pc = row_popcount(row, width);
    if (pc != off[r + 1] - off[r]) {
      err << prefix(op, "bitmap") << "row " << r << " keeps " << pc
          << " entries (popcount) but row_offsets gives " << off[r + 1] - off[r] << " (row_offsets[" << r
          << "] = " << off[r] << ", row_offsets[" << r + 1 << "] = " << off[r + 1] << ")";
      return err.str();
    }
    if (two_four) {
      for (int64_t g = 0; g < width; ++g) {
        if (!kTwoFour.ok[row[g]]) {
          two_four = false;
          break;
        }
      }
    }
  }
  if (t.bits != 0) {
    const std::string err_q = check_quantized_values(op, t, nnz);
    if (!err_q.empty()) return err_q;
  }
  out->bitmap = t.bitmap;
  out->values = t.values;
  out->row_offsets = t.row_offsets;
  out->rows = n;
  out->cols = k;
  out->width = width;
  out->nnz = nnz;
  out->vtype = t.vtype;
  out->two_four = two_four && n > 0;
  out->bits = t.bits;
  out->scales = t.scales;
  out->group_size = t.group_size;
  return std::string();
}

}  // namespace salr
