// CUDA implementation of the Backend (see cuda_backend.h).
//
// Conventions: all work is queued on one compute stream, so a freed block can be handed out again at
// once (reuse is ordered by the stream); every launch is checked; every reduction runs in a fixed
// order (two-stage partial sums, no atomics), so a run is bitwise reproducible on the same GPU. Small
// internal buffers (partial sums, a vector of ones) live outside the tracker, as the CPU backend's
// per-thread scratch does; they are counted in /memory/device_peak_bytes.
#include "kernels/cuda/cuda_backend.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "common/errors.h"

namespace pb {

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                                   cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

namespace {

void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call +
                                   " failed: cuBLAS status " + std::to_string(static_cast<int>(status)));
}
#define PB_CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
// After every kernel launch: configuration errors surface here, not at the next synchronisation.
#define PB_LAUNCH_CHECK() ::pb::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;        // elementwise and row kernels
constexpr int kReduceThreads = 1024;  // single-block final reductions
constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

// Blocks for n threads; at least one, so that an empty tensor is a valid (idle) launch.
unsigned blocks_for(std::size_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<std::size_t>(1, (n + threads - 1) / threads));
}

// ---- reductions ----------------------------------------------------------------------------------
template <typename T>
__device__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Sum (or max) over the block, returned to every thread; blockDim.x a multiple of 32. Ends with a
// barrier, so it can be called again in the same kernel.
template <typename T, bool kMax = false>
__device__ T block_reduce(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if constexpr (kMax) {
    v = warp_max(v);
  } else {
    v = warp_sum(v);
  }
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? partial[lane] : (kMax ? T(-INFINITY) : T(0));
    if constexpr (kMax) {
      w = warp_max(w);
    } else {
      w = warp_sum(w);
    }
    if (lane == 0) partial[0] = w;
  }
  __syncthreads();
  const T result = partial[0];
  __syncthreads();
  return result;
}

// ---- elementwise ---------------------------------------------------------------------------------
__global__ void broadcast_rows_kernel(float* out, const float* row, std::size_t rows, int cols) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < rows * cols) out[i] = row[i % cols];
}

__global__ void fill_kernel(float* out, float value, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = value;
}

__global__ void gelu_forward_kernel(float* out, const float* inp, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = inp[i];
  out[i] = 0.5f * x * (1.0f + tanhf(kGeluK * (x + 0.044715f * x * x * x)));
}

__global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = inp[i];
  const float th = tanhf(kGeluK * (x + 0.044715f * x * x * x));
  const float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluK * (1.0f + 3.0f * 0.044715f * x * x);
  dinp[i] = grad * dout[i];
}

__global__ void add_kernel(float* out, const float* a, const float* b, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = a[i] + b[i];
}

__global__ void accumulate_kernel(float* y, const float* x, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void scale_kernel(float* y, float alpha, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] *= alpha;
}

// ---- LayerNorm: one warp per row -----------------------------------------------------------------
__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                                         const float* bias, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const float* x = inp + static_cast<std::size_t>(row) * C;
  float* y = out + static_cast<std::size_t>(row) * C;
  float sum = 0.0f;
  for (int i = lane; i < C; i += 32) sum += x[i];
  const float m = warp_sum(sum) / C;
  float var = 0.0f;  // biased variance
  for (int i = lane; i < C; i += 32) var += (x[i] - m) * (x[i] - m);
  var = warp_sum(var) / C;
  const float s = 1.0f / sqrtf(var + kLayerNormEps);
  for (int i = lane; i < C; i += 32) y[i] = (x[i] - m) * s * weight[i] + bias[i];
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// dinp += rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dout·weight
__global__ void layernorm_backward_input_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                                                const float* mean, const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t off = static_cast<std::size_t>(row) * C;
  const float m = mean[row], s = rstd[row];
  float g_mean = 0.0f, gx_mean = 0.0f;
  for (int i = lane; i < C; i += 32) {
    const float g = dout[off + i] * weight[i];
    g_mean += g;
    gx_mean += g * (inp[off + i] - m) * s;
  }
  g_mean = warp_sum(g_mean) / C;
  gx_mean = warp_sum(gx_mean) / C;
  for (int i = lane; i < C; i += 32) {
    const float xhat = (inp[off + i] - m) * s;
    dinp[off + i] += s * (dout[off + i] * weight[i] - g_mean - xhat * gx_mean);
  }
}

