// The context-parallel attention ops of the CPU backend (kernels/backend.h, "context parallelism"):
// causal attention computed one block of keys at a time, with the mask taken from the tokens' global
// positions, the blocks' partial results merged through their log-sum-exp (the online softmax of
// Milakov & Gimelshein 2018 as FlashAttention uses it, Dao et al. 2022), and the backward of the
// whole attention recomputed block by block from the final lse and delta = Σ dout·out (FlashAttention
// 2's backward, Dao 2023, algorithm 2).
//
// Plain loops. Forward and backward run one (sample, head) per OpenMP iteration and every sum in a
// fixed order, so the results do not depend on the thread count; a gradient row gets this block's
// contribution summed first and added once. Not here: the exchange of key-value blocks between ranks
// (ring or all-gather), which belongs to the strategy.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/fast_math.h"

namespace pb::cpu {
namespace {

// Row i of sample b in a buffer of `rows` rows per sample, rows `stride` floats apart.
inline std::size_t row_offset(int b, int rows, int i, int stride) {
  return (static_cast<std::size_t>(b) * rows + i) * static_cast<std::size_t>(stride);
}

// Index of (b, head, i) in a (B, heads, Sq) statistics tensor (lse, delta).
inline std::size_t stat_index(int b, int h, int i, int heads, int Sq) {
  return (static_cast<std::size_t>(b) * heads + h) * Sq + i;
}

inline float dot(const float* a, const float* b, int d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

}  // namespace

void attention_block_forward(float* out, float* lse, const float* q, const float* k, const float* v, int q_stride,
                             int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                             int heads) {
  const int d = C / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    std::vector<float> p(static_cast<std::size_t>(Sk));  // one query row's scores, then its probabilities
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < Sq; ++i) {
          const float* qi = q + row_offset(b, Sq, i, q_stride) + h * d;  // (d)
          float* oi = out + row_offset(b, Sq, i, C) + h * d;             // (d)
          float& li = lse[stat_index(b, h, i, heads, Sq)];
          // scores q·k/√d of the keys at or before the query's position, and their maximum
          float maxv = -INFINITY;
          bool any_visible = false;
          for (int j = 0; j < Sk; ++j) {
            if (pos_k[j] > pos_q[i]) continue;  // masked: p[j] is set to 0 below
            p[j] = dot(qi, k + row_offset(b, Sk, j, kv_stride) + h * d, d) * scale;
            maxv = std::max(maxv, p[j]);
            any_visible = true;
          }
          std::fill(oi, oi + d, 0.0f);
          if (!any_visible) {  // nothing to attend to in this block: out 0, lse −inf
            li = -INFINITY;
            continue;
          }
          // softmax over the visible keys, shifted by the maximum; masked keys exactly 0
          float sum = 0.0f;
          for (int j = 0; j < Sk; ++j) {
            p[j] = pos_k[j] <= pos_q[i] ? exp_approx(p[j] - maxv) : 0.0f;
            sum += p[j];
          }
          // out = Σ_j p_j / sum · v_j, keys in order; lse = max + log Σ exp(score − max)
          const float inv = 1.0f / sum;
          for (int j = 0; j < Sk; ++j) {
            if (pos_k[j] > pos_q[i]) continue;
            const float w = p[j] * inv;
            const float* vj = v + row_offset(b, Sk, j, kv_stride) + h * d;
#pragma omp simd
            for (int c = 0; c < d; ++c) oi[c] += w * vj[c];
          }
          li = maxv + std::log(sum);
        }
      }
    }
  }
}

void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int B, int Sq, int C,
                     int heads) {
  const int d = C / heads;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < Sq; ++i) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t s = stat_index(b, h, i, heads, Sq), o = row_offset(b, Sq, i, C) + h * d;
        const double la = lse[s], lb = lse_b[s];
        if (lb == -INFINITY) continue;  // the block saw nothing: out and lse stay (also when both are −inf)
        if (la == -INFINITY) {          // nothing so far: the block's result as it is
          std::memcpy(out + o, out_b + o, sizeof(float) * d);
          lse[s] = lse_b[s];
          continue;
        }
        // weights relative to the larger lse (one of them is 1, neither overflows), normalised
        const double m = std::max(la, lb), wa = std::exp(la - m), wb = std::exp(lb - m), sum = wa + wb;
        const float ca = static_cast<float>(wa / sum), cb = static_cast<float>(wb / sum);
        for (int c = 0; c < d; ++c) out[o + c] = ca * out[o + c] + cb * out_b[o + c];
        lse[s] = static_cast<float>(m + std::log(sum));
      }
    }
  }
}

