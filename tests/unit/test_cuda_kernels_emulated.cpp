// The CUDA backend's kernels (kernels/cuda/kernels.cuh), run on the CPU through tests/unit/cuda_emulation.h
// with the launch configurations of kernels/cuda/cuda_backend.cu, against the CPU backend.
//
// This checks the kernels' indexing, barriers, shuffles and arithmetic on every machine; the GPU run
// of the same comparisons (tests/gpu/test_cuda_ops.cpp, with cuBLAS, streams and the allocator) needs
// a GPU. Outputs start as NaN, so an element a kernel does not write fails; the error is
// ‖kernel − cpu‖ / ‖cpu‖ ≤ 1e-5 (integer outputs, such as the mixture of experts' routing, exactly; a
// log-sum-exp is −inf exactly where the CPU's is). copy_2d is cudaMemcpy2DAsync, no kernel: the GPU test has it.
// The kernels are templates over their tensors' element types: the tests above run them on fp32 (float);
// the tests at the end ("bf16 tensors") run every kernel that takes bf16 on bf16 tensors against the CPU
// backend's fp32 ops on the same values.
#include "tests/unit/cuda_emulation.h"
// The emulation first: the kernels then compile as plain C++.
#include "kernels/cuda/kernels.cuh"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_backend.h"

namespace pb {
namespace {

using emu::launch;
using FVec = std::vector<float>;
namespace k = kernels;

constexpr double kTol = 1e-5;
constexpr int kThreads = 256;  // as cuda_backend.cu
const float kNaN = std::numeric_limits<float>::quiet_NaN();

unsigned blocks_for(std::size_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<std::size_t>(1, (n + threads - 1) / threads));
}

double rel_error(const FVec& got, const FVec& ref) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    diff += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

#define EXPECT_CLOSE(got, ref, what) EXPECT_LE(rel_error(got, ref), kTol) << (what)

// The embedding backward's sort: the keys and row numbers of embedding_sort_keys_kernel, sorted stably by
// key as cub::DeviceRadixSort::SortPairs sorts them on the GPU (a negative token's kNoToken last).
struct SortedRows {
  std::vector<int32_t> keys, rows;
};
SortedRows sort_rows(const std::vector<int32_t>& tokens) {
  const int N = static_cast<int>(tokens.size());
  std::vector<int32_t> keys(tokens.size(), -7), rows(tokens.size(), -7);
  launch(dim3(blocks_for(tokens.size())), dim3(kThreads), 0, kernels::embedding_sort_keys_kernel, keys.data(),
         rows.data(), tokens.data(), N);
  for (int n = 0; n < N; ++n) {
    EXPECT_EQ(keys[n], tokens[n] >= 0 ? tokens[n] : kernels::kNoToken) << "key of row " << n;
    EXPECT_EQ(rows[n], n);
  }
  std::vector<int> order(tokens.size());
  for (int n = 0; n < N; ++n) order[n] = n;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] < keys[b]; });
  SortedRows sorted;
  for (int n : order) {
    sorted.keys.push_back(keys[n]);
    sorted.rows.push_back(rows[n]);
  }
  return sorted;
}

class EmulatedKernels : public ::testing::Test {
 protected:
  FVec random(std::size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> u(lo, hi);
    FVec v(n);
    for (float& x : v) x = u(rng_);
    return v;
  }
  // The fused cross-entropy kernel and the row sum against the CPU backend on logits z (rows Vp apart,
  // V of them the vocabulary); returns the kernel's dlogits.
  FVec check_fused_cross_entropy(const FVec& z, const std::vector<int32_t>& targets, int N, int V, int Vp,
                                 float scale, const std::string& what) {
    FVec logits = z, ref_logits = z;
    std::vector<double> row_loss(N);
    double loss = 0.5, ref_loss = 0.5;
    launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_kernel<float>, logits.data(), row_loss.data(),
           targets.data(), V, Vp, scale);
    launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss, row_loss.data(), N, scale);
    cpu_->cross_entropy_forward_backward(ref_logits.data(), &ref_loss, targets.data(), N, V, Vp, scale);
    EXPECT_CLOSE(logits, ref_logits, what + " dlogits");
    EXPECT_NEAR(loss, ref_loss, 1e-6 * std::abs(ref_loss)) << what;
    return logits;
  }
  std::mt19937 rng_{42};
  std::unique_ptr<Backend> cpu_ = make_cpu_backend(1);
};

TEST_F(EmulatedKernels, LayerNorm) {
  const int N = 37, C = 72;
  const FVec x = random(std::size_t(N) * C, -3.0f, 3.0f), w = random(C), b = random(C);
  FVec out(x.size(), kNaN), mean(N, kNaN), rstd(N, kNaN), ref_out(x.size()), ref_mean(N), ref_rstd(N);
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::layernorm_forward_kernel<float>, out.data(),
         mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
  cpu_->layernorm_forward(ref_out.data(), ref_mean.data(), ref_rstd.data(), x.data(), w.data(), b.data(), N, C);
  EXPECT_CLOSE(out, ref_out, "layernorm forward");
  EXPECT_CLOSE(mean, ref_mean, "layernorm mean");
  EXPECT_CLOSE(rstd, ref_rstd, "layernorm rstd");

  const FVec dout = random(x.size()), dinp0 = random(x.size()), dw0 = random(C), db0 = random(C);
  FVec dinp = dinp0, dw = dw0, db = db0, ref_dinp = dinp0, ref_dw = dw0, ref_db = db0;
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::layernorm_backward_input_kernel<float>,
         dinp.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C);
  const int max_chunks = 8, rows_per_chunk = (N + max_chunks - 1) / max_chunks;
  const int chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  FVec partial(2 * std::size_t(chunks) * C, kNaN);
  launch(dim3(blocks_for(C), chunks), dim3(kThreads), 0, k::layernorm_param_partials_kernel<float>, partial.data(),
         dout.data(), x.data(), mean.data(), rstd.data(), N, C, rows_per_chunk);
  launch(dim3(blocks_for(C)), dim3(kThreads), 0, k::layernorm_param_finish_kernel<float, float>, dw.data(), db.data(),
         partial.data(), chunks, C);
  cpu_->layernorm_backward(ref_dinp.data(), ref_dw.data(), ref_db.data(), dout.data(), x.data(), w.data(),
                           ref_mean.data(), ref_rstd.data(), N, C);
  EXPECT_CLOSE(dinp, ref_dinp, "layernorm backward dinp (accumulated)");
  EXPECT_CLOSE(dw, ref_dw, "layernorm backward dweight");
  EXPECT_CLOSE(db, ref_db, "layernorm backward dbias");
}

// The residual add fused with the LayerNorm after it, in place (out aliases a, as the model calls it):
// out and the LayerNorm's outputs as the CPU backend's add then layernorm_forward.
TEST_F(EmulatedKernels, ResidualLayerNorm) {
  const int N = 37, C = 72;
  const FVec a0 = random(std::size_t(N) * C, -3.0f, 3.0f), b = random(a0.size(), -3.0f, 3.0f);
  const FVec w = random(C), bias = random(C);
  FVec a = a0, ln(a0.size(), kNaN), mean(N, kNaN), rstd(N, kNaN);
  FVec ref_out(a0.size()), ref_ln(a0.size()), ref_mean(N), ref_rstd(N);
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::residual_layernorm_forward_kernel<float>,
         a.data(), ln.data(), mean.data(), rstd.data(), a.data(), b.data(), w.data(), bias.data(), N, C);
  cpu_->residual_layernorm_forward(ref_out.data(), ref_ln.data(), ref_mean.data(), ref_rstd.data(), a0.data(),
                                   b.data(), w.data(), bias.data(), N, C);
  EXPECT_CLOSE(a, ref_out, "residual add (in place)");
  EXPECT_CLOSE(ln, ref_ln, "residual layernorm out");
  EXPECT_CLOSE(mean, ref_mean, "residual layernorm mean");
  EXPECT_CLOSE(rstd, ref_rstd, "residual layernorm rstd");
}

// The dK/dV kernels' shared-memory layout (kernels.cuh, dkv_half_offset): for every head dimension up to
// the limit, a row's values at distinct places inside the row, and every read of the kernels' inner loop
// (a warp's 16 keys × two halves of K and V, and the query row and output gradient, broadcast per half)
// free of bank conflicts: no bank holds two different addresses among a warp's reads. (The layout before,
// one offset per row, had lanes L and L + 16 in one bank at d = 64 and 128.) The shared memory stays
// within what cuda_backend.cu allows at the largest head dimension.
TEST(DkvSharedMemory, ConflictFreeAtEveryHeadDimension) {
  auto max_conflict = [](const std::vector<int>& addresses) {  // the most distinct addresses in one bank
    std::vector<std::vector<int>> banks(32);
    for (int a : addresses) {
      auto& b = banks[a % 32];
      if (std::find(b.begin(), b.end(), a) == b.end()) b.push_back(a);
    }
    std::size_t most = 0;
    for (const auto& b : banks) most = std::max(most, b.size());
    return static_cast<int>(most);
  };
  for (int d = 1; d <= k::kAttMaxHeadDim; ++d) {
    const int half = (d + 1) / 2, offset = k::dkv_half_offset(d), stride = k::dkv_smem_stride(d);
    std::vector<int> where;
    for (int c = 0; c < d; ++c) where.push_back(k::kv_col(c, d, offset));
    std::vector<int> sorted = where;
    std::sort(sorted.begin(), sorted.end());
    ASSERT_TRUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) << "d " << d;
    ASSERT_LT(sorted.back(), k::dkv_row(d)) << "d " << d;
    ASSERT_LE(k::dkv_row(d), stride) << "d " << d;
    EXPECT_LE(k::attention_dkv_smem(d), k::attention_dkv_smem(k::kAttMaxHeadDim)) << "d " << d;
    for (int c = 0; c < half; ++c) {
      for (int warp = 0; warp < k::kDkvWarps; ++warp) {
        std::vector<int> keys, rows;
        for (int lane = 0; lane < 32; ++lane) {
          const bool upper = lane >= k::kDkvKeysPerWarp;
          const int n = upper ? d - half : half, at = upper ? offset : 0;
          if (c >= n) continue;
          const int j = warp * k::kDkvKeysPerWarp + lane % k::kDkvKeysPerWarp;
          keys.push_back(j * stride + at + c);  // Ks[j][...] (Vs alike)
          rows.push_back(at + c);               // the query row (the output gradient alike)
        }
        ASSERT_EQ(max_conflict(keys), 1) << "K reads, d " << d << ", step " << c << ", warp " << warp;
        ASSERT_EQ(max_conflict(rows), 1) << "query row reads, d " << d << ", step " << c;
      }
    }
  }
}

// The dK/dV kernels of the head-dimension class that cuda_backend.cu launches for head dimension d.
template <typename T>
auto dkv_kernel(int d) {
  return k::dkv_half_dim_class(d) == k::kDkvHalfDimSmall ? &k::attention_backward_dkv_kernel<T, k::kDkvHalfDimSmall>
                                                         : &k::attention_backward_dkv_kernel<T, k::kDkvHalfDim>;
}
template <typename TO, typename TI>
auto block_dkv_kernel(int d) {
  return k::dkv_half_dim_class(d) == k::kDkvHalfDimSmall
             ? &k::attention_block_backward_dkv_kernel<TO, TI, k::kDkvHalfDimSmall>
             : &k::attention_block_backward_dkv_kernel<TO, TI, k::kDkvHalfDim>;
}

// Forward and backward of the fused attention, with cuda_backend.cu's grids and shared memory, against the
// CPU backend's grouped-query attention: H query heads and KvH key/value heads (KvH = H: multi-head).
void check_attention(int B, int S, int C, int H, int KvH, std::mt19937& rng, Backend& cpu) {
  const std::string shape = "B" + std::to_string(B) + " S" + std::to_string(S) + " C" + std::to_string(C) + " heads " +
                            std::to_string(H) + " kv heads " + std::to_string(KvH);
  const int d = C / H, W = C + 2 * KvH * d;
  const std::size_t nqkv = std::size_t(B) * S * W, nout = std::size_t(B) * S * C, rows = std::size_t(B) * H * S;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  FVec qkv(nqkv), dout(nout);
  for (float& x : qkv) x = u(rng);
  for (float& x : dout) x = u(rng) / 2;

  FVec out(nout, kNaN), lse(rows, kNaN), ref_out(nout), probs(cpu.attention_saved_floats(B, S, H));
  const dim3 rows_grid((S + k::kAttRows - 1) / k::kAttRows, B * H);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, false), k::attention_forward_kernel<float>,
         out.data(), lse.data(), qkv.data(), S, C, H, KvH);
  cpu.attention_gqa_forward(ref_out.data(), probs.data(), qkv.data(), B, S, C, H, KvH);
  EXPECT_CLOSE(out, ref_out, "attention forward " + shape);

  FVec dqkv(nqkv, kNaN), D(rows, kNaN), ref_dqkv(nqkv), scratch(cpu.attention_scratch_floats(B, S, H));
  launch(dim3(blocks_for(rows * 32)), dim3(kThreads), 0, k::attention_backward_dot_kernel<float, float>, D.data(),
         dout.data(), out.data(), B, S, C, H);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, true), k::attention_backward_dq_kernel<float>,
         dqkv.data(), dout.data(), qkv.data(), lse.data(), D.data(), S, C, H, KvH);
  const dim3 keys_grid((S + k::kDkvKeys - 1) / k::kDkvKeys, B * KvH);
  launch(keys_grid, dim3(k::kDkvWarps * 32), k::attention_dkv_smem(d), dkv_kernel<float>(d), dqkv.data(),
         dout.data(), qkv.data(), lse.data(), D.data(), S, C, H, KvH);
  cpu.attention_gqa_backward(ref_dqkv.data(), scratch.data(), dout.data(), ref_out.data(), qkv.data(), probs.data(),
                             B, S, C, H, KvH);
  EXPECT_CLOSE(dqkv, ref_dqkv, "attention backward dqkv " + shape);
  if (k::dkv_half_dim_class(d) == k::kDkvHalfDimSmall) {  // the large class: the same sums in the same order
    FVec large = dqkv;
    launch(keys_grid, dim3(k::kDkvWarps * 32), k::attention_dkv_smem(d), k::attention_backward_dkv_kernel<float>,
           large.data(), dout.data(), qkv.data(), lse.data(), D.data(), S, C, H, KvH);
    EXPECT_EQ(large, dqkv) << "dK/dV of both head-dimension classes, " << shape;
  }
}

