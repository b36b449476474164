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
//
// dtypes: each tensor in fp32 or bf16, independently. The inputs (q, k, v, dout) of one (sample, head)
// are read as fp32 rows: an fp32 tensor's own, a bf16 one's widened into per-thread scratch first (O(S·d)
// against the O(Sq·Sk·d) of the products). Outputs are summed in fp32 and stored in their dtype once per
// call (bf16: rounded to nearest even); lse and delta are always fp32.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/fast_math.h"

namespace pb::cpu {
namespace {

// Row i of sample b in a buffer of `rows` rows per sample, rows `stride` elements apart.
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

// The d columns from `col` of one sample's rows of an input, as fp32: row i at base + i·stride. An fp32
// tensor's own rows (stride as the tensor's); a bf16 tensor's widened into `scratch` (stride d), so that
// the kernels below read every input, whatever its dtype, as fp32 rows.
struct Rows {
  const float* base;
  std::size_t stride;
  const float* operator[](int i) const { return base + static_cast<std::size_t>(i) * stride; }
};

Rows fp32_rows(ConstTensorPtr t, int b, int rows, int stride, int col, int d, std::vector<float>& scratch) {
  if (t.dtype() == DType::f32) {
    return {t.as<float>() + row_offset(b, rows, 0, stride) + col, static_cast<std::size_t>(stride)};
  }
  const uint16_t* src = t.as<uint16_t>();
  scratch.resize(static_cast<std::size_t>(rows) * d);
  for (int i = 0; i < rows; ++i) {
    const uint16_t* row = src + row_offset(b, rows, i, stride) + col;
    float* dst = scratch.data() + static_cast<std::size_t>(i) * d;
    for (int c = 0; c < d; ++c) dst[c] = bf16_to_float(row[c]);
  }
  return {scratch.data(), static_cast<std::size_t>(d)};
}

// dst[offset + c] += src[c] for c < n, in dst's dtype (bf16: rounded once).
void add_row(TensorPtr dst, std::size_t offset, const float* src, int n) {
  dispatch([&](auto e) {
    auto* row = dst.as<decltype(e)>() + offset;
    for (int c = 0; c < n; ++c) store(row[c], load(row[c]) + src[c]);
  }, dst.dtype());
}

// The forward with out's element type O (q, k and v read as fp32 rows).
template <typename O>
void block_forward_kernel(O* out, float* lse, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v, int q_stride,
                          int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                          int heads, int kv_heads) {
  const int d = C / heads, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    std::vector<float> p(static_cast<std::size_t>(Sk));  // one query row's scores, then its probabilities
    std::vector<float> q_rows, k_rows, v_rows;            // bf16 inputs widened
    std::vector<float> o_row(is_fp32<O> ? 0 : d);         // bf16 out: a row summed in fp32
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < heads; ++h) {
        const Rows qs = fp32_rows(q, b, Sq, q_stride, h * d, d, q_rows);
        const Rows ks = fp32_rows(k, b, Sk, kv_stride, h / group * d, d, k_rows);
        const Rows vs = fp32_rows(v, b, Sk, kv_stride, h / group * d, d, v_rows);
        for (int i = 0; i < Sq; ++i) {
          const float* qi = qs[i];                           // (d)
          O* out_i = out + row_offset(b, Sq, i, C) + h * d;  // (d)
          float* oi = accumulator_row(out_i, o_row.data());
          float& li = lse[stat_index(b, h, i, heads, Sq)];
          // scores q·k/√d of the keys at or before the query's position, and their maximum
          float maxv = -INFINITY;
          bool any_visible = false;
          for (int j = 0; j < Sk; ++j) {
            if (pos_k[j] > pos_q[i]) continue;  // masked: p[j] is set to 0 below
            p[j] = dot(qi, ks[j], d) * scale;
            maxv = std::max(maxv, p[j]);
            any_visible = true;
          }
          std::fill(oi, oi + d, 0.0f);
          if (!any_visible) {  // nothing to attend to in this block: out 0, lse −inf
            li = -INFINITY;
            finish_row(out_i, oi, d);
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
            const float* vj = vs[j];
#pragma omp simd
            for (int c = 0; c < d; ++c) oi[c] += w * vj[c];
          }
          li = maxv + std::log(sum);
          finish_row(out_i, oi, d);
        }
      }
    }
  }
}

template <typename O, typename Ob>
void merge_kernel(O* out, float* lse, const Ob* out_b, const float* lse_b, int B, int Sq, int C, int heads) {
  const int d = C / heads;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < Sq; ++i) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t s = stat_index(b, h, i, heads, Sq), o = row_offset(b, Sq, i, C) + h * d;
        const double la = lse[s], lb = lse_b[s];
        if (lb == -INFINITY) continue;  // the block saw nothing: out and lse stay (also when both are −inf)
        if (la == -INFINITY) {          // nothing so far: the block's result as it is
          if constexpr (std::is_same_v<O, Ob>) {
            std::memcpy(out + o, out_b + o, sizeof(O) * d);
          } else {
            for (int c = 0; c < d; ++c) store(out[o + c], load(out_b[o + c]));
          }
          lse[s] = lse_b[s];
          continue;
        }
        // weights relative to the larger lse (one of them is 1, neither overflows), normalised
        const double m = std::max(la, lb), wa = std::exp(la - m), wb = std::exp(lb - m), sum = wa + wb;
        const float ca = static_cast<float>(wa / sum), cb = static_cast<float>(wb / sum);
        for (int c = 0; c < d; ++c) store(out[o + c], ca * load(out[o + c]) + cb * load(out_b[o + c]));
        lse[s] = static_cast<float>(m + std::log(sum));
      }
    }
  }
}

