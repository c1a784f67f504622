// Drivers of SALRLinear / FusedAdapterGemm / BitmapDecode: blocking, threading and the adapter epilogue.
// The inner loops come from a KernelSet (scalar, AVX2 or NEON), so this file is ISA-neutral.
//
// Three regimes, chosen by the number of activation rows m:
// - m == 1 (decode step): memory-bound. gemv_rows decodes the bitmap on the fly, never materialising W.
// - 1 < m < kLargeM: the decode is paid once per weight per 8 activation rows, not once per row. With the
//   set's gemm_rows_small each bitmap byte is expanded in a register and multiplied into all 8 rows (4096x4096
//   at m = 8 went from 0.61-0.75x of ORT's dense MatMul to 1.07-1.18x); without it (NEON) each pair of W rows
//   is expanded into a small L1-resident buffer that all m rows reuse.
// - m >= kLargeM (prefill): compute-bound; X is read transposed, in blocks of activation rows. Below
//   kDenseTileDensity work follows the kept entries: a row segment of W is turned into (column, value)
//   pairs once (the column already scaled to its X^T offset), and each pair adds value * X[:, column] to a
//   register block of 64 outputs. From that density on, a segment of 36 rows is decoded into a dense buffer
//   and a 6 x 16 register-blocked microkernel runs it against X^T. A pair costs a broadcast and 8 loads per
//   8 FMAs where the microkernel needs 8 loads per 12, so the pairs run ~80% of its FMA rate (4.75 against
//   5.9 G FMA/s, L1-resident loops on Zen 3) and win while they do at most ~60% of its FMAs: one thread at
//   m = 128 ran 4096x4096 2:4 in 43.9 ms against the tiles' 60.9, 50% in 47.8 against 53.7, and 60% kept
//   in 55.0 against 53.8 (kernel_selftest --bench, min of 3). The pairs' values stream from 32 rows at once,
//   more streams than the hardware prefetcher follows, so extract_row prefetches each row's next block.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "kernels.h"
#include "q24_layout.h"

namespace salr {
namespace {

constexpr int64_t kLargeM = 16;
constexpr int64_t kSmallChunkRows = 32;
constexpr int64_t kSmallSpanBytes = 64;  // 512 columns per expanded row buffer: 2 rows x 2 KiB stay in L1
// Prefill blocking: a chunk of 32 rows of W streams against one K block of X^T (128 columns x 64 outputs
// = 32 KiB, L1/L2-resident), so each X^T row loaded serves ~16 kept entries of the chunk. On the 2-core AVX2
// machine 32- and 64-row chunks measured within noise of each other; 64-column blocks lost ~10% to the
// per-call overhead and 256-column ones more to L1 misses.
constexpr int64_t kLargeChunkRows = 32;
constexpr int64_t kLargeSpanBytes = 16;
constexpr int64_t kLargeMBlock = 64;  // outputs per register block (8 AVX2 / 16 NEON vectors)
// The dense microkernel: 6 W rows x 16 outputs; 36 rows x 128 columns decoded (18 KiB) beside the 8 KiB of
// X^T the 16 outputs read, both L1-resident while every row group passes over them.
constexpr double kDenseTileDensity = 0.6;
constexpr int64_t kDenseChunkRows = 36;
constexpr int kDenseRows = 6;
constexpr int kDenseShift = 4;
constexpr int64_t kDenseCols = int64_t{1} << kDenseShift;
// X A^T up to this many multiply-adds runs on the calling thread: a pool dispatch costs more than the work
// (SmolLM2 decode: 210 layers per token, rank ~11 x 576 columns each).
constexpr int64_t kSerialAdapterMacs = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxThreads = 64;

int64_t hardware_threads() {
  static const int64_t threads = std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, kMaxThreads);
  return threads;
}

// Batch-1 scheduling. A batch-1 pass streams its weight once from DRAM, and every task boundary restarts that
// stream cold: SmolLM2 decode (210 small layers a token, 2 threads) ran 0.94x, 1.10x and 1.21x of ORT int4
// with 16-row, 64-row and two tasks per layer. So each hardware thread owns one contiguous range of rows and
// takes it from the front in blocks, reading its stream in order; a thread that finishes its range takes
// blocks from the back of another's, so a core that stalls or a pool thread that wakes late no longer holds
// up the whole layer (with static halves the faster thread waited).
class RowRanges {
 public:
  static constexpr int64_t kMaxRanges = kMaxThreads;

  // rows split into blocks of a multiple of 8 rows (whole vectors for the adapter epilogue), about
  // kBlocksPerRange per range.
  explicit RowRanges(int64_t rows) : rows_(rows) {
    const int64_t threads = hardware_threads();
    block_rows_ = std::max<int64_t>(8, ceil_div(ceil_div(rows, threads * kBlocksPerRange), 8) * 8);
    const int64_t blocks = ceil_div(rows, block_rows_);
    ranges_ = std::max<int64_t>(1, std::min(threads, blocks));
    for (int64_t r = 0; r < ranges_; ++r) {
      const uint64_t front = static_cast<uint64_t>(r * blocks / ranges_);
      const uint64_t back = static_cast<uint64_t>((r + 1) * blocks / ranges_);
      span_[r].v.store(front | (back << 32), std::memory_order_relaxed);
    }
  }