TEST_F(EmulatedKernels, FusedAttention) {
  check_attention(2, 70, 72, 3, 3, rng_, *cpu_);   // head dimension 24, S across tiles
  check_attention(1, 33, 128, 2, 2, rng_, *cpu_);  // 64
  check_attention(1, 40, 256, 2, 2, rng_, *cpu_);  // 128, the limit
  check_attention(1, 1, 16, 4, 4, rng_, *cpu_);    // one token
}

// Grouped-query attention (SPEC 2.5): query heads sharing key/value heads, in groups of 2, 3 and 4 (one
// key/value head for all: multi-query), S across tiles and dK/dV blocks.
TEST_F(EmulatedKernels, GroupedQueryAttention) {
  check_attention(1, 40, 64, 4, 2, rng_, *cpu_);   // d 16, groups of 2
  check_attention(1, 66, 48, 6, 2, rng_, *cpu_);   // d 8, groups of 3, two dK/dV blocks
  check_attention(1, 20, 128, 4, 1, rng_, *cpu_);  // multi-query, d 32
}

// ---- context parallelism: attention by position over key blocks ----------------------------------------
// One case: queries at pos_q in a (B, Sq, 3C + q_pad) buffer; block 1's keys and values at pos_k, in the
// same buffer (`shared`, pos_k = pos_q) or packed (B, Sk, 2C + kv_pad); block 2 packed at pos_k2 (merged
// into block 1's result). Every input float that is not data is NaN (a read outside a row's columns shows);
// gradient buffers start from the same random values (they accumulate) with a guard in their padding.
struct BlockCase {
  const char* name;
  int B, C, H, KvH;  // KvH key/value heads (H: multi-head)
  std::vector<int32_t> pos_q, pos_k, pos_k2;
  bool shared;
  int q_pad, kv_pad;
};

std::vector<int32_t> span(int first, int last) {  // first..last
  std::vector<int32_t> p;
  for (int i = first; i <= last; ++i) p.push_back(i);
  return p;
}
std::vector<int32_t> join(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// lse: −inf exactly where the CPU's is, the finite entries to kTol.
void expect_close_lse(const FVec& got, const FVec& ref, const std::string& what) {
  FVec g, r;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i]) && ref[i] < 0) {
      EXPECT_TRUE(std::isinf(got[i]) && got[i] < 0) << what << ": element " << i << " is " << got[i];
      continue;
    }
    g.push_back(got[i]);
    r.push_back(ref[i]);
  }
  EXPECT_CLOSE(g, r, what);
}

void check_block_attention(const BlockCase& cs, std::mt19937& rng, Backend& cpu) {
  SCOPED_TRACE(cs.name);
  const int B = cs.B, C = cs.C, H = cs.H, KvH = cs.KvH, d = C / H, Ckv = KvH * d;  // Ckv: K's (and V's) columns
  const int Sq = static_cast<int>(cs.pos_q.size()), Sk = static_cast<int>(cs.pos_k.size());
  const int Sk2 = static_cast<int>(cs.pos_k2.size());
  const int W = C + 2 * Ckv;  // a qkv row
  const int qs = W + cs.q_pad, kvs = cs.shared ? qs : 2 * Ckv + cs.kv_pad, kvs2 = 2 * Ckv + cs.kv_pad;
  const std::size_t nout = std::size_t(B) * Sq * C, nstat = std::size_t(B) * H * Sq;
  const float kGuard = 777.0f;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  // A (rows, stride) buffer with random values in columns [0, cols) and `fill` elsewhere.
  auto strided = [&](std::size_t rows, int stride, int cols, float fill) {
    FVec buf(rows * stride, fill);
    for (std::size_t r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) buf[r * stride + c] = u(rng) / (fill == kGuard ? 2 : 1);
    return buf;
  };
  FVec qbuf = strided(std::size_t(B) * Sq, qs, cs.shared ? W : C, kNaN);
  FVec kvbuf = cs.shared ? FVec() : strided(std::size_t(B) * Sk, kvs, 2 * Ckv, kNaN);
  const FVec kv2 = strided(std::size_t(B) * Sk2, kvs2, 2 * Ckv, kNaN);
  const float* q = qbuf.data();
  const float* k = cs.shared ? q + C : kvbuf.data();
  const float* v = k + Ckv;

  // forward of block 1, overwriting out and lse
  FVec out(nout, kNaN), lse(nstat, kNaN), ref_out(nout, kNaN), ref_lse(nstat, kNaN);
  const dim3 rows_grid((Sq + k::kAttRows - 1) / k::kAttRows, B * H);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, false),
         k::attention_block_forward_kernel<float, float>, out.data(), lse.data(), q, k, v, qs, kvs, cs.pos_q.data(),
         cs.pos_k.data(), Sq, Sk, C, H, KvH);
  cpu.attention_block_forward(ref_out.data(), ref_lse.data(), q, k, v, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), B,
                              Sq, Sk, C, H, KvH);
  EXPECT_CLOSE(out, ref_out, "block forward out");
  expect_close_lse(lse, ref_lse, "block forward lse");

  // block 2 (on the CPU), merged into block 1's result by the kernel and by the CPU
  FVec out2(nout, kNaN), lse2(nstat, kNaN);
  cpu.attention_block_forward(out2.data(), lse2.data(), q, kv2.data(), kv2.data() + Ckv, qs, kvs2, cs.pos_q.data(),
                              cs.pos_k2.data(), B, Sq, Sk2, C, H, KvH);
  // a side at −inf contributes nothing: its out is NaN here (kept only where both sides are −inf)
  auto is_neg_inf = [](float x) { return std::isinf(x) && x < 0; };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Sq; ++i) {
        const std::size_t s = (std::size_t(b) * H + h) * Sq + i, o = (std::size_t(b) * Sq + i) * C + h * d;
        if (is_neg_inf(ref_lse[s]) && !is_neg_inf(lse2[s])) std::fill_n(ref_out.begin() + o, d, kNaN);
        if (is_neg_inf(lse2[s])) std::fill_n(out2.begin() + o, d, kNaN);
      }
  FVec merged = ref_out, merged_lse = ref_lse;
  launch(dim3(blocks_for(std::size_t(B) * Sq * H * 32)), dim3(kThreads), 0, k::attention_merge_kernel<float, float>,
         merged.data(), merged_lse.data(), out2.data(), lse2.data(), B, Sq, C, H);
  cpu.attention_merge(ref_out.data(), ref_lse.data(), out2.data(), lse2.data(), B, Sq, C, H);
  EXPECT_CLOSE(merged, ref_out, "merge out");
  expect_close_lse(merged_lse, ref_lse, "merge lse");

  // delta from the merged out: the fused attention's row-dot kernel, as cuda_backend.cu launches it
  FVec dout(nout), delta(nstat, kNaN), ref_delta(nstat, kNaN);
  for (float& x : dout) x = u(rng) / 2;
  launch(dim3(blocks_for(nstat * 32)), dim3(kThreads), 0, k::attention_backward_dot_kernel<float, float>, delta.data(),
         dout.data(), ref_out.data(), B, Sq, C, H);
  cpu.attention_block_delta(ref_delta.data(), dout.data(), ref_out.data(), B, Sq, C, H);
  EXPECT_CLOSE(delta, ref_delta, "delta");

  // backward of block 1 from the CPU's final lse and delta, accumulating into dq and its dk, dv
  FVec dqbuf = strided(std::size_t(B) * Sq, qs, cs.shared ? W : C, kGuard);
  FVec dkvbuf = cs.shared ? FVec() : strided(std::size_t(B) * Sk, kvs, 2 * Ckv, kGuard);
  FVec ref_dqbuf = dqbuf, ref_dkvbuf = dkvbuf;
  auto grads = [&](FVec& dqb, FVec& dkvb) {
    float* dq = dqb.data();
    float* dk = cs.shared ? dq + C : dkvb.data();
    return std::tuple{dq, dk, dk + Ckv};
  };
  auto [dq, dk, dv] = grads(dqbuf, dkvbuf);
  auto [ref_dq, ref_dk, ref_dv] = grads(ref_dqbuf, ref_dkvbuf);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, true),
         k::attention_block_backward_dq_kernel<float, float>, dq, qs, dout.data(), ref_lse.data(), ref_delta.data(), q,
         k, v, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), Sq, Sk, C, H, KvH);
  launch(dim3((Sk + k::kDkvKeys - 1) / k::kDkvKeys, B * KvH), dim3(k::kDkvWarps * 32), k::attention_dkv_smem(d),
         block_dkv_kernel<float, float>(d), dk, dv, kvs, dout.data(), ref_lse.data(),
         ref_delta.data(), q, k, v, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), Sq, Sk, C, H, KvH);
  cpu.attention_block_backward(ref_dq, ref_dk, ref_dv, dout.data(), ref_lse.data(), ref_delta.data(), q, k, v, qs,
                               kvs, cs.pos_q.data(), cs.pos_k.data(), B, Sq, Sk, C, H, KvH);
  EXPECT_CLOSE(dqbuf, ref_dqbuf, "block backward dq (and the own block's dk, dv)");
  if (!cs.shared) {
    EXPECT_CLOSE(dkvbuf, ref_dkvbuf, "block backward dk, dv");
  }
  // the padding of the gradient buffers: never written
  auto guard_kept = [&](const FVec& buf, int stride, int cols) {
    for (std::size_t i = 0; i < buf.size(); ++i)
      if (static_cast<int>(i % stride) >= cols && buf[i] != kGuard) return false;
    return true;
  };
  EXPECT_TRUE(guard_kept(dqbuf, qs, cs.shared ? W : C)) << "dq padding written";
  if (!cs.shared) {
    EXPECT_TRUE(guard_kept(dkvbuf, kvs, 2 * Ckv)) << "dk, dv padding written";
  }
}

TEST_F(EmulatedKernels, ContextParallelAttention) {
  const BlockCase cases[] = {
      // zigzag halves of an 80-token sequence: block 1 the middle (the first 20 queries see nothing in it),
      // block 2 the queries' own positions; head dimension 24; rows and keys across tiles
      {"zigzag, middle block, stride 3C and 2C", 2, 72, 3, 3, join(span(0, 19), span(60, 79)), span(20, 59),
       join(span(0, 19), span(60, 79)), false, 0, 0},
      // the diagonal block in the qkv buffer (stride 3C), head dimension 64; block 2 in the future of all
      {"zigzag diagonal, stride 3C", 1, 128, 2, 2, join(span(0, 4), span(35, 39)), join(span(0, 4), span(35, 39)),
       span(40, 45), true, 0, 0},
      // head dimension 128 (the limit), 70 keys (two dK/dV blocks) in the past, unsorted; padded strides
      {"past, unsorted, d = 128, padded strides", 1, 256, 2, 2, {90, 75, 80, 99, 71, 72, 96, 85, 70},
       join(span(35, 69), span(0, 34)), {95, 3, 71, 88}, false, 3, 5},
      // every key of block 1 in the future (out 0, lse −inf), block 2 too for some queries (both −inf)
      {"future block, tiny head", 2, 16, 4, 4, span(0, 4), span(5, 7), {2, 9}, false, 0, 0},
      // grouped-query attention (SPEC 2.5): K|V of the kv heads only, in the qkv buffer (stride C + 2·kv·d)
      // and packed (stride 2·kv·d); groups of 2 and 4 (multi-query), keys across two dK/dV blocks
      {"grouped, zigzag middle block, packed", 1, 64, 4, 2, join(span(0, 9), span(70, 79)), span(10, 69),
       join(span(0, 9), span(70, 79)), false, 0, 0},
      {"grouped, diagonal in the qkv buffer", 1, 48, 6, 3, span(0, 33), span(0, 33), span(34, 40), true, 0, 0},
      {"multi-query, past, padded strides", 1, 128, 4, 1, span(80, 90), span(0, 69), {95, 3}, false, 3, 5},
  };
  for (const BlockCase& cs : cases) check_block_attention(cs, rng_, *cpu_);
}

TEST_F(EmulatedKernels, Embedding) {
  const int B = 2, S = 13, C = 40, V = 67, N = B * S;
  std::vector<int32_t> tokens(N);
  std::uniform_int_distribution<int32_t> t(-3, V - 1);
  for (int32_t& x : tokens) x = t(rng_);
  tokens[0] = tokens[1] = tokens[5] = 7;
  const FVec table = random(std::size_t(V) * C), pos = random(std::size_t(S) * C);
  FVec out(std::size_t(N) * C, kNaN), ref_out(out.size());
  launch(dim3(blocks_for(out.size())), dim3(kThreads), 0, k::embedding_forward_kernel<float>, out.data(), tokens.data(),
         table.data(), pos.data(), N, S, C);
  cpu_->embedding_forward(ref_out.data(), tokens.data(), table.data(), pos.data(), B, S, C);
  EXPECT_CLOSE(out, ref_out, "embedding forward");

  const FVec dout = random(out.size()), dtok0 = random(table.size()), dpos0 = random(pos.size());
  FVec dtok = dtok0, dpos = dpos0, ref_dtok = dtok0, ref_dpos = dpos0;
  const SortedRows sorted = sort_rows(tokens);
  launch(dim3(blocks_for(std::size_t(N) * C)), dim3(kThreads), 0, k::embedding_backward_sorted_kernel<float, float>,
         dtok.data(), dout.data(), sorted.keys.data(), sorted.rows.data(), N, C);
  launch(dim3(blocks_for(pos.size())), dim3(kThreads), 0, k::embedding_backward_pos_kernel<float, float>, dpos.data(),
         dout.data(), B, S, C);
  cpu_->embedding_backward(ref_dtok.data(), ref_dpos.data(), dout.data(), tokens.data(), B, S, C);
  EXPECT_CLOSE(dtok, ref_dtok, "embedding backward dtok");
  EXPECT_CLOSE(dpos, ref_dpos, "embedding backward dpos");
}

