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
//   mixture of experts ................. expert choices, slots and counts exactly (ties: the lower
//                                         index; capacities N, ceil(k·N/E), 1 and 0, where 0 drops
//                                         every assignment), dispatch bitwise, the rest as above; E = 3
//                                         and 5, k = 1..E, odd h; outputs of dropped assignments and of
//                                         empty slots exactly 0
//   context parallelism ................ attention by position over key blocks (zigzag chunks, blocks
//                                         entirely in the future (out 0, lse −inf) and in the past,
//                                         unsorted and repeated positions, Sq ≠ Sk, strides 3C and 2C and
//                                         NaN-padded ones) ≤ 1e-5 vs double; blocks merged over several
//                                         splits of the keys = attention over all keys, and = the
//                                         backend's attention_forward at positions 0..S−1; the merge's
//                                         −inf cases exactly; the block backward over 2–4 blocks (delta
//                                         from the merged out) vs finite differences of the merged output
//                                         and vs attention_backward for one full block; padding of
//                                         strided gradients and around copy_2d's rows never written
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
#include "kernels/cpu/fast_math.h"

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
constexpr int32_t kIntPoison = -123456789;
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
  // int32 outputs are poisoned with a value no op writes.
  int32_t* poisoned_ints(std::size_t n) { return put_ints(std::vector<int32_t>(n, kIntPoison)); }
  std::vector<int32_t> get_ints(const int32_t* p, std::size_t n) {
    be.synchronize();
    std::vector<int32_t> host(n);
    if (n) be.download(host.data(), p, n * sizeof(int32_t));
    return host;
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

// ---- mixture of experts (backend.h "mixture of experts", SPEC section 9) ------------------------

struct RefRoute {
  std::vector<int32_t> expert;  // (N, k)
  Vec gate;                     // (N, k)
  Vec probs;                    // (N, E)
};

// gate (N, k) = softmax over the logits of the given experts, in their order.
Vec ref_moe_gates(const Vec& logits, const std::vector<int32_t>& expert, int N, int E, int k) {
  Vec gate(std::size_t(N) * k);
  for (int n = 0; n < N; ++n) {
    const double* z = &logits[std::size_t(n) * E];
    const int32_t* e = &expert[std::size_t(n) * k];
    double mx = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < k; ++j) mx = std::max(mx, z[e[j]]);
    double s = 0;
    for (int j = 0; j < k; ++j) s += std::exp(z[e[j]] - mx);
    for (int j = 0; j < k; ++j) gate[std::size_t(n) * k + j] = std::exp(z[e[j]] - mx) / s;
  }
  return gate;
}

// probs (N, E) = softmax over every row.
Vec ref_softmax_rows(const Vec& logits, int N, int E) {
  Vec p(logits.size());
  for (int n = 0; n < N; ++n) {
    const double* z = &logits[std::size_t(n) * E];
    const double mx = *std::max_element(z, z + E);
    double s = 0;
    for (int i = 0; i < E; ++i) s += std::exp(z[i] - mx);
    for (int i = 0; i < E; ++i) p[std::size_t(n) * E + i] = std::exp(z[i] - mx) / s;
  }
  return p;
}

// Top k by a stable sort of the expert indices on their logit, largest first: equal logits keep the
// lower index first.
RefRoute ref_moe_router(const Vec& logits, int N, int E, int k) {
  RefRoute r;
  r.expert.resize(std::size_t(N) * k);
  for (int n = 0; n < N; ++n) {
    const double* z = &logits[std::size_t(n) * E];
    std::vector<int32_t> order(E);
    for (int i = 0; i < E; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
    std::copy(order.begin(), order.begin() + k, r.expert.begin() + std::size_t(n) * k);
  }
  r.gate = ref_moe_gates(logits, r.expert, N, E, k);
  r.probs = ref_softmax_rows(logits, N, E);
  return r;
}

struct RefAssign {
  std::vector<int32_t> slot;    // (N, k)
  std::vector<int32_t> counts;  // (2E) = [kept | routed]
};

// Capacity without a running counter: an assignment's slot is the number of earlier assignments (in
// (n, j) order) to its expert, kept when that is below the capacity; kept = min(routed, capacity).
RefAssign ref_moe_assign(const std::vector<int32_t>& expert, int N, int E, int k, int capacity) {
  const std::size_t A = std::size_t(N) * k;
  RefAssign r{std::vector<int32_t>(A), std::vector<int32_t>(2 * std::size_t(E), 0)};
  for (std::size_t a = 0; a < A; ++a) {
    const auto earlier = std::count(expert.begin(), expert.begin() + a, expert[a]);
    r.slot[a] = earlier < capacity ? int32_t(earlier) : -1;
  }
  for (int e = 0; e < E; ++e) {
    r.counts[E + e] = int32_t(std::count(expert.begin(), expert.end(), e));
    r.counts[e] = std::min(r.counts[E + e], std::max(capacity, 0));
  }
  return r;
}

// coef · E · Σ_e f_e · P_e with f_e = routed_e / (N·k) and P_e the mean over rows of softmax(logits).
double ref_moe_aux_loss(const Vec& logits, const std::vector<int32_t>& counts, int N, int E, int k, double coef) {
  const Vec p = ref_softmax_rows(logits, N, E);
  double total = 0;
  for (int e = 0; e < E; ++e) {
    double P = 0;
    for (int n = 0; n < N; ++n) P += p[std::size_t(n) * E + e];
    total += double(counts[E + e]) / (double(N) * k) * (P / N);
  }
  return coef * E * total;
}

// buf (E, C, h): zero, and token n's row in the slot of each of its kept assignments.
Vec ref_moe_dispatch(const Vec& inp, const std::vector<int32_t>& expert, const std::vector<int32_t>& slot, int N,
                     int E, int k, int C, int h) {
  Vec buf(std::size_t(E) * C * h, 0.0);
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < k; ++j) {
      const std::size_t a = std::size_t(n) * k + j;
      if (slot[a] < 0) continue;
      for (int c = 0; c < h; ++c)
        buf[(std::size_t(expert[a]) * C + slot[a]) * h + c] = inp[std::size_t(n) * h + c];
    }
  return buf;
}

// out (N, h) = Σ over token n's kept assignments of gate · its slot's row.
Vec ref_moe_combine(const Vec& buf, const Vec& gate, const std::vector<int32_t>& expert,
                    const std::vector<int32_t>& slot, int N, int k, int C, int h) {
  Vec out(std::size_t(N) * h, 0.0);
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < k; ++j) {
      const std::size_t a = std::size_t(n) * k + j;
      if (slot[a] < 0) continue;
      for (int c = 0; c < h; ++c)
        out[std::size_t(n) * h + c] += gate[a] * buf[(std::size_t(expert[a]) * C + slot[a]) * h + c];
    }
  return out;
}

// ---- fixture -----------------------------------------------------------------------------------

// Every op on each sgemm library this build has (kernels/cpu/sgemm.h: the products and the attention's
// per-head products run on it), against the same float64 references.
pb::cpu::SgemmLibrary sgemm_library(const std::string& name) {
  pb::cpu::SgemmLibrary library = pb::cpu::default_sgemm_library();
  EXPECT_TRUE(pb::cpu::parse_sgemm_library(name, &library)) << name;
  return library;
}

class CpuOps : public ::testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<Backend> be = pb::make_cpu_backend(2, false, sgemm_library(GetParam()));  // destroyed last
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

