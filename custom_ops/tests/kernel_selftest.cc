// Standalone check of the CPU kernel sets, without ONNX Runtime: every set this build has (scalar always,
// AVX2 on x86-64, NEON on aarch64) runs SALRLinear / FusedAdapterGemm / BitmapDecode on random odd-shaped
// layers and is compared with a float64 reference. Used by scripts/neon_cross_test.sh under qemu-aarch64,
// and as a quick timing tool: `kernel_selftest --bench N K M [sparsity|2:4] [f16|f32]`.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "format.h"
#include "kernels.h"
#include "large_pages.h"

using namespace salr;

namespace {

struct Layer {
  int64_t n, k;
  ValueType vt;
  std::vector<uint8_t> bitmap;
  std::vector<uint16_t> v16;
  std::vector<float> v32;
  std::vector<int64_t> off;
  std::vector<double> dense;  // decoded W, exact
  SparseWeight w;
};

Layer make_layer(std::mt19937& rng, int64_t n, int64_t k, double density, bool two_four, ValueType vt) {
  Layer L{n, k, vt, {}, {}, {}, {}, {}, {}};
  const int64_t width = (k + 7) / 8;
  L.bitmap.assign(n * width, 0);
  L.dense.assign(n * k, 0.0);
  L.off.assign(n + 1, 0);
  std::uniform_real_distribution<double> u(0, 1);
  std::normal_distribution<float> g(0.f, 1.f);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      bool keep;
      if (two_four) {
        keep = false;  // decided per group below
      } else {
        keep = u(rng) < density;
      }
      if (!two_four) {
        if (r == 0) keep = false;           // all-zero row
        if (r == 1) keep = true;            // full row
        if (r == n - 1) keep = c == k - 1;  // one entry at the very end of values
      }
      if (keep) L.bitmap[r * width + c / 8] |= uint8_t(1u << (c % 8));
    }
    if (two_four) {
      for (int64_t c0 = 0; c0 < k; c0 += 4) {
        int a = rng() % 4, b = (a + 1 + rng() % 3) % 4;
        for (int q : {a, b}) L.bitmap[r * width + (c0 + q) / 8] |= uint8_t(1u << ((c0 + q) % 8));
      }
    }
    for (int64_t c = 0; c < k; ++c) {
      if ((L.bitmap[r * width + c / 8] >> (c % 8)) & 1) {
        const float val = g(rng);
        const uint16_t h = float_to_half(val);
        L.v16.push_back(h);
        L.v32.push_back(val);
        L.dense[r * k + c] = vt == ValueType::kFloat16 ? half_to_float(h) : val;
      }
    }
    L.off[r + 1] = static_cast<int64_t>(L.v16.size());
  }
  BitmapTensors t;
  t.bitmap_shape = {n, width};
  t.values_shape = {static_cast<int64_t>(L.v16.size())};
  t.offsets_shape = {n + 1};
  t.bitmap = L.bitmap.data();
  t.values = vt == ValueType::kFloat16 ? static_cast<const void*>(L.v16.data()) : L.v32.data();
  t.row_offsets = L.off.data();
  t.vtype = vt;
  const std::string err = check_bitmap_weight("selftest", k, t, &L.w);
  if (!err.empty()) {
    std::fprintf(stderr, "encoder bug: %s\n", err.c_str());
    std::exit(2);
  }
  if (two_four && k % 8 == 0 && !L.w.two_four) {
    std::fprintf(stderr, "2:4 layer not detected as 2:4\n");
    std::exit(2);
  }
  return L;
}

std::vector<const KernelSet*> sets() {
  std::vector<const KernelSet*> s{&scalar_kernels()};
  if (avx2_kernels()) s.push_back(avx2_kernels());
  if (neon_kernels()) s.push_back(neon_kernels());
  return s;
}

int failures = 0;

void expect_close(const char* what, const KernelSet& ks, const std::vector<float>& y, const std::vector<double>& ref,
                  const std::vector<double>& scale, double tolerance = 1e-5) {
  double worst = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double e = std::fabs(y[i] - ref[i]) / (scale[i] + 1e-30);
    if (!(e <= worst)) worst = e;  // NaN-propagating
  }
  const bool ok = worst <= tolerance;
  if (!ok) ++failures;
  std::printf("%-5s %-8s %-52s max err/scale %.2e\n", ok ? "ok" : "FAIL", ks.name, what, worst);
}