TEST_F(EmulatedKernels, CrossEntropy) {
  const int N = 9, V = 300;
  const float scale = 0.03f;
  std::vector<int32_t> targets(N);
  std::uniform_int_distribution<int32_t> t(0, V - 1);
  for (int32_t& x : targets) x = t(rng_);
  FVec z = random(std::size_t(N) * V, -8.0f, 8.0f);
  z[3] = 120.0f;  // a dominant logit

  check_fused_cross_entropy(z, targets, N, V, V, scale, "cross-entropy");

  // Vocabulary-parallel steps; some targets in another rank's block.
  targets[0] = targets[4] = -1;
  std::vector<double> row_loss(N);
  FVec logits2 = z, ref_logits2 = z, row_max(N, kNaN), sums(2 * N, kNaN), ref_max(N), ref_sums(2 * N);
  double loss2 = 0.0, ref_loss2 = 0.0;
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_row_max_kernel<float>, row_max.data(), logits2.data(), V, V);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_partials_kernel<float>, sums.data(), logits2.data(),
         targets.data(), row_max.data(), N, V, V);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_finish_kernel<float>, logits2.data(), row_loss.data(),
         targets.data(), row_max.data(), sums.data(), N, V, V, scale);
  launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss2, row_loss.data(), N, scale);
  cpu_->cross_entropy_row_max(ref_max.data(), z.data(), N, V, V);
  cpu_->cross_entropy_partials(ref_sums.data(), z.data(), targets.data(), ref_max.data(), N, V, V);
  cpu_->cross_entropy_finish(ref_logits2.data(), &ref_loss2, targets.data(), ref_max.data(), ref_sums.data(), N, V, V,
                             scale);
  EXPECT_CLOSE(row_max, ref_max, "cross-entropy row max");
  EXPECT_CLOSE(sums, ref_sums, "cross-entropy partial sums");
  EXPECT_CLOSE(logits2, ref_logits2, "cross-entropy finish dlogits");
  EXPECT_NEAR(loss2, ref_loss2, 1e-6 * std::abs(ref_loss2));
}

// The vocabulary's padding (rows Vp apart; the padding holds logits that would dominate if read):
// dlogits 0 there, the rest as the CPU backend's; through the vocabulary-parallel steps too, with a
// block wholly in the padding (row max −∞, nothing summed, dlogits 0).
TEST_F(EmulatedKernels, CrossEntropyPaddedVocabulary) {
  const int N = 5, V = 200, Vp = 256;
  const float scale = 0.2f;
  std::vector<int32_t> targets(N);
  std::uniform_int_distribution<int32_t> t(0, V - 1);
  for (int32_t& x : targets) x = t(rng_);
  FVec z = random(std::size_t(N) * Vp, -4.0f, 4.0f);
  for (int n = 0; n < N; ++n) std::fill_n(z.begin() + std::size_t(n) * Vp + V, Vp - V, 500.0f);

  const FVec logits = check_fused_cross_entropy(z, targets, N, V, Vp, scale, "padded cross-entropy");
  std::vector<double> row_loss(N);
  for (int n = 0; n < N; ++n) {
    for (int i = V; i < Vp; ++i) ASSERT_EQ(logits[std::size_t(n) * Vp + i], 0.0f) << "padding, row " << n;
  }

  // A block of only padding (another rank holds the vocabulary): V = 0 of its Vp columns.
  FVec block(std::size_t(N) * Vp, 500.0f), row_max(N, kNaN), sums(2 * N, kNaN);
  const std::vector<int32_t> elsewhere(N, -1);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_row_max_kernel<float>, row_max.data(), block.data(), 0, Vp);
  for (float m : row_max) EXPECT_EQ(m, -INFINITY);
  const FVec global_max(N, 3.0f), global_sums = [&] {
    FVec g(2 * N, 2.0f);
    std::fill_n(g.begin() + N, N, -1.0f);
    return g;
  }();
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_partials_kernel<float>, sums.data(), block.data(),
         elsewhere.data(), global_max.data(), N, 0, Vp);
  for (float s : sums) EXPECT_EQ(s, 0.0f);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_finish_kernel<float>, block.data(), row_loss.data(),
         elsewhere.data(), global_max.data(), global_sums.data(), N, 0, Vp, scale);
  for (float v : block) ASSERT_EQ(v, 0.0f) << "a padding block's dlogits";
}

TEST_F(EmulatedKernels, SumSquaresAdamWGelu) {
  const std::size_t n = (std::size_t{1} << 14) * 2 + 77;  // three chunks, the last one short
  const FVec x = random(n, -4.0f, 4.0f);
  const std::size_t chunks = (n + k::kSumChunk - 1) / k::kSumChunk;
  std::vector<double> partial(chunks + 1, std::nan(""));
  launch(dim3(static_cast<unsigned>(chunks)), dim3(kThreads), 0, k::sum_squares_partial_kernel<float>, partial.data(),
         x.data(), n);
  launch(dim3(1), dim3(1024), 0, k::sum_doubles_kernel, partial.data() + chunks, partial.data(), chunks);
  EXPECT_NEAR(partial[chunks], cpu_->sum_squares(x.data(), n), 1e-12 * partial[chunks]);

  const std::size_t m = 1000;
  FVec p = random(m), g = random(m, -0.1f, 0.1f), mo = random(m, -0.01f, 0.01f), v = random(m, 0.0f, 1e-4f);
  FVec rp = p, rm = mo, rv = v;
  const float lr = 3e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, clip = 0.5f;
  for (int t = 1; t <= 3; ++t) {
    const float bias1 = 1.0f - std::pow(b1, static_cast<float>(t)), bias2 = 1.0f - std::pow(b2, static_cast<float>(t));
    launch(dim3(blocks_for(m)), dim3(kThreads), 0, k::adamw_kernel<float>, p.data(), g.data(), mo.data(), v.data(), m,
           b1, b2, eps, lr / bias1, std::sqrt(bias2), 1.0f - lr * wd, clip);
    cpu_->adamw_update(rp.data(), g.data(), rm.data(), rv.data(), m, lr, b1, b2, eps, wd, t, clip);
  }
  EXPECT_CLOSE(p, rp, "adamw params");
  EXPECT_CLOSE(mo, rm, "adamw m");
  EXPECT_CLOSE(v, rv, "adamw v");

  // The batched norm: each piece's chunks, then their sum added to its bin, pieces in order, as the CPU.
  const FVec y = random(5000, -2.0f, 2.0f);
  std::vector<double> bins = {0.0, 0.0};
  for (const auto& [piece, size, bin] : {std::tuple<const float*, std::size_t, int>{x.data(), n, 1},
                                         {y.data(), y.size(), 0}, {y.data() + 100, 3000, 1}}) {
    const std::size_t piece_chunks = (size + k::kSumChunk - 1) / k::kSumChunk;
    std::vector<double> part(piece_chunks, std::nan(""));
    launch(dim3(static_cast<unsigned>(piece_chunks)), dim3(kThreads), 0, k::sum_squares_partial_kernel<float>,
           part.data(), piece, size);
    launch(dim3(1), dim3(1024), 0, k::add_sum_doubles_kernel, bins.data() + bin, part.data(), piece_chunks);
  }
  double ref_bins[2];
  cpu_->sum_squares(ref_bins, 2, {{x.data(), n, 1}, {y.data(), y.size(), 0}, {y.data() + 100, 3000, 1}});
  EXPECT_NEAR(bins[0], ref_bins[0], 1e-12 * ref_bins[0]) << "sum_squares bin 0";
  EXPECT_NEAR(bins[1], ref_bins[1], 1e-12 * ref_bins[1]) << "sum_squares bin 1";

  // One launch for several ranges of the flat buffers, each with its decay, gaps untouched, as the CPU's
  // per-range updates.
  {
    const std::vector<Backend::AdamwRange> ranges = {{500, 400, 0.1f}, {0, 300, 0.0f}, {950, 50, 0.1f}};
    std::vector<k::AdamwRangeDesc> table;
    std::size_t total = 0;
    const int t = 2;
    for (const Backend::AdamwRange& r : ranges) {
      table.push_back({total, r.begin, r.n, 1.0f - lr * r.weight_decay});
      total += r.n;
    }
    FVec q = random(m), qm = random(m, -0.01f, 0.01f), qv = random(m, 0.0f, 1e-4f);
    FVec rq = q, rqm = qm, rqv = qv;
    const float bias1 = 1.0f - std::pow(b1, static_cast<float>(t)), bias2 = 1.0f - std::pow(b2, static_cast<float>(t));
    launch(dim3(blocks_for(total)), dim3(kThreads), 0, k::adamw_ranges_kernel<float>, q.data(), g.data(), qm.data(),
           qv.data(), table.data(), static_cast<int>(table.size()), total, b1, b2, eps, lr / bias1, std::sqrt(bias2),
           clip);
    cpu_->adamw_update(rq.data(), g.data(), rqm.data(), rqv.data(), ranges, lr, b1, b2, eps, t, clip);
    EXPECT_CLOSE(q, rq, "adamw ranges params");
    EXPECT_CLOSE(qm, rqm, "adamw ranges m");
    EXPECT_CLOSE(qv, rqv, "adamw ranges v");
  }

  FVec gelu(m, kNaN), ref_gelu(m), dgelu(m, kNaN), ref_dgelu(m);
  const FVec xs = random(m, -5.0f, 5.0f);
  launch(dim3(blocks_for(m)), dim3(kThreads), 0, k::gelu_forward_kernel<float>, gelu.data(), xs.data(), m);
  launch(dim3(blocks_for(m)), dim3(kThreads), 0, k::gelu_backward_kernel<float>, dgelu.data(), xs.data(), g.data(), m);
  cpu_->gelu_forward(ref_gelu.data(), xs.data(), m);
  cpu_->gelu_backward(ref_dgelu.data(), xs.data(), g.data(), m);
  EXPECT_CLOSE(gelu, ref_gelu, "gelu forward");
  EXPECT_CLOSE(dgelu, ref_dgelu, "gelu backward");
}

// ---- fp32 → bf16 (the bf16 matrix products' operands) ------------------------------------------
uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
bool bf16_is_nan(uint16_t b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x007Fu) != 0; }

// The reference: round to nearest even on the bits, for finite values and ±inf.
uint16_t rne_reference(float x) {
  const uint32_t u = float_bits(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

TEST_F(EmulatedKernels, FloatToBf16RoundsToNearestEven) {
  const float inf = std::numeric_limits<float>::infinity();
  // Hand-picked: exact values; ties (the low 16 bits 0x8000) to the even neighbour below and above;
  // just off a tie; negative ties; denormals (of fp32, and fp32 normals that are bf16 denormals);
  // the largest float (rounds to inf), the largest bf16 and the values around its rounding boundary;
  // ±0, ±inf and NaNs of both signs, quiet and signalling.
  FVec x = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 3.0f, 1e-3f, -7.25f, 65504.0f,
            bits_float(0x3F808000u),   // 1 + 2^-8: a tie, the kept mantissa even (0x3F80): stays
            bits_float(0x3F818000u),   // a tie, the kept mantissa odd (0x3F81): up to 0x3F82
            bits_float(0x3F808001u),   // just above a tie: up
            bits_float(0x3F807FFFu),   // just below a tie: down
            bits_float(0xBF808000u),   // negative ties: the magnitude rounds as for positive
            bits_float(0xBF818000u), bits_float(0xC0490FDBu),  // −π
            bits_float(0x00000001u),   // the smallest fp32 denormal: to +0
            bits_float(0x00008000u),   // a denormal tie, kept bits even: to 0
            bits_float(0x00018000u),   // a denormal tie, kept bits odd: up to 0x0002
            bits_float(0x807FFFFFu),   // the largest negative denormal: to −2^-126 (0x8080)
            bits_float(0x00800000u),   // the smallest fp32 normal
            std::numeric_limits<float>::max(),   // past the largest bf16: inf
            -std::numeric_limits<float>::max(),  // −inf
            bits_float(0x7F7F0000u),   // the largest bf16: exact
            bits_float(0x7F7F7FFFu),   // just below the boundary to inf: the largest bf16
            bits_float(0x7F7F8000u),   // the tie at the boundary, kept mantissa odd: inf
            3.0e38f, -1.0e38f, 1.0e30f, inf, -inf,
            bits_float(0x7FC00000u), bits_float(0xFFC00000u), bits_float(0x7F800001u), bits_float(0xFF812345u)};
  // and random bit patterns, every exponent (NaNs and infs among them)
  std::uniform_int_distribution<uint32_t> bits(0, 0xFFFFFFFFu);
  for (int i = 0; i < 5000; ++i) x.push_back(bits_float(bits(rng_)));
  // and ties at random exponents
  for (int i = 0; i < 500; ++i) x.push_back(bits_float((bits(rng_) & 0xFFFF0000u) | 0x8000u));
  const std::size_t n = x.size();

  std::vector<uint16_t> out(n, 0xABCD);  // poisoned: an unwritten element fails (unless 0xABCD is its value)
  std::vector<uint16_t> guard(n + 8, 0xABCD);
  launch(dim3(blocks_for(n)), dim3(kThreads), 0, k::float_to_bf16_kernel, out.data(), x.data(), n);
  // n elements and no more: the launch's last block has idle threads past n
  launch(dim3(blocks_for(n)), dim3(kThreads), 0, k::float_to_bf16_kernel, guard.data(), x.data(), n);
  for (std::size_t i = n; i < guard.size(); ++i) EXPECT_EQ(guard[i], 0xABCD) << "written past n at " << i;

  std::size_t nans = 0, ties = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const uint32_t u = float_bits(x[i]);
    const std::string what = "x = " + std::to_string(x[i]) + " (bits 0x" + [&] {
      char buf[16];
      std::snprintf(buf, sizeof buf, "%08X", u);
      return std::string(buf);
    }() + ")";
    if (std::isnan(x[i])) {
      ++nans;
      EXPECT_TRUE(bf16_is_nan(out[i])) << what << ": NaN stays NaN, got 0x" << std::hex << out[i];
      continue;
    }
    ties += (u & 0xFFFFu) == 0x8000u;
    EXPECT_EQ(out[i], rne_reference(x[i])) << what;
    // Independently of the bit trick: the nearest of the two bf16 neighbours (ties: the even one),
    // the magnitude rounding past the largest bf16 going to inf.
    if (!std::isinf(x[i])) {
      const uint32_t down = u & 0xFFFF0000u, up = down + 0x10000u;
      const double d_down = std::abs(static_cast<double>(x[i]) - bits_float(down));
      const double d_up = std::isinf(bits_float(up)) ? std::abs(static_cast<double>(x[i]) -
                                                                 std::ldexp(std::copysign(1.0, x[i]), 128))
                                                     : std::abs(static_cast<double>(x[i]) - bits_float(up));
      const uint32_t nearest = d_down < d_up ? down : d_up < d_down ? up : ((down >> 16) & 1u) == 0 ? down : up;
      EXPECT_EQ(out[i], static_cast<uint16_t>(nearest >> 16)) << what << ": not the nearest bf16";
    }
  }
  EXPECT_GT(nans, 4u);
  EXPECT_GT(ties, 400u);
  // the hand-picked cases, spelled out
  const std::vector<uint16_t> expected_head = {0x0000, 0x8000, 0x3F80, 0xBF80, 0x3F00, 0x4040};
  for (std::size_t i = 0; i < expected_head.size(); ++i) EXPECT_EQ(out[i], expected_head[i]) << "value " << i;
  EXPECT_EQ(out[9], 0x3F80) << "tie to even (down)";
  EXPECT_EQ(out[10], 0x3F82) << "tie to even (up)";
  EXPECT_EQ(out[11], 0x3F81);
  EXPECT_EQ(out[12], 0x3F80);
  EXPECT_EQ(out[13], 0xBF80);
  EXPECT_EQ(out[14], 0xBF82);
  EXPECT_EQ(out[15], 0xC049);  // −3.140625
  EXPECT_EQ(out[16], 0x0000);
  EXPECT_EQ(out[17], 0x0000);
  EXPECT_EQ(out[18], 0x0002);
  EXPECT_EQ(out[19], 0x8080);
  EXPECT_EQ(out[20], 0x0080);
  EXPECT_EQ(out[21], 0x7F80);
  EXPECT_EQ(out[22], 0xFF80);
  EXPECT_EQ(out[23], 0x7F7F);
  EXPECT_EQ(out[24], 0x7F7F);
  EXPECT_EQ(out[25], 0x7F80);
  EXPECT_EQ(out[29], 0x7F80);
  EXPECT_EQ(out[30], 0xFF80);
  // The kernel's NaN is the canonical 0x7FFF, as the device conversion's (cvt.rn.bf16.f32)
  for (std::size_t i = 31; i < 35; ++i) EXPECT_EQ(out[i], 0x7FFF) << "NaN " << i;
  // and the helper the kernel calls gives the same bits on the host
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(k::float_to_bf16_bits(x[i]), out[i]) << i;
}

