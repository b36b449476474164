// The mixture-of-experts ops of the CPU backend (kernels/backend.h, "mixture of experts"; SPEC section
// 9): top-k routing with gates renormalised over the chosen experts, capacity by arrival order, the
// Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), and the dispatch into and the
// combine out of the per-expert slot buffers (E, C, h).
//
// Plain loops. Each token's rows are written by one thread and every sum runs in a fixed order, so the
// results do not depend on the thread count; moe_assign is sequential by definition (first come, first
// served in (n, j) order). Not here: the experts' MLPs (matmul, gelu) and expert parallelism's all-to-all.
//
// dtypes: logits, dlogits and each op's (E, C, h) buffers and token rows in fp32 or bf16 (the tensors of
// one call in one dtype), read as fp32 and stored rounded; a row summed over a token's assignments is
// summed in fp32 and rounded once. probs, gates and their gradients are always fp32.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/cpu_backend.h"

namespace pb::cpu {
namespace {

// Offset of slot s of expert e in a (E, C, h) buffer.
inline std::size_t slot_row(int32_t e, int32_t s, int C, int h) {
  return (static_cast<std::size_t>(e) * C + static_cast<std::size_t>(s)) * h;
}

// Whether expert i is among the first j chosen.
inline bool is_chosen(const int32_t* chosen, int j, int i) {
  for (int q = 0; q < j; ++q) {
    if (chosen[q] == i) return true;
  }
  return false;
}

template <typename T>
void router_forward_kernel(int32_t* expert, float* gate, float* probs, const T* logits, int N, int E, int k) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* z = logits + static_cast<std::size_t>(n) * E;       // (E)
    float* p = probs + static_cast<std::size_t>(n) * E;          // (E)
    int32_t* chosen = expert + static_cast<std::size_t>(n) * k;  // (k)
    float* g = gate + static_cast<std::size_t>(n) * k;           // (k)
    // probs = softmax over all E logits, shifted by the row maximum
    float zmax = load(z[0]);
    for (int i = 1; i < E; ++i) zmax = std::max(zmax, load(z[i]));
    float sum = 0.0f;
    for (int i = 0; i < E; ++i) {
      p[i] = std::exp(load(z[i]) - zmax);
      sum += p[i];
    }
    for (int i = 0; i < E; ++i) p[i] /= sum;
    // top k: pick j is the largest logit not chosen yet; the strict ">" keeps the lower index on a tie
    // (and, should a logit be NaN, still yields a valid expert index: the NaN shows in probs and gate)
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int i = 0; i < E; ++i) {
        if (is_chosen(chosen, j, i)) continue;
        if (best < 0 || load(z[i]) > load(z[best])) best = i;
      }
      chosen[j] = best;
    }
    // gate = softmax over the k chosen logits, in pick order; the first pick is their maximum
    const float gmax = load(z[chosen[0]]);
    float gsum = 0.0f;
    for (int j = 0; j < k; ++j) {
      g[j] = std::exp(load(z[chosen[j]]) - gmax);
      gsum += g[j];
    }
    for (int j = 0; j < k; ++j) g[j] /= gsum;
  }
}

template <typename T>
void router_backward_kernel(T* dlogits, const float* dgate, const float* gate, const int32_t* expert, int N, int E,
                            int k) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    T* dz = dlogits + static_cast<std::size_t>(n) * E;  // (E)
    const float* g = gate + static_cast<std::size_t>(n) * k;
    const float* dg = dgate + static_cast<std::size_t>(n) * k;
    const int32_t* chosen = expert + static_cast<std::size_t>(n) * k;
    // softmax backward over the chosen logits: dz_j = g_j · (dg_j − Σ_i g_i·dg_i); the others get none
    float gdg = 0.0f;
    for (int j = 0; j < k; ++j) gdg += g[j] * dg[j];
    for (int i = 0; i < E; ++i) store(dz[i], 0.0f);
    for (int j = 0; j < k; ++j) store(dz[chosen[j]], g[j] * (dg[j] - gdg));
  }
}