// float64 Y = X W^T + (X A^T) B^T + bias, and the same sum of magnitudes (the error scale).
void reference_linear(const std::vector<double>& dense, int64_t n, int64_t k, const std::vector<float>& x, int64_t ldx,
                      int64_t m, const std::vector<float>& a, const std::vector<float>& b, int64_t rank,
                      const std::vector<float>& bias, std::vector<double>* ref, std::vector<double>* scale) {
  ref->assign(m * n, 0.0);
  scale->assign(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<double> t(rank), ta(rank);
    for (int64_t q = 0; q < rank; ++q)
      for (int64_t c = 0; c < k; ++c) {
        t[q] += double(x[i * ldx + c]) * a[q * k + c];
        ta[q] += std::fabs(double(x[i * ldx + c]) * a[q * k + c]);
      }
    for (int64_t r = 0; r < n; ++r) {
      double s = bias.empty() ? 0.0 : bias[r], sa = bias.empty() ? 0.0 : std::fabs(bias[r]);
      for (int64_t c = 0; c < k; ++c) {
        s += double(x[i * ldx + c]) * dense[r * k + c];
        sa += std::fabs(double(x[i * ldx + c]) * dense[r * k + c]);
      }
      for (int64_t q = 0; q < rank; ++q) {
        s += t[q] * b[r * rank + q];
        sa += ta[q] * std::fabs(b[r * rank + q]);
      }
      (*ref)[i * n + r] = s;
      (*scale)[i * n + r] = sa;
    }
  }
}

