// The CUDA kernels of the CUDA backend (kernels/cuda/cuda_backend.cu launches them).
//
// Kept apart from the host code so that tests/unit/test_cuda_kernels_emulated.cpp can run the very
// same kernels on the CPU through a small emulation of CUDA's execution model (threads, warps, shared
// memory, barriers and shuffles): their indexing, synchronisation and arithmetic are checked on every
// machine, not only where a GPU is lent. Every reduction runs in a fixed order, no atomics.
//
// Element types: a tensor is fp32 (float) or bf16 (uint16_t, the upper 16 bits of an fp32: kernels/dtype.h;
// the emulation has no __nv_bfloat16, so bf16 is handled as its bits here and cuBLAS is told CUDA_R_16BF).
// A kernel is a template over the element types of its tensors: it loads every element as a float
// (to_float), computes in fp32 and stores in the tensor's type (from_float<T>: rounded to nearest even
// into bf16). What is always fp32 (statistics, the attention's saved state and scratch, gates and
// probabilities, AdamW's moments and parameters) stays float*. With float everywhere a kernel does the
// arithmetic it did before it became a template, bit for bit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef PB_DYNAMIC_SHARED  // the emulation defines its own
#define PB_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif

namespace pb {
namespace kernels {

constexpr unsigned kFull = 0xffffffffu;
constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

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

// ---- element types: fp32 (float) and bf16 (uint16_t bits) ----------------------------------------
// fp32 → bf16 bits, rounded to nearest even (what __float2bfloat16_rn and cvt.rn.bf16.f32 do): the top
// 16 bits of x after adding 0x7FFF plus the lowest kept bit, so that a tie rounds to the even
// neighbour. Denormals round as bit patterns (no flush); a value past the largest bf16 becomes ±inf;
// NaN becomes the canonical quiet NaN 0x7FFF, as the device conversion gives it. Written out rather
// than calling __float2bfloat16_rn so that the same arithmetic runs under the CPU emulation
// (tests/unit/cuda_emulation.h has no bf16 type); the bits are a __nv_bfloat16's.
__host__ __device__ inline uint16_t float_to_bf16_bits(float x) {
#ifdef __CUDA_ARCH__
  const uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
#endif
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;  // NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// bf16 bits → fp32 (exact).
__host__ __device__ inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// An element as fp32: the load of every templated kernel.
__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(uint16_t b) { return bf16_bits_to_float(b); }

// An fp32 value as an element of T: the store of every templated kernel (bf16: rounded to nearest even).
template <typename T>
__host__ __device__ inline T from_float(float x) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, uint16_t>::value, "fp32 is float, bf16 uint16_t");
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else {
    return float_to_bf16_bits(x);
  }
}

// ---- elementwise ---------------------------------------------------------------------------------
// Copies the bits (out and row of one type).
template <typename T>
__global__ void broadcast_rows_kernel(T* out, const T* row, std::size_t rows, int cols) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < rows * cols) out[i] = row[i % cols];
}

// out (n bf16 values, as their bits) = in (n floats) rounded to nearest even: the operands of the
// bf16 matrix products of fp32 tensors (bf16_matmul).
__global__ void float_to_bf16_kernel(uint16_t* out, const float* in, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = float_to_bf16_bits(in[i]);
}

// dst = src in dst's type (bf16 → fp32 exact, fp32 → bf16 rounded to nearest even).
template <typename TD, typename TS>
__global__ void convert_kernel(TD* dst, const TS* src, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = from_float<TD>(to_float(src[i]));
}

// The same over `rows` rows of `cols` elements, src rows src_stride apart and dst rows dst_stride apart:
// strided tensors to and from packed fp32 staging buffers.
template <typename TD, typename TS>
__global__ void convert_2d_kernel(TD* dst, std::size_t dst_stride, const TS* src, std::size_t src_stride,
                                  std::size_t rows, std::size_t cols) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  const std::size_t r = i / cols, c = i % cols;
  dst[r * dst_stride + c] = from_float<TD>(to_float(src[r * src_stride + c]));
}

template <typename T>
__global__ void fill_kernel(T* out, float value, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = from_float<T>(value);
}

template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* inp, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = to_float(inp[i]);
  out[i] = from_float<T>(0.5f * x * (1.0f + tanhf(kGeluK * (x + 0.044715f * x * x * x))));
}

// dinp may alias dout: each thread reads its element before writing it.
template <typename T>
__global__ void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float x = to_float(inp[i]);
  const float th = tanhf(kGeluK * (x + 0.044715f * x * x * x));
  const float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluK * (1.0f + 3.0f * 0.044715f * x * x);
  dinp[i] = from_float<T>(grad * to_float(dout[i]));
}

// Any type per argument; out may alias a or b.
template <typename TO, typename TA, typename TB>
__global__ void add_kernel(TO* out, const TA* a, const TB* b, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = from_float<TO>(to_float(a[i]) + to_float(b[i]));
}

template <typename TY, typename TX>
__global__ void accumulate_kernel(TY* y, const TX* x, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = from_float<TY>(to_float(y[i]) + to_float(x[i]));
}

template <typename T>
__global__ void scale_kernel(T* y, float alpha, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = from_float<T>(to_float(y[i]) * alpha);
}

// ---- LayerNorm: one warp per row -----------------------------------------------------------------
// The rest of a row's LayerNorm once its lane's partial sum of x is known: the mean, the biased
// variance, y = (x − mean) · rstd · weight + bias, and the row's statistics (lane 0).
template <typename T>
__device__ void layernorm_row(T* y, float* mean, float* rstd, const T* x, const T* weight, const T* bias, int C,
                              int row, int lane, float lane_sum) {
  const float m = warp_sum(lane_sum) / C;
  float var = 0.0f;  // biased variance
  for (int i = lane; i < C; i += 32) var += (to_float(x[i]) - m) * (to_float(x[i]) - m);
  var = warp_sum(var) / C;
  const float s = 1.0f / sqrtf(var + kLayerNormEps);
  for (int i = lane; i < C; i += 32)
    y[i] = from_float<T>((to_float(x[i]) - m) * s * to_float(weight[i]) + to_float(bias[i]));
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// out, inp, weight and bias of one type T; mean and rstd fp32.
template <typename T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                         const T* bias, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* x = inp + static_cast<std::size_t>(row) * C;
  float sum = 0.0f;
  for (int i = lane; i < C; i += 32) sum += to_float(x[i]);
  layernorm_row(out + static_cast<std::size_t>(row) * C, mean, rstd, x, weight, bias, C, row, lane, sum);
}

// out = a + b (rounded once into T), then the LayerNorm of the stored out into ln_out: one warp per row,
// each lane reading back only the elements it wrote (out may alias a or b).
template <typename T>
__global__ void residual_layernorm_forward_kernel(T* out, T* ln_out, float* mean, float* rstd, const T* a, const T* b,
                                                  const T* weight, const T* bias, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t off = static_cast<std::size_t>(row) * C;
  T* x = out + off;
  float sum = 0.0f;
  for (int i = lane; i < C; i += 32) {
    const T xi = from_float<T>(to_float(a[off + i]) + to_float(b[off + i]));
    x[i] = xi;
    sum += to_float(xi);
  }
  layernorm_row(ln_out + off, mean, rstd, static_cast<const T*>(x), weight, bias, C, row, lane, sum);
}

// dinp += rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dout·weight (in bf16: added in fp32, rounded once)
template <typename T>
__global__ void layernorm_backward_input_kernel(T* dinp, const T* dout, const T* inp, const T* weight,
                                                const float* mean, const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t off = static_cast<std::size_t>(row) * C;
  const float m = mean[row], s = rstd[row];
  float g_mean = 0.0f, gx_mean = 0.0f;
  for (int i = lane; i < C; i += 32) {
    const float g = to_float(dout[off + i]) * to_float(weight[i]);
    g_mean += g;
    gx_mean += g * (to_float(inp[off + i]) - m) * s;
  }
  g_mean = warp_sum(g_mean) / C;
  gx_mean = warp_sum(gx_mean) / C;
  for (int i = lane; i < C; i += 32) {
    const float xhat = (to_float(inp[off + i]) - m) * s;
    dinp[off + i] = from_float<T>(to_float(dinp[off + i]) +
                                  s * (to_float(dout[off + i]) * to_float(weight[i]) - g_mean - xhat * gx_mean));
  }
}