TEST_P(CpuOps, NameUploadDownloadCopyZero) {
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

TEST_P(CpuOps, MemoryTrackerCountsAllocations) {
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

TEST_P(CpuOps, MatmulForward) {
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

TEST_P(CpuOps, MatmulBackward) {
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

TEST_P(CpuOps, LayernormForward) {
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

// The fused residual add and LayerNorm is the add, then the LayerNorm of the stored sum, bitwise; in place
// (out aliases a) as the model calls it.
TEST_P(CpuOps, ResidualLayernormForward) {
  std::mt19937 rng(75);
  const int N = 13, C = 40;
  const FVec a = rand_floats(rng, std::size_t(N) * C, -2.0f, 2.0f), b = rand_floats(rng, a.size(), -2.0f, 2.0f);
  const FVec w = rand_floats(rng, C), bias = rand_floats(rng, C);
  float *fused = dev.put(a), *ln = dev.poisoned(a.size()), *mean = dev.poisoned(N), *rstd = dev.poisoned(N);
  const float *db = dev.put(b), *dw = dev.put(w), *dbias = dev.put(bias);
  be->residual_layernorm_forward(fused, ln, mean, rstd, fused, db, dw, dbias, N, C);
  float *sum = dev.poisoned(a.size()), *ref_ln = dev.poisoned(a.size()), *ref_mean = dev.poisoned(N),
        *ref_rstd = dev.poisoned(N);
  be->add(sum, dev.put(a), db, a.size());
  be->layernorm_forward(ref_ln, ref_mean, ref_rstd, sum, dw, dbias, N, C);
  EXPECT_EQ(dev.get(fused, a.size()), dev.get(sum, a.size()));
  EXPECT_EQ(dev.get(ln, a.size()), dev.get(ref_ln, a.size()));
  EXPECT_EQ(dev.get(mean, N), dev.get(ref_mean, N));
  EXPECT_EQ(dev.get(rstd, N), dev.get(ref_rstd, N));
}

TEST_P(CpuOps, LayernormBackward) {
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

TEST_P(CpuOps, AttentionForward) {
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

TEST_P(CpuOps, AttentionBackward) {
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
// the Llama-style block (SPEC 2.5): RMSNorm, rotary positions, SwiGLU, grouped-query attention
// =================================================================================================

Vec ref_rmsnorm(const Vec& inp, const Vec& w, int N, int C, Vec* rstd = nullptr) {
  Vec out(std::size_t(N) * C);
  if (rstd) rstd->assign(N, 0);
  for (int n = 0; n < N; ++n) {
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += inp[std::size_t(n) * C + c] * inp[std::size_t(n) * C + c];
    const double rs = 1.0 / std::sqrt(ss / C + 1e-5);
    for (int c = 0; c < C; ++c) out[std::size_t(n) * C + c] = inp[std::size_t(n) * C + c] * rs * w[c];
    if (rstd) (*rstd)[n] = rs;
  }
  return out;
}

// Rotary positions on `heads` heads from column `col` of rows `stride` apart (B·S rows), in double.
Vec ref_rope(const Vec& x, const std::vector<int32_t>& pos, int B, int S, int heads, int d, double theta,
             std::size_t stride, std::size_t col) {
  Vec y = x;
  const int half = d / 2;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < S; ++i)
      for (int h = 0; h < heads; ++h)
        for (int j = 0; j < half; ++j) {
          const std::size_t at = (std::size_t(b) * S + i) * stride + col + std::size_t(h) * d + j;
          const double phi = pos[i] * std::pow(theta, -2.0 * j / d);
          y[at] = x[at] * std::cos(phi) - x[at + half] * std::sin(phi);
          y[at + half] = x[at + half] * std::cos(phi) + x[at] * std::sin(phi);
        }
  return y;
}

// Grouped-query causal attention: qkv (B, S, C + 2·KV·d), query head h with key/value head h / (NH/KV).
Vec ref_gqa_attention(const Vec& qkv, int B, int S, int C, int NH, int KV) {
  const int d = C / NH, g = NH / KV;
  const std::size_t W = std::size_t(C) + 2 * std::size_t(KV) * d;
  const double sc = 1.0 / std::sqrt(static_cast<double>(d));
  Vec out(std::size_t(B) * S * C, 0.0), p(S);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < S; ++t) {
        const double* q = &qkv[(std::size_t(b) * S + t) * W + std::size_t(h) * d];
        double mx = -std::numeric_limits<double>::infinity();
        for (int s = 0; s <= t; ++s) {
          const double* k = &qkv[(std::size_t(b) * S + s) * W + C + std::size_t(h / g) * d];
          double a = 0;
          for (int i = 0; i < d; ++i) a += q[i] * k[i];
          p[s] = a * sc;
          mx = std::max(mx, p[s]);
        }
        double sum = 0;
        for (int s = 0; s <= t; ++s) sum += (p[s] = std::exp(p[s] - mx));
        double* o = &out[(std::size_t(b) * S + t) * C + std::size_t(h) * d];
        for (int s = 0; s <= t; ++s) {
          const double* v = &qkv[(std::size_t(b) * S + s) * W + C + std::size_t(KV) * d + std::size_t(h / g) * d];
          for (int i = 0; i < d; ++i) o[i] += p[s] / sum * v[i];
        }
      }
  return out;
}

TEST_P(CpuOps, RmsnormForward) {
  std::mt19937 rng(121);
  const int shapes[][2] = {{2 * 17, 72}, {1, 3}, {5, 1031}};
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    SCOPED_TRACE(shape_str("N=%d C=%d", N, C, 0));
    FVec inp = rand_floats(rng, std::size_t(N) * C);
    for (auto& x : inp) x = 0.5f + 2.0f * x;  // a non-zero mean: RMSNorm does not subtract it
    const FVec w = rand_floats(rng, C, 0.5f, 1.5f);
    float *d_out = dev.poisoned(inp.size()), *d_rstd = dev.poisoned(N);
    be->rmsnorm_forward(d_out, d_rstd, dev.put(inp), dev.put(w, MemCategory::parameters), N, C);
    Vec rstd;
    const Vec ref = ref_rmsnorm(to_double(inp), to_double(w), N, C, &rstd);
    EXPECT_TRUE(close(dev.get(d_out, ref.size()), ref, kFwdTol, "out"));
    EXPECT_TRUE(close(dev.get(d_rstd, N), rstd, kFwdTol, "rstd"));
  }
}

// As the LayerNorm's: the add, then the RMSNorm of the stored sum, bitwise; in place (out aliases a).
TEST_P(CpuOps, ResidualRmsnormForward) {
  std::mt19937 rng(122);
  const int N = 13, C = 40;
  const FVec a = rand_floats(rng, std::size_t(N) * C, -2.0f, 2.0f), b = rand_floats(rng, a.size(), -2.0f, 2.0f);
  const FVec w = rand_floats(rng, C);
  float *fused = dev.put(a), *norm = dev.poisoned(a.size()), *rstd = dev.poisoned(N);
  const float *db = dev.put(b), *dw = dev.put(w);
  be->residual_rmsnorm_forward(fused, norm, rstd, fused, db, dw, N, C);
  float *sum = dev.poisoned(a.size()), *ref_norm = dev.poisoned(a.size()), *ref_rstd = dev.poisoned(N);
  be->add(sum, dev.put(a), db, a.size());
  be->rmsnorm_forward(ref_norm, ref_rstd, sum, dw, N, C);
  EXPECT_EQ(dev.get(fused, a.size()), dev.get(sum, a.size()));
  EXPECT_EQ(dev.get(norm, a.size()), dev.get(ref_norm, a.size()));
  EXPECT_EQ(dev.get(rstd, N), dev.get(ref_rstd, N));
}

TEST_P(CpuOps, RmsnormBackward) {
  std::mt19937 rng(123);
  const int shapes[][2] = {{2 * 17, 72}, {1, 3}};
  for (const auto& sh : shapes) {
    const int N = sh[0], C = sh[1];
    SCOPED_TRACE(shape_str("N=%d C=%d", N, C, 0));
    const std::size_t n = std::size_t(N) * C;
    FVec inp = rand_floats(rng, n);
    for (auto& x : inp) x = 0.3f + 2.0f * x;
    const FVec w = rand_floats(rng, C, 0.5f, 1.5f), dout = rand_floats(rng, n);
    const FVec pre_dinp = rand_floats(rng, n), pre_dw = rand_floats(rng, C);  // both accumulate
    Vec I = to_double(inp), W = to_double(w);
    const Vec DO = to_double(dout);
    auto L = [&] { return dot(DO, ref_rmsnorm(I, W, N, C)); };
    const Vec fd_dinp = numeric_grad(I, L), fd_dw = numeric_grad(W, L);
    Vec rstd;
    ref_rmsnorm(I, W, N, C, &rstd);
    const FVec frstd(rstd.begin(), rstd.end());
    float* d_dinp = dev.put(pre_dinp, MemCategory::gradients);
    float* d_dw = dev.put(pre_dw, MemCategory::gradients);
    be->rmsnorm_backward(d_dinp, d_dw, dev.put(dout), dev.put(inp), dev.put(w, MemCategory::parameters),
                         dev.put(frstd), N, C);
    EXPECT_TRUE(close(delta(dev.get(d_dinp, n), pre_dinp), fd_dinp, kGradTol, "dinp increment vs FD"));
    EXPECT_TRUE(close(delta(dev.get(d_dw, C), pre_dw), fd_dw, kGradTol, "dweight increment vs FD"));
  }
}

// In place on a block of columns inside wider rows (the Q or K heads of a qkv buffer), at positions that
// are not 0..S−1 (a context-parallel rank's); the backward is the forward's transpose: for L = dout·rope(x),
// ∂L/∂x = rope_backward(dout), checked against finite differences; and backward undoes forward.
TEST_P(CpuOps, RopeForwardAndBackward) {
  std::mt19937 rng(124);
  struct Case { int B, S, heads, d; std::size_t stride, col; double theta; };
  const Case cases[] = {{2, 5, 3, 8, 40, 8, 10000.0}, {1, 3, 2, 2, 4, 0, 500000.0}, {3, 4, 1, 6, 6, 0, 10.0}};
  for (const Case& c : cases) {
    SCOPED_TRACE(shape_str("B=%d S=%d heads=%d d=%d", c.B, c.S, c.heads, c.d));
    std::vector<int32_t> pos(c.S);
    for (int i = 0; i < c.S; ++i) pos[i] = 7 * i + 3;
    const std::size_t n = std::size_t(c.B) * c.S * c.stride;
    const FVec x = rand_floats(rng, n, -2.0f, 2.0f), dout = rand_floats(rng, n);
    const int32_t* d_pos = dev.put_ints(pos);
    float* d_x = dev.put(x);
    be->rope_forward(d_x + c.col, c.stride, d_pos, c.B, c.S, c.heads, c.d, c.theta);
    const Vec ref = ref_rope(to_double(x), pos, c.B, c.S, c.heads, c.d, c.theta, c.stride, c.col);
    const FVec got = dev.get(d_x, n);
    EXPECT_TRUE(close(got, ref, kFwdTol, "rotated"));
    for (std::size_t i = 0; i < n; ++i) {  // the other columns untouched
      const std::size_t in_row = i % c.stride;
      if (in_row < c.col || in_row >= c.col + std::size_t(c.heads) * c.d) {
        ASSERT_EQ(got[i], x[i]) << i;
      }
    }
    Vec X = to_double(x);
    const Vec DO = to_double(dout);
    const Vec fd = numeric_grad(X, [&] {
      return dot(DO, ref_rope(X, pos, c.B, c.S, c.heads, c.d, c.theta, c.stride, c.col));
    });
    float* d_dx = dev.put(dout);
    be->rope_backward(d_dx + c.col, c.stride, d_pos, c.B, c.S, c.heads, c.d, c.theta);
    EXPECT_TRUE(close(dev.get(d_dx, n), fd, kGradTol, "rope_backward vs FD"));
    be->rope_backward(d_x + c.col, c.stride, d_pos, c.B, c.S, c.heads, c.d, c.theta);
    EXPECT_TRUE(close(dev.get(d_x, n), to_double(x), 1e-6, "forward then backward"));
  }
}

TEST_P(CpuOps, SwigluForwardAndBackward) {
  std::mt19937 rng(125);
  const std::size_t n = 1031;
  const FVec gate = rand_floats(rng, n, -6.0f, 6.0f), up = rand_floats(rng, n, -2.0f, 2.0f);
  const FVec dout = rand_floats(rng, n);
  float* d_out = dev.poisoned(n);
  const float *d_gate = dev.put(gate), *d_up = dev.put(up);
  be->swiglu_forward(d_out, d_gate, d_up, n);
  Vec G = to_double(gate), U = to_double(up);
  auto ref = [&] {
    Vec y(n);
    for (std::size_t i = 0; i < n; ++i) y[i] = G[i] / (1.0 + std::exp(-G[i])) * U[i];
    return y;
  };
  EXPECT_TRUE(close(dev.get(d_out, n), ref(), kFwdTol, "out"));
  const Vec DO = to_double(dout);
  auto L = [&] { return dot(DO, ref()); };
  const Vec fd_gate = numeric_grad(G, L), fd_up = numeric_grad(U, L);
  float *d_dgate = dev.poisoned(n), *d_dup = dev.put(dout);  // dup aliases dout, as the model calls it
  be->swiglu_backward(d_dgate, d_dup, d_dup, d_gate, d_up, n);
  EXPECT_TRUE(close(dev.get(d_dgate, n), fd_gate, kGradTol, "dgate vs FD"));
  EXPECT_TRUE(close(dev.get(d_dup, n), fd_up, kGradTol, "dup vs FD"));
}

struct GqaShape { int B, S, C, NH, KV; };
const GqaShape kGqaShapes[] = {{2, 9, 24, 4, 2}, {1, 5, 24, 6, 1}, {2, 4, 12, 3, 3}, {1, 1, 8, 4, 2}};

TEST_P(CpuOps, AttentionGqaForward) {
  std::mt19937 rng(126);
  for (const auto& sh : kGqaShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH) + " kv=" + std::to_string(sh.KV));
    const int d = sh.C / sh.NH;
    const FVec qkv = rand_floats(rng, std::size_t(sh.B) * sh.S * (sh.C + 2 * sh.KV * d), -2.0f, 2.0f);
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C;
    float* d_out = dev.poisoned(n_out);
    be->attention_gqa_forward(d_out, dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH)), dev.put(qkv),
                              sh.B, sh.S, sh.C, sh.NH, sh.KV);
    EXPECT_TRUE(close(dev.get(d_out, n_out), ref_gqa_attention(to_double(qkv), sh.B, sh.S, sh.C, sh.NH, sh.KV),
                      kFwdTol, "out"));
  }
}

// Against finite differences; with every key/value head's gradient the sum over its query heads.
TEST_P(CpuOps, AttentionGqaBackward) {
  std::mt19937 rng(127);
  for (const auto& sh : kGqaShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH) + " kv=" + std::to_string(sh.KV));
    const int d = sh.C / sh.NH;
    const std::size_t n_qkv = std::size_t(sh.B) * sh.S * (sh.C + 2 * sh.KV * d);
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C;
    const FVec qkv = rand_floats(rng, n_qkv, -2.0f, 2.0f), dout = rand_floats(rng, n_out);
    Vec Q = to_double(qkv);
    const Vec DO = to_double(dout);
    const Vec fd =
        numeric_grad(Q, [&] { return dot(DO, ref_gqa_attention(Q, sh.B, sh.S, sh.C, sh.NH, sh.KV)); });
    float *d_qkv = dev.put(qkv), *d_out = dev.poisoned(n_out);
    float* d_saved = dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH));
    be->attention_gqa_forward(d_out, d_saved, d_qkv, sh.B, sh.S, sh.C, sh.NH, sh.KV);
    float* d_dqkv = dev.poisoned(n_qkv, MemCategory::gradients);  // overwritten
    be->attention_gqa_backward(d_dqkv, dev.poisoned(be->attention_scratch_floats(sh.B, sh.S, sh.NH)),
                               dev.put(dout), d_out, d_qkv, d_saved, sh.B, sh.S, sh.C, sh.NH, sh.KV);
    EXPECT_TRUE(close(dev.get(d_dqkv, n_qkv), fd, kGradTol, "dqkv vs finite differences"));
  }
}

// kv = heads is multi-head attention, bitwise; a kv that does not divide the heads is refused.
TEST_P(CpuOps, AttentionGqaWithAllHeadsIsMultiHeadAttention) {
  std::mt19937 rng(128);
  const int B = 2, S = 7, C = 24, NH = 4;
  const std::size_t n_qkv = std::size_t(B) * S * 3 * C, n_out = std::size_t(B) * S * C;
  const FVec qkv = rand_floats(rng, n_qkv, -2.0f, 2.0f), dout = rand_floats(rng, n_out);
  const float *d_qkv = dev.put(qkv), *d_dout = dev.put(dout);
  float *out1 = dev.poisoned(n_out), *out2 = dev.poisoned(n_out);
  float *saved1 = dev.poisoned(be->attention_saved_floats(B, S, NH)), *saved2 = dev.poisoned(be->attention_saved_floats(B, S, NH));
  be->attention_forward(out1, saved1, d_qkv, B, S, C, NH);
  be->attention_gqa_forward(out2, saved2, d_qkv, B, S, C, NH, NH);
  EXPECT_EQ(dev.get(out1, n_out), dev.get(out2, n_out));
  float *g1 = dev.poisoned(n_qkv), *g2 = dev.poisoned(n_qkv);
  be->attention_backward(g1, dev.poisoned(be->attention_scratch_floats(B, S, NH)), d_dout, out1, d_qkv, saved1, B, S,
                         C, NH);
  be->attention_gqa_backward(g2, dev.poisoned(be->attention_scratch_floats(B, S, NH)), d_dout, out2, d_qkv, saved2, B,
                             S, C, NH, NH);
  EXPECT_EQ(dev.get(g1, n_qkv), dev.get(g2, n_qkv));
  EXPECT_THROW(be->attention_gqa_forward(out2, saved2, d_qkv, B, S, C, NH, 3), std::invalid_argument);
}

// =================================================================================================
// gelu, add, accumulate, scale
// =================================================================================================

