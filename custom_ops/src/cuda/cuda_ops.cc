// ORT glue of the CUDA kernels: type registrations, input validation, scratch memory and the compute stream.
//
// Inputs live in device memory. A weight whose bitmap, values and row_offsets are constant initializers is
// validated once, on the host, when ORT constructs the kernel (its derived tile-offset table is uploaded
// then); ORT hands the same buffers to every run, which is re-checked by pointer. Any other weight is
// validated on the device on every run: a validation kernel writes an error word that every kernel reading
// the weight checks first (and skips its work when set), and the host reads the word back after the launch
// and turns it into an error status. Malformed data is therefore an ORT error, never a device fault.
//
// Every CUDA call and launch goes through SALR_CUDA_CHECK (cuda_common.h); `guarded` turns the exceptions
// into statuses at the kernel boundary, so nothing throws across ORT's C ABI.
#include "cuda_ops.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitmap_decode_impl.cuh"
#include "bitmap_index.h"
#include "cuda_common.h"
#include "fused_adapter_gemm_impl.cuh"
#include "salr_linear_impl.cuh"
#include "salr_ops.h"

namespace salr {
namespace Cuda {
namespace {

constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType kI64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
constexpr const char* kCudaEp = "CUDAExecutionProvider";

// An input that does not satisfy the op's contract: reported as ORT_INVALID_ARGUMENT.
struct InvalidInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

DType dtype_of(ONNXTensorElementDataType t) { return t == kF16 ? DType::kFloat16 : DType::kFloat32; }

template <typename F>
OrtStatusPtr guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const InvalidInput& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const CudaError& e) {
    return Ort::GetApi().CreateStatus(ORT_EP_FAIL, e.what());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, "salr_ops (CUDA): unknown C++ exception");
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool present(const Ort::ConstValue& v) { return static_cast<const OrtValue*>(v) != nullptr; }

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

std::string node_label(const Ort::ConstKernelInfo& info, const char* op) {
  std::string name;
  try {
    name = info.GetNodeName();
  } catch (const Ort::Exception&) {  // unnamed node: the op name alone identifies it
  }
  return name.empty() ? std::string(op) + " (CUDA)" : std::string(op) + " (CUDA, node '" + name + "')";
}

int64_t read_in_features(const Ort::ConstKernelInfo& info, const std::string& label) {
  int64_t k = 0;
  try {
    k = info.GetAttribute<int64_t>(kInFeaturesAttr);
  } catch (const Ort::Exception& e) {
    throw InvalidInput(label + ": missing or invalid int attribute '" + kInFeaturesAttr + "': " + e.what());
  }
  // Tile offsets are int32 counts within a row.
  if (k < 1 || k > INT32_MAX) {
    throw InvalidInput(label + ": attribute '" + kInFeaturesAttr + "' must be in [1, 2^31 - 1], got " +
                       std::to_string(k));
  }
  return k;
}

// A constant initializer input, or null when the input is a graph input / computed / absent.
Ort::ConstValue constant_input(const Ort::ConstKernelInfo& info, size_t index) {
  if (index >= info.GetInputCount()) return Ort::ConstValue{nullptr};
  int is_constant = 0;
  try {
    Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
    if (is_constant && v) return v;
  } catch (const Ort::Exception&) {  // absent optional input
  }
  return Ort::ConstValue{nullptr};
}

// `bytes` of device or host memory at `src`, on the host (constant initializers may live on either side).
void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  cudaPointerAttributes attr;
  SALR_CUDA_CHECK(cudaPointerGetAttributes(&attr, src));
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    SALR_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  } else {
    std::memcpy(dst, src, bytes);
  }
}

// Device scratch for one Compute, from ORT's allocator of the inputs' device (stream-aware: ORT hands the
// run's compute stream to the arena, so freeing right after the launches is ordered by that stream).
class Scratch {
 public:
  Scratch(OrtKernelContext* ctx, const Ort::ConstValue& like, size_t bytes) {
    if (bytes == 0) return;
    const OrtApi& api = Ort::GetApi();
    const OrtMemoryInfo* info = nullptr;
    Ort::ThrowOnError(api.GetTensorMemoryInfo(like, &info));
    Ort::ThrowOnError(api.KernelContext_GetAllocator(ctx, info, &allocator_));
    OrtStatus* status = api.KernelContext_GetScratchBuffer(ctx, info, bytes, &data_);
    if (status != nullptr) {
      api.ReleaseAllocator(allocator_);
      Ort::ThrowOnError(status);
    }
  }
  ~Scratch() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  unsigned char* data() const { return static_cast<unsigned char*>(data_); }