// Column sums over a chunk of rows: partial[chunk][c] = Σ dout·x̂, partial[chunks + chunk][c] = Σ dout (fp32).
// RMSNorm's (mean null): x̂ = x·rstd, and no Σ dout (partial holds `chunks` rows).
template <typename T>
__global__ void layernorm_param_partials_kernel(float* partial, const T* dout, const T* inp, const float* mean,
                                                const float* rstd, int N, int C, int rows_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (c >= C) return;
  const int r1 = min(N, (chunk + 1) * rows_per_chunk);
  float dw = 0.0f, db = 0.0f;
  for (int r = chunk * rows_per_chunk; r < r1; ++r) {
    const std::size_t i = static_cast<std::size_t>(r) * C + c;
    dw += to_float(dout[i]) * (to_float(inp[i]) - (mean != nullptr ? mean[r] : 0.0f)) * rstd[r];
    db += to_float(dout[i]);
  }
  partial[static_cast<std::size_t>(chunk) * C + c] = dw;
  if (mean != nullptr) partial[static_cast<std::size_t>(gridDim.y + chunk) * C + c] = db;
}

// dweight, dbias (each fp32 or bf16) += the chunks' sums, added in fp32 and stored once (RMSNorm's: dbias
// null).
template <typename TW, typename TB>
__global__ void layernorm_param_finish_kernel(TW* dweight, TB* dbias, const float* partial, int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float dw = 0.0f, db = 0.0f;
  for (int k = 0; k < chunks; ++k) {  // chunks in order: deterministic
    dw += partial[static_cast<std::size_t>(k) * C + c];
    if (dbias != nullptr) db += partial[static_cast<std::size_t>(chunks + k) * C + c];
  }
  dweight[c] = from_float<TW>(to_float(dweight[c]) + dw);
  if (dbias != nullptr) dbias[c] = from_float<TB>(to_float(dbias[c]) + db);
}

// ---- the Llama-style block (SPEC 2.5): RMSNorm, rotary positions, SwiGLU --------------------------------
// RMSNorm, one warp per row as LayerNorm: once its lane's partial Σ x² is known, y = x · rstd · weight with
// rstd = 1 / sqrt(mean(x²) + eps), and the row's rstd (lane 0). Its backward's dweight is LayerNorm's
// param kernels with mean null.
template <typename T>
__device__ void rmsnorm_row(T* y, float* rstd, const T* x, const T* weight, int C, int row, int lane,
                            float lane_squares) {
  const float s = 1.0f / sqrtf(warp_sum(lane_squares) / C + kLayerNormEps);
  for (int i = lane; i < C; i += 32) y[i] = from_float<T>(to_float(x[i]) * s * to_float(weight[i]));
  if (lane == 0) rstd[row] = s;
}

template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const T* weight, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* x = inp + static_cast<std::size_t>(row) * C;
  float squares = 0.0f;
  for (int i = lane; i < C; i += 32) squares += to_float(x[i]) * to_float(x[i]);
  rmsnorm_row(out + static_cast<std::size_t>(row) * C, rstd, x, weight, C, row, lane, squares);
}

// out = a + b (rounded once into T), then the RMSNorm of the stored out into norm_out (out may alias a or b).
template <typename T>
__global__ void residual_rmsnorm_forward_kernel(T* out, T* norm_out, float* rstd, const T* a, const T* b,
                                                const T* weight, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t off = static_cast<std::size_t>(row) * C;
  T* x = out + off;
  float squares = 0.0f;
  for (int i = lane; i < C; i += 32) {
    const T xi = from_float<T>(to_float(a[off + i]) + to_float(b[off + i]));
    x[i] = xi;
    squares += to_float(xi) * to_float(xi);
  }
  rmsnorm_row(norm_out + off, rstd, static_cast<const T*>(x), weight, C, row, lane, squares);
}

// dinp += rstd · (g − x̂ · mean(g·x̂)), g = dout·weight, x̂ = x·rstd (in bf16: added in fp32, rounded once).
template <typename T>
__global__ void rmsnorm_backward_input_kernel(T* dinp, const T* dout, const T* inp, const T* weight, const float* rstd,
                                              int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t off = static_cast<std::size_t>(row) * C;
  const float s = rstd[row];
  float gx_mean = 0.0f;
  for (int i = lane; i < C; i += 32)
    gx_mean += to_float(dout[off + i]) * to_float(weight[i]) * to_float(inp[off + i]) * s;
  gx_mean = warp_sum(gx_mean) / C;
  for (int i = lane; i < C; i += 32) {
    dinp[off + i] = from_float<T>(to_float(dinp[off + i]) + s * (to_float(dout[off + i]) * to_float(weight[i]) -
                                                                to_float(inp[off + i]) * s * gx_mean));
  }
}

// Rotary positions, in place (kernels/backend.h, rope_forward): one thread per (token row n = b·S + i, pair
// j < d/2), which computes φ = pos[i] · theta^(−2j/d) and cos φ, sin φ in double, rounded to fp32 (the CPU
// backend's table), and rotates pair (j, j + d/2) of each of the row's `heads` heads; sign −1 rotates back.
template <typename T>
__global__ void rope_kernel(T* x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                            double theta, float sign) {
  const int half = d / 2;
  const std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (t >= static_cast<std::size_t>(B) * S * half) return;
  const int j = static_cast<int>(t % half);
  const std::size_t n = t / half;
  const double angle = pos[n % S] * pow(theta, -2.0 * j / d);
  const float c = static_cast<float>(cos(angle)), sn = sign * static_cast<float>(sin(angle));
  T* row = x + n * row_stride;
  for (int h = 0; h < heads; ++h) {
    T* head = row + static_cast<std::size_t>(h) * d;
    const float x1 = to_float(head[j]), x2 = to_float(head[j + half]);
    head[j] = from_float<T>(x1 * c - x2 * sn);
    head[j + half] = from_float<T>(x2 * c + x1 * sn);
  }
}

// SwiGLU's gate: out = silu(gate) · up, silu(g) = g · σ(g).
template <typename T>
__global__ void swiglu_forward_kernel(T* out, const T* gate, const T* up, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float g = to_float(gate[i]);
  out[i] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up[i]));
}

// dgate = dout · up · silu'(gate), silu'(g) = σ(g)·(1 + g·(1 − σ(g))); dup = dout · silu(gate). dup may
// alias dout: each thread reads its element before writing it.
template <typename T>
__global__ void swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up, std::size_t n) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float g = to_float(gate[i]), dy = to_float(dout[i]), u = to_float(up[i]);
  const float sig = 1.0f / (1.0f + expf(-g));
  dgate[i] = from_float<T>(dy * u * sig * (1.0f + g * (1.0f - sig)));
  dup[i] = from_float<T>(dy * g * sig);
}

// ---- embedding -----------------------------------------------------------------------------------
// out, tok and pos of one type; tok + pos added in fp32 and stored once.
template <typename T>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const T* tok, const T* pos, int N, int S,
                                         int C) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * C) return;
  const int n = static_cast<int>(i / C), c = static_cast<int>(i % C);
  const int32_t t = tokens[n];
  float v = t >= 0 ? to_float(tok[static_cast<std::size_t>(t) * C + c]) : 0.0f;
  if (pos != nullptr) v += to_float(pos[static_cast<std::size_t>(n % S) * C + c]);
  out[i] = from_float<T>(v);
}