// The mixture-of-experts kernels with cuda_backend.cu's launches, against the CPU backend
// (kernels/cpu/moe_ops.cpp): integer outputs and the dispatched copies compared exactly, the rest to
// kTol. Buffers that the backend zeroes with cudaMemsetAsync before a scatter kernel are zeroed here.
// The buffers hold C = capacity + 1 slots, so some are always left empty.
void check_moe(int N, int E, int k, int h, int capacity, std::mt19937& rng, Backend& cpu) {
  const std::string shape = "N" + std::to_string(N) + " E" + std::to_string(E) + " k" + std::to_string(k) + " h" +
                            std::to_string(h) + " capacity " + std::to_string(capacity);
  const int C = capacity + 1;
  const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E, nX = std::size_t(N) * h,
                    nB = std::size_t(E) * C * h;
  const int32_t kIntPoison = -123456789;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  auto random = [&](std::size_t n) {
    FVec v(n);
    for (float& x : v) x = u(rng);
    return v;
  };
  // Logits favouring expert 0 (so that a small capacity drops), with a row of ties and a tied pair.
  FVec logits = random(nP);
  for (int n = 0; n < N; ++n) logits[std::size_t(n) * E] += n % 3 != 2 ? 1.5f : 0.0f;
  for (int e = 0; e < E; ++e) logits[e] = 0.5f;
  if (N > 1) logits[E + E - 1] = logits[E + 1] = 3.0f;

  // router forward and backward
  std::vector<int32_t> expert(nA, kIntPoison), ref_expert(nA);
  FVec gate(nA, kNaN), probs(nP, kNaN), ref_gate(nA), ref_probs(nP);
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_router_forward_kernel<float>, expert.data(), gate.data(),
         probs.data(), logits.data(), N, E, k);
  cpu.moe_router_forward(ref_expert.data(), ref_gate.data(), ref_probs.data(), logits.data(), N, E, k);
  EXPECT_EQ(expert, ref_expert) << "router expert " << shape;
  EXPECT_CLOSE(gate, ref_gate, "router gate " + shape);
  EXPECT_CLOSE(probs, ref_probs, "router probs " + shape);

  const FVec dgate = random(nA);
  FVec dlogits(nP, kNaN), ref_dlogits(nP);
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_router_backward_kernel<float>, dlogits.data(), dgate.data(),
         ref_gate.data(), ref_expert.data(), N, E, k);
  cpu.moe_router_backward(ref_dlogits.data(), dgate.data(), ref_gate.data(), ref_expert.data(), N, E, k);
  EXPECT_CLOSE(dlogits, ref_dlogits, "router dlogits " + shape);

  // capacity
  std::vector<int32_t> slot(nA, kIntPoison), counts(2 * std::size_t(E), kIntPoison), ref_slot(nA), ref_counts(2 * E);
  launch(dim3(blocks_for(E)), dim3(kThreads), 0, k::moe_assign_kernel, slot.data(), counts.data(), ref_expert.data(),
         N, E, k, capacity);
  cpu.moe_assign(ref_slot.data(), ref_counts.data(), ref_expert.data(), N, E, k, capacity);
  EXPECT_EQ(slot, ref_slot) << "slot " << shape;
  EXPECT_EQ(counts, ref_counts) << "counts " << shape;

  // auxiliary loss: the increments of dlogits and of aux_sum
  const float coef = 0.37f, grad_scale = 0.25f;
  const FVec pre = random(nP);
  FVec aux_dlogits = pre, ref_aux_dlogits = pre;
  std::vector<double> prob_sum(E, std::nan(""));
  double aux = 0.5, ref_aux = 0.5;
  launch(dim3(blocks_for(E)), dim3(kThreads), 0, k::moe_prob_sums_kernel, prob_sum.data(), ref_probs.data(), N, E);
  launch(dim3(1), dim3(kThreads), 0, k::moe_aux_loss_sum_kernel, &aux, prob_sum.data(), ref_counts.data(), N, E, k,
         coef);
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_aux_loss_grad_kernel<float>, aux_dlogits.data(),
         ref_probs.data(), ref_counts.data(), N, E, k, coef, grad_scale);
  cpu.moe_aux_loss(ref_aux_dlogits.data(), &ref_aux, ref_probs.data(), ref_counts.data(), N, E, k, coef, grad_scale);
  EXPECT_NEAR(aux, ref_aux, 1e-12 * std::abs(ref_aux)) << "aux_sum " << shape;
  FVec inc(nP), ref_inc(nP);
  for (std::size_t i = 0; i < nP; ++i) {
    inc[i] = aux_dlogits[i] - pre[i];
    ref_inc[i] = ref_aux_dlogits[i] - pre[i];
  }
  EXPECT_CLOSE(inc, ref_inc, "aux dlogits increment " + shape);

  // dispatch and its backward
  const FVec inp = random(nX);
  FVec buf(nB, 0.0f), ref_buf(nB);  // zeroed: cudaMemsetAsync
  launch(dim3(blocks_for(nA * h)), dim3(kThreads), 0, k::moe_dispatch_kernel<float>, buf.data(), inp.data(),
         ref_expert.data(), ref_slot.data(), N, k, C, h);
  cpu.moe_dispatch(ref_buf.data(), inp.data(), ref_expert.data(), ref_slot.data(), N, E, k, C, h);
  EXPECT_EQ(buf, ref_buf) << "dispatch buf " << shape;

  const FVec dbuf = random(nB);
  FVec dinp(nX, kNaN), ref_dinp(nX);
  launch(dim3(blocks_for(nX)), dim3(kThreads), 0, k::moe_dispatch_backward_kernel<float>, dinp.data(), dbuf.data(),
         ref_expert.data(), ref_slot.data(), N, k, C, h);
  cpu.moe_dispatch_backward(ref_dinp.data(), dbuf.data(), ref_expert.data(), ref_slot.data(), N, E, k, C, h);
  EXPECT_CLOSE(dinp, ref_dinp, "dispatch dinp " + shape);

  // combine and its backward; y: the experts' outputs, every slot
  const FVec y = random(nB), dout = random(nX);
  FVec out(nX, kNaN), ref_out(nX);
  launch(dim3(blocks_for(nX)), dim3(kThreads), 0, k::moe_combine_kernel<float>, out.data(), y.data(), ref_gate.data(),
         ref_expert.data(), ref_slot.data(), N, k, C, h);
  cpu.moe_combine(ref_out.data(), y.data(), ref_gate.data(), ref_expert.data(), ref_slot.data(), N, E, k, C, h);
  EXPECT_CLOSE(out, ref_out, "combine out " + shape);

  FVec cdbuf(nB, 0.0f), dgate_out(nA, kNaN), ref_cdbuf(nB), ref_dgate(nA);  // dbuf zeroed: cudaMemsetAsync
  launch(dim3(blocks_for(nA * h)), dim3(kThreads), 0, k::moe_combine_backward_dbuf_kernel<float>, cdbuf.data(),
         dout.data(), ref_gate.data(), ref_expert.data(), ref_slot.data(), N, k, C, h);
  launch(dim3(blocks_for(nA * 32)), dim3(kThreads), 0, k::moe_combine_backward_dgate_kernel<float>, dgate_out.data(),
         dout.data(), y.data(), ref_expert.data(), ref_slot.data(), N, k, C, h);
  cpu.moe_combine_backward(ref_cdbuf.data(), ref_dgate.data(), dout.data(), y.data(), ref_gate.data(),
                           ref_expert.data(), ref_slot.data(), N, E, k, C, h);
  EXPECT_CLOSE(cdbuf, ref_cdbuf, "combine dbuf " + shape);
  EXPECT_CLOSE(dgate_out, ref_dgate, "combine dgate " + shape);
}

TEST_F(EmulatedKernels, MixtureOfExperts) {
  check_moe(37, 5, 2, 7, 37, rng_, *cpu_);  // no limit (capacity N)
  check_moe(37, 5, 2, 7, 15, rng_, *cpu_);  // capacity factor 1: expert 0 overflows
  check_moe(29, 5, 3, 45, 1, rng_, *cpu_);  // h > 32: each lane of dgate's warp sums several columns
  check_moe(13, 3, 3, 5, 0, rng_, *cpu_);   // k = E, every assignment dropped
  check_moe(17, 3, 1, 13, 6, rng_, *cpu_);  // k = 1
  check_moe(1, 5, 5, 3, 1, rng_, *cpu_);    // one token, k = E
}

// ---- bf16 tensors -----------------------------------------------------------------------------------
// Every kernel that takes bf16 tensors, in bf16, against the CPU backend's fp32 ops on fp32 tensors that hold
// the same (bf16-representable) input values: a bf16 output of an elementwise op is round(fp32 result)
// within one bf16 ulp; one whose intermediates round differently (reductions, softmax, accumulations over
// rows) is within kBf16Tol = 1e-2 of the fp32 result (‖got − ref‖/‖ref‖); an fp32 output of a kernel that
// only reads bf16 (statistics, losses, fp32 accumulators) within kTol. Outputs start as NaN (bf16 0x7FC1).
using BVec = std::vector<uint16_t>;
constexpr double kBf16Tol = 1e-2;
constexpr uint16_t kBf16NaN = 0x7FC1;

BVec to_bf16(const FVec& x) {
  BVec b(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) b[i] = k::float_to_bf16_bits(x[i]);
  return b;
}
FVec to_f32(const BVec& b) {
  FVec x(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) x[i] = k::bf16_bits_to_float(b[i]);
  return x;
}
const FVec& to_f32(const FVec& x) { return x; }
// x rounded to bf16 values (held as floats): inputs that fp32 and bf16 tensors hold alike.
FVec bf16_values(const FVec& x) { return to_f32(to_bf16(x)); }
// Random bf16 values in [lo, hi).
FVec random_bf16(std::mt19937& rng, std::size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  FVec v(n);
  for (float& x : v) x = u(rng);
  return bf16_values(v);
}
// A tensor of element type T (float or uint16_t) holding the values x (rounded into bf16).
template <typename T>
std::vector<T> as_type(const FVec& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return to_bf16(x);
  }
}
template <typename T>
T poison() {
  if constexpr (std::is_same_v<T, float>) {
    return kNaN;
  } else {
    return kBf16NaN;
  }
}

// A bf16 value's position on the number line in ulps (±0 both 0).
int bf16_ordinal(uint16_t b) { return (b & 0x8000u) != 0 ? -static_cast<int>(b & 0x7FFFu) : static_cast<int>(b); }

