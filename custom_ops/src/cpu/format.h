// Checks of the bitmap weight format (DESIGN.md section 2) run before any kernel trusts the data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

namespace salr {

// Shapes and (host) data of the three tensors that carry one bitmap-encoded weight.
struct BitmapTensors {
  std::vector<int64_t> bitmap_shape;
  std::vector<int64_t> values_shape;
  std::vector<int64_t> offsets_shape;
  const uint8_t* bitmap = nullptr;
  const void* values = nullptr;
  const int64_t* row_offsets = nullptr;
  ValueType vtype = ValueType::kFloat16;
  // Format v2: bits 8 (values int8 [nnz]) or 4 (values uint8 [ceil(nnz / 2)]), fp16 scales
  // [ceil(nnz / group_size)]; nnz is then row_offsets[N]. bits 0: float values (v1).
  int bits = 0;
  int64_t group_size = 0;
  std::vector<int64_t> scales_shape;
  const uint16_t* scales = nullptr;
};

// Validates `t` against in_features = K. On success fills `out` (including the 2:4 flag) and returns "";
// otherwise returns a message "<op>: input '<name>': expected ..., got ..." and leaves `out` untouched.
// Reads every bitmap byte once (popcounts, padding bits); never reads outside the tensors' extents.
std::string check_bitmap_weight(const char* op, int64_t in_features, const BitmapTensors& t, SparseWeight* out);

std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace salr