// The token gradient, parallel and without atomics: the rows sorted by token, stably (cub's radix sort
// on (token, row) pairs: the rows of a token stay in row order), then one thread per (sorted row,
// column); the thread at the first row of each token's run adds the run's dout rows in row order onto
// dtok in fp32 and stores once: dtok[t, c] = round(dtok[t, c] + Σ rows of t in order), the order and
// rounding of the CPU backend, whatever the dtype of dtok.
//
// The sort's keys: tokens, a negative one (another rank's vocabulary block) as kNoToken, so it sorts last
// and is skipped; its values: the row numbers 0..N−1.
constexpr int32_t kNoToken = 0x7fffffff;
__global__ void embedding_sort_keys_kernel(int32_t* keys, int32_t* rows, const int32_t* tokens, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  keys[n] = tokens[n] >= 0 ? tokens[n] : kNoToken;
  rows[n] = n;
}
template <typename TG, typename T>
__global__ void embedding_backward_sorted_kernel(TG* dtok, const T* dout, const int32_t* sorted_tokens,
                                                 const int32_t* sorted_rows, int N, int C) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * C) return;
  const int p = static_cast<int>(i / C), c = static_cast<int>(i % C);
  const int32_t t = sorted_tokens[p];
  if (t == kNoToken || (p > 0 && sorted_tokens[p - 1] == t)) return;  // not the first row of a run
  TG* g = dtok + static_cast<std::size_t>(t) * C + c;
  float acc = to_float(*g);
  for (int q = p; q < N && sorted_tokens[q] == t; ++q) {
    acc += to_float(dout[static_cast<std::size_t>(sorted_rows[q]) * C + c]);
  }
  *g = from_float<TG>(acc);
}

// dpos (either type) += Σ_b dout, summed in fp32 and stored once.
template <typename TG, typename T>
__global__ void embedding_backward_pos_kernel(TG* dpos, const T* dout, int B, int S, int C) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(S) * C) return;
  float acc = 0.0f;
  for (int b = 0; b < B; ++b) acc += to_float(dout[static_cast<std::size_t>(b) * S * C + i]);
  dpos[i] = from_float<TG>(to_float(dpos[i]) + acc);
}

// ---- cross-entropy: one block per row ------------------------------------------------------------
// Online softmax statistics: the maximum m of some values and Σ exp(x − m) over them; two merge into the
// statistics of their union (Milakov and Gimelshein's online normaliser), so one pass over a row gives both.
struct SoftmaxStat {
  float m;
  float s;
};
__device__ inline SoftmaxStat softmax_merge(SoftmaxStat a, SoftmaxStat b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return SoftmaxStat{m, 0.0f};
  return SoftmaxStat{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__device__ inline SoftmaxStat softmax_add(SoftmaxStat a, float x) {
  if (x > a.m) return SoftmaxStat{x, a.s * expf(a.m - x) + 1.0f};
  return SoftmaxStat{a.m, x == -INFINITY ? a.s : a.s + expf(x - a.m)};
}
// The block's statistics, returned to every thread (blockDim.x a multiple of 32; ends with a barrier).
__device__ SoftmaxStat block_softmax_stat(SoftmaxStat v) {
  __shared__ float part_m[32], part_s[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int o = 16; o > 0; o >>= 1) {
    v = softmax_merge(v, SoftmaxStat{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.s, o)});
  }
  if (lane == 0) {
    part_m[warp] = v.m;
    part_s[warp] = v.s;
  }
  __syncthreads();
  if (warp == 0) {
    SoftmaxStat w = lane < warps ? SoftmaxStat{part_m[lane], part_s[lane]} : SoftmaxStat{-INFINITY, 0.0f};
    for (int o = 16; o > 0; o >>= 1) {
      w = softmax_merge(w, SoftmaxStat{__shfl_xor_sync(kFull, w.m, o), __shfl_xor_sync(kFull, w.s, o)});
    }
    if (lane == 0) {
      part_m[0] = w.m;
      part_s[0] = w.s;
    }
  }
  __syncthreads();
  const SoftmaxStat result{part_m[0], part_s[0]};
  __syncthreads();
  return result;
}

// A row of logits read and written in 16-byte packs (8 bf16 or 4 fp32 values: one 128-bit load per
// thread, where element-wise bf16 loads would fetch 2 bytes each) when the row starts at a 16-byte boundary
// and its stride Vp holds whole packs, as the padded vocabulary's does (a multiple of 128); element by
// element otherwise. Either way each thread visits its indices in ascending order, the block's threads
// striding the row, so the result depends only on the shape and the layout, never on timing.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};
template <typename T>
__device__ inline bool packs_row(const T* row, int Vp) {
  return Vp % Pack16<T>::kSize == 0 && reinterpret_cast<std::uintptr_t>(row) % 16 == 0;
}
// f(i, x) for every column i < n of the row, x its value in fp32.
template <typename T, typename F>
__device__ void for_each_in_row(const T* row, int n, int Vp, F&& f) {
  constexpr int P = Pack16<T>::kSize;
  if (packs_row(row, Vp)) {
    const Pack16<T>* packs = reinterpret_cast<const Pack16<T>*>(row);
    for (int p = threadIdx.x; p * P < n; p += blockDim.x) {
      const Pack16<T> pack = packs[p];
#pragma unroll
      for (int k = 0; k < P; ++k) {
        if (p * P + k < n) f(p * P + k, to_float(pack.v[k]));
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i, to_float(row[i]));
  }
}
// row[i] = g(i, row[i]) for every column i < Vp (x and g's result in fp32, stored rounded to T).
template <typename T, typename G>
__device__ void rewrite_row(T* row, int Vp, G&& g) {
  constexpr int P = Pack16<T>::kSize;
  if (packs_row(row, Vp)) {
    Pack16<T>* packs = reinterpret_cast<Pack16<T>*>(row);
    for (int p = threadIdx.x; p * P < Vp; p += blockDim.x) {
      Pack16<T> pack = packs[p];
#pragma unroll
      for (int k = 0; k < P; ++k) pack.v[k] = from_float<T>(g(p * P + k, to_float(pack.v[k])));
      packs[p] = pack;
    }
  } else {
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) row[i] = from_float<T>(g(i, to_float(row[i])));
  }
}

// The logits in either type, overwritten by their gradient in it; statistics and losses in fp32 (double).
// Rows are Vp apart, their first V columns the vocabulary and the rest its padding (gradient 0).
// Two passes over the row: the statistics in one (online), then the gradient.
template <typename T>
__global__ void cross_entropy_kernel(T* logits, double* row_loss, const int32_t* targets, int V, int Vp, float scale) {
  T* z = logits + static_cast<std::size_t>(blockIdx.x) * Vp;
  const int target = targets[blockIdx.x];
  SoftmaxStat stat{-INFINITY, 0.0f};
  for_each_in_row(z, V, Vp, [&](int, float x) { stat = softmax_add(stat, x); });
  stat = block_softmax_stat(stat);
  const float m = stat.m, sum = stat.s;
  const float target_shifted = to_float(z[target]) - m;  // read by every thread before the writes below
  __syncthreads();
  if (threadIdx.x == 0) row_loss[blockIdx.x] = log(static_cast<double>(sum)) - static_cast<double>(target_shifted);
  const float inv = scale / sum;
  rewrite_row(z, Vp, [&](int i, float x) { return i < V ? expf(x - m) * inv - (i == target ? scale : 0.0f) : 0.0f; });
}

template <typename T>
__global__ void cross_entropy_row_max_kernel(float* row_max, const T* logits, int V, int Vp) {
  const T* z = logits + static_cast<std::size_t>(blockIdx.x) * Vp;
  float m = -INFINITY;
  for_each_in_row(z, V, Vp, [&](int, float x) { m = fmaxf(m, x); });
  m = block_reduce<float, true>(m);
  if (threadIdx.x == 0) row_max[blockIdx.x] = m;
}

template <typename T>
__global__ void cross_entropy_partials_kernel(float* sums, const T* logits, const int32_t* targets,
                                              const float* row_max, int N, int V, int Vp) {
  const int n = blockIdx.x;
  const T* z = logits + static_cast<std::size_t>(n) * Vp;
  const float m = row_max[n];
  float sum = 0.0f;
  for_each_in_row(z, V, Vp, [&](int, float x) { sum += expf(x - m); });
  sum = block_reduce<float>(sum);
  if (threadIdx.x == 0) {
    sums[n] = sum;
    sums[N + n] = targets[n] >= 0 ? to_float(z[targets[n]]) - m : 0.0f;
  }
}

template <typename T>
__global__ void cross_entropy_finish_kernel(T* logits, double* row_loss, const int32_t* targets, const float* row_max,
                                            const float* sums, int N, int V, int Vp, float scale) {
  const int n = blockIdx.x;
  T* z = logits + static_cast<std::size_t>(n) * Vp;
  const float m = row_max[n], inv = scale / sums[n];
  const int target = targets[n];
  if (threadIdx.x == 0) row_loss[n] = log(static_cast<double>(sums[n])) - static_cast<double>(sums[N + n]);
  rewrite_row(z, Vp, [&](int i, float x) { return i < V ? expf(x - m) * inv - (i == target ? scale : 0.0f) : 0.0f; });
}

// loss_sum[0] += scale · Σ row_loss, one block, fixed order.
__global__ void sum_rows_kernel(double* loss_sum, const double* row_loss, int N, float scale) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) acc += row_loss[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) loss_sum[0] += static_cast<double>(scale) * acc;
}