template <typename G, typename O>
void delta_kernel(float* delta, const G* dout, const O* out, int B, int Sq, int C, int heads) {
  const int d = C / heads;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < Sq; ++i) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t o = row_offset(b, Sq, i, C) + h * d;
        double acc = 0.0;  // Σ over the head's columns of dout·out
        for (int c = 0; c < d; ++c) acc += static_cast<double>(load(dout[o + c])) * load(out[o + c]);
        delta[stat_index(b, h, i, heads, Sq)] = static_cast<float>(acc);
      }
    }
  }
}

}  // namespace

void attention_block_forward(TensorPtr out, float* lse, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v,
                             int q_stride, int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq,
                             int Sk, int C, int heads, int kv_heads) {
  dispatch([&](auto o) {
    block_forward_kernel(out.as<decltype(o)>(), lse, q, k, v, q_stride, kv_stride, pos_q, pos_k, B, Sq, Sk, C, heads,
                         kv_heads);
  }, out.dtype());
}

void attention_merge(TensorPtr out, float* lse, ConstTensorPtr out_b, const float* lse_b, int B, int Sq, int C,
                     int heads) {
  dispatch([&](auto o, auto ob) {
    merge_kernel(out.as<decltype(o)>(), lse, out_b.as<decltype(ob)>(), lse_b, B, Sq, C, heads);
  }, out.dtype(), out_b.dtype());
}

void attention_block_delta(float* delta, ConstTensorPtr dout, ConstTensorPtr out, int B, int Sq, int C, int heads) {
  dispatch([&](auto g, auto o) {
    delta_kernel(delta, dout.as<decltype(g)>(), out.as<decltype(o)>(), B, Sq, C, heads);
  }, dout.dtype(), out.dtype());
}

void attention_block_backward(TensorPtr dq, TensorPtr dk, TensorPtr dv, ConstTensorPtr dout, const float* lse,
                              const float* delta, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v, int q_stride,
                              int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                              int heads, int kv_heads) {
  const int d = C / heads, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    // this block's contributions, summed in query order (a key/value head's over its query heads, in head
    // order, on one thread) and added to the gradients once
    std::vector<float> dk_acc(static_cast<std::size_t>(Sk) * d), dv_acc(dk_acc.size()), dq_acc(d);
    std::vector<float> q_rows, k_rows, v_rows, g_rows;  // bf16 inputs widened
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int kvh = 0; kvh < kv_heads; ++kvh) {
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        const Rows ks = fp32_rows(k, b, Sk, kv_stride, kvh * d, d, k_rows);
        const Rows vs = fp32_rows(v, b, Sk, kv_stride, kvh * d, d, v_rows);
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
          const Rows qs = fp32_rows(q, b, Sq, q_stride, h * d, d, q_rows);
          const Rows gs = fp32_rows(dout, b, Sq, C, h * d, d, g_rows);
          for (int i = 0; i < Sq; ++i) {
            const std::size_t s = stat_index(b, h, i, heads, Sq);
            const float li = lse[s], di = delta[s];
            if (li == -INFINITY) continue;  // the query sees no key in any block: P = 0
            const float* qi = qs[i];  // (d)
            const float* gi = gs[i];  // (d)
            std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
            for (int j = 0; j < Sk; ++j) {
              if (pos_k[j] > pos_q[i]) continue;  // masked: P = 0
              const float* kj = ks[j];
              const float* vj = vs[j];
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
            add_row(dq, row_offset(b, Sq, i, q_stride) + h * d, dq_acc.data(), d);
          }
        }
        for (int j = 0; j < Sk; ++j) {
          add_row(dk, row_offset(b, Sk, j, kv_stride) + kvh * d, dk_acc.data() + static_cast<std::size_t>(j) * d, d);
          add_row(dv, row_offset(b, Sk, j, kv_stride) + kvh * d, dv_acc.data() + static_cast<std::size_t>(j) * d, d);
        }
      }
    }
  }
}

void copy_2d(TensorPtr dst, std::size_t dst_stride, ConstTensorPtr src, std::size_t src_stride, std::size_t rows,
             std::size_t cols) {
  const std::size_t bytes = dtype_bytes(common_dtype("copy_2d", {{"dst", dst}, {"src", src}}));
  constexpr std::size_t kParallelElements = std::size_t{1} << 16;  // below this, threads cost more than they save
  const std::size_t row_bytes = cols * bytes;
  auto* d = static_cast<unsigned char*>(dst.data());
  const auto* s = static_cast<const unsigned char*>(src.data());
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelElements)
  for (std::size_t r = 0; r < rows; ++r) std::memcpy(d + r * dst_stride * bytes, s + r * src_stride * bytes, row_bytes);
}

}  // namespace pb::cpu