// Each element of got within one bf16 ulp of ref (fp32) rounded to nearest even; NaN never is.
void expect_within_ulp(const BVec& got, const FVec& ref, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const uint16_t r = k::float_to_bf16_bits(ref[i]);
    const bool nan = (got[i] & 0x7F80u) == 0x7F80u && (got[i] & 0x007Fu) != 0;
    if (nan || std::abs(bf16_ordinal(got[i]) - bf16_ordinal(r)) > 1) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements more than one bf16 ulp from "
                     << "round(fp32), the first at " << first << " (got "
                     << (bad > 0 ? k::bf16_bits_to_float(got[first]) : 0.0f) << ", fp32 "
                     << (bad > 0 ? ref[first] : 0.0f) << ")";
}
// An output in its type: fp32 to kTol, bf16 to kBf16Tol.
template <typename T>
void expect_typed_close(const std::vector<T>& got, const FVec& ref, const std::string& what) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  const double e = rel_error(to_f32(got), ref);
  EXPECT_LE(e, fp32 ? kTol : kBf16Tol) << what << " (" << (fp32 ? "fp32" : "bf16") << "): relative error " << e;
}

// ---- the Llama-style block (SPEC 2.5): RMSNorm, rotary positions and SwiGLU against the CPU backend -----
// In T (float: to kTol; uint16_t, bf16: to kBf16Tol), on bf16 values so that both dtypes start from the
// same inputs; statistics fp32.
template <typename T>
void check_rmsnorm(std::mt19937& rng, Backend& cpu) {
  const int N = 37, C = 72;
  const FVec x = random_bf16(rng, std::size_t(N) * C, -3.0f, 3.0f), w = random_bf16(rng, C, 0.5f, 1.5f);
  const std::vector<T> xt = as_type<T>(x), wt = as_type<T>(w);
  std::vector<T> out(x.size(), poison<T>());
  FVec rstd(N, kNaN), ref_out(x.size()), ref_rstd(N);
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::rmsnorm_forward_kernel<T>, out.data(),
         rstd.data(), xt.data(), wt.data(), N, C);
  cpu.rmsnorm_forward(ref_out.data(), ref_rstd.data(), x.data(), w.data(), N, C);
  expect_typed_close(out, ref_out, "rmsnorm forward");
  EXPECT_CLOSE(rstd, ref_rstd, "rmsnorm rstd (fp32)");

  // backward: dinp accumulates in T; dweight accumulates in bf16 and in fp32, from the same partial sums
  const FVec dout = random_bf16(rng, x.size()), dinp0 = random_bf16(rng, x.size()), dw0 = random_bf16(rng, C);
  const std::vector<T> doutt = as_type<T>(dout);
  std::vector<T> dinp = as_type<T>(dinp0);
  FVec ref_dinp = dinp0, ref_dw = dw0;
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::rmsnorm_backward_input_kernel<T>, dinp.data(),
         doutt.data(), xt.data(), wt.data(), rstd.data(), N, C);
  const int max_chunks = 8, rows_per_chunk = (N + max_chunks - 1) / max_chunks;
  const int chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  FVec partial(std::size_t(chunks) * C + 1, kNaN);  // one more: RMSNorm's partials have no Σ dout rows
  launch(dim3(blocks_for(C), chunks), dim3(kThreads), 0, k::layernorm_param_partials_kernel<T>, partial.data(),
         doutt.data(), xt.data(), static_cast<const float*>(nullptr), rstd.data(), N, C, rows_per_chunk);
  EXPECT_TRUE(std::isnan(partial.back())) << "rmsnorm partials past their chunks";
  BVec dw_b = to_bf16(dw0);
  FVec dw_f = dw0;
  launch(dim3(blocks_for(C)), dim3(kThreads), 0, k::layernorm_param_finish_kernel<uint16_t, float>, dw_b.data(),
         static_cast<float*>(nullptr), partial.data(), chunks, C);
  launch(dim3(blocks_for(C)), dim3(kThreads), 0, k::layernorm_param_finish_kernel<float, float>, dw_f.data(),
         static_cast<float*>(nullptr), partial.data(), chunks, C);
  cpu.rmsnorm_backward(ref_dinp.data(), ref_dw.data(), dout.data(), x.data(), w.data(), ref_rstd.data(), N, C);
  expect_typed_close(dinp, ref_dinp, "rmsnorm backward dinp (accumulated)");
  expect_typed_close(dw_b, ref_dw, "rmsnorm backward dweight in bf16");
  expect_typed_close(dw_f, ref_dw, "rmsnorm backward dweight in fp32");

  // the residual add and the RMSNorm of its sum, in place (out aliases a, as the model calls it)
  const FVec b = random_bf16(rng, x.size(), -3.0f, 3.0f);
  std::vector<T> sum = xt;
  const std::vector<T> bt = as_type<T>(b);
  std::vector<T> norm(x.size(), poison<T>());
  FVec ref_sum(x.size()), ref_norm(x.size());
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::residual_rmsnorm_forward_kernel<T>, sum.data(),
         norm.data(), rstd.data(), sum.data(), bt.data(), wt.data(), N, C);
  cpu.residual_rmsnorm_forward(ref_sum.data(), ref_norm.data(), ref_rstd.data(), x.data(), b.data(), w.data(), N, C);
  expect_typed_close(sum, ref_sum, "residual add (in place)");
  expect_typed_close(norm, ref_norm, "residual rmsnorm out");
  const double tol = std::is_same_v<T, float> ? kTol : kBf16Tol;
  EXPECT_LE(rel_error(rstd, ref_rstd), tol) << "residual rmsnorm rstd";
}

// Rotary positions on the K heads of a qkv buffer (rows W apart, columns [C, C + kv·d) rotated): unsorted
// positions as context parallelism gives them, Llama 3's theta; forward against the CPU's, the backward
// of the result back to the input, columns outside the heads untouched.
template <typename T>
void check_rope(std::mt19937& rng, Backend& cpu) {
  const int B = 2, S = 13, H = 4, KvH = 2, d = 16, C = H * d, W = C + 2 * KvH * d;
  const double theta = 500000.0;
  const std::vector<int32_t> pos = {0, 1, 2, 3, 40, 41, 42, 43, 4095, 4094, 9, 1000, 7};
  const FVec x = random_bf16(rng, std::size_t(B) * S * W, -2.0f, 2.0f);
  std::vector<T> y = as_type<T>(x);
  FVec ref = x;
  launch(dim3(blocks_for(std::size_t(B) * S * d / 2)), dim3(kThreads), 0, k::rope_kernel<T>, y.data() + C,
         std::size_t(W), pos.data(), B, S, KvH, d, theta, 1.0f);
  cpu.rope_forward(ref.data() + C, W, pos.data(), B, S, KvH, d, theta);
  expect_typed_close(y, ref, "rope forward");
  const std::vector<T> untouched = as_type<T>(x);
  for (std::size_t i = 0; i < y.size(); ++i) {
    const int col = static_cast<int>(i % W);
    if (col < C || col >= C + KvH * d) {
      ASSERT_EQ(std::memcmp(&y[i], &untouched[i], sizeof(T)), 0) << "column " << col;
    }
  }
  std::vector<T> back = y;
  launch(dim3(blocks_for(std::size_t(B) * S * d / 2)), dim3(kThreads), 0, k::rope_kernel<T>, back.data() + C,
         std::size_t(W), pos.data(), B, S, KvH, d, theta, -1.0f);
  FVec ref_back = ref;
  cpu.rope_backward(ref_back.data() + C, W, pos.data(), B, S, KvH, d, theta);
  expect_typed_close(back, ref_back, "rope backward");
  const double tol = std::is_same_v<T, float> ? kTol : 2 * kBf16Tol;  // bf16: rounded after each rotation
  EXPECT_LE(rel_error(to_f32(back), x), tol) << "rotated back";
}

template <typename T>
void check_swiglu(std::mt19937& rng, Backend& cpu) {
  const std::size_t n = 1000;
  const FVec gate = random_bf16(rng, n, -6.0f, 6.0f), up = random_bf16(rng, n, -2.0f, 2.0f), dout = random_bf16(rng, n);
  const std::vector<T> gt = as_type<T>(gate), ut = as_type<T>(up);
  std::vector<T> out(n, poison<T>());
  FVec ref_out(n);
  launch(dim3(blocks_for(n)), dim3(kThreads), 0, k::swiglu_forward_kernel<T>, out.data(), gt.data(), ut.data(), n);
  cpu.swiglu_forward(ref_out.data(), gate.data(), up.data(), n);
  expect_typed_close(out, ref_out, "swiglu forward");
  // dup aliasing dout, as the model calls it
  std::vector<T> dgate(n, poison<T>()), dup = as_type<T>(dout);
  FVec ref_dgate(n), ref_dup = dout;
  launch(dim3(blocks_for(n)), dim3(kThreads), 0, k::swiglu_backward_kernel<T>, dgate.data(), dup.data(), dup.data(),
         gt.data(), ut.data(), n);
  cpu.swiglu_backward(ref_dgate.data(), ref_dup.data(), ref_dup.data(), gate.data(), up.data(), n);
  expect_typed_close(dgate, ref_dgate, "swiglu backward dgate");
  expect_typed_close(dup, ref_dup, "swiglu backward dup (in place of dout)");
}

TEST_F(EmulatedKernels, LlamaBlockOps) {
  check_rmsnorm<float>(rng_, *cpu_);
  check_rope<float>(rng_, *cpu_);
  check_swiglu<float>(rng_, *cpu_);
}

TEST_F(EmulatedKernels, Bf16LlamaBlockOps) {
  check_rmsnorm<uint16_t>(rng_, *cpu_);
  check_rope<uint16_t>(rng_, *cpu_);
  check_swiglu<uint16_t>(rng_, *cpu_);
}

// bf16: the sum rounded once into out (within one ulp of the fp32 sum), the LayerNorm of the rounded sum
// to the bf16 tolerance of the CPU's fp32 op on the same values.
TEST_F(EmulatedKernels, Bf16ResidualLayerNorm) {
  const int N = 29, C = 80;
  const FVec a = random_bf16(rng_, std::size_t(N) * C, -3.0f, 3.0f), b = random_bf16(rng_, a.size(), -3.0f, 3.0f);
  const FVec w = random_bf16(rng_, C), bias = random_bf16(rng_, C);
  BVec out = to_bf16(a);
  const BVec bb = to_bf16(b), wb = to_bf16(w), biasb = to_bf16(bias);
  BVec ln(a.size(), kBf16NaN);
  FVec mean(N, kNaN), rstd(N, kNaN), ref_out(a.size()), ref_ln(a.size()), ref_mean(N), ref_rstd(N);
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::residual_layernorm_forward_kernel<uint16_t>,
         out.data(), ln.data(), mean.data(), rstd.data(), out.data(), bb.data(), wb.data(), biasb.data(), N, C);
  cpu_->residual_layernorm_forward(ref_out.data(), ref_ln.data(), ref_mean.data(), ref_rstd.data(), a.data(), b.data(),
                                   w.data(), bias.data(), N, C);
  expect_within_ulp(out, ref_out, "residual add (bf16, in place)");
  expect_typed_close(ln, ref_ln, "residual layernorm out");
  EXPECT_LE(rel_error(mean, ref_mean), kBf16Tol) << "residual layernorm mean";
  EXPECT_LE(rel_error(rstd, ref_rstd), kBf16Tol) << "residual layernorm rstd";
}

TEST_F(EmulatedKernels, Bf16LayerNorm) {
  const int N = 37, C = 72;
  const FVec x = random_bf16(rng_, std::size_t(N) * C, -3.0f, 3.0f), w = random_bf16(rng_, C), b = random_bf16(rng_, C);
  const BVec xb = to_bf16(x), wb = to_bf16(w), bb = to_bf16(b);
  BVec out(x.size(), kBf16NaN);
  FVec mean(N, kNaN), rstd(N, kNaN), ref_out(x.size()), ref_mean(N), ref_rstd(N);
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::layernorm_forward_kernel<uint16_t>, out.data(),
         mean.data(), rstd.data(), xb.data(), wb.data(), bb.data(), N, C);
  cpu_->layernorm_forward(ref_out.data(), ref_mean.data(), ref_rstd.data(), x.data(), w.data(), b.data(), N, C);
  expect_typed_close(out, ref_out, "layernorm forward out");
  EXPECT_CLOSE(mean, ref_mean, "layernorm mean (fp32)");
  EXPECT_CLOSE(rstd, ref_rstd, "layernorm rstd (fp32)");

  // backward: dinp accumulates in bf16; the parameter gradients in each dtype (dweight bf16 with dbias
  // fp32, then the other way round), from the same partial sums
  const FVec dout = random_bf16(rng_, x.size()), dinp0 = random_bf16(rng_, x.size());
  const FVec dw0 = random_bf16(rng_, C), db0 = random_bf16(rng_, C);
  const BVec doutb = to_bf16(dout);
  BVec dinp = to_bf16(dinp0);
  FVec ref_dinp = dinp0, ref_dw = dw0, ref_db = db0;
  launch(dim3(blocks_for(std::size_t(N) * 32)), dim3(kThreads), 0, k::layernorm_backward_input_kernel<uint16_t>,
         dinp.data(), doutb.data(), xb.data(), wb.data(), mean.data(), rstd.data(), N, C);
  const int max_chunks = 8, rows_per_chunk = (N + max_chunks - 1) / max_chunks;
  const int chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  FVec partial(2 * std::size_t(chunks) * C, kNaN);
  launch(dim3(blocks_for(C), chunks), dim3(kThreads), 0, k::layernorm_param_partials_kernel<uint16_t>,
         partial.data(), doutb.data(), xb.data(), mean.data(), rstd.data(), N, C, rows_per_chunk);
  BVec dw_b = to_bf16(dw0), db_b = to_bf16(db0);
  FVec dw_f = dw0, db_f = db0;
  launch(dim3(blocks_for(C)), dim3(kThreads), 0, k::layernorm_param_finish_kernel<uint16_t, float>, dw_b.data(),
         db_f.data(), partial.data(), chunks, C);
  launch(dim3(blocks_for(C)), dim3(kThreads), 0, k::layernorm_param_finish_kernel<float, uint16_t>, dw_f.data(),
         db_b.data(), partial.data(), chunks, C);
  cpu_->layernorm_backward(ref_dinp.data(), ref_dw.data(), ref_db.data(), dout.data(), x.data(), w.data(),
                           ref_mean.data(), ref_rstd.data(), N, C);
  expect_typed_close(dinp, ref_dinp, "layernorm backward dinp (accumulated)");
  expect_typed_close(dw_b, ref_dw, "layernorm backward dweight");
  expect_typed_close(db_b, ref_db, "layernorm backward dbias");
  expect_typed_close(dw_f, ref_dw, "layernorm backward dweight of bf16 activations");
  expect_typed_close(db_f, ref_db, "layernorm backward dbias of bf16 activations");
}