// ---- mixture of experts (SPEC section 9) ---------------------------------------------------------
// Routing is small (N·E values) and runs one thread per token. The capacity walk is first come, first
// served in (n, j) order, so each expert's thread scans every assignment in that order and numbers its
// own: one writer per slot and per count. Dispatch and combine run one thread per element of a token's
// row (or of an assignment's); each expert slot has at most one writer, so nothing needs atomics.

// Offset of slot s of expert e in a (E, C, h) buffer.
__host__ __device__ inline std::size_t moe_slot_row(int32_t e, int32_t s, int C, int h) {
  return (static_cast<std::size_t>(e) * C + static_cast<std::size_t>(s)) * h;
}

// Whether expert i is among the first j chosen.
__device__ inline bool moe_is_chosen(const int32_t* chosen, int j, int i) {
  for (int q = 0; q < j; ++q) {
    if (chosen[q] == i) return true;
  }
  return false;
}

// probs (N, E) = softmax over all E logits; expert (N, k) = the top k, largest first, ties to the lower
// index; gate (N, k) = softmax over the chosen logits. One thread per token.
// The logits in either type; gates and probabilities fp32.
template <typename T>
__global__ void moe_router_forward_kernel(int32_t* expert, float* gate, float* probs, const T* logits, int N, int E,
                                          int k) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const T* z = logits + static_cast<std::size_t>(n) * E;
  float* p = probs + static_cast<std::size_t>(n) * E;
  int32_t* chosen = expert + static_cast<std::size_t>(n) * k;
  float* g = gate + static_cast<std::size_t>(n) * k;
  float zmax = to_float(z[0]);
  for (int i = 1; i < E; ++i) zmax = fmaxf(zmax, to_float(z[i]));
  float sum = 0.0f;
  for (int i = 0; i < E; ++i) {
    p[i] = expf(to_float(z[i]) - zmax);
    sum += p[i];
  }
  for (int i = 0; i < E; ++i) p[i] /= sum;
  // pick j: the largest logit not chosen yet; the strict ">" keeps the lower index on a tie
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < E; ++i) {
      if (moe_is_chosen(chosen, j, i)) continue;
      if (best < 0 || to_float(z[i]) > to_float(z[best])) best = i;
    }
    chosen[j] = best;
  }
  const float gmax = to_float(z[chosen[0]]);  // the first pick is the largest chosen logit
  float gsum = 0.0f;
  for (int j = 0; j < k; ++j) {
    g[j] = expf(to_float(z[chosen[j]]) - gmax);
    gsum += g[j];
  }
  for (int j = 0; j < k; ++j) g[j] /= gsum;
}

// dlogits (N, E) = the gates' softmax backward at the chosen experts, zero elsewhere. One thread per token.
template <typename T>
__global__ void moe_router_backward_kernel(T* dlogits, const float* dgate, const float* gate, const int32_t* expert,
                                           int N, int E, int k) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  T* dz = dlogits + static_cast<std::size_t>(n) * E;
  const float* g = gate + static_cast<std::size_t>(n) * k;
  const float* dg = dgate + static_cast<std::size_t>(n) * k;
  const int32_t* chosen = expert + static_cast<std::size_t>(n) * k;
  float gdg = 0.0f;
  for (int j = 0; j < k; ++j) gdg += g[j] * dg[j];
  for (int i = 0; i < E; ++i) dz[i] = from_float<T>(0.0f);
  for (int j = 0; j < k; ++j) dz[chosen[j]] = from_float<T>(g[j] * (dg[j] - gdg));
}

// One thread per expert: its assignments in (n, j) order keep slots 0, 1, ... while below the capacity.
__global__ void moe_assign_kernel(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                                  int capacity) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t kept = 0, routed = 0;
  const std::size_t assignments = static_cast<std::size_t>(N) * k;
  for (std::size_t a = 0; a < assignments; ++a) {
    if (expert[a] != e) continue;
    ++routed;
    slot[a] = kept < capacity ? kept++ : -1;
  }
  counts[e] = kept;
  counts[E + e] = routed;
}

// prob_sum (E) = Σ_n probs[n, e] in double, rows in order; one thread per expert.
__global__ void moe_prob_sums_kernel(double* prob_sum, const float* probs, int N, int E) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  double acc = 0.0;
  for (int n = 0; n < N; ++n) acc += probs[static_cast<std::size_t>(n) * E + e];
  prob_sum[e] = acc;
}

// aux_sum[0] += coef · E · Σ_e f_e · P_e, f_e = routed_e / (N·k), P_e = prob_sum_e / N; one block.
__global__ void moe_aux_loss_sum_kernel(double* aux_sum, const double* prob_sum, const int32_t* counts, int N, int E,
                                        int k, float coef) {
  const double assignments = static_cast<double>(N) * k;
  double acc = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) acc += counts[E + e] / assignments * (prob_sum[e] / N);
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) aux_sum[0] += static_cast<double>(coef) * E * acc;
}

// dlogits[n, i] += p_i · (c_i − Σ_e c_e·p_e), c_e = grad_scale · coef · E · f_e / N; one thread per token.
// (dlogits in either type: added in fp32, stored once)
template <typename T>
__global__ void moe_aux_loss_grad_kernel(T* dlogits, const float* probs, const int32_t* counts, int N, int E, int k,
                                         float coef, float grad_scale) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* p = probs + static_cast<std::size_t>(n) * E;
  T* dz = dlogits + static_cast<std::size_t>(n) * E;
  const double assignments = static_cast<double>(N) * k;
  const double c_scale = static_cast<double>(grad_scale) * (static_cast<double>(coef) * E);  // c_e = c_scale · f_e / N
  double cp = 0.0;
  for (int e = 0; e < E; ++e) cp += c_scale * (counts[E + e] / assignments) / N * p[e];
  for (int i = 0; i < E; ++i) {
    const double c = c_scale * (counts[E + i] / assignments) / N;
    dz[i] = from_float<T>(to_float(dz[i]) + static_cast<float>(p[i] * (c - cp)));
  }
}

// buf[expert, slot] = inp[n] for kept assignments, one thread per element of an assignment's row
// (buf zeroed before). buf and inp of one type: the bits are copied.
template <typename T>
__global__ void moe_dispatch_kernel(T* buf, const T* inp, const int32_t* expert, const int32_t* slot, int N, int k,
                                    int C, int h) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * k * h) return;
  const std::size_t a = i / h;
  const int c = static_cast<int>(i % h);
  if (slot[a] < 0) return;  // dropped
  buf[moe_slot_row(expert[a], slot[a], C, h) + c] = inp[a / k * h + c];
}

// dinp[n] = Σ_j dbuf[expert, slot] over kept assignments in j order; one thread per element of dinp.
template <typename T>
__global__ void moe_dispatch_backward_kernel(T* dinp, const T* dbuf, const int32_t* expert, const int32_t* slot,
                                             int N, int k, int C, int h) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * h) return;
  const std::size_t n = i / h;
  const int c = static_cast<int>(i % h);
  float acc = 0.0f;
  for (int j = 0; j < k; ++j) {
    const std::size_t a = n * k + j;
    if (slot[a] >= 0) acc += to_float(dbuf[moe_slot_row(expert[a], slot[a], C, h) + c]);
  }
  dinp[i] = from_float<T>(acc);
}

// out[n] = Σ_j gate · buf[expert, slot] over kept assignments in j order; one thread per element of out.
template <typename T>
__global__ void moe_combine_kernel(T* out, const T* buf, const float* gate, const int32_t* expert,
                                   const int32_t* slot, int N, int k, int C, int h) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * h) return;
  const std::size_t n = i / h;
  const int c = static_cast<int>(i % h);
  float acc = 0.0f;
  for (int j = 0; j < k; ++j) {
    const std::size_t a = n * k + j;
    if (slot[a] >= 0) acc += gate[a] * to_float(buf[moe_slot_row(expert[a], slot[a], C, h) + c]);
  }
  out[i] = from_float<T>(acc);
}

