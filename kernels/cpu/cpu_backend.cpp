// CPU implementation of the Backend: oneDNN's or OpenBLAS's sgemm for the matrix products
// (kernels/cpu/sgemm.h; oneDNN's bf16 matmul with --dtype bf16), OpenMP for the rest.
//
// Every op runs on fp32 and bf16 tensors (kernels/backend.h): each kernel is written once as a template
// over its tensors' element types (kernels/cpu/bf16.h's load and store), and the override checks the
// tensors that must share a dtype and dispatches on the dtypes. bf16 elements are widened on load,
// computed on in fp32 as the fp32 path does, and rounded to nearest even on store; an output a kernel
// sums over several terms is summed in fp32 and rounded once.
//
// Every loop that reduces across rows (bias and LayerNorm parameter gradients, embedding gradients)
// is parallelised over the output columns and runs the rows in order, so a run with the same
// thread count is bitwise reproducible. Memory comes from a per-size cache of freed blocks
// (kernels/block_cache.h).
#include "kernels/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "kernels/block_cache.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/sgemm.h"
#include "kernels/cpu/fast_math.h"

namespace pb {
namespace {

constexpr float kLayerNormEps = 1e-5f;

using cpu::exp_approx;  // kernels/cpu/fast_math.h
using cpu::max_of;
using cpu::tanh_approx;
using cpu::accumulator_row;  // kernels/cpu/bf16.h: the kernels over the element type
using cpu::finish_row;
using cpu::is_fp32;
using cpu::load;
using cpu::store;

constexpr std::size_t kAlignment = 64;

// ---- the kernels, each once over the element types (T = float for fp32, uint16_t for bf16) -------
// Loads widen to fp32, stores round to nearest even; every sum runs in fp32 (or double) in the same
// order for both dtypes, so a bf16 op's result is the fp32 op's on the same values, rounded where it is
// stored. T is the dtype of an op's activations and parameters, W and Bi those of parameter gradients.

template <typename T>
void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias, int N,
                              int C) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<std::size_t>(n) * C;
    T* y = out + static_cast<std::size_t>(n) * C;
    float m = 0.0f;
    for (int i = 0; i < C; ++i) m += load(x[i]);
    m /= C;
    float var = 0.0f;  // biased variance: divide by C
    for (int i = 0; i < C; ++i) {
      const float xm = load(x[i]) - m;
      var += xm * xm;
    }
    var /= C;
    const float s = 1.0f / std::sqrt(var + kLayerNormEps);
    for (int i = 0; i < C; ++i) store(y[i], (load(x[i]) - m) * s * load(weight[i]) + load(bias[i]));
    mean[n] = m;
    rstd[n] = s;
  }
}

template <typename T, typename W, typename Bi>
void layernorm_backward_kernel(T* dinp, W* dweight, Bi* dbias, const T* dout, const T* inp, const T* weight,
                               const float* mean, const float* rstd, int N, int C) {
  // dinp: with x̂ = (x − mean)·rstd and g = dout·weight,
  //   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂))
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<std::size_t>(n) * C;
    const T* dy = dout + static_cast<std::size_t>(n) * C;
    T* dx = dinp + static_cast<std::size_t>(n) * C;
    const float m = mean[n], s = rstd[n];
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int i = 0; i < C; ++i) {
      const float g = load(dy[i]) * load(weight[i]);
      g_mean += g;
      gx_mean += g * (load(x[i]) - m) * s;
    }
    g_mean /= C;
    gx_mean /= C;
    for (int i = 0; i < C; ++i) {
      const float xhat = (load(x[i]) - m) * s;
      store(dx[i], load(dx[i]) + s * (load(dy[i]) * load(weight[i]) - g_mean - xhat * gx_mean));
    }
  }
  // dweight += Σ_n dout·x̂, dbias += Σ_n dout: columns in parallel, rows in order
  constexpr int kColumnBlock = 64;
#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < C; c0 += kColumnBlock) {
    const int c1 = std::min(C, c0 + kColumnBlock);
    float dw[kColumnBlock] = {}, db[kColumnBlock] = {};
    for (int n = 0; n < N; ++n) {
      const T* x = inp + static_cast<std::size_t>(n) * C;
      const T* dy = dout + static_cast<std::size_t>(n) * C;
      const float m = mean[n], s = rstd[n];
      for (int c = c0; c < c1; ++c) {
        dw[c - c0] += load(dy[c]) * (load(x[c]) - m) * s;
        db[c - c0] += load(dy[c]);
      }
    }
    for (int c = c0; c < c1; ++c) {
      store(dweight[c], load(dweight[c]) + dw[c - c0]);
      store(dbias[c], load(dbias[c]) + db[c - c0]);
    }
  }
}

// RMSNorm (SPEC 2.5): y = x · rstd · g, rstd = 1/sqrt(mean(x²) + eps).
template <typename T>
void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const T* weight, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<std::size_t>(n) * C;
    T* y = out + static_cast<std::size_t>(n) * C;
    float ss = 0.0f;
    for (int i = 0; i < C; ++i) ss += load(x[i]) * load(x[i]);
    const float s = 1.0f / std::sqrt(ss / C + kLayerNormEps);
    for (int i = 0; i < C; ++i) store(y[i], load(x[i]) * s * load(weight[i]));
    rstd[n] = s;
  }
}

template <typename T, typename W>
void rmsnorm_backward_kernel(T* dinp, W* dweight, const T* dout, const T* inp, const T* weight, const float* rstd,
                             int N, int C) {
  // With x̂ = x·rstd and g = dout·weight: dx = rstd · (g − x̂ · mean(g·x̂)).
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<std::size_t>(n) * C;
    const T* dy = dout + static_cast<std::size_t>(n) * C;
    T* dx = dinp + static_cast<std::size_t>(n) * C;
    const float s = rstd[n];
    float gx_mean = 0.0f;
    for (int i = 0; i < C; ++i) gx_mean += load(dy[i]) * load(weight[i]) * load(x[i]) * s;
    gx_mean /= C;
    for (int i = 0; i < C; ++i) {
      store(dx[i], load(dx[i]) + s * (load(dy[i]) * load(weight[i]) - load(x[i]) * s * gx_mean));
    }
  }
  // dweight += Σ_n dout·x̂: columns in parallel, rows in order
  constexpr int kColumnBlock = 64;
#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < C; c0 += kColumnBlock) {
    const int c1 = std::min(C, c0 + kColumnBlock);
    float dw[kColumnBlock] = {};
    for (int n = 0; n < N; ++n) {
      const T* x = inp + static_cast<std::size_t>(n) * C;
      const T* dy = dout + static_cast<std::size_t>(n) * C;
      for (int c = c0; c < c1; ++c) dw[c - c0] += load(dy[c]) * load(x[c]) * rstd[n];
    }
    for (int c = c0; c < c1; ++c) store(dweight[c], load(dweight[c]) + dw[c - c0]);
  }
}