// Column sums over a chunk of rows: partial[chunk][c] = Σ dout·x̂, partial[chunks + chunk][c] = Σ dout.
__global__ void layernorm_param_partials_kernel(float* partial, const float* dout, const float* inp,
                                                const float* mean, const float* rstd, int N, int C,
                                                int rows_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (c >= C) return;
  const int r1 = min(N, (chunk + 1) * rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (int r = chunk * rows_per_chunk; r < r1; ++r) {
    const std::size_t i = static_cast<std::size_t>(r) * C + c;
    dw += dout[i] * (inp[i] - mean[r]) * rstd[r];
    db += dout[i];
  }
  partial[static_cast<std::size_t>(chunk) * C + c] = dw;
  partial[static_cast<std::size_t>(gridDim.y + chunk) * C + c] = db;
}

__global__ void layernorm_param_finish_kernel(float* dweight, float* dbias, const float* partial, int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float dw = 0.0f, db = 0.0f;
  for (int k = 0; k < chunks; ++k) {  // chunks in order: deterministic
    dw += partial[static_cast<std::size_t>(k) * C + c];
    db += partial[static_cast<std::size_t>(chunks + k) * C + c];
  }
  dweight[c] += dw;
  dbias[c] += db;
}

// ---- embedding -----------------------------------------------------------------------------------
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* tok, const float* pos, int N,
                                         int S, int C) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * C) return;
  const int n = static_cast<int>(i / C), c = static_cast<int>(i % C);
  const int32_t t = tokens[n];
  float v = t >= 0 ? tok[static_cast<std::size_t>(t) * C + c] : 0.0f;
  if (pos != nullptr) v += pos[static_cast<std::size_t>(n % S) * C + c];
  out[i] = v;
}

// Thread (c, p) owns column c of the token rows t ≡ p (mod kTokenPartitions) and adds the rows of
// dout in token order: every element has one writer, so the sums are deterministic without atomics.
constexpr int kTokenPartitions = 32;
__global__ void embedding_backward_tok_kernel(float* dtok, const float* dout, const int32_t* tokens, int N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x, p = blockIdx.y;
  if (c >= C) return;
  for (int n = 0; n < N; ++n) {
    const int32_t t = tokens[n];
    if (t >= 0 && t % kTokenPartitions == p) dtok[static_cast<std::size_t>(t) * C + c] += dout[static_cast<std::size_t>(n) * C + c];
  }
}

__global__ void embedding_backward_pos_kernel(float* dpos, const float* dout, int B, int S, int C) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(S) * C) return;
  float acc = 0.0f;
  for (int b = 0; b < B; ++b) acc += dout[static_cast<std::size_t>(b) * S * C + i];
  dpos[i] += acc;
}

// ---- cross-entropy: one block per row ------------------------------------------------------------
__global__ void cross_entropy_kernel(float* logits, double* row_loss, const int32_t* targets, int V, float scale) {
  float* z = logits + static_cast<std::size_t>(blockIdx.x) * V;
  const int target = targets[blockIdx.x];
  float m = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, z[i]);
  m = block_reduce<float, true>(m);
  const float target_shifted = z[target] - m;  // read by every thread before the barrier below
  float sum = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(z[i] - m);
  sum = block_reduce<float>(sum);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = log(static_cast<double>(sum)) - static_cast<double>(target_shifted);
  const float inv = scale / sum;
  for (int i = threadIdx.x; i < V; i += blockDim.x) z[i] = expf(z[i] - m) * inv - (i == target ? scale : 0.0f);
}

__global__ void cross_entropy_row_max_kernel(float* row_max, const float* logits, int V) {
  const float* z = logits + static_cast<std::size_t>(blockIdx.x) * V;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, z[i]);
  m = block_reduce<float, true>(m);
  if (threadIdx.x == 0) row_max[blockIdx.x] = m;
}