// dbuf[expert, slot] = gate · dout[n] for kept assignments, one thread per element of an assignment's
// row (dbuf zeroed before).
template <typename T>
__global__ void moe_combine_backward_dbuf_kernel(T* dbuf, const T* dout, const float* gate, const int32_t* expert,
                                                 const int32_t* slot, int N, int k, int C, int h) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<std::size_t>(N) * k * h) return;
  const std::size_t a = i / h;
  const int c = static_cast<int>(i % h);
  if (slot[a] < 0) return;
  dbuf[moe_slot_row(expert[a], slot[a], C, h) + c] = from_float<T>(gate[a] * to_float(dout[a / k * h + c]));
}

// dgate[a] = dout[n] · buf[expert, slot] in double (0 for a dropped assignment); one warp per assignment.
template <typename T>
__global__ void moe_combine_backward_dgate_kernel(float* dgate, const T* dout, const T* buf, const int32_t* expert,
                                                  const int32_t* slot, int N, int k, int C, int h) {
  const std::size_t a = blockIdx.x * static_cast<std::size_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (a >= static_cast<std::size_t>(N) * k) return;  // uniform over the warp
  if (slot[a] < 0) {                                  // uniform over the warp
    if (lane == 0) dgate[a] = 0.0f;
    return;
  }
  const T* y = buf + moe_slot_row(expert[a], slot[a], C, h);
  const T* g = dout + a / k * h;
  double acc = 0.0;
  for (int c = lane; c < h; c += 32) acc += static_cast<double>(to_float(g[c])) * to_float(y[c]);
  acc = warp_sum(acc);
  if (lane == 0) dgate[a] = static_cast<float>(acc);
}

// ---- optimizer -----------------------------------------------------------------------------------
constexpr std::size_t kSumChunk = std::size_t{1} << 14;
template <typename T>
__global__ void sum_squares_partial_kernel(double* partial, const T* x, std::size_t n) {
  const std::size_t begin = blockIdx.x * kSumChunk, end = min(n, begin + kSumChunk);
  double acc = 0.0;
  for (std::size_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const double xi = to_float(x[i]);
    acc += xi * xi;
  }
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_doubles_kernel(double* out, const double* partial, std::size_t n) {
  double acc = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) out[0] = acc;
}

// out[0] += Σ partial (one block, the sum in sum_doubles_kernel's order): a norm's pieces added to their bin
// one after another in stream order, so the bins hold what the CPU's in-order sums hold.
__global__ void add_sum_doubles_kernel(double* out, const double* partial, std::size_t n) {
  double acc = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_reduce<double>(acc);
  if (threadIdx.x == 0) out[0] += acc;
}

// torch.optim.AdamW (non-fused) on element i: decoupled decay, then the bias-corrected step. fp32
// parameters and moments; the gradient in either type.
template <typename TG>
__device__ inline void adamw_element(float* params, const TG* grads, float* m, float* v, std::size_t i, float beta1,
                                     float beta2, float eps, float step_size, float bias2_sqrt, float decay,
                                     float grad_scale) {
  const float g = to_float(grads[i]) * grad_scale;
  const float mi = beta1 * m[i] + (1.0f - beta1) * g;
  const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
  m[i] = mi;
  v[i] = vi;
  params[i] = params[i] * decay - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
}

template <typename TG>
__global__ void adamw_kernel(float* params, const TG* grads, float* m, float* v, std::size_t n, float beta1,
                             float beta2, float eps, float step_size, float bias2_sqrt, float decay,
                             float grad_scale) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  adamw_element(params, grads, m, v, i, beta1, beta2, eps, step_size, bias2_sqrt, decay, grad_scale);
}

// One range of a multi-range AdamW: `first` is the range's first thread (the elements of the ranges
// before it), `begin` its first element in the flat buffers, `decay` = 1 − lr · weight_decay.
struct AdamwRangeDesc {
  std::size_t first;
  std::size_t begin;
  std::size_t n;
  float decay;
};

// AdamW over `count` ranges of the same flat buffers in one launch (total = Σ n threads): thread t finds
// its range by binary search over the ranges' `first` (ascending, ranges[0].first = 0). Replaces one
// launch per tensor (149 for gpt2-124m) with one per optimizer step.
template <typename TG>
__global__ void adamw_ranges_kernel(float* params, const TG* grads, float* m, float* v, const AdamwRangeDesc* ranges,
                                    int count, std::size_t total, float beta1, float beta2, float eps,
                                    float step_size, float bias2_sqrt, float grad_scale) {
  const std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  int lo = 0, hi = count - 1;  // the last range whose first ≤ t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (ranges[mid].first <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const AdamwRangeDesc r = ranges[lo];
  adamw_element(params, grads, m, v, r.begin + (t - r.first), beta1, beta2, eps, step_size, bias2_sqrt, r.decay,
                grad_scale);
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
constexpr int kAttMaxHeadDim = 128;
constexpr int kAttDimsPerLane = kAttMaxHeadDim / 32;

__host__ __device__ inline int att_stride(int d) { return d | 1; }

// The dK/dV kernels' shared-memory rows (K, V, the query row and its output gradient): two lanes per
// key, lane L (of a warp's first 16) reading the first half of the head dimension and lane L + 16 the
// second half of the same row. The first half (ceil(d/2) values) sits at 0, the second at
// dkv_half_offset(d) ≡ 16 (mod 32), and rows are dkv_smem_stride(d) apart, an odd number: the 16 keys of a
// warp fall in 16 different banks and the second-half lanes in the 16 others, so a warp's shared-memory
// reads are free of bank conflicts at every head dimension (with one offset, d = 64 and 128 put lanes L
// and L + 16 in the same bank: two-way conflicts on every read of the loop).
__host__ __device__ inline int dkv_half_offset(int d) {
  const int half = (d + 1) / 2;
  return half + (16 - half % 32 + 32) % 32;
}
__host__ __device__ inline int dkv_row(int d) { return dkv_half_offset(d) + d / 2; }  // a row's floats
__host__ __device__ inline int dkv_smem_stride(int d) { return dkv_row(d) | 1; }
// Where value k of a row sits: k itself (row kernels, half_offset 0) or in the split layout above.
__host__ __device__ inline int kv_col(int k, int d, int half_offset) {
  const int half = (d + 1) / 2;
  return half_offset == 0 || k < half ? k : half_offset + (k - half);
}

// Rows k0..k0+keys−1 of one head's K and V (zeros beyond S) into shared memory as fp32, by every thread of
// the block: row i of K at k + i·row_stride (V alike), value c of a row at kv_col(c, d, half_offset).
template <typename T>
__device__ void load_kv_tile(float* Ks, float* Vs, const T* k, const T* v, int k0, int keys, int S,
                             std::size_t row_stride, int d, int stride, int half_offset = 0) {
  for (int i = threadIdx.x; i < keys * d; i += blockDim.x) {
    const int j = i / d, c = i % d, key = k0 + j;
    float kv = 0.0f, vv = 0.0f;  // keys beyond S: zeros, never read past the tensor
    if (key < S) {
      const std::size_t row = static_cast<std::size_t>(key) * row_stride;
      kv = to_float(k[row + c]);
      vv = to_float(v[row + c]);
    }
    Ks[j * stride + kv_col(c, d, half_offset)] = kv;
    Vs[j * stride + kv_col(c, d, half_offset)] = vv;
  }
}

// Grouped-query attention (SPEC 2.5): a qkv row of C + 2·KvH·d values, [Q (H heads) | K (KvH heads) |
// V (KvH heads)], query head h reading key/value head h / (H / KvH). With KvH = H it is the multi-head
// layout (B, S, 3C). Offsets of a sample's first row.
struct QkvLayout {
  int d, group;           // head dimension, query heads per key/value head
  std::size_t row;        // values per token: C + 2·KvH·d
  std::size_t k, v;       // K and V of key/value head 0 within a row: C and C + KvH·d
  __host__ __device__ QkvLayout(int C, int H, int KvH)
      : d(C / H), group(H / KvH), row(static_cast<std::size_t>(C) + 2 * static_cast<std::size_t>(KvH) * (C / H)),
        k(C), v(static_cast<std::size_t>(C) + static_cast<std::size_t>(KvH) * (C / H)) {}
};

// out (B, S, C); lse (B, H, S) = max + log Σ exp of each query row's scaled scores. qkv (QkvLayout, KvH
// key/value heads) and out of one type; shared memory, scores and accumulators fp32. Grid
// ((S + kAttRows − 1) / kAttRows, B·H).
template <typename T>
__global__ void attention_forward_kernel(T* out, float* lse, const T* qkv, int S, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const QkvLayout L(C, H, KvH);
  const int d = L.d, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* base = qkv + static_cast<std::size_t>(b) * S * L.row;
  const T* qb = base + h * d;
  const T* kb = base + L.k + static_cast<std::size_t>(h / L.group) * d;
  const T* vb = base + L.v + static_cast<std::size_t>(h / L.group) * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < S ? to_float(qb[static_cast<std::size_t>(t) * L.row + i % d]) : 0.0f;
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
    load_kv_tile(Ks, Vs, kb, vb, k0, kAttKeys, S, L.row, d, stride);
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
    T* ot = out + (static_cast<std::size_t>(b) * S + t) * C + h * d;
#pragma unroll
    for (int k = 0; k < kAttDimsPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim < d) ot[dim] = from_float<T>(o[r][k] / l[r]);
    }
    if (lane == 0) lse[static_cast<std::size_t>(bh) * S + t] = m[r] + logf(l[r]);
  }
}

