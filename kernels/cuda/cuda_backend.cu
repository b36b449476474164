// CUDA implementation of the Backend (see cuda_backend.h).
//
// Conventions: all work is queued on one compute stream, so a freed block can be handed out again at
// once (reuse is ordered by the stream); every launch is checked; every reduction runs in a fixed
// order (two-stage partial sums, no atomics), so a run is bitwise reproducible on the same GPU. Small
// internal buffers (partial sums, a vector of ones) live outside the tracker, as the CPU backend's
// per-thread scratch does; they are counted in /memory/device_peak_bytes. So do the bf16 copies of the
// matrix products' operands (bf16 mode only): library workspace like cuBLAS's own, in no category.
#include "kernels/cuda/cuda_backend.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/errors.h"
#include "kernels/block_cache.h"
#include "kernels/cuda/kernels.cuh"

namespace pb {

static_assert(kernels::kAttMaxHeadDim == kCudaMaxHeadDim, "one head-dimension limit");

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                                   cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

namespace {

using namespace kernels;  // NOLINT: the kernels and their constants

void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call +
                                   " failed: cuBLAS status " + std::to_string(static_cast<int>(status)));
}
#define PB_CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
// After every kernel launch: configuration errors surface here, not at the next synchronisation.
#define PB_LAUNCH_CHECK() ::pb::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

constexpr int kThreads = 256;        // elementwise and row kernels
constexpr int kReduceThreads = 1024;  // single-block final reductions

// Blocks for n threads; at least one, so that an empty tensor is a valid (idle) launch.
unsigned blocks_for(std::size_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<std::size_t>(1, (n + threads - 1) / threads));
}

// ---- the backend ---------------------------------------------------------------------------------
constexpr std::size_t kAllocAlignment = 256;