void check_linear(std::mt19937& rng, int64_t n, int64_t k, int64_t m, int64_t rank, double density, bool two_four,
                  ValueType vt) {
  Layer L = make_layer(rng, n, k, density, two_four, vt);
  const int64_t ldx = L.w.width * 8;
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> x(m * ldx, 0.f), a(rank * k), b(n * rank), bias(n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) x[i * ldx + c] = g(rng);
  for (auto& v : a) v = g(rng);
  for (auto& v : b) v = g(rng);
  for (auto& v : bias) v = g(rng);
  std::vector<double> ref, scale;
  reference_linear(L.dense, n, k, x, ldx, m, a, b, rank, bias, &ref, &scale);
  AdapterTerms ad;
  ad.a = a.data();
  ad.b = b.data();
  ad.rank = rank;
  ad.bias = bias.data();
  char what[160];
  std::snprintf(what, sizeof what, "SALRLinear n=%lld k=%lld m=%lld r=%lld %s%s", (long long)n, (long long)k,
                (long long)m, (long long)rank, vt == ValueType::kFloat16 ? "f16" : "f32",
                L.w.two_four ? " 2:4" : "");
  for (const KernelSet* ks : sets()) {
    std::vector<float> y(m * n, std::nanf(""));
    sparse_linear(*ks, L.w, ad, x.data(), m, ldx, y.data(), serial_runner());
    expect_close(what, *ks, y, ref, scale);
  }
  if (rank > 0) {  // B also as the kernel keeps a constant one: transposed (batch 1 reads it)
    const std::vector<float> bt = adapter_transposed(b.data(), n, rank);
    AdapterTerms adt = ad;
    adt.b_t = bt.data();
    adt.b_t_stride = n;
    for (const KernelSet* ks : sets()) {
      std::vector<float> y(m * n, std::nanf(""));
      sparse_linear(*ks, L.w, adt, x.data(), m, ldx, y.data(), serial_runner());
      expect_close((std::string(what) + " B^T").c_str(), *ks, y, ref, scale);
    }
  }
  if (rank >= 3 && n >= 3) {  // block-diagonal B (layers fused by the exporter) read through its rank spans
    std::vector<float> bd(b);
    const int64_t row_cut[3] = {n / 3, n / 3 + n / 5, n};  // boundaries inside 8-output groups too
    const int64_t rank_cut[3] = {rank / 3, 2 * rank / 3, rank};
    for (int64_t r = 0, block = 0; r < n; ++r) {
      while (r >= row_cut[block]) ++block;
      const int64_t lo = block == 0 ? 0 : rank_cut[block - 1], hi = rank_cut[block];
      for (int64_t q = 0; q < rank; ++q)
        if (q < lo || q >= hi) bd[r * rank + q] = 0.f;
    }
    std::vector<double> ref_bd, scale_bd;
    reference_linear(L.dense, n, k, x, ldx, m, a, bd, rank, bias, &ref_bd, &scale_bd);
    const std::vector<float> bt = adapter_transposed(bd.data(), n, rank);
    const std::vector<int32_t> spans = adapter_rank_spans(bd.data(), n, rank);
    AdapterTerms adt = ad;
    adt.b = bd.data();
    adt.b_t = bt.data();
    adt.b_t_stride = n;
    adt.b_t_spans = spans.data();
    for (const KernelSet* ks : sets()) {
      std::vector<float> y(m * n, std::nanf(""));
      sparse_linear(*ks, L.w, adt, x.data(), m, ldx, y.data(), serial_runner());
      expect_close((std::string(what) + " block-diagonal B^T").c_str(), *ks, y, ref_bd, scale_bd);
    }
  }
  if (rank > 0) {  // compact fp16 adapters (factors exactly fp16; block-diagonal B when rank >= 3)
    std::vector<float> a16(a), b16(b);
    for (auto& v : a16) v = half_to_float(float_to_half(v));
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t q = 0; q < rank; ++q) {
        float& v = b16[r * rank + q];
        v = half_to_float(float_to_half(v));
        if (rank >= 3 && q * 3 / rank != r * 3 / n) v = 0.f;  // three diagonal blocks
      }
    }
    std::vector<double> ref16, scale16;
    reference_linear(L.dense, n, k, x, ldx, m, a16, b16, rank, bias, &ref16, &scale16);
    const AdapterPanelStore store = adapter_panels(a16.data(), b16.data(), n, k, rank);
    if (store.a.empty()) {
      ++failures;
      std::printf("FAIL %s: fp16-exact adapters got no compact form\n", what);
    }
    AdapterTerms adp = ad;
    adp.a = a16.data();
    adp.b = b16.data();
    adp.panels = store.view();
    for (const KernelSet* ks : sets()) {
      std::vector<float> y(m * n, std::nanf(""));
      sparse_linear(*ks, L.w, adp, x.data(), m, ldx, y.data(), serial_runner());
      expect_close((std::string(what) + " fp16 panels").c_str(), *ks, y, ref16, scale16);
    }
    if (!adapter_panels(a.data(), b.data(), n, k, rank).a.empty() && rank * k > 8) {
      ++failures;
      std::printf("FAIL %s: adapters that are not fp16 values got a compact form\n", what);
    }
  }
  // BitmapDecode must be bit-exact.
  std::vector<uint16_t> o16(n * k);
  std::vector<float> o32(n * k);
  bitmap_decode(L.w, vt == ValueType::kFloat16 ? static_cast<void*>(o16.data()) : o32.data(), serial_runner());
  for (int64_t i = 0; i < n * k; ++i) {
    const double v = vt == ValueType::kFloat16 ? half_to_float(o16[i]) : o32[i];
    if (v != L.dense[i]) {
      ++failures;
      std::printf("FAIL BitmapDecode at %lld\n", (long long)i);
      break;
    }
  }
}