 private:
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

void expect_shape(const std::string& label, const char* input, const std::vector<int64_t>& got,
                  const std::vector<int64_t>& want, const char* meaning) {
  if (got != want) {
    throw InvalidInput(label + ": input '" + input + "': expected shape " + shape_str(want) + " " + meaning +
                       ", got " + shape_str(got));
  }
}

// ---- bitmap weights ----------------------------------------------------------------------------------------

// What a broken invariant is reported as; the same wording as the CPU kernels.
struct RowFacts {
  int64_t off_first = 0, off_last = 0;   // row_offsets[0], row_offsets[N]
  int64_t off_row = 0, off_next = 0;     // row_offsets[row], row_offsets[row + 1]
  int64_t popcount = 0;
  uint32_t last_byte = 0;
};

std::string describe(const std::string& label, cuda_index::FormatError code, int64_t row, int64_t k, int64_t nnz,
                     const RowFacts& f) {
  std::ostringstream s;
  switch (code) {
    case cuda_index::FormatError::kOffsetsStart:
      s << label << ": input 'row_offsets': expected row_offsets[0] = 0, got " << f.off_first;
      break;
    case cuda_index::FormatError::kOffsetsEnd:
      s << label << ": input 'row_offsets': expected row_offsets[N] = len(values) = " << nnz << ", got "
        << f.off_last;
      break;
    case cuda_index::FormatError::kOffsetsDecreasing:
      s << label << ": input 'row_offsets': expected non-decreasing offsets, got row_offsets[" << row
        << "] = " << f.off_row << " > row_offsets[" << row + 1 << "] = " << f.off_next;
      break;
    case cuda_index::FormatError::kPadding:
      s << label << ": input 'bitmap': expected padding bits past in_features = " << k << " to be 0, got byte 0x"
        << std::hex << f.last_byte << std::dec << " at row " << row;
      break;
    case cuda_index::FormatError::kPopcount:
      s << label << ": input 'bitmap': row " << row << " keeps " << f.popcount
        << " entries (popcount) but row_offsets gives " << f.off_next - f.off_row << " (row_offsets[" << row
        << "] = " << f.off_row << ", row_offsets[" << row + 1 << "] = " << f.off_next << ")";
      break;
    case cuda_index::FormatError::kNone:
      break;
  }
  return s.str();
}

RowFacts facts(const uint8_t* row_bytes, int64_t width, const int64_t* offsets, int64_t rows, int64_t row) {
  RowFacts f;
  f.off_first = offsets[0];
  f.off_last = offsets[rows];
  f.off_row = offsets[row];
  f.off_next = offsets[row + 1];
  for (int64_t g = 0; g < width; ++g) f.popcount += cuda_index::popcount32(row_bytes[g]);
  f.last_byte = row_bytes[width - 1];
  return f;
}

// Shapes of bitmap [N, ceil(K/8)], values [nnz], row_offsets [N + 1]; returns N. Reads no data.
int64_t check_weight_shapes(const std::string& label, int64_t k, const std::vector<int64_t>& bitmap,
                            const std::vector<int64_t>& values, const std::vector<int64_t>& offsets) {
  const int64_t width = cuda_index::bitmap_width(k);
  if (bitmap.size() != 2 || bitmap[1] != width) {
    throw InvalidInput(label + ": input 'bitmap': expected shape [N, ceil(in_features/8)] = [N, " +
                       std::to_string(width) + "] (in_features = " + std::to_string(k) + "), got " +
                       shape_str(bitmap));
  }
  const int64_t n = bitmap[0];
  if (values.size() != 1) {
    throw InvalidInput(label + ": input 'values': expected rank 1, got shape " + shape_str(values));
  }
  if (offsets.size() != 1 || offsets[0] != n + 1) {
    throw InvalidInput(label + ": input 'row_offsets': expected shape [N + 1] = [" + std::to_string(n + 1) +
                       "], got " + shape_str(offsets));
  }
  return n;
}

// bitmap / values / row_offsets of one weight, at inputs first .. first + 2.
class BitmapWeightInput {
 public:
  BitmapWeightInput() = default;
  BitmapWeightInput(const BitmapWeightInput&) = delete;  // owns the table allocation
  BitmapWeightInput& operator=(const BitmapWeightInput&) = delete;

