// Unit tests of the CPU backend (pb::make_cpu_backend) against independent float64 references.
//
// What is tested: every op of pb::Backend (kernels/backend.h), forward and backward, with awkward
// sizes (N = 2·17 rows, C = 72, OC = 40, 3 heads of dim 24, S = 17, V = 67) and tiny ones (S = 1),
// random inputs from fixed std::mt19937 seeds. All backend memory goes through alloc / upload /
// download; outputs that an op must write are filled with NaN first ("poison"), so an element that
// is not written fails the comparison.
//
// Tolerances (relative error = ||got − ref||₂ / ||ref||₂, with ||ref|| > 0, got finite and not all 0):
//   forward ops ........................ ≤ 1e-5 against a double reference computed from the same
//                                         fp32 inputs (sum_squares: ≤ 1e-6, it accumulates in double)
//   backward ops ....................... ≤ 1e-4 against central finite differences (h = 1e-6) of the
//                                         double reference forward of L = <dout, f(inputs)>, for every
//                                         input and parameter element, and ≤ 1e-4 against an
//                                         analytic double gradient where one is derived here (which
//                                         itself must match the finite differences to 1e-7)
//   accumulate semantics ............... gradients that accumulate are pre-filled with known values,
//                                         the test compares (after − before) to the reference
//   cross-entropy ...................... loss increment and dlogits ≤ 1e-5 vs double, dlogits ≤ 1e-4 vs
//                                         finite differences; also rows shifted by ±50/±100 and a
//                                         target logit 120 below the row maximum (CE must stay finite)
//   AdamW .............................. ≤ 1e-5 on params, m, v and on the update p_new − p_old
//   threads ............................ threads = 1 vs 2 agree to 1e-6; the same call twice on the
//                                         same backend is bitwise identical
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"

namespace {

using pb::Backend;
using pb::MemCategory;
using Vec = std::vector<double>;
using FVec = std::vector<float>;

constexpr double kFwdTol = 1e-5;    // forward vs double reference
constexpr double kGradTol = 1e-4;   // backward vs finite differences / analytic double gradient
constexpr double kRefSelfTol = 1e-7;  // analytic double gradient vs finite differences
constexpr double kFdStep = 1e-6;
const float kPoison = std::numeric_limits<float>::quiet_NaN();
constexpr double kPi = 3.141592653589793238462643383279502884;

// ---- host helpers ------------------------------------------------------------------------------

FVec rand_floats(std::mt19937& rng, std::size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  FVec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<int32_t> rand_ints(std::mt19937& rng, std::size_t n, int32_t upper) {
  std::uniform_int_distribution<int32_t> dist(0, upper - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

Vec to_double(const FVec& v) { return Vec(v.begin(), v.end()); }

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// after − before, in double (the part an accumulating op added).
Vec delta(const FVec& after, const FVec& before) {
  Vec d(after.size());
  for (std::size_t i = 0; i < after.size(); ++i) d[i] = double(after[i]) - double(before[i]);
  return d;
}

// Relative L2 error with the guards against trivial passes.
template <typename T>
::testing::AssertionResult close(const std::vector<T>& got, const Vec& ref, double tol,
                                 const std::string& what) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << ref.size();
  }
  double num = 0, den = 0, worst = -1;
  std::size_t worst_i = 0;
  bool any_nonzero = false;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!std::isfinite(g)) {
      return ::testing::AssertionFailure()
             << what << ": element " << i << " is " << g << " (reference " << ref[i]
             << "): not written or not finite";
    }
    if (g != 0) any_nonzero = true;
    const double e = g - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
    if (std::fabs(e) > worst) {
      worst = std::fabs(e);
      worst_i = i;
    }
  }
  if (!(den > 0)) return ::testing::AssertionFailure() << what << ": reference is all zeros";
  if (!any_nonzero) return ::testing::AssertionFailure() << what << ": output is all zeros";
  const double rel = std::sqrt(num / den);
  if (rel <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": relative error " << rel << " > " << tol << "; worst element " << worst_i
         << ": got " << static_cast<double>(got[worst_i]) << ", expected " << ref[worst_i];
}

// Central finite differences of the scalar L() with respect to every element of x (x is perturbed
// in place and restored; L reads it through its captures).
Vec numeric_grad(Vec& x, const std::function<double()>& L, double h = kFdStep) {
  Vec g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double lp = L();
    x[i] = x0 - h;
    const double lm = L();
    x[i] = x0;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

// ---- device helper: owns every allocation, frees them before the backend goes ------------------

struct Dev {
  Backend& be;
  std::vector<void*> owned;

  explicit Dev(Backend& backend) : be(backend) {}
  ~Dev() {
    for (void* p : owned) be.free(p);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;

  void* raw(std::size_t bytes, MemCategory c) {
    void* p = be.alloc(std::max<std::size_t>(bytes, 1), c);
    EXPECT_NE(p, nullptr);
    owned.push_back(p);
    return p;
  }
  float* put(const FVec& host, MemCategory c = MemCategory::activations) {
    auto* p = static_cast<float*>(raw(host.size() * sizeof(float), c));
    if (!host.empty()) be.upload(p, host.data(), host.size() * sizeof(float));
    return p;
  }
  float* poisoned(std::size_t n, MemCategory c = MemCategory::activations) {
    return put(FVec(n, kPoison), c);
  }
  int32_t* put_ints(const std::vector<int32_t>& host) {
    auto* p = static_cast<int32_t*>(raw(host.size() * sizeof(int32_t), MemCategory::activations));
    if (!host.empty()) be.upload(p, host.data(), host.size() * sizeof(int32_t));
    return p;
  }
  double* put_double(double value) {
    auto* p = static_cast<double*>(raw(sizeof(double), MemCategory::activations));
    be.upload(p, &value, sizeof(double));
    return p;
  }
  FVec get(const float* p, std::size_t n) {
    be.synchronize();
    FVec host(n);
    if (n) be.download(host.data(), p, n * sizeof(float));
    return host;
  }
  double get_double(const double* p) {
    be.synchronize();
    double v = 0;
    be.download(&v, p, sizeof(double));
    return v;
  }
};

// ---- float64 references (plain loops, written from backend.h / SPEC section 2) -----------------

// out (N, OC) = inp (N, C) · w (C, OC) + b (OC); b may be empty.
Vec ref_matmul(const Vec& inp, const Vec& w, const Vec& b, int N, int C, int OC) {
  Vec out(std::size_t(N) * OC);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int c = 0; c < C; ++c) s += inp[std::size_t(n) * C + c] * w[std::size_t(c) * OC + o];
      out[std::size_t(n) * OC + o] = s;
    }
  return out;
}

// LayerNorm over C with biased variance and eps 1e-5; optionally returns mean and rstd per row.
Vec ref_layernorm(const Vec& inp, const Vec& w, const Vec& b, int N, int C, Vec* mean = nullptr,
                  Vec* rstd = nullptr) {
  Vec out(std::size_t(N) * C);
  if (mean) mean->assign(N, 0);
  if (rstd) rstd->assign(N, 0);
  for (int n = 0; n < N; ++n) {
    const double* x = &inp[std::size_t(n) * C];
    double m = 0;
    for (int c = 0; c < C; ++c) m += x[c];
    m /= C;
    double var = 0;
    for (int c = 0; c < C; ++c) var += (x[c] - m) * (x[c] - m);
    var /= C;
    const double rs = 1.0 / std::sqrt(var + 1e-5);
    for (int c = 0; c < C; ++c) out[std::size_t(n) * C + c] = (x[c] - m) * rs * w[c] + b[c];
    if (mean) (*mean)[n] = m;
    if (rstd) (*rstd)[n] = rs;
  }
  return out;
}

// Analytic LayerNorm gradients (overwriting), used next to the finite differences.
void ref_layernorm_backward(Vec& dinp, Vec& dw, Vec& db, const Vec& dout, const Vec& inp,
                            const Vec& w, int N, int C) {
  Vec mean, rstd;
  ref_layernorm(inp, w, Vec(C, 0.0), N, C, &mean, &rstd);
  dinp.assign(std::size_t(N) * C, 0);
  dw.assign(C, 0);
  db.assign(C, 0);
  for (int n = 0; n < N; ++n) {
    const std::size_t row = std::size_t(n) * C;
    double mean_dnorm = 0, mean_dnorm_norm = 0;
    for (int c = 0; c < C; ++c) {
      const double norm = (inp[row + c] - mean[n]) * rstd[n];
      const double dnorm = dout[row + c] * w[c];
      mean_dnorm += dnorm;
      mean_dnorm_norm += dnorm * norm;
      dw[c] += dout[row + c] * norm;
      db[c] += dout[row + c];
    }
    mean_dnorm /= C;
    mean_dnorm_norm /= C;
    for (int c = 0; c < C; ++c) {
      const double norm = (inp[row + c] - mean[n]) * rstd[n];
      const double dnorm = dout[row + c] * w[c];
      dinp[row + c] = rstd[n] * (dnorm - mean_dnorm - norm * mean_dnorm_norm);
    }
  }
}

// Causal multi-head attention; qkv (B, S, 3C) = [Q | K | V], head j owns columns j·d..j·d+d−1.
Vec ref_attention(const Vec& qkv, int B, int S, int C, int NH) {
  const int d = C / NH;
  const double sc = 1.0 / std::sqrt(static_cast<double>(d));
  Vec out(std::size_t(B) * S * C, 0.0);
  Vec p(S);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < S; ++t) {
        const double* q = &qkv[(std::size_t(b) * S + t) * 3 * C + std::size_t(h) * d];
        double mx = -std::numeric_limits<double>::infinity();
        for (int s = 0; s <= t; ++s) {
          const double* k = &qkv[(std::size_t(b) * S + s) * 3 * C + C + std::size_t(h) * d];
          double a = 0;
          for (int i = 0; i < d; ++i) a += q[i] * k[i];
          p[s] = a * sc;
          mx = std::max(mx, p[s]);
        }
        double sum = 0;
        for (int s = 0; s <= t; ++s) sum += (p[s] = std::exp(p[s] - mx));
        double* o = &out[(std::size_t(b) * S + t) * C + std::size_t(h) * d];
        for (int s = 0; s <= t; ++s) {
          const double* v = &qkv[(std::size_t(b) * S + s) * 3 * C + 2 * C + std::size_t(h) * d];
          for (int i = 0; i < d; ++i) o[i] += p[s] / sum * v[i];
        }
      }
  return out;
}