// Format v2: random int8 / int4 codes and fp16 group scales under the bitmap of a random layer. The batch-1
// 2:4 integer path rounds the activations to int8 per 32 columns: every set must then match the scalar
// set (the plain statement of that arithmetic) tightly, and the exact product within the rounding's reach.
void check_quantized(std::mt19937& rng, int64_t n, int64_t k, int64_t m, int bits, int64_t group, double density,
                     bool two_four) {
  Layer L = make_layer(rng, n, k, density, two_four, ValueType::kFloat32);
  const int64_t nnz = L.off[n];
  std::uniform_int_distribution<int> code(bits == 8 ? -127 : -8, bits == 8 ? 127 : 7);
  std::uniform_real_distribution<float> unit(0.01f, 0.1f);
  std::vector<int> q(nnz);
  for (auto& v : q) v = code(rng);
  std::vector<uint16_t> scales((nnz + group - 1) / group);
  for (auto& v : scales) v = float_to_half(unit(rng));
  std::vector<uint8_t> stored(bits == 8 ? nnz : (nnz + 1) / 2, 0);
  for (int64_t i = 0; i < nnz; ++i) {
    if (bits == 8) {
      stored[i] = static_cast<uint8_t>(static_cast<int8_t>(q[i]));
    } else {
      stored[i / 2] |= static_cast<uint8_t>((q[i] + 8) << (4 * (i % 2)));
    }
  }
  std::vector<double> dense(n * k, 0.0);
  for (int64_t r = 0, pos = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      if ((L.bitmap[r * L.w.width + c / 8] >> (c % 8)) & 1) {
        dense[r * k + c] = q[pos] * double(half_to_float(scales[pos / group]));
        ++pos;
      }
  SparseWeight w = L.w;
  w.values = stored.data();
  w.bits = bits;
  w.scales = scales.data();
  w.group_size = group;
  const int64_t ldx = w.width * 8;
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> x(m * ldx, 0.f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) x[i * ldx + c] = g(rng);
  std::vector<double> ref, scale;
  reference_linear(dense, n, k, x, ldx, m, {}, {}, 0, {}, &ref, &scale);
  const bool int_path = m == 1 && int_path_applies(w);
  char what[160];
  std::snprintf(what, sizeof what, "SALRLinearQ n=%lld k=%lld m=%lld int%d g%lld%s%s", (long long)n, (long long)k,
                (long long)m, bits, (long long)group, w.two_four ? " 2:4" : "", int_path ? " int-path" : "");
  std::vector<float> scalar_y(m * n);
  sparse_linear(scalar_kernels(), w, AdapterTerms{}, x.data(), m, ldx, scalar_y.data(), serial_runner());
  const std::vector<double> scalar_ref(scalar_y.begin(), scalar_y.end());
  for (const KernelSet* ks : sets()) {
    std::vector<float> y(m * n, std::nanf(""));
    sparse_linear(*ks, w, AdapterTerms{}, x.data(), m, ldx, y.data(), serial_runner());
    // a set without an integer kernel (NEON today) takes the exact float path
    const bool own_int_path = int_path && ks->gemv_rows_q24 != nullptr;
    expect_close(what, *ks, y, ref, scale, own_int_path ? 1e-2 : 1e-5);
    if (own_int_path && ks != &scalar_kernels()) {
      expect_close("  ... vs the scalar integer path", *ks, y, scalar_ref, scale);
    }
  }
  if (m == 1) {  // with compact fp16 adapters (rank 3), read by the same batch-1 tasks
    const int64_t rank = 3;
    std::vector<float> a(rank * k), b(n * rank);
    for (auto& v : a) v = half_to_float(float_to_half(g(rng)));
    for (auto& v : b) v = half_to_float(float_to_half(g(rng)));
    std::vector<double> ref_ad, scale_ad;
    reference_linear(dense, n, k, x, ldx, m, a, b, rank, {}, &ref_ad, &scale_ad);
    const AdapterPanelStore store = adapter_panels(a.data(), b.data(), n, k, rank);
    AdapterTerms ad;
    ad.a = a.data();
    ad.b = b.data();
    ad.rank = rank;
    ad.panels = store.view();
    for (const KernelSet* ks : sets()) {
      std::vector<float> y(n, std::nanf(""));
      sparse_linear(*ks, w, ad, x.data(), m, ldx, y.data(), serial_runner());
      expect_close((std::string(what) + " fp16 panels").c_str(), *ks, y, ref_ad, scale_ad,
                   int_path && ks->gemv_rows_q24 != nullptr ? 1e-2 : 1e-5);
    }
  }
}

// The integer path's activation quantizer gives every set the same bytes, also for non-finite columns (a NaN
// becomes -127 and leaves its block's scale alone; an infinity sets the scale).
void check_quantize_q24_nonfinite() {
  std::vector<float> x(128);
  for (int64_t c = 0; c < 128; ++c) x[c] = 0.01f * static_cast<float>(c % 29) - 0.1f;
  x[3] = std::nanf("");
  x[40] = -std::nanf("");
  x[70] = INFINITY;
  for (int bits : {4, 8}) {
    std::vector<int8_t> ref_p(128), p(128);
    std::vector<float> ref_s(16), sc(16);
    scalar_kernels().quantize_q24(x.data(), 128, bits, ref_p.data(), ref_s.data());
    for (const KernelSet* ks : sets()) {
      if (ks->quantize_q24 == nullptr || ks == &scalar_kernels()) continue;
      ks->quantize_q24(x.data(), 128, bits, p.data(), sc.data());
      const bool same = p == ref_p && std::memcmp(sc.data(), ref_s.data(), sizeof(float) * sc.size()) == 0;
      std::printf("%s  %-6s quantize_q24 bits=%d with NaN / inf columns vs scalar\n", same ? "ok  " : "FAIL",
                  ks->name, bits);
      if (!same) ++failures;
    }
  }
}

void check_dense(std::mt19937& rng, int64_t m, int64_t n, int64_t len) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> x(m * len), w(n * len);
  for (auto& v : x) v = g(rng);
  for (auto& v : w) v = g(rng);
  std::vector<double> ref(m * n), scale(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < len; ++c) {
        ref[i * n + j] += double(x[i * len + c]) * w[j * len + c];
        scale[i * n + j] += std::fabs(double(x[i * len + c]) * w[j * len + c]);
      }
  char what[96];
  std::snprintf(what, sizeof what, "dense_nt m=%lld n=%lld len=%lld", (long long)m, (long long)n, (long long)len);
  for (const KernelSet* ks : sets()) {
    std::vector<float> y(m * n);
    dense_nt(*ks, m, n, len, x.data(), len, w.data(), len, y.data(), n, serial_runner());
    expect_close(what, *ks, y, ref, scale);
  }
}