// Rotary positions (SPEC 2.5), in place, with cos φ and sin φ of every (position, pair) from `cs` and `sn`
// (S × d/2 each); sign −1 rotates back (the backward).
template <typename T>
void rope_kernel(T* x, std::size_t row_stride, const float* cs, const float* sn, int B, int S, int heads, int d,
                 float sign) {
  const int half = d / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < S; ++i) {
      T* row = x + (static_cast<std::size_t>(b) * S + i) * row_stride;
      const float* c = cs + static_cast<std::size_t>(i) * half;
      const float* s = sn + static_cast<std::size_t>(i) * half;
      for (int h = 0; h < heads; ++h) {
        T* head = row + static_cast<std::size_t>(h) * d;
        for (int j = 0; j < half; ++j) {
          const float x1 = load(head[j]), x2 = load(head[j + half]), sj = sign * s[j];
          store(head[j], x1 * c[j] - x2 * sj);
          store(head[j + half], x2 * c[j] + x1 * sj);
        }
      }
    }
  }
}

// SwiGLU: out = silu(g)·u with silu(g) = g·σ(g); its backward with silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
// σ through exp_approx (fast_math.h), so that the loops vectorise as GELU's do.
template <typename T>
void swiglu_forward_kernel(T* out, const T* gate, const T* up, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) {
    const float g = load(gate[i]);
    store(out[i], g / (1.0f + exp_approx(-g)) * load(up[i]));
  }
}

template <typename T>
void swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) {
    const float g = load(gate[i]), dy = load(dout[i]);
    const float sig = 1.0f / (1.0f + exp_approx(-g));
    store(dgate[i], dy * load(up[i]) * sig * (1.0f + g * (1.0f - sig)));
    store(dup[i], dy * g * sig);
  }
}

// Attention computes on fp32 rows: an fp32 qkv's own (one head's q, k and v rows 3C apart), or a bf16
// qkv's head widened into scratch first (rows 3d apart), so that both dtypes run the same code below and
// every sum in the same order; a bf16 output is summed in fp32 scratch and rounded once.

// One (sample, head) of the forward: q, k, v (S, d) rows `in_stride` apart; P (S, S) the probabilities;
// o (S, d) rows `o_stride` apart, overwritten. The two products are sgemm calls (scores = q·kᵀ/√d over
// every (query, key) pair, then o = P·v), the causal softmax a vectorised pass over each row's keys 0..t
// between them: blocked products rather than a dot product per (query, key), at the price of the masked
// half of the scores. Inside the backend's parallel loop over heads each call runs on its thread alone
// (OpenBLAS does not nest threads), so the sums do not depend on the thread count.
inline void attention_head_forward(cpu::SgemmLibrary lib, float* o, std::size_t o_stride, float* P, const float* q,
                                   const float* k, const float* v, std::size_t in_stride, int S, int d, float scale) {
  const int ld = static_cast<int>(in_stride);
  cpu::sgemm(lib, false, true, S, S, d, scale, q, ld, k, ld, 0.0f, P, S);
  for (int t = 0; t < S; ++t) {
    float* Pt = P + static_cast<std::size_t>(t) * S;
    const float maxv = max_of(Pt, t + 1);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t2 = 0; t2 <= t; ++t2) {
      Pt[t2] = exp_approx(Pt[t2] - maxv);
      sum += Pt[t2];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int t2 = 0; t2 <= t; ++t2) Pt[t2] *= inv;
    for (int t2 = t + 1; t2 < S; ++t2) Pt[t2] = 0.0f;  // the masked part of the row
  }
  cpu::sgemm(lib, false, false, S, d, S, 1.0f, P, S, v, ld, 0.0f, o, static_cast<int>(o_stride));
}

// One (sample, head) of the backward: dq, dk, dv (S, d) rows `g_stride` apart, accumulated; dS (S, S)
// scratch; dO (S, d) rows `do_stride` apart; q, k, v as the forward's. Four sgemm calls around the
// softmax's backward: dv += Pᵀ·dO, dP = dO·vᵀ, dScore = P ∘ (dP − Σ P·dP) / √d (0 above the diagonal),
// dq += dScore·k, dk += dScoreᵀ·q.
inline void attention_head_backward(cpu::SgemmLibrary lib, float* dq, float* dk, float* dv, std::size_t g_stride,
                                    float* dS, const float* P, const float* dO, std::size_t do_stride, const float* q,
                                    const float* k, const float* v, std::size_t in_stride, int S, int d, float scale) {
  const int ld = static_cast<int>(in_stride), lg = static_cast<int>(g_stride), ldo = static_cast<int>(do_stride);
  cpu::sgemm(lib, true, false, S, d, S, 1.0f, P, S, dO, ldo, 1.0f, dv, lg);
  cpu::sgemm(lib, false, true, S, S, d, 1.0f, dO, ldo, v, ld, 0.0f, dS, S);
  for (int t = 0; t < S; ++t) {
    const float* Pt = P + static_cast<std::size_t>(t) * S;
    float* dSt = dS + static_cast<std::size_t>(t) * S;
    float pdp = 0.0f;
#pragma omp simd reduction(+ : pdp)
    for (int t2 = 0; t2 <= t; ++t2) pdp += Pt[t2] * dSt[t2];
#pragma omp simd
    for (int t2 = 0; t2 <= t; ++t2) dSt[t2] = Pt[t2] * (dSt[t2] - pdp) * scale;
    for (int t2 = t + 1; t2 < S; ++t2) dSt[t2] = 0.0f;
  }
  cpu::sgemm(lib, false, false, S, d, S, 1.0f, dS, S, k, ld, 1.0f, dq, lg);
  cpu::sgemm(lib, true, false, S, d, S, 1.0f, dS, S, q, ld, 1.0f, dk, lg);
}

// dst (S, parts·d, rows parts·d apart) = the `parts` column blocks of d (`part_stride` apart, from src) of
// S bf16 rows `row_stride` apart, widened; and back, rounded.
inline void widen_head(float* dst, const uint16_t* src, int S, int parts, std::size_t row_stride,
                       std::size_t part_stride, int d) {
  for (int t = 0; t < S; ++t) {
    for (int j = 0; j < parts; ++j) {
      const uint16_t* from = src + t * row_stride + j * part_stride;
      float* to = dst + (static_cast<std::size_t>(t) * parts + j) * d;
      for (int i = 0; i < d; ++i) to[i] = load(from[i]);
    }
  }
}
inline void round_head(uint16_t* dst, const float* src, int S, int parts, std::size_t row_stride,
                       std::size_t part_stride, int d) {
  for (int t = 0; t < S; ++t) {
    for (int j = 0; j < parts; ++j) {
      const float* from = src + (static_cast<std::size_t>(t) * parts + j) * d;
      uint16_t* to = dst + t * row_stride + j * part_stride;
      for (int i = 0; i < d; ++i) store(to[i], from[i]);
    }
  }
}