void attention_block_delta(float* delta, const float* dout, const float* out, int B, int Sq, int C, int heads) {
  const int d = C / heads;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < Sq; ++i) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t o = row_offset(b, Sq, i, C) + h * d;
        double acc = 0.0;  // Σ over the head's columns of dout·out
        for (int c = 0; c < d; ++c) acc += static_cast<double>(dout[o + c]) * out[o + c];
        delta[stat_index(b, h, i, heads, Sq)] = static_cast<float>(acc);
      }
    }
  }
}

void attention_block_backward(float* dq, float* dk, float* dv, const float* dout, const float* lse,
                              const float* delta, const float* q, const float* k, const float* v, int q_stride,
                              int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                              int heads) {
  const int d = C / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    // this block's contributions, summed in query order and added to the gradients once
    std::vector<float> dk_acc(static_cast<std::size_t>(Sk) * d), dv_acc(dk_acc.size()), dq_acc(d);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < heads; ++h) {
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        for (int i = 0; i < Sq; ++i) {
          const std::size_t s = stat_index(b, h, i, heads, Sq);
          const float li = lse[s], di = delta[s];
          if (li == -INFINITY) continue;  // the query sees no key in any block: P = 0
          const float* qi = q + row_offset(b, Sq, i, q_stride) + h * d;  // (d)
          const float* gi = dout + row_offset(b, Sq, i, C) + h * d;      // (d)
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
          for (int j = 0; j < Sk; ++j) {
            if (pos_k[j] > pos_q[i]) continue;  // masked: P = 0
            const float* kj = k + row_offset(b, Sk, j, kv_stride) + h * d;
            const float* vj = v + row_offset(b, Sk, j, kv_stride) + h * d;
            // P = exp(q·k/√d − lse), this key's share of the final softmax; dP = dout·v
            const float p = exp_approx(dot(qi, kj, d) * scale - li);
            const float dp = dot(gi, vj, d);
            // the softmax's backward: dScore = P·(dP − delta), times the 1/√d of the scores
            const float ds = p * (dp - di) * scale;
            float* dkj = dk_acc.data() + static_cast<std::size_t>(j) * d;
            float* dvj = dv_acc.data() + static_cast<std::size_t>(j) * d;
#pragma omp simd
            for (int c = 0; c < d; ++c) {
              dq_acc[c] += ds * kj[c];
              dkj[c] += ds * qi[c];
              dvj[c] += p * gi[c];
            }
          }
          float* dqi = dq + row_offset(b, Sq, i, q_stride) + h * d;
          for (int c = 0; c < d; ++c) dqi[c] += dq_acc[c];
        }
        for (int j = 0; j < Sk; ++j) {
          float* dkj = dk + row_offset(b, Sk, j, kv_stride) + h * d;
          float* dvj = dv + row_offset(b, Sk, j, kv_stride) + h * d;
          const float* ak = dk_acc.data() + static_cast<std::size_t>(j) * d;
          const float* av = dv_acc.data() + static_cast<std::size_t>(j) * d;
          for (int c = 0; c < d; ++c) {
            dkj[c] += ak[c];
            dvj[c] += av[c];
          }
        }
      }
    }
  }
}

void copy_2d(float* dst, std::size_t dst_stride, const float* src, std::size_t src_stride, std::size_t rows,
             std::size_t cols) {
  constexpr std::size_t kParallelFloats = std::size_t{1} << 16;  // below this, threads cost more than they save
  const std::size_t row_bytes = cols * sizeof(float);
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelFloats)
  for (std::size_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, row_bytes);
}

}  // namespace pb::cpu