  // Validates a constant weight on the host; `want_tiles` also uploads its tile-offset table.
  void init(const Ort::ConstKernelInfo& info, const std::string& label, int64_t k, size_t first, DType vtype,
            bool want_tiles) {
    label_ = label;
    k_ = k;
    first_ = first;
    vtype_ = vtype;
    Ort::ConstValue t[3] = {constant_input(info, first), constant_input(info, first + 1),
                            constant_input(info, first + 2)};
    if (!present(t[0]) || !present(t[1]) || !present(t[2])) return;
    const int64_t n = check_weight_shapes(label_, k_, shape_of(t[0]), shape_of(t[1]), shape_of(t[2]));
    const int64_t nnz = shape_of(t[1])[0];
    const int64_t width = cuda_index::bitmap_width(k_);
    const int64_t tiles = cuda_index::tile_count(k_);
    std::vector<uint8_t> bitmap(static_cast<size_t>(n * width));
    std::vector<int64_t> offsets(static_cast<size_t>(n + 1));
    copy_to_host(bitmap.data(), t[0].GetTensorRawData(), bitmap.size());
    copy_to_host(offsets.data(), t[2].GetTensorRawData(), offsets.size() * sizeof(int64_t));
    if (n == 0 && (offsets[0] != 0 || nnz != 0)) {
      throw InvalidInput(label_ + ": input 'row_offsets': expected row_offsets[0] = len(values) = 0 for N = 0, "
                         "got row_offsets[0] = " + std::to_string(offsets[0]) + " and " + std::to_string(nnz) +
                         " values");
    }
    std::vector<int32_t> table(static_cast<size_t>(n * (tiles + 1)));
    for (int64_t r = 0; r < n; ++r) {
      const cuda_index::FormatError err =
          cuda_index::fill_row_tile_offsets(r, n, bitmap.data(), offsets.data(), nnz, k_, table.data());
      if (err != cuda_index::FormatError::kNone) {
        throw InvalidInput(describe(label_, err, r, k_, nnz, facts(bitmap.data() + r * width, width,
                                                                   offsets.data(), n, r)));
      }
    }
    if (want_tiles && n > 0) {
      OrtAllocator* allocator = nullptr;
      Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator));
      allocator_ = allocator;
      tiles_ = static_cast<int32_t*>(allocator_->Alloc(allocator_, table.size() * sizeof(int32_t)));
      if (tiles_ == nullptr) throw CudaError(label_ + ": could not allocate the tile-offset table");
      // Default: the runtime finds the table's device from the pointer (UVA), whatever device is current.
      SALR_CUDA_CHECK(cudaMemcpy(tiles_, table.data(), table.size() * sizeof(int32_t), cudaMemcpyDefault));
    }
    bitmap_ = t[0].GetTensorRawData();
    values_ = t[1].GetTensorRawData();
    offsets_ = t[2].GetTensorRawData();
    rows_ = n;
    nnz_ = nnz;
    constant_ = true;
  }

  ~BitmapWeightInput() {
    if (tiles_ != nullptr) allocator_->Free(allocator_, tiles_);
    if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
  }

  // The weight of this run. When it is not the validated constant, `validate` must be called next.
  BitmapWeightView view(const Ort::KernelContext& ctx, bool* validated) const {
    Ort::ConstValue t[3] = {ctx.GetInput(first_), ctx.GetInput(first_ + 1), ctx.GetInput(first_ + 2)};
    static constexpr const char* kNames[3] = {"bitmap", "values", "row_offsets"};
    for (int i = 0; i < 3; ++i) {
      if (!present(t[i])) throw InvalidInput(label_ + ": input '" + kNames[i] + "' is missing");
    }
    BitmapWeightView w;
    w.rows = check_weight_shapes(label_, k_, shape_of(t[0]), shape_of(t[1]), shape_of(t[2]));
    w.cols = k_;
    w.width = cuda_index::bitmap_width(k_);
    w.nnz = shape_of(t[1])[0];
    w.vtype = vtype_;
    w.bitmap = static_cast<const uint8_t*>(t[0].GetTensorRawData());
    w.values = t[1].GetTensorRawData();
    w.row_offsets = static_cast<const int64_t*>(t[2].GetTensorRawData());
    *validated = constant_ && w.bitmap == bitmap_ && w.values == values_ && w.row_offsets == offsets_ &&
                 w.rows == rows_ && w.nnz == nnz_;
    if (*validated) w.tile_offsets = tiles_;
    return w;
  }

  const std::string& label() const { return label_; }
  int64_t k() const { return k_; }

 private:
  std::string label_;
  int64_t k_ = 0;
  size_t first_ = 0;
  DType vtype_ = DType::kFloat16;
  bool constant_ = false;
  const void* bitmap_ = nullptr;
  const void* values_ = nullptr;
  const void* offsets_ = nullptr;
  int64_t rows_ = 0;
  int64_t nnz_ = 0;
  OrtAllocator* allocator_ = nullptr;
  int32_t* tiles_ = nullptr;
};