__global__ void cross_entropy_partials_kernel(float* sums, const float* logits, const int32_t* targets,
                                              const float* row_max, int N, int V) {
  const int n = blockIdx.x;
  const float* z = logits + static_cast<std::size_t>(n) * V;
  const float m = row_max[n];
  float sum = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(z[i] - m);
  sum = block_reduce<float>(sum);
  if (threadIdx.x == 0) {
    sums[n] = sum;
    sums[N + n] = targets[n] >= 0 ? z[targets[n]] - m : 0.0f;
  }
}

__global__ void cross_entropy_finish_kernel(float* logits, double* row_loss, const int32_t* targets,
                                            const float* row_max, const float* sums, int N, int V, float scale) {
  const int n = blockIdx.x;
  float* z = logits + static_cast<std::size_t>(n) * V;
  const float m = row_max[n], inv = scale / sums[n];
  const int target = targets[n];
  if (threadIdx.x == 0) row_loss[n] = log(static_cast<double>(sums[n])) - static_cast<double>(sums[N + n]);
  for (int i = threadIdx.x; i < V; i += blockDim.x) z[i] = expf(z[i] - m) * inv - (i == target ? scale : 0.0f);
}

// loss_sum[0] += scale · Σ row_loss, one block, fixed order.
__global__ void sum_rows_kernel(double* loss_sum, const double* row_loss, int N, float scale) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) acc += row_loss[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) loss_sum[0] += static_cast<double>(scale) * acc;
}

// ---- optimizer -----------------------------------------------------------------------------------
constexpr std::size_t kSumChunk = std::size_t{1} << 14;
__global__ void sum_squares_partial_kernel(double* partial, const float* x, std::size_t n) {
  const std::size_t begin = blockIdx.x * kSumChunk, end = min(n, begin + kSumChunk);
  double acc = 0.0;
  for (std::size_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += static_cast<double>(x[i]) * x[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_doubles_kernel(double* out, const double* partial, std::size_t n) {
  double acc = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

// torch.optim.AdamW (non-fused): decoupled decay, then the bias-corrected step.
__global__ void adamw_kernel(float* params, const float* grads, float* m, float* v, std::size_t n, float beta1,
                             float beta2, float eps, float step_size, float bias2_sqrt, float decay,
                             float grad_scale) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float g = grads[i] * grad_scale;
  const float mi = beta1 * m[i] + (1.0f - beta1) * g;
  const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
  m[i] = mi;
  v[i] = vi;
  params[i] = params[i] * decay - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
}

// ---- fused causal attention ----------------------------------------------------------------------
// Flash-attention style: nothing of size S×S is stored. The forward keeps the log-sum-exp of each
// query row; the backward recomputes the probabilities tile by tile from it. A warp owns a query row
// (lane j scores key j of a 32-key tile; the output's head dimensions are split over the lanes);
// K and V tiles sit in shared memory with an odd row stride, so the lanes' rows fall in distinct banks.
constexpr int kAttKeys = 32;        // keys per tile (one per lane)
constexpr int kAttWarps = 4;        // warps per block in the row kernels
constexpr int kAttRowsPerWarp = 2;  // query rows per warp
constexpr int kAttRows = kAttWarps * kAttRowsPerWarp;
constexpr int kAttDimsPerLane = kCudaMaxHeadDim / 32;

__host__ __device__ inline int att_stride(int d) { return d | 1; }

__device__ void load_kv_tile(float* Ks, float* Vs, const float* base, int k0, int S, int C, int d, int stride) {
  const std::size_t C3 = 3 * static_cast<std::size_t>(C);
  for (int i = threadIdx.x; i < kAttKeys * d; i += blockDim.x) {
    const int j = i / d, k = i % d, key = k0 + j;
    float kv = 0.0f, vv = 0.0f;  // keys beyond S: zeros, never read past the tensor
    if (key < S) {
      const float* row = base + static_cast<std::size_t>(key) * C3;
      kv = row[C + k];
      vv = row[2 * C + k];
    }
    Ks[j * stride + k] = kv;
    Vs[j * stride + k] = vv;
  }
}

// out (B, S, C); lse (B, H, S) = max + log Σ exp of each query row's scaled scores.
__global__ void attention_forward_kernel(float* out, float* lse, const float* qkv, int S, int C, int H) {
  extern __shared__ float smem[];
  const int d = C / H, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t C3 = 3 * static_cast<std::size_t>(C);
  const float* base = qkv + static_cast<std::size_t>(b) * S * C3 + h * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < S ? base[static_cast<std::size_t>(t) * C3 + i % d] : 0.0f;
  }
  float m[kAttRowsPerWarp], l[kAttRowsPerWarp], o[kAttRowsPerWarp][kAttDimsPerLane];
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < kAttDimsPerLane; ++k) o[r][k] = 0.0f;
  }
  const int last_row = min(S - 1, q0 + kAttRows - 1);
  for (int k0 = 0; k0 <= last_row; k0 += kAttKeys) {
    __syncthreads();  // the previous tile is consumed (and Q is loaded)
    load_kv_tile(Ks, Vs, base, k0, S, C, d, stride);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kAttRowsPerWarp; ++r) {
      const int row = warp * kAttRowsPerWarp + r, t = q0 + row, key = k0 + lane;
      if (t >= S || k0 > t) continue;  // uniform over the warp
      float s = -INFINITY;
      if (key <= t) {
        const float* q = Qs + row * d;
        const float* kr = Ks + lane * stride;
        float dot = 0.0f;
        for (int k = 0; k < d; ++k) dot += q[k] * kr[k];
        s = dot * scale;
      }
      const float m_new = fmaxf(m[r], warp_max(s));  // finite: key k0 ≤ t is in this tile
      const float p = key <= t ? expf(s - m_new) : 0.0f;
      const float alpha = expf(m[r] - m_new);  // 0 on the first tile
      l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
      for (int k = 0; k < kAttDimsPerLane; ++k) o[r][k] *= alpha;
      for (int j = 0; j < kAttKeys; ++j) {
        const float pj = __shfl_sync(kFull, p, j);
#pragma unroll
        for (int k = 0; k < kAttDimsPerLane; ++k) {
          const int dim = lane + 32 * k;
          if (dim < d) o[r][k] += pj * Vs[j * stride + dim];
        }
      }
      m[r] = m_new;
    }
  }
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    const int t = q0 + warp * kAttRowsPerWarp + r;
    if (t >= S) continue;
    float* ot = out + (static_cast<std::size_t>(b) * S + t) * C + h * d;