double ref_gelu(double x) {
  const double k = std::sqrt(2.0 / kPi);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
double ref_gelu_grad(double x) {
  const double k = std::sqrt(2.0 / kPi);
  const double t = std::tanh(k * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

Vec ref_embedding(const std::vector<int32_t>& tokens, const Vec& tok, const Vec& pos, int B, int S,
                  int C) {
  Vec out(std::size_t(B) * S * C);
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < S; ++s)
      for (int c = 0; c < C; ++c)
        out[(std::size_t(b) * S + s) * C + c] =
            tok[std::size_t(tokens[std::size_t(b) * S + s]) * C + c] + pos[std::size_t(s) * C + c];
  return out;
}

// Σ_rows CE(logits_row, target), computed stably.
double ref_ce_sum(const Vec& logits, const std::vector<int32_t>& targets, int N, int V) {
  double total = 0;
  for (int n = 0; n < N; ++n) {
    const double* x = &logits[std::size_t(n) * V];
    const double mx = *std::max_element(x, x + V);
    double s = 0;
    for (int i = 0; i < V; ++i) s += std::exp(x[i] - mx);
    total += mx + std::log(s) - x[targets[n]];
  }
  return total;
}

Vec ref_ce_grad(const Vec& logits, const std::vector<int32_t>& targets, int N, int V, double scale) {
  Vec g(logits.size());
  for (int n = 0; n < N; ++n) {
    const double* x = &logits[std::size_t(n) * V];
    const double mx = *std::max_element(x, x + V);
    double s = 0;
    for (int i = 0; i < V; ++i) s += std::exp(x[i] - mx);
    for (int i = 0; i < V; ++i)
      g[std::size_t(n) * V + i] = scale * (std::exp(x[i] - mx) / s - (i == targets[n] ? 1.0 : 0.0));
  }
  return g;
}

// torch.optim.AdamW as SPEC 2.3 writes it, in double.
void ref_adamw(Vec& p, const Vec& g_in, Vec& m, Vec& v, double lr, double b1, double b2, double eps,
               double wd, int t, double grad_scale) {
  const double bc1 = 1.0 - std::pow(b1, t), bc2 = 1.0 - std::pow(b2, t);
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double g = g_in[i] * grad_scale;
    p[i] -= lr * wd * p[i];
    m[i] = b1 * m[i] + (1 - b1) * g;
    v[i] = b2 * v[i] + (1 - b2) * g * g;
    p[i] -= lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
  }
}

// ---- fixture -----------------------------------------------------------------------------------

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = pb::make_cpu_backend(2);  // declared first: destroyed last
  Dev dev{*be};
};

struct MatmulShape { int N, C, OC; };
const MatmulShape kMatmulShapes[] = {{2 * 17, 72, 40}, {1, 8, 3}, {17, 1, 5}, {3, 5, 1}};

struct AttnShape { int B, S, C, NH; };
const AttnShape kAttnShapes[] = {{2, 17, 72, 3}, {1, 1, 8, 2}, {3, 2, 6, 3}, {2, 5, 15, 5}};