// Device validation of a non-constant weight: the error word and (when needed) the tile table live in
// `scratch` at the given offsets. After the kernels reading the weight are enqueued, `check_error_word`
// waits for the stream and reports the lowest failing row.
void launch_validation(cudaStream_t stream, BitmapWeightView* w, unsigned char* error_word, unsigned char* tiles) {
  SALR_CUDA_CHECK(cudaMemsetAsync(error_word, 0xFF, sizeof(uint64_t), stream));  // cuda_index::kNoError
  int32_t* table = reinterpret_cast<int32_t*>(tiles);
  w->tile_offsets = table;
  LaunchValidateBitmapKernel(stream, w->bitmap, w->row_offsets, w->rows, w->cols, w->nnz, table,
                             reinterpret_cast<uint64_t*>(error_word));
}

void check_error_word(cudaStream_t stream, const std::string& label, const BitmapWeightView& w,
                      const unsigned char* error_word) {
  uint64_t word = 0;
  SALR_CUDA_CHECK(cudaMemcpyAsync(&word, error_word, sizeof(word), cudaMemcpyDeviceToHost, stream));
  SALR_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (word == cuda_index::kNoError) return;
  const int64_t row = cuda_index::error_row(word);
  // The error path only: fetch the few values the message quotes.
  std::vector<uint8_t> row_bytes(static_cast<size_t>(w.width));
  int64_t offsets[4];
  SALR_CUDA_CHECK(cudaMemcpy(row_bytes.data(), w.bitmap + row * w.width, row_bytes.size(), cudaMemcpyDefault));
  SALR_CUDA_CHECK(cudaMemcpy(&offsets[0], w.row_offsets, sizeof(int64_t), cudaMemcpyDefault));
  SALR_CUDA_CHECK(cudaMemcpy(&offsets[1], w.row_offsets + w.rows, sizeof(int64_t), cudaMemcpyDefault));
  SALR_CUDA_CHECK(cudaMemcpy(&offsets[2], w.row_offsets + row, 2 * sizeof(int64_t), cudaMemcpyDefault));
  RowFacts f;
  f.off_first = offsets[0];
  f.off_last = offsets[1];
  f.off_row = offsets[2];
  f.off_next = offsets[3];
  for (uint8_t b : row_bytes) f.popcount += cuda_index::popcount32(b);
  f.last_byte = row_bytes.back();
  throw InvalidInput(describe(label, cuda_index::error_code(word), row, w.cols, w.nnz, f));
}

// ---------------------------------------------------------------------------------------------- SALRLinear