#pragma unroll
    for (int k = 0; k < kAttDimsPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim < d) ot[dim] = o[r][k] / l[r];
    }
    if (lane == 0) lse[static_cast<std::size_t>(bh) * S + t] = m[r] + logf(l[r]);
  }
}

// D (B, H, S) = Σ_dims dout · out per query row (= Σ_keys P · dP): one warp per row.
__global__ void attention_backward_dot_kernel(float* D, const float* dout, const float* out, int B, int S, int C,
                                              int H) {
  const std::size_t w = blockIdx.x * static_cast<std::size_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (w >= static_cast<std::size_t>(B) * H * S) return;
  const int d = C / H, t = static_cast<int>(w % S), bh = static_cast<int>(w / S), b = bh / H, h = bh % H;
  const std::size_t off = (static_cast<std::size_t>(b) * S + t) * C + h * d;
  float acc = 0.0f;
  for (int k = lane; k < d; k += 32) acc += dout[off + k] * out[off + k];
  acc = warp_sum(acc);
  if (lane == 0) D[w] = acc;
}

// dQ of each query row: Σ_keys P·(dP − D)·scale · k.
__global__ void attention_backward_dq_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                             const float* D, int S, int C, int H) {
  extern __shared__ float smem[];
  const int d = C / H, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  float* dOs = Qs + kAttRows * d;      // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t C3 = 3 * static_cast<std::size_t>(C);
  const float* base = qkv + static_cast<std::size_t>(b) * S * C3 + h * d;
  const float* dbase = dout + static_cast<std::size_t>(b) * S * C + h * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < S ? base[static_cast<std::size_t>(t) * C3 + i % d] : 0.0f;
    dOs[i] = t < S ? dbase[static_cast<std::size_t>(t) * C + i % d] : 0.0f;
  }
  float dq[kAttRowsPerWarp][kAttDimsPerLane] = {};
  const int last_row = min(S - 1, q0 + kAttRows - 1);
  for (int k0 = 0; k0 <= last_row; k0 += kAttKeys) {
    __syncthreads();
    load_kv_tile(Ks, Vs, base, k0, S, C, d, stride);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kAttRowsPerWarp; ++r) {
      const int row = warp * kAttRowsPerWarp + r, t = q0 + row, key = k0 + lane;
      if (t >= S || k0 > t) continue;
      float ds = 0.0f;
      if (key <= t) {
        const float* q = Qs + row * d;
        const float* g = dOs + row * d;
        const float* kr = Ks + lane * stride;
        const float* vr = Vs + lane * stride;
        float s = 0.0f, dp = 0.0f;
        for (int k = 0; k < d; ++k) {
          s += q[k] * kr[k];
          dp += g[k] * vr[k];
        }
        const std::size_t stat = static_cast<std::size_t>(bh) * S + t;
        const float p = expf(s * scale - lse[stat]);
        ds = p * (dp - D[stat]) * scale;
      }
      for (int j = 0; j < kAttKeys; ++j) {
        const float dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int k = 0; k < kAttDimsPerLane; ++k) {
          const int dim = lane + 32 * k;
          if (dim < d) dq[r][k] += dsj * Ks[j * stride + dim];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    const int t = q0 + warp * kAttRowsPerWarp + r;
    if (t >= S) continue;
    float* dqt = dqkv + (static_cast<std::size_t>(b) * S + t) * C3 + h * d;
#pragma unroll
    for (int k = 0; k < kAttDimsPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim < d) dqt[dim] = dq[r][k];
    }
  }
}