std::string shape_str(const char* fmt, int a, int b, int c, int d = 0) {
  char buf[128];
  std::snprintf(buf, sizeof buf, fmt, a, b, c, d);
  return buf;
}

// =================================================================================================
// Memory, transfers and the tracker
// =================================================================================================

TEST_F(CpuOps, NameUploadDownloadCopyZero) {
  EXPECT_EQ(be->name(), "cpu");
  EXPECT_FALSE(be->device_name().empty());

  std::mt19937 rng(1);
  const FVec host = rand_floats(rng, 1031);
  float* a = dev.put(host);
  EXPECT_EQ(dev.get(a, host.size()), host);  // round trip

  float* b = dev.poisoned(host.size());
  be->copy(b, a, host.size() * sizeof(float));
  EXPECT_EQ(dev.get(b, host.size()), host);

  // zero a middle range only: the bytes around it stay.
  be->zero(b + 100, 200 * sizeof(float));
  const FVec z = dev.get(b, host.size());
  for (std::size_t i = 0; i < host.size(); ++i) {
    if (i >= 100 && i < 300) {
      ASSERT_EQ(z[i], 0.0f) << i;
    } else {
      ASSERT_EQ(z[i], host[i]) << i;
    }
  }
  be->synchronize();
}

TEST_F(CpuOps, MemoryTrackerCountsAllocations) {
  pb::MemoryTracker& tr = be->tracker();
  const int64_t base_par = tr.current(MemCategory::parameters);
  const int64_t base_grad = tr.current(MemCategory::gradients);
  const int64_t base_act = tr.current(MemCategory::activations);
  const int64_t base_ws = tr.current(MemCategory::workspace);
  const int64_t base_total = tr.current_total();
  const pb::MemorySnapshot snap0 = tr.snapshot();

  void* A = be->alloc(4096, MemCategory::parameters);
  EXPECT_EQ(tr.current(MemCategory::parameters), base_par + 4096);
  EXPECT_EQ(tr.current_total(), base_total + 4096);
  void* Bp = be->alloc(8192, MemCategory::gradients);  // total now base + 12288 (the peak)
  EXPECT_EQ(tr.current(MemCategory::gradients), base_grad + 8192);
  EXPECT_EQ(tr.current_total(), base_total + 12288);
  be->free(A);
  EXPECT_EQ(tr.current(MemCategory::parameters), base_par);
  void* Cp = be->alloc_floats(1024, MemCategory::activations);  // 4096 bytes; total base + 12288
  EXPECT_EQ(tr.current(MemCategory::activations), base_act + 4096);
  be->free(Bp);
  EXPECT_EQ(tr.current(MemCategory::gradients), base_grad);
  void* D = be->alloc(4096, MemCategory::workspace);  // total base + 8192
  EXPECT_EQ(tr.current(MemCategory::workspace), base_ws + 4096);

  const pb::MemorySnapshot s = tr.snapshot();
  EXPECT_GE(s.peak[int(MemCategory::parameters)], base_par + 4096);
  EXPECT_GE(s.peak[int(MemCategory::gradients)], base_grad + 8192);
  EXPECT_GE(s.peak[int(MemCategory::activations)], base_act + 4096);
  EXPECT_GE(s.peak[int(MemCategory::workspace)], base_ws + 4096);
  // The peak of the sum, not the sum of the peaks (which would be base + 20480).
  EXPECT_EQ(s.peak_total, std::max<int64_t>(snap0.peak_total, base_total + 12288));

  be->free(Cp);
  be->free(D);
  EXPECT_EQ(tr.current_total(), base_total);
  EXPECT_EQ(tr.current(MemCategory::activations), base_act);
  EXPECT_EQ(tr.current(MemCategory::workspace), base_ws);
  EXPECT_EQ(tr.snapshot().peak_total, s.peak_total);  // frees do not lower a peak
}

// =================================================================================================
// matmul
// =================================================================================================

TEST_F(CpuOps, MatmulForward) {
  std::mt19937 rng(11);
  for (const auto& sh : kMatmulShapes) {
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(shape_str("N=%d C=%d OC=%d bias=%d", sh.N, sh.C, sh.OC, with_bias));
      const FVec inp = rand_floats(rng, std::size_t(sh.N) * sh.C);
      const FVec w = rand_floats(rng, std::size_t(sh.C) * sh.OC);
      const FVec b = rand_floats(rng, sh.OC);
      float* d_out = dev.poisoned(std::size_t(sh.N) * sh.OC);
      be->matmul_forward(d_out, dev.put(inp), dev.put(w, MemCategory::parameters),
                         with_bias ? dev.put(b, MemCategory::parameters) : nullptr, sh.N, sh.C,
                         sh.OC);
      const Vec ref = ref_matmul(to_double(inp), to_double(w), with_bias ? to_double(b) : Vec{},
                                 sh.N, sh.C, sh.OC);
      EXPECT_TRUE(close(dev.get(d_out, ref.size()), ref, kFwdTol, "out"));
    }
  }
}

