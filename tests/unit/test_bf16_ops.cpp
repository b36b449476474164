// Every op of pb::Backend (kernels/backend.h) on bf16 tensors, against the same op of the CPU backend on
// fp32 tensors holding the same values.
//
// Method: inputs are drawn in fp32 and rounded to bf16 first, so that the bf16 run and the fp32 reference
// run see identical values; the op then runs twice, once with its tensors in bf16 (or in a mix of dtypes
// the contract allows) and once all in fp32, and the outputs are compared element by element. Outputs an
// op must write are filled with NaN first (bf16's NaN for bf16 tensors), so an element not written fails;
// no output may be all zeros. Sizes are test_cpu_ops.cpp's awkward ones: N = 34 rows, C = 72, OC = 40,
// 3 heads of dim 24, S = 17, V = 67; MoE with E = 3 and 5, k = 2, h = 37; CP with two key blocks.
//
// Tolerances, with round() fp32 → bf16 to nearest even:
//   bf16 outputs of elementwise ops and copies (gelu, add, accumulate, convert, scale, embedding forward,
//   MoE dispatch and combine and their backwards, copy_2d), and bf16 embedding gradients (summed in fp32,
//   rounded once per call) ......................................... exactly round(fp32 op's result)
//   bf16 outputs of matmul, LayerNorm, attention, cross-entropy's dlogits, the router's dlogits, the CP
//   ops, and bf16 parameter gradients ................................ ‖got − ref‖/‖ref‖ ≤ 1e-2 (each also
//                                                                      printed as its largest distance in
//                                                                      ulps from round(ref))
//   fp32 outputs of ops that read bf16 (statistics, saved probabilities, lse, delta, loss, gates, fp32
//   gradient accumulators: what they added) .......................... ≤ 1e-5 relative
//   sum_squares of bf16 ............................................... the double sum of the widened
//                                                                      values (≤ 1e-12 relative)
//   AdamW with bf16 gradients ......................................... bitwise AdamW with fp32 gradients
//   threads ........................................................... 1 and 3 threads bitwise (the
//                                                                      products within 1 ulp)
// Combinations the contract does not allow throw std::invalid_argument naming the op and the dtypes,
// before writing anything.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/cpu_backend.h"

namespace {

using pb::Backend;
using pb::ConstTensorPtr;
using pb::DType;
using pb::MemCategory;
using pb::TensorPtr;
using pb::cpu::bf16_to_float;
using pb::cpu::float_to_bf16;
using FVec = std::vector<float>;
using IVec = std::vector<int32_t>;

constexpr DType kF32 = DType::f32;
constexpr DType kBf16 = DType::bf16;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kRelTol = 1e-2;   // bf16 outputs of ops whose intermediates may round differently
constexpr double kFp32Tol = 1e-5;  // fp32 outputs of ops that read bf16

// Sizes (test_cpu_ops.cpp's awkward ones).
constexpr int N = 34, C = 72, OC = 40, B = 2, S = 17, NH = 3, V = 67;

// ---- host helpers ------------------------------------------------------------------------------

float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

FVec rounded(FVec v) {
  for (float& x : v) x = round_bf16(x);
  return v;
}

// n values uniform in [lo, hi), rounded to bf16 (so fp32 and bf16 tensors can hold the same values).
FVec rand_bf16(std::mt19937& rng, std::size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  FVec v(n);
  for (float& x : v) x = round_bf16(dist(rng));
  return v;
}

IVec rand_ints(std::mt19937& rng, std::size_t n, int32_t lo, int32_t hi) {
  std::uniform_int_distribution<int32_t> dist(lo, hi);
  IVec v(n);
  for (int32_t& x : v) x = dist(rng);
  return v;
}

FVec minus(const FVec& a, const FVec& b) {
  FVec d(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// bf16 values in the order of the reals, to count ulps between two of them.
int ordered(uint16_t b) { return (b & 0x8000u) ? -static_cast<int>(b & 0x7FFFu) : static_cast<int>(b); }

std::string dtypes(std::initializer_list<DType> ts) {
  std::string s;
  for (DType t : ts) s += std::string(s.empty() ? "" : "/") + pb::dtype_name(t);
  return s;
}

// One line per comparison: the worst errors per op in the test's output.
void report(const std::string& what, const std::string& metric, double value) {
  std::printf("  [bf16 ops] %-58s %-18s %.3g\n", what.c_str(), metric.c_str(), value);
}

// The guards every comparison shares: sizes agree, every element finite (NaN: never written), not all
// zeros, and a reference that is not all zeros.
::testing::AssertionResult guards(const FVec& got, const FVec& ref, const std::string& what) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << ref.size();
  bool got_nonzero = false, ref_nonzero = false;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i] << " (reference " << ref[i]
                                           << "): not written or not finite";
    }
    got_nonzero |= got[i] != 0.0f;
    ref_nonzero |= ref[i] != 0.0f;
  }
  if (!ref_nonzero) return ::testing::AssertionFailure() << what << ": reference is all zeros";
  if (!got_nonzero) return ::testing::AssertionFailure() << what << ": output is all zeros";
  return ::testing::AssertionSuccess();
}

double relative_error(const FVec& got, const FVec& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = static_cast<double>(got[i]) - ref[i];
    num += e * e;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

// The largest distance in bf16 ulps between got (bf16 values) and round(ref), and where.
int max_ulps(const FVec& got, const FVec& ref, std::size_t* where = nullptr) {
  int worst = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const int d = std::abs(ordered(float_to_bf16(got[i])) - ordered(float_to_bf16(ref[i])));
    if (d > worst) {
      worst = d;
      if (where != nullptr) *where = i;
    }
  }
  return worst;
}