TEST_P(CpuOps, GeluForward) {
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

TEST_P(CpuOps, GeluBackward) {
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

TEST_P(CpuOps, AddAccumulateScale) {
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

TEST_P(CpuOps, EmbeddingForward) {
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

TEST_P(CpuOps, EmbeddingBackward) {
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
  be.cross_entropy_forward_backward(d_logits, d_loss, dev.put_ints(targets), N, V, V, scale);

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

TEST_P(CpuOps, CrossEntropyForwardBackward) {
  std::mt19937 rng(61);
  struct Case { int N, V; float scale; };
  for (const Case& cs : {Case{2 * 17, 67, 1.0f / (2 * 17)}, Case{1, 67, 0.37f}, Case{3, 2, 1.0f}}) {
    SCOPED_TRACE(shape_str("N=%d V=%d", cs.N, cs.V, 0));
    const FVec logits = rand_floats(rng, std::size_t(cs.N) * cs.V, -3.0f, 3.0f);
    const auto targets = rand_ints(rng, cs.N, cs.V);
    check_cross_entropy(*be, dev, logits, targets, cs.N, cs.V, cs.scale, /*with_fd=*/true);
  }
}

TEST_P(CpuOps, CrossEntropyLargeLogitsAreStable) {
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
TEST_P(CpuOps, CrossEntropyHugeLogitGapIsFinite) {
  std::mt19937 rng(63);
  const int N = 3, V = 67;
  FVec logits = rand_floats(rng, std::size_t(N) * V, -3.0f, 3.0f);
  const auto targets = rand_ints(rng, N, V);
  logits[std::size_t(1) * V + targets[1]] = -60.0f;
  logits[std::size_t(1) * V + (targets[1] + 1) % V] = 60.0f;
  check_cross_entropy(*be, dev, logits, targets, N, V, 1.0f / N, /*with_fd=*/false);
}

// The vocabulary padded in storage (rows Vp apart, columns V..Vp−1 padding filled with logits that
// would dominate the softmax if read): the loss and the first V columns of dlogits are exactly those of
// the unpadded rows, the padding's dlogits exactly 0; and the same through the vocabulary-parallel
// steps with two blocks of Vp/2, the second partly or wholly padding.
TEST_P(CpuOps, CrossEntropyIgnoresVocabularyPadding) {
  std::mt19937 rng(64);
  const int N = 5;
  const float scale = 1.0f / N;
  for (int V : {200, 100}) {  // blocks of 128: 128 + 72 valid columns, or 100 + 0
    SCOPED_TRACE(shape_str("N=%d V=%d", N, V, 0));
    const int Vp = 256, Vb = Vp / 2;
    const FVec compact = rand_floats(rng, std::size_t(N) * V, -3.0f, 3.0f);
    const auto targets = rand_ints(rng, N, V);
    FVec padded(std::size_t(N) * Vp, 500.0f);
    for (int n = 0; n < N; ++n) {
      std::copy_n(compact.begin() + std::size_t(n) * V, V, padded.begin() + std::size_t(n) * Vp);
    }
    auto expect_padded_like = [&](const FVec& got_padded, const FVec& got_compact, const char* what) {
      for (int n = 0; n < N; ++n) {
        for (int i = 0; i < Vp; ++i) {
          const float got = got_padded[std::size_t(n) * Vp + i];
          if (i < V) {
            ASSERT_EQ(got, got_compact[std::size_t(n) * V + i]) << what << " row " << n << " column " << i;
          } else {
            ASSERT_EQ(got, 0.0f) << what << " padding row " << n << " column " << i;
          }
        }
      }
    };
    // Fused: bitwise the unpadded op.
    float* d_compact = dev.put(compact);
    float* d_padded = dev.put(padded);
    double* loss_compact = dev.put_double(0.0);
    double* loss_padded = dev.put_double(0.0);
    const int32_t* d_targets = dev.put_ints(targets);
    be->cross_entropy_forward_backward(d_compact, loss_compact, d_targets, N, V, V, scale);
    be->cross_entropy_forward_backward(d_padded, loss_padded, d_targets, N, V, Vp, scale);
    const FVec dz = dev.get(d_compact, compact.size());
    expect_padded_like(dev.get(d_padded, padded.size()), dz, "fused dlogits");
    EXPECT_EQ(dev.get_double(loss_padded), dev.get_double(loss_compact));

    // Vocabulary-parallel over two blocks of the padded row, the reductions done here.
    FVec blocks[2];
    int valid[2];
    std::vector<int32_t> block_targets[2];
    for (int b = 0; b < 2; ++b) {
      valid[b] = std::clamp(V - b * Vb, 0, Vb);
      blocks[b].resize(std::size_t(N) * Vb);
      for (int n = 0; n < N; ++n) {
        std::copy_n(padded.begin() + std::size_t(n) * Vp + b * Vb, Vb, blocks[b].begin() + std::size_t(n) * Vb);
        const int t = targets[n] - b * Vb;
        block_targets[b].push_back(t >= 0 && t < Vb ? t : -1);
      }
    }
    float* d_block[2] = {dev.put(blocks[0]), dev.put(blocks[1])};
    const int32_t* d_block_targets[2] = {dev.put_ints(block_targets[0]), dev.put_ints(block_targets[1])};
    FVec maxima[2], sums[2];
    for (int b = 0; b < 2; ++b) {
      float* m = dev.put(FVec(N, std::nanf("")));
      be->cross_entropy_row_max(m, d_block[b], N, valid[b], Vb);
      maxima[b] = dev.get(m, N);
    }
    if (valid[1] == 0) {
      for (float m : maxima[1]) EXPECT_EQ(m, -std::numeric_limits<float>::infinity()) << "a block of padding";
    }
    FVec row_max(N);
    for (int n = 0; n < N; ++n) row_max[n] = std::max(maxima[0][n], maxima[1][n]);
    float* d_max = dev.put(row_max);
    for (int b = 0; b < 2; ++b) {
      float* s = dev.put(FVec(2 * N, std::nanf("")));
      be->cross_entropy_partials(s, d_block[b], d_block_targets[b], d_max, N, valid[b], Vb);
      sums[b] = dev.get(s, 2 * N);
    }
    FVec total(2 * N);
    for (int i = 0; i < 2 * N; ++i) total[i] = sums[0][i] + sums[1][i];
    float* d_total = dev.put(total);
    FVec joined(std::size_t(N) * Vp);
    for (int b = 0; b < 2; ++b) {  // each rank adds the whole loss (from the reduced sums) to its own sum
      double* loss_parallel = dev.put_double(0.0);
      be->cross_entropy_finish(d_block[b], loss_parallel, d_block_targets[b], d_max, d_total, N, valid[b], Vb, scale);
      EXPECT_NEAR(dev.get_double(loss_parallel), dev.get_double(loss_compact), 1e-6 * dev.get_double(loss_compact));
      const FVec got = dev.get(d_block[b], blocks[b].size());
      for (int n = 0; n < N; ++n) {
        std::copy_n(got.begin() + std::size_t(n) * Vb, Vb, joined.begin() + std::size_t(n) * Vp + b * Vb);
      }
    }
    for (int n = 0; n < N; ++n) {
      for (int i = V; i < Vp; ++i) ASSERT_EQ(joined[std::size_t(n) * Vp + i], 0.0f) << "padding row " << n;
      for (int i = 0; i < V; ++i) {
        ASSERT_NEAR(joined[std::size_t(n) * Vp + i], dz[std::size_t(n) * V + i], 1e-6f) << "row " << n;
      }
    }
  }
}

// =================================================================================================
// optimizer: sum_squares, AdamW
// =================================================================================================

TEST_P(CpuOps, SumSquares) {
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

// The batched norm: each bin the in-order sum of its pieces' Σx², bitwise the single-piece sums added in
// the same order; an empty piece adds nothing; a bin outside [0, bins) is refused.
TEST_P(CpuOps, SumSquaresBinned) {
  std::mt19937 rng(73);
  const FVec a = rand_floats(rng, 40000, -3.0f, 3.0f), b = rand_floats(rng, 17), c = rand_floats(rng, 5000);
  const float *da = dev.put(a), *db = dev.put(b), *dc = dev.put(c);
  const std::vector<Backend::SquaresPiece> pieces = {{da, a.size(), 1}, {db, b.size(), 0}, {dc, c.size(), 1},
                                                     {db, 0, 2}};
  double sums[3] = {kPoison, kPoison, kPoison};
  be->sum_squares(sums, 3, pieces);
  double bin1 = be->sum_squares(da, a.size());
  bin1 += be->sum_squares(dc, c.size());
  EXPECT_EQ(sums[0], be->sum_squares(db, b.size()));
  EXPECT_EQ(sums[1], bin1);
  EXPECT_EQ(sums[2], 0.0);
  EXPECT_THROW(be->sum_squares(sums, 2, pieces), std::invalid_argument);
}

// Host waits are counted by the interface: download, synchronize and each sum_squares call once (a
// batched norm once, however many pieces); upload, copy and the ops not at all.
TEST_P(CpuOps, HostWaitsCounted) {
  const FVec x(64, 1.0f);
  float* d = dev.put(x);
  const std::uint64_t before = be->host_waits();
  FVec host(64);
  be->upload(d, x.data(), 64 * sizeof(float));
  be->copy(d, d + 32, 32 * sizeof(float));
  be->scale(d, 2.0f, 64);
  EXPECT_EQ(be->host_waits(), before);
  be->download(host.data(), d, 64 * sizeof(float));
  be->synchronize();
  double sums[2];
  be->sum_squares(sums, 2, {{d, 10, 0}, {d, 20, 1}, {d + 20, 20, 1}});
  be->sum_squares(d, 64);
  EXPECT_EQ(be->host_waits(), before + 4);
}

// One multi-range update is the per-range updates, bitwise: ranges of the same flat buffers, each with its
// weight decay, in any order, gaps left untouched.
TEST_P(CpuOps, AdamwUpdateRanges) {
  std::mt19937 rng(74);
  const std::size_t n = 3000;
  const FVec p = rand_floats(rng, n, -0.05f, 0.05f), g = rand_floats(rng, n), m = rand_floats(rng, n, -0.5f, 0.5f),
             v = rand_floats(rng, n, 0.0f, 0.3f);
  const std::vector<Backend::AdamwRange> ranges = {{1000, 1500, 0.1f}, {0, 700, 0.0f}, {2600, 400, 0.1f}};
  float *p1 = dev.put(p), *m1 = dev.put(m), *v1 = dev.put(v), *p2 = dev.put(p), *m2 = dev.put(m), *v2 = dev.put(v);
  const float* dg = dev.put(g);
  be->adamw_update(p1, dg, m1, v1, ranges, 0.01f, 0.9f, 0.95f, 1e-8f, 3, 0.5f);
  for (const Backend::AdamwRange& r : ranges) {
    be->adamw_update(p2 + r.begin, dg + r.begin, m2 + r.begin, v2 + r.begin, r.n, 0.01f, 0.9f, 0.95f, 1e-8f,
                     r.weight_decay, 3, 0.5f);
  }
  EXPECT_EQ(dev.get(p1, n), dev.get(p2, n));
  EXPECT_EQ(dev.get(m1, n), dev.get(m2, n));
  EXPECT_EQ(dev.get(v1, n), dev.get(v2, n));
  const FVec got = dev.get(p1, n);
  for (std::size_t i = 700; i < 1000; ++i) ASSERT_EQ(got[i], p[i]) << "element " << i << " of a gap";
}

TEST_P(CpuOps, AdamwUpdate) {
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
// mixture of experts: router, capacity, auxiliary loss, dispatch and combine
// =================================================================================================

struct MoeShape { int N, E, k, h; };
// E = 3 and 5; k = 1, 2, 3 and k = E; h odd; N prime, and a single token.
const MoeShape kMoeShapes[] = {{37, 5, 2, 7}, {17, 3, 1, 13}, {29, 5, 3, 11},
                               {13, 3, 3, 5}, {11, 5, 5, 9},  {1, 3, 2, 3}};

std::string moe_str(const MoeShape& sh, int capacity = -1) {
  std::string s = shape_str("N=%d E=%d k=%d h=%d", sh.N, sh.E, sh.k, sh.h);
  return capacity < 0 ? s : s + " capacity=" + std::to_string(capacity);
}

// Router logits with a load imbalance: expert 0 is favoured on two tokens of three, so the capacity
// ceil(k·N/E) drops some of its assignments.
FVec moe_logits(std::mt19937& rng, int N, int E) {
  FVec z = rand_floats(rng, std::size_t(N) * E, -2.0f, 2.0f);
  for (int n = 0; n < N; ++n)
    if (n % 3 != 2) z[std::size_t(n) * E] += 1.5f;
  return z;
}

// No limit (N: an expert gets at most one copy of each token), the capacity of factor 1, 1, and 0
// (every assignment dropped: the capacity is the limit).
std::vector<int> moe_capacities(const MoeShape& sh) { return {sh.N, (sh.k * sh.N + sh.E - 1) / sh.E, 1, 0}; }

// Bitwise equality of a float output with a reference that is exact (copies and zeros).
::testing::AssertionResult same(const FVec& got, const Vec& ref, const std::string& what) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << what << ": size " << got.size();
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!(double(got[i]) == ref[i])) {
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i] << ", expected "
                                           << ref[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// close(), or, when the reference is all zeros (every assignment dropped, or k = 1 where the gate is
// constant), an output of exact zeros.
template <typename T>
::testing::AssertionResult close_or_zero(const std::vector<T>& got, const Vec& ref, double tol,
                                         const std::string& what) {
  if (std::any_of(ref.begin(), ref.end(), [](double x) { return x != 0; })) return close(got, ref, tol, what);
  return same(FVec(got.begin(), got.end()), ref, what + " (all zero)");
}

// Whether token n has at least one kept assignment.
bool any_kept(const std::vector<int32_t>& slot, int n, int k) {
  for (int j = 0; j < k; ++j)
    if (slot[std::size_t(n) * k + j] >= 0) return true;
  return false;
}

TEST_P(CpuOps, MoeRouterForward) {
  std::mt19937 rng(81);
  for (const auto& sh : kMoeShapes) {
    SCOPED_TRACE(moe_str(sh));
    const std::size_t nA = std::size_t(sh.N) * sh.k, nP = std::size_t(sh.N) * sh.E;
    const FVec logits = moe_logits(rng, sh.N, sh.E);
    int32_t* d_expert = dev.poisoned_ints(nA);
    float* d_gate = dev.poisoned(nA);
    float* d_probs = dev.poisoned(nP);
    be->moe_router_forward(d_expert, d_gate, d_probs, dev.put(logits), sh.N, sh.E, sh.k);
    const RefRoute ref = ref_moe_router(to_double(logits), sh.N, sh.E, sh.k);
    EXPECT_EQ(dev.get_ints(d_expert, nA), ref.expert);
    EXPECT_TRUE(close(dev.get(d_gate, nA), ref.gate, kFwdTol, "gate"));
    EXPECT_TRUE(close(dev.get(d_probs, nP), ref.probs, kFwdTol, "probs"));
  }
}

// Equal logits: the lower expert index first, also where the tie straddles the k-th place; rows far
// above and below 0 (exp over- and underflows in fp32 without the shift by the maximum).
TEST_P(CpuOps, MoeRouterTiesAndLargeLogits) {
  const int N = 6, E = 5;
  const FVec logits = {1, 3, 3, 0, 3,                  // three-way tie for first
                       0, 0, 0, 0, 0,                  // all equal
                       2, 1, 1, 5, 1,                  // tie below the first pick
                       99, 104, 99, 104, 102,          // ties, exp(104) overflows fp32
                       -200, -100, -100, -300, -250,   // ties, exp(−200) underflows
                       0.5f, 0.5f, 0.25f, 0.5f, 0.75f};
  const int32_t order[N][E] = {{1, 2, 4, 0, 3}, {0, 1, 2, 3, 4}, {3, 0, 1, 2, 4},
                               {1, 3, 4, 0, 2}, {1, 2, 0, 4, 3}, {4, 0, 1, 3, 2}};
  for (int k : {1, 2, 3, E}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    const std::size_t nA = std::size_t(N) * k;
    int32_t* d_expert = dev.poisoned_ints(nA);
    float* d_gate = dev.poisoned(nA);
    float* d_probs = dev.poisoned(std::size_t(N) * E);
    be->moe_router_forward(d_expert, d_gate, d_probs, dev.put(logits), N, E, k);
    const std::vector<int32_t> got = dev.get_ints(d_expert, nA);
    for (int n = 0; n < N; ++n)
      for (int j = 0; j < k; ++j) EXPECT_EQ(got[std::size_t(n) * k + j], order[n][j]) << "row " << n << " pick " << j;
    const RefRoute ref = ref_moe_router(to_double(logits), N, E, k);
    EXPECT_EQ(got, ref.expert);
    EXPECT_TRUE(close(dev.get(d_gate, nA), ref.gate, kFwdTol, "gate"));
    EXPECT_TRUE(close(dev.get(d_probs, std::size_t(N) * E), ref.probs, kFwdTol, "probs"));
  }
}

TEST_P(CpuOps, MoeRouterBackward) {
  std::mt19937 rng(82);
  for (const auto& sh : kMoeShapes) {
    SCOPED_TRACE(moe_str(sh));
    const std::size_t nA = std::size_t(sh.N) * sh.k, nP = std::size_t(sh.N) * sh.E;
    const FVec logits = moe_logits(rng, sh.N, sh.E), dgate = rand_floats(rng, nA);
    int32_t* d_expert = dev.poisoned_ints(nA);
    float* d_gate = dev.poisoned(nA);
    be->moe_router_forward(d_expert, d_gate, dev.poisoned(nP), dev.put(logits), sh.N, sh.E, sh.k);
    const std::vector<int32_t> expert = dev.get_ints(d_expert, nA);

    // L = <dgate, gates(logits)> with the choice of experts held (random logits are far from a tie).
    Vec Z = to_double(logits);
    const Vec DG = to_double(dgate);
    const Vec fd = numeric_grad(Z, [&] { return dot(DG, ref_moe_gates(Z, expert, sh.N, sh.E, sh.k)); });
    const Vec G = ref_moe_gates(Z, expert, sh.N, sh.E, sh.k);
    Vec an(nP, 0.0);
    for (int n = 0; n < sh.N; ++n) {
      double gdg = 0;
      for (int j = 0; j < sh.k; ++j) gdg += G[std::size_t(n) * sh.k + j] * DG[std::size_t(n) * sh.k + j];
      for (int j = 0; j < sh.k; ++j) {
        const std::size_t a = std::size_t(n) * sh.k + j;
        an[std::size_t(n) * sh.E + expert[a]] = G[a] * (DG[a] - gdg);
      }
    }
    ASSERT_TRUE(close_or_zero(an, fd, kRefSelfTol, "reference dlogits"));

    float* d_dlogits = dev.poisoned(nP, MemCategory::gradients);  // overwritten
    be->moe_router_backward(d_dlogits, dev.put(dgate), d_gate, d_expert, sh.N, sh.E, sh.k);
    const FVec got = dev.get(d_dlogits, nP);
    EXPECT_TRUE(close_or_zero(got, fd, kGradTol, "dlogits vs finite differences"));
    EXPECT_TRUE(close_or_zero(got, an, kGradTol, "dlogits vs analytic"));
    for (int n = 0; n < sh.N; ++n)  // the experts not chosen get exactly nothing
      for (int e = 0; e < sh.E; ++e) {
        const auto* row = &expert[std::size_t(n) * sh.k];
        if (std::find(row, row + sh.k, e) == row + sh.k) {
          EXPECT_EQ(got[std::size_t(n) * sh.E + e], 0.0f);
        }
      }
  }
}

TEST_P(CpuOps, MoeAssignCapacity) {
  // By hand: E = 3, k = 2, capacity 2; expert 0 is routed four times, expert 1 three times.
  {
    const std::vector<int32_t> expert = {0, 1, 0, 2, 1, 0, 0, 1};
    int32_t* d_slot = dev.poisoned_ints(expert.size());
    int32_t* d_counts = dev.poisoned_ints(6);
    be->moe_assign(d_slot, d_counts, dev.put_ints(expert), 4, 3, 2, 2);
    EXPECT_EQ(dev.get_ints(d_slot, expert.size()), (std::vector<int32_t>{0, 0, 1, 0, 1, -1, -1, -1}));
    EXPECT_EQ(dev.get_ints(d_counts, 6), (std::vector<int32_t>{2, 2, 1, 4, 3, 1}));
  }
  std::mt19937 rng(83);
  for (const auto& sh : kMoeShapes) {
    const std::vector<int32_t> expert = ref_moe_router(to_double(moe_logits(rng, sh.N, sh.E)), sh.N, sh.E, sh.k).expert;
    const std::size_t nA = expert.size();
    for (int capacity : moe_capacities(sh)) {
      SCOPED_TRACE(moe_str(sh, capacity));
      int32_t* d_slot = dev.poisoned_ints(nA);
      int32_t* d_counts = dev.poisoned_ints(2 * std::size_t(sh.E));
      be->moe_assign(d_slot, d_counts, dev.put_ints(expert), sh.N, sh.E, sh.k, capacity);
      const std::vector<int32_t> slot = dev.get_ints(d_slot, nA), counts = dev.get_ints(d_counts, 2 * sh.E);
      const RefAssign ref = ref_moe_assign(expert, sh.N, sh.E, sh.k, capacity);
      EXPECT_EQ(slot, ref.slot);
      EXPECT_EQ(counts, ref.counts);
      const auto dropped = std::count(slot.begin(), slot.end(), -1);
      if (capacity == 0) {
        EXPECT_EQ(dropped, std::ptrdiff_t(nA)) << "capacity 0 keeps nothing";
      }
      if (capacity == sh.N) {
        EXPECT_EQ(dropped, 0) << "capacity N keeps everything";
      }
      if (sh.N == 37 && capacity == (sh.k * sh.N + sh.E - 1) / sh.E) {
        EXPECT_GT(dropped, 0) << "the imbalanced logits should overflow expert 0";
      }
    }
  }
}

TEST_P(CpuOps, MoeAuxLoss) {
  std::mt19937 rng(84);
  const float coef = 0.37f, grad_scale = 0.25f;
  for (const auto& sh : kMoeShapes) {
    SCOPED_TRACE(moe_str(sh));
    const std::size_t nP = std::size_t(sh.N) * sh.E;
    const FVec logits = moe_logits(rng, sh.N, sh.E);
    Vec Z = to_double(logits);
    const RefRoute route = ref_moe_router(Z, sh.N, sh.E, sh.k);
    // capacity of factor 1: kept < routed for some expert, and f_e must use routed
    const std::vector<int32_t> counts =
        ref_moe_assign(route.expert, sh.N, sh.E, sh.k, (sh.k * sh.N + sh.E - 1) / sh.E).counts;
    if (sh.N == 37) {
      ASSERT_NE(counts[0], counts[sh.E]) << "kept and routed should differ for expert 0";
    }

    const FVec probs(route.probs.begin(), route.probs.end());
    // dlogits starts at the size of the increments (~1e-4), so that after − before keeps their digits
    const FVec pre = rand_floats(rng, nP, -1e-3f, 1e-3f);
    const double initial = 0.5;
    float* d_dlogits = dev.put(pre, MemCategory::gradients);  // accumulates
    double* d_aux = dev.put_double(initial);                    // accumulates
    be->moe_aux_loss(d_dlogits, d_aux, dev.put(probs), dev.put_ints(counts), sh.N, sh.E, sh.k, coef, grad_scale);
    const double ref_loss = ref_moe_aux_loss(Z, counts, sh.N, sh.E, sh.k, coef);
    EXPECT_NEAR(dev.get_double(d_aux) - initial, ref_loss, kFwdTol * ref_loss) << "aux_sum increment";

    const Vec inc = delta(dev.get(d_dlogits, nP), pre);
    if (sh.k == sh.E) {
      // every expert routed N times: f_e = 1/E, the loss is coef whatever the logits, no gradient
      EXPECT_NEAR(ref_loss, coef, 1e-12);
      for (std::size_t i = 0; i < nP; ++i) EXPECT_LE(std::fabs(inc[i]), 1e-7) << i;
      continue;
    }
    const Vec fd = numeric_grad(Z, [&] { return grad_scale * ref_moe_aux_loss(Z, counts, sh.N, sh.E, sh.k, coef); });
    // dlogits[n, i] = p_i · (c_i − Σ_e c_e·p_e), c_e = grad_scale · coef · E · f_e / N
    Vec an(nP);
    for (int n = 0; n < sh.N; ++n) {
      const double* p = &route.probs[std::size_t(n) * sh.E];
      Vec c(sh.E);
      double cp = 0;
      for (int e = 0; e < sh.E; ++e) {
        c[e] = double(grad_scale) * coef * sh.E * (double(counts[sh.E + e]) / (double(sh.N) * sh.k)) / sh.N;
        cp += c[e] * p[e];
      }
      for (int i = 0; i < sh.E; ++i) an[std::size_t(n) * sh.E + i] = p[i] * (c[i] - cp);
    }
    ASSERT_TRUE(close(an, fd, kRefSelfTol, "reference dlogits"));
    EXPECT_TRUE(close(inc, fd, kGradTol, "dlogits increment vs finite differences"));
    EXPECT_TRUE(close(inc, an, kGradTol, "dlogits increment vs analytic"));
  }
}

// Dispatch and combine for every shape and capacity. The buffers hold C = capacity + 1 slots, so
// every expert has slots that no assignment fills: dispatch must zero them, combine must not read
// them (the expert outputs there are random, as an MLP's bias makes them).
TEST_P(CpuOps, MoeDispatchCombineForward) {
  std::mt19937 rng(85);
  for (const auto& sh : kMoeShapes) {
    const RefRoute route = ref_moe_router(to_double(moe_logits(rng, sh.N, sh.E)), sh.N, sh.E, sh.k);
    const FVec gate(route.gate.begin(), route.gate.end());
    for (int capacity : moe_capacities(sh)) {
      SCOPED_TRACE(moe_str(sh, capacity));
      const int C = capacity + 1;
      const std::size_t nX = std::size_t(sh.N) * sh.h, nB = std::size_t(sh.E) * C * sh.h;
      const std::vector<int32_t> slot = ref_moe_assign(route.expert, sh.N, sh.E, sh.k, capacity).slot;
      const int32_t* d_expert = dev.put_ints(route.expert);
      const int32_t* d_slot = dev.put_ints(slot);

      const FVec inp = rand_floats(rng, nX);
      float* d_buf = dev.poisoned(nB);
      be->moe_dispatch(d_buf, dev.put(inp), d_expert, d_slot, sh.N, sh.E, sh.k, C, sh.h);
      EXPECT_TRUE(same(dev.get(d_buf, nB),
                       ref_moe_dispatch(to_double(inp), route.expert, slot, sh.N, sh.E, sh.k, C, sh.h), "buf"));

      const FVec y = rand_floats(rng, nB);  // the experts' outputs, every slot
      float* d_out = dev.poisoned(nX);
      be->moe_combine(d_out, dev.put(y), dev.put(gate), d_expert, d_slot, sh.N, sh.E, sh.k, C, sh.h);
      const FVec out = dev.get(d_out, nX);
      EXPECT_TRUE(close_or_zero(out, ref_moe_combine(to_double(y), route.gate, route.expert, slot, sh.N, sh.k, C, sh.h),
                                kFwdTol, "out"));
      for (int n = 0; n < sh.N; ++n) {
        if (any_kept(slot, n, sh.k)) continue;
        for (int c = 0; c < sh.h; ++c) EXPECT_EQ(out[std::size_t(n) * sh.h + c], 0.0f) << "all dropped: token " << n;
      }
    }
  }
}

TEST_P(CpuOps, MoeDispatchBackward) {
  std::mt19937 rng(86);
  for (const auto& sh : kMoeShapes) {
    const RefRoute route = ref_moe_router(to_double(moe_logits(rng, sh.N, sh.E)), sh.N, sh.E, sh.k);
    for (int capacity : moe_capacities(sh)) {
      SCOPED_TRACE(moe_str(sh, capacity));
      const int C = capacity + 1;
      const std::size_t nX = std::size_t(sh.N) * sh.h, nB = std::size_t(sh.E) * C * sh.h;
      const std::vector<int32_t> slot = ref_moe_assign(route.expert, sh.N, sh.E, sh.k, capacity).slot;
      const FVec inp = rand_floats(rng, nX), dbuf = rand_floats(rng, nB);

      Vec X = to_double(inp);
      const Vec DB = to_double(dbuf);
      const Vec fd = numeric_grad(
          X, [&] { return dot(DB, ref_moe_dispatch(X, route.expert, slot, sh.N, sh.E, sh.k, C, sh.h)); });
      Vec an(nX, 0.0);
      for (std::size_t a = 0; a < slot.size(); ++a) {
        if (slot[a] < 0) continue;
        const std::size_t n = a / sh.k;
        for (int c = 0; c < sh.h; ++c) an[n * sh.h + c] += DB[(std::size_t(route.expert[a]) * C + slot[a]) * sh.h + c];
      }
      ASSERT_TRUE(close_or_zero(an, fd, kRefSelfTol, "reference dinp"));

      float* d_dinp = dev.poisoned(nX, MemCategory::gradients);  // overwritten
      be->moe_dispatch_backward(d_dinp, dev.put(dbuf), dev.put_ints(route.expert), dev.put_ints(slot), sh.N, sh.E,
                                sh.k, C, sh.h);
      const FVec got = dev.get(d_dinp, nX);
      EXPECT_TRUE(close_or_zero(got, fd, kGradTol, "dinp vs finite differences"));
      EXPECT_TRUE(close_or_zero(got, an, kGradTol, "dinp vs analytic"));
    }
  }
}

TEST_P(CpuOps, MoeCombineBackward) {
  std::mt19937 rng(87);
  for (const auto& sh : kMoeShapes) {
    const RefRoute route = ref_moe_router(to_double(moe_logits(rng, sh.N, sh.E)), sh.N, sh.E, sh.k);
    const FVec gate(route.gate.begin(), route.gate.end());
    for (int capacity : moe_capacities(sh)) {
      SCOPED_TRACE(moe_str(sh, capacity));
      const int C = capacity + 1;
      const std::size_t nX = std::size_t(sh.N) * sh.h, nB = std::size_t(sh.E) * C * sh.h, nA = gate.size();
      const std::vector<int32_t> slot = ref_moe_assign(route.expert, sh.N, sh.E, sh.k, capacity).slot;
      const FVec y = rand_floats(rng, nB), dout = rand_floats(rng, nX);

      // L = <dout, combine(y, gate)>, differentiated in the expert outputs y and in the gates
      Vec Y = to_double(y), G = to_double(gate);
      const Vec DO = to_double(dout);
      auto L = [&] { return dot(DO, ref_moe_combine(Y, G, route.expert, slot, sh.N, sh.k, C, sh.h)); };
      const Vec fd_dbuf = numeric_grad(Y, L), fd_dgate = numeric_grad(G, L);
      Vec an_dbuf(nB, 0.0), an_dgate(nA, 0.0);
      std::vector<bool> filled(std::size_t(sh.E) * C, false);
      for (std::size_t a = 0; a < nA; ++a) {
        if (slot[a] < 0) continue;
        const std::size_t n = a / sh.k, row = std::size_t(route.expert[a]) * C + slot[a];
        filled[row] = true;
        for (int c = 0; c < sh.h; ++c) {
          an_dbuf[row * sh.h + c] = G[a] * DO[n * sh.h + c];
          an_dgate[a] += DO[n * sh.h + c] * Y[row * sh.h + c];
        }
      }
      ASSERT_TRUE(close_or_zero(an_dbuf, fd_dbuf, kRefSelfTol, "reference dbuf"));
      ASSERT_TRUE(close_or_zero(an_dgate, fd_dgate, kRefSelfTol, "reference dgate"));

      float* d_dbuf = dev.poisoned(nB, MemCategory::gradients);  // overwritten
      float* d_dgate = dev.poisoned(nA, MemCategory::gradients);  // overwritten
      be->moe_combine_backward(d_dbuf, d_dgate, dev.put(dout), dev.put(y), dev.put(gate), dev.put_ints(route.expert),
                               dev.put_ints(slot), sh.N, sh.E, sh.k, C, sh.h);
      const FVec got_dbuf = dev.get(d_dbuf, nB), got_dgate = dev.get(d_dgate, nA);
      EXPECT_TRUE(close_or_zero(got_dbuf, fd_dbuf, kGradTol, "dbuf vs finite differences"));
      EXPECT_TRUE(close_or_zero(got_dbuf, an_dbuf, kGradTol, "dbuf vs analytic"));
      EXPECT_TRUE(close_or_zero(got_dgate, fd_dgate, kGradTol, "dgate vs finite differences"));
      EXPECT_TRUE(close_or_zero(got_dgate, an_dgate, kGradTol, "dgate vs analytic"));
      for (std::size_t a = 0; a < nA; ++a)
        if (slot[a] < 0) {
          EXPECT_EQ(got_dgate[a], 0.0f) << "dropped assignment " << a;
        }
      for (std::size_t row = 0; row < filled.size(); ++row) {
        if (filled[row]) continue;
        for (int c = 0; c < sh.h; ++c) EXPECT_EQ(got_dbuf[row * sh.h + c], 0.0f) << "empty slot row " << row;
      }
    }
  }
}

// =================================================================================================
// context parallelism: attention by position over blocks of keys, merged through the log-sum-exp
// =================================================================================================

const double kNegInf = -std::numeric_limits<double>::infinity();

// Attention of queries q (B, Sq, C) over keys k and values v (B, Sk, C) with the mask by position (key j
// visible to query i when pos_k[j] ≤ pos_q[i]), in float64: out (B, Sq, C), 0 for a query that sees no
// key; lse (B, heads, Sq) = log Σ_visible exp(q·k/√d), −inf there.
struct RefBlockAttention {
  Vec out, lse;
};
RefBlockAttention ref_block_attention(const Vec& q, const Vec& k, const Vec& v, const std::vector<int32_t>& pos_q,
                                      const std::vector<int32_t>& pos_k, int B, int C, int NH) {
  const int Sq = static_cast<int>(pos_q.size()), Sk = static_cast<int>(pos_k.size()), d = C / NH;
  const double sc = 1.0 / std::sqrt(static_cast<double>(d));
  RefBlockAttention r{Vec(std::size_t(B) * Sq * C, 0.0), Vec(std::size_t(B) * NH * Sq, kNegInf)};
  Vec s(Sk);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < Sq; ++i) {
        const double* qi = &q[(std::size_t(b) * Sq + i) * C + std::size_t(h) * d];
        double mx = kNegInf;
        for (int j = 0; j < Sk; ++j) {
          if (pos_k[j] > pos_q[i]) continue;
          const double* kj = &k[(std::size_t(b) * Sk + j) * C + std::size_t(h) * d];
          double a = 0;
          for (int c = 0; c < d; ++c) a += qi[c] * kj[c];
          s[j] = a * sc;
          mx = std::max(mx, s[j]);
        }
        if (mx == kNegInf) continue;  // no visible key
        double sum = 0;
        for (int j = 0; j < Sk; ++j)
          if (pos_k[j] <= pos_q[i]) sum += std::exp(s[j] - mx);
        double* o = &r.out[(std::size_t(b) * Sq + i) * C + std::size_t(h) * d];
        for (int j = 0; j < Sk; ++j) {
          if (pos_k[j] > pos_q[i]) continue;
          const double* vj = &v[(std::size_t(b) * Sk + j) * C + std::size_t(h) * d];
          for (int c = 0; c < d; ++c) o[c] += std::exp(s[j] - mx) / sum * vj[c];
        }
        r.lse[(std::size_t(b) * NH + h) * Sq + i] = mx + std::log(sum);
      }
  return r;
}

// Writes compact rows (n, cols) into buf at column `col` of rows `stride` floats apart.
template <typename T>
void place_rows(std::vector<T>& buf, const std::vector<T>& rows, int cols, int stride, int col) {
  const std::size_t n = rows.size() / cols;
  for (std::size_t r = 0; r < n; ++r)
    std::copy_n(rows.begin() + r * cols, cols, buf.begin() + r * stride + col);
}
// The compact rows (n, cols) at column `col` of a buffer of rows `stride` floats apart.
template <typename T>
std::vector<T> take_rows(const std::vector<T>& buf, std::size_t n, int cols, int stride, int col) {
  std::vector<T> rows(n * cols);
  for (std::size_t r = 0; r < n; ++r)
    std::copy_n(buf.begin() + r * stride + col, cols, rows.begin() + r * cols);
  return rows;
}

// Key blocks concatenated along the sequence: (B, Σ Sk, C) from blocks (B, Sk_i, C).
Vec concat_blocks(const std::vector<Vec>& blocks, const std::vector<int>& lengths, int B, int C) {
  int total = 0;
  for (int s : lengths) total += s;
  Vec all(std::size_t(B) * total * C);
  for (int b = 0; b < B; ++b) {
    int off = 0;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      std::copy_n(blocks[i].begin() + std::size_t(b) * lengths[i] * C, std::size_t(lengths[i]) * C,
                  all.begin() + (std::size_t(b) * total + off) * C);
      off += lengths[i];
    }
  }
  return all;
}

std::vector<int32_t> positions(std::initializer_list<std::pair<int, int>> ranges) {  // [first, last] ranges
  std::vector<int32_t> p;
  for (auto [first, last] : ranges)
    for (int i = first; i <= last; ++i) p.push_back(i);
  return p;
}

// lse: −inf exactly where the reference is −inf; the finite entries to `tol` (relative L2 over them).
::testing::AssertionResult close_lse(const FVec& got, const Vec& ref, double tol, const std::string& what) {
  FVec got_finite;
  Vec ref_finite;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (ref[i] == kNegInf) {
      if (got[i] != -std::numeric_limits<float>::infinity()) {
        return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i] << ", expected -inf";
      }
      continue;
    }
    got_finite.push_back(got[i]);
    ref_finite.push_back(ref[i]);
  }
  if (ref_finite.empty()) return ::testing::AssertionSuccess();
  return close(got_finite, ref_finite, tol, what);
}

// Whether query i sees any key.
bool sees_any(const std::vector<int32_t>& pos_k, int32_t pos_q) {
  return std::any_of(pos_k.begin(), pos_k.end(), [&](int32_t p) { return p <= pos_q; });
}

// Forward cases: q from a (B, Sq, 3C + q_pad) buffer; k and v from the same buffer (`shared`: the diagonal
// block, pos_k = pos_q) or from a packed (B, Sk, 2C + kv_pad) one. Every float that is not data is NaN, so
// a read outside a row's columns shows in the output.
struct CpCase {
  const char* name;
  int B, C, NH;
  std::vector<int32_t> pos_q, pos_k;
  bool shared;
  int q_pad, kv_pad;
};
const CpCase kCpForwardCases[] = {
    {"zigzag diagonal (stride 3C)", 2, 15, 5, positions({{0, 3}, {12, 15}}), positions({{0, 3}, {12, 15}}), true, 0, 0},
    {"zigzag, the middle chunk (stride 3C and 2C)", 2, 72, 3, positions({{0, 3}, {12, 15}}), positions({{4, 11}}),
     false, 0, 0},
    {"keys in the future of every query", 3, 21, 3, positions({{0, 6}}), positions({{7, 11}}), false, 0, 0},
    {"keys in the past of every query (padded strides)", 1, 21, 7, positions({{10, 16}}), positions({{0, 9}}), false,
     5, 3},
    {"unsorted, repeated positions, Sq < Sk (padded strides)", 2, 15, 3, {5, 2, 9, 9, 0, 13},
     {3, 9, 1, 14, 6, 2, 9, 11, 0}, false, 1, 2},
    {"Sq > Sk, odd heads", 3, 35, 7, positions({{0, 16}}), {16, 3, 8}, false, 0, 0},
    {"one query, one key", 1, 8, 2, {4}, {4}, true, 0, 0},
};

TEST_P(CpuOps, AttentionBlockForward) {
  std::mt19937 rng(91);
  for (const CpCase& cs : kCpForwardCases) {
    SCOPED_TRACE(cs.name);
    const int B = cs.B, C = cs.C, NH = cs.NH, Sq = int(cs.pos_q.size()), Sk = int(cs.pos_k.size());
    const std::size_t nq = std::size_t(B) * Sq * C, nk = std::size_t(B) * Sk * C, nstat = std::size_t(B) * NH * Sq;
    const FVec q = rand_floats(rng, nq, -2.0f, 2.0f), kk = rand_floats(rng, nk, -2.0f, 2.0f),
               vv = rand_floats(rng, nk, -2.0f, 2.0f);
    const int q_stride = 3 * C + cs.q_pad, kv_stride = cs.shared ? q_stride : 2 * C + cs.kv_pad;
    FVec qbuf(std::size_t(B) * Sq * q_stride, kPoison), kvbuf(std::size_t(B) * Sk * kv_stride, kPoison);
    place_rows(qbuf, q, C, q_stride, 0);
    if (cs.shared) {
      place_rows(qbuf, kk, C, q_stride, C);
      place_rows(qbuf, vv, C, q_stride, 2 * C);
    } else {
      place_rows(kvbuf, kk, C, kv_stride, 0);
      place_rows(kvbuf, vv, C, kv_stride, C);
    }
    float* d_q = dev.put(qbuf);
    float* d_kv = cs.shared ? d_q + C : dev.put(kvbuf);
    float* d_out = dev.poisoned(nq);
    float* d_lse = dev.poisoned(nstat);
    be->attention_block_forward(d_out, d_lse, d_q, d_kv, d_kv + C, q_stride, kv_stride, dev.put_ints(cs.pos_q),
                                dev.put_ints(cs.pos_k), B, Sq, Sk, C, NH);
    const RefBlockAttention ref =
        ref_block_attention(to_double(q), to_double(kk), to_double(vv), cs.pos_q, cs.pos_k, B, C, NH);
    const FVec out = dev.get(d_out, nq), lse = dev.get(d_lse, nstat);
    EXPECT_TRUE(close_or_zero(out, ref.out, kFwdTol, "out"));
    EXPECT_TRUE(close_lse(lse, ref.lse, kFwdTol, "lse"));
    // a query that sees no key: out exactly 0 (lse −inf is checked above)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < Sq; ++i) {
        if (sees_any(cs.pos_k, cs.pos_q[i])) continue;
        for (int c = 0; c < C; ++c) EXPECT_EQ(out[(std::size_t(b) * Sq + i) * C + c], 0.0f) << "query " << i;
      }
  }
}

// The running result of a context-parallel forward: block 0's, then every further block merged in.
struct DevKvBlock {
  std::vector<int32_t> pos;
  const float* k;
  const float* v;
  float* dk;
  float* dv;
  int stride;
};
void cp_forward(Backend& be, Dev& dev, float* out, float* lse, const float* q, int q_stride, const int32_t* d_pos_q,
                const std::vector<DevKvBlock>& blocks, int B, int Sq, int C, int NH) {
  float* out_b = dev.poisoned(std::size_t(B) * Sq * C);
  float* lse_b = dev.poisoned(std::size_t(B) * NH * Sq);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const DevKvBlock& kv = blocks[i];
    const int Sk = int(kv.pos.size());
    be.attention_block_forward(i == 0 ? out : out_b, i == 0 ? lse : lse_b, q, kv.k, kv.v, q_stride, kv.stride,
                               d_pos_q, dev.put_ints(kv.pos), B, Sq, Sk, C, NH);
    if (i > 0) be.attention_merge(out, lse, out_b, lse_b, B, Sq, C, NH);
  }
}

// Queries at zigzag positions of a 16-token sequence against every key, the keys split into blocks in
// several ways and orders (one whose first block is invisible to some queries: the merge starts from −inf).
TEST_P(CpuOps, AttentionMergeOverKeySplitsEqualsFullAttention) {
  std::mt19937 rng(92);
  const int S = 16;
  const std::vector<std::vector<std::vector<int32_t>>> splits = {
      {positions({{0, 3}, {12, 15}}), positions({{4, 11}})},
      {positions({{4, 11}}), positions({{0, 3}, {12, 15}})},
      {positions({{0, 5}}), positions({{6, 10}}), positions({{11, 15}})},
      {positions({{13, 15}}), positions({{7, 12}}), positions({{0, 6}})},
      {positions({{0, 15}})},
  };
  for (auto [B, C, NH] : {std::tuple{2, 15, 5}, std::tuple{1, 72, 3}, std::tuple{3, 21, 7}}) {
    const std::vector<int32_t> pos_q = positions({{0, 3}, {12, 15}});
    const int Sq = int(pos_q.size());
    const std::size_t nq = std::size_t(B) * Sq * C, nstat = std::size_t(B) * NH * Sq;
    // the whole sequence's keys and values, (B, S, C) each
    const FVec q = rand_floats(rng, nq, -2.0f, 2.0f);
    const FVec k = rand_floats(rng, std::size_t(B) * S * C, -2.0f, 2.0f), v = rand_floats(rng, k.size(), -2.0f, 2.0f);
    const RefBlockAttention ref =
        ref_block_attention(to_double(q), to_double(k), to_double(v), pos_q, positions({{0, S - 1}}), B, C, NH);
    for (std::size_t si = 0; si < splits.size(); ++si) {
      SCOPED_TRACE(shape_str("B=%d C=%d heads=%d split #%d", B, C, NH, int(si)));
      std::vector<DevKvBlock> blocks;
      for (const auto& pos : splits[si]) {  // each block packed (B, Sk, 2C)
        const int Sk = int(pos.size());
        FVec kv(std::size_t(B) * Sk * 2 * C);
        for (int b = 0; b < B; ++b)
          for (int j = 0; j < Sk; ++j)
            for (int c = 0; c < C; ++c) {
              kv[(std::size_t(b) * Sk + j) * 2 * C + c] = k[(std::size_t(b) * S + pos[j]) * C + c];
              kv[(std::size_t(b) * Sk + j) * 2 * C + C + c] = v[(std::size_t(b) * S + pos[j]) * C + c];
            }
        float* d_kv = dev.put(kv);
        blocks.push_back({pos, d_kv, d_kv + C, nullptr, nullptr, 2 * C});
      }
      float* d_out = dev.poisoned(nq);
      float* d_lse = dev.poisoned(nstat);
      cp_forward(*be, dev, d_out, d_lse, dev.put(q), C, dev.put_ints(pos_q), blocks, B, Sq, C, NH);
      EXPECT_TRUE(close(dev.get(d_out, nq), ref.out, kFwdTol, "merged out"));
      EXPECT_TRUE(close_lse(dev.get(d_lse, nstat), ref.lse, kFwdTol, "merged lse"));
    }
  }
}

// Positions 0..S−1 and one block of every key: the backend's causal attention_forward; also with the keys
// split in two and merged.
TEST_P(CpuOps, AttentionBlockForwardMatchesAttentionForward) {
  std::mt19937 rng(93);
  for (const auto& sh : kAttnShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH));
    const std::size_t n_out = std::size_t(sh.B) * sh.S * sh.C, nstat = std::size_t(sh.B) * sh.NH * sh.S;
    float* d_qkv = dev.put(rand_floats(rng, std::size_t(sh.B) * sh.S * 3 * sh.C, -2.0f, 2.0f));
    float* d_ref = dev.poisoned(n_out);
    be->attention_forward(d_ref, dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH)), d_qkv, sh.B, sh.S,
                          sh.C, sh.NH);
    const FVec ref = dev.get(d_ref, n_out);
    const std::vector<int32_t> pos = positions({{0, sh.S - 1}});
    const int32_t* d_pos = dev.put_ints(pos);
    float* d_out = dev.poisoned(n_out);
    float* d_lse = dev.poisoned(nstat);
    be->attention_block_forward(d_out, d_lse, d_qkv, d_qkv + sh.C, d_qkv + 2 * sh.C, 3 * sh.C, 3 * sh.C, d_pos, d_pos,
                                sh.B, sh.S, sh.S, sh.C, sh.NH);
    EXPECT_TRUE(close(dev.get(d_out, n_out), to_double(ref), 1e-5, "one block vs attention_forward"));
    if (sh.S < 2) continue;
    // the keys split at the middle: each block is a slice of the same qkv buffer, stride 3C
    const int half = sh.S / 2;
    const std::size_t off = std::size_t(half) * 3 * sh.C;
    std::vector<DevKvBlock> blocks = {
        {positions({{0, half - 1}}), d_qkv + sh.C, d_qkv + 2 * sh.C, nullptr, nullptr, 3 * sh.C},
        {positions({{half, sh.S - 1}}), d_qkv + off + sh.C, d_qkv + off + 2 * sh.C, nullptr, nullptr, 3 * sh.C}};
    // the blocks hold B samples each of S/2 rows, so sample b's rows are B-strided: one sample at a time
    for (int b = 0; b < sh.B; ++b) {
      float* q_b = d_qkv + std::size_t(b) * sh.S * 3 * sh.C;
      std::vector<DevKvBlock> bb = blocks;
      for (DevKvBlock& blk : bb) {
        blk.k += std::size_t(b) * sh.S * 3 * sh.C;
        blk.v += std::size_t(b) * sh.S * 3 * sh.C;
      }
      float* o_b = dev.poisoned(std::size_t(sh.S) * sh.C);
      float* l_b = dev.poisoned(std::size_t(sh.NH) * sh.S);
      cp_forward(*be, dev, o_b, l_b, q_b, 3 * sh.C, d_pos, bb, 1, sh.S, sh.C, sh.NH);
      const FVec ref_b(ref.begin() + std::size_t(b) * sh.S * sh.C, ref.begin() + std::size_t(b + 1) * sh.S * sh.C);
      EXPECT_TRUE(close(dev.get(o_b, std::size_t(sh.S) * sh.C), to_double(ref_b), 1e-5,
                        "two blocks merged vs attention_forward, sample " + std::to_string(b)));
    }
  }
}