// dK and dV of a 32-key tile: one warp, lane j owns key j's rows of dK and dV (in shared memory)
// and walks the query rows that can see the tile.
__global__ void attention_backward_dkv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                              const float* D, int S, int C, int H) {
  extern __shared__ float smem[];
  const int d = C / H, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* dKs = Vs + kAttKeys * stride;
  float* dVs = dKs + kAttKeys * stride;
  float* q = dVs + kAttKeys * stride;  // (d)
  float* g = q + d;                    // (d): dout row
  const int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * kAttKeys, lane = threadIdx.x;
  const std::size_t C3 = 3 * static_cast<std::size_t>(C);
  const float* base = qkv + static_cast<std::size_t>(b) * S * C3 + h * d;
  const float* dbase = dout + static_cast<std::size_t>(b) * S * C + h * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  load_kv_tile(Ks, Vs, base, k0, S, C, d, stride);
  for (int i = lane; i < kAttKeys * stride; i += 32) dKs[i] = dVs[i] = 0.0f;
  const int key = k0 + lane;
  const float* kr = Ks + lane * stride;
  const float* vr = Vs + lane * stride;
  float* dkr = dKs + lane * stride;
  float* dvr = dVs + lane * stride;
  for (int t = k0; t < S; ++t) {
    __syncwarp();
    for (int k = lane; k < d; k += 32) {
      q[k] = base[static_cast<std::size_t>(t) * C3 + k];
      g[k] = dbase[static_cast<std::size_t>(t) * C + k];
    }
    __syncwarp();
    if (key > t) continue;  // also keys beyond S, since t < S
    float s = 0.0f, dp = 0.0f;
    for (int k = 0; k < d; ++k) {
      s += q[k] * kr[k];
      dp += g[k] * vr[k];
    }
    const std::size_t stat = static_cast<std::size_t>(bh) * S + t;
    const float p = expf(s * scale - lse[stat]);
    const float ds = p * (dp - D[stat]) * scale;
    for (int k = 0; k < d; ++k) {
      dvr[k] += p * g[k];
      dkr[k] += ds * q[k];
    }
  }
  __syncwarp();
  for (int j = 0; j < kAttKeys && k0 + j < S; ++j) {
    float* row = dqkv + (static_cast<std::size_t>(b) * S + k0 + j) * C3 + h * d;
    for (int k = lane; k < d; k += 32) {
      row[C + k] = dKs[j * stride + k];
      row[2 * C + k] = dVs[j * stride + k];
    }
  }
}