// D (B, H, S) = Σ_dims dout · out per query row (= Σ_keys P · dP): one warp per row; dout and out each
// in either type, D fp32.
template <typename TA, typename TB>
__global__ void attention_backward_dot_kernel(float* D, const TA* dout, const TB* out, int B, int S, int C, int H) {
  const std::size_t w = blockIdx.x * static_cast<std::size_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (w >= static_cast<std::size_t>(B) * H * S) return;
  const int d = C / H, t = static_cast<int>(w % S), bh = static_cast<int>(w / S), b = bh / H, h = bh % H;
  const std::size_t off = (static_cast<std::size_t>(b) * S + t) * C + h * d;
  float acc = 0.0f;
  for (int k = lane; k < d; k += 32) acc += to_float(dout[off + k]) * to_float(out[off + k]);
  acc = warp_sum(acc);
  if (lane == 0) D[w] = acc;
}

// dQ of each query row: Σ_keys P·(dP − D)·scale · k. dqkv, dout and qkv of one type; the grid of the
// forward.
template <typename T>
__global__ void attention_backward_dq_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* D,
                                             int S, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const QkvLayout L(C, H, KvH);
  const int d = L.d, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  float* dOs = Qs + kAttRows * d;      // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* base = qkv + static_cast<std::size_t>(b) * S * L.row;
  const T* qb = base + h * d;
  const T* kb = base + L.k + static_cast<std::size_t>(h / L.group) * d;
  const T* vb = base + L.v + static_cast<std::size_t>(h / L.group) * d;
  const T* dbase = dout + static_cast<std::size_t>(b) * S * C + h * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < S ? to_float(qb[static_cast<std::size_t>(t) * L.row + i % d]) : 0.0f;
    dOs[i] = t < S ? to_float(dbase[static_cast<std::size_t>(t) * C + i % d]) : 0.0f;
  }
  float dq[kAttRowsPerWarp][kAttDimsPerLane] = {};
  const int last_row = min(S - 1, q0 + kAttRows - 1);
  for (int k0 = 0; k0 <= last_row; k0 += kAttKeys) {
    __syncthreads();
    load_kv_tile(Ks, Vs, kb, vb, k0, kAttKeys, S, L.row, d, stride);
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
    T* dqt = dqkv + (static_cast<std::size_t>(b) * S + t) * L.row + h * d;
#pragma unroll
    for (int k = 0; k < kAttDimsPerLane; ++k) {
      const int dim = lane + 32 * k;
      if (dim < d) dqt[dim] = from_float<T>(dq[r][k]);
    }
  }
}

// dK and dV of a tile of kDkvKeys keys: each warp owns 16 keys, two lanes per key (lane j and j + 16
// each hold half of the head dimension of key j's dK and dV rows in registers). The block walks the
// query rows that can see its keys, one row at a time: the row's q and dout in shared memory, the
// score and dP of each key as two half dot products joined by one shuffle. kHalf, the registers a lane
// keeps for each of dK and dV, is the kernel's head-dimension class: kDkvHalfDim (d ≤ 128), or
// kDkvHalfDimSmall for d ≤ 64 (GPT-2's heads), which needs half the registers, so more warps fit on
// an SM (dkv_half_dim_class picks it). With grouped key/value heads a block owns a key/value head and
// walks the rows of each of its query heads in turn (grid ((S + kDkvKeys − 1) / kDkvKeys, B·KvH)), so a
// key's dK and dV sum over its query heads in registers and are stored once.
constexpr int kDkvKeysPerWarp = 16;
constexpr int kDkvWarps = 4;
constexpr int kDkvKeys = kDkvKeysPerWarp * kDkvWarps;
constexpr int kDkvHalfDim = kAttMaxHeadDim / 2;
constexpr int kDkvHalfDimSmall = kDkvHalfDim / 2;
__host__ __device__ inline int dkv_half_dim_class(int d) {
  return d <= 2 * kDkvHalfDimSmall ? kDkvHalfDimSmall : kDkvHalfDim;
}

template <typename T, int kHalf = kDkvHalfDim>
__global__ void attention_backward_dkv_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* D,
                                              int S, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const QkvLayout L(C, H, KvH);
  const int d = L.d, stride = dkv_smem_stride(d), half = (d + 1) / 2, half_offset = dkv_half_offset(d);
  float* Ks = smem;  // (kDkvKeys, stride), rows in the split layout (dkv_half_offset)
  float* Vs = Ks + kDkvKeys * stride;
  float* q = Vs + kDkvKeys * stride;  // (dkv_row(d)): the query row, split alike
  float* g = q + dkv_row(d);          // (dkv_row(d)): its output gradient
  const int bk = blockIdx.y, b = bk / KvH, hk = bk % KvH, k0 = blockIdx.x * kDkvKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = warp * kDkvKeysPerWarp + lane % kDkvKeysPerWarp, key = k0 + j;  // this lane's key
  const bool upper = lane >= kDkvKeysPerWarp;                                  // its half of the dimensions:
  const int lo = upper ? half : 0, hi = upper ? d : half, at = upper ? half_offset : 0;  // [lo, hi), at `at`
  const int warp_first_key = k0 + warp * kDkvKeysPerWarp;
  const T* base = qkv + static_cast<std::size_t>(b) * S * L.row;
  const std::size_t k_col = L.k + static_cast<std::size_t>(hk) * d, v_col = L.v + static_cast<std::size_t>(hk) * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  load_kv_tile(Ks, Vs, base + k_col, base + v_col, k0, kDkvKeys, S, L.row, d, stride, half_offset);
  const float* kr = Ks + j * stride + at;
  const float* vr = Vs + j * stride + at;
  const float* qh = q + at;
  const float* gh = g + at;
  const int n = hi - lo;
  float dk[kHalf], dv[kHalf];
#pragma unroll
  for (int k = 0; k < kHalf; ++k) dk[k] = dv[k] = 0.0f;
  for (int h = hk * L.group; h < (hk + 1) * L.group; ++h) {  // the query heads of this key/value head, in order
    const T* qb = base + h * d;
    const T* dbase = dout + static_cast<std::size_t>(b) * S * C + h * d;
    const std::size_t stats = (static_cast<std::size_t>(b) * H + h) * S;
    for (int t = k0; t < S; ++t) {
      __syncthreads();  // the tile is loaded; the previous row is consumed
      for (int k = threadIdx.x; k < d; k += blockDim.x) {
        q[kv_col(k, d, half_offset)] = to_float(qb[static_cast<std::size_t>(t) * L.row + k]);
        g[kv_col(k, d, half_offset)] = to_float(dbase[static_cast<std::size_t>(t) * C + k]);
      }
      __syncthreads();
      if (t < warp_first_key) continue;  // none of this warp's keys is visible from row t (uniform)
      float s = 0.0f, dp = 0.0f;
      for (int k = 0; k < n; ++k) {
        s += qh[k] * kr[k];
        dp += gh[k] * vr[k];
      }
      s += __shfl_xor_sync(kFull, s, kDkvKeysPerWarp);  // the other half of the head dimension
      dp += __shfl_xor_sync(kFull, dp, kDkvKeysPerWarp);
      if (key > t) continue;  // masked (also keys beyond S, since t < S)
      const float p = expf(s * scale - lse[stats + t]);
      const float ds = p * (dp - D[stats + t]) * scale;
#pragma unroll
      for (int k = 0; k < kHalf; ++k) {
        if (k < n) {
          dv[k] += p * gh[k];
          dk[k] += ds * qh[k];
        }
      }
    }
  }
  if (key >= S) return;
  T* row = dqkv + (static_cast<std::size_t>(b) * S + key) * L.row;
