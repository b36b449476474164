// Causal attention through cuDNN's fused scaled-dot-product attention (flash attention on tensor cores,
// forward and backward) by the cuDNN frontend's graph API, as llm.c does: the CUDA backend's
// attention_forward / attention_backward on bf16 tensors with --attention cudnn (docs/cuda.md).
// Built only where CMake finds cuDNN 9 and the frontend's headers (PB_WITH_CUDNN); without them, or
// with --attention native, the project's own kernels run.
//
// Layout: qkv (B, S, W) holds [Q | K | V] with head j in columns j·d..j·d+d−1 of each, Q of `heads` heads
// and K and V of `kv_heads` (grouped-query attention, SPEC 2.5; W = C + 2·kv_heads·d, 3C without grouping):
// Q is a (B, heads, S, d) tensor with strides (S·W, d, W, 1) at offset 0, K and V (B, kv_heads, S, d) at
// offsets C and C + kv_heads·d, and cuDNN's SDPA has query head j read key/value head j / (heads /
// kv_heads); out and dout (B, S, C) are (B, heads, S, d) with strides (S·C, d, C, 1). The forward also writes the softmax statistics,
// lse (B, heads, S) fp32 = log Σ exp(q·kᵀ/√d) over the visible keys (cuDNN's "Stats"), which the backward
// reads; that is the backend's attention_saved_floats. Scale 1/√d, causal (top-left diagonal).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>

namespace pb {

class CudnnAttention {
 public:
  // `workspace(bytes)` returns device memory of at least that size, valid until the next call (the
  // backend's scratch); the work runs on `stream`.
  CudnnAttention(cudaStream_t stream, std::function<void*(std::size_t)> workspace);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // "cuDNN 9.19.0 (frontend 1.32.0)"
  static std::string version();
  // Sets CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT to parabench's cap unless the user has set it; before any
  // other thread runs (setenv is not thread-safe).
  static void prepare_environment();

  // bf16 tensors (their 16 bits), fp32 lse; out overwritten.
  void forward(void* out, float* lse, const void* qkv, int B, int S, int C, int heads, int kv_heads);
  // dqkv (B, S, W) overwritten; a key/value head's gradient sums its query heads'.
  void backward(void* dqkv, const void* dout, const void* out, const void* qkv, const float* lse, int B, int S, int C,
                int heads, int kv_heads);

  // False when the backward runs cuDNN's non-deterministic algorithm (its deterministic one was not
  // supported for some shape; said once on stderr).
  bool deterministic() const { return deterministic_; }

 private:
  struct Plan;  // a built graph and its tensors (cudnn_attention.cpp)
  using Key = std::tuple<int, int, int, int, int>;  // B, S, C, heads, key/value heads
  Plan& plan(bool backward, int B, int S, int C, int heads, int kv_heads);

  cudaStream_t stream_;
  std::function<void*(std::size_t)> workspace_;
  void* handle_ = nullptr;  // cudnnHandle_t
  std::map<Key, std::unique_ptr<Plan>> forward_plans_, backward_plans_;
  bool deterministic_ = true;
};

}  // namespace pb