// saved: the softmax probabilities P (B, a, S, S), row t valid for columns 0..t.
// qkv rows are [Q | K | V] of W = C + 2·kv·d columns: query head h at column h·d, its key and value head
// h / (a/kv) at C + (h / g)·d and C + kv·d + (h / g)·d (kv = a: the multi-head layout, W = 3C).
template <typename T>
void attention_forward_kernel(cpu::SgemmLibrary lib, T* out, float* saved, const T* qkv, int B, int S, int C,
                              int num_heads, int kv_heads) {
  const int d = C / num_heads, group = num_heads / kv_heads;
  const std::size_t Ckv = static_cast<std::size_t>(kv_heads) * d, W = C + 2 * Ckv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    // bf16: the head's [q | k | v] rows (S, 3d) widened, and its output rows (S, d) in fp32
    std::vector<float> in(is_fp32<T> ? 0 : static_cast<std::size_t>(S) * 3 * d);
    std::vector<float> o(is_fp32<T> ? 0 : static_cast<std::size_t>(S) * d);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < num_heads; ++h) {
        const T* q = qkv + b * S * W + static_cast<std::size_t>(h) * d;           // (S, d), row stride W
        const T* k = qkv + b * S * W + C + static_cast<std::size_t>(h / group) * d;
        const T* v = k + Ckv;
        T* out_head = out + b * static_cast<std::size_t>(S) * C + h * d;           // (S, d), stride C
        float* P = saved + (static_cast<std::size_t>(b) * num_heads + h) * S * S;  // (S, S)
        if constexpr (is_fp32<T>) {
          attention_head_forward(lib, out_head, C, P, q, k, v, W, S, d, scale);
        } else {
          widen_head(in.data(), q, S, 1, W, 0, d);
          widen_head(in.data() + static_cast<std::size_t>(S) * d, k, S, 1, W, 0, d);
          widen_head(in.data() + 2 * static_cast<std::size_t>(S) * d, v, S, 1, W, 0, d);
          const float* qf = in.data();
          attention_head_forward(lib, o.data(), d, P, qf, qf + static_cast<std::size_t>(S) * d,
                                 qf + 2 * static_cast<std::size_t>(S) * d, d, S, d, scale);
          round_head(out_head, o.data(), S, 1, C, 0, d);
        }
      }
    }
  }
}

// A key/value head's gradient sums those of its group's query heads, in head order, on one thread: the
// loop runs over (sample, key/value head), so the sums are deterministic.
template <typename T>
void attention_backward_kernel(cpu::SgemmLibrary lib, T* dqkv, float* scratch, const T* dout, const T* qkv,
                               const float* saved, int B, int S,
                               int C, int num_heads, int kv_heads) {
  const int d = C / num_heads, group = num_heads / kv_heads;
  const std::size_t Ckv = static_cast<std::size_t>(kv_heads) * d, W = C + 2 * Ckv;
  const std::size_t Sd = static_cast<std::size_t>(S) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  if constexpr (is_fp32<T>) std::memset(dqkv, 0, sizeof(float) * B * S * W);
#pragma omp parallel
  {
    // bf16: the key/value head's k and v rows, a query head's q and dout rows widened (S, d) each; the
    // group's dk and dv and a query head's dq summed in fp32
    const std::size_t n = is_fp32<T> ? 0 : Sd;
    std::vector<float> kf(n), vf(n), qf(n), dOf(n), dqf(n), dkf(n), dvf(n);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int kvh = 0; kvh < kv_heads; ++kvh) {
        const T* k = qkv + b * S * W + C + static_cast<std::size_t>(kvh) * d;
        const T* v = k + Ckv;
        T* dk = dqkv + b * S * W + C + static_cast<std::size_t>(kvh) * d;
        T* dv = dk + Ckv;
        if constexpr (!is_fp32<T>) {
          widen_head(kf.data(), k, S, 1, W, 0, d);
          widen_head(vf.data(), v, S, 1, W, 0, d);
          std::fill(dkf.begin(), dkf.end(), 0.0f);
          std::fill(dvf.begin(), dvf.end(), 0.0f);
        }
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
          const T* q = qkv + b * S * W + static_cast<std::size_t>(h) * d;
          T* dq = dqkv + b * S * W + static_cast<std::size_t>(h) * d;
          const T* dO_head = dout + b * static_cast<std::size_t>(S) * C + h * d;
          const float* P = saved + (static_cast<std::size_t>(b) * num_heads + h) * S * S;
          float* dS = scratch + (static_cast<std::size_t>(b) * num_heads + h) * S * S;
          if constexpr (is_fp32<T>) {
            attention_head_backward(lib, dq, dk, dv, W, dS, P, dO_head, C, q, k, v, W, S, d, scale);
          } else {
            widen_head(qf.data(), q, S, 1, W, 0, d);
            widen_head(dOf.data(), dO_head, S, 1, C, 0, d);
            std::fill(dqf.begin(), dqf.end(), 0.0f);
            // dq, dk, dv rows d apart (g_stride d), q, k, v rows d apart (in_stride d)
            attention_head_backward(lib, dqf.data(), dkf.data(), dvf.data(), d, dS, P, dOf.data(), d, qf.data(), kf.data(),
                                    vf.data(), d, S, d, scale);
            round_head(dq, dqf.data(), S, 1, W, 0, d);
          }
        }
        if constexpr (!is_fp32<T>) {
          round_head(dk, dkf.data(), S, 1, W, 0, d);
          round_head(dv, dvf.data(), S, 1, W, 0, d);
        }
      }
    }
  }
}

template <typename T>
void gelu_forward_kernel(T* out, const T* inp, std::size_t n) {
  const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
#pragma omp parallel for simd schedule(static)
  for (std::size_t i = 0; i < n; ++i) {
    const float x = load(inp[i]);
    store(out[i], 0.5f * x * (1.0f + tanh_approx(k * (x + 0.044715f * x * x * x))));
  }
}

template <typename T>
void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, std::size_t n) {
  const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
#pragma omp parallel for simd schedule(static)
  for (std::size_t i = 0; i < n; ++i) {
    const float x = load(inp[i]);
    const float th = tanh_approx(k * (x + 0.044715f * x * x * x));
    const float sech2 = 1.0f - th * th;
    const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * k * (1.0f + 3.0f * 0.044715f * x * x);
    store(dinp[i], grad * load(dout[i]));
  }
}

template <typename O, typename A, typename Bt>
void add_kernel(O* out, const A* a, const Bt* b, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) store(out[i], load(a[i]) + load(b[i]));
}
template <typename Y, typename X>
void accumulate_kernel(Y* y, const X* x, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) store(y[i], load(y[i]) + load(x[i]));
}
template <typename T>
void scale_kernel(T* y, float alpha, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) store(y[i], load(y[i]) * alpha);
}
template <typename D, typename S>
void convert_kernel(D* dst, const S* src, std::size_t n) {
  if constexpr (std::is_same_v<D, S>) {
    std::memcpy(dst, src, n * sizeof(D));  // the same dtype: the bits as they are
  } else {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) store(dst[i], load(src[i]));
  }
}

template <typename T>
void embedding_forward_kernel(T* out, const int32_t* tokens, const T* tok, const T* pos, int B, int S, int C) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int s = 0; s < S; ++s) {
      const int32_t t = tokens[b * S + s];
      const T* te = t >= 0 ? tok + static_cast<std::size_t>(t) * C : nullptr;
      const T* pe = pos != nullptr ? pos + static_cast<std::size_t>(s) * C : nullptr;
      T* o = out + (static_cast<std::size_t>(b) * S + s) * C;
      for (int i = 0; i < C; ++i) store(o[i], (te ? load(te[i]) : 0.0f) + (pe ? load(pe[i]) : 0.0f));
    }
  }
}