  int64_t ranges() const { return ranges_; }

  // Task i: its own range from the front, then the others' from the back; f(n0, n1) per block of rows.
  template <class F>
  void run(int64_t i, F&& f) {
    int64_t b;
    while (claim(i, /*front=*/true, &b)) f(b * block_rows_, std::min(rows_, (b + 1) * block_rows_));
    for (int64_t j = 1; j < ranges_; ++j) {
      const int64_t other = (i + j) % ranges_;
      while (claim(other, /*front=*/false, &b)) f(b * block_rows_, std::min(rows_, (b + 1) * block_rows_));
    }
  }

 private:
  static constexpr int64_t kBlocksPerRange = 8;

  // Takes the next block of range r, from its front or its back. span: front block (low 32 bits) and end
  // block (high 32 bits) of what is left.
  bool claim(int64_t r, bool front, int64_t* block) {
    uint64_t s = span_[r].v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = s & 0xffffffffu, hi = s >> 32;
      if (lo >= hi) return false;
      const uint64_t next = front ? (lo + 1) | (hi << 32) : lo | ((hi - 1) << 32);
      if (span_[r].v.compare_exchange_weak(s, next, std::memory_order_relaxed)) {
        *block = static_cast<int64_t>(front ? lo : hi - 1);
        return true;
      }
    }
  }

  struct alignas(64) Span {  // one cache line each: owners claiming their own fronts do not contend
    std::atomic<uint64_t> v;
  };

  int64_t rows_;
  int64_t block_rows_ = 8;
  int64_t ranges_ = 1;
  Span span_[kMaxRanges];
};

// Adds (T B^T)[.., n0:n1] and bias[n0:n1] to y rows, T = X A^T [m, rank].
// y[n0:n1] += B[n0:n1, :] t for one activation row, from B^T (AdapterTerms::b_t): 64 outputs a call.
void adapter_epilogue_transposed(const KernelSet& ks, const AdapterTerms& ad, const float* t, float* y, int64_t n0,
                                 int64_t n1) {
  // The offsets of the rows of B^T are int32: a B^T beyond 2^31 floats takes the scalar loop below.
  const bool offsets_fit = ad.rank * ad.b_t_stride <= std::numeric_limits<int32_t>::max();
  thread_local std::vector<int32_t> rows;
  if (offsets_fit) {
    if (static_cast<int64_t>(rows.size()) < ad.rank) rows.resize(static_cast<size_t>(ad.rank));
    for (int64_t r = 0; r < ad.rank; ++r) rows[r] = static_cast<int32_t>(r * ad.b_t_stride);
  }
  int64_t n = n0;
  while (offsets_fit && n + 8 <= n1) {
    const int nvec = static_cast<int>(std::min<int64_t>(8, (n1 - n) / 8));
    int64_t r0 = 0, r1 = ad.rank;
    if (ad.b_t_spans != nullptr && n % 8 == 0) {
      r0 = ad.rank;
      r1 = 0;
      for (int64_t g = n / 8; g < n / 8 + nvec; ++g) {
        r0 = std::min<int64_t>(r0, ad.b_t_spans[2 * g]);
        r1 = std::max<int64_t>(r1, ad.b_t_spans[2 * g + 1]);
      }
    }
    if (r1 > r0) ks.axpy_block(rows.data() + r0, t + r0, r1 - r0, ad.b_t + n, y + n, nvec);
    n += 8 * nvec;
  }
  for (; n < n1; ++n) {
    for (int64_t r = 0; r < ad.rank; ++r) y[n] += t[r] * ad.b_t[r * ad.b_t_stride + n];
  }
}

// y[n0:n1] += B[n0:n1, :] t for one activation row, from the compact panels (AdapterPanels); n0 % 8 == 0.
void adapter_epilogue_panels(const KernelSet& ks, const AdapterPanels& p, const float* t, float* y, int64_t n0,
                             int64_t n1) {
  const int64_t g0 = n0 / 8, whole = n1 / 8;
  if (whole > g0) ks.panels_f16(p, t, y + n0, g0, whole);
  if (n1 > 8 * whole) {  // the weight's last, partial group: its panel is zero-padded to 8 outputs
    float tail[8] = {};
    ks.panels_f16(p, t, tail, whole, whole + 1);
    for (int64_t i = 8 * whole; i < n1; ++i) y[i] += tail[i - 8 * whole];
  }
}

// A call's T = x A^T for batch 1 with compact adapters, split into shares of ranks. Each task first computes
// the share of its own index, so the threads' passes over A run side by side and each reads only its part of
// A (a whole T per thread read all of A on every thread: 512 KiB each at r = 64, K = 4096; BENCHMARKS.md
// section 2, twelfth session). A task that needs all of T computes the shares no task has taken yet and waits
// for those in progress: a taken share is being computed by a running thread, so the wait ends even when the
// pool runs the tasks one after another on one thread.
class SharedAdapterInput {
 public:
  SharedAdapterInput(const KernelSet& ks, const AdapterTerms& ad, const float* x, int64_t k, int64_t shares)
      : ks_(ks), ad_(ad), x_(x), len_(ceil_div(k, 8) * 8), shares_(std::clamp<int64_t>(shares, 1, ad.rank)),
        t_(static_cast<size_t>(ad.rank)), state_(new std::atomic<int>[static_cast<size_t>(shares_)]) {
    for (int64_t i = 0; i < shares_; ++i) state_[i].store(kFree, std::memory_order_relaxed);
  }