TEST_F(CpuOps, MatmulBackward) {
  std::mt19937 rng(12);
  for (const auto& sh : kMatmulShapes) {
    SCOPED_TRACE(shape_str("N=%d C=%d OC=%d", sh.N, sh.C, sh.OC));
    const std::size_t nI = std::size_t(sh.N) * sh.C, nW = std::size_t(sh.C) * sh.OC,
                      nO = std::size_t(sh.N) * sh.OC;
    const FVec inp = rand_floats(rng, nI), w = rand_floats(rng, nW), b = rand_floats(rng, sh.OC);
    const FVec dout = rand_floats(rng, nO);
    const FVec pre_dw = rand_floats(rng, nW), pre_db = rand_floats(rng, sh.OC);

    // Reference gradients: finite differences of L = <dout, inp·w + b>, and the analytic ones.
    Vec I = to_double(inp), W = to_double(w), Bv = to_double(b);
    const Vec DO = to_double(dout);
    auto L = [&] { return dot(DO, ref_matmul(I, W, Bv, sh.N, sh.C, sh.OC)); };
    const Vec fd_dinp = numeric_grad(I, L), fd_dw = numeric_grad(W, L), fd_db = numeric_grad(Bv, L);
    Vec an_dinp(nI, 0), an_dw(nW, 0), an_db(sh.OC, 0);
    for (int n = 0; n < sh.N; ++n)
      for (int o = 0; o < sh.OC; ++o) {
        const double g = DO[std::size_t(n) * sh.OC + o];
        an_db[o] += g;
        for (int c = 0; c < sh.C; ++c) {
          an_dinp[std::size_t(n) * sh.C + c] += g * W[std::size_t(c) * sh.OC + o];
          an_dw[std::size_t(c) * sh.OC + o] += I[std::size_t(n) * sh.C + c] * g;
        }
      }
    ASSERT_TRUE(close(an_dinp, fd_dinp, kRefSelfTol, "reference dinp"));
    ASSERT_TRUE(close(an_dw, fd_dw, kRefSelfTol, "reference dweight"));
    ASSERT_TRUE(close(an_db, fd_db, kRefSelfTol, "reference dbias"));

    float* d_inp = dev.put(inp);
    float* d_w = dev.put(w, MemCategory::parameters);
    float* d_dout = dev.put(dout);
    float* d_dinp = dev.poisoned(nI, MemCategory::gradients);  // overwritten
    float* d_dw = dev.put(pre_dw, MemCategory::gradients);      // accumulates
    float* d_db = dev.put(pre_db, MemCategory::gradients);      // accumulates
    be->matmul_backward(d_dinp, d_dw, d_db, d_dout, d_inp, d_w, sh.N, sh.C, sh.OC);

    const FVec got_dinp = dev.get(d_dinp, nI), got_dw = dev.get(d_dw, nW),
               got_db = dev.get(d_db, sh.OC);
    EXPECT_TRUE(close(got_dinp, fd_dinp, kGradTol, "dinp vs finite differences"));
    EXPECT_TRUE(close(got_dinp, an_dinp, kGradTol, "dinp vs analytic"));
    EXPECT_TRUE(close(delta(got_dw, pre_dw), fd_dw, kGradTol, "dweight increment vs FD"));
    EXPECT_TRUE(close(delta(got_dw, pre_dw), an_dw, kGradTol, "dweight increment vs analytic"));
    EXPECT_TRUE(close(delta(got_db, pre_db), fd_db, kGradTol, "dbias increment vs FD"));
    EXPECT_TRUE(close(delta(got_db, pre_db), an_db, kGradTol, "dbias increment vs analytic"));

    // dinp and dbias may be null: dweight accumulates a second time, dbias stays.
    be->matmul_backward(nullptr, d_dw, nullptr, d_dout, d_inp, d_w, sh.N, sh.C, sh.OC);
    Vec twice(nW);
    for (std::size_t i = 0; i < nW; ++i) twice[i] = 2 * an_dw[i];
    EXPECT_TRUE(close(delta(dev.get(d_dw, nW), pre_dw), twice, kGradTol, "dweight after 2 calls"));
    EXPECT_EQ(dev.get(d_db, sh.OC), got_db);
  }
}

// =================================================================================================
// layernorm
// =================================================================================================

TEST_F(CpuOps, LayernormForward) {
  std::mt19937 rng(21);
  const int shapes[][2] = {{2 * 17, 72}, {1, 3}, {5, 1031}};
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    SCOPED_TRACE(shape_str("N=%d C=%d", N, C, 0));
    // Rows with a non-zero mean and different spreads.
    FVec inp = rand_floats(rng, std::size_t(N) * C);
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c) inp[std::size_t(n) * C + c] = 1.5f + (1 + n % 3) * inp[std::size_t(n) * C + c];
    const FVec w = rand_floats(rng, C, 0.5f, 1.5f), b = rand_floats(rng, C);
    float* d_out = dev.poisoned(std::size_t(N) * C);
    float* d_mean = dev.poisoned(N);
    float* d_rstd = dev.poisoned(N);
    be->layernorm_forward(d_out, d_mean, d_rstd, dev.put(inp), dev.put(w, MemCategory::parameters),
                          dev.put(b, MemCategory::parameters), N, C);
    Vec mean, rstd;
    const Vec ref = ref_layernorm(to_double(inp), to_double(w), to_double(b), N, C, &mean, &rstd);
    EXPECT_TRUE(close(dev.get(d_out, ref.size()), ref, kFwdTol, "out"));
    EXPECT_TRUE(close(dev.get(d_mean, N), mean, kFwdTol, "mean"));
    EXPECT_TRUE(close(dev.get(d_rstd, N), rstd, kFwdTol, "rstd"));
  }
}

TEST_F(CpuOps, LayernormBackward) {
  std::mt19937 rng(22);
  const int shapes[][2] = {{2 * 17, 72}, {1, 3}};
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    SCOPED_TRACE(shape_str("N=%d C=%d", N, C, 0));
    const std::size_t n = std::size_t(N) * C;
    FVec inp = rand_floats(rng, n);
    for (auto& x : inp) x = 0.7f + 2.0f * x;
    const FVec w = rand_floats(rng, C, 0.5f, 1.5f), b = rand_floats(rng, C);
    const FVec dout = rand_floats(rng, n);
    // All three gradients accumulate (dinp may be the residual stream's gradient).
    const FVec pre_dinp = rand_floats(rng, n), pre_dw = rand_floats(rng, C),
               pre_db = rand_floats(rng, C);

    Vec I = to_double(inp), W = to_double(w), Bv = to_double(b);
    const Vec DO = to_double(dout);
    auto L = [&] { return dot(DO, ref_layernorm(I, W, Bv, N, C)); };
    const Vec fd_dinp = numeric_grad(I, L), fd_dw = numeric_grad(W, L), fd_db = numeric_grad(Bv, L);
    Vec an_dinp, an_dw, an_db;
    ref_layernorm_backward(an_dinp, an_dw, an_db, DO, I, W, N, C);
    ASSERT_TRUE(close(an_dinp, fd_dinp, kRefSelfTol, "reference dinp"));
    ASSERT_TRUE(close(an_dw, fd_dw, kRefSelfTol, "reference dweight"));
    ASSERT_TRUE(close(an_db, fd_db, kRefSelfTol, "reference dbias"));

    // mean and rstd as the forward saves them (the double reference rounded to fp32).
    Vec mean, rstd;
    ref_layernorm(I, W, Bv, N, C, &mean, &rstd);
    const FVec fmean(mean.begin(), mean.end()), frstd(rstd.begin(), rstd.end());

    float* d_dinp = dev.put(pre_dinp, MemCategory::gradients);
    float* d_dw = dev.put(pre_dw, MemCategory::gradients);
    float* d_db = dev.put(pre_db, MemCategory::gradients);
    be->layernorm_backward(d_dinp, d_dw, d_db, dev.put(dout), dev.put(inp),
                           dev.put(w, MemCategory::parameters), dev.put(fmean), dev.put(frstd), N,
                           C);
    const Vec got_dinp = delta(dev.get(d_dinp, n), pre_dinp);
    const Vec got_dw = delta(dev.get(d_dw, C), pre_dw), got_db = delta(dev.get(d_db, C), pre_db);
    EXPECT_TRUE(close(got_dinp, fd_dinp, kGradTol, "dinp increment vs FD"));
    EXPECT_TRUE(close(got_dinp, an_dinp, kGradTol, "dinp increment vs analytic"));
    EXPECT_TRUE(close(got_dw, fd_dw, kGradTol, "dweight increment vs FD"));
    EXPECT_TRUE(close(got_dw, an_dw, kGradTol, "dweight increment vs analytic"));
    EXPECT_TRUE(close(got_db, fd_db, kGradTol, "dbias increment vs FD"));
    EXPECT_TRUE(close(got_db, an_db, kGradTol, "dbias increment vs analytic"));
  }
}