#pragma unroll
  for (int k = 0; k < kHalf; ++k) {
    if (lo + k < hi) {
      row[k_col + lo + k] = from_float<T>(dk[k]);
      row[v_col + lo + k] = from_float<T>(dv[k]);
    }
  }
}

// ---- context parallelism: attention by position over a block of keys ------------------------------
// The fused attention's kernels generalised (kernels/backend.h, "context parallelism"): query rows
// q_stride floats apart and key-value rows kv_stride apart (a qkv buffer or a packed key-value one), the
// mask from the tokens' positions (key j visible to query i when pos_k[j] ≤ pos_q[i]) instead of their
// indices, a query that sees no key of the block (out 0, lse −inf), and gradients that accumulate. The
// tiles and warps are the fused kernels' (attention_row_smem, attention_dkv_smem). Positions need not be
// sorted, so no tile is skipped by its index; a warp skips a tile (or a query row) in which none of its
// keys is visible. Types: TI of the inputs (q, k, v, dout), TO of the outputs (out; dq; dk and dv), each
// fp32 or bf16, so that bf16 queries and keys can accumulate into fp32 gradients; the gradients' rows
// are dq_stride and dkv_stride apart (q_stride and kv_stride in the Backend's call, other strides when
// the backend stages an input in a packed fp32 copy).

// out (B, Sq, C) overwritten; lse (B, H, Sq) = max + log Σ exp of each query row's visible scaled scores.
// Grid ((Sq + kAttRows − 1) / kAttRows, B·H), kAttWarps warps, attention_row_smem(d, false). k and v
// hold KvH heads of d values; query head h reads head h / (H / KvH) of them.
template <typename TO, typename TI>
__global__ void attention_block_forward_kernel(TO* out, float* lse, const TI* q, const TI* k, const TI* v,
                                               int q_stride, int kv_stride, const int32_t* pos_q,
                                               const int32_t* pos_k, int Sq, int Sk, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const int d = C / H, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hk = h / (H / KvH);
  const TI* qb = q + static_cast<std::size_t>(b) * Sq * q_stride + h * d;  // sample b, head h
  const TI* kb = k + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const TI* vb = v + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < Sq ? to_float(qb[static_cast<std::size_t>(t) * q_stride + i % d]) : 0.0f;
  }
  float m[kAttRowsPerWarp], l[kAttRowsPerWarp], o[kAttRowsPerWarp][kAttDimsPerLane];
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kAttDimsPerLane; ++c) o[r][c] = 0.0f;
  }
  for (int k0 = 0; k0 < Sk; k0 += kAttKeys) {
    __syncthreads();  // the previous tile is consumed (and Q is loaded)
    load_kv_tile(Ks, Vs, kb, vb, k0, kAttKeys, Sk, kv_stride, d, stride);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kAttRowsPerWarp; ++r) {
      const int row = warp * kAttRowsPerWarp + r, t = q0 + row, key = k0 + lane;
      if (t >= Sq) continue;  // uniform over the warp
      const bool visible = key < Sk && pos_k[key] <= pos_q[t];
      if (warp_max(visible ? 1.0f : 0.0f) == 0.0f) continue;  // no key of the tile visible from row t (uniform)
      float s = -INFINITY;
      if (visible) {
        const float* qr = Qs + row * d;
        const float* kr = Ks + lane * stride;
        float dot = 0.0f;
        for (int c = 0; c < d; ++c) dot += qr[c] * kr[c];
        s = dot * scale;
      }
      const float m_new = fmaxf(m[r], warp_max(s));  // finite: a key of this tile is visible
      const float p = visible ? expf(s - m_new) : 0.0f;
      const float alpha = expf(m[r] - m_new);  // 0 while nothing was visible
      l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
      for (int c = 0; c < kAttDimsPerLane; ++c) o[r][c] *= alpha;
      for (int j = 0; j < kAttKeys; ++j) {
        const float pj = __shfl_sync(kFull, p, j);
#pragma unroll
        for (int c = 0; c < kAttDimsPerLane; ++c) {
          const int dim = lane + 32 * c;
          if (dim < d) o[r][c] += pj * Vs[j * stride + dim];
        }
      }
      m[r] = m_new;
    }
  }
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    const int t = q0 + warp * kAttRowsPerWarp + r;
    if (t >= Sq) continue;
    const bool any = l[r] > 0.0f;  // else the row saw no key: out 0, lse −inf
    TO* ot = out + (static_cast<std::size_t>(b) * Sq + t) * C + h * d;
#pragma unroll
    for (int c = 0; c < kAttDimsPerLane; ++c) {
      const int dim = lane + 32 * c;
      if (dim < d) ot[dim] = from_float<TO>(any ? o[r][c] / l[r] : 0.0f);
    }
    if (lane == 0) lse[static_cast<std::size_t>(bh) * Sq + t] = any ? m[r] + logf(l[r]) : -INFINITY;
  }
}

// Merges (out_b, lse_b) into (out, lse): one warp per (sample, query row, head), the weights in double.
// A side at −inf contributes nothing (the other side's values are taken as they are). out and out_b each
// in either type; the merged values are computed in fp32 and stored once.
template <typename TO, typename TB>
__global__ void attention_merge_kernel(TO* out, float* lse, const TB* out_b, const float* lse_b, int B, int Sq, int C,
                                       int H) {
  const std::size_t w = blockIdx.x * static_cast<std::size_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (w >= static_cast<std::size_t>(B) * Sq * H) return;  // uniform over the warp
  const int d = C / H, h = static_cast<int>(w % H);
  const std::size_t n = w / H, b = n / Sq, t = n % Sq;  // row n = b·Sq + t
  const std::size_t s = (b * H + h) * Sq + t, o = n * C + static_cast<std::size_t>(h) * d;
  const double la = lse[s], lb = lse_b[s];
  __syncwarp();  // every lane has read lse before lane 0 writes it
  if (lb == -INFINITY) return;  // the block saw nothing: out and lse stay (also when both are −inf)
  if (la == -INFINITY) {        // nothing so far: the block's result as it is
    for (int c = lane; c < d; c += 32) out[o + c] = from_float<TO>(to_float(out_b[o + c]));
    if (lane == 0) lse[s] = lse_b[s];
    return;
  }
  const double m = fmax(la, lb), wa = exp(la - m), wb = exp(lb - m), sum = wa + wb;
  const float ca = static_cast<float>(wa / sum), cb = static_cast<float>(wb / sum);
  for (int c = lane; c < d; c += 32)
    out[o + c] = from_float<TO>(ca * to_float(out[o + c]) + cb * to_float(out_b[o + c]));
  if (lane == 0) lse[s] = static_cast<float>(m + log(sum));
}