std::size_t attention_row_smem(int d, bool with_dout) {
  return sizeof(float) * (2 * kAttKeys * att_stride(d) + (with_dout ? 2 : 1) * kAttRows * d);
}
std::size_t attention_dkv_smem(int d) { return sizeof(float) * (4 * kAttKeys * att_stride(d) + 2 * d); }

// ---- the backend ---------------------------------------------------------------------------------
constexpr std::size_t kAllocAlignment = 256;

class CudaBackend final : public Backend {
 public:
  // One device per process: the backend makes `device` current once, and every call assumes it.
  CudaBackend(int device, bool bf16_matmul)
      : device_(device), compute_type_(bf16_matmul ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F) {
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
    PB_CUDA_CHECK(cudaMallocHost(&host_double_, sizeof(double)));
    sample_device_memory();
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& [size, ptr] : cache_) cudaFree(ptr);
    for (auto& [ptr, block] : live_) cudaFree(ptr);
    cudaFree(scratch_);
    cudaFree(ones_);
    cudaFreeHost(host_double_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  std::string device_name() const override { return name_; }
  cudaStream_t stream() const { return stream_; }

  // ---- memory: a per-size cache over cudaMalloc ----------------------------------------------------
  void* alloc(std::size_t bytes, MemCategory category) override {
    const std::size_t rounded = std::max(kAllocAlignment, (bytes + kAllocAlignment - 1) / kAllocAlignment * kAllocAlignment);
    void* ptr = nullptr;
    auto hit = cache_.find(rounded);
    if (hit != cache_.end()) {
      ptr = hit->second;
      cache_.erase(hit);
    } else {
      ptr = device_malloc(rounded);
    }
    live_[ptr] = Block{bytes, rounded, category};
    tracker_.on_alloc(category, bytes);
    return ptr;
  }
  void free(void* ptr) override {
    if (ptr == nullptr) return;
    auto it = live_.find(ptr);
    if (it == live_.end()) throw std::logic_error("cuda backend: free of a pointer it did not allocate");
    tracker_.on_free(it->second.category, it->second.bytes);
    cache_.emplace(it->second.rounded, ptr);  // reuse is ordered by the one compute stream
    live_.erase(it);
  }
  MemoryTracker& tracker() override { return tracker_; }
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
    const dim3 keys_grid((S + kAttKeys - 1) / kAttKeys, B * num_heads);
    attention_backward_dkv_kernel<<<keys_grid, 32, attention_dkv_smem(d), stream_>>>(dqkv, dout, qkv, saved,
                                                                                      scratch_d, S, C, num_heads);
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
  struct Block {
    std::size_t bytes;
    std::size_t rounded;
    MemCategory category;
  };

  void gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, const float* A, int lda,
            const float* B, int ldb, float beta, float* C, int ldc) {
    const float alpha = 1.0f;
    PB_CUBLAS_CHECK(cublasGemmEx(cublas_, op_a, op_b, m, n, k, &alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, &beta,
                                 C, CUDA_R_32F, ldc, compute_type_, CUBLAS_GEMM_DEFAULT));
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
      for (auto& [size, cached] : cache_) PB_CUDA_CHECK(cudaFree(cached));
      cache_.clear();
      status = cudaMalloc(&ptr, bytes);
    }
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw RunError(kExitRuntime, "CUDA out of memory: " + std::to_string(bytes) + " bytes requested with " +
                                       std::to_string(tracker_.current_total()) + " bytes in use");
    }
    PB_CUDA_CHECK(status);
    sample_device_memory();
    return ptr;
  }

  // Backend-internal buffer, grown on demand; its users run one after another on the stream.
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      PB_CUDA_CHECK(cudaStreamSynchronize(stream_));
      PB_CUDA_CHECK(cudaFree(scratch_));
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      PB_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
      sample_device_memory();
    }
    return scratch_;
  }

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
  cublasComputeType_t compute_type_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  MemoryTracker tracker_;
  std::unordered_map<void*, Block> live_;
  std::multimap<std::size_t, void*> cache_;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
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