// dtok and dpos in fp32 take the rows as they come; in bf16 each row a call touches is summed in fp32
// (from its value, in the same order) and rounded once at the end.
template <typename T, typename Tok, typename Pos>
void embedding_backward_kernel(Tok* dtok, Pos* dpos, const T* dout, const int32_t* tokens, int B, int S, int C) {
  constexpr int kColumnBlock = 32;
  // bf16 dtok: the distinct tokens of the call, and each position's index among them
  std::vector<int32_t> distinct, index;
  if constexpr (!is_fp32<Tok>) {
    for (int i = 0; i < B * S; ++i) {
      if (tokens[i] >= 0) distinct.push_back(tokens[i]);
    }
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    index.assign(static_cast<std::size_t>(B) * S, -1);
    for (int i = 0; i < B * S; ++i) {
      if (tokens[i] < 0) continue;
      index[i] = static_cast<int32_t>(std::lower_bound(distinct.begin(), distinct.end(), tokens[i]) - distinct.begin());
    }
  }
  const bool pos_rows = dpos != nullptr && !is_fp32<Pos>;
  // Parallel over columns: each thread owns a column range of dtok and dpos, rows in token order.
#pragma omp parallel
  {
    std::vector<float> tok_acc(distinct.size() * kColumnBlock);
    std::vector<float> pos_acc(pos_rows ? static_cast<std::size_t>(S) * kColumnBlock : 0);
#pragma omp for schedule(static)
    for (int c0 = 0; c0 < C; c0 += kColumnBlock) {
      const int c1 = std::min(C, c0 + kColumnBlock);
      if constexpr (!is_fp32<Tok>) {
        for (std::size_t u = 0; u < distinct.size(); ++u) {
          const Tok* dt = dtok + static_cast<std::size_t>(distinct[u]) * C;
          for (int c = c0; c < c1; ++c) tok_acc[u * kColumnBlock + (c - c0)] = load(dt[c]);
        }
      }
      if (pos_rows) {
        for (int s = 0; s < S; ++s) {
          const Pos* dp = dpos + static_cast<std::size_t>(s) * C;
          for (int c = c0; c < c1; ++c) pos_acc[static_cast<std::size_t>(s) * kColumnBlock + (c - c0)] = load(dp[c]);
        }
      }
      for (int b = 0; b < B; ++b) {
        for (int s = 0; s < S; ++s) {
          const T* g = dout + (static_cast<std::size_t>(b) * S + s) * C + c0;
          const int32_t t = tokens[b * S + s];
          if (t >= 0) {
            float* dt;
            if constexpr (is_fp32<Tok>) {
              dt = dtok + static_cast<std::size_t>(t) * C + c0;
            } else {
              dt = tok_acc.data() + static_cast<std::size_t>(index[b * S + s]) * kColumnBlock;
            }
            for (int c = 0; c < c1 - c0; ++c) dt[c] += load(g[c]);
          }
          if (dpos != nullptr) {
            float* dp;
            if constexpr (is_fp32<Pos>) {
              dp = dpos + static_cast<std::size_t>(s) * C + c0;
            } else {
              dp = pos_acc.data() + static_cast<std::size_t>(s) * kColumnBlock;
            }
            for (int c = 0; c < c1 - c0; ++c) dp[c] += load(g[c]);
          }
        }
      }
      if constexpr (!is_fp32<Tok>) {
        for (std::size_t u = 0; u < distinct.size(); ++u) {
          Tok* dt = dtok + static_cast<std::size_t>(distinct[u]) * C;
          for (int c = c0; c < c1; ++c) store(dt[c], tok_acc[u * kColumnBlock + (c - c0)]);
        }
      }
      if (pos_rows) {
        for (int s = 0; s < S; ++s) {
          Pos* dp = dpos + static_cast<std::size_t>(s) * C;
          for (int c = c0; c < c1; ++c) store(dp[c], pos_acc[static_cast<std::size_t>(s) * kColumnBlock + (c - c0)]);
        }
      }
    }
  }
}

// The vocabulary's padding of a row of dlogits (columns V..Vp−1): no gradient.
template <typename T>
void zero_padding(T* zrow, int V, int Vp) {
  std::fill(zrow + V, zrow + Vp, T{});
}

// The fused cross-entropy on rows of fp32 logits in place (Vp apart, the first V of each the
// vocabulary); bf16 rows are widened into a row of fp32 first and rounded back at the end.
template <typename T>
void cross_entropy_forward_backward_kernel(T* logits, double* loss_sum, const int32_t* targets, int N, int V, int Vp,
                                           float scale) {
  std::vector<double> row_loss(N);
#pragma omp parallel
  {
    std::vector<float> row(is_fp32<T> ? 0 : V);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      T* zrow = logits + static_cast<std::size_t>(n) * Vp;
      float* z = accumulator_row(zrow, row.data());
      if constexpr (!is_fp32<T>) cpu::fp32_row(zrow, V, z);  // bf16: the row widened, then as fp32
      const float maxv = max_of(z, V);
      const int target = targets[n];
      const float target_shifted = z[target] - maxv;  // kept before exp can underflow it to 0
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < V; ++i) {
        z[i] = exp_approx(z[i] - maxv);  // z now holds unnormalised probabilities
        sum += z[i];
      }
      // CE = log Σ exp(z − max) − (z_target − max) = −log p_target
      row_loss[n] = std::log(static_cast<double>(sum)) - static_cast<double>(target_shifted);
      const float inv = scale / sum;
      for (int i = 0; i < V; ++i) z[i] *= inv;
      z[target] -= scale;
      finish_row(zrow, z, V);
      zero_padding(zrow, V, Vp);
    }
  }
  double total = 0.0;  // summed in row order for reproducibility
  for (int n = 0; n < N; ++n) total += row_loss[n];
  *loss_sum += static_cast<double>(scale) * total;
}

template <typename T>
void cross_entropy_row_max_kernel(float* row_max, const T* logits, int N, int V, int Vp) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* z = logits + static_cast<std::size_t>(n) * Vp;
    float m = -std::numeric_limits<float>::infinity();  // a block wholly in the padding: −∞
    if constexpr (is_fp32<T>) {
      m = max_of(z, V);
    } else {
      for (int i = 0; i < V; ++i) m = std::max(m, load(z[i]));
    }
    row_max[n] = m;
  }
}

template <typename T>
void cross_entropy_partials_kernel(float* sums, const T* logits, const int32_t* targets, const float* row_max, int N,
                                   int V, int Vp) {
#pragma omp parallel
  {
    std::vector<float> row(is_fp32<T> ? 0 : V);  // bf16: the row widened, summed as an fp32 one
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* z = cpu::fp32_row(logits + static_cast<std::size_t>(n) * Vp, V, row.data());
      const float m = row_max[n];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < V; ++i) sum += exp_approx(z[i] - m);
      sums[n] = sum;
      sums[N + n] = targets[n] >= 0 ? z[targets[n]] - m : 0.0f;
    }
  }
}

template <typename T>
void cross_entropy_finish_kernel(T* logits, double* loss_sum, const int32_t* targets, const float* row_max,
                                 const float* sums, int N, int V, int Vp, float scale) {
  std::vector<double> row_loss(N);
#pragma omp parallel
  {
    std::vector<float> row(is_fp32<T> ? 0 : V);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      T* zrow = logits + static_cast<std::size_t>(n) * Vp;
      float* z = accumulator_row(zrow, row.data());
      const float m = row_max[n], inv = scale / sums[n];
      // CE = log Σ exp(z − max) − (z_target − max), with the sums over every rank's vocabulary block
      row_loss[n] = std::log(static_cast<double>(sums[n])) - static_cast<double>(sums[N + n]);
#pragma omp simd
      for (int i = 0; i < V; ++i) z[i] = exp_approx(load(zrow[i]) - m) * inv;
      if (targets[n] >= 0) z[targets[n]] -= scale;
      finish_row(zrow, z, V);
      zero_padding(zrow, V, Vp);
    }
  }
  double total = 0.0;
  for (int n = 0; n < N; ++n) total += row_loss[n];
  *loss_sum += static_cast<double>(scale) * total;
}

