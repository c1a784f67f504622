// ORT glue of the CPU kernels: type registrations, input validation, constant-initializer caching,
// activation conversion and the intra-op thread pool. The arithmetic lives in sparse_linear.cc and the
// kernels_*.cc sets.
//
// Every op is registered once per supported type combination (ORT merges same-name registrations into one
// schema and binds each node to the kernel matching its types):
//   SALRLinear       (X, values) in {(f32, f32), (f32, f16), (f16, f16)}
//   SALRLinearQ      X in {f32, f16} x values in {int8 (bits 8), uint8 (packed int4)}, scales f16
//   BitmapDecode     values in {f32, f16}  -> W has the values' type
//   FusedAdapterGemm X in {f32, f16}
#include "cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "format.h"
#include "kernels.h"
#include "large_pages.h"
#include "q24_layout.h"
#include "salr_ops.h"

namespace salr {
namespace Cpu {
namespace {

constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr ONNXTensorElementDataType kI64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

// An input that does not satisfy the op's contract: reported as ORT_INVALID_ARGUMENT.
struct InvalidInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

ValueType value_type(ONNXTensorElementDataType t) {
  return t == kF16 ? ValueType::kFloat16 : ValueType::kFloat32;
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Runs a driver's tasks on ORT's intra-op pool. ORT splits `total` statically, so each pool invocation
// pulls tasks from a shared counter: a thread that finishes early takes more rows (dynamic chunks), and
// intra_op_num_threads is honoured because only ORT's threads ever run them.
class PoolRunner {
 public:
  explicit PoolRunner(const Ort::KernelContext& ctx) : ctx_(ctx) {}

  Runner runner() {
    Runner r;
    r.run = &PoolRunner::run;
    r.self = this;
    return r;
  }

 private:
  struct State {
    std::atomic<int64_t> next{0};
    int64_t tasks = 0;
    void (*fn)(void*, int64_t) = nullptr;
    void* arg = nullptr;
    std::mutex mu;
    std::exception_ptr error;
  };

  static void worker(void* p, size_t) {
    State& s = *static_cast<State*>(p);
    for (int64_t i = s.next.fetch_add(1); i < s.tasks; i = s.next.fetch_add(1)) {
      try {
        s.fn(s.arg, i);
      } catch (...) {  // no exception may cross ORT's C thread pool; rethrown on the calling thread
        std::lock_guard<std::mutex> lock(s.mu);
        if (!s.error) s.error = std::current_exception();
      }
    }
  }

  static void run(void* self, int64_t tasks, void (*fn)(void*, int64_t), void* arg) {
    if (tasks <= 0) return;
    if (tasks == 1) {
      fn(arg, 0);
      return;
    }
    State s;
    s.tasks = tasks;
    s.fn = fn;
    s.arg = arg;
    static_cast<PoolRunner*>(self)->ctx_.ParallelFor(&PoolRunner::worker, static_cast<size_t>(tasks), 0, &s);
    if (s.error) std::rethrow_exception(s.error);
  }

  const Ort::KernelContext& ctx_;
};

std::string node_label(const Ort::ConstKernelInfo& info, const char* op) {
  std::string name;
  try {
    name = info.GetNodeName();
  } catch (const Ort::Exception&) {
  }
  return name.empty() ? std::string(op) : std::string(op) + " (node '" + name + "')";
}

int64_t read_in_features(const Ort::ConstKernelInfo& info, const std::string& label) {
  try {
    return info.GetAttribute<int64_t>(kInFeaturesAttr);
  } catch (const Ort::Exception& e) {
    throw InvalidInput(label + ": missing or invalid int attribute '" + kInFeaturesAttr + "': " + e.what());
  }
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

bool present(const Ort::ConstValue& v) { return static_cast<const OrtValue*>(v) != nullptr; }

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

// bitmap / values / row_offsets of one weight. Validated once at construction when all three are constant
// initializers (ORT hands the same buffers to every run, which is re-checked by pointer), else on every run.
// Quantized values (format v2): the attributes and where the scales input is.
struct Quantization {
  int bits = 0;  // 0: float values
  int64_t group_size = 0;
  size_t scales_index = 0;
};

// Bytes of a validated weight's values tensor.
int64_t value_bytes(const SparseWeight& w) {
  if (w.bits == 8) return w.nnz;
  if (w.bits == 4) return (w.nnz + 1) / 2;
  return w.nnz * (w.vtype == ValueType::kFloat16 ? 2 : 4);
}

class BitmapWeightInput {
 public:
  void init(const Ort::ConstKernelInfo& info, const std::string& label, int64_t in_features, size_t first,
            ValueType vtype, Quantization q = {}) {
    label_ = label;
    k_ = in_features;
    vtype_ = vtype;
    q_ = q;
    index_[0] = first;
    index_[1] = first + 1;
    index_[2] = first + 2;
    index_[3] = q.scales_index;
    Ort::ConstValue t[4];
    for (int i = 0; i < count(); ++i) {
      t[i] = constant_input(info, index_[i]);
      if (!present(t[i])) return;
    }
    BitmapTensors bt = tensors(t);
    const std::string err = check_bitmap_weight(label_.c_str(), k_, bt, &cached_);
    if (!err.empty()) throw InvalidInput(err);
    for (int i = 0; i < count(); ++i) cached_shapes_[i] = shape_of(t[i]);
    constant_ = true;
    // Every batch-1 call streams these from DRAM, one TLB miss per 4 KiB page. On huge pages a 4096^2 layer
    // ran 4-6% faster under ORT (50% and 2:4, fp16 values, 2 threads; BENCHMARKS.md section 2, thirteenth
    // session), for ~1.4 ms per MiB once, here at session creation.
    advise_large_pages(cached_.bitmap, static_cast<size_t>(cached_.rows * cached_.width));
    advise_large_pages(cached_.values, static_cast<size_t>(value_bytes(cached_)));
  }

  // Builds the batch-1 integer path's packed copy of a constant weight, once (q24_layout.h). It costs as many
  // bytes again as the bitmap and values, which ORT keeps alive as initializers.
  void pack_int_path() {
    if (!constant_ || !int_path_applies(cached_)) return;
    packed_ = pack_q24(cached_);
    cached_.q24 = packed_.data();
  }

  SparseWeight get(const Ort::KernelContext& ctx) const {
    Ort::ConstValue t[4];
    for (int i = 0; i < count(); ++i) {
      t[i] = ctx.GetInput(index_[i]);
      if (!present(t[i])) throw InvalidInput(label_ + ": input '" + kNames[i] + "' is missing");
    }
    bool same = constant_;
    for (int i = 0; same && i < count(); ++i) {
      same = t[i].GetTensorRawData() == cached_data(i) && shape_of(t[i]) == cached_shapes_[i];
    }
    if (same) return cached_;
    SparseWeight w;
    const std::string err = check_bitmap_weight(label_.c_str(), k_, tensors(t), &w);
    if (!err.empty()) throw InvalidInput(err);
    return w;
  }

 private:
  static constexpr const char* kNames[4] = {"bitmap", "values", "row_offsets", "scales"};

  int count() const { return q_.bits ? 4 : 3; }

  const void* cached_data(int i) const {
    const void* data[4] = {cached_.bitmap, cached_.values, cached_.row_offsets, cached_.scales};
    return data[i];
  }

  BitmapTensors tensors(const Ort::ConstValue* t) const {
    BitmapTensors bt;
    bt.bitmap_shape = shape_of(t[0]);
    bt.values_shape = shape_of(t[1]);
    bt.offsets_shape = shape_of(t[2]);
    bt.bitmap = static_cast<const uint8_t*>(t[0].GetTensorRawData());
    bt.values = t[1].GetTensorRawData();
    bt.row_offsets = static_cast<const int64_t*>(t[2].GetTensorRawData());
    bt.vtype = vtype_;
    if (q_.bits) {
      bt.bits = q_.bits;
      bt.group_size = q_.group_size;
      bt.scales_shape = shape_of(t[3]);
      bt.scales = static_cast<const uint16_t*>(t[3].GetTensorRawData());
    }
    return bt;
  }

  std::string label_;
  int64_t k_ = 0;
  size_t index_[4] = {};
  ValueType vtype_ = ValueType::kFloat16;
  Quantization q_;
  bool constant_ = false;
  SparseWeight cached_;
  std::vector<int64_t> cached_shapes_[4];
  LargeBytes packed_;
};

// A float input (adapter factor, bias) needed in fp32. A constant fp16 initializer is converted once; a
// constant B [N, R] can also be kept transposed (`transposed`, AdapterTerms::b_t).
class FloatInput {
 public:
  void init(const Ort::ConstKernelInfo& info, size_t index, bool is_f16, const KernelSet& ks,
            bool transposed = false) {
    Ort::ConstValue v = constant_input(info, index);
    if (!present(v)) return;
    const void* data = v.GetTensorRawData();
    data_ = data;
    const std::vector<int64_t> shape = shape_of(v);
    shape_ = shape;
    const int64_t count = element_count(shape);
    if (is_f16) {
      converted_.resize(static_cast<size_t>(count));
      ks.f16_to_f32(static_cast<const uint16_t*>(data), converted_.data(), count);
    }
    if (transposed && shape.size() == 2) {
      const float* b = is_f16 ? converted_.data() : static_cast<const float*>(data);
      transposed_ = adapter_transposed(b, shape[0], shape[1]);
      spans_ = adapter_rank_spans(b, shape[0], shape[1]);
      rows_ = shape[0];
    }
  }

  // The constant in fp32 (its shape in `shape`), or null when the input is not a constant initializer.
  const float* constant_f32(std::vector<int64_t>* shape) const {
    if (data_ == nullptr) return nullptr;
    *shape = shape_;
    return converted_.empty() ? static_cast<const float*>(data_) : converted_.data();
  }
  bool is_constant(const Ort::ConstValue& v) const { return data_ != nullptr && v.GetTensorRawData() == data_; }
  // Frees the transposed copy; transposed() is null from then on.
  void drop_transposed() {
    std::vector<float>().swap(transposed_);
    std::vector<int32_t>().swap(spans_);
  }

  // `v` transposed when `v` is the constant that init() laid out, else null; rows() is its row stride.
  const float* transposed(const Ort::ConstValue& v) const {
    return !transposed_.empty() && v.GetTensorRawData() == data_ ? transposed_.data() : nullptr;
  }
  int64_t rows() const { return rows_; }
  // AdapterTerms::b_t_spans of the constant laid out by init(), valid where transposed(v) is.
  const int32_t* spans() const { return spans_.data(); }

  // fp32 view of `v` (count elements); `scratch` holds a conversion when one is needed.
  const float* get(const Ort::ConstValue& v, int64_t count, bool is_f16, const KernelSet& ks,
                   std::vector<float>& scratch) const {
    const void* data = v.GetTensorRawData();
    if (!is_f16) return static_cast<const float*>(data);
    if (data_ != nullptr && data == data_ && static_cast<int64_t>(converted_.size()) == count) return converted_.data();
    scratch.resize(static_cast<size_t>(count));
    ks.f16_to_f32(static_cast<const uint16_t*>(data), scratch.data(), count);
    return scratch.data();
  }

 private:
  const void* data_ = nullptr;
  std::vector<int64_t> shape_;
  std::vector<float> converted_;
  std::vector<float> transposed_;
  std::vector<int32_t> spans_;
  int64_t rows_ = 0;
};

// X [..., K] as fp32 rows of stride ldx >= ceil(K/8)*8 with a zeroed tail, as the sparse kernels require.
const float* prepare_rows(const void* data, bool is_f16, int64_t m, int64_t k, int64_t ldx, const KernelSet& ks,
                          std::vector<float>& scratch) {
  if (!is_f16 && ldx == k) return static_cast<const float*>(data);
  scratch.assign(static_cast<size_t>(m * ldx), 0.f);
  for (int64_t i = 0; i < m; ++i) {
    if (is_f16) {
      ks.f16_to_f32(static_cast<const uint16_t*>(data) + i * k, scratch.data() + i * ldx, k);
    } else {
      const float* src = static_cast<const float*>(data) + i * k;
      std::copy(src, src + k, scratch.data() + i * ldx);
    }
  }
  return scratch.data();
}

void expect_shape(const std::string& label, const char* input, const std::vector<int64_t>& got,
                  const std::vector<int64_t>& want, const char* meaning) {
  if (got != want) {
    throw InvalidInput(label + ": input '" + input + "': expected shape " + shape_to_string(want) + " " + meaning +
                       ", got " + shape_to_string(got));
  }
}

void expect_rank(const std::string& label, const char* input, const std::vector<int64_t>& got, size_t rank,
                 const char* meaning) {
  if (got.size() != rank) {
    throw InvalidInput(label + ": input '" + input + "': expected rank " + std::to_string(rank) + " " + meaning +
                       ", got shape " + shape_to_string(got));
  }
}

// X [..., K]: returns M = prod(leading dims).
int64_t activation_rows(const std::string& label, const std::vector<int64_t>& x_shape, int64_t k) {
  if (x_shape.empty() || x_shape.back() != k) {
    std::ostringstream s;
    s << label << ": input 'X': expected last dimension = in_features = " << k << ", got shape "
      << shape_to_string(x_shape);
    throw InvalidInput(s.str());
  }
  return element_count(x_shape) / std::max<int64_t>(k, 1);
}

// Wraps a kernel body so that no C++ exception crosses the C ABI.
template <typename F>
OrtStatusPtr guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const InvalidInput& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, "salr_ops: unknown C++ exception");
  }
}

// ---------------------------------------------------------------------------------------------- SALRLinear

int64_t read_int_attribute(const Ort::ConstKernelInfo& info, const char* name, const std::string& label) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception& e) {
    throw InvalidInput(label + ": missing or invalid int attribute '" + name + "': " + e.what());
  }
}