  // Computes share i unless a task has taken it (i past the last share: nothing).
  void compute(int64_t i) {
    if (i >= shares_) return;
    int expected = kFree;
    if (!state_[i].compare_exchange_strong(expected, kTaken, std::memory_order_relaxed)) return;
    const int64_t r0 = i * ad_.rank / shares_, r1 = (i + 1) * ad_.rank / shares_;
    ks_.dot_rows_f16(ad_.panels.a + r0 * ad_.panels.a_stride, r1 - r0, ad_.panels.a_stride, len_, x_,
                     t_.data() + r0);
    state_[i].store(kDone, std::memory_order_release);
  }

  // All of T.
  const float* all() {
    if (complete_.load(std::memory_order_acquire)) return t_.data();
    for (int64_t i = 0; i < shares_; ++i) compute(i);
    for (int64_t i = 0; i < shares_; ++i) {
      while (state_[i].load(std::memory_order_acquire) != kDone) std::this_thread::yield();
    }
    complete_.store(true, std::memory_order_release);
    return t_.data();
  }

 private:
  static constexpr int kFree = 0, kTaken = 1, kDone = 2;
  const KernelSet& ks_;
  const AdapterTerms& ad_;
  const float* x_;
  int64_t len_;
  int64_t shares_;
  std::vector<float> t_;
  std::unique_ptr<std::atomic<int>[]> state_;
  std::atomic<bool> complete_{false};
};

void adapter_epilogue(const KernelSet& ks, const AdapterTerms& ad, const float* t, int64_t m, int64_t n_total,
                      float* y, int64_t n0, int64_t n1) {
  if (ad.rank > 0 && m == 1 && ad.panels.a != nullptr) {
    adapter_epilogue_panels(ks, ad.panels, t, y, n0, n1);
  } else if (ad.rank > 0 && m == 1 && ad.b_t != nullptr) {
    adapter_epilogue_transposed(ks, ad, t, y, n0, n1);
  } else if (ad.rank > 0) {
    ks.dot_nt(m, n1 - n0, ad.rank, t, ad.rank, ad.b + n0 * ad.rank, ad.rank, y + n0, n_total, true);
  }
  if (ad.bias) {
    for (int64_t i = 0; i < m; ++i) {
      float* yi = y + i * n_total;
      for (int64_t n = n0; n < n1; ++n) yi[n] += ad.bias[n];
    }
  }
}

struct Job {
  const KernelSet* ks;
  const SparseWeight* w;
  const AdapterTerms* ad;
  const float* x;
  int64_t m;
  int64_t ldx;
  const float* t;  // X A^T [m, rank] (m == 1 and small-m paths); null at m == 1: `shared` holds it
  SharedAdapterInput* shared;
  float* y;
  RowRanges* rows;  // m == 1
  int64_t chunk_rows;
  // large-m path
  const float* xt;       // per m-block: [width * 8 + rank][mblock] (X^T then T^T), mbw of each row used
  int64_t mblocks;
  int64_t mblock;        // activation rows per X^T block: kLargeMBlock, or kDenseCols for the dense tiles
  int shift;             // log2(mblock): X^T row k of a block starts at k << shift
  int64_t k_span_bytes;  // bitmap bytes per K block
  int64_t mpad;
};

void gemv_task(void* arg, int64_t c) {
  const Job& j = *static_cast<const Job*>(arg);
  if (j.shared) j.shared->compute(c);
  j.rows->run(c, [&](int64_t n0, int64_t n1) {
    j.ks->gemv_rows(*j.w, j.x, j.y + n0, n0, n1);
    const float* t = j.t ? j.t : j.shared->all();
    adapter_epilogue(*j.ks, *j.ad, t, 1, j.w->rows, j.y, n0, n1);
  });
}

void small_m_task(void* arg, int64_t c) {
  const Job& j = *static_cast<const Job*>(arg);
  const SparseWeight& w = *j.w;
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, w.rows);
  alignas(64) float buf[2 * kSmallSpanBytes * 8];
  const int64_t span = kSmallSpanBytes * 8;
  for (int64_t i = 0; i < j.m; ++i) std::memset(j.y + i * w.rows + n0, 0, sizeof(float) * (n1 - n0));
  for (int64_t n = n0; n < n1; n += 2) {
    const int64_t nr = std::min<int64_t>(2, n1 - n);
    int64_t pos[2] = {w.row_offsets[n], nr > 1 ? w.row_offsets[n + 1] : 0};
    for (int64_t g0 = 0; g0 < w.width; g0 += kSmallSpanBytes) {
      const int64_t g1 = std::min(g0 + kSmallSpanBytes, w.width);
      for (int64_t r = 0; r < nr; ++r) pos[r] = j.ks->decode_row_f32(w, n + r, g0, g1, pos[r], buf + r * span);
      j.ks->dot_nt(j.m, nr, 8 * (g1 - g0), j.x + 8 * g0, j.ldx, buf, span, j.y + n, w.rows, true);
    }
  }
  adapter_epilogue(*j.ks, *j.ad, j.t, j.m, w.rows, j.y, n0, n1);
}