// The merge's cases one by one, against the formula in double: both finite (close and 100 apart, large),
// one side −inf (the other side's values exactly: the −inf side's out is NaN here and contributes nothing),
// both −inf (out and lse unchanged, whatever out holds).
TEST_P(CpuOps, AttentionMergeInfinities) {
  const float inf = std::numeric_limits<float>::infinity();
  const int B = 2, Sq = 3, C = 10, NH = 2, d = C / NH;
  // (lse, lse_b) per (b, h, i) in (B, heads, Sq) order
  const FVec lse = {0.5f, -inf, 1.0f, -inf, 300.0f, -2.0f, 3.0f, 0.0f, -inf, 7.0f, 100.0f, -inf};
  const FVec lse_b = {1.5f, 2.0f, -inf, -inf, 300.5f, -2.0f, 2.0f, 100.0f, -inf, -1.0f, 0.0f, 4.0f};
  std::mt19937 rng(94);
  FVec out = rand_floats(rng, std::size_t(B) * Sq * C), out_b = rand_floats(rng, out.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < Sq; ++i) {
        const std::size_t s = (std::size_t(b) * NH + h) * Sq + i, o = (std::size_t(b) * Sq + i) * C + h * d;
        if (lse[s] == -inf) std::fill_n(out.begin() + o, d, kPoison);
        if (lse_b[s] == -inf) std::fill_n(out_b.begin() + o, d, kPoison);
      }
  auto bits_equal = [](float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; };
  float* d_out = dev.put(out);
  float* d_lse = dev.put(lse);
  be->attention_merge(d_out, d_lse, dev.put(out_b), dev.put(lse_b), B, Sq, C, NH);
  const FVec got = dev.get(d_out, out.size()), got_lse = dev.get(d_lse, lse.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < Sq; ++i) {
        const std::size_t s = (std::size_t(b) * NH + h) * Sq + i, o = (std::size_t(b) * Sq + i) * C + h * d;
        SCOPED_TRACE(shape_str("b=%d h=%d i=%d", b, h, i));
        if (lse_b[s] == -inf) {  // unchanged, also when both are −inf
          EXPECT_EQ(got_lse[s], lse[s]);
          for (int c = 0; c < d; ++c) EXPECT_TRUE(bits_equal(got[o + c], out[o + c])) << got[o + c];
        } else if (lse[s] == -inf) {  // the block's result exactly
          EXPECT_EQ(got_lse[s], lse_b[s]);
          for (int c = 0; c < d; ++c) EXPECT_EQ(got[o + c], out_b[o + c]);
        } else {
          const double m = std::max<double>(lse[s], lse_b[s]), w = std::exp(lse[s] - m), wb = std::exp(lse_b[s] - m);
          EXPECT_NEAR(got_lse[s], m + std::log(w + wb), 1e-6 * std::abs(m) + 1e-6);
          for (int c = 0; c < d; ++c) EXPECT_NEAR(got[o + c], (w * out[o + c] + wb * out_b[o + c]) / (w + wb), 1e-6);
        }
      }
}