class SALRLinearKernel {
 public:
  SALRLinearKernel(const OrtKernelInfo* ort_info, DType t, DType v) : t_(t) {
    Ort::ConstKernelInfo info{ort_info};
    const std::string label = node_label(info, kSALRLinearOp);
    weight_.init(info, label, read_in_features(info, label), 1, v, /*want_tiles=*/true);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(context); });
  }

 private:
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const std::string& label = weight_.label();
    const int64_t k = weight_.k();
    bool validated = false;
    BitmapWeightView w = weight_.view(ctx, &validated);
    const int64_t n = w.rows;
    Ort::ConstValue x = ctx.GetInput(0);
    Ort::ConstValue a = ctx.GetInput(4);
    Ort::ConstValue b = ctx.GetInput(5);
    Ort::ConstValue bias = ctx.GetInputCount() > 6 ? ctx.GetInput(6) : Ort::ConstValue{nullptr};
    const std::vector<int64_t> x_shape = shape_of(x);
    if (x_shape.empty() || x_shape.back() != k) {
      throw InvalidInput(label + ": input 'X': expected last dimension = in_features = " + std::to_string(k) +
                         ", got shape " + shape_str(x_shape));
    }
    const int64_t m = element_count(x_shape) / k;
    const std::vector<int64_t> a_shape = shape_of(a);
    if (a_shape.size() != 2) {
      throw InvalidInput(label + ": input 'A_cat': expected rank 2 [R, in_features], got shape " +
                         shape_str(a_shape));
    }
    const int64_t rank = a_shape[0];
    expect_shape(label, "A_cat", a_shape, {rank, k}, "[R, in_features]");
    expect_shape(label, "B_cat", shape_of(b), {n, rank}, "[N, R] (N = rows of bitmap, R = rows of A_cat)");
    if (present(bias)) expect_shape(label, "bias", shape_of(bias), {n}, "[N]");

    std::vector<int64_t> y_shape(x_shape.begin(), x_shape.end() - 1);
    y_shape.push_back(n);
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (m == 0 || n == 0) return;

    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    const size_t t_size = dtype_size(t_);
    const bool gemm = m > kGemvMaxM;
    const size_t h_bytes = align256(static_cast<size_t>(m * rank) * t_size);
    const size_t word_bytes = validated ? 0 : 256;
    const size_t tile_bytes =
        (validated || !gemm) ? 0 : static_cast<size_t>(n * (cuda_index::tile_count(k) + 1)) * sizeof(int32_t);
    Scratch scratch(context, x, h_bytes + word_bytes + tile_bytes);
    unsigned char* h = scratch.data();
    unsigned char* error_word = validated ? nullptr : scratch.data() + h_bytes;
    if (!validated) launch_validation(stream, &w, error_word, tile_bytes ? error_word + word_bytes : nullptr);
    if (rank > 0) LaunchDenseNTKernel(stream, t_, x.GetTensorRawData(), m, k, a.GetTensorRawData(), rank, h);
    LaunchSALRLinearKernel(stream, t_, w, x.GetTensorRawData(), m, h, b.GetTensorRawData(), rank,
                           present(bias) ? bias.GetTensorRawData() : nullptr, y.GetTensorMutableRawData(),
                           reinterpret_cast<const uint64_t*>(error_word));
    if (!validated) check_error_word(stream, label, w, error_word);
  }

  DType t_;
  BitmapWeightInput weight_;
};

template <ONNXTensorElementDataType TX, ONNXTensorElementDataType TV>
struct SALRLinearOp : Ort::CustomOpBase<SALRLinearOp<TX, TV>, SALRLinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new SALRLinearKernel(info, dtype_of(TX), dtype_of(TV)); });
  }
  const char* GetName() const { return kSALRLinearOp; }
  const char* GetExecutionProviderType() const { return kCudaEp; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1: return kU8;
      case 2: return TV;
      case 3: return kI64;
      default: return TX;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 6 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return TX; }
};

// -------------------------------------------------------------------------------------------- BitmapDecode

class BitmapDecodeKernel {
 public:
  BitmapDecodeKernel(const OrtKernelInfo* ort_info, DType v) {
    Ort::ConstKernelInfo info{ort_info};
    const std::string label = node_label(info, kBitmapDecodeOp);
    weight_.init(info, label, read_in_features(info, label), 0, v, /*want_tiles=*/false);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      bool validated = false;
      BitmapWeightView w = weight_.view(ctx, &validated);
      Ort::UnownedValue out = ctx.GetOutput(0, {w.rows, w.cols});
      if (w.rows == 0) return;
      cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
      Scratch scratch(context, ctx.GetInput(0), validated ? 0 : 256);
      if (!validated) launch_validation(stream, &w, scratch.data(), nullptr);
      LaunchBitmapDecodeKernel(stream, w, out.GetTensorMutableRawData(),
                               reinterpret_cast<const uint64_t*>(validated ? nullptr : scratch.data()));
      if (!validated) check_error_word(stream, weight_.label(), w, scratch.data());
    });
  }

 private:
  BitmapWeightInput weight_;
};