// Small batches with the set's gemm_rows_small: each row of W is decoded once per 8 activation rows, in
// registers, with no buffer between the decode and the FMAs.
void small_m_rows_task(void* arg, int64_t c) {
  const Job& j = *static_cast<const Job*>(arg);
  const SparseWeight& w = *j.w;
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, w.rows);
  for (int64_t i = 0; i < j.m; i += kSmallRowsM) {
    const int rows = static_cast<int>(std::min<int64_t>(kSmallRowsM, j.m - i));
    j.ks->gemm_rows_small(w, j.x + i * j.ldx, j.ldx, rows, j.y + i * w.rows + n0, w.rows, n0, n1);
  }
  adapter_epilogue(*j.ks, *j.ad, j.t, j.m, w.rows, j.y, n0, n1);
}

int64_t mblock_width(const Job& j, int64_t b) {
  return std::min(j.mblock, j.mpad - b * j.mblock);
}

void large_m_finish(const Job& j, int64_t n0, int64_t rows, std::vector<float>& yt, std::vector<int32_t>& idx);

// A prefill chunk's outputs [rows][mpad] start at the bias; pos[r] = row r's first value.
void start_chunk(const Job& j, int64_t n0, std::vector<float>& yt, std::vector<int64_t>& pos) {
  for (int64_t r = 0; r < static_cast<int64_t>(pos.size()); ++r) {
    pos[r] = j.w->row_offsets[n0 + r];
    const float bias = j.ad->bias ? j.ad->bias[n0 + r] : 0.f;
    std::fill(yt.begin() + r * j.mpad, yt.begin() + (r + 1) * j.mpad, bias);
  }
}

void large_m_task(void* arg, int64_t c) {
  const Job& j = *static_cast<const Job*>(arg);
  const SparseWeight& w = *j.w;
  const AdapterTerms& ad = *j.ad;
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, w.rows);
  const int64_t rows = n1 - n0;
  const int64_t kx = w.width * 8;
  const int64_t span = j.k_span_bytes * 8;  // columns per K block
  std::vector<float> yt(static_cast<size_t>(rows * j.mpad));  // [rows][mpad], outputs transposed
  // (column, value) lists of every row of the chunk for the current K block, at a fixed stride.
  const int64_t seg_stride = std::max(span, ad.rank);
  std::vector<int32_t> idx(static_cast<size_t>(rows * seg_stride));
  std::vector<float> val(idx.size());
  std::vector<int64_t> cnt(static_cast<size_t>(rows));
  std::vector<int64_t> pos(static_cast<size_t>(rows));
  start_chunk(j, n0, yt, pos);
  // The K block of X^T stays cache-resident while every row of the chunk streams its kept entries against
  // it: each kept entry costs one broadcast, 8 vector loads and 8 FMAs.
  for (int64_t g0 = 0; g0 < w.width; g0 += j.k_span_bytes) {
    const int64_t g1 = std::min(g0 + j.k_span_bytes, w.width);
    for (int64_t r = 0; r < rows; ++r) {
      cnt[r] = j.ks->extract_row(w, n0 + r, g0, g1, pos[r], j.shift, idx.data() + r * seg_stride,
                                 val.data() + r * seg_stride);
      pos[r] += cnt[r];
    }
    const float* xt = j.xt;
    for (int64_t b = 0; b < j.mblocks; ++b) {
      const int64_t mbw = mblock_width(j, b);
      for (int64_t r = 0; r < rows; ++r) {
        j.ks->axpy_block(idx.data() + r * seg_stride, val.data() + r * seg_stride, cnt[r], xt,
                         yt.data() + r * j.mpad + b * j.mblock, static_cast<int>(mbw / 8));
      }
      xt += (kx + ad.rank) * j.mblock;
    }
  }
  large_m_finish(j, n0, rows, yt, idx);
}

// The prefill's adapter term (B rows against T^T, which follows X^T in each block) and the transposed store.
void large_m_finish(const Job& j, int64_t n0, int64_t rows, std::vector<float>& yt, std::vector<int32_t>& idx) {
  const SparseWeight& w = *j.w;
  const AdapterTerms& ad = *j.ad;
  const int64_t kx = w.width * 8;
  if (ad.rank > 0) {
    if (static_cast<int64_t>(idx.size()) < ad.rank) idx.resize(static_cast<size_t>(ad.rank));
    for (int64_t q = 0; q < ad.rank; ++q) idx[q] = static_cast<int32_t>(q << j.shift);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xt = j.xt + (kx << j.shift);  // T^T follows X^T in each block
      for (int64_t b = 0; b < j.mblocks; ++b) {
        const int64_t mbw = mblock_width(j, b);
        j.ks->axpy_block(idx.data(), ad.b + (n0 + r) * ad.rank, ad.rank, xt,
                         yt.data() + r * j.mpad + b * j.mblock, static_cast<int>(mbw / 8));
        xt += (kx + ad.rank) * j.mblock;
      }
    }
  }
  for (int64_t i = 0; i < j.m; ++i) {
    float* yi = j.y + i * w.rows + n0;
    for (int64_t r = 0; r < rows; ++r) yi[r] = yt[r * j.mpad + i];
  }
}