// dq += Σ_visible keys P·(dP − delta)·k / √d of each query row, with P = exp(q·k/√d − lse) (dq rows
// dq_stride apart). The grid and shared memory of attention_block_forward_kernel, with
// attention_row_smem(d, true).
template <typename TO, typename TI>
__global__ void attention_block_backward_dq_kernel(TO* dq, int dq_stride, const TI* dout, const float* lse,
                                                   const float* delta, const TI* q, const TI* k, const TI* v,
                                                   int q_stride, int kv_stride, const int32_t* pos_q,
                                                   const int32_t* pos_k, int Sq, int Sk, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const int d = C / H, stride = att_stride(d);
  float* Ks = smem;
  float* Vs = Ks + kAttKeys * stride;
  float* Qs = Vs + kAttKeys * stride;  // (kAttRows, d)
  float* dOs = Qs + kAttRows * d;      // (kAttRows, d)
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kAttRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hk = h / (H / KvH);
  const TI* qb = q + static_cast<std::size_t>(b) * Sq * q_stride + h * d;
  const TI* kb = k + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const TI* vb = v + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const TI* gb = dout + static_cast<std::size_t>(b) * Sq * C + h * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < kAttRows * d; i += blockDim.x) {
    const int t = q0 + i / d;
    Qs[i] = t < Sq ? to_float(qb[static_cast<std::size_t>(t) * q_stride + i % d]) : 0.0f;
    dOs[i] = t < Sq ? to_float(gb[static_cast<std::size_t>(t) * C + i % d]) : 0.0f;
  }
  float acc[kAttRowsPerWarp][kAttDimsPerLane] = {};
  for (int k0 = 0; k0 < Sk; k0 += kAttKeys) {
    __syncthreads();
    load_kv_tile(Ks, Vs, kb, vb, k0, kAttKeys, Sk, kv_stride, d, stride);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kAttRowsPerWarp; ++r) {
      const int row = warp * kAttRowsPerWarp + r, t = q0 + row, key = k0 + lane;
      if (t >= Sq) continue;  // uniform over the warp
      const std::size_t stat = static_cast<std::size_t>(bh) * Sq + t;
      const float L = lse[stat];
      // L = −inf: the row sees no key in any block (and none here)
      const bool visible = key < Sk && pos_k[key] <= pos_q[t] && L > -INFINITY;
      if (warp_max(visible ? 1.0f : 0.0f) == 0.0f) continue;  // uniform
      float ds = 0.0f;
      if (visible) {
        const float* qr = Qs + row * d;
        const float* g = dOs + row * d;
        const float* kr = Ks + lane * stride;
        const float* vr = Vs + lane * stride;
        float s = 0.0f, dp = 0.0f;
        for (int c = 0; c < d; ++c) {
          s += qr[c] * kr[c];
          dp += g[c] * vr[c];
        }
        const float p = expf(s * scale - L);
        ds = p * (dp - delta[stat]) * scale;
      }
      for (int j = 0; j < kAttKeys; ++j) {
        const float dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int c = 0; c < kAttDimsPerLane; ++c) {
          const int dim = lane + 32 * c;
          if (dim < d) acc[r][c] += dsj * Ks[j * stride + dim];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kAttRowsPerWarp; ++r) {
    const int t = q0 + warp * kAttRowsPerWarp + r;
    if (t >= Sq) continue;
    TO* dqt = dq + (static_cast<std::size_t>(b) * Sq + t) * dq_stride + h * d;
#pragma unroll
    for (int c = 0; c < kAttDimsPerLane; ++c) {
      const int dim = lane + 32 * c;
      if (dim < d) dqt[dim] = from_float<TO>(to_float(dqt[dim]) + acc[r][c]);
    }
  }
}

// dk += Σ_queries P·(dP − delta)·q / √d and dv += Σ_queries P·dout of a tile of kDkvKeys keys, the layout
// of attention_backward_dkv_kernel (two lanes per key, each half of the head dimension); the block walks
// every query row of each query head of its key/value head, since any may see its keys (dk and dv rows
// dkv_stride apart). Grid ((Sk + kDkvKeys − 1) / kDkvKeys, B·KvH), kDkvWarps warps, attention_dkv_smem(d);
// kHalf as there.
template <typename TO, typename TI, int kHalf = kDkvHalfDim>
__global__ void attention_block_backward_dkv_kernel(TO* dk, TO* dv, int dkv_stride, const TI* dout, const float* lse,
                                                    const float* delta, const TI* q, const TI* k, const TI* v,
                                                    int q_stride, int kv_stride, const int32_t* pos_q,
                                                    const int32_t* pos_k, int Sq, int Sk, int C, int H, int KvH) {
  PB_DYNAMIC_SHARED(smem);
  const int d = C / H, stride = dkv_smem_stride(d), half = (d + 1) / 2, half_offset = dkv_half_offset(d);
  float* Ks = smem;  // (kDkvKeys, stride), rows in the split layout (dkv_half_offset)
  float* Vs = Ks + kDkvKeys * stride;
  float* qs = Vs + kDkvKeys * stride;  // (dkv_row(d)): the query row, split alike
  float* gs = qs + dkv_row(d);         // (dkv_row(d)): its output gradient
  const int bk = blockIdx.y, b = bk / KvH, hk = bk % KvH, group = H / KvH, k0 = blockIdx.x * kDkvKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = warp * kDkvKeysPerWarp + lane % kDkvKeysPerWarp, key = k0 + j;  // this lane's key
  const bool upper = lane >= kDkvKeysPerWarp;                                  // its half of the dimensions:
  const int lo = upper ? half : 0, hi = upper ? d : half, at = upper ? half_offset : 0;  // [lo, hi), at `at`
  const int n = hi - lo;
  const TI* kb = k + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const TI* vb = v + static_cast<std::size_t>(b) * Sk * kv_stride + hk * d;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  load_kv_tile(Ks, Vs, kb, vb, k0, kDkvKeys, Sk, kv_stride, d, stride, half_offset);
  const float* kr = Ks + j * stride + at;
  const float* vr = Vs + j * stride + at;
  const float* qh = qs + at;
  const float* gh = gs + at;
  const int32_t my_pos = key < Sk ? pos_k[key] : 0;
  float dk_acc[kHalf], dv_acc[kHalf];
#pragma unroll
  for (int c = 0; c < kHalf; ++c) dk_acc[c] = dv_acc[c] = 0.0f;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {  // the query heads of this key/value head, in order
    const TI* qb = q + static_cast<std::size_t>(b) * Sq * q_stride + h * d;
    const TI* gb = dout + static_cast<std::size_t>(b) * Sq * C + h * d;
    const std::size_t stats = (static_cast<std::size_t>(b) * H + h) * Sq;
    for (int t = 0; t < Sq; ++t) {
      __syncthreads();  // the tile is loaded; the previous row is consumed
      for (int c = threadIdx.x; c < d; c += blockDim.x) {
        qs[kv_col(c, d, half_offset)] = to_float(qb[static_cast<std::size_t>(t) * q_stride + c]);
        gs[kv_col(c, d, half_offset)] = to_float(gb[static_cast<std::size_t>(t) * C + c]);
      }
      __syncthreads();
      const float L = lse[stats + t];
      const bool visible = key < Sk && my_pos <= pos_q[t] && L > -INFINITY;
      if (warp_max(visible ? 1.0f : 0.0f) == 0.0f) continue;  // none of this warp's keys is visible (uniform)
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < n; ++c) {
        s += qh[c] * kr[c];
        dp += gh[c] * vr[c];
      }
      s += __shfl_xor_sync(kFull, s, kDkvKeysPerWarp);  // the other half of the head dimension
      dp += __shfl_xor_sync(kFull, dp, kDkvKeysPerWarp);
      if (!visible) continue;
      const float p = expf(s * scale - L);
      const float ds = p * (dp - delta[stats + t]) * scale;
#pragma unroll
      for (int c = 0; c < kHalf; ++c) {
        if (c < n) {
          dv_acc[c] += p * gh[c];
          dk_acc[c] += ds * qh[c];
        }
      }
    }
  }
  if (key >= Sk) return;
  const std::size_t row = (static_cast<std::size_t>(b) * Sk + key) * dkv_stride + hk * d;
#pragma unroll
  for (int c = 0; c < kHalf; ++c) {
    if (lo + c < hi) {
      dk[row + lo + c] = from_float<TO>(to_float(dk[row + lo + c]) + dk_acc[c]);
      dv[row + lo + c] = from_float<TO>(to_float(dv[row + lo + c]) + dv_acc[c]);
    }
  }
}

// Dynamic shared memory of the attention kernels (the fused and the block ones) for head dimension d.
inline std::size_t attention_row_smem(int d, bool with_dout) {
  return sizeof(float) * (2 * kAttKeys * att_stride(d) + (with_dout ? 2 : 1) * kAttRows * d);
}
inline std::size_t attention_dkv_smem(int d) {
  return sizeof(float) * (2 * kDkvKeys * dkv_smem_stride(d) + 2 * dkv_row(d));
}

}  // namespace kernels
}  // namespace pb