TEST_P(CpuOps, AttentionBlockDelta) {
  std::mt19937 rng(95);
  for (auto [B, Sq, C, NH] : {std::tuple{2, 17, 72, 3}, std::tuple{1, 1, 8, 2}, std::tuple{3, 5, 15, 5}}) {
    SCOPED_TRACE(shape_str("B=%d Sq=%d C=%d heads=%d", B, Sq, C, NH));
    const int d = C / NH;
    const std::size_t n = std::size_t(B) * Sq * C, nstat = std::size_t(B) * NH * Sq;
    const FVec dout = rand_floats(rng, n), out = rand_floats(rng, n);
    Vec ref(nstat, 0.0);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < NH; ++h)
        for (int i = 0; i < Sq; ++i)
          for (int c = 0; c < d; ++c) {
            const std::size_t o = (std::size_t(b) * Sq + i) * C + std::size_t(h) * d + c;
            ref[(std::size_t(b) * NH + h) * Sq + i] += double(dout[o]) * out[o];
          }
    float* d_delta = dev.poisoned(nstat);  // overwritten
    be->attention_block_delta(d_delta, dev.put(dout), dev.put(out), B, Sq, C, NH);
    EXPECT_TRUE(close(dev.get(d_delta, nstat), ref, kFwdTol, "delta"));
  }
}