void dense_tile_task(void* arg, int64_t c) {
  const Job& j = *static_cast<const Job*>(arg);
  const SparseWeight& w = *j.w;
  const AdapterTerms& ad = *j.ad;
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, w.rows);
  const int64_t rows = n1 - n0;
  const int64_t tile_rows = w.width * 8 + ad.rank;
  const int64_t span = j.k_span_bytes * 8;
  std::vector<float> yt(static_cast<size_t>(rows * j.mpad));  // [rows][mpad], outputs transposed
  std::vector<float> buf(static_cast<size_t>(rows * span));   // the chunk's rows of the current K block
  std::vector<int64_t> pos(static_cast<size_t>(rows));
  start_chunk(j, n0, yt, pos);
  for (int64_t g0 = 0; g0 < w.width; g0 += j.k_span_bytes) {
    const int64_t g1 = std::min(g0 + j.k_span_bytes, w.width);
    const int64_t len = 8 * (g1 - g0);
    for (int64_t r = 0; r < rows; ++r) {
      pos[r] = j.ks->decode_row_f32(w, n0 + r, g0, g1, pos[r], buf.data() + r * span);
    }
    for (int64_t b = 0; b < j.mblocks; ++b) {  // the block's K slice of X^T (8 KiB) stays in L1 for every group
      const int64_t mbw = mblock_width(j, b);  // 16, or 8 for the last block
      const float* xt = j.xt + (b * tile_rows + 8 * g0) * j.mblock;  // row 8 g0 of block b
      for (int64_t r = 0; r < rows; r += kDenseRows) {
        const int group = static_cast<int>(std::min<int64_t>(kDenseRows, rows - r));
        j.ks->dense_block(buf.data() + r * span, span, group, len, xt, j.mblock,
                          yt.data() + r * j.mpad + b * kDenseCols, j.mpad, static_cast<int>(mbw / 8));
      }
    }
  }
  std::vector<int32_t> idx;
  large_m_finish(j, n0, rows, yt, idx);
}

struct TransposeJob {
  const float* src;  // [m, ld]
  int64_t ld;
  int64_t m;
  int64_t cols;  // columns copied (width*8 for X, rank for T)
  int64_t col_offset;  // destination row of column 0 inside each m-block tile
  int64_t tile_rows;   // width*8 + rank
  int64_t mpad;
  int64_t mblock;  // activation rows per block (Job::mblock)
  float* dst;
};

void transpose_task(void* arg, int64_t b) {
  const TransposeJob& t = *static_cast<const TransposeJob*>(arg);
  const int64_t m0 = b * t.mblock;
  const int64_t mbw = std::min(t.mblock, t.mpad - m0);
  float* tile = t.dst + (b * t.tile_rows + t.col_offset) * t.mblock;
  const int64_t rows = std::min(mbw, t.m - m0);
  // 64x64 blocks keep both sides in L1. Each source row is read along its length: walking down a column
  // touched a new page per element (rows of a 1536-column X are 6 KiB apart) and missed the TLB on each.
  for (int64_t k0 = 0; k0 < t.cols; k0 += 64) {
    const int64_t k1 = std::min(k0 + 64, t.cols);
    for (int64_t i = 0; i < rows; ++i) {
      const float* s = t.src + (m0 + i) * t.ld;
      for (int64_t k = k0; k < k1; ++k) tile[k * t.mblock + i] = s[k];
    }
    for (int64_t k = k0; k < k1; ++k) std::fill(tile + k * t.mblock + rows, tile + k * t.mblock + mbw, 0.f);
  }
}

// ---- quantized weights (bitmap format v2) ---------------------------------------------------------------
// - m == 1 and int_path_applies: the set's integer kernel on int8 activations (per 32-column block scales)
//   and the packed layout of q24_layout.h (built at kernel construction, or here for non-constant weights).
// - m == 1 otherwise: each task dequantizes its rows' values into a small fp32 buffer and runs the float
//   gemv on a view of those rows, so no full-size fp32 copy of W is ever written per token.
// - m > 1: the whole weight is dequantized once per call (parallel) and the float drivers run on it; the
//   decode cost is amortized over the m activation rows.
constexpr int64_t kDequantChunkRows = 16;  // 16 rows x 2048 values x 4 bytes = 128 KiB: stays in L2

struct QuantJob {
  const KernelSet* ks;
  const SparseWeight* w;
  const AdapterTerms* ad;
  const float* x;
  const int8_t* xp;    // the integer path's activations (prepare_q24_activations)
  const float* xs8;
  const float* t;  // X A^T [1, rank]; null: `shared` holds it
  SharedAdapterInput* shared;
  float* y;
  RowRanges* rows;     // the integer path
  float* dequantized;  // m > 1: fp32 values [nnz]
  int64_t chunk_rows;
};

void gemv_q24_task(void* arg, int64_t c) {
  const QuantJob& j = *static_cast<const QuantJob*>(arg);
  if (j.shared) j.shared->compute(c);
  j.rows->run(c, [&](int64_t n0, int64_t n1) {
    j.ks->gemv_rows_q24(*j.w, j.xp, j.xs8, j.y + n0, n0, n1);
    const float* t = j.t ? j.t : j.shared->all();
    adapter_epilogue(*j.ks, *j.ad, t, 1, j.w->rows, j.y, n0, n1);
  });
}