void check_half() {
  // Every half converts to float and back unchanged; a sweep of floats rounds like every set's converter.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(uint16_t(h));
    if (!std::isnan(f) && float_to_half(f) != h) {
      ++failures;
      std::printf("FAIL half round trip %u\n", h);
      return;
    }
  }
  std::vector<float> src;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> e(-30.f, 17.f);
  for (int i = 0; i < 20000; ++i) src.push_back((i % 2 ? -1.f : 1.f) * std::exp2(e(rng)));
  std::vector<uint16_t> want(src.size()), got(src.size());
  scalar_kernels().f32_to_f16(src.data(), want.data(), (int64_t)src.size());
  for (const KernelSet* ks : sets()) {
    ks->f32_to_f16(src.data(), got.data(), (int64_t)src.size());
    const bool ok = got == want;
    if (!ok) ++failures;
    std::printf("%-5s %-8s f32 -> f16 rounding matches the scalar reference\n", ok ? "ok" : "FAIL", ks->name);
  }
}

// advise_large_pages covers exactly the whole 2 MiB pages inside the buffer and leaves its contents alone.
void check_large_page_advice() {
  const size_t huge = kHugePageBytes, bytes = 3 * huge + 12345;
  std::vector<uint8_t> buf(bytes);
  for (size_t i = 0; i < bytes; ++i) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  const std::vector<uint8_t> before = buf;
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  const size_t want = ((p + bytes) / huge - (p + huge - 1) / huge) * huge;
  const size_t got = advise_large_pages(buf.data(), bytes);
  const bool covered = got == want || got == 0;  // 0: the platform has no such advice
  const bool ok = covered && want >= 2 * huge && buf == before && advise_large_pages(buf.data() + 1, huge - 2) == 0;
  if (!ok) ++failures;
  std::printf("%-5s large-page advice: %zu of %zu bytes (whole 2 MiB pages: %zu), contents unchanged\n",
              ok ? "ok" : "FAIL", got, bytes, want);
}