template <ONNXTensorElementDataType TV>
struct BitmapDecodeOp : Ort::CustomOpBase<BitmapDecodeOp<TV>, BitmapDecodeKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new BitmapDecodeKernel(info, dtype_of(TV)); });
  }
  const char* GetName() const { return kBitmapDecodeOp; }
  const char* GetExecutionProviderType() const { return kCudaEp; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? kU8 : index == 1 ? TV : kI64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return TV; }
};

// ---------------------------------------------------------------------------------------- FusedAdapterGemm

class FusedAdapterGemmKernel {
 public:
  FusedAdapterGemmKernel(const OrtKernelInfo* ort_info, DType t) : t_(t) {
    label_ = node_label(Ort::ConstKernelInfo{ort_info}, kFusedAdapterGemmOp);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      Ort::ConstValue x = ctx.GetInput(0);
      Ort::ConstValue a = ctx.GetInput(1);
      Ort::ConstValue b = ctx.GetInput(2);
      const std::vector<int64_t> x_shape = shape_of(x);
      const std::vector<int64_t> a_shape = shape_of(a);
      const std::vector<int64_t> b_shape = shape_of(b);
      if (a_shape.size() != 2) {
        throw InvalidInput(label_ + ": input 'A_cat': expected rank 2 [R, K], got shape " + shape_str(a_shape));
      }
      if (b_shape.size() != 2) {
        throw InvalidInput(label_ + ": input 'B_cat': expected rank 2 [N, R], got shape " + shape_str(b_shape));
      }
      const int64_t rank = a_shape[0];
      const int64_t k = a_shape[1];
      const int64_t n = b_shape[0];
      expect_shape(label_, "B_cat", b_shape, {n, rank}, "[N, R] (R = rows of A_cat)");
      if (x_shape.empty() || x_shape.back() != k) {
        throw InvalidInput(label_ + ": input 'X': expected last dimension K = " + std::to_string(k) +
                           " (columns of A_cat), got shape " + shape_str(x_shape));
      }
      std::vector<int64_t> lead(x_shape.begin(), x_shape.end() - 1);
      const int64_t m = element_count(lead);
      std::vector<int64_t> y_shape = lead;
      y_shape.push_back(n);
      Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
      if (m == 0 || n == 0) return;
      cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
      Scratch scratch(context, x, static_cast<size_t>(m * rank) * dtype_size(t_));
      LaunchFusedAdapterGemmKernel(stream, t_, x.GetTensorRawData(), m, k, a.GetTensorRawData(), rank,
                                   b.GetTensorRawData(), n, scratch.data(), y.GetTensorMutableRawData());
    });
  }

 private:
  DType t_;
  std::string label_;
};

template <ONNXTensorElementDataType TX>
struct FusedAdapterGemmOp : Ort::CustomOpBase<FusedAdapterGemmOp<TX>, FusedAdapterGemmKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new FusedAdapterGemmKernel(info, dtype_of(TX)); });
  }
  const char* GetName() const { return kFusedAdapterGemmOp; }
  const char* GetExecutionProviderType() const { return kCudaEp; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return TX; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return TX; }
};

}  // namespace

void RegisterOps(Ort::CustomOpDomain& domain) {
  // Static: ORT keeps raw pointers to the OrtCustomOp structs for the life of every session.
  static const SALRLinearOp<kF32, kF32> salr_f32_f32;
  static const SALRLinearOp<kF32, kF16> salr_f32_f16;
  static const SALRLinearOp<kF16, kF16> salr_f16_f16;
  static const BitmapDecodeOp<kF32> decode_f32;
  static const BitmapDecodeOp<kF16> decode_f16;
  static const FusedAdapterGemmOp<kF32> adapter_f32;
  static const FusedAdapterGemmOp<kF16> adapter_f16;
  for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{
           &salr_f32_f32, &salr_f32_f16, &salr_f16_f16, &decode_f32, &decode_f16, &adapter_f32, &adapter_f16}) {
    domain.Add(op);
  }
}

}  // namespace Cuda
}  // namespace salr