// Rows [n0, n1) of a quantized weight as a float-valued weight over `values` (their dequantized values).
SparseWeight float_rows(const SparseWeight& w, int64_t n0, int64_t n1, const float* values, int64_t* offsets) {
  const int64_t v0 = w.row_offsets[n0];
  for (int64_t r = 0; r <= n1 - n0; ++r) offsets[r] = w.row_offsets[n0 + r] - v0;
  SparseWeight view = w;
  view.bitmap = w.bitmap + n0 * w.width;
  view.values = values;
  view.row_offsets = offsets;
  view.rows = n1 - n0;
  view.nnz = w.row_offsets[n1] - v0;
  view.vtype = ValueType::kFloat32;
  view.bits = 0;
  view.scales = nullptr;
  view.group_size = 0;
  return view;
}

void gemv_dequant_task(void* arg, int64_t c) {
  const QuantJob& j = *static_cast<const QuantJob*>(arg);
  const SparseWeight& w = *j.w;
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, w.rows);
  if (j.shared) j.shared->compute(c);
  // per-thread buffers, grown but never shrunk or cleared: a fresh zero-filled vector per chunk cost more than
  // the chunk's arithmetic (a 128 KiB memset per 16 rows)
  thread_local std::vector<float> values;
  thread_local std::vector<int64_t> offsets;
  const size_t count = static_cast<size_t>(w.row_offsets[n1] - w.row_offsets[n0]);
  // 8 values of slack past the chunk: the vector loads of its last rows may then read them (masked out), so
  // no row falls back to the scalar tail loop
  if (values.size() < count + 8) values.resize(count + 8);
  if (offsets.size() < static_cast<size_t>(n1 - n0 + 1)) offsets.resize(static_cast<size_t>(n1 - n0 + 1));
  j.ks->dequant(w, w.row_offsets[n0], w.row_offsets[n1], values.data());
  SparseWeight view = float_rows(w, n0, n1, values.data(), offsets.data());
  view.nnz += 8;
  j.ks->gemv_rows(view, j.x, j.y + n0, 0, n1 - n0);
  const float* t = j.t ? j.t : j.shared->all();
  adapter_epilogue(*j.ks, *j.ad, t, 1, w.rows, j.y, n0, n1);
}

void dequant_task(void* arg, int64_t c) {
  const QuantJob& j = *static_cast<const QuantJob*>(arg);
  const int64_t n0 = c * j.chunk_rows;
  const int64_t n1 = std::min(n0 + j.chunk_rows, j.w->rows);
  const int64_t v0 = j.w->row_offsets[n0];
  j.ks->dequant(*j.w, v0, j.w->row_offsets[n1], j.dequantized + v0);
}

}  // namespace

std::vector<float> adapter_transposed(const float* b, int64_t n, int64_t rank) {
  std::vector<float> bt(static_cast<size_t>(rank * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < rank; ++r) bt[r * n + i] = b[i * rank + r];
  }
  return bt;
}

std::vector<int32_t> adapter_rank_spans(const float* b, int64_t n, int64_t rank) {
  const int64_t groups = ceil_div(n, 8);
  std::vector<int32_t> spans(static_cast<size_t>(2 * groups));
  for (int64_t g = 0; g < groups; ++g) {
    int64_t first = rank, end = 0;
    for (int64_t i = 8 * g; i < std::min(n, 8 * g + 8); ++i) {
      for (int64_t r = 0; r < rank; ++r) {
        if (b[i * rank + r] != 0.f) {
          first = std::min(first, r);
          end = std::max(end, r + 1);
        }
      }
    }
    spans[2 * g] = static_cast<int32_t>(first < end ? first : 0);
    spans[2 * g + 1] = static_cast<int32_t>(end);
  }
  return spans;
}

AdapterPanelStore adapter_panels(const float* a, const float* b, int64_t n, int64_t k, int64_t rank) {
  AdapterPanelStore s;
  if (rank <= 0 || n <= 0 || k <= 0) return s;
  const auto exact = [](float v) { return half_to_float(float_to_half(v)) == v; };
  if (!std::all_of(a, a + rank * k, exact) || !std::all_of(b, b + n * rank, exact)) return s;
  s.a_stride = ceil_div(k, 8) * 8;
  s.a.assign(static_cast<size_t>(rank * s.a_stride), 0);
  for (int64_t r = 0; r < rank; ++r) {
    for (int64_t c = 0; c < k; ++c) s.a[r * s.a_stride + c] = float_to_half(a[r * k + c]);
  }
  const std::vector<int32_t> spans = adapter_rank_spans(b, n, rank);
  const int64_t groups = ceil_div(n, 8);
  s.offsets.assign(static_cast<size_t>(groups + 1), 0);
  s.first.assign(static_cast<size_t>(groups), 0);
  for (int64_t g = 0; g < groups; ++g) {
    s.first[g] = spans[2 * g];
    s.offsets[g + 1] = s.offsets[g] + std::max<int64_t>(0, spans[2 * g + 1] - spans[2 * g]);
  }
  s.b.assign(static_cast<size_t>(8 * s.offsets[groups]), 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < s.offsets[g + 1] - s.offsets[g]; ++r) {
      for (int64_t i = 8 * g; i < std::min(n, 8 * g + 8); ++i) {
        s.b[8 * (s.offsets[g] + r) + (i - 8 * g)] = float_to_half(b[i * rank + s.first[g] + r]);
      }
    }
  }
  return s;
}