// =================================================================================================
// attention
// =================================================================================================

TEST_F(CpuOps, AttentionForward) {
  std::mt19937 rng(31);
  for (const auto& sh : kAttnShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH));
    const FVec qkv = rand_floats(rng, std::size_t(sh.B) * sh.S * 3 * sh.C, -2.0f, 2.0f);
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C;
    float* d_out = dev.poisoned(n_out);
    float* d_saved = dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH));
    be->attention_forward(d_out, d_saved, dev.put(qkv), sh.B, sh.S, sh.C, sh.NH);
    const Vec ref = ref_attention(to_double(qkv), sh.B, sh.S, sh.C, sh.NH);
    EXPECT_TRUE(close(dev.get(d_out, n_out), ref, kFwdTol, "out"));
  }
}

TEST_F(CpuOps, AttentionBackward) {
  std::mt19937 rng(32);
  for (const auto& sh : kAttnShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH));
    const std::size_t n_qkv = std::size_t(sh.B) * sh.S * 3 * sh.C;
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C;
    const FVec qkv = rand_floats(rng, n_qkv, -2.0f, 2.0f);
    const FVec dout = rand_floats(rng, n_out);

    Vec Q = to_double(qkv);
    const Vec DO = to_double(dout);
    const Vec fd = numeric_grad(Q, [&] { return dot(DO, ref_attention(Q, sh.B, sh.S, sh.C, sh.NH)); });

    float* d_qkv = dev.put(qkv);
    float* d_out = dev.poisoned(n_out);
    float* d_saved = dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH));
    be->attention_forward(d_out, d_saved, d_qkv, sh.B, sh.S, sh.C, sh.NH);
    float* d_dqkv = dev.poisoned(n_qkv, MemCategory::gradients);  // overwritten
    float* d_scratch = dev.poisoned(be->attention_scratch_floats(sh.B, sh.S, sh.NH),
                                    MemCategory::workspace);
    be->attention_backward(d_dqkv, d_scratch, dev.put(dout), d_out, d_qkv, d_saved, sh.B, sh.S,
                           sh.C, sh.NH);
    const FVec got = dev.get(d_dqkv, n_qkv);
    EXPECT_TRUE(close(got, fd, kGradTol, "dqkv vs finite differences"));
    if (sh.S == 1) {  // one key: softmax is constant, so dQ and dK are exactly zero
      for (int b = 0; b < sh.B; ++b)
        for (int c = 0; c < 2 * sh.C; ++c) EXPECT_EQ(got[std::size_t(b) * 3 * sh.C + c], 0.0f);
    }
  }
}

// =================================================================================================
// gelu, add, accumulate, scale
// =================================================================================================