// SALRLinear: X, bitmap, values, row_offsets, A_cat, B_cat, bias?
// SALRLinearQ: X, bitmap, values, row_offsets, scales, A_cat, B_cat, bias? (attributes bits, group_size)
class SALRLinearKernel {
 public:
  SALRLinearKernel(const OrtKernelInfo* ort_info, bool x_f16, ValueType vtype, int quantized_bits = 0)
      : x_f16_(x_f16), ks_(best_kernels()) {
    Ort::ConstKernelInfo info{ort_info};
    label_ = node_label(info, quantized_bits ? kSALRLinearQOp : kSALRLinearOp);
    k_ = read_in_features(info, label_);
    Quantization q;
    if (quantized_bits) {
      q.bits = static_cast<int>(read_int_attribute(info, kBitsAttr, label_));
      q.group_size = read_int_attribute(info, kGroupSizeAttr, label_);
      q.scales_index = 4;
      if (q.bits != quantized_bits) {
        throw InvalidInput(label_ + ": attribute 'bits' = " + std::to_string(q.bits) + " does not match input 'values' (" +
                           (quantized_bits == 8 ? "int8: bits = 8" : "uint8: packed int4, bits = 4") + ")");
      }
      if (q.group_size < 1) {
        throw InvalidInput(label_ + ": attribute 'group_size' must be >= 1, got " + std::to_string(q.group_size));
      }
    }
    adapter_index_ = quantized_bits ? 5 : 4;
    weight_.init(info, label_, k_, 1, vtype, q);
    if (ks_.gemv_rows_q24 != nullptr) weight_.pack_int_path();
    a_.init(info, adapter_index_, x_f16, ks_);
    b_.init(info, adapter_index_ + 1, x_f16, ks_, /*transposed=*/true);
    bias_.init(info, adapter_index_ + 2, x_f16, ks_);
    std::vector<int64_t> a_shape, b_shape;
    const float* a = a_.constant_f32(&a_shape);
    const float* b = b_.constant_f32(&b_shape);
    // shapes that disagree are left to compute() to report
    if (a != nullptr && b != nullptr && a_shape.size() == 2 && b_shape.size() == 2 && a_shape[1] == k_ &&
        b_shape[1] == a_shape[0]) {
      panels_ = adapter_panels(a, b, b_shape[0], k_, a_shape[0]);
      if (!panels_.a.empty()) b_.drop_transposed();  // batch 1 reads the panels instead
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

 private:
  void compute(const Ort::KernelContext& ctx) {
    const SparseWeight w = weight_.get(ctx);
    const int64_t n = w.rows;
    Ort::ConstValue x = ctx.GetInput(0);
    Ort::ConstValue a = ctx.GetInput(adapter_index_);
    Ort::ConstValue b = ctx.GetInput(adapter_index_ + 1);
    Ort::ConstValue bias =
        ctx.GetInputCount() > adapter_index_ + 2 ? ctx.GetInput(adapter_index_ + 2) : Ort::ConstValue{nullptr};
    const std::vector<int64_t> x_shape = shape_of(x);
    const int64_t m = activation_rows(label_, x_shape, k_);
    const std::vector<int64_t> a_shape = shape_of(a);
    const std::vector<int64_t> b_shape = shape_of(b);
    expect_rank(label_, "A_cat", a_shape, 2, "[R, in_features]");
    const int64_t rank = a_shape[0];
    expect_shape(label_, "A_cat", a_shape, {rank, k_}, "[R, in_features]");
    expect_shape(label_, "B_cat", b_shape, {n, rank}, "[N, R] (N = rows of bitmap, R = rows of A_cat)");
    if (present(bias)) expect_shape(label_, "bias", shape_of(bias), {n}, "[N]");

    std::vector<int64_t> y_shape(x_shape.begin(), x_shape.end() - 1);
    y_shape.push_back(n);
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (m == 0 || n == 0) return;

    std::vector<float> a_tmp, b_tmp, bias_tmp, x_tmp, y_tmp;
    AdapterTerms ad;
    ad.rank = rank;
    if (rank > 0) {
      ad.a = a_.get(a, rank * k_, x_f16_, ks_, a_tmp);
      ad.b = b_.get(b, n * rank, x_f16_, ks_, b_tmp);
      ad.b_t = b_.transposed(b);
      ad.b_t_stride = b_.rows();
      if (ad.b_t != nullptr) ad.b_t_spans = b_.spans();
      if (a_.is_constant(a) && b_.is_constant(b)) ad.panels = panels_.view();
    }
    if (present(bias)) ad.bias = bias_.get(bias, n, x_f16_, ks_, bias_tmp);
    const int64_t ldx = w.width * 8;
    const float* xf = prepare_rows(x.GetTensorRawData(), x_f16_, m, k_, ldx, ks_, x_tmp);
    float* yf = nullptr;
    if (x_f16_) {
      y_tmp.resize(static_cast<size_t>(m * n));
      yf = y_tmp.data();
    } else {
      yf = y.GetTensorMutableData<float>();
    }
    PoolRunner pool(ctx);
    sparse_linear(ks_, w, ad, xf, m, ldx, yf, pool.runner());
    if (x_f16_) ks_.f32_to_f16(yf, static_cast<uint16_t*>(y.GetTensorMutableRawData()), m * n);
  }

  bool x_f16_;
  const KernelSet& ks_;
  std::string label_;
  int64_t k_ = 0;
  size_t adapter_index_ = 4;
  BitmapWeightInput weight_;
  FloatInput a_, b_, bias_;
  AdapterPanelStore panels_;
};

template <ONNXTensorElementDataType TX, ONNXTensorElementDataType TV>
struct SALRLinearOp : Ort::CustomOpBase<SALRLinearOp<TX, TV>, SALRLinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new SALRLinearKernel(info, TX == kF16, value_type(TV)); });
  }
  const char* GetName() const { return kSALRLinearOp; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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

// X in {f32, f16}; values int8 (bits 8) or uint8 (packed int4); scales f16.
template <ONNXTensorElementDataType TX, ONNXTensorElementDataType TV>
struct SALRLinearQOp : Ort::CustomOpBase<SALRLinearQOp<TX, TV>, SALRLinearKernel, true> {
  static constexpr int kBits = TV == kI8 ? 8 : 4;
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new SALRLinearKernel(info, TX == kF16, ValueType::kFloat32, kBits); });
  }
  const char* GetName() const { return kSALRLinearQOp; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1: return kU8;
      case 2: return TV;
      case 3: return kI64;
      case 4: return kF16;
      default: return TX;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return TX; }
};