// The fused attention in bf16 (qkv, out, dout, dqkv), its statistics fp32: head dimension 24 with as many
// key/value heads as heads, and 12 with 4 heads sharing 2 (SPEC 2.5); S across a 32-key tile.
void check_attention_bf16(int H, int KvH, std::mt19937& rng, Backend& cpu) {
  SCOPED_TRACE("heads " + std::to_string(H) + ", kv heads " + std::to_string(KvH));
  const int B = 2, S = 37, C = 48, d = C / H, W = C + 2 * KvH * d;
  const std::size_t nqkv = std::size_t(B) * S * W, nout = std::size_t(B) * S * C, rows = std::size_t(B) * H * S;
  const FVec qkv = random_bf16(rng, nqkv, -2.0f, 2.0f), dout = random_bf16(rng, nout);
  const BVec qkvb = to_bf16(qkv), doutb = to_bf16(dout);
  BVec out(nout, kBf16NaN);
  FVec lse(rows, kNaN), ref_out(nout), probs(cpu.attention_saved_floats(B, S, H));
  const dim3 rows_grid((S + k::kAttRows - 1) / k::kAttRows, B * H);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, false), k::attention_forward_kernel<uint16_t>,
         out.data(), lse.data(), qkvb.data(), S, C, H, KvH);
  cpu.attention_gqa_forward(ref_out.data(), probs.data(), qkv.data(), B, S, C, H, KvH);
  expect_typed_close(out, ref_out, "attention forward out");
  // the CPU's statistics: its context-parallel forward over every position of the sequence
  std::vector<int32_t> pos(S);
  for (int i = 0; i < S; ++i) pos[i] = i;
  FVec cp_out(nout), ref_lse(rows);
  cpu.attention_block_forward(cp_out.data(), ref_lse.data(), qkv.data(), qkv.data() + C, qkv.data() + C + KvH * d,
                                W, W, pos.data(), pos.data(), B, S, S, C, H, KvH);
  EXPECT_CLOSE(lse, ref_lse, "attention forward lse (fp32)");

  // backward from the kernel's bf16 out (D = Σ dout·out of those values, fp32)
  FVec D(rows, kNaN), ref_D(rows), scratch(cpu.attention_scratch_floats(B, S, H)), ref_dqkv(nqkv);
  BVec dqkv(nqkv, kBf16NaN);
  launch(dim3(blocks_for(rows * 32)), dim3(kThreads), 0, k::attention_backward_dot_kernel<uint16_t, uint16_t>,
         D.data(), doutb.data(), out.data(), B, S, C, H);
  cpu.attention_block_delta(ref_D.data(), dout.data(), to_f32(out).data(), B, S, C, H);
  EXPECT_CLOSE(D, ref_D, "attention backward D (fp32)");
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, true), k::attention_backward_dq_kernel<uint16_t>,
         dqkv.data(), doutb.data(), qkvb.data(), lse.data(), D.data(), S, C, H, KvH);
  launch(dim3((S + k::kDkvKeys - 1) / k::kDkvKeys, B * KvH), dim3(k::kDkvWarps * 32), k::attention_dkv_smem(d),
         dkv_kernel<uint16_t>(d), dqkv.data(), doutb.data(), qkvb.data(), lse.data(), D.data(), S, C, H, KvH);
  cpu.attention_gqa_backward(ref_dqkv.data(), scratch.data(), dout.data(), ref_out.data(), qkv.data(), probs.data(),
                               B, S, C, H, KvH);
  expect_typed_close(dqkv, ref_dqkv, "attention backward dqkv");
}

TEST_F(EmulatedKernels, Bf16FusedAttention) {
  check_attention_bf16(2, 2, rng_, *cpu_);
  check_attention_bf16(4, 2, rng_, *cpu_);
}

// The context-parallel kernels on bf16 queries, keys, values and dout, the outputs (out; dq, dk, dv) in TO:
// bf16, or fp32 accumulators. The structure of check_block_attention: block 1 by the kernel, block 2 by the
// CPU merged in (a bf16 block result into a TO running one), delta, and block 1's backward accumulating.
template <typename TO>
void check_block_attention_bf16(const BlockCase& cs, std::mt19937& rng, Backend& cpu) {
  SCOPED_TRACE(std::string(cs.name) + (std::is_same_v<TO, float> ? ", fp32 outputs" : ", bf16 outputs"));
  const int B = cs.B, C = cs.C, H = cs.H, KvH = cs.KvH, d = C / H, Ckv = KvH * d;  // Ckv: K's (and V's) columns
  const int Sq = static_cast<int>(cs.pos_q.size()), Sk = static_cast<int>(cs.pos_k.size());
  const int Sk2 = static_cast<int>(cs.pos_k2.size());
  const int W = C + 2 * Ckv;  // a qkv row
  const int qs = W + cs.q_pad, kvs = cs.shared ? qs : 2 * Ckv + cs.kv_pad, kvs2 = 2 * Ckv + cs.kv_pad;
  const std::size_t nout = std::size_t(B) * Sq * C, nstat = std::size_t(B) * H * Sq;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  auto strided = [&](std::size_t rows, int stride, int cols, float fill) {  // bf16 values in columns [0, cols)
    FVec buf(rows * stride, fill);
    for (std::size_t r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) buf[r * stride + c] = u(rng);
    return bf16_values(buf);
  };
  const FVec qbuf = strided(std::size_t(B) * Sq, qs, cs.shared ? W : C, kNaN);
  const FVec kvbuf = cs.shared ? FVec() : strided(std::size_t(B) * Sk, kvs, 2 * Ckv, kNaN);
  const FVec kv2 = strided(std::size_t(B) * Sk2, kvs2, 2 * Ckv, kNaN);
  const BVec qbuf_b = to_bf16(qbuf), kvbuf_b = to_bf16(kvbuf);  // NaN stays NaN
  const float* q = qbuf.data();
  const float* k = cs.shared ? q + C : kvbuf.data();
  const float* v = k + Ckv;
  const uint16_t* qb = qbuf_b.data();
  const uint16_t* kb = cs.shared ? qb + C : kvbuf_b.data();
  const uint16_t* vb = kb + Ckv;

  std::vector<TO> out(nout, poison<TO>());
  FVec lse(nstat, kNaN), ref_out(nout, kNaN), ref_lse(nstat, kNaN);
  const dim3 rows_grid((Sq + k::kAttRows - 1) / k::kAttRows, B * H);
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, false),
         k::attention_block_forward_kernel<TO, uint16_t>, out.data(), lse.data(), qb, kb, vb, qs, kvs,
         cs.pos_q.data(), cs.pos_k.data(), Sq, Sk, C, H, KvH);
  cpu.attention_block_forward(ref_out.data(), ref_lse.data(), q, k, v, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), B,
                              Sq, Sk, C, H, KvH);
  expect_typed_close(out, ref_out, "block forward out");
  expect_close_lse(lse, ref_lse, "block forward lse (fp32)");

  // block 2 on the CPU, as bf16 values; merged into block 1's result held in TO (and its fp32 values on the CPU)
  FVec out2(nout, kNaN), lse2(nstat, kNaN);
  cpu.attention_block_forward(out2.data(), lse2.data(), q, kv2.data(), kv2.data() + Ckv, qs, kvs2, cs.pos_q.data(),
                              cs.pos_k2.data(), B, Sq, Sk2, C, H, KvH);
  FVec running = to_f32(as_type<TO>(ref_out));
  auto is_neg_inf = [](float x) { return std::isinf(x) && x < 0; };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Sq; ++i) {  // a side at −inf contributes nothing: NaN there
        const std::size_t s = (std::size_t(b) * H + h) * Sq + i, o = (std::size_t(b) * Sq + i) * C + h * d;
        if (is_neg_inf(ref_lse[s]) && !is_neg_inf(lse2[s])) std::fill_n(running.begin() + o, d, kNaN);
        if (is_neg_inf(lse2[s])) std::fill_n(out2.begin() + o, d, kNaN);
      }
  const FVec out2_values = bf16_values(out2);
  const BVec out2_b = to_bf16(out2);
  std::vector<TO> merged = as_type<TO>(running);
  FVec merged_lse = ref_lse, ref_merged = running, ref_merged_lse = ref_lse;
  launch(dim3(blocks_for(std::size_t(B) * Sq * H * 32)), dim3(kThreads), 0, k::attention_merge_kernel<TO, uint16_t>,
         merged.data(), merged_lse.data(), out2_b.data(), lse2.data(), B, Sq, C, H);
  cpu.attention_merge(ref_merged.data(), ref_merged_lse.data(), out2_values.data(), lse2.data(), B, Sq, C, H);
  expect_typed_close(merged, ref_merged, "merge out");
  expect_close_lse(merged_lse, ref_merged_lse, "merge lse (fp32)");

  // delta of bf16 dout and the merged out (in TO), fp32
  const FVec dout = strided(std::size_t(B) * Sq, C, C, 0.0f);
  const BVec dout_b = to_bf16(dout);
  const FVec merged_values = to_f32(merged);
  FVec delta(nstat, kNaN), ref_delta(nstat, kNaN);
  launch(dim3(blocks_for(nstat * 32)), dim3(kThreads), 0, k::attention_backward_dot_kernel<uint16_t, TO>, delta.data(),
         dout_b.data(), merged.data(), B, Sq, C, H);
  cpu.attention_block_delta(ref_delta.data(), dout.data(), merged_values.data(), B, Sq, C, H);
  EXPECT_CLOSE(delta, ref_delta, "delta (fp32)");

  // backward of block 1 from the CPU's lse and delta, accumulating into dq and its dk, dv (in TO) from
  // random starting values; the gradients' padding keeps its values
  const FVec dq0 = strided(std::size_t(B) * Sq, qs, cs.shared ? W : C, 7.0f);
  const FVec dkv0 = cs.shared ? FVec() : strided(std::size_t(B) * Sk, kvs, 2 * Ckv, 7.0f);
  std::vector<TO> dqbuf = as_type<TO>(dq0), dkvbuf = as_type<TO>(dkv0);
  FVec ref_dqbuf = dq0, ref_dkvbuf = dkv0;
  TO* dq = dqbuf.data();
  TO* dk = cs.shared ? dq + C : dkvbuf.data();
  float* ref_dq = ref_dqbuf.data();
  float* ref_dk = cs.shared ? ref_dq + C : ref_dkvbuf.data();
  launch(rows_grid, dim3(k::kAttWarps * 32), k::attention_row_smem(d, true),
         k::attention_block_backward_dq_kernel<TO, uint16_t>, dq, qs, dout_b.data(), ref_lse.data(), ref_delta.data(),
         qb, kb, vb, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), Sq, Sk, C, H, KvH);
  launch(dim3((Sk + k::kDkvKeys - 1) / k::kDkvKeys, B * KvH), dim3(k::kDkvWarps * 32), k::attention_dkv_smem(d),
         block_dkv_kernel<TO, uint16_t>(d), dk, dk + Ckv, kvs, dout_b.data(), ref_lse.data(),
         ref_delta.data(), qb, kb, vb, qs, kvs, cs.pos_q.data(), cs.pos_k.data(), Sq, Sk, C, H, KvH);
  cpu.attention_block_backward(ref_dq, ref_dk, ref_dk + Ckv, dout.data(), ref_lse.data(), ref_delta.data(), q, k, v,
                               qs, kvs, cs.pos_q.data(), cs.pos_k.data(), B, Sq, Sk, C, H, KvH);
  expect_typed_close(dqbuf, ref_dqbuf, "block backward dq (and the own block's dk, dv)");
  if (!cs.shared) expect_typed_close(dkvbuf, ref_dkvbuf, "block backward dk, dv");
  auto padding_kept = [&](const std::vector<TO>& buf, const FVec& start, int stride, int cols) {
    const std::vector<TO> initial = as_type<TO>(start);
    for (std::size_t i = 0; i < buf.size(); ++i)
      if (static_cast<int>(i % stride) >= cols && std::memcmp(&buf[i], &initial[i], sizeof(TO)) != 0) return false;
    return true;
  };
  EXPECT_TRUE(padding_kept(dqbuf, dq0, qs, cs.shared ? W : C)) << "dq padding written";
  if (!cs.shared) {
    EXPECT_TRUE(padding_kept(dkvbuf, dkv0, kvs, 2 * Ckv)) << "dk, dv padding written";
  }
}

TEST_F(EmulatedKernels, Bf16ContextParallelAttention) {
  const BlockCase zigzag = {"zigzag, middle block, padded strides", 1, 48, 2, 2, join(span(0, 9), span(30, 39)),
                            span(10, 29), join(span(0, 9), span(30, 39)), false, 3, 5};
  const BlockCase diagonal = {"diagonal in the qkv buffer, a future block", 2, 16, 4, 4, span(0, 4), span(0, 4),
                              {2, 9}, true, 0, 0};
  const BlockCase grouped = {"grouped (4 heads, 2 kv), zigzag, padded", 1, 64, 4, 2, join(span(0, 9), span(30, 39)),
                             span(10, 29), join(span(0, 9), span(30, 39)), false, 3, 5};
  const BlockCase grouped_diagonal = {"grouped (4 heads, 1 kv), diagonal in the qkv buffer", 1, 32, 4, 1, span(0, 4),
                                      span(0, 4), {2, 9}, true, 0, 0};
  for (const BlockCase* cs : {&zigzag, &diagonal, &grouped, &grouped_diagonal}) {
    check_block_attention_bf16<uint16_t>(*cs, rng_, *cpu_);
    check_block_attention_bf16<float>(*cs, rng_, *cpu_);
  }
}