TEST_F(CpuOps, GeluForward) {
  std::mt19937 rng(41);
  for (std::size_t n : {std::size_t(1031), std::size_t(1)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const FVec x = rand_floats(rng, n, -5.0f, 5.0f);
    float* d_out = dev.poisoned(n);
    be->gelu_forward(d_out, dev.put(x), n);
    Vec ref(n);
    for (std::size_t i = 0; i < n; ++i) ref[i] = ref_gelu(x[i]);
    EXPECT_TRUE(close(dev.get(d_out, n), ref, kFwdTol, "gelu"));
  }
}

TEST_F(CpuOps, GeluBackward) {
  std::mt19937 rng(42);
  const std::size_t n = 1031;
  const FVec x = rand_floats(rng, n, -5.0f, 5.0f), dout = rand_floats(rng, n);
  // L = Σ dout·gelu(x) is separable, so its finite difference per element is that of gelu.
  Vec fd(n), an(n);
  for (std::size_t i = 0; i < n; ++i) {
    fd[i] = dout[i] * (ref_gelu(x[i] + kFdStep) - ref_gelu(x[i] - kFdStep)) / (2 * kFdStep);
    an[i] = dout[i] * ref_gelu_grad(x[i]);
  }
  ASSERT_TRUE(close(an, fd, kRefSelfTol, "reference gelu'"));

  float* d_x = dev.put(x);
  float* d_dinp = dev.poisoned(n);  // overwritten
  float* d_dout = dev.put(dout);
  be->gelu_backward(d_dinp, d_x, d_dout, n);
  EXPECT_TRUE(close(dev.get(d_dinp, n), fd, kGradTol, "dinp vs FD"));
  EXPECT_TRUE(close(dev.get(d_dinp, n), an, kGradTol, "dinp vs analytic"));
  EXPECT_EQ(dev.get(d_dout, n), dout);  // dout untouched

  // dinp may alias dout.
  be->gelu_backward(d_dout, d_x, d_dout, n);
  EXPECT_TRUE(close(dev.get(d_dout, n), an, kGradTol, "in place (dinp == dout)"));
}

TEST_F(CpuOps, AddAccumulateScale) {
  std::mt19937 rng(43);
  const std::size_t n = 1031;
  const FVec a = rand_floats(rng, n), b = rand_floats(rng, n);
  Vec sum(n);
  for (std::size_t i = 0; i < n; ++i) sum[i] = double(a[i]) + double(b[i]);

  float* d_a = dev.put(a);
  float* d_b = dev.put(b);
  float* d_out = dev.poisoned(n);
  be->add(d_out, d_a, d_b, n);
  EXPECT_TRUE(close(dev.get(d_out, n), sum, kFwdTol, "add"));
  be->add(d_a, d_a, d_b, n);  // out aliases a
  EXPECT_TRUE(close(dev.get(d_a, n), sum, kFwdTol, "add, out == a"));
  be->upload(d_a, a.data(), n * sizeof(float));
  be->add(d_b, d_a, d_b, n);  // out aliases b
  EXPECT_TRUE(close(dev.get(d_b, n), sum, kFwdTol, "add, out == b"));

  // accumulate: y += x
  be->upload(d_b, b.data(), n * sizeof(float));
  be->accumulate(d_a, d_b, n);
  EXPECT_TRUE(close(dev.get(d_a, n), sum, kFwdTol, "accumulate"));
  EXPECT_EQ(dev.get(d_b, n), b);

  // scale: y *= alpha
  be->upload(d_a, a.data(), n * sizeof(float));
  be->scale(d_a, -0.37f, n);
  Vec scaled(n);
  for (std::size_t i = 0; i < n; ++i) scaled[i] = double(a[i]) * double(-0.37f);
  EXPECT_TRUE(close(dev.get(d_a, n), scaled, kFwdTol, "scale"));
}

// =================================================================================================
// embedding
// =================================================================================================

struct EmbShape { int B, S, C, V; };
const EmbShape kEmbShapes[] = {{2, 17, 72, 67}, {3, 1, 5, 4}};

std::vector<int32_t> tokens_with_repeats(std::mt19937& rng, const EmbShape& sh) {
  std::vector<int32_t> t = rand_ints(rng, std::size_t(sh.B) * sh.S, sh.V);
  // Force repeats within a sequence and across the batch, and the first and last token ids.
  t[0] = sh.V - 1;
  if (t.size() > 1) t[1] = 0;
  t[t.size() - 1] = sh.V - 1;
  if (t.size() > 5) t[5] = t[3] = t[t.size() - 2] = 7 % sh.V;
  return t;
}

TEST_F(CpuOps, EmbeddingForward) {
  std::mt19937 rng(51);
  for (const auto& sh : kEmbShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d V=%d", sh.B, sh.S, sh.C, sh.V));
    const auto tokens = tokens_with_repeats(rng, sh);
    const FVec tok = rand_floats(rng, std::size_t(sh.V) * sh.C),
               pos = rand_floats(rng, std::size_t(sh.S) * sh.C);
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C;
    float* d_out = dev.poisoned(n_out);
    be->embedding_forward(d_out, dev.put_ints(tokens), dev.put(tok, MemCategory::parameters),
                          dev.put(pos, MemCategory::parameters), sh.B, sh.S, sh.C);
    const Vec ref = ref_embedding(tokens, to_double(tok), to_double(pos), sh.B, sh.S, sh.C);
    EXPECT_TRUE(close(dev.get(d_out, n_out), ref, kFwdTol, "out"));
  }
}

TEST_F(CpuOps, EmbeddingBackward) {
  std::mt19937 rng(52);
  for (const auto& sh : kEmbShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d V=%d", sh.B, sh.S, sh.C, sh.V));
    const auto tokens = tokens_with_repeats(rng, sh);
    const std::size_t nT = std::size_t(sh.V) * sh.C, nP = std::size_t(sh.S) * sh.C,
                      nO = std::size_t(sh.B) * sh.S * sh.C;
    const FVec tok = rand_floats(rng, nT), pos = rand_floats(rng, nP), dout = rand_floats(rng, nO);
    const FVec pre_dtok = rand_floats(rng, nT), pre_dpos = rand_floats(rng, nP);

    Vec T = to_double(tok), P = to_double(pos);
    const Vec DO = to_double(dout);
    auto L = [&] { return dot(DO, ref_embedding(tokens, T, P, sh.B, sh.S, sh.C)); };
    const Vec fd_dtok = numeric_grad(T, L), fd_dpos = numeric_grad(P, L);
    Vec an_dtok(nT, 0), an_dpos(nP, 0);
    for (int b = 0; b < sh.B; ++b)
      for (int s = 0; s < sh.S; ++s)
        for (int c = 0; c < sh.C; ++c) {
          const double g = DO[(std::size_t(b) * sh.S + s) * sh.C + c];
          an_dtok[std::size_t(tokens[std::size_t(b) * sh.S + s]) * sh.C + c] += g;
          an_dpos[std::size_t(s) * sh.C + c] += g;
        }
    ASSERT_TRUE(close(an_dtok, fd_dtok, kRefSelfTol, "reference dtok"));
    ASSERT_TRUE(close(an_dpos, fd_dpos, kRefSelfTol, "reference dpos"));

    float* d_dtok = dev.put(pre_dtok, MemCategory::gradients);  // accumulates
    float* d_dpos = dev.put(pre_dpos, MemCategory::gradients);  // accumulates
    be->embedding_backward(d_dtok, d_dpos, dev.put(dout), dev.put_ints(tokens), sh.B, sh.S, sh.C);
    const FVec got_dtok = dev.get(d_dtok, nT);
    const Vec inc_dtok = delta(got_dtok, pre_dtok), inc_dpos = delta(dev.get(d_dpos, nP), pre_dpos);
    EXPECT_TRUE(close(inc_dtok, fd_dtok, kGradTol, "dtok increment vs FD"));
    EXPECT_TRUE(close(inc_dtok, an_dtok, kGradTol, "dtok increment vs analytic"));
    EXPECT_TRUE(close(inc_dpos, fd_dpos, kGradTol, "dpos increment vs FD"));
    EXPECT_TRUE(close(inc_dpos, an_dpos, kGradTol, "dpos increment vs analytic"));
    // Rows of tokens that do not occur keep their value bit for bit.
    for (int v = 0; v < sh.V; ++v) {
      if (std::find(tokens.begin(), tokens.end(), v) != tokens.end()) continue;
      for (int c = 0; c < sh.C; ++c)
        EXPECT_EQ(got_dtok[std::size_t(v) * sh.C + c], pre_dtok[std::size_t(v) * sh.C + c]);
    }
  }
}

// =================================================================================================
// cross-entropy (fused forward + backward)
// =================================================================================================

// Runs the op on logits and checks the loss increment and the dlogits.
void check_cross_entropy(Backend& be, Dev& dev, const FVec& logits,
                         const std::vector<int32_t>& targets, int N, int V, float scale,
                         bool with_fd) {
  const double initial_loss = 1.5;  // loss_sum accumulates
  float* d_logits = dev.put(logits);
  double* d_loss = dev.put_double(initial_loss);
  be.cross_entropy_forward_backward(d_logits, d_loss, dev.put_ints(targets), N, V, scale);

  Vec X = to_double(logits);
  const double ref_loss = double(scale) * ref_ce_sum(X, targets, N, V);
  const double got_loss = dev.get_double(d_loss);
  EXPECT_TRUE(std::isfinite(got_loss));
  EXPECT_NEAR(got_loss - initial_loss, ref_loss, kFwdTol * std::fabs(ref_loss))
      << "loss_sum increment";

  const Vec an = ref_ce_grad(X, targets, N, V, scale);
  const FVec got = dev.get(d_logits, logits.size());
  EXPECT_TRUE(close(got, an, kFwdTol, "dlogits vs scale·(softmax − onehot)"));
  if (with_fd) {
    const Vec fd =
        numeric_grad(X, [&] { return double(scale) * ref_ce_sum(X, targets, N, V); });
    ASSERT_TRUE(close(an, fd, kRefSelfTol, "reference dlogits"));
    EXPECT_TRUE(close(got, fd, kGradTol, "dlogits vs finite differences"));
  }
  // Each row of dlogits sums to 0 (softmax sums to 1).
  for (int n = 0; n < N; ++n) {
    double s = 0, a = 0;
    for (int i = 0; i < V; ++i) {
      s += got[std::size_t(n) * V + i];
      a += std::fabs(got[std::size_t(n) * V + i]);
    }
    EXPECT_LE(std::fabs(s), 1e-5 * (a + std::fabs(scale))) << "row " << n;
  }
}

TEST_F(CpuOps, CrossEntropyForwardBackward) {
  std::mt19937 rng(61);
  struct Case { int N, V; float scale; };
  for (const Case& cs : {Case{2 * 17, 67, 1.0f / (2 * 17)}, Case{1, 67, 0.37f}, Case{3, 2, 1.0f}}) {
    SCOPED_TRACE(shape_str("N=%d V=%d", cs.N, cs.V, 0));
    const FVec logits = rand_floats(rng, std::size_t(cs.N) * cs.V, -3.0f, 3.0f);
    const auto targets = rand_ints(rng, cs.N, cs.V);
    check_cross_entropy(*be, dev, logits, targets, cs.N, cs.V, cs.scale, /*with_fd=*/true);
  }
}

TEST_F(CpuOps, CrossEntropyLargeLogitsAreStable) {
  std::mt19937 rng(62);
  const int N = 6, V = 67;
  FVec logits = rand_floats(rng, std::size_t(N) * V, -3.0f, 3.0f);
  const auto targets = rand_ints(rng, N, V);
  auto row = [&](int n) { return logits.begin() + std::size_t(n) * V; };
  for (auto it = row(0); it != row(1); ++it) *it += 50.0f;   // whole row shifted up
  for (auto it = row(1); it != row(2); ++it) *it += 100.0f;  // exp would overflow in fp32
  for (auto it = row(2); it != row(3); ++it) *it -= 100.0f;  // exp would underflow in fp32
  logits[std::size_t(3) * V + targets[3]] = 50.0f;           // confident and right: CE ≈ 0
  logits[std::size_t(4) * V + (targets[4] + 1) % V] = 50.0f;  // confident and wrong: CE ≈ 50
  check_cross_entropy(*be, dev, logits, targets, N, V, 0.5f, /*with_fd=*/false);
}

// A confidently wrong row whose target logit is far (> 88, where exp underflows in fp32) below the
// maximum: CE = log Σ exp(z − max) − (z_target − max) ≈ 120 must stay finite.
TEST_F(CpuOps, CrossEntropyHugeLogitGapIsFinite) {
  std::mt19937 rng(63);
  const int N = 3, V = 67;
  FVec logits = rand_floats(rng, std::size_t(N) * V, -3.0f, 3.0f);
  const auto targets = rand_ints(rng, N, V);
  logits[std::size_t(1) * V + targets[1]] = -60.0f;
  logits[std::size_t(1) * V + (targets[1] + 1) % V] = 60.0f;
  check_cross_entropy(*be, dev, logits, targets, N, V, 1.0f / N, /*with_fd=*/false);
}

// =================================================================================================
// optimizer: sum_squares, AdamW
// =================================================================================================

TEST_F(CpuOps, SumSquares) {
  std::mt19937 rng(71);
  for (std::size_t n : {std::size_t(100003), std::size_t(1), std::size_t(7)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const FVec x = rand_floats(rng, n, -3.0f, 3.0f);
    double ref = 0;
    for (float v : x) ref += double(v) * double(v);
    const double got = be->sum_squares(dev.put(x), n);
    EXPECT_GT(ref, 0);
    EXPECT_NEAR(got, ref, 1e-6 * ref);
  }
}

TEST_F(CpuOps, AdamwUpdate) {
  std::mt19937 rng(72);
  const std::size_t n = 1031;
  const float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  struct Case { int t; float wd, grad_scale; };
  for (const Case& cs : {Case{1, 0.1f, 0.5f}, Case{3, 0.1f, 0.5f}, Case{3, 0.0f, 1.0f}}) {
    SCOPED_TRACE("t=" + std::to_string(cs.t) + " wd=" + std::to_string(cs.wd));
    const FVec p = rand_floats(rng, n, -0.05f, 0.05f), g = rand_floats(rng, n);
    // t = 1 starts from zero moments; later steps from a plausible state (v ≥ 0).
    FVec m(n, 0.0f), v(n, 0.0f);
    if (cs.t > 1) {
      m = rand_floats(rng, n, -0.5f, 0.5f);
      v = rand_floats(rng, n, 0.0f, 0.3f);
    }
    Vec P = to_double(p), M = to_double(m), Vv = to_double(v);
    ref_adamw(P, to_double(g), M, Vv, lr, b1, b2, eps, cs.wd, cs.t, cs.grad_scale);

    float* d_p = dev.put(p, MemCategory::parameters);
    float* d_m = dev.put(m, MemCategory::optimizer_states);
    float* d_v = dev.put(v, MemCategory::optimizer_states);
    be->adamw_update(d_p, dev.put(g, MemCategory::gradients), d_m, d_v, n, lr, b1, b2, eps, cs.wd,
                     cs.t, cs.grad_scale);
    const FVec got_p = dev.get(d_p, n);
    EXPECT_TRUE(close(got_p, P, kFwdTol, "params"));
    EXPECT_TRUE(close(dev.get(d_m, n), M, kFwdTol, "m"));
    EXPECT_TRUE(close(dev.get(d_v, n), Vv, kFwdTol, "v"));
    // The update itself (p is ~5x larger than the step, so check the step separately).
    Vec ref_step(n);
    for (std::size_t i = 0; i < n; ++i) ref_step[i] = P[i] - double(p[i]);
    EXPECT_TRUE(close(delta(got_p, p), ref_step, kFwdTol, "p_new − p_old"));
  }
}

// =================================================================================================
// threads: 1 and 2 agree; the same call twice is bitwise identical
// =================================================================================================

// Runs every op once on fixed inputs (sizes large enough for the parallel loops) and returns all
// outputs in a fixed order. Every op reads inputs uploaded from the host, not another op's output,
// so a difference between thread counts is that op's own.
std::vector<Vec> run_all_ops(Backend& be) {
  const int B = 4, S = 33, C = 96, NH = 4, V = 131, OC = 3 * C, N = B * S;
  const std::size_t nx = std::size_t(N) * C, nqkv = std::size_t(N) * OC, nw = std::size_t(C) * OC;
  std::mt19937 rng(99);
  const FVec x = rand_floats(rng, nx, -1.0f, 2.0f);
  const FVec w = rand_floats(rng, nw), bias = rand_floats(rng, OC);
  const FVec dmm = rand_floats(rng, nqkv);
  const FVec lnw = rand_floats(rng, C, 0.5f, 1.5f), lnb = rand_floats(rng, C);
  const FVec dx = rand_floats(rng, nx);
  const FVec qkv = rand_floats(rng, nqkv, -2.0f, 2.0f);
  const FVec tok = rand_floats(rng, std::size_t(V) * C), pos = rand_floats(rng, std::size_t(S) * C);
  const auto tokens = rand_ints(rng, N, 17);  // many repeats
  const FVec logits = rand_floats(rng, std::size_t(N) * V, -4.0f, 4.0f);
  const auto targets = rand_ints(rng, N, V);
  const FVec g = rand_floats(rng, nw), m0 = rand_floats(rng, nw), v0 = rand_floats(rng, nw, 0.0f, 0.2f);
  Vec mean_d, rstd_d;
  ref_layernorm(to_double(x), to_double(lnw), to_double(lnb), N, C, &mean_d, &rstd_d);
  const FVec mean(mean_d.begin(), mean_d.end()), rstd(rstd_d.begin(), rstd_d.end());

  Dev dev(be);
  std::vector<Vec> res;
  auto keep = [&](const float* p, std::size_t n) {
    const FVec h = dev.get(p, n);
    res.emplace_back(h.begin(), h.end());
  };
  float* d_x = dev.put(x);
  float* d_dx = dev.put(dx);
  float* d_qkv = dev.put(qkv);
  float* d_dmm = dev.put(dmm);

  // matmul
  float* d_w = dev.put(w);
  float* out = dev.poisoned(nqkv);
  be.matmul_forward(out, d_x, d_w, dev.put(bias), N, C, OC);
  keep(out, nqkv);
  float* dinp = dev.poisoned(nx);
  float* dw = dev.put(FVec(nw, 0.0f));
  float* db = dev.put(FVec(OC, 0.0f));
  be.matmul_backward(dinp, dw, db, d_dmm, d_x, d_w, N, C, OC);
  keep(dinp, nx);
  keep(dw, nw);
  keep(db, OC);
  // layernorm
  float* ln = dev.poisoned(nx);
  float* d_mean = dev.poisoned(N);
  float* d_rstd = dev.poisoned(N);
  float* d_lnw = dev.put(lnw);
  be.layernorm_forward(ln, d_mean, d_rstd, d_x, d_lnw, dev.put(lnb), N, C);
  keep(ln, nx);
  keep(d_mean, N);
  keep(d_rstd, N);
  float* ldx = dev.put(FVec(nx, 0.0f));
  float* ldw = dev.put(FVec(C, 0.0f));
  float* ldb = dev.put(FVec(C, 0.0f));
  be.layernorm_backward(ldx, ldw, ldb, d_dx, d_x, d_lnw, dev.put(mean), dev.put(rstd), N, C);
  keep(ldx, nx);
  keep(ldw, C);
  keep(ldb, C);
  // attention
  float* att = dev.poisoned(nx);
  float* saved = dev.poisoned(be.attention_saved_floats(B, S, NH));
  be.attention_forward(att, saved, d_qkv, B, S, C, NH);
  keep(att, nx);
  float* dqkv = dev.poisoned(nqkv);
  be.attention_backward(dqkv, dev.poisoned(be.attention_scratch_floats(B, S, NH)), d_dx, att,
                        d_qkv, saved, B, S, C, NH);
  keep(dqkv, nqkv);
  // gelu
  float* ge = dev.poisoned(nqkv);
  be.gelu_forward(ge, d_qkv, nqkv);
  keep(ge, nqkv);
  float* dge = dev.poisoned(nqkv);
  be.gelu_backward(dge, d_qkv, d_dmm, nqkv);
  keep(dge, nqkv);
  // embedding
  const int32_t* d_tokens = dev.put_ints(tokens);
  float* emb = dev.poisoned(nx);
  be.embedding_forward(emb, d_tokens, dev.put(tok), dev.put(pos), B, S, C);
  keep(emb, nx);
  float* dtok = dev.put(FVec(std::size_t(V) * C, 0.0f));
  float* dpos = dev.put(FVec(std::size_t(S) * C, 0.0f));
  be.embedding_backward(dtok, dpos, d_dx, d_tokens, B, S, C);
  keep(dtok, std::size_t(V) * C);
  keep(dpos, std::size_t(S) * C);
  // cross-entropy
  float* d_logits = dev.put(logits);
  double* loss = dev.put_double(0.0);
  be.cross_entropy_forward_backward(d_logits, loss, dev.put_ints(targets), N, V, 1.0f / N);
  keep(d_logits, std::size_t(N) * V);
  res.push_back({dev.get_double(loss)});
  // optimizer
  res.push_back({be.sum_squares(d_qkv, nqkv)});
  float* p = dev.put(w);
  float* m = dev.put(m0);
  float* v = dev.put(v0);
  be.adamw_update(p, dev.put(g), m, v, nw, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 2, 0.7f);
  keep(p, nw);
  keep(m, nw);
  keep(v, nw);
  return res;
}

const char* const kRunAllNames[] = {
    "matmul out",       "matmul dinp",    "matmul dweight", "matmul dbias",   "layernorm out",
    "layernorm mean",   "layernorm rstd", "layernorm dinp", "layernorm dweight",
    "layernorm dbias",  "attention out",  "attention dqkv", "gelu out",       "gelu dinp",
    "embedding out",    "embedding dtok", "embedding dpos", "cross-entropy dlogits",
    "cross-entropy loss_sum", "sum_squares", "adamw params", "adamw m",     "adamw v"};

TEST(CpuThreads, OneAndTwoThreadsAgreeAndRunsAreDeterministic) {
  // One backend at a time: a BLAS thread count may be process-wide.
  std::vector<Vec> one_a, one_b, two_a, two_b;
  {
    auto be = pb::make_cpu_backend(1);
    one_a = run_all_ops(*be);
    one_b = run_all_ops(*be);
  }
  {
    auto be = pb::make_cpu_backend(2);
    two_a = run_all_ops(*be);
    two_b = run_all_ops(*be);
  }
  ASSERT_EQ(one_a.size(), std::size(kRunAllNames));
  ASSERT_EQ(two_a.size(), one_a.size());
  for (std::size_t k = 0; k < one_a.size(); ++k) {
    SCOPED_TRACE("output #" + std::to_string(k) + " of run_all_ops (" + kRunAllNames[k] + ")");
    EXPECT_EQ(0, std::memcmp(one_a[k].data(), one_b[k].data(), one_a[k].size() * sizeof(double)))
        << "threads=1: two runs differ";
    EXPECT_EQ(0, std::memcmp(two_a[k].data(), two_b[k].data(), two_a[k].size() * sizeof(double)))
        << "threads=2: two runs differ";
    EXPECT_TRUE(close(two_a[k], one_a[k], 1e-6, "threads=2 vs threads=1"));
  }
}

}  // namespace