int bench(int argc, char** argv) {
  const int64_t n = std::atoll(argv[2]), k = std::atoll(argv[3]), m = std::atoll(argv[4]);
  const std::string sp = argc > 5 ? argv[5] : "0.5";
  const ValueType vt = (argc > 6 && std::string(argv[6]) == "f32") ? ValueType::kFloat32 : ValueType::kFloat16;
  const int64_t rank = argc > 7 ? std::atoll(argv[7]) : 0;
  std::mt19937 rng(1);
  Layer L = make_layer(rng, n, k, sp == "2:4" ? 0.5 : 1.0 - std::atof(sp.c_str()), sp == "2:4", vt);
  const int64_t ldx = L.w.width * 8;
  std::vector<float> x(m * ldx, 0.5f), y(m * n), a(rank * k, 0.01f), b(n * rank, 0.01f);
  AdapterTerms ad;
  ad.a = a.data();
  ad.b = b.data();
  ad.rank = rank;
  for (const KernelSet* ks : sets()) {
    std::vector<double> t;
    for (int it = 0; it < 15; ++it) {
      const auto t0 = std::chrono::steady_clock::now();
      sparse_linear(*ks, L.w, ad, x.data(), m, ldx, y.data(), serial_runner());
      t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    std::printf("%-8s n=%lld k=%lld m=%lld %s %s 2:4=%d r=%lld: min %.3f median %.3f ms (1 thread)\n", ks->name,
                (long long)n, (long long)k, (long long)m, sp.c_str(), vt == ValueType::kFloat16 ? "f16" : "f32",
                int(L.w.two_four), (long long)rank, t[0], t[t.size() / 2]);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 4 && std::string(argv[1]) == "--bench") return bench(argc, argv);
  std::mt19937 rng(1234);
  check_half();
  for (ValueType vt : {ValueType::kFloat16, ValueType::kFloat32}) {
    for (int64_t m : {1, 2, 5, 16, 37, 130}) {
      check_linear(rng, 83, 545, m, m % 2 ? 3 : 0, 0.5, false, vt);
    }
    check_linear(rng, 9, 1, 3, 1, 0.5, false, vt);
    check_linear(rng, 17, 7, 20, 2, 0.3, false, vt);
    check_linear(rng, 40, 96, 1, 0, 0.5, true, vt);
    check_linear(rng, 41, 104, 1, 4, 0.5, true, vt);
    check_linear(rng, 33, 112, 1, 2, 0.5, true, vt);
    // 2:4 rows through every loop of the batch-1 kernel: whole 16-byte blocks, then pairs, then a last byte
    // (widths 37 and 129), with 8 ranks split into shares across the tasks
    check_linear(rng, 37, 296, 1, 8, 0.5, true, vt);
    check_linear(rng, 70, 1032, 1, 8, 0.5, true, vt);
    check_linear(rng, 41, 104, 24, 4, 0.5, true, vt);
    check_linear(rng, 130, 1024, 1, 8, 0.3, false, vt);
    // prefill on both sides of the dense-tile density: 50 rows (a 36-row chunk and 14 = 6 + 6 + 2), m = 70
    // (a 64-row block and an 8-row one)
    check_linear(rng, 50, 300, 70, 5, 0.3, false, vt);
    check_linear(rng, 50, 300, 70, 0, 0.95, false, vt);
    // small batches in blocks of 8 activation rows (8 + 4), K in three 512-column blocks, 32-row chunks and
    // a partial one, the last rows past the vector loads' reach
    check_linear(rng, 83, 1100, 12, 5, 0.5, false, vt);
    check_linear(rng, 45, 104, 9, 0, 0.5, true, vt);
  }
  for (int bits : {4, 8}) {
    check_quantized(rng, 40, 128, 1, bits, 32, 0.5, true);   // integer path
    check_quantized(rng, 33, 576, 1, bits, 32, 0.5, true);   // integer path, SmolLM2's width
    check_quantized(rng, 41, 256, 1, bits, 64, 0.5, true);   // integer path, two steps per group
    check_quantized(rng, 43, 192, 1, bits, 32, 0.5, true);   // rows 4i + 3: two pairs at a time, a pair, a lone row
    check_quantized(rng, 130, 128, 1, bits, 32, 0.5, true);  // row chunks of 64, the last one a single pair
    check_quantized(rng, 41, 104, 1, bits, 32, 0.5, true);   // 2:4 but K % 64 != 0: float path
    check_quantized(rng, 83, 545, 1, bits, 7, 0.5, false);   // groups span rows, odd starts
    check_quantized(rng, 83, 545, 5, bits, 32, 0.5, false);  // batch: whole-weight dequantization
    check_quantized(rng, 40, 128, 3, bits, 32, 0.5, true);
  }
  check_quantize_q24_nonfinite();
  check_large_page_advice();
  check_dense(rng, 1, 67, 301);
  check_dense(rng, 7, 5, 33);
  check_dense(rng, 19, 23, 64);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
