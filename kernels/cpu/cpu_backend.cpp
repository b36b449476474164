// CPU implementation of the Backend: OpenBLAS sgemm for the matrix products (oneDNN's bf16 matmul with
// --dtype bf16), OpenMP for the rest.
//
// Every loop that reduces across rows (bias and LayerNorm parameter gradients, embedding gradients)
// is parallelised over the output columns and runs the rows in order, so a run with the same
// thread count is bitwise reproducible. Memory comes from a per-size cache of freed blocks
// (kernels/block_cache.h).
#include "kernels/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "kernels/block_cache.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/fast_math.h"

namespace pb {
namespace {

constexpr float kLayerNormEps = 1e-5f;

using cpu::exp_approx;  // kernels/cpu/fast_math.h
using cpu::tanh_approx;

constexpr std::size_t kAlignment = 64;

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, bool bf16_matmul)
      : threads_(std::max(1, threads)),
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
    return bf16_ ? "bf16 operands, fp32 accumulation: " + cpu::bf16_gemm_library() : "fp32";
  }

  // ---- memory ------------------------------------------------------------------------------------
  void* alloc(std::size_t bytes, MemCategory category) override { return blocks_.alloc(bytes, category); }
  void free(void* ptr) override { blocks_.free(ptr); }
  MemoryTracker& tracker() override { return blocks_.tracker(); }

  void upload(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, std::size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, std::size_t bytes) override { std::memmove(dst, src, bytes); }
  void zero(void* dst, std::size_t bytes) override { std::memset(dst, 0, bytes); }
  void synchronize() override {}

  // ---- matmul ------------------------------------------------------------------------------------
  // With bf16 products, each operand is rounded to bf16 into one of two scratch buffers of the backend
  // (library workspace, as cuBLAS's: not in a memory category), and oneDNN multiplies them in fp32.
  void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N,
                      int C, int OC) override {
    // out (N, OC) = inp (N, C) · weight (C, OC), then + bias per row
    if (bias != nullptr) {
#pragma omp parallel for schedule(static)
      for (int n = 0; n < N; ++n) std::memcpy(out + static_cast<std::size_t>(n) * OC, bias, sizeof(float) * OC);
    }
    gemm(false, false, N, OC, C, inp, C, weight, OC, bias != nullptr ? 1.0f : 0.0f, out, OC);
  }

  void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                       const float* weight, int N, int C, int OC) override {
    // dinp (N, C) = dout (N, OC) · weightᵀ
    if (dinp != nullptr) gemm(false, true, N, C, OC, dout, OC, weight, OC, 0.0f, dinp, C);
    // dweight (C, OC) += inpᵀ (C, N) · dout (N, OC)
    gemm(true, false, C, OC, N, inp, C, dout, OC, 1.0f, dweight, OC);
    // dbias (OC) += column sums of dout, rows in order for reproducibility
    if (dbias != nullptr) {
      constexpr int kColumnBlock = 64;
#pragma omp parallel for schedule(static)
      for (int c0 = 0; c0 < OC; c0 += kColumnBlock) {
        const int c1 = std::min(OC, c0 + kColumnBlock);
        float acc[kColumnBlock] = {};
        for (int n = 0; n < N; ++n) {
          const float* row = dout + static_cast<std::size_t>(n) * OC;
          for (int c = c0; c < c1; ++c) acc[c - c0] += row[c];
        }
        for (int c = c0; c < c1; ++c) dbias[c] += acc[c - c0];
      }
    }
  }

  // ---- LayerNorm ---------------------------------------------------------------------------------
  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                         const float* bias, int N, int C) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + static_cast<std::size_t>(n) * C;
      float* y = out + static_cast<std::size_t>(n) * C;
      float m = 0.0f;
      for (int i = 0; i < C; ++i) m += x[i];
      m /= C;
      float var = 0.0f;  // biased variance: divide by C
      for (int i = 0; i < C; ++i) {
        const float xm = x[i] - m;
        var += xm * xm;
      }
      var /= C;
      const float s = 1.0f / std::sqrt(var + kLayerNormEps);
      for (int i = 0; i < C; ++i) y[i] = (x[i] - m) * s * weight[i] + bias[i];
      mean[n] = m;
      rstd[n] = s;
    }
  }

  void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const float* weight, const float* mean, const float* rstd, int N,
                          int C) override {
    // dinp: with x̂ = (x − mean)·rstd and g = dout·weight,
    //   dx = rstd · (g − mean(g) − x̂ · mean(g·x̂))
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + static_cast<std::size_t>(n) * C;
      const float* dy = dout + static_cast<std::size_t>(n) * C;
      float* dx = dinp + static_cast<std::size_t>(n) * C;
      const float m = mean[n], s = rstd[n];
      float g_mean = 0.0f, gx_mean = 0.0f;
      for (int i = 0; i < C; ++i) {
        const float g = dy[i] * weight[i];
        g_mean += g;
        gx_mean += g * (x[i] - m) * s;
      }
      g_mean /= C;
      gx_mean /= C;
      for (int i = 0; i < C; ++i) {
        const float xhat = (x[i] - m) * s;
        dx[i] += s * (dy[i] * weight[i] - g_mean - xhat * gx_mean);
      }
    }
    // dweight += Σ_n dout·x̂, dbias += Σ_n dout: columns in parallel, rows in order
    constexpr int kColumnBlock = 64;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += kColumnBlock) {
      const int c1 = std::min(C, c0 + kColumnBlock);
      float dw[kColumnBlock] = {}, db[kColumnBlock] = {};
      for (int n = 0; n < N; ++n) {
        const float* x = inp + static_cast<std::size_t>(n) * C;
        const float* dy = dout + static_cast<std::size_t>(n) * C;
        const float m = mean[n], s = rstd[n];
        for (int c = c0; c < c1; ++c) {
          dw[c - c0] += dy[c] * (x[c] - m) * s;
          db[c - c0] += dy[c];
        }
      }
      for (int c = c0; c < c1; ++c) {
        dweight[c] += dw[c - c0];
        dbias[c] += db[c - c0];
      }
    }
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

  void attention_forward(float* out, float* saved, const float* qkv, int B, int S, int C,
                         int num_heads) override {
    const int d = C / num_heads;
    const std::size_t C3 = 3 * static_cast<std::size_t>(C);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < num_heads; ++h) {
        const float* q = qkv + b * S * C3 + h * d;          // (S, d), row stride 3C
        const float* k = q + C;                              // K block
        const float* v = q + 2 * static_cast<std::size_t>(C);  // V block
        float* P = saved + (static_cast<std::size_t>(b) * num_heads + h) * S * S;  // (S, S)
        float* o = out + b * static_cast<std::size_t>(S) * C + h * d;              // (S, d), stride C
        for (int t = 0; t < S; ++t) {
          const float* qt = q + t * C3;
          float* Pt = P + static_cast<std::size_t>(t) * S;
          // scores of query t against keys 0..t, and their max
          float maxv = -INFINITY;
          for (int t2 = 0; t2 <= t; ++t2) {
            const float* kt = k + t2 * C3;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < d; ++i) dot += qt[i] * kt[i];
            dot *= scale;
            Pt[t2] = dot;
            maxv = std::max(maxv, dot);
          }
          // softmax over 0..t; the masked part of the row is zero
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int t2 = 0; t2 <= t; ++t2) {
            Pt[t2] = exp_approx(Pt[t2] - maxv);
            sum += Pt[t2];
          }
          const float inv = 1.0f / sum;
          for (int t2 = 0; t2 <= t; ++t2) Pt[t2] *= inv;
          for (int t2 = t + 1; t2 < S; ++t2) Pt[t2] = 0.0f;
          // o_t = Σ P[t, t2] · v_t2
          float* ot = o + static_cast<std::size_t>(t) * C;
          for (int i = 0; i < d; ++i) ot[i] = 0.0f;
          for (int t2 = 0; t2 <= t; ++t2) {
            const float p = Pt[t2];
            const float* vt = v + t2 * C3;
            for (int i = 0; i < d; ++i) ot[i] += p * vt[i];
          }
        }
      }
    }
  }

  void attention_backward(float* dqkv, float* scratch, const float* dout, const float* /*out*/, const float* qkv,
                          const float* saved, int B, int S, int C, int num_heads) override {
    const int d = C / num_heads;
    const std::size_t C3 = 3 * static_cast<std::size_t>(C);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::memset(dqkv, 0, sizeof(float) * B * S * C3);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < num_heads; ++h) {
        const float* q = qkv + b * S * C3 + h * d;
        const float* k = q + C;
        const float* v = q + 2 * static_cast<std::size_t>(C);
        float* dq = dqkv + b * S * C3 + h * d;
        float* dk = dq + C;
        float* dv = dq + 2 * static_cast<std::size_t>(C);
        const float* P = saved + (static_cast<std::size_t>(b) * num_heads + h) * S * S;
        float* dS = scratch + (static_cast<std::size_t>(b) * num_heads + h) * S * S;
        const float* dO = dout + b * static_cast<std::size_t>(S) * C + h * d;
        for (int t = 0; t < S; ++t) {
          const float* Pt = P + static_cast<std::size_t>(t) * S;
          const float* dot_ = dO + static_cast<std::size_t>(t) * C;
          float* dSt = dS + static_cast<std::size_t>(t) * S;
          // dP[t, t2] = dO_t · v_t2 ;  dV_t2 += P[t, t2] · dO_t
          for (int t2 = 0; t2 <= t; ++t2) {
            const float* vt = v + t2 * C3;
            float* dvt = dv + t2 * C3;
            float dp = 0.0f;
#pragma omp simd reduction(+ : dp)
            for (int i = 0; i < d; ++i) {
              dp += dot_[i] * vt[i];
              dvt[i] += Pt[t2] * dot_[i];
            }
            dSt[t2] = dp;
          }
          // softmax backward: dScore = P · (dP − Σ P·dP), times the 1/sqrt(d) scale
          float pdp = 0.0f;
#pragma omp simd reduction(+ : pdp)
          for (int t2 = 0; t2 <= t; ++t2) pdp += Pt[t2] * dSt[t2];
          for (int t2 = 0; t2 <= t; ++t2) dSt[t2] = Pt[t2] * (dSt[t2] - pdp) * scale;
          // dQ_t = Σ dScore[t, t2] k_t2 ;  dK_t2 += dScore[t, t2] q_t
          const float* qt = q + t * C3;
          float* dqt = dq + t * C3;
          for (int t2 = 0; t2 <= t; ++t2) {
            const float* kt = k + t2 * C3;
            float* dkt = dk + t2 * C3;
            const float g = dSt[t2];
            for (int i = 0; i < d; ++i) {
              dqt[i] += g * kt[i];
              dkt[i] += g * qt[i];
            }
          }
        }
      }
    }
  }

  // ---- elementwise -------------------------------------------------------------------------------
  void gelu_forward(float* out, const float* inp, std::size_t n) override {
    const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float x = inp[i];
      out[i] = 0.5f * x * (1.0f + tanh_approx(k * (x + 0.044715f * x * x * x)));
    }
  }

  void gelu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
    const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float x = inp[i];
      const float th = tanh_approx(k * (x + 0.044715f * x * x * x));
      const float sech2 = 1.0f - th * th;
      const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * k * (1.0f + 3.0f * 0.044715f * x * x);
      dinp[i] = grad * dout[i];
    }
  }

  void add(float* out, const float* a, const float* b, std::size_t n) override {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }
  void accumulate(float* y, const float* x, std::size_t n) override {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void scale(float* y, float alpha, std::size_t n) override {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) y[i] *= alpha;
  }

  // ---- embedding ---------------------------------------------------------------------------------
  void embedding_forward(float* out, const int32_t* tokens, const float* tok, const float* pos, int B,
                         int S, int C) override {
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int s = 0; s < S; ++s) {
        const int32_t t = tokens[b * S + s];
        const float* te = t >= 0 ? tok + static_cast<std::size_t>(t) * C : nullptr;
        const float* pe = pos != nullptr ? pos + static_cast<std::size_t>(s) * C : nullptr;
        float* o = out + (static_cast<std::size_t>(b) * S + s) * C;
        for (int i = 0; i < C; ++i) o[i] = (te ? te[i] : 0.0f) + (pe ? pe[i] : 0.0f);
      }
    }
  }

  void embedding_backward(float* dtok, float* dpos, const float* dout, const int32_t* tokens, int B,
                          int S, int C) override {
    // Parallel over columns: each thread owns a column range of dtok and dpos, rows in token order.
    constexpr int kColumnBlock = 32;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += kColumnBlock) {
      const int c1 = std::min(C, c0 + kColumnBlock);
      for (int b = 0; b < B; ++b) {
        for (int s = 0; s < S; ++s) {
          const float* g = dout + (static_cast<std::size_t>(b) * S + s) * C;
          const int32_t t = tokens[b * S + s];
          if (t >= 0) {
            float* dt = dtok + static_cast<std::size_t>(t) * C;
            for (int c = c0; c < c1; ++c) dt[c] += g[c];
          }
          if (dpos != nullptr) {
            float* dp = dpos + static_cast<std::size_t>(s) * C;
            for (int c = c0; c < c1; ++c) dp[c] += g[c];
          }
        }
      }
    }
  }

  // ---- loss --------------------------------------------------------------------------------------
  void cross_entropy_forward_backward(float* logits, double* loss_sum, const int32_t* targets, int N,
                                      int V, float scale) override {
    std::vector<double> row_loss(N);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* z = logits + static_cast<std::size_t>(n) * V;
      float maxv = z[0];
      for (int i = 1; i < V; ++i) maxv = std::max(maxv, z[i]);
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
    }
    double total = 0.0;  // summed in row order for reproducibility
    for (int n = 0; n < N; ++n) total += row_loss[n];
    *loss_sum += static_cast<double>(scale) * total;
  }

  void cross_entropy_row_max(float* row_max, const float* logits, int N, int V) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* z = logits + static_cast<std::size_t>(n) * V;
      float m = z[0];
      for (int i = 1; i < V; ++i) m = std::max(m, z[i]);
      row_max[n] = m;
    }
  }

  void cross_entropy_partials(float* sums, const float* logits, const int32_t* targets, const float* row_max, int N,
                              int V) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* z = logits + static_cast<std::size_t>(n) * V;
      const float m = row_max[n];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < V; ++i) sum += exp_approx(z[i] - m);
      sums[n] = sum;
      sums[N + n] = targets[n] >= 0 ? z[targets[n]] - m : 0.0f;
    }
  }

  void cross_entropy_finish(float* logits, double* loss_sum, const int32_t* targets, const float* row_max,
                            const float* sums, int N, int V, float scale) override {
    std::vector<double> row_loss(N);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* z = logits + static_cast<std::size_t>(n) * V;
      const float m = row_max[n], inv = scale / sums[n];
      // CE = log Σ exp(z − max) − (z_target − max), with the sums over every rank's vocabulary block
      row_loss[n] = std::log(static_cast<double>(sums[n])) - static_cast<double>(sums[N + n]);
#pragma omp simd
      for (int i = 0; i < V; ++i) z[i] = exp_approx(z[i] - m) * inv;
      if (targets[n] >= 0) z[targets[n]] -= scale;
    }
    double total = 0.0;
    for (int n = 0; n < N; ++n) total += row_loss[n];
    *loss_sum += static_cast<double>(scale) * total;
  }

  // ---- context parallelism: kernels/cpu/cp_ops.cpp ----------------------------------------------
  void attention_block_forward(float* out, float* lse, const float* q, const float* k, const float* v, int q_stride,
                               int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                               int heads) override {
    cpu::attention_block_forward(out, lse, q, k, v, q_stride, kv_stride, pos_q, pos_k, B, Sq, Sk, C, heads);
  }
  void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int B, int Sq, int C,
                       int heads) override {
    cpu::attention_merge(out, lse, out_b, lse_b, B, Sq, C, heads);
  }
  void attention_block_delta(float* delta, const float* dout, const float* out, int B, int Sq, int C,
                             int heads) override {
    cpu::attention_block_delta(delta, dout, out, B, Sq, C, heads);
  }
  void attention_block_backward(float* dq, float* dk, float* dv, const float* dout, const float* lse,
                                const float* delta, const float* q, const float* k, const float* v, int q_stride,
                                int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk,
                                int C, int heads) override {
    cpu::attention_block_backward(dq, dk, dv, dout, lse, delta, q, k, v, q_stride, kv_stride, pos_q, pos_k, B, Sq, Sk,
                                  C, heads);
  }
  void copy_2d(float* dst, std::size_t dst_stride, const float* src, std::size_t src_stride, std::size_t rows,
               std::size_t cols) override {
    cpu::copy_2d(dst, dst_stride, src, src_stride, rows, cols);
  }

  // ---- mixture of experts: kernels/cpu/moe_ops.cpp -----------------------------------------------
  void moe_router_forward(int32_t* expert, float* gate, float* probs, const float* logits, int N, int E,
                          int k) override {
    cpu::moe_router_forward(expert, gate, probs, logits, N, E, k);
  }
  void moe_router_backward(float* dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                           int E, int k) override {
    cpu::moe_router_backward(dlogits, dgate, gate, expert, N, E, k);
  }
  void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                  int capacity) override {
    cpu::moe_assign(slot, counts, expert, N, E, k, capacity);
  }
  void moe_aux_loss(float* dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                    float coef, float grad_scale) override {
    cpu::moe_aux_loss(dlogits, aux_sum, probs, counts, N, E, k, coef, grad_scale);
  }
  void moe_dispatch(float* buf, const float* inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                    int C, int h) override {
    cpu::moe_dispatch(buf, inp, expert, slot, N, E, k, C, h);
  }
  void moe_dispatch_backward(float* dinp, const float* dbuf, const int32_t* expert, const int32_t* slot, int N, int E,
                             int k, int C, int h) override {
    cpu::moe_dispatch_backward(dinp, dbuf, expert, slot, N, E, k, C, h);
  }
  void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert, const int32_t* slot, int N,
                   int E, int k, int C, int h) override {
    cpu::moe_combine(out, buf, gate, expert, slot, N, E, k, C, h);
  }
  void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf, const float* gate,
                            const int32_t* expert, const int32_t* slot, int N, int E, int k, int C,
                            int h) override {
    cpu::moe_combine_backward(dbuf, dgate, dout, buf, gate, expert, slot, N, E, k, C, h);
  }

  // ---- optimizer ---------------------------------------------------------------------------------
  double sum_squares(const float* x, std::size_t n) override {
    // Fixed chunks summed in order, so the result does not depend on the thread count.
    constexpr std::size_t kChunk = 1 << 14;
    const std::size_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
    for (std::size_t c = 0; c < chunks; ++c) {
      const std::size_t end = std::min(n, (c + 1) * kChunk);
      double acc = 0.0;
      for (std::size_t i = c * kChunk; i < end; ++i) acc += static_cast<double>(x[i]) * x[i];
      partial[c] = acc;
    }
    double total = 0.0;
    for (double p : partial) total += p;
    return total;
  }

  void adamw_update(float* params, const float* grads, float* m, float* v, std::size_t n, float lr,
                    float beta1, float beta2, float eps, float weight_decay, int t,
                    float grad_scale) override {
    // torch.optim.AdamW (non-fused): decoupled decay first, then the bias-corrected Adam step.
    const float bias1 = 1.0f - std::pow(beta1, static_cast<float>(t));
    const float bias2 = 1.0f - std::pow(beta2, static_cast<float>(t));
    const float step_size = lr / bias1;
    const float bias2_sqrt = std::sqrt(bias2);
    const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float g = grads[i] * grad_scale;
      float p = params[i] * decay;
      m[i] = beta1 * m[i] + (1.0f - beta1) * g;
      v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
      const float denom = std::sqrt(v[i]) / bias2_sqrt + eps;
      p -= step_size * m[i] / denom;
      params[i] = p;
    }
  }

 private:
  // Row-major C (M, N) = op(A) · op(B) + β·C in fp32, or with A and B rounded to bf16.
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) {
    if (!bf16_) {
      cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                  1.0f, A, lda, B, ldb, beta, C, ldc);
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

  int threads_;
  std::unique_ptr<cpu::Bf16Gemm> bf16_;  // null: fp32 products
  std::vector<uint16_t> bf16_a_, bf16_b_;
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

std::unique_ptr<Backend> make_cpu_backend(int threads, bool bf16_matmul) {
  return std::make_unique<CpuBackend>(threads, bf16_matmul);
}

}  // namespace pb