class CudaBackend final : public Backend {
 public:
  // One device per process: the backend makes `device` current once, and every call assumes it.
  CudaBackend(int device, bool bf16_matmul)
      : device_(device),
        bf16_matmul_(bf16_matmul),
        blocks_(kAllocAlignment, [this](std::size_t bytes) { return device_malloc(bytes); },
                [](void* ptr) { cudaFree(ptr); }) {
    PB_CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp prop{};
    PB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    name_ = prop.name;
    PB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    PB_CUBLAS_CHECK(cublasCreate(&cublas_));
    PB_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    PB_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));  // no TF32 for CUBLAS_COMPUTE_32F
    const int dkv_smem = static_cast<int>(attention_dkv_smem(kCudaMaxHeadDim));
    PB_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_dkv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       dkv_smem));
    PB_CUDA_CHECK(cudaFuncSetAttribute(attention_block_backward_dkv_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, dkv_smem));
    PB_CUDA_CHECK(cudaMallocHost(&host_double_, sizeof(double)));
    sample_device_memory();
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    blocks_.release_live();  // the cached ones go with blocks_
    cudaFree(scratch_.ptr);
    cudaFree(bf16_a_.ptr);
    cudaFree(bf16_b_.ptr);
    cudaFree(ones_);
    cudaFreeHost(host_double_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  std::string device_name() const override { return name_; }
  std::string matmul_precision() const override {
    if (!bf16_matmul_) return "fp32";
    int version = 0;
    cublasGetVersion(cublas_, &version);
    return "bf16 operands, fp32 accumulation: cuBLAS " + std::to_string(version) +
           " (cublasGemmEx, CUDA_R_16BF operands, CUBLAS_COMPUTE_32F)";
  }
  cudaStream_t stream() const { return stream_; }

  // ---- memory: a per-size cache over cudaMalloc (kernels/block_cache.h); reuse of a freed block is
  // ordered by the one compute stream ---------------------------------------------------------------
  void* alloc(std::size_t bytes, MemCategory category) override { return blocks_.alloc(bytes, category); }
  void free(void* ptr) override { blocks_.free(ptr); }
  MemoryTracker& tracker() override { return blocks_.tracker(); }
  int64_t device_memory_peak_bytes() override {
    sample_device_memory();
    return device_peak_;
  }

  void upload(void* dst, const void* src, std::size_t bytes) override {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    PB_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the host buffer may be reused at once
  }
  void download(void* dst, const void* src, std::size_t bytes) override {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void copy(void* dst, const void* src, std::size_t bytes) override {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void zero(void* dst, std::size_t bytes) override { PB_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_)); }
  void synchronize() override {
    PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
    sample_device_memory();
  }

  // ---- matrix products: row-major tensors as cuBLAS's column-major transposes --------------------
  void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C,
                      int OC) override {
    if (bias != nullptr) {
      broadcast_rows_kernel<<<blocks_for(static_cast<std::size_t>(N) * OC), kThreads, 0, stream_>>>(out, bias, N, OC);
      PB_LAUNCH_CHECK();
    }
    // outᵀ (OC, N) = weightᵀ (OC, C) · inpᵀ (C, N)
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, OC, N, C, weight, OC, inp, C, bias != nullptr ? 1.0f : 0.0f, out, OC);
  }

  void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                       const float* weight, int N, int C, int OC) override {
    // dinpᵀ (C, N) = weight (C, OC) · doutᵀ (OC, N)
    if (dinp != nullptr) gemm(CUBLAS_OP_T, CUBLAS_OP_N, C, N, OC, weight, OC, dout, OC, 0.0f, dinp, C);
    // dweightᵀ (OC, C) += doutᵀ (OC, N) · inp (N, C)
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, OC, C, N, dout, OC, inp, C, 1.0f, dweight, OC);
    if (dbias != nullptr) {  // dbias (OC) += doutᵀ · 1
      const float one = 1.0f;
      PB_CUBLAS_CHECK(cublasSgemv(cublas_, CUBLAS_OP_N, OC, N, &one, dout, OC, ones(N), 1, &one, dbias, 1));
    }
  }

  // ---- LayerNorm ---------------------------------------------------------------------------------
  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                         const float* bias, int N, int C) override {
    if (N == 0) return;
    layernorm_forward_kernel<<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
        out, mean, rstd, inp, weight, bias, N, C);
    PB_LAUNCH_CHECK();
  }

  void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const float* weight, const float* mean, const float* rstd, int N, int C) override {
    if (N == 0) return;
    layernorm_backward_input_kernel<<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
        dinp, dout, inp, weight, mean, rstd, N, C);
    PB_LAUNCH_CHECK();
    constexpr int kMaxChunks = 128;
    const int rows_per_chunk = (N + kMaxChunks - 1) / kMaxChunks;
    const int chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
    float* partial = static_cast<float*>(scratch(2 * sizeof(float) * chunks * C));
    layernorm_param_partials_kernel<<<dim3(blocks_for(C), chunks), kThreads, 0, stream_>>>(
        partial, dout, inp, mean, rstd, N, C, rows_per_chunk);
    PB_LAUNCH_CHECK();
    layernorm_param_finish_kernel<<<blocks_for(C), kThreads, 0, stream_>>>(dweight, dbias, partial, chunks, C);
    PB_LAUNCH_CHECK();
  }

  // ---- attention ---------------------------------------------------------------------------------
  std::size_t attention_saved_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S;  // log-sum-exp per query row
  }
  bool attention_keeps_probabilities() const override { return false; }
  std::size_t attention_scratch_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S;  // D = Σ dout·out per query row
  }

  void attention_forward(float* out, float* saved, const float* qkv, int B, int S, int C, int num_heads) override {
    check_attention_shape(B, C, num_heads);
    if (B == 0 || S == 0) return;
    const dim3 grid((S + kAttRows - 1) / kAttRows, B * num_heads);
    attention_forward_kernel<<<grid, kAttWarps * 32, attention_row_smem(C / num_heads, false), stream_>>>(
        out, saved, qkv, S, C, num_heads);
    PB_LAUNCH_CHECK();
  }

  void attention_backward(float* dqkv, float* scratch_d, const float* dout, const float* out, const float* qkv,
                          const float* saved, int B, int S, int C, int num_heads) override {
    check_attention_shape(B, C, num_heads);
    if (B == 0 || S == 0) return;
    const int d = C / num_heads;
    const std::size_t rows = static_cast<std::size_t>(B) * num_heads * S;
    attention_backward_dot_kernel<<<blocks_for(rows * 32), kThreads, 0, stream_>>>(scratch_d, dout, out, B, S, C,
                                                                                     num_heads);
    PB_LAUNCH_CHECK();
    const dim3 rows_grid((S + kAttRows - 1) / kAttRows, B * num_heads);
    attention_backward_dq_kernel<<<rows_grid, kAttWarps * 32, attention_row_smem(d, true), stream_>>>(
        dqkv, dout, qkv, saved, scratch_d, S, C, num_heads);
    PB_LAUNCH_CHECK();
    const dim3 keys_grid((S + kDkvKeys - 1) / kDkvKeys, B * num_heads);
    attention_backward_dkv_kernel<<<keys_grid, kDkvWarps * 32, attention_dkv_smem(d), stream_>>>(
        dqkv, dout, qkv, saved, scratch_d, S, C, num_heads);
    PB_LAUNCH_CHECK();
  }

  // ---- elementwise -------------------------------------------------------------------------------
  void gelu_forward(float* out, const float* inp, std::size_t n) override {
    gelu_forward_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(out, inp, n);
    PB_LAUNCH_CHECK();
  }
  void gelu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
    gelu_backward_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(dinp, inp, dout, n);
    PB_LAUNCH_CHECK();
  }
  void add(float* out, const float* a, const float* b, std::size_t n) override {
    add_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(out, a, b, n);
    PB_LAUNCH_CHECK();
  }
  void accumulate(float* y, const float* x, std::size_t n) override {
    accumulate_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(y, x, n);
    PB_LAUNCH_CHECK();
  }
  void scale(float* y, float alpha, std::size_t n) override {
    scale_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(y, alpha, n);
    PB_LAUNCH_CHECK();
  }

  // ---- embedding ---------------------------------------------------------------------------------
  void embedding_forward(float* out, const int32_t* tokens, const float* tok, const float* pos, int B, int S,
                         int C) override {
    embedding_forward_kernel<<<blocks_for(static_cast<std::size_t>(B) * S * C), kThreads, 0, stream_>>>(
        out, tokens, tok, pos, B * S, S, C);
    PB_LAUNCH_CHECK();
  }
  void embedding_backward(float* dtok, float* dpos, const float* dout, const int32_t* tokens, int B, int S,
                          int C) override {
    embedding_backward_tok_kernel<<<dim3(blocks_for(C), kTokenPartitions), kThreads, 0, stream_>>>(dtok, dout,
                                                                                                  tokens, B * S, C);
    PB_LAUNCH_CHECK();
    if (dpos != nullptr) {
      embedding_backward_pos_kernel<<<blocks_for(static_cast<std::size_t>(S) * C), kThreads, 0, stream_>>>(
          dpos, dout, B, S, C);
      PB_LAUNCH_CHECK();
    }
  }

  // ---- loss --------------------------------------------------------------------------------------
  void cross_entropy_forward_backward(float* logits, double* loss_sum, const int32_t* targets, int N, int V,
                                      float scale) override {
    if (N == 0) return;
    double* row_loss = static_cast<double*>(scratch(sizeof(double) * N));
    cross_entropy_kernel<<<N, kThreads, 0, stream_>>>(logits, row_loss, targets, V, scale);
    PB_LAUNCH_CHECK();
    sum_rows(loss_sum, row_loss, N, scale);
  }
  void cross_entropy_row_max(float* row_max, const float* logits, int N, int V) override {
    if (N == 0) return;
    cross_entropy_row_max_kernel<<<N, kThreads, 0, stream_>>>(row_max, logits, V);
    PB_LAUNCH_CHECK();
  }
  void cross_entropy_partials(float* sums, const float* logits, const int32_t* targets, const float* row_max, int N,
                              int V) override {
    if (N == 0) return;
    cross_entropy_partials_kernel<<<N, kThreads, 0, stream_>>>(sums, logits, targets, row_max, N, V);
    PB_LAUNCH_CHECK();
  }
  void cross_entropy_finish(float* logits, double* loss_sum, const int32_t* targets, const float* row_max,
                            const float* sums, int N, int V, float scale) override {
    if (N == 0) return;
    double* row_loss = static_cast<double*>(scratch(sizeof(double) * N));
    cross_entropy_finish_kernel<<<N, kThreads, 0, stream_>>>(logits, row_loss, targets, row_max, sums, N, V, scale);
    PB_LAUNCH_CHECK();
    sum_rows(loss_sum, row_loss, N, scale);
  }

  // ---- context parallelism: the fused attention's kernels by position, over one block of keys ------
  void attention_block_forward(float* out, float* lse, const float* q, const float* k, const float* v, int q_stride,
                               int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                               int heads) override {
    check_attention_shape(B, C, heads);
    if (B == 0 || Sq == 0) return;
    const dim3 grid((Sq + kAttRows - 1) / kAttRows, B * heads);
    attention_block_forward_kernel<<<grid, kAttWarps * 32, attention_row_smem(C / heads, false), stream_>>>(
        out, lse, q, k, v, q_stride, kv_stride, pos_q, pos_k, Sq, Sk, C, heads);
    PB_LAUNCH_CHECK();
  }
  void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int B, int Sq, int C,
                       int heads) override {
    const std::size_t warps = static_cast<std::size_t>(B) * Sq * heads;
    if (warps == 0) return;
    attention_merge_kernel<<<blocks_for(warps * 32), kThreads, 0, stream_>>>(out, lse, out_b, lse_b, B, Sq, C, heads);
    PB_LAUNCH_CHECK();
  }
  void attention_block_delta(float* delta, const float* dout, const float* out, int B, int Sq, int C,
                             int heads) override {
    const std::size_t rows = static_cast<std::size_t>(B) * heads * Sq;
    if (rows == 0) return;
    attention_backward_dot_kernel<<<blocks_for(rows * 32), kThreads, 0, stream_>>>(delta, dout, out, B, Sq, C, heads);
    PB_LAUNCH_CHECK();
  }
  void attention_block_backward(float* dq, float* dk, float* dv, const float* dout, const float* lse,
                                const float* delta, const float* q, const float* k, const float* v, int q_stride,
                                int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk,
                                int C, int heads) override {
    check_attention_shape(B, C, heads);
    if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing to add
    const int d = C / heads;
    // two kernels, each gradient row with one writer: dq per query row, dk and dv per key row
    const dim3 rows_grid((Sq + kAttRows - 1) / kAttRows, B * heads);
    attention_block_backward_dq_kernel<<<rows_grid, kAttWarps * 32, attention_row_smem(d, true), stream_>>>(
        dq, dout, lse, delta, q, k, v, q_stride, kv_stride, pos_q, pos_k, Sq, Sk, C, heads);
    PB_LAUNCH_CHECK();
    const dim3 keys_grid((Sk + kDkvKeys - 1) / kDkvKeys, B * heads);
    attention_block_backward_dkv_kernel<<<keys_grid, kDkvWarps * 32, attention_dkv_smem(d), stream_>>>(
        dk, dv, dout, lse, delta, q, k, v, q_stride, kv_stride, pos_q, pos_k, Sq, Sk, C, heads);
    PB_LAUNCH_CHECK();
  }
  void copy_2d(float* dst, std::size_t dst_stride, const float* src, std::size_t src_stride, std::size_t rows,
               std::size_t cols) override {
    if (rows == 0 || cols == 0) return;
    const std::size_t width = cols * sizeof(float);
    if (rows == 1) {  // a single row: any strides (cudaMemcpy2D wants pitches of at least the width)
      PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, width, cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    PB_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_stride * sizeof(float), src, src_stride * sizeof(float), width, rows,
                                    cudaMemcpyDeviceToDevice, stream_));
  }

  // ---- mixture of experts -------------------------------------------------------------------------
  void moe_router_forward(int32_t* expert, float* gate, float* probs, const float* logits, int N, int E,
                          int k) override {
    moe_router_forward_kernel<<<blocks_for(N), kThreads, 0, stream_>>>(expert, gate, probs, logits, N, E, k);
    PB_LAUNCH_CHECK();
  }
  void moe_router_backward(float* dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                           int E, int k) override {
    moe_router_backward_kernel<<<blocks_for(N), kThreads, 0, stream_>>>(dlogits, dgate, gate, expert, N, E, k);
    PB_LAUNCH_CHECK();
  }
  void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                  int capacity) override {
    moe_assign_kernel<<<blocks_for(E), kThreads, 0, stream_>>>(slot, counts, expert, N, E, k, capacity);
    PB_LAUNCH_CHECK();
  }
  void moe_aux_loss(float* dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                    float coef, float grad_scale) override {
    if (N == 0) return;  // no tokens: no loss, as on the CPU
    double* prob_sum = static_cast<double*>(scratch(sizeof(double) * E));
    moe_prob_sums_kernel<<<blocks_for(E), kThreads, 0, stream_>>>(prob_sum, probs, N, E);
    PB_LAUNCH_CHECK();
    moe_aux_loss_sum_kernel<<<1, kThreads, 0, stream_>>>(aux_sum, prob_sum, counts, N, E, k, coef);
    PB_LAUNCH_CHECK();
    moe_aux_loss_grad_kernel<<<blocks_for(N), kThreads, 0, stream_>>>(dlogits, probs, counts, N, E, k, coef,
                                                                       grad_scale);
    PB_LAUNCH_CHECK();
  }
  void moe_dispatch(float* buf, const float* inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                    int C, int h) override {
    PB_CUDA_CHECK(cudaMemsetAsync(buf, 0, sizeof(float) * E * static_cast<std::size_t>(C) * h, stream_));
    moe_dispatch_kernel<<<blocks_for(static_cast<std::size_t>(N) * k * h), kThreads, 0, stream_>>>(
        buf, inp, expert, slot, N, k, C, h);
    PB_LAUNCH_CHECK();
  }
  void moe_dispatch_backward(float* dinp, const float* dbuf, const int32_t* expert, const int32_t* slot, int N,
                             int /*E*/, int k, int C, int h) override {
    moe_dispatch_backward_kernel<<<blocks_for(static_cast<std::size_t>(N) * h), kThreads, 0, stream_>>>(
        dinp, dbuf, expert, slot, N, k, C, h);
    PB_LAUNCH_CHECK();
  }
  void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert, const int32_t* slot, int N,
                   int /*E*/, int k, int C, int h) override {
    moe_combine_kernel<<<blocks_for(static_cast<std::size_t>(N) * h), kThreads, 0, stream_>>>(out, buf, gate, expert,
                                                                                                slot, N, k, C, h);
    PB_LAUNCH_CHECK();
  }
  void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf, const float* gate,
                            const int32_t* expert, const int32_t* slot, int N, int E, int k, int C,
                            int h) override {
    PB_CUDA_CHECK(cudaMemsetAsync(dbuf, 0, sizeof(float) * E * static_cast<std::size_t>(C) * h, stream_));
    const std::size_t assignments = static_cast<std::size_t>(N) * k;
    moe_combine_backward_dbuf_kernel<<<blocks_for(assignments * h), kThreads, 0, stream_>>>(dbuf, dout, gate, expert,
                                                                                             slot, N, k, C, h);
    PB_LAUNCH_CHECK();
    moe_combine_backward_dgate_kernel<<<blocks_for(assignments * 32), kThreads, 0, stream_>>>(  // a warp each
        dgate, dout, buf, expert, slot, N, k, C, h);
    PB_LAUNCH_CHECK();
  }

  // ---- optimizer ---------------------------------------------------------------------------------
  double sum_squares(const float* x, std::size_t n) override {
    const std::size_t chunks = std::max<std::size_t>(1, (n + kSumChunk - 1) / kSumChunk);
    double* partial = static_cast<double*>(scratch(sizeof(double) * (chunks + 1)));
    if (n == 0) {
      PB_CUDA_CHECK(cudaMemsetAsync(partial, 0, sizeof(double), stream_));
    } else {
      sum_squares_partial_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream_>>>(partial, x, n);
      PB_LAUNCH_CHECK();
    }
    sum_doubles_kernel<<<1, kReduceThreads, 0, stream_>>>(partial + chunks, partial, chunks);
    PB_LAUNCH_CHECK();
    PB_CUDA_CHECK(cudaMemcpyAsync(host_double_, partial + chunks, sizeof(double), cudaMemcpyDeviceToHost, stream_));
    PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return *host_double_;
  }

  void adamw_update(float* params, const float* grads, float* m, float* v, std::size_t n, float lr, float beta1,
                    float beta2, float eps, float weight_decay, int t, float grad_scale) override {
    const float bias1 = 1.0f - std::pow(beta1, static_cast<float>(t));
    const float bias2 = 1.0f - std::pow(beta2, static_cast<float>(t));
    adamw_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(params, grads, m, v, n, beta1, beta2, eps, lr / bias1,
                                                          std::sqrt(bias2), 1.0f - lr * weight_decay, grad_scale);
    PB_LAUNCH_CHECK();
  }

 private:
  // A device buffer that grows to the largest size asked of it.
  struct DeviceBuffer {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };

  // C (m, n) = op_a(A) (m, k) · op_b(B) (k, n) + β·C, column-major, α = 1, accumulated and written in
  // fp32. The one place that decides the operand types: with bf16_matmul_ both operands are first
  // rounded to bf16 (nearest even) into bf16_a_ and bf16_b_ and cuBLAS gets CUDA_R_16BF operands, so
  // only the bf16 tensor cores can run it (no fp32 path to fall back on); without it, fp32 operands.
  // The compute type is CUBLAS_COMPUTE_32F either way (TF32 off: CUBLAS_DEFAULT_MATH).
  void gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, const float* A, int lda,
            const float* B, int ldb, float beta, float* C, int ldc) {
    const float alpha = 1.0f;
    const void* a = A;
    const void* b = B;
    cudaDataType_t operand_type = CUDA_R_32F;
    if (bf16_matmul_) {
      a = to_bf16(bf16_a_, A, operand_elements(op_a, m, k, lda));
      b = to_bf16(bf16_b_, B, operand_elements(op_b, k, n, ldb));
      operand_type = CUDA_R_16BF;
    }
    PB_CUBLAS_CHECK(cublasGemmEx(cublas_, op_a, op_b, m, n, k, &alpha, a, operand_type, lda, b, operand_type, ldb,
                                 &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // Elements of a column-major operand whose op() is (rows, cols) with leading dimension ld: the span
  // from its first element to its last.
  static std::size_t operand_elements(cublasOperation_t op, int rows, int cols, int ld) {
    const int stored_rows = op == CUBLAS_OP_N ? rows : cols, stored_cols = op == CUBLAS_OP_N ? cols : rows;
    if (stored_rows == 0 || stored_cols == 0) return 0;
    return static_cast<std::size_t>(ld) * (stored_cols - 1) + stored_rows;
  }

  // `n` floats rounded to bf16 into `buf` (grown as needed; the stream orders its reuse by the next
  // product after this one has read it).
  const void* to_bf16(DeviceBuffer& buf, const float* x, std::size_t n) {
    auto* out = static_cast<uint16_t*>(reserve(buf, std::max<std::size_t>(n, 1) * sizeof(uint16_t)));
    if (n > 0) {
      float_to_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(out, x, n);
      PB_LAUNCH_CHECK();
    }
    return out;
  }

  void sum_rows(double* loss_sum, const double* row_loss, int N, float scale) {
    sum_rows_kernel<<<1, kReduceThreads, 0, stream_>>>(loss_sum, row_loss, N, scale);
    PB_LAUNCH_CHECK();
  }

  static void check_attention_shape(int B, int C, int heads) {
    if (C / heads > kCudaMaxHeadDim) {
      throw RunError(kExitConfig, "the CUDA attention takes head dimensions up to " + std::to_string(kCudaMaxHeadDim) +
                                      ", not " + std::to_string(C / heads));
    }
    if (static_cast<int64_t>(B) * heads > 65535) {  // the grid's y dimension
      throw RunError(kExitConfig, "the CUDA attention takes micro-batch × heads up to 65535, not " +
                                      std::to_string(static_cast<int64_t>(B) * heads));
    }
  }

  // cudaMalloc, emptying the cache once when the device is full.
  void* device_malloc(std::size_t bytes) {
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
      blocks_.release_cached();
      status = cudaMalloc(&ptr, bytes);
    }
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw RunError(kExitRuntime, "CUDA out of memory: " + std::to_string(bytes) + " bytes requested with " +
                                       std::to_string(blocks_.tracker().current_total()) + " bytes in use");
    }
    PB_CUDA_CHECK(status);
    sample_device_memory();
    return ptr;
  }

  // At least `bytes` in `buf`: cudaMalloc'ed directly (device_malloc, not the block cache: backend
  // workspace, in no memory category), replaced by a larger one after the stream has drained when it
  // is too small.
  void* reserve(DeviceBuffer& buf, std::size_t bytes) {
    if (bytes > buf.bytes) {
      PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
      PB_CUDA_CHECK(cudaFree(buf.ptr));
      buf = DeviceBuffer{};
      buf.ptr = device_malloc(bytes);  // empties the cache once when the device is full
      buf.bytes = bytes;
    }
    return buf.ptr;
  }

  // Backend-internal buffer, grown on demand; its users run one after another on the stream.
  void* scratch(std::size_t bytes) { return reserve(scratch_, bytes); }

  const float* ones(int n) {
    if (static_cast<std::size_t>(n) > ones_count_) {
      PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
      PB_CUDA_CHECK(cudaFree(ones_));
      ones_ = nullptr;
      ones_count_ = 0;
      PB_CUDA_CHECK(cudaMalloc(&ones_, sizeof(float) * n));
      ones_count_ = n;
      fill_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(ones_, 1.0f, n);
      PB_LAUNCH_CHECK();
      sample_device_memory();
    }
    return ones_;
  }

  // Device memory in use (every process on the GPU, the CUDA context and libraries included).
  void sample_device_memory() {
    std::size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      device_peak_ = std::max(device_peak_, static_cast<int64_t>(total_bytes - free_bytes));
    }
  }

  int device_;
  bool bf16_matmul_;  // the matrix products on bf16 operands (bf16_a_, bf16_b_), else fp32
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  BlockCache blocks_;  // its destructor frees the cached blocks, after the stream is drained
  DeviceBuffer scratch_;
  // The bf16 copies of a product's two operands (bf16_matmul_ only). Library workspace like cuBLAS's:
  // cudaMalloc'ed directly, counted by device_memory_peak_bytes, in no memory category.
  DeviceBuffer bf16_a_, bf16_b_;
  float* ones_ = nullptr;
  std::size_t ones_count_ = 0;
  double* host_double_ = nullptr;
  int64_t device_peak_ = 0;
};

}  // namespace

int cuda_visible_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for a CPU run
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16_matmul) {
  return std::make_unique<CudaBackend>(device, bf16_matmul);
}

cudaStream_t cuda_compute_stream(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) throw std::logic_error("cuda_compute_stream: not a CUDA backend");
  return cuda->stream();
}

}  // namespace pb