template <typename T>
void aux_loss_kernel(T* dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                     float coef, float grad_scale) {
  if (N == 0) return;  // no tokens: no loss (P_e would divide by zero)
  const int32_t* routed = counts + E;
  // P_e = (1/N) Σ_n probs[n, e], rows in order
  std::vector<double> P(E, 0.0);
  for (int n = 0; n < N; ++n) {
    const float* p = probs + static_cast<std::size_t>(n) * E;
    for (int e = 0; e < E; ++e) P[e] += p[e];
  }
  for (double& x : P) x /= N;
  // f_e = routed_e / (N·k), a constant; loss = coef · E · Σ_e f_e · P_e
  const double assignments = static_cast<double>(N) * k;
  const double loss_scale = static_cast<double>(coef) * E;
  double f_dot_p = 0.0;
  // c_e = grad_scale · ∂loss/∂P_e · ∂P_e/∂probs[n, e] = grad_scale · coef · E · f_e / N
  std::vector<double> c(E);
  for (int e = 0; e < E; ++e) {
    const double f = routed[e] / assignments;
    f_dot_p += f * P[e];
    c[e] = static_cast<double>(grad_scale) * loss_scale * f / N;
  }
  aux_sum[0] += loss_scale * f_dot_p;
  // through the softmax of each row: dz_i += p_i · (c_i − Σ_e c_e·p_e)
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* p = probs + static_cast<std::size_t>(n) * E;
    T* dz = dlogits + static_cast<std::size_t>(n) * E;
    double cp = 0.0;
    for (int e = 0; e < E; ++e) cp += c[e] * p[e];
    for (int i = 0; i < E; ++i) store(dz[i], load(dz[i]) + static_cast<float>(p[i] * (c[i] - cp)));
  }
}

template <typename T>
void dispatch_backward_kernel(T* dinp, const T* dbuf, const int32_t* expert, const int32_t* slot, int N, int k, int C,
                              int h) {
#pragma omp parallel
  {
    std::vector<float> row(is_fp32<T> ? 0 : h);  // bf16: the token's sum in fp32
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      T* dx_row = dinp + static_cast<std::size_t>(n) * h;  // (h)
      float* dx = accumulator_row(dx_row, row.data());
      for (int c = 0; c < h; ++c) dx[c] = 0.0f;
      // the gradients of the token's kept copies, in j order
      for (int j = 0; j < k; ++j) {
        const std::size_t a = static_cast<std::size_t>(n) * k + j;
        if (slot[a] < 0) continue;
        const T* d = dbuf + slot_row(expert[a], slot[a], C, h);
        for (int c = 0; c < h; ++c) dx[c] += load(d[c]);
      }
      finish_row(dx_row, dx, h);
    }
  }
}

template <typename T>
void combine_kernel(T* out, const T* buf, const float* gate, const int32_t* expert, const int32_t* slot, int N, int k,
                    int C, int h) {
#pragma omp parallel
  {
    std::vector<float> row(is_fp32<T> ? 0 : h);  // bf16: the token's sum in fp32
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      T* y_row = out + static_cast<std::size_t>(n) * h;  // (h)
      float* y = accumulator_row(y_row, row.data());
      for (int c = 0; c < h; ++c) y[c] = 0.0f;
      // y = Σ_j gate_j · (expert output of the token's j-th kept copy), in j order
      for (int j = 0; j < k; ++j) {
        const std::size_t a = static_cast<std::size_t>(n) * k + j;
        if (slot[a] < 0) continue;
        const float g = gate[a];
        const T* r = buf + slot_row(expert[a], slot[a], C, h);
        for (int c = 0; c < h; ++c) y[c] += g * load(r[c]);
      }
      finish_row(y_row, y, h);
    }
  }
}

template <typename T>
void combine_backward_kernel(T* dbuf, float* dgate, const T* dout, const T* buf, const float* gate,
                             const int32_t* expert, const int32_t* slot, int N, int E, int k, int C, int h) {
  std::memset(dbuf, 0, sizeof(T) * E * static_cast<std::size_t>(C) * h);  // empty slots get no gradient
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const T* dy = dout + static_cast<std::size_t>(n) * h;  // (h)
    for (int j = 0; j < k; ++j) {
      const std::size_t a = static_cast<std::size_t>(n) * k + j;
      if (slot[a] < 0) {
        dgate[a] = 0.0f;  // a dropped copy contributed nothing
        continue;
      }
      const std::size_t row = slot_row(expert[a], slot[a], C, h);
      const float g = gate[a];
      // dbuf row = gate · dout (the slot is this assignment's alone); dgate = dout · buf row
      double dot = 0.0;
      for (int c = 0; c < h; ++c) {
        store(dbuf[row + c], g * load(dy[c]));
        dot += static_cast<double>(load(dy[c])) * load(buf[row + c]);
      }
      dgate[a] = static_cast<float>(dot);
    }
  }
}

}  // namespace