// gelu, add, accumulate, convert (also the 2-D staging copies), scale: bf16 outputs within one ulp of the
// fp32 result; sum_squares of bf16 and AdamW with bf16 gradients (fp32 results) to kTol.
TEST_F(EmulatedKernels, Bf16ElementwiseAndOptimizer) {
  const std::size_t n = 1000;
  const FVec x = random_bf16(rng_, n, -5.0f, 5.0f), y = random_bf16(rng_, n), g = random_bf16(rng_, n, -0.1f, 0.1f);
  const FVec yf = random(n);  // an fp32 tensor (values of full precision)
  const BVec xb = to_bf16(x), yb = to_bf16(y), gb = to_bf16(g);
  auto blocks = dim3(blocks_for(n));

  // gelu against the CPU on [−3, 3]: below, 1 + tanh cancels and the CPU's tanh_approx (absolute error
  // ~1e-7) leaves its fp32 result further than a bf16 ulp from the exact one; over [−5, 5] the bf16 kernel
  // is its own fp32 instantiation rounded, bit for bit.
  const FVec xg = random_bf16(rng_, n, -3.0f, 3.0f);
  const BVec xgb = to_bf16(xg);
  BVec gelu(n, kBf16NaN), dgelu = yb;  // dgelu: dinp aliases dout
  FVec ref_gelu(n), ref_dgelu(n);
  launch(blocks, dim3(kThreads), 0, k::gelu_forward_kernel<uint16_t>, gelu.data(), xgb.data(), n);
  cpu_->gelu_forward(ref_gelu.data(), xg.data(), n);
  expect_within_ulp(gelu, ref_gelu, "gelu forward");
  launch(blocks, dim3(kThreads), 0, k::gelu_backward_kernel<uint16_t>, dgelu.data(), xgb.data(), dgelu.data(), n);
  cpu_->gelu_backward(ref_dgelu.data(), xg.data(), y.data(), n);
  expect_within_ulp(dgelu, ref_dgelu, "gelu backward (in place)");
  BVec gelu_wide(n, kBf16NaN), dgelu_wide(n, kBf16NaN);
  FVec gelu_f(n, kNaN), dgelu_f(n, kNaN);
  launch(blocks, dim3(kThreads), 0, k::gelu_forward_kernel<uint16_t>, gelu_wide.data(), xb.data(), n);
  launch(blocks, dim3(kThreads), 0, k::gelu_forward_kernel<float>, gelu_f.data(), x.data(), n);
  launch(blocks, dim3(kThreads), 0, k::gelu_backward_kernel<uint16_t>, dgelu_wide.data(), xb.data(), yb.data(), n);
  launch(blocks, dim3(kThreads), 0, k::gelu_backward_kernel<float>, dgelu_f.data(), x.data(), y.data(), n);
  EXPECT_EQ(gelu_wide, to_bf16(gelu_f)) << "gelu forward on [−5, 5]: the fp32 kernel's result rounded";
  EXPECT_EQ(dgelu_wide, to_bf16(dgelu_f)) << "gelu backward on [−5, 5]: the fp32 kernel's result rounded";

  // add: any dtype per argument
  FVec ref_sum(n), ref_sum_f(n);
  cpu_->add(ref_sum.data(), x.data(), y.data(), n);
  cpu_->add(ref_sum_f.data(), x.data(), yf.data(), n);
  BVec sum_b(n, kBf16NaN), sum_bf(n, kBf16NaN);
  FVec sum_f(n, kNaN);
  launch(blocks, dim3(kThreads), 0, k::add_kernel<uint16_t, uint16_t, uint16_t>, sum_b.data(), xb.data(), yb.data(), n);
  launch(blocks, dim3(kThreads), 0, k::add_kernel<float, uint16_t, float>, sum_f.data(), xb.data(), yf.data(), n);
  launch(blocks, dim3(kThreads), 0, k::add_kernel<uint16_t, float, float>, sum_bf.data(), x.data(), yf.data(), n);
  expect_within_ulp(sum_b, ref_sum, "add bf16 + bf16 → bf16");
  EXPECT_CLOSE(sum_f, ref_sum_f, "add bf16 + fp32 → fp32");
  expect_within_ulp(sum_bf, ref_sum_f, "add fp32 + fp32 → bf16");
  BVec alias = xb;  // out aliasing a
  launch(blocks, dim3(kThreads), 0, k::add_kernel<uint16_t, uint16_t, uint16_t>, alias.data(), alias.data(), yb.data(),
         n);
  expect_within_ulp(alias, ref_sum, "add in place");

  // accumulate: bf16 += fp32, fp32 += bf16, bf16 += bf16
  FVec ref_acc_f = y, ref_acc_b = yf;
  cpu_->accumulate(ref_acc_f.data(), yf.data(), n);  // y + yf
  cpu_->accumulate(ref_acc_b.data(), x.data(), n);   // yf + x
  BVec acc_bf = yb;
  FVec acc_fb = yf;
  launch(blocks, dim3(kThreads), 0, k::accumulate_kernel<uint16_t, float>, acc_bf.data(), yf.data(), n);
  launch(blocks, dim3(kThreads), 0, k::accumulate_kernel<float, uint16_t>, acc_fb.data(), xb.data(), n);
  expect_within_ulp(acc_bf, ref_acc_f, "accumulate bf16 += fp32");
  EXPECT_CLOSE(acc_fb, ref_acc_b, "accumulate fp32 += bf16");
  BVec acc_bb = yb;
  launch(blocks, dim3(kThreads), 0, k::accumulate_kernel<uint16_t, uint16_t>, acc_bb.data(), xb.data(), n);
  expect_within_ulp(acc_bb, ref_sum, "accumulate bf16 += bf16");

  // convert: fp32 → bf16 rounds to nearest even (exactly the RNE bits); bf16 → fp32 is exact
  BVec conv_b(n, kBf16NaN);
  FVec conv_f(n, kNaN);
  launch(blocks, dim3(kThreads), 0, k::convert_kernel<uint16_t, float>, conv_b.data(), yf.data(), n);
  launch(blocks, dim3(kThreads), 0, k::convert_kernel<float, uint16_t>, conv_f.data(), xb.data(), n);
  EXPECT_EQ(conv_b, to_bf16(yf)) << "convert fp32 → bf16";
  EXPECT_EQ(conv_f, x) << "convert bf16 → fp32";
  // the 2-D form (the backend's staging of strided tensors): 7 rows of 5 from rows 9 apart, packed and back
  const std::size_t rows = 7, cols = 5, stride = 9;
  BVec strided_b = to_bf16(random_bf16(rng_, rows * stride)), back(rows * stride, 0x1234);
  FVec packed(rows * cols, kNaN);
  launch(dim3(blocks_for(rows * cols)), dim3(kThreads), 0, k::convert_2d_kernel<float, uint16_t>, packed.data(), cols,
         strided_b.data(), stride, rows, cols);
  launch(dim3(blocks_for(rows * cols)), dim3(kThreads), 0, k::convert_2d_kernel<uint16_t, float>, back.data(), stride,
         packed.data(), cols, rows, cols);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < stride; ++c) {
      if (c < cols) {
        EXPECT_EQ(packed[r * cols + c], k::bf16_bits_to_float(strided_b[r * stride + c])) << r << ", " << c;
        EXPECT_EQ(back[r * stride + c], strided_b[r * stride + c]) << r << ", " << c;
      } else {
        EXPECT_EQ(back[r * stride + c], 0x1234) << "written outside the columns at " << r << ", " << c;
      }
    }

  // scale
  BVec scaled = yb;
  FVec ref_scaled = y;
  launch(blocks, dim3(kThreads), 0, k::scale_kernel<uint16_t>, scaled.data(), -0.37f, n);
  cpu_->scale(ref_scaled.data(), -0.37f, n);
  expect_within_ulp(scaled, ref_scaled, "scale");

  // Σ x² of bf16 values, in double: three chunks, the last one short
  const std::size_t ns = 2 * k::kSumChunk + 77;
  const FVec xs = random_bf16(rng_, ns, -4.0f, 4.0f);
  const BVec xsb = to_bf16(xs);
  const std::size_t chunks = (ns + k::kSumChunk - 1) / k::kSumChunk;
  std::vector<double> partial(chunks + 1, std::nan(""));
  launch(dim3(static_cast<unsigned>(chunks)), dim3(kThreads), 0, k::sum_squares_partial_kernel<uint16_t>,
         partial.data(), xsb.data(), ns);
  launch(dim3(1), dim3(1024), 0, k::sum_doubles_kernel, partial.data() + chunks, partial.data(), chunks);
  EXPECT_NEAR(partial[chunks], cpu_->sum_squares(xs.data(), ns), 1e-12 * partial[chunks]) << "sum_squares of bf16";

  // AdamW on fp32 parameters and moments with bf16 gradients
  FVec p = random(n), mo = random(n, -0.01f, 0.01f), v = random(n, 0.0f, 1e-4f);
  FVec rp = p, rm = mo, rv = v;
  const float lr = 3e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, clip = 0.5f;
  for (int t = 1; t <= 3; ++t) {
    const float bias1 = 1.0f - std::pow(b1, static_cast<float>(t)), bias2 = 1.0f - std::pow(b2, static_cast<float>(t));
    launch(blocks, dim3(kThreads), 0, k::adamw_kernel<uint16_t>, p.data(), gb.data(), mo.data(), v.data(), n, b1, b2,
           eps, lr / bias1, std::sqrt(bias2), 1.0f - lr * wd, clip);
    cpu_->adamw_update(rp.data(), g.data(), rm.data(), rv.data(), n, lr, b1, b2, eps, wd, t, clip);
  }
  EXPECT_CLOSE(p, rp, "adamw params (bf16 gradients)");
  EXPECT_CLOSE(mo, rm, "adamw m (bf16 gradients)");
  EXPECT_CLOSE(v, rv, "adamw v (bf16 gradients)");
}

// Embedding forward in bf16; backward from bf16 dout into dtok and dpos of each dtype: an fp32 dtok by the
// partition kernel, a bf16 one by the token chains (each token's rows summed in fp32, rounded once).
TEST_F(EmulatedKernels, Bf16Embedding) {
  const int B = 2, S = 13, C = 40, V = 67, N = B * S;
  std::vector<int32_t> tokens(N);
  std::uniform_int_distribution<int32_t> t(-3, V - 1);
  for (int32_t& x : tokens) x = t(rng_);
  tokens[0] = tokens[1] = tokens[5] = tokens[N - 1] = 7;  // repeated, the last row among them
  tokens[2] = -1;
  tokens[3] = tokens[4] = 11;  // adjacent repeats
  const FVec table = random_bf16(rng_, std::size_t(V) * C), pos = random_bf16(rng_, std::size_t(S) * C);
  const BVec tableb = to_bf16(table), posb = to_bf16(pos);
  BVec out(std::size_t(N) * C, kBf16NaN), out_nopos(out.size(), kBf16NaN);
  FVec ref_out(out.size()), ref_nopos(out.size());
  launch(dim3(blocks_for(out.size())), dim3(kThreads), 0, k::embedding_forward_kernel<uint16_t>, out.data(),
         tokens.data(), tableb.data(), posb.data(), N, S, C);
  launch(dim3(blocks_for(out.size())), dim3(kThreads), 0, k::embedding_forward_kernel<uint16_t>, out_nopos.data(),
         tokens.data(), tableb.data(), static_cast<const uint16_t*>(nullptr), N, S, C);
  cpu_->embedding_forward(ref_out.data(), tokens.data(), table.data(), pos.data(), B, S, C);
  cpu_->embedding_forward(ref_nopos.data(), tokens.data(), table.data(), nullptr, B, S, C);
  expect_within_ulp(out, ref_out, "embedding forward");
  expect_within_ulp(out_nopos, ref_nopos, "embedding forward without positions");

  const FVec dout = random_bf16(rng_, out.size()), dtok0 = random_bf16(rng_, table.size());
  const FVec dpos0 = random_bf16(rng_, pos.size());
  const BVec doutb = to_bf16(dout);
  FVec ref_dtok = dtok0, ref_dpos = dpos0;
  cpu_->embedding_backward(ref_dtok.data(), ref_dpos.data(), dout.data(), tokens.data(), B, S, C);
  // the rows sorted by token, then one thread per (first row of a token's run, column), into either dtype
  const SortedRows sorted = sort_rows(tokens);
  BVec dtok_b = to_bf16(dtok0);
  launch(dim3(blocks_for(std::size_t(N) * C)), dim3(kThreads), 0,
         k::embedding_backward_sorted_kernel<uint16_t, uint16_t>, dtok_b.data(), doutb.data(), sorted.keys.data(),
         sorted.rows.data(), N, C);
  expect_within_ulp(dtok_b, ref_dtok, "embedding backward dtok (bf16)");
  FVec dtok_f = dtok0;
  launch(dim3(blocks_for(std::size_t(N) * C)), dim3(kThreads), 0,
         k::embedding_backward_sorted_kernel<float, uint16_t>, dtok_f.data(), doutb.data(), sorted.keys.data(),
         sorted.rows.data(), N, C);
  EXPECT_CLOSE(dtok_f, ref_dtok, "embedding backward dtok (fp32 of bf16 dout)");
  BVec dpos_b = to_bf16(dpos0);
  FVec dpos_f = dpos0;
  launch(dim3(blocks_for(pos.size())), dim3(kThreads), 0, k::embedding_backward_pos_kernel<uint16_t, uint16_t>,
         dpos_b.data(), doutb.data(), B, S, C);
  launch(dim3(blocks_for(pos.size())), dim3(kThreads), 0, k::embedding_backward_pos_kernel<float, uint16_t>,
         dpos_f.data(), doutb.data(), B, S, C);
  expect_within_ulp(dpos_b, ref_dpos, "embedding backward dpos (bf16)");
  EXPECT_CLOSE(dpos_f, ref_dpos, "embedding backward dpos (fp32 of bf16 dout)");
}