// The flash-style backward over key blocks, from the point of view of one rank of a context-parallel
// group: its queries at pos_q (q, and its own keys and values when `own`, in a (B, Sq, 3C + pad) qkv
// buffer), the other blocks packed (B, Sk, 2C + pad). Forward: block by block, merged; delta from the final
// out; then every block's backward accumulates into dq and its own dk, dv. All against central finite
// differences of L = <dout, attention over every key> in double.
struct CpBackwardCase {
  const char* name;
  int B, C, NH;
  std::vector<int32_t> pos_q;
  bool own;
  std::vector<std::vector<int32_t>> remote;
  int q_pad, kv_pad;
};
const CpBackwardCase kCpBackwardCases[] = {
    {"zigzag rank 0 of 2", 2, 15, 5, positions({{0, 3}, {12, 15}}), true, {positions({{4, 11}})}, 0, 0},
    {"zigzag rank 1 of 2, the others split: past, future", 1, 72, 3, positions({{4, 11}}), true,
     {positions({{0, 3}}), positions({{12, 15}})}, 0, 0},
    {"zigzag rank 0 of 4, three remote blocks (padded strides)", 2, 21, 7, positions({{0, 1}, {14, 15}}), true,
     {positions({{2, 3}, {12, 13}}), positions({{4, 5}, {10, 11}}), positions({{6, 9}})}, 3, 1},
    {"no own block: some queries see nothing", 2, 15, 3, positions({{0, 3}, {12, 15}}), false,
     {positions({{4, 7}}), positions({{8, 11}})}, 0, 0},
};