void moe_router_forward(int32_t* expert, float* gate, float* probs, ConstTensorPtr logits, int N, int E, int k) {
  dispatch([&](auto e) { router_forward_kernel(expert, gate, probs, logits.as<decltype(e)>(), N, E, k); },
           logits.dtype());
}

void moe_router_backward(TensorPtr dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                         int E, int k) {
  dispatch([&](auto e) { router_backward_kernel(dlogits.as<decltype(e)>(), dgate, gate, expert, N, E, k); },
           dlogits.dtype());
}

void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k, int capacity) {
  int32_t* kept = counts;        // (E)
  int32_t* routed = counts + E;  // (E)
  std::fill(counts, counts + 2 * static_cast<std::size_t>(E), 0);
  // first come, first served: the assignments in (n, j) order, each expert keeping its first `capacity`
  const std::size_t assignments = static_cast<std::size_t>(N) * k;
  for (std::size_t a = 0; a < assignments; ++a) {
    const int32_t e = expert[a];
    ++routed[e];
    slot[a] = kept[e] < capacity ? kept[e]++ : -1;
  }
}

void moe_aux_loss(TensorPtr dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                  float coef, float grad_scale) {
  dispatch([&](auto e) {
    aux_loss_kernel(dlogits.as<decltype(e)>(), aux_sum, probs, counts, N, E, k, coef, grad_scale);
  }, dlogits.dtype());
}

void moe_dispatch(TensorPtr buf, ConstTensorPtr inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                  int C, int h) {
  // a copy: the elements' bytes as they are, of either dtype (the two must agree)
  const std::size_t bytes = dtype_bytes(common_dtype("moe_dispatch", {{"buf", buf}, {"inp", inp}}));
  auto* out = static_cast<unsigned char*>(buf.data());
  const auto* in = static_cast<const unsigned char*>(inp.data());
  std::memset(out, 0, bytes * E * static_cast<std::size_t>(C) * h);  // empty slots stay zero
  // each kept assignment owns its slot, so the tokens' copies never overlap
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const unsigned char* x = in + static_cast<std::size_t>(n) * h * bytes;
    for (int j = 0; j < k; ++j) {
      const std::size_t a = static_cast<std::size_t>(n) * k + j;
      if (slot[a] < 0) continue;  // dropped
      std::memcpy(out + slot_row(expert[a], slot[a], C, h) * bytes, x, bytes * h);
    }
  }
}

void moe_dispatch_backward(TensorPtr dinp, ConstTensorPtr dbuf, const int32_t* expert, const int32_t* slot, int N,
                           int /*E*/, int k, int C, int h) {
  const DType t = common_dtype("moe_dispatch_backward", {{"dinp", dinp}, {"dbuf", dbuf}});
  dispatch([&](auto e) {
    using T = decltype(e);
    dispatch_backward_kernel(dinp.as<T>(), dbuf.as<T>(), expert, slot, N, k, C, h);
  }, t);
}

void moe_combine(TensorPtr out, ConstTensorPtr buf, const float* gate, const int32_t* expert, const int32_t* slot,
                 int N, int /*E*/, int k, int C, int h) {
  const DType t = common_dtype("moe_combine", {{"out", out}, {"buf", buf}});
  dispatch([&](auto e) {
    using T = decltype(e);
    combine_kernel(out.as<T>(), buf.as<T>(), gate, expert, slot, N, k, C, h);
  }, t);
}

void moe_combine_backward(TensorPtr dbuf, float* dgate, ConstTensorPtr dout, ConstTensorPtr buf, const float* gate,
                          const int32_t* expert, const int32_t* slot, int N, int E, int k, int C, int h) {
  const DType t = common_dtype("moe_combine_backward", {{"dbuf", dbuf}, {"dout", dout}, {"buf", buf}});
  dispatch([&](auto e) {
    using T = decltype(e);
    combine_backward_kernel(dbuf.as<T>(), dgate, dout.as<T>(), buf.as<T>(), gate, expert, slot, N, E, k, C, h);
  }, t);
}

}  // namespace pb::cpu