template <typename T>
double sum_squares_kernel(const T* x, std::size_t n) {
  // Fixed chunks summed in order, so the result does not depend on the thread count. Within a chunk, 8
  // independent lanes (element i in lane i mod 8, then the lanes pairwise): one add chain was bound by the
  // latency of a double add, a quarter of the memory's rate; the lanes vectorise.
  constexpr std::size_t kChunk = 1 << 14;
  constexpr int kLanes = 8;
  const std::size_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
  for (std::size_t c = 0; c < chunks; ++c) {
    const std::size_t end = std::min(n, (c + 1) * kChunk);
    double lane[kLanes] = {};
    std::size_t i = c * kChunk;
    for (; i + kLanes <= end; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(load(x[i + l])) * load(x[i + l]);
    }
    for (; i < end; ++i) lane[(i - c * kChunk) % kLanes] += static_cast<double>(load(x[i])) * load(x[i]);
    partial[c] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <typename G>
void adamw_kernel(float* params, const G* grads, float* m, float* v, std::size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t, float grad_scale) {
  // torch.optim.AdamW (non-fused): decoupled decay first, then the bias-corrected Adam step.
  const float bias1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  const float bias2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  const float step_size = lr / bias1;
  const float bias2_sqrt = std::sqrt(bias2);
  const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) {
    const float g = load(grads[i]) * grad_scale;
    float p = params[i] * decay;
    m[i] = beta1 * m[i] + (1.0f - beta1) * g;
    v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
    const float denom = std::sqrt(v[i]) / bias2_sqrt + eps;
    p -= step_size * m[i] / denom;
    params[i] = p;
  }
}

// Column sums of dout (N, OC) added to dbias, rows in order for reproducibility.
template <typename T, typename Bi>
void bias_gradient_kernel(Bi* dbias, const T* dout, int N, int OC) {
  constexpr int kColumnBlock = 64;
#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < OC; c0 += kColumnBlock) {
    const int c1 = std::min(OC, c0 + kColumnBlock);
    float acc[kColumnBlock] = {};
    for (int n = 0; n < N; ++n) {
      const T* row = dout + static_cast<std::size_t>(n) * OC;
      for (int c = c0; c < c1; ++c) acc[c - c0] += load(row[c]);
    }
    for (int c = c0; c < c1; ++c) store(dbias[c], load(dbias[c]) + acc[c - c0]);
  }
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, bool bf16_matmul, cpu::SgemmLibrary sgemm)
      : threads_(std::max(1, threads)),
        bf16_operands_(bf16_matmul),
        sgemm_(sgemm),
        bf16_(bf16_matmul ? std::make_unique<cpu::Bf16Gemm>() : nullptr),
        blocks_(kAlignment, [](std::size_t bytes) {
          void* ptr = std::aligned_alloc(kAlignment, bytes);
          if (ptr == nullptr) throw std::bad_alloc();
          return ptr;
        }, [](void* ptr) { std::free(ptr); }) {
    openblas_set_num_threads(threads_);
    omp_set_num_threads(threads_);
  }

  std::string name() const override { return "cpu"; }
  std::string device_name() const override { return cpu_model_name(); }
  std::string matmul_precision() const override {
    return bf16_operands_ ? "bf16 operands, fp32 accumulation: " + cpu::bf16_gemm_library()
                          : "fp32: " + cpu::sgemm_library_description(sgemm_);
  }

  // ---- memory ------------------------------------------------------------------------------------
  void* alloc(std::size_t bytes, MemCategory category) override { return blocks_.alloc(bytes, category); }
  void free(void* ptr) override { blocks_.free(ptr); }
  MemoryTracker& tracker() override { return blocks_.tracker(); }

  void begin_span() override { span_start_s_ = process_cpu_seconds(); }
  void end_span() override { span_sum_s_ += process_cpu_seconds() - span_start_s_; }
  double take_span_seconds() override {
    const double sum = span_sum_s_;
    span_sum_s_ = 0.0;
    return sum;
  }
  void upload(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, std::size_t bytes) override { std::memmove(dst, src, bytes); }
  void zero(void* dst, std::size_t bytes) override { std::memset(dst, 0, bytes); }

  // ---- matmul ------------------------------------------------------------------------------------
  // fp32 tensors: sgemm, or (bf16_matmul) each operand rounded to bf16 into one of two scratch buffers of
  // the backend (library workspace, as cuBLAS's: not in a memory category) and multiplied by Bf16Gemm.
  // bf16 tensors: their operands go to Bf16Gemm as they are; a bf16 destination is summed in an fp32
  // scratch buffer of the backend (the same kind of workspace) and rounded once.
  void matmul_forward(TensorPtr out, ConstTensorPtr inp, ConstTensorPtr weight, ConstTensorPtr bias, int N, int C,
                      int OC) override {
    const DType t =
        cpu::common_dtype("matmul_forward", {{"out", out}, {"inp", inp}, {"weight", weight}, {"bias", bias}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      matmul_forward_impl(out.as<T>(), inp.as<T>(), weight.as<T>(), bias.as<T>(), N, C, OC);
    }, t);
  }

  void matmul_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr inp,
                       ConstTensorPtr weight, int N, int C, int OC) override {
    const DType t = cpu::common_dtype("matmul_backward",
                                      {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    cpu::dispatch([&](auto e, auto w, auto bi) {
      using T = decltype(e);
      using W = decltype(w);
      using Bi = decltype(bi);
      matmul_backward_impl(dinp.as<T>(), dweight.as<W>(), dbias.as<Bi>(), dout.as<T>(), inp.as<T>(), weight.as<T>(),
                           N, C, OC);
    }, t, dweight.dtype(), dbias.dtype());
  }

  // ---- LayerNorm ---------------------------------------------------------------------------------
  void layernorm_forward(TensorPtr out, float* mean, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight,
                         ConstTensorPtr bias, int N, int C) override {
    const DType t =
        cpu::common_dtype("layernorm_forward", {{"out", out}, {"inp", inp}, {"weight", weight}, {"bias", bias}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      layernorm_forward_kernel(out.as<T>(), mean, rstd, inp.as<T>(), weight.as<T>(), bias.as<T>(), N, C);
    }, t);
  }

  void layernorm_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout,
                          ConstTensorPtr inp, ConstTensorPtr weight, const float* mean, const float* rstd, int N,
                          int C) override {
    const DType t = cpu::common_dtype("layernorm_backward",
                                      {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    cpu::dispatch([&](auto e, auto w, auto bi) {
      using T = decltype(e);
      using W = decltype(w);
      using Bi = decltype(bi);
      layernorm_backward_kernel(dinp.as<T>(), dweight.as<W>(), dbias.as<Bi>(), dout.as<T>(), inp.as<T>(),
                                weight.as<T>(), mean, rstd, N, C);
    }, t, dweight.dtype(), dbias.dtype());
  }

  // ---- attention ---------------------------------------------------------------------------------
  // saved: the softmax probabilities P (B, a, S, S), row t valid for columns 0..t.
  std::size_t attention_saved_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S * S;
  }
  bool attention_keeps_probabilities() const override { return true; }
  std::size_t attention_scratch_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S * S;  // dP, then dScores in place
  }

  void attention_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C,
                         int num_heads) override {
    attention_gqa_forward(out, saved, qkv, B, S, C, num_heads, num_heads);
  }

  void attention_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                          const float* saved, int B, int S, int C, int num_heads) override {
    attention_gqa_backward(dqkv, scratch, dout, out, qkv, saved, B, S, C, num_heads, num_heads);
  }

  void attention_gqa_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int num_heads,
                             int kv_heads) override {
    check_heads("attention_gqa_forward", num_heads, kv_heads);
    const DType t = cpu::common_dtype("attention_forward", {{"out", out}, {"qkv", qkv}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      attention_forward_kernel(sgemm_, out.as<T>(), saved, qkv.as<T>(), B, S, C, num_heads, kv_heads);
    }, t);
  }

  void attention_gqa_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out,
                              ConstTensorPtr qkv, const float* saved, int B, int S, int C, int num_heads,
                              int kv_heads) override {
    check_heads("attention_gqa_backward", num_heads, kv_heads);
    const DType t = cpu::common_dtype("attention_backward",
                                      {{"dqkv", dqkv}, {"dout", dout}, {"out", out}, {"qkv", qkv}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      attention_backward_kernel(sgemm_, dqkv.as<T>(), scratch, dout.as<T>(), qkv.as<T>(), saved, B, S, C, num_heads,
                                kv_heads);
    }, t);
  }

  // ---- the Llama-style block -------------------------------------------------------------------------
  void rmsnorm_forward(TensorPtr out, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight, int N, int C) override {
    const DType t = cpu::common_dtype("rmsnorm_forward", {{"out", out}, {"inp", inp}, {"weight", weight}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      rmsnorm_forward_kernel(out.as<T>(), rstd, inp.as<T>(), weight.as<T>(), N, C);
    }, t);
  }

  // The add, then the RMSNorm of its stored (rounded) sum: what the two ops compute one after the other.
  void residual_rmsnorm_forward(TensorPtr out, TensorPtr norm_out, float* rstd, ConstTensorPtr a, ConstTensorPtr b,
                                ConstTensorPtr weight, int N, int C) override {
    add(out, a, b, static_cast<std::size_t>(N) * C);
    rmsnorm_forward(norm_out, rstd, out, weight, N, C);
  }

  void rmsnorm_backward(TensorPtr dinp, TensorPtr dweight, ConstTensorPtr dout, ConstTensorPtr inp,
                        ConstTensorPtr weight, const float* rstd, int N, int C) override {
    const DType t = cpu::common_dtype("rmsnorm_backward",
                                      {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    cpu::dispatch([&](auto e, auto w) {
      using T = decltype(e);
      using W = decltype(w);
      rmsnorm_backward_kernel(dinp.as<T>(), dweight.as<W>(), dout.as<T>(), inp.as<T>(), weight.as<T>(), rstd, N, C);
    }, t, dweight.dtype());
  }

  void rope_forward(TensorPtr x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                    double theta) override {
    rope(x, row_stride, pos, B, S, heads, d, theta, 1.0f);
  }
  void rope_backward(TensorPtr dx, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                     double theta) override {
    rope(dx, row_stride, pos, B, S, heads, d, theta, -1.0f);
  }

  void swiglu_forward(TensorPtr out, ConstTensorPtr gate, ConstTensorPtr up, std::size_t n) override {
    const DType t = cpu::common_dtype("swiglu_forward", {{"out", out}, {"gate", gate}, {"up", up}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      swiglu_forward_kernel(out.as<T>(), gate.as<T>(), up.as<T>(), n);
    }, t);
  }

  void swiglu_backward(TensorPtr dgate, TensorPtr dup, ConstTensorPtr dout, ConstTensorPtr gate, ConstTensorPtr up,
                       std::size_t n) override {
    const DType t = cpu::common_dtype("swiglu_backward",
                                      {{"dgate", dgate}, {"dup", dup}, {"dout", dout}, {"gate", gate}, {"up", up}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      swiglu_backward_kernel(dgate.as<T>(), dup.as<T>(), dout.as<T>(), gate.as<T>(), up.as<T>(), n);
    }, t);
  }

  // ---- elementwise -------------------------------------------------------------------------------
  void gelu_forward(TensorPtr out, ConstTensorPtr inp, std::size_t n) override {
    const DType t = cpu::common_dtype("gelu_forward", {{"out", out}, {"inp", inp}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      gelu_forward_kernel(out.as<T>(), inp.as<T>(), n);
    }, t);
  }

  void gelu_backward(TensorPtr dinp, ConstTensorPtr inp, ConstTensorPtr dout, std::size_t n) override {
    const DType t = cpu::common_dtype("gelu_backward", {{"dinp", dinp}, {"inp", inp}, {"dout", dout}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      gelu_backward_kernel(dinp.as<T>(), inp.as<T>(), dout.as<T>(), n);
    }, t);
  }

  // The add, then the LayerNorm of its stored (rounded) sum: what the two ops compute one after the other.
  void residual_layernorm_forward(TensorPtr out, TensorPtr ln_out, float* mean, float* rstd, ConstTensorPtr a,
                                  ConstTensorPtr b, ConstTensorPtr weight, ConstTensorPtr bias, int N, int C) override {
    const std::size_t n = static_cast<std::size_t>(N) * C;
    add(out, a, b, n);
    layernorm_forward(ln_out, mean, rstd, out, weight, bias, N, C);
  }

  // add, accumulate, convert, scale and sum_squares: each tensor in either dtype
  void add(TensorPtr out, ConstTensorPtr a, ConstTensorPtr b, std::size_t n) override {
    cpu::dispatch([&](auto o, auto x, auto y) {
      add_kernel(out.as<decltype(o)>(), a.as<decltype(x)>(), b.as<decltype(y)>(), n);
    }, out.dtype(), a.dtype(), b.dtype());
  }
  void accumulate(TensorPtr y, ConstTensorPtr x, std::size_t n) override {
    cpu::dispatch([&](auto ty, auto tx) { accumulate_kernel(y.as<decltype(ty)>(), x.as<decltype(tx)>(), n); },
                  y.dtype(), x.dtype());
  }
  void convert(TensorPtr dst, ConstTensorPtr src, std::size_t n) override {
    cpu::dispatch([&](auto td, auto ts) { convert_kernel(dst.as<decltype(td)>(), src.as<decltype(ts)>(), n); },
                  dst.dtype(), src.dtype());
  }
  void scale(TensorPtr y, float alpha, std::size_t n) override {
    cpu::dispatch([&](auto e) { scale_kernel(y.as<decltype(e)>(), alpha, n); }, y.dtype());
  }

  // ---- embedding ---------------------------------------------------------------------------------
  void embedding_forward(TensorPtr out, const int32_t* tokens, ConstTensorPtr tok, ConstTensorPtr pos, int B, int S,
                         int C) override {
    const DType t = cpu::common_dtype("embedding_forward", {{"out", out}, {"tok", tok}, {"pos", pos}});
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      embedding_forward_kernel(out.as<T>(), tokens, tok.as<T>(), pos.as<T>(), B, S, C);
    }, t);
  }

  void embedding_backward(TensorPtr dtok, TensorPtr dpos, ConstTensorPtr dout, const int32_t* tokens, int B, int S,
                          int C) override {
    cpu::dispatch([&](auto e, auto tt, auto tp) {
      embedding_backward_kernel(dtok.as<decltype(tt)>(), dpos.as<decltype(tp)>(), dout.as<decltype(e)>(), tokens, B,
                                S, C);
    }, dout.dtype(), dtok.dtype(), dpos.dtype());
  }

  // ---- loss --------------------------------------------------------------------------------------
  void cross_entropy_forward_backward(TensorPtr logits, double* loss_sum, const int32_t* targets, int N, int V, int Vp,
                                      float scale) override {
    cpu::dispatch([&](auto e) {
      cross_entropy_forward_backward_kernel(logits.as<decltype(e)>(), loss_sum, targets, N, V, Vp, scale);
    }, logits.dtype());
  }

  void cross_entropy_row_max(float* row_max, ConstTensorPtr logits, int N, int V, int Vp) override {
    cpu::dispatch([&](auto e) { cross_entropy_row_max_kernel(row_max, logits.as<decltype(e)>(), N, V, Vp); },
                  logits.dtype());
  }

  void cross_entropy_partials(float* sums, ConstTensorPtr logits, const int32_t* targets, const float* row_max, int N,
                              int V, int Vp) override {
    cpu::dispatch([&](auto e) {
      cross_entropy_partials_kernel(sums, logits.as<decltype(e)>(), targets, row_max, N, V, Vp);
    }, logits.dtype());
  }

  void cross_entropy_finish(TensorPtr logits, double* loss_sum, const int32_t* targets, const float* row_max,
                            const float* sums, int N, int V, int Vp, float scale) override {
    cpu::dispatch([&](auto e) {
      cross_entropy_finish_kernel(logits.as<decltype(e)>(), loss_sum, targets, row_max, sums, N, V, Vp, scale);
    }, logits.dtype());
  }

  // ---- context parallelism: kernels/cpu/cp_ops.cpp ----------------------------------------------
  void attention_block_forward(TensorPtr out, float* lse, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v,
                               int q_stride, int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq,
                               int Sk, int C, int heads, int kv_heads) override {
    cpu::attention_block_forward(out, lse, q, k, v, q_stride, kv_stride, pos_q, pos_k, B, Sq, Sk, C, heads,
                                 kv_heads > 0 ? kv_heads : heads);
  }
  void attention_merge(TensorPtr out, float* lse, ConstTensorPtr out_b, const float* lse_b, int B, int Sq, int C,
                       int heads) override {
    cpu::attention_merge(out, lse, out_b, lse_b, B, Sq, C, heads);
  }
  void attention_block_delta(float* delta, ConstTensorPtr dout, ConstTensorPtr out, int B, int Sq, int C,
                             int heads) override {
    cpu::attention_block_delta(delta, dout, out, B, Sq, C, heads);
  }
  void attention_block_backward(TensorPtr dq, TensorPtr dk, TensorPtr dv, ConstTensorPtr dout, const float* lse,
                                const float* delta, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v, int q_stride,
                                int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk,
                                int C, int heads, int kv_heads) override {
    cpu::attention_block_backward(dq, dk, dv, dout, lse, delta, q, k, v, q_stride, kv_stride, pos_q, pos_k, B, Sq, Sk,
                                  C, heads, kv_heads > 0 ? kv_heads : heads);
  }
  void copy_2d(TensorPtr dst, std::size_t dst_stride, ConstTensorPtr src, std::size_t src_stride, std::size_t rows,
               std::size_t cols) override {
    cpu::copy_2d(dst, dst_stride, src, src_stride, rows, cols);
  }

  // ---- mixture of experts: kernels/cpu/moe_ops.cpp -----------------------------------------------
  void moe_router_forward(int32_t* expert, float* gate, float* probs, ConstTensorPtr logits, int N, int E,
                          int k) override {
    cpu::moe_router_forward(expert, gate, probs, logits, N, E, k);
  }
  void moe_router_backward(TensorPtr dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                           int E, int k) override {
    cpu::moe_router_backward(dlogits, dgate, gate, expert, N, E, k);
  }
  void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                  int capacity) override {
    cpu::moe_assign(slot, counts, expert, N, E, k, capacity);
  }
  void moe_aux_loss(TensorPtr dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E,
                    int k, float coef, float grad_scale) override {
    cpu::moe_aux_loss(dlogits, aux_sum, probs, counts, N, E, k, coef, grad_scale);
  }
  void moe_dispatch(TensorPtr buf, ConstTensorPtr inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                    int C, int h) override {
    cpu::moe_dispatch(buf, inp, expert, slot, N, E, k, C, h);
  }
  void moe_dispatch_backward(TensorPtr dinp, ConstTensorPtr dbuf, const int32_t* expert, const int32_t* slot, int N,
                             int E, int k, int C, int h) override {
    cpu::moe_dispatch_backward(dinp, dbuf, expert, slot, N, E, k, C, h);
  }
  void moe_combine(TensorPtr out, ConstTensorPtr buf, const float* gate, const int32_t* expert, const int32_t* slot,
                   int N, int E, int k, int C, int h) override {
    cpu::moe_combine(out, buf, gate, expert, slot, N, E, k, C, h);
  }
  void moe_combine_backward(TensorPtr dbuf, float* dgate, ConstTensorPtr dout, ConstTensorPtr buf, const float* gate,
                            const int32_t* expert, const int32_t* slot, int N, int E, int k, int C,
                            int h) override {
    cpu::moe_combine_backward(dbuf, dgate, dout, buf, gate, expert, slot, N, E, k, C, h);
  }

  // ---- optimizer ---------------------------------------------------------------------------------
  void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v, std::size_t n, float lr, float beta1,
                    float beta2, float eps, float weight_decay, int t, float grad_scale) override {
    cpu::dispatch([&](auto e) {
      adamw_kernel(params, grads.as<decltype(e)>(), m, v, n, lr, beta1, beta2, eps, weight_decay, t, grad_scale);
    }, grads.dtype());
  }
  void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v, const std::vector<AdamwRange>& ranges,
                    float lr, float beta1, float beta2, float eps, int t, float grad_scale) override {
    for (const AdamwRange& r : ranges) {
      const auto at = static_cast<std::ptrdiff_t>(r.begin);
      adamw_update(params + at, grads + at, m + at, v + at, r.n, lr, beta1, beta2, eps, r.weight_decay, t, grad_scale);
    }
  }

 private:
  static double process_cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  double span_start_s_ = 0.0, span_sum_s_ = 0.0;

 protected:
  void do_download(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void do_synchronize() override {}
  void do_sum_squares(double* sums, int bins, const std::vector<SquaresPiece>& pieces) override {
    std::fill(sums, sums + bins, 0.0);
    for (const SquaresPiece& p : pieces) {
      double piece = 0.0;
      cpu::dispatch([&](auto e) { piece = sum_squares_kernel(p.x.as<decltype(e)>(), p.n); }, p.x.dtype());
      sums[p.bin] += piece;
    }
  }

 private:
  static void check_heads(const char* op, int num_heads, int kv_heads) {
    if (kv_heads < 1 || num_heads % kv_heads != 0) {
      throw std::invalid_argument(std::string(op) + ": " + std::to_string(kv_heads) +
                                  " key/value heads do not divide " + std::to_string(num_heads) + " heads");
    }
  }
  void rope(TensorPtr x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d, double theta,
            float sign) {
    if (d % 2 != 0) throw std::invalid_argument("rope: the head dimension " + std::to_string(d) + " is odd");
    const RopeTable& table = rope_table(pos, S, d, theta);
    cpu::dispatch([&](auto e) {
      using T = decltype(e);
      rope_kernel(x.as<T>(), row_stride, table.cos.data(), table.sin.data(), B, S, heads, d, sign);
    }, x.dtype());
  }
  // cos φ and sin φ of every (position, pair), computed in double and rounded to fp32 once, kept for the
  // next call with the same positions, d and θ (every block's four calls per micro-batch use one table).
  struct RopeTable {
    std::vector<int32_t> pos;
    int d = 0;
    double theta = 0.0;
    std::vector<float> cos, sin;
  };
  const RopeTable& rope_table(const int32_t* pos, int S, int d, double theta) {
    RopeTable& t = rope_table_;
    if (t.d == d && t.theta == theta && t.pos.size() == static_cast<std::size_t>(S) &&
        std::equal(t.pos.begin(), t.pos.end(), pos)) {
      return t;
    }
    const int half = d / 2;
    t.pos.assign(pos, pos + S);
    t.d = d;
    t.theta = theta;
    t.cos.resize(static_cast<std::size_t>(S) * half);
    t.sin.resize(t.cos.size());
    for (int i = 0; i < S; ++i) {
      for (int j = 0; j < half; ++j) {
        const double angle = pos[i] * std::pow(theta, -2.0 * j / d);
        t.cos[static_cast<std::size_t>(i) * half + j] = static_cast<float>(std::cos(angle));
        t.sin[static_cast<std::size_t>(i) * half + j] = static_cast<float>(std::sin(angle));
      }
    }
    return t;
  }
  RopeTable rope_table_;
  // out (N, OC) = inp (N, C) · weight (C, OC), with the bias rows set first and accumulated onto
  template <typename T>
  void matmul_forward_impl(T* out, const T* inp, const T* weight, const T* bias, int N, int C, int OC) {
    const std::size_t size = static_cast<std::size_t>(N) * OC;
    float* acc = product_target(out, size, false);
    if (bias != nullptr) {
#pragma omp parallel for schedule(static)
      for (int n = 0; n < N; ++n) {
        float* row = acc + static_cast<std::size_t>(n) * OC;
        if constexpr (is_fp32<T>) {
          std::memcpy(row, bias, sizeof(float) * OC);
        } else {
          for (int o = 0; o < OC; ++o) row[o] = load(bias[o]);  // the bias is added in fp32
        }
      }
    }
    product(false, false, N, OC, C, inp, C, weight, OC, bias != nullptr ? 1.0f : 0.0f, acc, OC);
    product_commit(out, acc, size);
  }

  template <typename T, typename W, typename Bi>
  void matmul_backward_impl(T* dinp, W* dweight, Bi* dbias, const T* dout, const T* inp, const T* weight, int N, int C,
                            int OC) {
    // dinp (N, C) = dout (N, OC) · weightᵀ
    if (dinp != nullptr) {
      const std::size_t size = static_cast<std::size_t>(N) * C;
      float* acc = product_target(dinp, size, false);
      product(false, true, N, C, OC, dout, OC, weight, OC, 0.0f, acc, C);
      product_commit(dinp, acc, size);
    }
    // dweight (C, OC) += inpᵀ (C, N) · dout (N, OC)
    {
      const std::size_t size = static_cast<std::size_t>(C) * OC;
      float* acc = product_target(dweight, size, true);
      product(true, false, C, OC, N, inp, C, dout, OC, 1.0f, acc, OC);
      product_commit(dweight, acc, size);
    }
    // dbias (OC) += column sums of dout, rows in order for reproducibility
    if (dbias != nullptr) bias_gradient_kernel(dbias, dout, N, OC);
  }

  // Where a product into dst (n elements) sums in fp32: dst itself when fp32, else the backend's scratch,
  // holding dst's values when `accumulate`; product_commit rounds it into a bf16 dst.
  template <typename T>
  float* product_target(T* dst, std::size_t n, bool accumulate) {
    if constexpr (is_fp32<T>) {
      return dst;
    } else {
      if (product_.size() < n) product_.resize(n);
      float* acc = product_.data();
      if (accumulate) {
#pragma omp parallel for schedule(static)
        for (std::size_t i = 0; i < n; ++i) acc[i] = load(dst[i]);
      }
      return acc;
    }
  }
  template <typename T>
  void product_commit(T* dst, const float* acc, std::size_t n) {
    if constexpr (!is_fp32<T>) {
#pragma omp parallel for schedule(static)
      for (std::size_t i = 0; i < n; ++i) store(dst[i], acc[i]);
    }
  }

  // Row-major C (M, N) = op(A) · op(B) + β·C with fp32 C: sgemm (or, with bf16_matmul, A and B rounded
  // to bf16) for fp32 operands, Bf16Gemm directly for bf16 ones.
  void product(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
               float beta, float* C, int ldc) {
    gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void product(bool trans_a, bool trans_b, int M, int N, int K, const uint16_t* A, int lda, const uint16_t* B,
               int ldb, float beta, float* C, int ldc) {
    bf16_gemm().run(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }

  // Row-major C (M, N) = op(A) · op(B) + β·C in fp32, or with A and B rounded to bf16.
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) {
    if (!bf16_operands_) {
      cpu::sgemm(sgemm_, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
      return;
    }
    // the stored extent of each operand: its rows, ld apart, the last one only as long as needed
    const std::size_t a_size = static_cast<std::size_t>((trans_a ? K : M) - 1) * lda + (trans_a ? M : K);
    const std::size_t b_size = static_cast<std::size_t>((trans_b ? N : K) - 1) * ldb + (trans_b ? K : N);
    if (M == 0 || N == 0 || K == 0) {
      bf16_->run(trans_a, trans_b, M, N, K, nullptr, lda, nullptr, ldb, beta, C, ldc);
      return;
    }
    if (bf16_a_.size() < a_size) bf16_a_.resize(a_size);
    if (bf16_b_.size() < b_size) bf16_b_.resize(b_size);
    cpu::to_bf16(bf16_a_.data(), A, a_size);
    cpu::to_bf16(bf16_b_.data(), B, b_size);
    bf16_->run(trans_a, trans_b, M, N, K, bf16_a_.data(), lda, bf16_b_.data(), ldb, beta, C, ldc);
  }

  // The bf16 products' engine, made on the first product of bf16 tensors when bf16_matmul did not.
  cpu::Bf16Gemm& bf16_gemm() {
    if (!bf16_) bf16_ = std::make_unique<cpu::Bf16Gemm>();
    return *bf16_;
  }

  int threads_;
  bool bf16_operands_;                   // bf16_matmul: fp32 tensors' products round their operands
  cpu::SgemmLibrary sgemm_;              // the fp32 products' library (kernels/cpu/sgemm.h)
  std::unique_ptr<cpu::Bf16Gemm> bf16_;  // the bf16 products (null until needed)
  std::vector<uint16_t> bf16_a_, bf16_b_;  // fp32 operands rounded (bf16_matmul)
  std::vector<float> product_;             // a bf16 destination's product in fp32
  BlockCache blocks_;
};

}  // namespace

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto pos = line.find(':');
      if (pos != std::string::npos) return line.substr(pos + 2);
    }
  }
  return "unknown CPU";
}

std::unique_ptr<Backend> make_cpu_backend(int threads, bool bf16_matmul, cpu::SgemmLibrary sgemm) {
  return std::make_unique<CpuBackend>(threads, bf16_matmul, sgemm);
}

}  // namespace pb