void dense_nt(const KernelSet& ks, int64_t m, int64_t n, int64_t len, const float* x, int64_t ldx, const float* w,
              int64_t ldw, float* y, int64_t ldy, const Runner& runner) {
  if (m <= 0 || n <= 0) return;
  if (len <= 0) {
    for (int64_t i = 0; i < m; ++i) std::memset(y + i * ldy, 0, sizeof(float) * n);
    return;
  }
  struct DenseJob {
    const KernelSet* ks;
    int64_t m, n, len, ldx, ldw, ldy, rows;
    const float *x, *w;
    float* y;
  };
  // Tasks of >= ~16K multiply-adds, at most ~16 of them, so the pool overhead stays small.
  int64_t rows = std::max(ceil_div(n, 16), ceil_div(16384, len * m));
  rows = std::min(rows, n);
  DenseJob job{&ks, m, n, len, ldx, ldw, ldy, rows, x, w, y};
  runner(ceil_div(n, rows), [](void* arg, int64_t c) {
    const DenseJob& d = *static_cast<const DenseJob*>(arg);
    const int64_t j0 = c * d.rows;
    const int64_t j1 = std::min(j0 + d.rows, d.n);
    d.ks->dot_nt(d.m, j1 - j0, d.len, d.x, d.ldx, d.w + j0 * d.ldw, d.ldw, d.y + j0, d.ldy, false);
  }, &job);
}

namespace {

// T = X A^T [m, rank], the adapters' input; small products run on the calling thread (kSerialAdapterMacs).
std::vector<float> adapter_inputs(const KernelSet& ks, const SparseWeight& w, const AdapterTerms& ad, const float* x,
                                  int64_t m, int64_t ldx, const Runner& runner) {
  std::vector<float> t(static_cast<size_t>(m * ad.rank));
  if (ad.rank > 0) {
    const bool serial = m * ad.rank * w.cols <= kSerialAdapterMacs;
    dense_nt(ks, m, ad.rank, w.cols, x, ldx, ad.a, w.cols, t.data(), ad.rank, serial ? serial_runner() : runner);
  }
  return t;
}

// Batch 1: T = x A^T for the tasks to share, or nothing when the compact adapters let each thread compute it.
std::vector<float> batch1_adapter_inputs(const KernelSet& ks, const SparseWeight& w, const AdapterTerms& ad,
                                         const float* x, int64_t ldx, const Runner& runner) {
  if (ad.rank > 0 && ad.panels.a != nullptr) return {};
  std::vector<float> t = adapter_inputs(ks, w, ad, x, 1, ldx, runner);
  if (t.empty()) t.push_back(0.f);  // rank 0: a valid, unused pointer
  return t;
}

void quantized_linear(const KernelSet& ks, const SparseWeight& w, const AdapterTerms& ad, const float* x, int64_t m,
                      int64_t ldx, float* y, const Runner& runner) {
  QuantJob job{};
  job.ks = &ks;
  job.w = &w;
  job.ad = &ad;
  job.x = x;
  job.y = y;
  if (m > 1) {
    std::vector<float> values(static_cast<size_t>(w.nnz));
    std::vector<int64_t> offsets(static_cast<size_t>(w.rows + 1));
    job.dequantized = values.data();
    job.chunk_rows = 64;
    runner(ceil_div(w.rows, job.chunk_rows), dequant_task, &job);
    sparse_linear(ks, float_rows(w, 0, w.rows, values.data(), offsets.data()), ad, x, m, ldx, y, runner);
    return;
  }
  const std::vector<float> t = batch1_adapter_inputs(ks, w, ad, x, ldx, runner);
  job.t = t.empty() ? nullptr : t.data();
  std::unique_ptr<SharedAdapterInput> shared;
  if (t.empty()) shared = std::make_unique<SharedAdapterInput>(ks, ad, x, w.cols, hardware_threads());
  job.shared = shared.get();
  if (ks.gemv_rows_q24 != nullptr && int_path_applies(w)) {
    SparseWeight packed = w;
    LargeBytes per_call;
    if (packed.q24 == nullptr) {  // a weight that is not a constant initializer: packed for this call only
      per_call = pack_q24(w);
      packed.q24 = per_call.data();
    }
    job.w = &packed;
    const Q24Activations xa = prepare_q24_activations(ks, x, w.cols, w.bits);
    job.xp = xa.xp.data();
    job.xs8 = xa.xs8.data();
    RowRanges rows(w.rows);
    job.rows = &rows;
    runner(rows.ranges(), gemv_q24_task, &job);
  } else {
    job.chunk_rows = kDequantChunkRows;
    runner(ceil_div(w.rows, job.chunk_rows), gemv_dequant_task, &job);
  }
}

}  // namespace