TEST_P(CpuOps, AttentionBlockBackwardVsFiniteDifferences) {
  std::mt19937 rng(96);
  const float kGuard = 777.0f;  // the gradient buffers' padding: never written
  for (const CpBackwardCase& cs : kCpBackwardCases) {
    SCOPED_TRACE(cs.name);
    const int B = cs.B, C = cs.C, NH = cs.NH, Sq = int(cs.pos_q.size());
    const int q_stride = 3 * C + cs.q_pad;
    const std::size_t nq = std::size_t(B) * Sq * C, nstat = std::size_t(B) * NH * Sq;
    // the blocks' keys and values (compact), in the order of the forward: own first, then the remote ones
    std::vector<std::vector<int32_t>> pos_blocks;
    if (cs.own) pos_blocks.push_back(cs.pos_q);
    for (const auto& p : cs.remote) pos_blocks.push_back(p);
    const std::size_t nblocks = pos_blocks.size();
    std::vector<int> lengths;
    for (const auto& p : pos_blocks) lengths.push_back(int(p.size()));
    std::vector<int32_t> pos_all;
    for (const auto& p : pos_blocks) pos_all.insert(pos_all.end(), p.begin(), p.end());
    const FVec q = rand_floats(rng, nq, -2.0f, 2.0f), dout = rand_floats(rng, nq);
    std::vector<FVec> ks, vs;
    for (int len : lengths) {
      ks.push_back(rand_floats(rng, std::size_t(B) * len * C, -2.0f, 2.0f));
      vs.push_back(rand_floats(rng, std::size_t(B) * len * C, -2.0f, 2.0f));
    }

    // finite differences of L in q and every block's k and v
    Vec Q = to_double(q);
    const Vec DO = to_double(dout);
    std::vector<Vec> K, V;
    for (std::size_t i = 0; i < nblocks; ++i) {
      K.push_back(to_double(ks[i]));
      V.push_back(to_double(vs[i]));
    }
    auto L = [&] {
      return dot(DO, ref_block_attention(Q, concat_blocks(K, lengths, B, C), concat_blocks(V, lengths, B, C),
                                         cs.pos_q, pos_all, B, C, NH)
                         .out);
    };
    const Vec fd_q = numeric_grad(Q, L);
    std::vector<Vec> fd_k, fd_v;
    for (std::size_t i = 0; i < nblocks; ++i) {
      fd_k.push_back(numeric_grad(K[i], L));
      fd_v.push_back(numeric_grad(V[i], L));
    }

    // device buffers: inputs padded with NaN, gradients pre-filled (they accumulate) with guard padding
    FVec qkv(std::size_t(B) * Sq * q_stride, kPoison), dqkv(qkv.size(), kGuard);
    place_rows(qkv, q, C, q_stride, 0);
    if (cs.own) {
      place_rows(qkv, ks[0], C, q_stride, C);
      place_rows(qkv, vs[0], C, q_stride, 2 * C);
    }
    for (int c = 0; c < 3; ++c) place_rows(dqkv, rand_floats(rng, nq), C, q_stride, c * C);
    float* d_qkv = dev.put(qkv);
    float* d_dqkv = dev.put(dqkv, MemCategory::gradients);
    std::vector<DevKvBlock> blocks;
    std::vector<FVec> dkv_before;
    if (cs.own) blocks.push_back({cs.pos_q, d_qkv + C, d_qkv + 2 * C, d_dqkv + C, d_dqkv + 2 * C, q_stride});
    for (std::size_t i = cs.own ? 1 : 0; i < nblocks; ++i) {
      const int kv_stride = 2 * C + cs.kv_pad;
      FVec kv(std::size_t(B) * lengths[i] * kv_stride, kPoison), dkv(kv.size(), kGuard);
      place_rows(kv, ks[i], C, kv_stride, 0);
      place_rows(kv, vs[i], C, kv_stride, C);
      for (int c = 0; c < 2; ++c)
        place_rows(dkv, rand_floats(rng, std::size_t(B) * lengths[i] * C), C, kv_stride, c * C);
      float* d_kv = dev.put(kv);
      float* d_dkv = dev.put(dkv, MemCategory::gradients);
      blocks.push_back({pos_blocks[i], d_kv, d_kv + C, d_dkv, d_dkv + C, kv_stride});
      dkv_before.push_back(dkv);
    }

    // forward, delta, then each block's backward
    const int32_t* d_pos_q = dev.put_ints(cs.pos_q);
    float* d_out = dev.poisoned(nq);
    float* d_lse = dev.poisoned(nstat);
    cp_forward(*be, dev, d_out, d_lse, d_qkv, q_stride, d_pos_q, blocks, B, Sq, C, NH);
    float* d_dout = dev.put(dout);
    float* d_delta = dev.poisoned(nstat);
    be->attention_block_delta(d_delta, d_dout, d_out, B, Sq, C, NH);
    for (const DevKvBlock& kv : blocks) {
      be->attention_block_backward(d_dqkv, kv.dk, kv.dv, d_dout, d_lse, d_delta, d_qkv, kv.k, kv.v, q_stride,
                                   kv.stride, d_pos_q, dev.put_ints(kv.pos), B, Sq, int(kv.pos.size()), C, NH);
    }

    // the final out and delta against the reference
    const RefBlockAttention ref = ref_block_attention(Q, concat_blocks(K, lengths, B, C),
                                                      concat_blocks(V, lengths, B, C), cs.pos_q, pos_all, B, C, NH);
    EXPECT_TRUE(close(dev.get(d_out, nq), ref.out, kFwdTol, "merged out"));
    EXPECT_TRUE(close_lse(dev.get(d_lse, nstat), ref.lse, kFwdTol, "merged lse"));
    Vec ref_delta(nstat, 0.0);
    const int d = C / NH;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < NH; ++h)
        for (int i = 0; i < Sq; ++i)
          for (int c = 0; c < d; ++c) {
            const std::size_t o = (std::size_t(b) * Sq + i) * C + std::size_t(h) * d + c;
            ref_delta[(std::size_t(b) * NH + h) * Sq + i] += DO[o] * ref.out[o];
          }
    EXPECT_TRUE(close(dev.get(d_delta, nstat), ref_delta, kFwdTol, "delta"));

    // the gradients' increments against the finite differences; padding untouched
    const FVec dqkv_after = dev.get(d_dqkv, dqkv.size());
    const std::size_t nrows_q = std::size_t(B) * Sq;
    EXPECT_TRUE(close(delta(take_rows(dqkv_after, nrows_q, C, q_stride, 0), take_rows(dqkv, nrows_q, C, q_stride, 0)),
                      fd_q, kGradTol, "dq"));
    for (int c = 1; c < 3; ++c) {
      const Vec inc =
          delta(take_rows(dqkv_after, nrows_q, C, q_stride, c * C), take_rows(dqkv, nrows_q, C, q_stride, c * C));
      if (cs.own) {
        EXPECT_TRUE(close(inc, c == 1 ? fd_k[0] : fd_v[0], kGradTol, c == 1 ? "own dk" : "own dv"));
      } else {
        EXPECT_TRUE(same(FVec(inc.begin(), inc.end()), Vec(inc.size(), 0.0), "dk, dv columns without an own block"));
      }
    }
    for (std::size_t r = 0; r < nrows_q; ++r)
      for (int c = 3 * C; c < q_stride; ++c) EXPECT_EQ(dqkv_after[r * q_stride + c], kGuard) << "dqkv padding";
    for (std::size_t i = cs.own ? 1 : 0, r = 0; i < nblocks; ++i, ++r) {
      SCOPED_TRACE("remote block " + std::to_string(r));
      const int kv_stride = blocks[i].stride;
      const std::size_t nrows = std::size_t(B) * lengths[i];
      const FVec after = dev.get(blocks[i].dk, dkv_before[r].size());
      const FVec& before = dkv_before[r];
      const Vec inc_k = delta(take_rows(after, nrows, C, kv_stride, 0), take_rows(before, nrows, C, kv_stride, 0));
      const Vec inc_v = delta(take_rows(after, nrows, C, kv_stride, C), take_rows(before, nrows, C, kv_stride, C));
      EXPECT_TRUE(close_or_zero(inc_k, fd_k[i], kGradTol, "dk"));
      EXPECT_TRUE(close_or_zero(inc_v, fd_v[i], kGradTol, "dv"));
      for (std::size_t row = 0; row < nrows; ++row)
        for (int c = 2 * C; c < kv_stride; ++c) EXPECT_EQ(after[row * kv_stride + c], kGuard) << "dkv padding";
    }
  }
}

// Positions 0..S−1 and one block of every key, q, k and v in the qkv buffer: the backend's
// attention_backward, with dqkv starting from zeros (the block backward accumulates).
TEST_P(CpuOps, AttentionBlockBackwardMatchesAttentionBackward) {
  std::mt19937 rng(97);
  for (const auto& sh : kAttnShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH));
    const std::size_t n_qkv = std::size_t(sh.B) * sh.S * 3 * sh.C, n_out = std::size_t(sh.B) * sh.S * sh.C;
    const std::size_t nstat = std::size_t(sh.B) * sh.NH * sh.S;
    float* d_qkv = dev.put(rand_floats(rng, n_qkv, -2.0f, 2.0f));
    float* d_dout = dev.put(rand_floats(rng, n_out));
    float* d_out = dev.poisoned(n_out);
    float* d_saved = dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH));
    be->attention_forward(d_out, d_saved, d_qkv, sh.B, sh.S, sh.C, sh.NH);
    float* d_ref = dev.poisoned(n_qkv);
    be->attention_backward(d_ref, dev.poisoned(be->attention_scratch_floats(sh.B, sh.S, sh.NH)), d_dout, d_out, d_qkv,
                           d_saved, sh.B, sh.S, sh.C, sh.NH);

    const int32_t* d_pos = dev.put_ints(positions({{0, sh.S - 1}}));
    const int s3 = 3 * sh.C;
    float* d_bout = dev.poisoned(n_out);
    float* d_lse = dev.poisoned(nstat);
    float* d_delta = dev.poisoned(nstat);
    float* d_dqkv = dev.put(FVec(n_qkv, 0.0f));
    be->attention_block_forward(d_bout, d_lse, d_qkv, d_qkv + sh.C, d_qkv + 2 * sh.C, s3, s3, d_pos, d_pos, sh.B,
                                sh.S, sh.S, sh.C, sh.NH);
    be->attention_block_delta(d_delta, d_dout, d_bout, sh.B, sh.S, sh.C, sh.NH);
    be->attention_block_backward(d_dqkv, d_dqkv + sh.C, d_dqkv + 2 * sh.C, d_dout, d_lse, d_delta, d_qkv,
                                 d_qkv + sh.C, d_qkv + 2 * sh.C, s3, s3, d_pos, d_pos, sh.B, sh.S, sh.S, sh.C, sh.NH);
    const FVec ref = dev.get(d_ref, n_qkv);
    EXPECT_TRUE(close(dev.get(d_dqkv, n_qkv), to_double(ref), 1e-5, "dqkv vs attention_backward"));
  }
}

// Grouped key/value heads (SPEC 2.5) in the block ops: one block over every key gives attention_gqa_forward's
// output and, through delta and the block backward, attention_gqa_backward's dqkv (a key/value head's
// gradient the sum over its query heads).
TEST_P(CpuOps, AttentionBlockWithGroupedHeadsMatchesGqaAttention) {
  std::mt19937 rng(99);
  for (const auto& sh : kGqaShapes) {
    SCOPED_TRACE(shape_str("B=%d S=%d C=%d heads=%d", sh.B, sh.S, sh.C, sh.NH) + " kv=" + std::to_string(sh.KV));
    const int d = sh.C / sh.NH, Ckv = sh.KV * d, W = sh.C + 2 * Ckv;
    const std::size_t n_qkv = std::size_t(sh.B) * sh.S * W, n_out = std::size_t(sh.B) * sh.S * sh.C;
    const std::size_t nstat = std::size_t(sh.B) * sh.NH * sh.S;
    float* d_qkv = dev.put(rand_floats(rng, n_qkv, -2.0f, 2.0f));
    float* d_dout = dev.put(rand_floats(rng, n_out));
    float* d_out = dev.poisoned(n_out);
    float* d_saved = dev.poisoned(be->attention_saved_floats(sh.B, sh.S, sh.NH));
    be->attention_gqa_forward(d_out, d_saved, d_qkv, sh.B, sh.S, sh.C, sh.NH, sh.KV);
    float* d_ref = dev.poisoned(n_qkv);
    be->attention_gqa_backward(d_ref, dev.poisoned(be->attention_scratch_floats(sh.B, sh.S, sh.NH)), d_dout, d_out,
                               d_qkv, d_saved, sh.B, sh.S, sh.C, sh.NH, sh.KV);
    const int32_t* d_pos = dev.put_ints(positions({{0, sh.S - 1}}));
    float *d_bout = dev.poisoned(n_out), *d_lse = dev.poisoned(nstat), *d_delta = dev.poisoned(nstat);
    float* d_dqkv = dev.put(FVec(n_qkv, 0.0f));
    be->attention_block_forward(d_bout, d_lse, d_qkv, d_qkv + sh.C, d_qkv + sh.C + Ckv, W, W, d_pos, d_pos, sh.B,
                                sh.S, sh.S, sh.C, sh.NH, sh.KV);
    EXPECT_TRUE(close(dev.get(d_bout, n_out), to_double(dev.get(d_out, n_out)), 1e-5, "out vs attention_gqa_forward"));
    be->attention_block_delta(d_delta, d_dout, d_bout, sh.B, sh.S, sh.C, sh.NH);
    be->attention_block_backward(d_dqkv, d_dqkv + sh.C, d_dqkv + sh.C + Ckv, d_dout, d_lse, d_delta, d_qkv,
                                 d_qkv + sh.C, d_qkv + sh.C + Ckv, W, W, d_pos, d_pos, sh.B, sh.S, sh.S, sh.C, sh.NH,
                                 sh.KV);
    EXPECT_TRUE(close(dev.get(d_dqkv, n_qkv), to_double(dev.get(d_ref, n_qkv)), 1e-5, "dqkv vs attention_gqa_backward"));
  }
}