// A bf16 output that must be exactly round(ref), ref the fp32 op's output.
::testing::AssertionResult exact_rounding(const FVec& got, const FVec& ref, const std::string& what) {
  auto g = guards(got, ref, what);
  if (!g) return g;
  std::size_t where = 0;
  const int ulps = max_ulps(got, ref, &where);
  report(what, "ulps from round", ulps);
  if (ulps == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": element " << where << " is " << got[where]
                                       << ", round(fp32 result) " << round_bf16(ref[where]) << " (" << ulps << " ulps)";
}

// A bf16 output within kRelTol of the fp32 op's output.
::testing::AssertionResult bf16_close(const FVec& got, const FVec& ref, const std::string& what) {
  auto g = guards(got, ref, what);
  if (!g) return g;
  const double rel = relative_error(got, ref);
  report(what, "rel err", rel);
  report(what, "ulps from round", max_ulps(got, ref));
  if (rel <= kRelTol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": relative error " << rel << " > " << kRelTol;
}

// An fp32 output within tol (relative) of the fp32 op's.
::testing::AssertionResult fp32_close(const FVec& got, const FVec& ref, const std::string& what,
                                      double tol = kFp32Tol) {
  auto g = guards(got, ref, what);
  if (!g) return g;
  const double rel = relative_error(got, ref);
  report(what, "rel err", rel);
  if (rel <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": relative error " << rel << " > " << tol;
}

// An output in dtype t: bf16 within kRelTol, fp32 within kFp32Tol.
::testing::AssertionResult close_in(DType t, const FVec& got, const FVec& ref, const std::string& what) {
  return t == kBf16 ? bf16_close(got, ref, what + " (bf16)") : fp32_close(got, ref, what + " (fp32)");
}

// An accumulated output (before → after) in dtype t against the fp32 op's (ref_before → ref_after, the
// same before): bf16 as a whole within kRelTol (it is rounded once), fp32 by what was added (≤ kFp32Tol).
::testing::AssertionResult accumulated_close(DType t, const FVec& before, const FVec& after, const FVec& ref_after,
                                             const std::string& what) {
  if (t == kBf16) return bf16_close(after, ref_after, what + " (bf16, accumulated)");
  return fp32_close(minus(after, before), minus(ref_after, before), what + " (fp32, what was added)");
}

// ---- device helper: tensors of either dtype, freed before the backend goes ---------------------

struct Dev {
  Backend& be;
  std::vector<void*> owned;

  explicit Dev(Backend& backend) : be(backend) {}
  ~Dev() {
    for (void* p : owned) be.free(p);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  void* raw(std::size_t bytes) {
    void* p = be.alloc(std::max<std::size_t>(bytes, 1), MemCategory::activations);
    owned.push_back(p);
    return p;
  }
  // host values stored in dtype t (bf16: rounded to nearest even)
  TensorPtr put(const FVec& host, DType t) {
    TensorPtr p(raw(host.size() * pb::dtype_bytes(t)), t);
    if (t == kF32) {
      be.upload(p.data(), host.data(), host.size() * sizeof(float));
    } else {
      std::vector<uint16_t> bits(host.size());
      for (std::size_t i = 0; i < host.size(); ++i) bits[i] = float_to_bf16(host[i]);
      be.upload(p.data(), bits.data(), bits.size() * sizeof(uint16_t));
    }
    return p;
  }
  TensorPtr poisoned(std::size_t n, DType t) { return put(FVec(n, kNaN), t); }
  float* put_f32(const FVec& host) { return put(host, kF32).as<float>(); }
  float* poisoned_f32(std::size_t n) { return poisoned(n, kF32).as<float>(); }
  int32_t* put_ints(const IVec& host) {
    auto* p = static_cast<int32_t*>(raw(host.size() * sizeof(int32_t)));
    be.upload(p, host.data(), host.size() * sizeof(int32_t));
    return p;
  }
  double* put_double(double v) {
    auto* p = static_cast<double*>(raw(sizeof(double)));
    be.upload(p, &v, sizeof v);
    return p;
  }
  double get_double(const double* p) {
    double v;
    be.download(&v, p, sizeof v);
    return v;
  }
  IVec get_ints(const int32_t* p, std::size_t n) {
    IVec v(n);
    be.download(v.data(), p, n * sizeof(int32_t));
    return v;
  }
  // the elements as fp32 (bf16 widened, exactly)
  FVec get(ConstTensorPtr p, std::size_t n) {
    be.synchronize();
    FVec host(n);
    if (p.dtype() == kF32) {
      be.download(host.data(), p.data(), n * sizeof(float));
    } else {
      std::vector<uint16_t> bits(n);
      be.download(bits.data(), p.data(), n * sizeof(uint16_t));
      for (std::size_t i = 0; i < n; ++i) host[i] = bf16_to_float(bits[i]);
    }
    return host;
  }
};

class Bf16Ops : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = pb::make_cpu_backend(2);
};

// =================================================================================================
// Matrix products
// =================================================================================================

FVec run_matmul_forward(Backend& be, DType t, const FVec& inp, const FVec& w, const FVec& bias) {
  Dev dev(be);
  TensorPtr out = dev.poisoned(std::size_t(N) * OC, t);
  be.matmul_forward(out, dev.put(inp, t), dev.put(w, t), bias.empty() ? TensorPtr() : dev.put(bias, t), N, C, OC);
  return dev.get(out, std::size_t(N) * OC);
}

TEST_F(Bf16Ops, MatmulForward) {
  std::mt19937 rng(1);
  const FVec inp = rand_bf16(rng, N * C), w = rand_bf16(rng, C * OC), bias = rand_bf16(rng, OC);
  for (bool with_bias : {true, false}) {
    const FVec b = with_bias ? bias : FVec();
    const FVec ref = run_matmul_forward(*be, kF32, inp, w, b);
    EXPECT_TRUE(bf16_close(run_matmul_forward(*be, kBf16, inp, w, b), ref,
                           std::string("matmul_forward out") + (with_bias ? " +bias" : "")));
  }
  // a backend made for bf16 products of fp32 tensors runs bf16 tensors the same way
  auto be_mixed = pb::make_cpu_backend(2, true);
  EXPECT_EQ(run_matmul_forward(*be_mixed, kBf16, inp, w, bias), run_matmul_forward(*be, kBf16, inp, w, bias));
}

struct MatmulGrads {
  FVec dinp, dw, db;
};

MatmulGrads run_matmul_backward(Backend& be, DType t, DType tw, DType tb, bool with_dinp, bool with_dbias,
                                const FVec& dout, const FVec& inp, const FVec& w, const FVec& dw0, const FVec& db0) {
  Dev dev(be);
  TensorPtr dinp = with_dinp ? dev.poisoned(std::size_t(N) * C, t) : TensorPtr();
  TensorPtr dw = dev.put(dw0, tw), db = with_dbias ? dev.put(db0, tb) : TensorPtr();
  be.matmul_backward(dinp, dw, db, dev.put(dout, t), dev.put(inp, t), dev.put(w, t), N, C, OC);
  return {with_dinp ? dev.get(dinp, std::size_t(N) * C) : FVec(), dev.get(dw, dw0.size()),
          with_dbias ? dev.get(db, db0.size()) : FVec()};
}

TEST_F(Bf16Ops, MatmulBackwardWithEachGradientDtype) {
  std::mt19937 rng(2);
  const FVec dout = rand_bf16(rng, N * OC), inp = rand_bf16(rng, N * C), w = rand_bf16(rng, C * OC);
  const FVec dw0 = rand_bf16(rng, C * OC), db0 = rand_bf16(rng, OC);  // the gradients accumulate onto these
  struct Case {
    DType t, tw, tb;
    bool with_dinp, with_dbias;
  };
  for (const Case& cs : {Case{kBf16, kF32, kF32, true, true}, Case{kBf16, kBf16, kBf16, true, true},
                         Case{kBf16, kBf16, kF32, false, true}, Case{kBf16, kF32, kBf16, true, false},
                         Case{kF32, kBf16, kBf16, true, true}}) {
    const std::string what = "matmul_backward " + dtypes({cs.t, cs.tw, cs.tb});
    SCOPED_TRACE(what);
    const MatmulGrads ref =
        run_matmul_backward(*be, kF32, kF32, kF32, cs.with_dinp, cs.with_dbias, dout, inp, w, dw0, db0);
    const MatmulGrads got =
        run_matmul_backward(*be, cs.t, cs.tw, cs.tb, cs.with_dinp, cs.with_dbias, dout, inp, w, dw0, db0);
    if (cs.with_dinp) {
      EXPECT_TRUE(close_in(cs.t, got.dinp, ref.dinp, what + " dinp"));
    }
    EXPECT_TRUE(accumulated_close(cs.tw, dw0, got.dw, ref.dw, what + " dweight"));
    if (cs.with_dbias) {
      EXPECT_TRUE(accumulated_close(cs.tb, db0, got.db, ref.db, what + " dbias"));
    }
  }
}

// =================================================================================================
// LayerNorm
// =================================================================================================

TEST_F(Bf16Ops, LayernormForward) {
  std::mt19937 rng(3);
  const FVec inp = rand_bf16(rng, N * C, -2.0f, 3.0f), w = rand_bf16(rng, C, 0.5f, 1.5f), b = rand_bf16(rng, C);
  auto run = [&](DType t, FVec* mean, FVec* rstd) {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(std::size_t(N) * C, t);
    float* m = dev.poisoned_f32(N);
    float* r = dev.poisoned_f32(N);
    be->layernorm_forward(out, m, r, dev.put(inp, t), dev.put(w, t), dev.put(b, t), N, C);
    *mean = dev.get(m, N);
    *rstd = dev.get(r, N);
    return dev.get(out, std::size_t(N) * C);
  };
  FVec mean, rstd, ref_mean, ref_rstd;
  const FVec ref = run(kF32, &ref_mean, &ref_rstd);
  EXPECT_TRUE(bf16_close(run(kBf16, &mean, &rstd), ref, "layernorm_forward out"));
  EXPECT_TRUE(fp32_close(mean, ref_mean, "layernorm_forward mean (fp32)"));
  EXPECT_TRUE(fp32_close(rstd, ref_rstd, "layernorm_forward rstd (fp32)"));
}

TEST_F(Bf16Ops, LayernormBackwardWithEachGradientDtype) {
  std::mt19937 rng(4);
  const FVec inp = rand_bf16(rng, N * C, -2.0f, 3.0f), w = rand_bf16(rng, C, 0.5f, 1.5f), dout = rand_bf16(rng, N * C);
  const FVec dinp0 = rand_bf16(rng, N * C), dw0 = rand_bf16(rng, C), db0 = rand_bf16(rng, C);  // all accumulate
  // mean and rstd from the forward (fp32 statistics, the same for both runs)
  FVec mean, rstd;
  {
    Dev dev(*be);
    float* m = dev.poisoned_f32(N);
    float* r = dev.poisoned_f32(N);
    be->layernorm_forward(dev.poisoned(std::size_t(N) * C, kF32), m, r, dev.put(inp, kF32), dev.put(w, kF32),
                          dev.put(FVec(C, 0.0f), kF32), N, C);
    mean = dev.get(m, N);
    rstd = dev.get(r, N);
  }
  auto run = [&](DType t, DType tw, DType tb, FVec* dw, FVec* db) {
    Dev dev(*be);
    TensorPtr dinp = dev.put(dinp0, t), dwt = dev.put(dw0, tw), dbt = dev.put(db0, tb);
    be->layernorm_backward(dinp, dwt, dbt, dev.put(dout, t), dev.put(inp, t), dev.put(w, t), dev.put_f32(mean),
                           dev.put_f32(rstd), N, C);
    *dw = dev.get(dwt, C);
    *db = dev.get(dbt, C);
    return dev.get(dinp, std::size_t(N) * C);
  };
  FVec ref_dw, ref_db;
  const FVec ref_dinp = run(kF32, kF32, kF32, &ref_dw, &ref_db);
  for (auto [t, tw, tb] : {std::tuple{kBf16, kF32, kF32}, std::tuple{kBf16, kBf16, kBf16},
                           std::tuple{kBf16, kF32, kBf16}, std::tuple{kF32, kBf16, kBf16}}) {
    const std::string what = "layernorm_backward " + dtypes({t, tw, tb});
    SCOPED_TRACE(what);
    FVec dw, db;
    const FVec dinp = run(t, tw, tb, &dw, &db);
    EXPECT_TRUE(accumulated_close(t, dinp0, dinp, ref_dinp, what + " dinp"));
    EXPECT_TRUE(accumulated_close(tw, dw0, dw, ref_dw, what + " dweight"));
    EXPECT_TRUE(accumulated_close(tb, db0, db, ref_db, what + " dbias"));
  }
}

// =================================================================================================
// Attention
// =================================================================================================

TEST_F(Bf16Ops, AttentionForwardAndBackward) {
  std::mt19937 rng(5);
  const FVec qkv = rand_bf16(rng, std::size_t(B) * S * 3 * C, -2.0f, 2.0f),
             dout = rand_bf16(rng, std::size_t(B) * S * C);
  const std::size_t n_saved = be->attention_saved_floats(B, S, NH), n_scratch = be->attention_scratch_floats(B, S, NH);
  auto run = [&](DType t, FVec* saved, FVec* dqkv) {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(std::size_t(B) * S * C, t), d_qkv = dev.put(qkv, t);
    float* sv = dev.poisoned_f32(n_saved);
    be->attention_forward(out, sv, d_qkv, B, S, C, NH);
    TensorPtr dq = dev.poisoned(qkv.size(), t);
    be->attention_backward(dq, dev.poisoned_f32(n_scratch), dev.put(dout, t), out, d_qkv, sv, B, S, C, NH);
    *saved = dev.get(sv, n_saved);
    *dqkv = dev.get(dq, qkv.size());
    return dev.get(out, std::size_t(B) * S * C);
  };
  FVec saved, dqkv, ref_saved, ref_dqkv;
  const FVec ref = run(kF32, &ref_saved, &ref_dqkv);
  EXPECT_TRUE(bf16_close(run(kBf16, &saved, &dqkv), ref, "attention_forward out"));
  EXPECT_TRUE(fp32_close(saved, ref_saved, "attention_forward saved (fp32)"));
  EXPECT_TRUE(bf16_close(dqkv, ref_dqkv, "attention_backward dqkv"));
}

// =================================================================================================
// The Llama-style block: RMSNorm, rotary positions, SwiGLU, grouped-query attention
// =================================================================================================

TEST_F(Bf16Ops, RmsnormForwardAndBackward) {
  std::mt19937 rng(31);
  const FVec inp = rand_bf16(rng, N * C, -2.0f, 3.0f), w = rand_bf16(rng, C, 0.5f, 1.5f), dout = rand_bf16(rng, N * C);
  const FVec dinp0 = rand_bf16(rng, N * C), dw0 = rand_bf16(rng, C);  // both accumulate
  auto run = [&](DType t, DType tw, FVec* rstd, FVec* dinp, FVec* dw) {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(std::size_t(N) * C, t), x = dev.put(inp, t), g = dev.put(w, t);
    float* r = dev.poisoned_f32(N);
    be->rmsnorm_forward(out, r, x, g, N, C);
    TensorPtr di = dev.put(dinp0, t), dg = dev.put(dw0, tw);
    be->rmsnorm_backward(di, dg, dev.put(dout, t), x, g, r, N, C);
    *rstd = dev.get(r, N);
    *dinp = dev.get(di, std::size_t(N) * C);
    *dw = dev.get(dg, C);
    return dev.get(out, std::size_t(N) * C);
  };
  FVec ref_rstd, ref_dinp, ref_dw;
  const FVec ref = run(kF32, kF32, &ref_rstd, &ref_dinp, &ref_dw);
  for (DType tw : {kF32, kBf16}) {
    const std::string what = "rmsnorm " + dtypes({kBf16, tw});
    FVec rstd, dinp, dw;
    EXPECT_TRUE(bf16_close(run(kBf16, tw, &rstd, &dinp, &dw), ref, what + " out"));
    EXPECT_TRUE(fp32_close(rstd, ref_rstd, what + " rstd (fp32)"));
    EXPECT_TRUE(accumulated_close(kBf16, dinp0, dinp, ref_dinp, what + " dinp"));
    EXPECT_TRUE(accumulated_close(tw, dw0, dw, ref_dw, what + " dweight"));
  }
}

// Rotations and the SiLU gate are elementwise: a bf16 output is the fp32 result rounded once.
TEST_F(Bf16Ops, RopeAndSwiglu) {
  std::mt19937 rng(32);
  const int d = C / NH;
  const FVec x = rand_bf16(rng, std::size_t(N) * 3 * C, -2.0f, 2.0f);
  IVec pos(S);
  for (int i = 0; i < S; ++i) pos[i] = 3 * i + 1;
  const std::size_t n = std::size_t(N) * C + 5;
  const FVec gate = rand_bf16(rng, n, -6.0f, 6.0f), up = rand_bf16(rng, n, -2.0f, 2.0f), dout = rand_bf16(rng, n);
  auto run = [&](DType t, FVec* back, FVec* sw, FVec* dgate, FVec* dup) {
    Dev dev(*be);
    const int32_t* p = dev.put_ints(pos);
    TensorPtr r = dev.put(x, t), rb = dev.put(x, t);
    be->rope_forward(r + std::ptrdiff_t(C), 3 * C, p, B, S, NH, d, 10000.0);  // K's heads of a qkv buffer
    be->rope_backward(rb + std::ptrdiff_t(C), 3 * C, p, B, S, NH, d, 10000.0);
    TensorPtr out = dev.poisoned(n, t), dg = dev.poisoned(n, t), du = dev.put(dout, t);
    be->swiglu_forward(out, dev.put(gate, t), dev.put(up, t), n);
    be->swiglu_backward(dg, du, du, dev.put(gate, t), dev.put(up, t), n);  // dup aliasing dout
    *back = dev.get(rb, x.size());
    *sw = dev.get(out, n);
    *dgate = dev.get(dg, n);
    *dup = dev.get(du, n);
    return dev.get(r, x.size());
  };
  FVec back, sw, dgate, dup, ref_back, ref_sw, ref_dgate, ref_dup;
  const FVec ref = run(kF32, &ref_back, &ref_sw, &ref_dgate, &ref_dup);
  EXPECT_TRUE(exact_rounding(run(kBf16, &back, &sw, &dgate, &dup), ref, "rope_forward"));
  EXPECT_TRUE(exact_rounding(back, ref_back, "rope_backward"));
  EXPECT_TRUE(exact_rounding(sw, ref_sw, "swiglu_forward out"));
  EXPECT_TRUE(exact_rounding(dgate, ref_dgate, "swiglu_backward dgate"));
  EXPECT_TRUE(exact_rounding(dup, ref_dup, "swiglu_backward dup"));
}

TEST_F(Bf16Ops, GroupedQueryAttentionForwardAndBackward) {
  std::mt19937 rng(33);
  const int heads = 6, kv = 2, d = 12, Cq = heads * d;  // 3 query heads per key/value head
  const std::size_t W = Cq + 2 * kv * d;
  const FVec qkv = rand_bf16(rng, std::size_t(B) * S * W, -2.0f, 2.0f), dout = rand_bf16(rng, std::size_t(B) * S * Cq);
  const std::size_t n_saved = be->attention_saved_floats(B, S, heads), n_scratch = be->attention_scratch_floats(B, S, heads);
  auto run = [&](DType t, FVec* saved, FVec* dqkv) {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(std::size_t(B) * S * Cq, t), d_qkv = dev.put(qkv, t);
    float* sv = dev.poisoned_f32(n_saved);
    be->attention_gqa_forward(out, sv, d_qkv, B, S, Cq, heads, kv);
    TensorPtr dq = dev.poisoned(qkv.size(), t);
    be->attention_gqa_backward(dq, dev.poisoned_f32(n_scratch), dev.put(dout, t), out, d_qkv, sv, B, S, Cq, heads, kv);
    *saved = dev.get(sv, n_saved);
    *dqkv = dev.get(dq, qkv.size());
    return dev.get(out, std::size_t(B) * S * Cq);
  };
  FVec saved, dqkv, ref_saved, ref_dqkv;
  const FVec ref = run(kF32, &ref_saved, &ref_dqkv);
  EXPECT_TRUE(bf16_close(run(kBf16, &saved, &dqkv), ref, "attention_gqa_forward out"));
  EXPECT_TRUE(fp32_close(saved, ref_saved, "attention_gqa_forward saved (fp32)"));
  EXPECT_TRUE(bf16_close(dqkv, ref_dqkv, "attention_gqa_backward dqkv"));
}

// =================================================================================================
// Elementwise ops
// =================================================================================================

TEST_F(Bf16Ops, Gelu) {
  std::mt19937 rng(6);
  const std::size_t n = std::size_t(N) * C + 5;
  const FVec inp = rand_bf16(rng, n, -4.0f, 4.0f), dout = rand_bf16(rng, n);
  auto run = [&](DType t, FVec* dinp, FVec* dinp_aliased) {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(n, t), d_inp = dev.put(inp, t), d_dinp = dev.poisoned(n, t);
    be->gelu_forward(out, d_inp, n);
    be->gelu_backward(d_dinp, d_inp, dev.put(dout, t), n);
    TensorPtr d_alias = dev.put(dout, t);  // dinp may alias dout
    be->gelu_backward(d_alias, d_inp, d_alias, n);
    *dinp = dev.get(d_dinp, n);
    *dinp_aliased = dev.get(d_alias, n);
    return dev.get(out, n);
  };
  FVec dinp, dinp_alias, ref_dinp, ref_dinp_alias;
  const FVec ref = run(kF32, &ref_dinp, &ref_dinp_alias);
  EXPECT_TRUE(exact_rounding(run(kBf16, &dinp, &dinp_alias), ref, "gelu_forward out"));
  EXPECT_TRUE(exact_rounding(dinp, ref_dinp, "gelu_backward dinp"));
  EXPECT_TRUE(exact_rounding(dinp_alias, ref_dinp_alias, "gelu_backward dinp aliasing dout"));
}

// The expected output of an elementwise op in dtype t: the fp32 result, rounded when t is bf16.
FVec as_dtype(const FVec& v, DType t) { return t == kBf16 ? rounded(v) : v; }

TEST_F(Bf16Ops, AddAccumulateScaleConvertInEveryDtypeCombination) {
  std::mt19937 rng(7);
  const std::size_t n = 1001;
  const FVec a = rand_bf16(rng, n, -3.0f, 3.0f), b = rand_bf16(rng, n, -3.0f, 3.0f);
  Dev dev(*be);
  // fp32 results of the same values
  FVec sum(n), scaled(n);
  for (std::size_t i = 0; i < n; ++i) {
    sum[i] = a[i] + b[i];
    scaled[i] = a[i] * 0.3f;
  }
  for (DType to : {kF32, kBf16}) {
    for (DType ta : {kF32, kBf16}) {
      for (DType tb : {kF32, kBf16}) {
        const std::string combo = dtypes({to, ta, tb});
        SCOPED_TRACE(combo);
        TensorPtr out = dev.poisoned(n, to);
        be->add(out, dev.put(a, ta), dev.put(b, tb), n);
        EXPECT_EQ(dev.get(out, n), as_dtype(sum, to)) << "add " << combo;
      }
      // y += x
      TensorPtr y = dev.put(a, to);
      be->accumulate(y, dev.put(b, ta), n);
      EXPECT_EQ(dev.get(y, n), as_dtype(sum, to)) << "accumulate " << dtypes({to, ta});
    }
    TensorPtr y = dev.put(a, to);
    be->scale(y, 0.3f, n);
    EXPECT_EQ(dev.get(y, n), as_dtype(scaled, to)) << "scale " << pb::dtype_name(to);
  }
  // out aliasing an input, in bf16
  TensorPtr x = dev.put(a, kBf16);
  be->add(x, x, dev.put(b, kBf16), n);
  EXPECT_TRUE(exact_rounding(dev.get(x, n), sum, "add out aliasing a (bf16)"));
  TensorPtr out = dev.poisoned(n, kBf16);
  be->add(out, dev.put(a, kBf16), dev.put(b, kBf16), n);
  EXPECT_TRUE(exact_rounding(dev.get(out, n), sum, "add out (bf16)"));
  TensorPtr acc = dev.put(a, kBf16);
  be->accumulate(acc, dev.put(b, kF32), n);
  EXPECT_TRUE(exact_rounding(dev.get(acc, n), sum, "accumulate y (bf16) += x (fp32)"));

  // convert: fp32 values that are not bf16 values round to nearest even; bf16 widens exactly
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  FVec wide(n);
  for (float& v : wide) v = dist(rng);
  wide[0] = 1.0f + std::ldexp(1.0f, -8);      // a tie: to 1 (even)
  wide[1] = 1.0f + 3 * std::ldexp(1.0f, -8);  // a tie: to 1 + 2^-6 (even)
  TensorPtr narrow = dev.poisoned(n, kBf16);
  be->convert(narrow, dev.put(wide, kF32), n);
  EXPECT_TRUE(exact_rounding(dev.get(narrow, n), wide, "convert fp32 -> bf16"));
  TensorPtr widened = dev.poisoned(n, kF32);
  be->convert(widened, narrow, n);
  EXPECT_EQ(dev.get(widened, n), rounded(wide)) << "convert bf16 -> fp32";
  for (DType t : {kF32, kBf16}) {  // the same dtype: a plain copy
    TensorPtr src = dev.put(wide, t), dst = dev.poisoned(n, t);
    be->convert(dst, src, n);
    EXPECT_EQ(std::memcmp(dst.data(), src.data(), n * pb::dtype_bytes(t)), 0) << "convert " << pb::dtype_name(t);
  }
}

TEST_F(Bf16Ops, SumSquaresOfBf16IsTheDoubleSumOfTheWidenedValues) {
  std::mt19937 rng(8);
  const std::size_t n = (std::size_t{1} << 15) + 77;  // more than one of the fixed chunks
  const FVec x = rand_bf16(rng, n, -3.0f, 3.0f);
  double ref = 0.0;
  for (float v : x) ref += static_cast<double>(v) * v;
  Dev dev(*be);
  const double got = be->sum_squares(dev.put(x, kBf16), n);
  report("sum_squares (bf16)", "rel err", std::fabs(got - ref) / ref);
  EXPECT_LE(std::fabs(got - ref), 1e-12 * ref);
  EXPECT_EQ(got, be->sum_squares(dev.put(x, kF32), n));  // the fp32 op on the same values, bitwise
}

TEST_F(Bf16Ops, AdamwWithBf16GradientsEqualsFp32GradientsOfTheSameValues) {
  std::mt19937 rng(9);
  const std::size_t n = 2053;
  const FVec g = rand_bf16(rng, n, -2.0f, 2.0f);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f), pos(0.0f, 0.1f);
  FVec p(n), m(n), v(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = dist(rng);
    m[i] = 0.1f * dist(rng);
    v[i] = pos(rng);
  }
  auto run = [&](DType tg, FVec* m_out, FVec* v_out) {
    Dev dev(*be);
    float* dp = dev.put_f32(p);
    float* dm = dev.put_f32(m);
    float* dv = dev.put_f32(v);
    be->adamw_update(dp, dev.put(g, tg), dm, dv, n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.7f);
    *m_out = dev.get(dm, n);
    *v_out = dev.get(dv, n);
    return dev.get(dp, n);
  };
  FVec m16, v16, m32, v32;
  const FVec p16 = run(kBf16, &m16, &v16), p32 = run(kF32, &m32, &v32);
  EXPECT_TRUE(guards(minus(p16, p), minus(p32, p), "adamw update"));
  EXPECT_EQ(std::memcmp(p16.data(), p32.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(m16.data(), m32.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(v16.data(), v32.data(), n * sizeof(float)), 0);
}

// =================================================================================================
// Embedding
// =================================================================================================

// B·S tokens of a V-row table with repeats, and a few negative ones (another rank's vocabulary block).
IVec embedding_tokens(std::mt19937& rng) {
  IVec tokens = rand_ints(rng, std::size_t(B) * S, 0, 9);  // few distinct tokens: rows hit several times
  for (std::size_t i = 0; i < tokens.size(); i += 3) tokens[i] = rand_ints(rng, 1, 0, V - 1)[0];
  tokens[4] = -1;
  tokens[S + 7] = -3;
  return tokens;
}

TEST_F(Bf16Ops, EmbeddingForward) {
  std::mt19937 rng(10);
  const IVec tokens = embedding_tokens(rng);
  const FVec tok = rand_bf16(rng, std::size_t(V) * C), pos = rand_bf16(rng, std::size_t(S) * C);
  for (bool with_pos : {true, false}) {
    auto run = [&](DType t) {
      Dev dev(*be);
      TensorPtr out = dev.poisoned(std::size_t(B) * S * C, t);
      be->embedding_forward(out, dev.put_ints(tokens), dev.put(tok, t), with_pos ? dev.put(pos, t) : TensorPtr(), B, S,
                            C);
      return dev.get(out, std::size_t(B) * S * C);
    };
    EXPECT_TRUE(
        exact_rounding(run(kBf16), run(kF32), std::string("embedding_forward out") + (with_pos ? "" : " (no pos)")));
  }
}

TEST_F(Bf16Ops, EmbeddingBackwardWithEachGradientDtype) {
  std::mt19937 rng(11);
  const IVec tokens = embedding_tokens(rng);
  const FVec dout = rand_bf16(rng, std::size_t(B) * S * C), dtok0 = rand_bf16(rng, std::size_t(V) * C),
             dpos0 = rand_bf16(rng, std::size_t(S) * C);
  auto run = [&](DType t, DType ttok, DType tpos, bool with_pos, FVec* dpos) {
    Dev dev(*be);
    TensorPtr dtok = dev.put(dtok0, ttok), dp = with_pos ? dev.put(dpos0, tpos) : TensorPtr();
    be->embedding_backward(dtok, dp, dev.put(dout, t), dev.put_ints(tokens), B, S, C);
    if (with_pos) *dpos = dev.get(dp, dpos0.size());
    return dev.get(dtok, dtok0.size());
  };
  for (bool with_pos : {true, false}) {
    FVec ref_dpos;
    const FVec ref_dtok = run(kF32, kF32, kF32, with_pos, &ref_dpos);
    for (auto [t, ttok, tpos] : {std::tuple{kBf16, kF32, kF32}, std::tuple{kBf16, kBf16, kBf16},
                                 std::tuple{kBf16, kBf16, kF32}, std::tuple{kF32, kBf16, kBf16}}) {
      const std::string what = "embedding_backward " + dtypes({t, ttok, tpos}) + (with_pos ? "" : " (no dpos)");
      SCOPED_TRACE(what);
      FVec dpos;
      const FVec dtok = run(t, ttok, tpos, with_pos, &dpos);
      EXPECT_TRUE(accumulated_close(ttok, dtok0, dtok, ref_dtok, what + " dtok"));
      if (ttok == kBf16) {  // summed in fp32, rounded once
        EXPECT_TRUE(exact_rounding(dtok, ref_dtok, what + " dtok"));
      }
      // rows of tokens the batch does not hold are left exactly as they were
      for (int row = 0; row < V; ++row) {
        if (std::find(tokens.begin(), tokens.end(), row) != tokens.end()) continue;
        for (int c = 0; c < C; ++c) ASSERT_EQ(dtok[std::size_t(row) * C + c], dtok0[std::size_t(row) * C + c]) << row;
      }
      if (with_pos) {
        EXPECT_TRUE(accumulated_close(tpos, dpos0, dpos, ref_dpos, what + " dpos"));
        if (tpos == kBf16) {
          EXPECT_TRUE(exact_rounding(dpos, ref_dpos, what + " dpos"));
        }
      }
    }
  }
}

// =================================================================================================
// Cross-entropy
// =================================================================================================

TEST_F(Bf16Ops, CrossEntropyFused) {
  std::mt19937 rng(12);
  const FVec logits = rand_bf16(rng, std::size_t(N) * V, -5.0f, 5.0f);
  const IVec targets = rand_ints(rng, N, 0, V - 1);
  const float scale = 1.0f / N;
  auto run = [&](DType t, double* loss) {
    Dev dev(*be);
    TensorPtr z = dev.put(logits, t);
    double* l = dev.put_double(0.125);
    be->cross_entropy_forward_backward(z, l, dev.put_ints(targets), N, V, V, scale);
    *loss = dev.get_double(l) - 0.125;
    return dev.get(z, logits.size());
  };
  double loss, ref_loss;
  const FVec ref = run(kF32, &ref_loss);
  EXPECT_TRUE(bf16_close(run(kBf16, &loss), ref, "cross_entropy_forward_backward dlogits"));
  report("cross_entropy_forward_backward loss", "rel err", std::fabs(loss - ref_loss) / std::fabs(ref_loss));
  EXPECT_NEAR(loss, ref_loss, kFp32Tol * std::fabs(ref_loss));
}

TEST_F(Bf16Ops, CrossEntropyVocabularyParallelSteps) {
  std::mt19937 rng(13);
  const FVec logits = rand_bf16(rng, std::size_t(N) * V, -5.0f, 5.0f);
  IVec targets = rand_ints(rng, N, 0, V - 1);
  targets[3] = -1;  // another rank's target
  targets[20] = -1;
  const float scale = 0.5f / N;
  auto run = [&](DType t, FVec* row_max, FVec* sums, double* loss) {
    Dev dev(*be);
    TensorPtr z = dev.put(logits, t);
    float* mx = dev.poisoned_f32(N);
    float* sm = dev.poisoned_f32(2 * N);
    int32_t* tg = dev.put_ints(targets);
    double* l = dev.put_double(0.0);
    be->cross_entropy_row_max(mx, z, N, V, V);
    be->cross_entropy_partials(sm, z, tg, mx, N, V, V);
    be->cross_entropy_finish(z, l, tg, mx, sm, N, V, V, scale);
    *row_max = dev.get(mx, N);
    *sums = dev.get(sm, 2 * N);
    *loss = dev.get_double(l);
    return dev.get(z, logits.size());
  };
  FVec mx, sums, ref_mx, ref_sums;
  double loss, ref_loss;
  const FVec ref = run(kF32, &ref_mx, &ref_sums, &ref_loss);
  EXPECT_TRUE(bf16_close(run(kBf16, &mx, &sums, &loss), ref, "cross_entropy_finish dlogits"));
  EXPECT_TRUE(fp32_close(mx, ref_mx, "cross_entropy_row_max (fp32)"));
  EXPECT_TRUE(fp32_close(sums, ref_sums, "cross_entropy_partials (fp32)"));
  report("cross_entropy_finish loss", "rel err", std::fabs(loss - ref_loss) / std::fabs(ref_loss));
  EXPECT_NEAR(loss, ref_loss, kFp32Tol * std::fabs(ref_loss));
}

// =================================================================================================
// Context parallelism: queries at positions 0..S−1 against two key blocks (positions 0..8 and 9..16: the
// second is in the future of the first nine queries), keys of block 0 read from the qkv buffer (stride
// 3C), those of block 1 from a packed key-value buffer (stride 2C)
// =================================================================================================

struct CpInputs {
  FVec qkv, kv1, dout;
  IVec pos_q, pos_k0, pos_k1;
  static constexpr int Sk0 = 9, Sk1 = S - 9;
};

CpInputs cp_inputs(std::mt19937& rng) {
  CpInputs in;
  in.qkv = rand_bf16(rng, std::size_t(B) * S * 3 * C, -2.0f, 2.0f);
  in.kv1 = rand_bf16(rng, std::size_t(B) * CpInputs::Sk1 * 2 * C, -2.0f, 2.0f);
  in.dout = rand_bf16(rng, std::size_t(B) * S * C);
  for (int i = 0; i < S; ++i) in.pos_q.push_back(i);
  for (int j = 0; j < CpInputs::Sk0; ++j) in.pos_k0.push_back(j);
  for (int j = CpInputs::Sk0; j < S; ++j) in.pos_k1.push_back(j);
  return in;
}

// Block 0's keys are rows 0..Sk0−1 of qkv's K and V blocks: a (B, Sk0) view of them needs its own
// buffer (qkv's samples are S rows long), so they are copied into one of stride 3C.
FVec block0_rows(const FVec& qkv) {
  FVec rows(std::size_t(B) * CpInputs::Sk0 * 3 * C);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < CpInputs::Sk0; ++j)
      std::copy_n(&qkv[(std::size_t(b) * S + j) * 3 * C], 3 * C, &rows[(std::size_t(b) * CpInputs::Sk0 + j) * 3 * C]);
  return rows;
}

TEST_F(Bf16Ops, AttentionBlockForwardMergeDelta) {
  std::mt19937 rng(14);
  const CpInputs in = cp_inputs(rng);
  const FVec kv0 = block0_rows(in.qkv);
  const std::size_t n_out = std::size_t(B) * S * C, n_stat = std::size_t(B) * NH * S;
  struct Result {
    FVec out0, lse0, out1, lse1, merged, merged_lse, delta;
  };
  // dtypes: tq, tk, tv of the inputs, to of block 0's out (the running result), tb of block 1's
  auto run = [&](DType tq, DType tk, DType tv, DType to, DType tb) {
    Dev dev(*be);
    Result r;
    TensorPtr q = dev.put(in.qkv, tq), k0 = dev.put(kv0, tk), v0 = dev.put(kv0, tv), k1 = dev.put(in.kv1, tk),
              v1 = dev.put(in.kv1, tv);
    TensorPtr out = dev.poisoned(n_out, to), out_b = dev.poisoned(n_out, tb);
    float* lse = dev.poisoned_f32(n_stat);
    float* lse_b = dev.poisoned_f32(n_stat);
    int32_t* pq = dev.put_ints(in.pos_q);
    be->attention_block_forward(out, lse, q, k0 + C, v0 + 2 * C, 3 * C, 3 * C, pq, dev.put_ints(in.pos_k0), B, S,
                                CpInputs::Sk0, C, NH);
    be->attention_block_forward(out_b, lse_b, q, k1, v1 + C, 3 * C, 2 * C, pq, dev.put_ints(in.pos_k1), B, S,
                                CpInputs::Sk1, C, NH);
    r.out0 = dev.get(out, n_out);
    r.lse0 = dev.get(lse, n_stat);
    r.out1 = dev.get(out_b, n_out);
    r.lse1 = dev.get(lse_b, n_stat);
    return r;
  };
  // the merge and delta of given values in given dtypes
  auto merge = [&](const Result& blocks, DType to, DType tb, FVec* lse, FVec* delta) {
    Dev dev(*be);
    TensorPtr out = dev.put(blocks.out0, to);
    float* l = dev.put_f32(blocks.lse0);
    be->attention_merge(out, l, dev.put(blocks.out1, tb), dev.put_f32(blocks.lse1), B, S, C, NH);
    float* d = dev.poisoned_f32(n_stat);
    be->attention_block_delta(d, dev.put(in.dout, to), out, B, S, C, NH);
    *lse = dev.get(l, n_stat);
    *delta = dev.get(d, n_stat);
    return dev.get(out, n_out);
  };
  const Result ref = run(kF32, kF32, kF32, kF32, kF32);
  for (auto [tq, tk, tv] :
       {std::tuple{kBf16, kBf16, kBf16}, std::tuple{kF32, kBf16, kF32}, std::tuple{kBf16, kF32, kBf16}}) {
    for (auto [to, tb] :
         {std::pair{kBf16, kBf16}, std::pair{kF32, kBf16}, std::pair{kF32, kF32}, std::pair{kBf16, kF32}}) {
      const std::string what = "attention_block_forward q/k/v/out " + dtypes({tq, tk, tv, to});
      SCOPED_TRACE(what + " out_b " + pb::dtype_name(tb));
      const Result got = run(tq, tk, tv, to, tb);
      EXPECT_TRUE(close_in(to, got.out0, ref.out0, what + " out"));
      EXPECT_TRUE(close_in(tb, got.out1, ref.out1, what + " out (second block)"));
      EXPECT_TRUE(fp32_close(got.lse0, ref.lse0, what + " lse (fp32)"));
      // the second block is in the future of the first nine queries: out 0 and lse −inf there
      for (int b = 0; b < B; ++b)
        for (int i = 0; i < CpInputs::Sk0; ++i) {
          for (int h = 0; h < NH; ++h) EXPECT_EQ(got.lse1[(std::size_t(b) * NH + h) * S + i], -INFINITY);
          for (int c = 0; c < C; ++c) EXPECT_EQ(got.out1[(std::size_t(b) * S + i) * C + c], 0.0f);
        }
      FVec lse_rest = got.lse1, ref_rest = ref.lse1;  // the finite part
      for (std::size_t i = 0; i < lse_rest.size(); ++i)
        if (std::isinf(ref_rest[i])) lse_rest[i] = ref_rest[i] = 1.0f;
      EXPECT_TRUE(fp32_close(lse_rest, ref_rest, what + " lse (second block, fp32)"));
      // the merge and delta of these very values, against the fp32 ops on them
      FVec lse, delta, ref_lse, ref_delta;
      const FVec merged = merge(got, to, tb, &lse, &delta);
      const FVec ref_merged = merge(got, kF32, kF32, &ref_lse, &ref_delta);
      const std::string m = "attention_merge out/out_b " + dtypes({to, tb});
      EXPECT_TRUE(close_in(to, merged, ref_merged, m + " out"));
      EXPECT_TRUE(fp32_close(lse, ref_lse, m + " lse (fp32)"));
      // delta reads dout and out in their dtypes (the reference: fp32 tensors of the same values)
      FVec d_lse, d_delta;
      {
        Dev dev(*be);
        float* d = dev.poisoned_f32(n_stat);
        be->attention_block_delta(d, dev.put(in.dout, kF32), dev.put(merged, kF32), B, S, C, NH);
        d_delta = dev.get(d, n_stat);
      }
      EXPECT_TRUE(fp32_close(delta, d_delta, "attention_block_delta dout/out " + dtypes({to, to}) + " (fp32)"));
    }
  }
}

TEST_F(Bf16Ops, AttentionBlockBackwardWithEachAccumulatorDtype) {
  std::mt19937 rng(15);
  const CpInputs in = cp_inputs(rng);
  const FVec kv0 = block0_rows(in.qkv);
  const std::size_t n_out = std::size_t(B) * S * C, n_stat = std::size_t(B) * NH * S;
  // lse and delta of the whole attention (fp32 statistics, the same for every run)
  FVec lse, delta;
  {
    Dev dev(*be);
    TensorPtr out = dev.poisoned(n_out, kF32), out_b = dev.poisoned(n_out, kF32);
    float* l = dev.poisoned_f32(n_stat);
    float* lb = dev.poisoned_f32(n_stat);
    float* d = dev.poisoned_f32(n_stat);
    TensorPtr q = dev.put(in.qkv, kF32), k0 = dev.put(kv0, kF32), k1 = dev.put(in.kv1, kF32);
    int32_t* pq = dev.put_ints(in.pos_q);
    be->attention_block_forward(out, l, q, k0 + C, k0 + 2 * C, 3 * C, 3 * C, pq, dev.put_ints(in.pos_k0), B, S,
                                CpInputs::Sk0, C, NH);
    be->attention_block_forward(out_b, lb, q, k1, k1 + C, 3 * C, 2 * C, pq, dev.put_ints(in.pos_k1), B, S,
                                CpInputs::Sk1, C, NH);
    be->attention_merge(out, l, out_b, lb, B, S, C, NH);
    be->attention_block_delta(d, dev.put(in.dout, kF32), out, B, S, C, NH);
    lse = dev.get(l, n_stat);
    delta = dev.get(d, n_stat);
  }
  // the gradients accumulate onto these
  const FVec dq0 = rand_bf16(rng, in.qkv.size(), -0.1f, 0.1f), dkv0_0 = rand_bf16(rng, kv0.size(), -0.1f, 0.1f),
             dkv1_0 = rand_bf16(rng, in.kv1.size(), -0.1f, 0.1f);
  struct Grads {
    FVec dq, dkv0, dkv1;
  };
  // ti: q, k, v and dout; tq: dq; tkv: dk and dv
  auto run = [&](DType ti, DType tq, DType tkv) {
    Dev dev(*be);
    TensorPtr q = dev.put(in.qkv, ti), k0 = dev.put(kv0, ti), k1 = dev.put(in.kv1, ti), dout = dev.put(in.dout, ti);
    TensorPtr dq = dev.put(dq0, tq), dkv0 = dev.put(dkv0_0, tkv), dkv1 = dev.put(dkv1_0, tkv);
    float* l = dev.put_f32(lse);
    float* d = dev.put_f32(delta);
    int32_t* pq = dev.put_ints(in.pos_q);
    be->attention_block_backward(dq, dkv0 + C, dkv0 + 2 * C, dout, l, d, q, k0 + C, k0 + 2 * C, 3 * C, 3 * C, pq,
                                 dev.put_ints(in.pos_k0), B, S, CpInputs::Sk0, C, NH);
    be->attention_block_backward(dq, dkv1, dkv1 + C, dout, l, d, q, k1, k1 + C, 3 * C, 2 * C, pq,
                                 dev.put_ints(in.pos_k1), B, S, CpInputs::Sk1, C, NH);
    return Grads{dev.get(dq, dq0.size()), dev.get(dkv0, dkv0_0.size()), dev.get(dkv1, dkv1_0.size())};
  };
  // only the K and V columns of block 0's buffer and the Q columns of dq are gradients; the rest must stay
  auto columns = [](const FVec& v, int stride, int from, int to) {
    FVec out;
    for (std::size_t r = 0; r < v.size() / stride; ++r)
      for (int c = from; c < to; ++c) out.push_back(v[r * stride + c]);
    return out;
  };
  const Grads ref = run(kF32, kF32, kF32);
  for (auto [ti, tq, tkv] : {std::tuple{kBf16, kF32, kF32}, std::tuple{kBf16, kBf16, kBf16},
                             std::tuple{kBf16, kF32, kBf16}, std::tuple{kF32, kBf16, kBf16}}) {
    const std::string what = "attention_block_backward in/dq/dkv " + dtypes({ti, tq, tkv});
    SCOPED_TRACE(what);
    const Grads got = run(ti, tq, tkv);
    EXPECT_TRUE(accumulated_close(tq, columns(dq0, 3 * C, 0, C), columns(got.dq, 3 * C, 0, C),
                                  columns(ref.dq, 3 * C, 0, C), what + " dq"));
    EXPECT_TRUE(accumulated_close(tkv, columns(dkv0_0, 3 * C, C, 3 * C), columns(got.dkv0, 3 * C, C, 3 * C),
                                  columns(ref.dkv0, 3 * C, C, 3 * C), what + " dk, dv (block 0)"));
    EXPECT_TRUE(accumulated_close(tkv, dkv1_0, got.dkv1, ref.dkv1, what + " dk, dv (block 1)"));
    // untouched: dq's K and V columns, block 0's Q columns
    EXPECT_EQ(columns(got.dq, 3 * C, C, 3 * C), as_dtype(columns(dq0, 3 * C, C, 3 * C), tq));
    EXPECT_EQ(columns(got.dkv0, 3 * C, 0, C), as_dtype(columns(dkv0_0, 3 * C, 0, C), tkv));
  }
}

TEST_F(Bf16Ops, Copy2d) {
  std::mt19937 rng(16);
  const std::size_t rows = 23, cols = 61, src_stride = 3 * 72, dst_stride = 67;
  const FVec src = rand_bf16(rng, rows * src_stride);
  for (DType t : {kBf16, kF32}) {
    Dev dev(*be);
    const FVec dst0(rows * dst_stride, 7.0f);
    TensorPtr dst = dev.put(dst0, t);
    be->copy_2d(dst + 5, dst_stride, dev.put(src, t) + 11, src_stride, rows, cols);
    FVec expect = dst0;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < cols; ++c) expect[5 + r * dst_stride + c] = src[11 + r * src_stride + c];
    const FVec got = dev.get(dst, dst0.size());
    EXPECT_EQ(got, expect) << pb::dtype_name(t);
    EXPECT_TRUE(exact_rounding(got, expect, std::string("copy_2d (") + pb::dtype_name(t) + ")"));
  }
}

// =================================================================================================
// Mixture of experts
// =================================================================================================

TEST_F(Bf16Ops, MoeRouterAuxLossDispatchCombine) {
  std::mt19937 rng(17);
  const int k = 2, h = 37;
  for (int E : {3, 5}) {
    SCOPED_TRACE("E = " + std::to_string(E));
    const std::string e = " (E " + std::to_string(E) + ")";
    const int cap = (k * N + E - 1) / E - 2;  // some assignments dropped
    const FVec logits = rand_bf16(rng, std::size_t(N) * E, -2.0f, 2.0f), dgate = rand_bf16(rng, std::size_t(N) * k);
    const FVec inp = rand_bf16(rng, std::size_t(N) * h), dbuf = rand_bf16(rng, std::size_t(E) * cap * h),
               dout = rand_bf16(rng, std::size_t(N) * h), dlogits0 = rand_bf16(rng, std::size_t(N) * E);
    struct Result {
      IVec expert, slot, counts;
      FVec gate, probs, dlogits_router, dlogits_aux, buf, dinp, out, dbuf, dgate_out;
      double aux;
    };
    auto run = [&](DType t) {
      Dev dev(*be);
      Result r;
      const std::size_t nk = std::size_t(N) * k;
      int32_t* ex = dev.put_ints(IVec(nk, -7));
      float* gate = dev.poisoned_f32(nk);
      float* probs = dev.poisoned_f32(std::size_t(N) * E);
      be->moe_router_forward(ex, gate, probs, dev.put(logits, t), N, E, k);
      TensorPtr dl = dev.poisoned(std::size_t(N) * E, t);
      be->moe_router_backward(dl, dev.put_f32(dgate), gate, ex, N, E, k);
      r.dlogits_router = dev.get(dl, std::size_t(N) * E);
      int32_t* slot = dev.put_ints(IVec(nk, -7));
      int32_t* counts = dev.put_ints(IVec(2 * E, -7));
      be->moe_assign(slot, counts, ex, N, E, k, cap);
      TensorPtr dla = dev.put(dlogits0, t);
      double* aux = dev.put_double(0.0);
      be->moe_aux_loss(dla, aux, probs, counts, N, E, k, 0.5f, 2.0f);
      r.dlogits_aux = dev.get(dla, std::size_t(N) * E);
      r.aux = dev.get_double(aux);
      const std::size_t nbuf = std::size_t(E) * cap * h;
      TensorPtr buf = dev.poisoned(nbuf, t), dinp = dev.poisoned(std::size_t(N) * h, t),
                out = dev.poisoned(std::size_t(N) * h, t), dbuf_out = dev.poisoned(nbuf, t);
      be->moe_dispatch(buf, dev.put(inp, t), ex, slot, N, E, k, cap, h);
      be->moe_dispatch_backward(dinp, dev.put(dbuf, t), ex, slot, N, E, k, cap, h);
      be->moe_combine(out, buf, gate, ex, slot, N, E, k, cap, h);
      float* dg = dev.poisoned_f32(nk);
      be->moe_combine_backward(dbuf_out, dg, dev.put(dout, t), buf, gate, ex, slot, N, E, k, cap, h);
      r.expert = dev.get_ints(ex, nk);
      r.slot = dev.get_ints(slot, nk);
      r.counts = dev.get_ints(counts, 2 * E);
      r.gate = dev.get(gate, nk);
      r.probs = dev.get(probs, std::size_t(N) * E);
      r.buf = dev.get(buf, nbuf);
      r.dinp = dev.get(dinp, std::size_t(N) * h);
      r.out = dev.get(out, std::size_t(N) * h);
      r.dbuf = dev.get(dbuf_out, nbuf);
      r.dgate_out = dev.get(dg, nk);
      return r;
    };
    const Result ref = run(kF32), got = run(kBf16);
    ASSERT_EQ(got.expert, ref.expert);
    ASSERT_EQ(got.slot, ref.slot);
    ASSERT_EQ(got.counts, ref.counts);
    ASSERT_NE(std::count(got.slot.begin(), got.slot.end(), -1), 0) << "the test means some assignments to be dropped";
    EXPECT_TRUE(fp32_close(got.gate, ref.gate, "moe_router_forward gate (fp32)" + e));
    EXPECT_TRUE(fp32_close(got.probs, ref.probs, "moe_router_forward probs (fp32)" + e));
    EXPECT_TRUE(bf16_close(got.dlogits_router, ref.dlogits_router, "moe_router_backward dlogits" + e));
    EXPECT_TRUE(bf16_close(got.dlogits_aux, ref.dlogits_aux, "moe_aux_loss dlogits (accumulated)" + e));
    report("moe_aux_loss aux_sum" + e, "rel err", std::fabs(got.aux - ref.aux) / std::fabs(ref.aux));
    EXPECT_NEAR(got.aux, ref.aux, kFp32Tol * std::fabs(ref.aux));
    EXPECT_TRUE(exact_rounding(got.buf, ref.buf, "moe_dispatch buf" + e));
    EXPECT_TRUE(exact_rounding(got.dinp, ref.dinp, "moe_dispatch_backward dinp" + e));
    EXPECT_TRUE(exact_rounding(got.out, ref.out, "moe_combine out" + e));
    EXPECT_TRUE(exact_rounding(got.dbuf, ref.dbuf, "moe_combine_backward dbuf" + e));
    EXPECT_TRUE(fp32_close(got.dgate_out, ref.dgate_out, "moe_combine_backward dgate (fp32)" + e));
  }
}

// =================================================================================================
// Threads: the bf16 paths (their fp32 scratch rows and per-thread buffers) give the same bits for any
// thread count, as the fp32 ones do (the matrix products within an ulp: a library's split of its sums)
// =================================================================================================

TEST(Bf16OpsThreads, OneAndThreeThreadsAgreeBitwise) {
  std::mt19937 rng(18);
  const FVec qkv = rand_bf16(rng, std::size_t(B) * S * 3 * C, -2.0f, 2.0f),
             dout = rand_bf16(rng, std::size_t(B) * S * C), w = rand_bf16(rng, C, 0.5f, 1.5f),
             tok0 = rand_bf16(rng, std::size_t(V) * C);
  const IVec tokens = embedding_tokens(rng);
  auto run = [&](int threads) {
    auto be = pb::make_cpu_backend(threads);
    std::vector<FVec> outs;
    Dev dev(*be);
    const std::size_t n = std::size_t(B) * S * C;
    TensorPtr d_qkv = dev.put(qkv, kBf16), out = dev.poisoned(n, kBf16), dq = dev.poisoned(qkv.size(), kBf16);
    float* saved = dev.poisoned_f32(be->attention_saved_floats(B, S, NH));
    be->attention_forward(out, saved, d_qkv, B, S, C, NH);
    be->attention_backward(dq, dev.poisoned_f32(be->attention_scratch_floats(B, S, NH)), dev.put(dout, kBf16), out,
                           d_qkv, saved, B, S, C, NH);
    outs.push_back(dev.get(out, n));
    outs.push_back(dev.get(dq, qkv.size()));
    // LayerNorm over the (B·S, C) rows of dout, its backward into bf16 gradients
    TensorPtr ln = dev.poisoned(n, kBf16), dinp = dev.put(dout, kBf16), dw = dev.put(w, kBf16), db = dev.put(w, kBf16);
    float* mean = dev.poisoned_f32(B * S);
    float* rstd = dev.poisoned_f32(B * S);
    be->layernorm_forward(ln, mean, rstd, dev.put(dout, kBf16), dev.put(w, kBf16), dev.put(w, kBf16), B * S, C);
    be->layernorm_backward(dinp, dw, db, out, dev.put(dout, kBf16), dev.put(w, kBf16), mean, rstd, B * S, C);
    outs.push_back(dev.get(ln, n));
    outs.push_back(dev.get(dinp, n));
    outs.push_back(dev.get(dw, C));
    outs.push_back(dev.get(db, C));
    // embedding backward into bf16 tables, matmul backward into a bf16 weight gradient
    TensorPtr dtok = dev.put(tok0, kBf16), dpos = dev.put(FVec(std::size_t(S) * C, 0.25f), kBf16);
    be->embedding_backward(dtok, dpos, out, dev.put_ints(tokens), B, S, C);
    outs.push_back(dev.get(dtok, tok0.size()));
    outs.push_back(dev.get(dpos, std::size_t(S) * C));
    TensorPtr dw2 = dev.put(FVec(std::size_t(C) * C, 0.5f), kBf16), dx = dev.poisoned(n, kBf16);
    be->matmul_backward(dx, dw2, nullptr, out, dev.put(dout, kBf16), dq, B * S, C, C);
    outs.push_back(dev.get(dx, n));
    outs.push_back(dev.get(dw2, std::size_t(C) * C));
    return outs;
  };
  const auto one = run(1), three = run(3);
  ASSERT_EQ(one.size(), three.size());
  for (std::size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(guards(one[i], one[i], "output " + std::to_string(i)));
    if (i + 2 >= one.size()) {  // the products: the library may split its sums by thread count (1 ulp)
      EXPECT_LE(max_ulps(three[i], one[i]), 1) << "output " << i;
    } else {
      EXPECT_EQ(std::memcmp(one[i].data(), three[i].data(), one[i].size() * sizeof(float)), 0) << "output " << i;
    }
  }
}

// =================================================================================================
// What the CPU backend does not run
// =================================================================================================

TEST_F(Bf16Ops, UnsupportedCombinationsThrowNamingTheOp) {
  Dev dev(*be);
  TensorPtr f = dev.put(FVec(std::size_t(B) * S * 3 * C, 0.5f), kF32);
  TensorPtr h = dev.put(FVec(std::size_t(B) * S * 3 * C, 0.5f), kBf16);
  float* stats = dev.put_f32(FVec(std::size_t(B) * NH * S * S, 0.0f));
  int32_t* ints = dev.put_ints(IVec(std::size_t(B) * S * 2, 0));
  const std::vector<std::pair<std::string, std::function<void()>>> calls = {
      {"matmul_forward", [&] { be->matmul_forward(h, f, f, nullptr, N, C, OC); }},
      {"matmul_forward", [&] { be->matmul_forward(h, h, h, f, N, C, OC); }},
      {"matmul_backward", [&] { be->matmul_backward(h, f, f, f, f, f, N, C, OC); }},
      {"layernorm_forward", [&] { be->layernorm_forward(h, stats, stats, h, f, h, N, C); }},
      {"layernorm_backward", [&] { be->layernorm_backward(f, f, f, h, f, f, stats, stats, N, C); }},
      {"attention_forward", [&] { be->attention_forward(f, stats, h, B, S, C, NH); }},
      {"attention_backward", [&] { be->attention_backward(h, stats, f, h, h, stats, B, S, C, NH); }},
      {"gelu_forward", [&] { be->gelu_forward(h, f, 10); }},
      {"rmsnorm_forward", [&] { be->rmsnorm_forward(h, stats, f, h, N, C); }},
      {"rmsnorm_backward", [&] { be->rmsnorm_backward(f, f, h, f, f, stats, N, C); }},
      {"swiglu_forward", [&] { be->swiglu_forward(h, f, h, 10); }},
      {"swiglu_backward", [&] { be->swiglu_backward(h, h, f, h, h, 10); }},
      {"gelu_backward", [&] { be->gelu_backward(h, h, f, 10); }},
      {"embedding_forward", [&] { be->embedding_forward(h, ints, f, nullptr, 1, 1, C); }},
      {"copy_2d", [&] { be->copy_2d(h, C, f, C, 2, C); }},
      {"moe_dispatch", [&] { be->moe_dispatch(h, f, ints, ints, 1, 1, 1, 1, 4); }},
      {"moe_dispatch_backward", [&] { be->moe_dispatch_backward(h, f, ints, ints, 1, 1, 1, 1, 4); }},
      {"moe_combine", [&] { be->moe_combine(f, h, stats, ints, ints, 1, 1, 1, 1, 4); }},
      {"moe_combine_backward", [&] { be->moe_combine_backward(h, stats, h, f, stats, ints, ints, 1, 1, 1, 1, 4); }},
  };
  for (const auto& [op, call] : calls) {
    try {
      call();
      ADD_FAILURE() << op << ": a mix of dtypes did not throw";
    } catch (const std::invalid_argument& err) {
      const std::string what = err.what();
      EXPECT_NE(what.find(op), std::string::npos) << what;
      EXPECT_NE(what.find("bf16"), std::string::npos) << what;
      EXPECT_NE(what.find("fp32"), std::string::npos) << what;
    }
  }
  // the tensors of a rejected call are left as they were (checked before any write)
  const FVec after = dev.get(h, 16);
  for (float v : after) EXPECT_EQ(v, 0.5f);
}

}  // namespace