// Cross-entropy on bf16 logits, fused and in the three vocabulary-parallel steps: dlogits in bf16, the
// statistics and the loss fp32.
TEST_F(EmulatedKernels, Bf16CrossEntropy) {
  const int N = 9, V = 300;
  const float scale = 0.03f;
  std::vector<int32_t> targets(N);
  std::uniform_int_distribution<int32_t> t(0, V - 1);
  for (int32_t& x : targets) x = t(rng_);
  FVec z = random_bf16(rng_, std::size_t(N) * V, -8.0f, 8.0f);
  z[3] = 120.0f;  // a dominant logit

  BVec logits = to_bf16(z);
  FVec ref_logits = z;
  std::vector<double> row_loss(N);
  double loss = 0.5, ref_loss = 0.5;
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_kernel<uint16_t>, logits.data(), row_loss.data(),
         targets.data(), V, V, scale);
  launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss, row_loss.data(), N, scale);
  cpu_->cross_entropy_forward_backward(ref_logits.data(), &ref_loss, targets.data(), N, V, V, scale);
  expect_typed_close(logits, ref_logits, "cross-entropy dlogits");
  EXPECT_NEAR(loss, ref_loss, kTol * std::abs(ref_loss)) << "cross-entropy loss (fp32)";

  targets[0] = targets[4] = -1;  // in another rank's block
  const BVec zb = to_bf16(z);
  BVec logits2 = zb;
  FVec ref_logits2 = z, row_max(N, kNaN), sums(2 * N, kNaN), ref_max(N), ref_sums(2 * N);
  double loss2 = 0.0, ref_loss2 = 0.0;
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_row_max_kernel<uint16_t>, row_max.data(), zb.data(), V, V);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_partials_kernel<uint16_t>, sums.data(), zb.data(),
         targets.data(), row_max.data(), N, V, V);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_finish_kernel<uint16_t>, logits2.data(), row_loss.data(),
         targets.data(), row_max.data(), sums.data(), N, V, V, scale);
  launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss2, row_loss.data(), N, scale);
  cpu_->cross_entropy_row_max(ref_max.data(), z.data(), N, V, V);
  cpu_->cross_entropy_partials(ref_sums.data(), z.data(), targets.data(), ref_max.data(), N, V, V);
  cpu_->cross_entropy_finish(ref_logits2.data(), &ref_loss2, targets.data(), ref_max.data(), ref_sums.data(), N, V, V,
                             scale);
  EXPECT_CLOSE(row_max, ref_max, "cross-entropy row max (fp32)");
  EXPECT_CLOSE(sums, ref_sums, "cross-entropy partial sums (fp32)");
  expect_typed_close(logits2, ref_logits2, "cross-entropy finish dlogits");
  EXPECT_NEAR(loss2, ref_loss2, kTol * std::abs(ref_loss2)) << "cross-entropy finish loss (fp32)";
}

// The cross-entropy kernels read and write a row in 16-byte packs where it starts at a 16-byte boundary
// and Vp holds whole packs (the padded vocabulary), element by element otherwise: both ways, in fp32 and
// bf16, fused and in the vocabulary-parallel steps, against the CPU backend, the padding's gradient 0.
template <typename T>
void check_cross_entropy_row_access(std::mt19937& rng, Backend& cpu, bool packed) {
  const int N = 4, V = 203, Vp = 256;  // a pack holds both the last columns of the vocabulary and padding
  const float scale = 0.1f;
  std::vector<int32_t> targets(N);
  std::uniform_int_distribution<int32_t> t(0, V - 1);
  for (int32_t& x : targets) x = t(rng);
  FVec z = random_bf16(rng, std::size_t(N) * Vp, -6.0f, 6.0f);
  for (int n = 0; n < N; ++n) std::fill_n(z.begin() + std::size_t(n) * Vp + V, Vp - V, 500.0f);  // never read
  // The logits at a 16-byte boundary, or one element past it.
  const std::size_t shift = packed ? 0 : 1;
  const auto placed = [&](std::vector<T>& storage) {
    storage.assign(z.size() + 16, poison<T>());
    auto* base = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 15) / 16 * 16);
    const std::vector<T> values = as_type<T>(z);
    std::copy(values.begin(), values.end(), base + shift);
    return base + shift;
  };
  const auto read = [&](const T* at) { return to_f32(std::vector<T>(at, at + z.size())); };
  const std::string what = std::string(std::is_same_v<T, float> ? "fp32" : "bf16") + (packed ? " packed" : " element-wise");
  std::vector<T> storage;
  T* logits = placed(storage);
  ASSERT_EQ(k::packs_row(logits, Vp), packed) << what;
  std::vector<double> row_loss(N);
  double loss = 0.0, ref_loss = 0.0;
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_kernel<T>, logits, row_loss.data(), targets.data(), V, Vp, scale);
  launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss, row_loss.data(), N, scale);
  FVec ref_logits = z;
  cpu.cross_entropy_forward_backward(ref_logits.data(), &ref_loss, targets.data(), N, V, Vp, scale);
  const FVec dlogits = read(logits);
  expect_typed_close(std::vector<T>(logits, logits + z.size()), ref_logits, what + " fused dlogits");
  EXPECT_NEAR(loss, ref_loss, kTol * std::abs(ref_loss)) << what << " fused loss";
  for (int n = 0; n < N; ++n) {
    for (int i = V; i < Vp; ++i) ASSERT_EQ(dlogits[std::size_t(n) * Vp + i], 0.0f) << what << " padding, row " << n;
  }

  targets[1] = -1;  // in another rank's block
  logits = placed(storage);
  FVec row_max(N, kNaN), sums(2 * N, kNaN), ref_max(N), ref_sums(2 * N), ref_logits2 = z;
  double loss2 = 0.0, ref_loss2 = 0.0;
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_row_max_kernel<T>, row_max.data(), logits, V, Vp);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_partials_kernel<T>, sums.data(), logits, targets.data(),
         row_max.data(), N, V, Vp);
  launch(dim3(N), dim3(kThreads), 0, k::cross_entropy_finish_kernel<T>, logits, row_loss.data(), targets.data(),
         row_max.data(), sums.data(), N, V, Vp, scale);
  launch(dim3(1), dim3(1024), 0, k::sum_rows_kernel, &loss2, row_loss.data(), N, scale);
  cpu.cross_entropy_row_max(ref_max.data(), z.data(), N, V, Vp);
  cpu.cross_entropy_partials(ref_sums.data(), z.data(), targets.data(), ref_max.data(), N, V, Vp);
  cpu.cross_entropy_finish(ref_logits2.data(), &ref_loss2, targets.data(), ref_max.data(), ref_sums.data(), N, V, Vp,
                           scale);
  EXPECT_CLOSE(row_max, ref_max, what + " row max");
  EXPECT_CLOSE(sums, ref_sums, what + " partial sums");
  expect_typed_close(std::vector<T>(logits, logits + z.size()), ref_logits2, what + " finish dlogits");
  EXPECT_NEAR(loss2, ref_loss2, kTol * std::abs(ref_loss2)) << what << " finish loss";
  // Nothing written outside the logits.
  const std::size_t first = static_cast<std::size_t>(logits - storage.data());
  for (std::size_t i = 0; i < storage.size(); ++i) {
    const T p = poison<T>();
    if (i < first || i >= first + z.size()) {
      ASSERT_EQ(std::memcmp(&storage[i], &p, sizeof(T)), 0) << what << ": written outside the logits, at " << i;
    }
  }
}

TEST_F(EmulatedKernels, CrossEntropyRowsInPacksAndElementWise) {
  for (const bool packed : {true, false}) {
    check_cross_entropy_row_access<float>(rng_, *cpu_, packed);
    check_cross_entropy_row_access<uint16_t>(rng_, *cpu_, packed);
  }
}

// The mixture-of-experts kernels on bf16 logits, dlogits and token buffers (gates, probabilities and dgate
// fp32), one shape with drops: the routing exact, the copies bit for bit.
TEST_F(EmulatedKernels, Bf16MixtureOfExperts) {
  const int N = 37, E = 5, k = 2, h = 7, capacity = 15, C = capacity + 1;
  const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E, nX = std::size_t(N) * h,
                    nB = std::size_t(E) * C * h;
  FVec logits = random_bf16(rng_, nP, -2.0f, 2.0f);
  for (int n = 0; n < N; ++n) logits[std::size_t(n) * E] += n % 3 != 2 ? 1.5f : 0.0f;
  for (int e = 0; e < E; ++e) logits[e] = 0.5f;  // a row of ties
  logits = bf16_values(logits);
  const BVec logits_b = to_bf16(logits);

  std::vector<int32_t> expert(nA, -99), ref_expert(nA);
  FVec gate(nA, kNaN), probs(nP, kNaN), ref_gate(nA), ref_probs(nP);
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_router_forward_kernel<uint16_t>, expert.data(), gate.data(),
         probs.data(), logits_b.data(), N, E, k);
  cpu_->moe_router_forward(ref_expert.data(), ref_gate.data(), ref_probs.data(), logits.data(), N, E, k);
  EXPECT_EQ(expert, ref_expert) << "router expert";
  EXPECT_CLOSE(gate, ref_gate, "router gate (fp32)");
  EXPECT_CLOSE(probs, ref_probs, "router probs (fp32)");

  const FVec dgate = random(nA);
  BVec dlogits(nP, kBf16NaN);
  FVec ref_dlogits(nP);
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_router_backward_kernel<uint16_t>, dlogits.data(), dgate.data(),
         ref_gate.data(), ref_expert.data(), N, E, k);
  cpu_->moe_router_backward(ref_dlogits.data(), dgate.data(), ref_gate.data(), ref_expert.data(), N, E, k);
  expect_typed_close(dlogits, ref_dlogits, "router dlogits");

  std::vector<int32_t> slot(nA), counts(2 * std::size_t(E));
  cpu_->moe_assign(slot.data(), counts.data(), ref_expert.data(), N, E, k, capacity);
  // the auxiliary loss's gradient added into bf16 dlogits (added in fp32, rounded once)
  const FVec pre = random_bf16(rng_, nP);
  BVec aux_dlogits = to_bf16(pre);
  FVec ref_aux_dlogits = pre;
  double ref_aux = 0.0;
  launch(dim3(blocks_for(N)), dim3(kThreads), 0, k::moe_aux_loss_grad_kernel<uint16_t>, aux_dlogits.data(),
         ref_probs.data(), counts.data(), N, E, k, 0.37f, 0.25f * N);
  cpu_->moe_aux_loss(ref_aux_dlogits.data(), &ref_aux, ref_probs.data(), counts.data(), N, E, k, 0.37f, 0.25f * N);
  expect_typed_close(aux_dlogits, ref_aux_dlogits, "aux dlogits");

  // dispatch (a copy: bit for bit) and its backward
  const FVec inp = random_bf16(rng_, nX);
  const BVec inp_b = to_bf16(inp);
  BVec buf(nB, 0);  // zeroed: cudaMemsetAsync
  FVec ref_buf(nB);
  launch(dim3(blocks_for(nA * h)), dim3(kThreads), 0, k::moe_dispatch_kernel<uint16_t>, buf.data(), inp_b.data(),
         ref_expert.data(), slot.data(), N, k, C, h);
  cpu_->moe_dispatch(ref_buf.data(), inp.data(), ref_expert.data(), slot.data(), N, E, k, C, h);
  EXPECT_EQ(buf, to_bf16(ref_buf)) << "dispatch buf";
  const FVec dbuf = random_bf16(rng_, nB);
  const BVec dbuf_b = to_bf16(dbuf);
  BVec dinp(nX, kBf16NaN);
  FVec ref_dinp(nX);
  launch(dim3(blocks_for(nX)), dim3(kThreads), 0, k::moe_dispatch_backward_kernel<uint16_t>, dinp.data(),
         dbuf_b.data(), ref_expert.data(), slot.data(), N, k, C, h);
  cpu_->moe_dispatch_backward(ref_dinp.data(), dbuf.data(), ref_expert.data(), slot.data(), N, E, k, C, h);
  expect_within_ulp(dinp, ref_dinp, "dispatch dinp");

  // combine and its backward
  const FVec y = random_bf16(rng_, nB), dout = random_bf16(rng_, nX);
  const BVec y_b = to_bf16(y), dout_b = to_bf16(dout);
  BVec out(nX, kBf16NaN);
  FVec ref_out(nX);
  launch(dim3(blocks_for(nX)), dim3(kThreads), 0, k::moe_combine_kernel<uint16_t>, out.data(), y_b.data(),
         ref_gate.data(), ref_expert.data(), slot.data(), N, k, C, h);
  cpu_->moe_combine(ref_out.data(), y.data(), ref_gate.data(), ref_expert.data(), slot.data(), N, E, k, C, h);
  expect_within_ulp(out, ref_out, "combine out");
  BVec cdbuf(nB, 0);  // zeroed: cudaMemsetAsync
  FVec dgate_out(nA, kNaN), ref_cdbuf(nB), ref_dgate(nA);
  launch(dim3(blocks_for(nA * h)), dim3(kThreads), 0, k::moe_combine_backward_dbuf_kernel<uint16_t>, cdbuf.data(),
         dout_b.data(), ref_gate.data(), ref_expert.data(), slot.data(), N, k, C, h);
  launch(dim3(blocks_for(nA * 32)), dim3(kThreads), 0, k::moe_combine_backward_dgate_kernel<uint16_t>,
         dgate_out.data(), dout_b.data(), y_b.data(), ref_expert.data(), slot.data(), N, k, C, h);
  cpu_->moe_combine_backward(ref_cdbuf.data(), ref_dgate.data(), dout.data(), y.data(), ref_gate.data(),
                             ref_expert.data(), slot.data(), N, E, k, C, h);
  expect_within_ulp(cdbuf, ref_cdbuf, "combine dbuf");
  EXPECT_CLOSE(dgate_out, ref_dgate, "combine dgate (fp32)");
}

}  // namespace
}  // namespace pb