// copy_2d: the copied rows and columns exactly; every other float of dst (between and after the rows, and
// beyond `rows`) unchanged, NaN included.
TEST_P(CpuOps, Copy2d) {
  std::mt19937 rng(98);
  struct Copy {
    std::size_t rows, cols, src_stride, dst_stride;
  };
  for (const Copy& cp : {Copy{5, 7, 10, 9}, Copy{6, 8, 8, 8}, Copy{4, 6, 18, 12}, Copy{4, 12, 12, 18},
                         Copy{1, 5, 5, 5}, Copy{3, 1, 2, 4}, Copy{0, 5, 6, 6}, Copy{4, 0, 6, 6}}) {
    SCOPED_TRACE(shape_str("rows=%d cols=%d src_stride=%d dst_stride=%d", int(cp.rows), int(cp.cols),
                           int(cp.src_stride), int(cp.dst_stride)));
    const std::size_t extra_rows = 2;  // dst continues past the copied rows
    const FVec src = rand_floats(rng, (cp.rows + extra_rows) * cp.src_stride);
    FVec dst = rand_floats(rng, (cp.rows + extra_rows) * cp.dst_stride);
    for (std::size_t i = 0; i < dst.size(); i += 3) dst[i] = kPoison;
    float* d_dst = dev.put(dst);
    be->copy_2d(d_dst, cp.dst_stride, dev.put(src), cp.src_stride, cp.rows, cp.cols);
    const FVec got = dev.get(d_dst, dst.size());
    for (std::size_t i = 0; i < dst.size(); ++i) {
      const std::size_t r = i / cp.dst_stride, c = i % cp.dst_stride;
      const float want = r < cp.rows && c < cp.cols ? src[r * cp.src_stride + c] : dst[i];
      EXPECT_EQ(0, std::memcmp(&got[i], &want, sizeof(float))) << "element " << i << ": " << got[i] << " vs " << want;
    }
  }
  // the exchange of context parallelism: k and v of a (B, S, 3C) qkv buffer into a packed (B, S, 2C) one, back
  const int N = 2 * 17, C = 24;
  const FVec qkv = rand_floats(rng, std::size_t(N) * 3 * C);
  float* d_qkv = dev.put(qkv);
  float* d_kv = dev.poisoned(std::size_t(N) * 2 * C);
  be->copy_2d(d_kv, 2 * C, d_qkv + C, 3 * C, N, 2 * C);
  const FVec kv = dev.get(d_kv, std::size_t(N) * 2 * C);
  EXPECT_EQ(kv, take_rows(qkv, N, 2 * C, 3 * C, C));
  float* d_back = dev.put(FVec(qkv.size(), 0.0f));
  be->copy_2d(d_back + C, 3 * C, d_kv, 2 * C, N, 2 * C);
  FVec want(qkv.size(), 0.0f);
  place_rows(want, kv, 2 * C, 3 * C, C);
  EXPECT_EQ(dev.get(d_back, qkv.size()), want);
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
  // the llama block's ops: RMSNorm, rotary positions, SwiGLU, grouped-query attention (4 heads, 2 kv heads)
  float *rms = dev.poisoned(nx), *rms_rstd = dev.poisoned(N);
  be.rmsnorm_forward(rms, rms_rstd, d_x, d_lnw, N, C);
  keep(rms, nx);
  float *rdx = dev.put(FVec(nx, 0.0f)), *rdw = dev.put(FVec(C, 0.0f));
  be.rmsnorm_backward(rdx, rdw, d_dx, d_x, d_lnw, rms_rstd, N, C);
  keep(rdx, nx);
  keep(rdw, C);
  std::vector<int32_t> positions(S);
  for (int i = 0; i < S; ++i) positions[i] = i;
  float* roped = dev.put(x);
  be.rope_forward(roped, C, dev.put_ints(positions), B, S, NH, C / NH, 10000.0);
  keep(roped, nx);
  float *sw = dev.poisoned(nx), *sw_dg = dev.poisoned(nx), *sw_du = dev.poisoned(nx);
  be.swiglu_forward(sw, d_x, d_dx, nx);
  be.swiglu_backward(sw_dg, sw_du, d_x, d_dx, d_x, nx);
  keep(sw, nx);
  keep(sw_dg, nx);
  keep(sw_du, nx);
  {
    const int KV = 2;
    const std::size_t ngqa = std::size_t(N) * (C + 2 * KV * (C / NH));  // the first rows of qkv serve
    float *gout = dev.poisoned(nx), *gsaved = dev.poisoned(be.attention_saved_floats(B, S, NH));
    be.attention_gqa_forward(gout, gsaved, d_qkv, B, S, C, NH, KV);
    keep(gout, nx);
    float* gdq = dev.poisoned(ngqa);
    be.attention_gqa_backward(gdq, dev.poisoned(be.attention_scratch_floats(B, S, NH)), d_dx, gout, d_qkv, gsaved, B,
                              S, C, NH, KV);
    keep(gdq, ngqa);
  }
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
  be.cross_entropy_forward_backward(d_logits, loss, dev.put_ints(targets), N, V, V, 1.0f / N);
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
  // mixture of experts: the routing and the slots computed on the host, the capacity of factor 1
  const int E = 5, k = 2, capacity = (k * N + E - 1) / E;
  const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E, nB = std::size_t(E) * capacity * C;
  const FVec router_logits = rand_floats(rng, nP, -2.0f, 2.0f);
  const RefRoute route = ref_moe_router(to_double(router_logits), N, E, k);
  const RefAssign assign = ref_moe_assign(route.expert, N, E, k, capacity);
  const FVec gate(route.gate.begin(), route.gate.end()), probs(route.probs.begin(), route.probs.end());
  const int32_t* d_expert = dev.put_ints(route.expert);
  const int32_t* d_slot = dev.put_ints(assign.slot);
  const float* d_gate = dev.put(gate);
  auto keep_ints = [&](const int32_t* q, std::size_t n) {
    const std::vector<int32_t> h = dev.get_ints(q, n);
    res.emplace_back(h.begin(), h.end());
  };
  int32_t* expert = dev.poisoned_ints(nA);
  float* rgate = dev.poisoned(nA);
  float* rprobs = dev.poisoned(nP);
  be.moe_router_forward(expert, rgate, rprobs, dev.put(router_logits), N, E, k);
  keep_ints(expert, nA);
  keep(rgate, nA);
  keep(rprobs, nP);
  float* dlogits = dev.poisoned(nP);
  be.moe_router_backward(dlogits, dev.put(rand_floats(rng, nA)), d_gate, d_expert, N, E, k);
  keep(dlogits, nP);
  int32_t* slot = dev.poisoned_ints(nA);
  int32_t* counts = dev.poisoned_ints(2 * E);
  be.moe_assign(slot, counts, d_expert, N, E, k, capacity);
  keep_ints(slot, nA);
  keep_ints(counts, 2 * E);
  float* aux_dlogits = dev.put(FVec(nP, 0.0f));
  double* aux = dev.put_double(0.0);
  be.moe_aux_loss(aux_dlogits, aux, dev.put(probs), dev.put_ints(assign.counts), N, E, k, 0.01f, 0.5f);
  keep(aux_dlogits, nP);
  res.push_back({dev.get_double(aux)});
  float* buf = dev.poisoned(nB);
  be.moe_dispatch(buf, d_x, d_expert, d_slot, N, E, k, capacity, C);
  keep(buf, nB);
  float* moe_dinp = dev.poisoned(nx);
  const float* d_ybuf = dev.put(rand_floats(rng, nB));
  be.moe_dispatch_backward(moe_dinp, d_ybuf, d_expert, d_slot, N, E, k, capacity, C);
  keep(moe_dinp, nx);
  float* moe_out = dev.poisoned(nx);
  be.moe_combine(moe_out, d_ybuf, d_gate, d_expert, d_slot, N, E, k, capacity, C);
  keep(moe_out, nx);
  float* dbuf = dev.poisoned(nB);
  float* dgate = dev.poisoned(nA);
  be.moe_combine_backward(dbuf, dgate, d_dx, d_ybuf, d_gate, d_expert, d_slot, N, E, k, capacity, C);
  keep(dbuf, nB);
  keep(dgate, nA);
  // context parallelism: queries at zigzag positions against their own block (in qkv, stride 3C) and a
  // packed key-value block (stride 2C) of the positions between, merged; delta; both blocks' backward
  std::vector<int32_t> cp_pos_q, cp_pos_k;
  for (int i = 0; i < S; ++i) cp_pos_q.push_back(i < S / 2 ? i : 2 * S - 1 - (i - S / 2));
  for (int i = 0; i < S; ++i) cp_pos_k.push_back(S / 2 + i);
  const int32_t* d_pos_q = dev.put_ints(cp_pos_q);
  const int32_t* d_pos_k = dev.put_ints(cp_pos_k);
  const std::size_t nkv = std::size_t(N) * 2 * C, nstat = std::size_t(B) * NH * S;
  float* d_kv = dev.put(rand_floats(rng, nkv, -2.0f, 2.0f));
  float* cp_out = dev.poisoned(nx);
  float* cp_lse = dev.poisoned(nstat);
  be.attention_block_forward(cp_out, cp_lse, d_qkv, d_qkv + C, d_qkv + 2 * C, OC, OC, d_pos_q, d_pos_q, B, S, S, C, NH);
  keep(cp_out, nx);
  keep(cp_lse, nstat);
  float* cp_out_b = dev.poisoned(nx);
  float* cp_lse_b = dev.poisoned(nstat);
  be.attention_block_forward(cp_out_b, cp_lse_b, d_qkv, d_kv, d_kv + C, OC, 2 * C, d_pos_q, d_pos_k, B, S, S, C, NH);
  be.attention_merge(cp_out, cp_lse, cp_out_b, cp_lse_b, B, S, C, NH);
  keep(cp_out, nx);
  keep(cp_lse, nstat);
  float* cp_delta = dev.poisoned(nstat);
  be.attention_block_delta(cp_delta, d_dx, cp_out, B, S, C, NH);
  keep(cp_delta, nstat);
  float* cp_dqkv = dev.put(FVec(nqkv, 0.0f));
  float* cp_dkv = dev.put(FVec(nkv, 0.0f));
  be.attention_block_backward(cp_dqkv, cp_dqkv + C, cp_dqkv + 2 * C, d_dx, cp_lse, cp_delta, d_qkv, d_qkv + C,
                              d_qkv + 2 * C, OC, OC, d_pos_q, d_pos_q, B, S, S, C, NH);
  be.attention_block_backward(cp_dqkv, cp_dkv, cp_dkv + C, d_dx, cp_lse, cp_delta, d_qkv, d_kv, d_kv + C, OC, 2 * C,
                              d_pos_q, d_pos_k, B, S, S, C, NH);
  keep(cp_dqkv, nqkv);
  keep(cp_dkv, nkv);
  float* cp_copy = dev.poisoned(nkv);
  be.copy_2d(cp_copy, 2 * C, d_qkv + C, OC, N, 2 * C);
  keep(cp_copy, nkv);
  return res;
}

const char* const kRunAllNames[] = {
    "matmul out",       "matmul dinp",    "matmul dweight", "matmul dbias",   "layernorm out",
    "layernorm mean",   "layernorm rstd", "layernorm dinp", "layernorm dweight",
    "layernorm dbias",  "rmsnorm out",    "rmsnorm dinp",   "rmsnorm dweight", "rope out",
    "swiglu out",       "swiglu dgate",   "swiglu dup",     "gqa attention out", "gqa attention dqkv",
    "attention out",  "attention dqkv", "gelu out",       "gelu dinp",
    "embedding out",    "embedding dtok", "embedding dpos", "cross-entropy dlogits",
    "cross-entropy loss_sum", "sum_squares", "adamw params", "adamw m",     "adamw v",
    "moe router expert", "moe router gate", "moe router probs", "moe router dlogits", "moe slot",
    "moe counts",       "moe aux dlogits", "moe aux_sum",    "moe dispatch buf", "moe dispatch dinp",
    "moe combine out",  "moe combine dbuf", "moe combine dgate", "cp block out",  "cp block lse",
    "cp merged out",    "cp merged lse",  "cp delta",       "cp dqkv",        "cp dkv",
    "cp copy_2d"};

// max_of's 16 lanes give a left-to-right scan's maximum at every length and position of the largest
// element, with negative values and signed zeros around it; −∞ for nothing.
TEST(FastMath, MaxOfIsTheLargestElement) {
  std::mt19937 rng(5);
  EXPECT_EQ(pb::cpu::max_of(nullptr, 0), -INFINITY);
  for (int n = 1; n <= 70; ++n) {
    for (int at = 0; at < n; ++at) {
      FVec x = rand_floats(rng, n, -5.0f, -1.0f);
      x[at] = -0.5f;  // the largest, anywhere
      if (n > 2) x[(at + 1) % n] = -0.0f, x[at] = 0.25f;
      const float want = *std::max_element(x.begin(), x.end());
      EXPECT_EQ(pb::cpu::max_of(x.data(), n), want) << "n " << n << ", largest at " << at;
    }
  }
}

class CpuThreads : public ::testing::TestWithParam<std::string> {};

TEST_P(CpuThreads, OneAndTwoThreadsAgreeAndRunsAreDeterministic) {
  // One backend at a time: a BLAS thread count may be process-wide.
  const pb::cpu::SgemmLibrary library = sgemm_library(GetParam());
  std::vector<Vec> one_a, one_b, two_a, two_b;
  {
    auto be = pb::make_cpu_backend(1, false, library);
    one_a = run_all_ops(*be);
    one_b = run_all_ops(*be);
  }
  {
    auto be = pb::make_cpu_backend(2, false, library);
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

INSTANTIATE_TEST_SUITE_P(SgemmLibraries, CpuOps, ::testing::ValuesIn(pb::cpu::sgemm_libraries()));
INSTANTIATE_TEST_SUITE_P(SgemmLibraries, CpuThreads, ::testing::ValuesIn(pb::cpu::sgemm_libraries()));

}  // namespace