// -------------------------------------------------------------------------------------------- BitmapDecode

class BitmapDecodeKernel {
 public:
  BitmapDecodeKernel(const OrtKernelInfo* ort_info, ValueType vtype) {
    Ort::ConstKernelInfo info{ort_info};
    label_ = node_label(info, kBitmapDecodeOp);
    k_ = read_in_features(info, label_);
    weight_.init(info, label_, k_, 0, vtype);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const SparseWeight w = weight_.get(ctx);
      Ort::UnownedValue out = ctx.GetOutput(0, {w.rows, w.cols});
      if (w.rows == 0) return;
      PoolRunner pool(ctx);
      bitmap_decode(w, out.GetTensorMutableRawData(), pool.runner());
    });
  }

 private:
  std::string label_;
  int64_t k_ = 0;
  BitmapWeightInput weight_;
};

template <ONNXTensorElementDataType TV>
struct BitmapDecodeOp : Ort::CustomOpBase<BitmapDecodeOp<TV>, BitmapDecodeKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new BitmapDecodeKernel(info, value_type(TV)); });
  }
  const char* GetName() const { return kBitmapDecodeOp; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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
  FusedAdapterGemmKernel(const OrtKernelInfo* ort_info, bool x_f16) : x_f16_(x_f16), ks_(best_kernels()) {
    Ort::ConstKernelInfo info{ort_info};
    label_ = node_label(info, kFusedAdapterGemmOp);
    a_.init(info, 1, x_f16, ks_);
    b_.init(info, 2, x_f16, ks_);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

 private:
  void compute(const Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(0);
    Ort::ConstValue a = ctx.GetInput(1);
    Ort::ConstValue b = ctx.GetInput(2);
    const std::vector<int64_t> x_shape = shape_of(x);
    const std::vector<int64_t> a_shape = shape_of(a);
    const std::vector<int64_t> b_shape = shape_of(b);
    expect_rank(label_, "A_cat", a_shape, 2, "[R, K]");
    expect_rank(label_, "B_cat", b_shape, 2, "[N, R]");
    const int64_t rank = a_shape[0];
    const int64_t k = a_shape[1];
    const int64_t n = b_shape[0];
    expect_shape(label_, "B_cat", b_shape, {n, rank}, "[N, R] (R = rows of A_cat)");
    if (x_shape.empty() || x_shape.back() != k) {
      throw InvalidInput(label_ + ": input 'X': expected last dimension K = " + std::to_string(k) +
                         " (columns of A_cat), got shape " + shape_to_string(x_shape));
    }
    std::vector<int64_t> y_shape(x_shape.begin(), x_shape.end() - 1);
    const int64_t m = element_count(y_shape);  // rows of X, also when K = 0
    y_shape.push_back(n);
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (m == 0 || n == 0) return;

    std::vector<float> a_tmp, b_tmp, x_tmp, y_tmp, t(static_cast<size_t>(m * rank));
    const float* xf = prepare_rows(x.GetTensorRawData(), x_f16_, m, k, k, ks_, x_tmp);
    float* yf = nullptr;
    if (x_f16_) {
      y_tmp.resize(static_cast<size_t>(m * n));
      yf = y_tmp.data();
    } else {
      yf = y.GetTensorMutableData<float>();
    }
    PoolRunner pool(ctx);
    if (rank > 0) {
      const float* af = a_.get(a, rank * k, x_f16_, ks_, a_tmp);
      const float* bf = b_.get(b, n * rank, x_f16_, ks_, b_tmp);
      dense_nt(ks_, m, rank, k, xf, k, af, k, t.data(), rank, pool.runner());
      dense_nt(ks_, m, n, rank, t.data(), rank, bf, rank, yf, n, pool.runner());
    } else {
      std::fill(yf, yf + m * n, 0.f);
    }
    if (x_f16_) ks_.f32_to_f16(yf, static_cast<uint16_t*>(y.GetTensorMutableRawData()), m * n);
  }

  bool x_f16_;
  const KernelSet& ks_;
  std::string label_;
  FloatInput a_, b_;
};

template <ONNXTensorElementDataType TX>
struct FusedAdapterGemmOp : Ort::CustomOpBase<FusedAdapterGemmOp<TX>, FusedAdapterGemmKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new FusedAdapterGemmKernel(info, TX == kF16); });
  }
  const char* GetName() const { return kFusedAdapterGemmOp; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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
  static const SALRLinearQOp<kF32, kI8> salrq_f32_i8;
  static const SALRLinearQOp<kF32, kU8> salrq_f32_u4;
  static const SALRLinearQOp<kF16, kI8> salrq_f16_i8;
  static const SALRLinearQOp<kF16, kU8> salrq_f16_u4;
  static const BitmapDecodeOp<kF32> decode_f32;
  static const BitmapDecodeOp<kF16> decode_f16;
  static const FusedAdapterGemmOp<kF32> adapter_f32;
  static const FusedAdapterGemmOp<kF16> adapter_f16;
  for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{
           &salr_f32_f32, &salr_f32_f16, &salr_f16_f16, &salrq_f32_i8, &salrq_f32_u4, &salrq_f16_i8, &salrq_f16_u4,
           &decode_f32, &decode_f16, &adapter_f32, &adapter_f16}) {
    domain.Add(op);
  }
}

}  // namespace Cpu
}  // namespace salr