void sparse_linear(const KernelSet& ks, const SparseWeight& w, const AdapterTerms& ad, const float* x, int64_t m,
                   int64_t ldx, float* y, const Runner& runner) {
  const int64_t n = w.rows;
  if (m <= 0 || n <= 0) return;
  if (w.bits != 0) {
    quantized_linear(ks, w, ad, x, m, ldx, y, runner);
    return;
  }
  Job job{};
  job.ks = &ks;
  job.w = &w;
  job.ad = &ad;
  job.x = x;
  job.m = m;
  job.ldx = ldx;
  job.y = y;
  if (m == 1) {
    const std::vector<float> t = batch1_adapter_inputs(ks, w, ad, x, ldx, runner);
    job.t = t.empty() ? nullptr : t.data();
    RowRanges rows(n);
    std::unique_ptr<SharedAdapterInput> shared;
    if (t.empty()) shared = std::make_unique<SharedAdapterInput>(ks, ad, x, w.cols, rows.ranges());
    job.shared = shared.get();
    job.rows = &rows;
    runner(rows.ranges(), gemv_task, &job);
    return;
  }
  if (m < kLargeM) {
    const std::vector<float> t = adapter_inputs(ks, w, ad, x, m, ldx, runner);
    job.t = t.data();
    job.chunk_rows = kSmallChunkRows;
    runner(ceil_div(n, job.chunk_rows), ks.gemm_rows_small ? small_m_rows_task : small_m_task, &job);
    return;
  }
  // Prefill: X^T (and T^T below it) per block of up to 64 activation rows (16 for the dense tiles: their
  // rows are then 64 contiguous bytes, where 256-byte strides used a quarter of L1's sets), zero-padded to a
  // multiple of 8. Every block has the same power-of-two row stride, so a kept entry's column is turned into
  // its X^T offset once, when extracted, and serves every block.
  const double entries = static_cast<double>(n) * static_cast<double>(w.cols);
  const int64_t kx = w.width * 8;
  const int64_t mpad = ceil_div(m, 8) * 8;
  const int64_t tile_rows = kx + ad.rank;
  int shift = 3;
  while ((int64_t{1} << shift) < std::min(mpad, kLargeMBlock)) ++shift;
  const bool dense_tiles = static_cast<double>(w.row_offsets[n]) >= kDenseTileDensity * entries ||
                           (tile_rows << shift) > std::numeric_limits<int32_t>::max();  // offsets are int32
  if (dense_tiles) shift = kDenseShift;
  job.mpad = mpad;
  job.mblock = int64_t{1} << shift;
  job.shift = shift;
  job.mblocks = ceil_div(mpad, job.mblock);
  // 64-byte aligned: every 32-byte load of an X^T row then stays within one cache line (malloc's 16-byte
  // alignment split half of them across two lines). Not zero-filled: the transposes write every float that
  // is read, and a memset of the whole block cost as much as the transpose itself.
  const std::unique_ptr<float[]> xt_store(new float[static_cast<size_t>(tile_rows * job.mblocks * job.mblock + 16)]);
  float* xt = xt_store.get() + (16 - (reinterpret_cast<uintptr_t>(xt_store.get()) / sizeof(float)) % 16) % 16;
  job.xt = xt;
  job.k_span_bytes = kLargeSpanBytes;
  job.chunk_rows = std::min(dense_tiles ? kDenseChunkRows : kLargeChunkRows, std::max<int64_t>(8, ceil_div(n, 8)));
  TransposeJob tx{x, ldx, m, kx, 0, tile_rows, mpad, job.mblock, xt};
  runner(job.mblocks, transpose_task, &tx);
  const std::vector<float> t = adapter_inputs(ks, w, ad, x, m, ldx, runner);
  if (ad.rank > 0) {
    TransposeJob tt{t.data(), ad.rank, m, ad.rank, kx, tile_rows, mpad, job.mblock, xt};
    runner(job.mblocks, transpose_task, &tt);
  }
  runner(ceil_div(n, job.chunk_rows), dense_tiles ? dense_tile_task : large_m_task, &job);
}

void bitmap_decode(const SparseWeight& w, void* out, const Runner& runner) {
  struct DecodeJob {
    const SparseWeight* w;
    void* out;
  } job{&w, out};
  constexpr int64_t kRows = 64;
  runner(ceil_div(w.rows, kRows), [](void* arg, int64_t c) {
    const DecodeJob& d = *static_cast<const DecodeJob*>(arg);
    const SparseWeight& w = *d.w;
    const int64_t n1 = std::min((c + 1) * kRows, w.rows);
    for (int64_t n = c * kRows; n < n1; ++n) {
      const uint8_t* row = w.bitmap + n * w.width;
      int64_t pos = w.row_offsets[n];
      if (w.vtype == ValueType::kFloat16) {
        const uint16_t* v = static_cast<const uint16_t*>(w.values);
        uint16_t* o = static_cast<uint16_t*>(d.out) + n * w.cols;
        for (int64_t k = 0; k < w.cols; ++k) o[k] = ((row[k >> 3] >> (k & 7)) & 1u) ? v[pos++] : uint16_t{0};
      } else {
        const float* v = static_cast<const float*>(w.values);
        float* o = static_cast<float*>(d.out) + n * w.cols;
        for (int64_t k = 0; k < w.cols; ++k) o[k] = ((row[k >> 3] >> (k & 7)) & 1u) ? v[pos++] : 0.f;
      }
    }
  }, &job);
}

}  // namespace salr
