// The Backend's kernels other than the matrix product, timed at the shapes one training step of a model
// preset runs them (common/model.cpp, micro-batch 4, no model parallelism): per block, a LayerNorm, the
// attention, the GELU, a residual add and the residual add fused with the second LayerNorm, forward and
// backward (two LayerNorms backward); once per step, the embedding,
// the fused cross-entropy, and the optimizer's pass over the parameters (gradient zeroing, the
// gradient norm, AdamW, and with bf16 the rounding of the master weights into the parameters). The
// llama presets (SPEC 2.5) add the kernels only their block has: RMSNorm (and with the residual add),
// rotary positions, SwiGLU and the grouped-query attention.
//
// Each benchmark follows gemm.cpp: its tensors come from the backend (workspace), filled with a fixed
// pseudo-random pattern in [−1, 1); one untimed call is checked where a check is cheap (a guard against
// a kernel that did not run or ran on other data, not a precision test: tests/ do that); then each
// call is timed from the call to the end of Backend::synchronize (manual timing). Activations,
// parameters and their gradients are in the benchmark's dtype; LayerNorm and softmax statistics,
// AdamW's moments and the master weights are fp32, as training keeps them (SPEC 2.3).
//
// Cost per call: attention in FLOPs as the model-FLOPs convention counts them (SPEC 6: the full T×T
// products, causal mask notwithstanding); every other kernel in bytes, each tensor read or written
// counted once at its dtype's size (e = 4 fp32, 2 bf16; statistics 4), a tensor read and written
// (accumulated) counted twice. The formula is at each kernel's registration (kernel_cases).
#include "bench/micro/kernels.h"
#include "bench/micro/kernel_costs.h"
#include "bench/micro/registry.h"
#include "bench/micro/tensors.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/options.h"
#include "common/timer.h"

namespace pb {
namespace {

constexpr int kMicroBatch = 4;
const char* const kModelPresets[] = {"small", "gpt2-124m", "llama-tiny", "llama3-1b"};

// A check passes when |got − want| ≤ tolerance · scale, the scale being the magnitude of the terms the
// value is made of: room for fp32 arithmetic in any order and the backends' fast exp and tanh, and for
// bf16 the rounding of the output (2^-9).
constexpr double kFp32Tolerance = 1e-3;
constexpr double kBf16Tolerance = 2e-2;

// AdamW's hyperparameters as the apps use them (common/model.cpp, adamw_flat_range), weight decay on
// every element (the apps decay the matrices only: the same arithmetic).
constexpr float kLearningRate = 3e-4f, kBeta1 = 0.9f, kBeta2 = 0.95f, kEps = 1e-8f, kWeightDecay = 0.1f;

// One preset's shapes at micro-batch B, and the benchmark's dtype.
struct KernelShape {
  std::string preset;
  DType dtype = DType::f32;
  int B = 0, T = 0, C = 0, heads = 0, V = 0, F = 0;  // micro-batch, sequence, hidden, heads, vocabulary, MLP width
  int kv_heads = 0;                                    // key/value heads (= heads for the gpt block)
  bool llama = false;                                  // the block of SPEC 2.5
  double rope_theta = 10000.0;
  int Vp = 0;  // the vocabulary as the model stores it (padded: ModelConfig::padded_vocab)
  std::size_t params = 0;                              // the preset's parameter count
  int N() const { return B * T; }                      // rows (tokens) of the micro-batch
  int d() const { return C / heads; }                  // head dimension
  int W() const { return C + 2 * kv_heads * d(); }     // a token's qkv values: [Q | K | V]
  double e() const { return static_cast<double>(dtype_bytes(dtype)); }  // bytes per element
  double tolerance() const { return dtype == DType::f32 ? kFp32Tolerance : kBf16Tolerance; }
};

// Backend memory that is not a tensor of the benchmark's dtype (fp32 statistics and moments, int32
// tokens, the loss's double), freed however the benchmark ends.
template <typename T>
class BackendArray {
 public:
  BackendArray(Backend& backend, std::size_t count)
      : backend_(backend), ptr_(static_cast<T*>(backend.alloc(count * sizeof(T), MemCategory::workspace))) {}
  ~BackendArray() { backend_.free(static_cast<void*>(ptr_)); }
  BackendArray(const BackendArray&) = delete;
  BackendArray& operator=(const BackendArray&) = delete;
  T* get() const { return ptr_; }
  void upload(const std::vector<T>& values) { backend_.upload(ptr_, values.data(), values.size() * sizeof(T)); }
  T download(std::size_t i) const {  // element i
    T value;
    backend_.download(&value, ptr_ + i, sizeof(T));
    return value;
  }

 private:
  Backend& backend_;
  T* ptr_;
};

// The values a tensor of `dtype` holds after uploading `values` (rounded to bf16 as BackendTensor::upload
// rounds), so that the references are computed on what the kernel reads.
std::vector<float> stored(std::vector<float> values, DType dtype) {
  if (dtype == DType::bf16) {
    for (float& x : values) x = cpu::bf16_to_float(cpu::float_to_bf16(x));
  }
  return values;
}

// n token ids in [0, V), pseudo-random (tokens or targets).
std::vector<int32_t> token_ids(std::size_t n, int V, uint64_t seed) {
  std::vector<int32_t> ids(n);
  const std::vector<float> u = pattern(n, seed);
  for (std::size_t i = 0; i < n; ++i) ids[i] = std::min(V - 1, static_cast<int>((u[i] + 1.0f) * 0.5f * V));
  return ids;
}

// Element i of a tensor (widened), for checks.
float element(Backend& backend, ConstTensorPtr tensor, std::size_t i) {
  return download_fp32(backend, tensor + static_cast<std::ptrdiff_t>(i), 1)[0];
}

// "" when got is within tolerance · scale of want; else the mismatch (also for NaN).
std::string compare(const std::string& what, double got, double want, double scale, double tolerance) {
  if (std::fabs(got - want) <= tolerance * scale) return "";
  return "check failed: " + what + " = " + std::to_string(got) + ", expected " + std::to_string(want);
}

// gelu_tanh and its derivative in double, the reference of the GELU checks.
double gelu_reference(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}
double gelu_derivative_reference(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  const double th = std::tanh(k * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

// The timed loop: `call` once per iteration, from the call to the end of Backend::synchronize.
template <typename Call>
void time_calls(benchmark::State& state, Backend& backend, Call&& call) {
  for (auto _ : state) {
    const double start = wall_time_s();
    call();
    backend.synchronize();
    state.SetIterationTime(wall_time_s() - start);
  }
}

// ---- the benchmarks: each sets up, warms up, checks and times; returns the failed check or "" --------

// The attention of a preset: multi-head (gpt), grouped-query with kv_heads key/value heads (llama); qkv
// (B, T, W) holds [Q | K | V].
std::string attention_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int B = s.B, T = s.T, C = s.C, NH = s.heads, KV = s.kv_heads, d = s.d(), group = NH / KV;
  const std::vector<float> host_qkv = stored(pattern(std::size_t(B) * T * s.W(), 1), s.dtype);
  BackendTensor qkv(backend, host_qkv.size(), s.dtype);           // (B, T, W)
  BackendTensor out(backend, std::size_t(B) * T * C, s.dtype);    // (B, T, C)
  BackendArray<float> saved(backend, backend.attention_saved_floats(B, T, NH));
  qkv.upload(host_qkv);

  backend.attention_gqa_forward(out.get(), saved.get(), qkv.get(), B, T, C, NH, KV);
  backend.synchronize();
  // The first token sees only itself: query head h's output is the value row of its key/value head.
  const std::vector<float> out_row0 = download_fp32(backend, out.get(), C);
  for (int j = 0; j < C; ++j) {
    const float v = host_qkv[C + KV * d + (j / d) / group * d + j % d];
    const std::string error = compare("out[0, 0, " + std::to_string(j) + "]", out_row0[j], v, 1.0, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend,
             [&] { backend.attention_gqa_forward(out.get(), saved.get(), qkv.get(), B, T, C, NH, KV); });
  return "";
}

std::string attention_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int B = s.B, T = s.T, C = s.C, NH = s.heads, KV = s.kv_heads, d = s.d(), group = NH / KV;
  const std::size_t W = s.W();
  const std::vector<float> host_qkv = stored(pattern(std::size_t(B) * T * W, 1), s.dtype);
  const std::vector<float> host_dout = stored(pattern(std::size_t(B) * T * C, 2), s.dtype);
  BackendTensor qkv(backend, host_qkv.size(), s.dtype);            // (B, T, W)
  BackendTensor out(backend, std::size_t(B) * T * C, s.dtype);     // (B, T, C)
  BackendTensor dout(backend, host_dout.size(), s.dtype);          // (B, T, C)
  BackendTensor dqkv(backend, host_qkv.size(), s.dtype);           // (B, T, W)
  BackendArray<float> saved(backend, backend.attention_saved_floats(B, T, NH));
  BackendArray<float> scratch(backend, backend.attention_scratch_floats(B, T, NH));
  qkv.upload(host_qkv);
  dout.upload(host_dout);
  dqkv.upload(pattern(host_qkv.size(), 3));  // not zeros: a backward that writes nothing is seen
  backend.attention_gqa_forward(out.get(), saved.get(), qkv.get(), B, T, C, NH, KV);  // what backward reads

  backend.attention_gqa_backward(dqkv.get(), scratch.get(), dout.get(), out.get(), qkv.get(), saved.get(), B, T, C,
                                 NH, KV);
  backend.synchronize();
  // Sample 0. Query 0 sees only key 0 (probability 1, whose softmax gradient is 0), so dq[0] = 0; key
  // T−1 is seen only by query T−1, so dv[T−1] of a key/value head = Σ over its query heads h of
  // P_h[T−1, T−1] · dout[T−1] of head h, with P from the host.
  const std::vector<float> dqkv_first = download_fp32(backend, dqkv.get(), C);
  const std::vector<float> dqkv_last = download_fp32(backend, dqkv.get() + static_cast<std::ptrdiff_t>((T - 1) * W), W);
  const float* q_last = host_qkv.data() + (T - 1) * W;
  std::vector<double> dv_last(std::size_t(KV) * d, 0.0);
  for (int h = 0; h < NH; ++h) {
    std::vector<double> score(T);
    for (int t = 0; t < T; ++t) {
      const float* k = host_qkv.data() + t * W + C + (h / group) * d;
      double dot = 0.0;
      for (int i = 0; i < d; ++i) dot += double(q_last[h * d + i]) * k[i];
      score[t] = dot / std::sqrt(double(d));
    }
    const double max_score = *std::max_element(score.begin(), score.end());
    double sum = 0.0;
    for (double x : score) sum += std::exp(x - max_score);
    const double p_last = std::exp(score[T - 1] - max_score) / sum;
    for (int i = 0; i < d; ++i) {
      dv_last[(h / group) * d + i] += p_last * host_dout[std::size_t(T - 1) * C + h * d + i];
      const std::string error =
          compare("dq[0, 0, " + std::to_string(h * d + i) + "]", dqkv_first[h * d + i], 0.0, 1.0, s.tolerance());
      if (!error.empty()) return error;
    }
  }
  for (std::size_t i = 0; i < dv_last.size(); ++i) {
    const std::string error = compare("dv[0, " + std::to_string(T - 1) + ", " + std::to_string(i) + "]",
                                      dqkv_last[C + KV * d + i], dv_last[i], group, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] {
    backend.attention_gqa_backward(dqkv.get(), scratch.get(), dout.get(), out.get(), qkv.get(), saved.get(), B, T, C,
                                   NH, KV);
  });
  return "";
}

// Row 0 of a LayerNorm against the formula in double on its input row x (C values):
// (x − mean) · rstd · weight + bias, biased variance, eps 1e-5; empty when it agrees.
template <typename Row>
std::string check_layernorm_row0(const Row& x, const std::vector<float>& weight, const std::vector<float>& bias,
                                 float mean0, float rstd0, const std::vector<float>& out_row0, int C,
                                 double tolerance) {
  double m = 0.0, var = 0.0;
  for (int i = 0; i < C; ++i) m += x[i];
  m /= C;
  for (int i = 0; i < C; ++i) var += (x[i] - m) * (x[i] - m);
  const double r = 1.0 / std::sqrt(var / C + 1e-5);
  std::string error = compare("mean[0]", mean0, m, 1.0, kFp32Tolerance);
  if (error.empty()) error = compare("rstd[0]", rstd0, r, r, kFp32Tolerance);
  for (int i = 0; i < C && error.empty(); ++i) {
    const double want = (x[i] - m) * r * weight[i] + bias[i];
    error = compare("out[0, " + std::to_string(i) + "]", out_row0[i], want, 1.0 + std::fabs(want), tolerance);
  }
  return error;
}

// Row 0 of a residual add, out = a + b, against the sum in double; empty when it agrees.
std::string check_sum_row0(const std::vector<float>& out_row0, const std::vector<float>& a, const std::vector<float>& b,
                           int C, double tolerance) {
  std::string error;
  for (int i = 0; i < C && error.empty(); ++i) {
    const double want = static_cast<double>(a[i]) + b[i];
    error = compare("out[0, " + std::to_string(i) + "]", out_row0[i], want, 1.0 + std::fabs(want), tolerance);
  }
  return error;
}

std::string layernorm_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::vector<float> host_inp = stored(pattern(std::size_t(N) * C, 1), s.dtype);
  const std::vector<float> host_weight = stored(pattern(C, 2), s.dtype);
  const std::vector<float> host_bias = stored(pattern(C, 3), s.dtype);
  BackendTensor inp(backend, host_inp.size(), s.dtype);   // (N, C)
  BackendTensor weight(backend, C, s.dtype);              // (C)
  BackendTensor bias(backend, C, s.dtype);                // (C)
  BackendTensor out(backend, host_inp.size(), s.dtype);   // (N, C)
  BackendArray<float> mean(backend, N), rstd(backend, N);
  inp.upload(host_inp);
  weight.upload(host_weight);
  bias.upload(host_bias);

  backend.layernorm_forward(out.get(), mean.get(), rstd.get(), inp.get(), weight.get(), bias.get(), N, C);
  backend.synchronize();
  const std::string error = check_layernorm_row0(host_inp, host_weight, host_bias, mean.download(0), rstd.download(0),
                                                  download_fp32(backend, out.get(), C), C, s.tolerance());
  if (!error.empty()) return error;
  time_calls(state, backend, [&] {
    backend.layernorm_forward(out.get(), mean.get(), rstd.get(), inp.get(), weight.get(), bias.get(), N, C);
  });
  return "";
}

// The block's x_mid = x + attention and LayerNorm 2 in one call, in place as the model calls it.
std::string residual_layernorm_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::vector<float> host_a = stored(pattern(std::size_t(N) * C, 1), s.dtype);
  const std::vector<float> host_b = stored(pattern(std::size_t(N) * C, 4), s.dtype);
  const std::vector<float> host_weight = stored(pattern(C, 2), s.dtype);
  const std::vector<float> host_bias = stored(pattern(C, 3), s.dtype);
  BackendTensor x(backend, host_a.size(), s.dtype);       // (N, C): a, then out = a + b
  BackendTensor b(backend, host_b.size(), s.dtype);       // (N, C)
  BackendTensor weight(backend, C, s.dtype);              // (C)
  BackendTensor bias(backend, C, s.dtype);                // (C)
  BackendTensor ln_out(backend, host_a.size(), s.dtype);  // (N, C)
  BackendArray<float> mean(backend, N), rstd(backend, N);
  x.upload(host_a);
  b.upload(host_b);
  weight.upload(host_weight);
  bias.upload(host_bias);

  backend.residual_layernorm_forward(x.get(), ln_out.get(), mean.get(), rstd.get(), x.get(), b.get(), weight.get(),
                                     bias.get(), N, C);
  backend.synchronize();
  // Row 0 against the formula in double, on the sum as stored: out = a + b, then the LayerNorm of out.
  const std::vector<float> out_row0 = download_fp32(backend, x.get(), C);
  std::string error = check_sum_row0(out_row0, host_a, host_b, C, s.tolerance());
  if (error.empty()) {
    error = check_layernorm_row0(out_row0, host_weight, host_bias, mean.download(0), rstd.download(0),
                                 download_fp32(backend, ln_out.get(), C), C, s.tolerance());
  }
  if (!error.empty()) return error;
  time_calls(state, backend, [&] {  // the sum grows by b per call: far from overflow over the timed calls
    backend.residual_layernorm_forward(x.get(), ln_out.get(), mean.get(), rstd.get(), x.get(), b.get(), weight.get(),
                                       bias.get(), N, C);
  });
  return "";
}

std::string layernorm_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::size_t NC = std::size_t(N) * C;
  const std::vector<float> host_dout = stored(pattern(NC, 4), s.dtype);
  BackendTensor inp(backend, NC, s.dtype);      // (N, C)
  BackendTensor weight(backend, C, s.dtype);    // (C)
  BackendTensor bias(backend, C, s.dtype);      // (C)
  BackendTensor out(backend, NC, s.dtype);      // (N, C)
  BackendTensor dout(backend, NC, s.dtype);     // (N, C)
  BackendTensor dinp(backend, NC, s.dtype);     // (N, C), accumulated
  BackendTensor dweight(backend, C, s.dtype);   // (C), accumulated
  BackendTensor dbias(backend, C, s.dtype);     // (C), accumulated
  BackendArray<float> mean(backend, N), rstd(backend, N);
  inp.upload(pattern(NC, 1));
  weight.upload(pattern(C, 2));
  bias.upload(pattern(C, 3));
  dout.upload(host_dout);
  backend.zero(dinp.get().data(), NC * dtype_bytes(s.dtype));
  backend.zero(dweight.get().data(), C * dtype_bytes(s.dtype));
  backend.zero(dbias.get().data(), C * dtype_bytes(s.dtype));
  backend.layernorm_forward(out.get(), mean.get(), rstd.get(), inp.get(), weight.get(), bias.get(), N, C);

  backend.layernorm_backward(dinp.get(), dweight.get(), dbias.get(), dout.get(), inp.get(), weight.get(), mean.get(),
                             rstd.get(), N, C);
  backend.synchronize();
  // dbias (from zero) = Σ_n dout[n, :]. The gradients keep accumulating over the timed calls: their
  // values grow by O(√N) per call, far from overflow.
  const std::vector<float> got = download_fp32(backend, dbias.get(), C);
  for (int c = 0; c < C; ++c) {
    double want = 0.0, scale = 0.0;
    for (int n = 0; n < N; ++n) {
      want += host_dout[std::size_t(n) * C + c];
      scale += std::fabs(host_dout[std::size_t(n) * C + c]);
    }
    const std::string error = compare("dbias[" + std::to_string(c) + "]", got[c], want, scale, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] {
    backend.layernorm_backward(dinp.get(), dweight.get(), dbias.get(), dout.get(), inp.get(), weight.get(),
                               mean.get(), rstd.get(), N, C);
  });
  return "";
}

// The first elements of an elementwise kernel's output, checked.
constexpr std::size_t kCheckedElements = 16;

// "" when element i of `out` is want(i) to the shape's tolerance (times `scale`) for each of its first
// kCheckedElements; else the first mismatch, named `name`[i].
template <typename Want>
std::string check_first_elements(Backend& backend, ConstTensorPtr out, const std::string& name, Want&& want,
                                 double scale, const KernelShape& s) {
  const std::vector<float> got = download_fp32(backend, out, kCheckedElements);
  for (std::size_t i = 0; i < kCheckedElements; ++i) {
    const std::string error = compare(name + "[" + std::to_string(i) + "]", got[i], want(i), scale, s.tolerance());
    if (!error.empty()) return error;
  }
  return "";
}

std::string gelu_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t n = std::size_t(s.N()) * s.F;
  const std::vector<float> host_inp = stored(pattern(n, 1), s.dtype);
  BackendTensor inp(backend, n, s.dtype);  // (N, F): fc1's output
  BackendTensor out(backend, n, s.dtype);  // (N, F)
  inp.upload(host_inp);

  backend.gelu_forward(out.get(), inp.get(), n);
  backend.synchronize();
  const std::string error = check_first_elements(
      backend, out.get(), "out", [&](std::size_t i) { return gelu_reference(host_inp[i]); }, 1.0, s);
  if (!error.empty()) return error;
  time_calls(state, backend, [&] { backend.gelu_forward(out.get(), inp.get(), n); });
  return "";
}

std::string gelu_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t n = std::size_t(s.N()) * s.F;
  const std::vector<float> host_inp = stored(pattern(n, 1), s.dtype);
  const std::vector<float> host_dout = stored(pattern(n, 2), s.dtype);
  BackendTensor inp(backend, n, s.dtype);   // (N, F)
  BackendTensor dout(backend, n, s.dtype);  // (N, F)
  // (N, F). The model passes dout as dinp (in place); a separate output keeps every call's input the
  // same (in place, repeated calls would multiply dout by gelu' until it overflows or turns subnormal).
  BackendTensor dinp(backend, n, s.dtype);
  inp.upload(host_inp);
  dout.upload(host_dout);

  backend.gelu_backward(dinp.get(), inp.get(), dout.get(), n);
  backend.synchronize();
  const std::string error = check_first_elements(
      backend, dinp.get(), "dinp",
      [&](std::size_t i) { return gelu_derivative_reference(host_inp[i]) * host_dout[i]; }, 1.0, s);
  if (!error.empty()) return error;
  time_calls(state, backend, [&] { backend.gelu_backward(dinp.get(), inp.get(), dout.get(), n); });
  return "";
}

std::string add_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t n = std::size_t(s.N()) * s.C;
  const std::vector<float> host_a = stored(pattern(n, 1), s.dtype);
  const std::vector<float> host_b = stored(pattern(n, 2), s.dtype);
  BackendTensor a(backend, n, s.dtype);  // (N, C): the branch's output, and the sum (x_mid = x_mid + x)
  BackendTensor b(backend, n, s.dtype);  // (N, C): the residual stream
  a.upload(host_a);
  b.upload(host_b);

  backend.add(a.get(), a.get(), b.get(), n);
  backend.synchronize();
  const std::string error = check_first_elements(
      backend, a.get(), "out", [&](std::size_t i) { return double(host_a[i]) + host_b[i]; }, 2.0, s);
  if (!error.empty()) return error;
  // a grows by b per call: at most by one per call, far from overflow
  time_calls(state, backend, [&] { backend.add(a.get(), a.get(), b.get(), n); });
  return "";
}

std::string embedding_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int B = s.B, T = s.T, C = s.C, N = s.N();
  const std::vector<int32_t> host_tokens = token_ids(N, s.V, 5);
  const std::vector<float> host_tok = stored(pattern(std::size_t(s.V) * C, 1), s.dtype);
  const std::vector<float> host_pos = stored(pattern(std::size_t(T) * C, 2), s.dtype);
  BackendArray<int32_t> tokens(backend, N);                    // (B, T)
  BackendTensor tok(backend, host_tok.size(), s.dtype);        // (V, C)
  BackendTensor pos(backend, host_pos.size(), s.dtype);        // (T, C)
  BackendTensor out(backend, std::size_t(N) * C, s.dtype);     // (B, T, C)
  tokens.upload(host_tokens);
  tok.upload(host_tok);
  pos.upload(host_pos);

  backend.embedding_forward(out.get(), tokens.get(), tok.get(), pos.get(), B, T, C);
  backend.synchronize();
  // row 0 = tok[tokens[0]] + pos[0]
  const std::vector<float> got = download_fp32(backend, out.get(), C);
  for (int c = 0; c < C; ++c) {
    const double want = double(host_tok[std::size_t(host_tokens[0]) * C + c]) + host_pos[c];
    const std::string error = compare("out[0, 0, " + std::to_string(c) + "]", got[c], want, 2.0, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend,
             [&] { backend.embedding_forward(out.get(), tokens.get(), tok.get(), pos.get(), B, T, C); });
  return "";
}

std::string embedding_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int B = s.B, T = s.T, C = s.C, N = s.N();
  const std::vector<float> host_dout = stored(pattern(std::size_t(N) * C, 3), s.dtype);
  BackendArray<int32_t> tokens(backend, N);                   // (B, T)
  BackendTensor dout(backend, host_dout.size(), s.dtype);     // (B, T, C)
  BackendTensor dtok(backend, std::size_t(s.V) * C, s.dtype); // (V, C), accumulated
  BackendTensor dpos(backend, std::size_t(T) * C, s.dtype);   // (T, C), accumulated
  tokens.upload(token_ids(N, s.V, 5));
  dout.upload(host_dout);
  backend.zero(dtok.get().data(), std::size_t(s.V) * C * dtype_bytes(s.dtype));
  backend.zero(dpos.get().data(), std::size_t(T) * C * dtype_bytes(s.dtype));

  backend.embedding_backward(dtok.get(), dpos.get(), dout.get(), tokens.get(), B, T, C);
  backend.synchronize();
  // dpos row 0 (from zero) = Σ_b dout[b, 0, :]; the gradients then grow by at most B per call
  const std::vector<float> got = download_fp32(backend, dpos.get(), C);
  for (int c = 0; c < C; ++c) {
    double want = 0.0, scale = 0.0;
    for (int b = 0; b < B; ++b) {
      want += host_dout[std::size_t(b) * T * C + c];
      scale += std::fabs(host_dout[std::size_t(b) * T * C + c]);
    }
    const std::string error = compare("dpos[0, " + std::to_string(c) + "]", got[c], want, scale, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend,
             [&] { backend.embedding_backward(dtok.get(), dpos.get(), dout.get(), tokens.get(), B, T, C); });
  return "";
}

std::string cross_entropy_forward_backward_benchmark(benchmark::State& state, Backend& backend,
                                                     const KernelShape& s) {
  const int N = s.N(), V = s.V, Vp = s.Vp;
  const std::vector<int32_t> host_targets = token_ids(N, V, 6);
  const float scale = 1.0f / static_cast<float>(N);  // the mean over the micro-batch's tokens
  BackendTensor logits(backend, std::size_t(N) * Vp, s.dtype);  // (N, Vp), becomes dlogits in place
  BackendArray<int32_t> targets(backend, N);                    // (N)
  BackendArray<double> loss_sum(backend, 1);
  logits.upload(pattern(std::size_t(N) * Vp, 1));
  targets.upload(host_targets);
  backend.zero(loss_sum.get(), sizeof(double));

  backend.cross_entropy_forward_backward(logits.get(), loss_sum.get(), targets.get(), N, V, Vp, scale);
  backend.synchronize();
  // Row 0's probabilities, p = dlogits / scale + onehot(target), sum to 1; the mean loss is finite and
  // positive (about log V for logits in [−1, 1)).
  const std::vector<float> dlogits_row0 = download_fp32(backend, logits.get(), V);
  double p_sum = 0.0;
  for (int i = 0; i < V; ++i) p_sum += dlogits_row0[i] / scale + (i == host_targets[0] ? 1.0 : 0.0);
  std::string error = compare("the sum of row 0's probabilities", p_sum, 1.0, 1.0, s.tolerance());
  const double loss = loss_sum.download(0);
  if (error.empty() && !(loss > 0.0 && std::isfinite(loss))) {
    error = "check failed: loss " + std::to_string(loss) + ", expected a finite positive value";
  }
  if (!error.empty()) return error;
  // The timed calls run on the previous call's dlogits: the same arithmetic on other values.
  time_calls(state, backend, [&] {
    backend.cross_entropy_forward_backward(logits.get(), loss_sum.get(), targets.get(), N, V, Vp, scale);
  });
  return "";
}

std::string sum_squares_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::vector<float> host_grads = stored(pattern(s.params, 1), s.dtype);
  BackendTensor grads(backend, s.params, s.dtype);  // (P): the gradients whose norm clipping needs
  grads.upload(host_grads);

  const double got = backend.sum_squares(grads.get(), s.params);
  double want = 0.0;
  for (float g : host_grads) want += double(g) * g;
  const std::string error = compare("sum of squares", got, want, want, kFp32Tolerance);
  if (!error.empty()) return error;
  time_calls(state, backend, [&] { benchmark::DoNotOptimize(backend.sum_squares(grads.get(), s.params)); });
  return "";
}

std::string zero_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t bytes = s.params * dtype_bytes(s.dtype);
  BackendTensor grads(backend, s.params, s.dtype);  // (P): the gradients, zeroed at the start of a step
  grads.upload(pattern(s.params, 1));

  backend.zero(grads.get().data(), bytes);
  backend.synchronize();
  for (std::size_t i : {std::size_t(0), s.params - 1}) {
    const std::string error = compare("grads[" + std::to_string(i) + "]", element(backend, grads.get(), i), 0.0,
                                      1.0, 0.0);
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] { backend.zero(grads.get().data(), bytes); });
  return "";
}

std::string accumulate_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t P = s.params;
  const std::vector<float> host_y = stored(pattern(P, 1), s.dtype);
  const std::vector<float> host_x = stored(pattern(P, 2), s.dtype);
  BackendTensor y(backend, P, s.dtype);  // (P): a gradient shard, summed into
  BackendTensor x(backend, P, s.dtype);  // (P): the reduce-scattered block added to it
  y.upload(host_y);
  x.upload(host_x);

  backend.accumulate(y.get(), x.get(), P);
  backend.synchronize();
  const std::string error = check_first_elements(
      backend, y.get(), "y", [&](std::size_t i) { return double(host_y[i]) + host_x[i]; }, 2.0, s);
  if (!error.empty()) return error;
  // y grows by x per call: at most by one per call, far from overflow
  time_calls(state, backend, [&] { backend.accumulate(y.get(), x.get(), P); });
  return "";
}

std::string adamw_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t P = s.params;
  const std::vector<float> host_params = pattern(P, 1);
  const std::vector<float> host_grads = stored(pattern(P, 2), s.dtype);
  BackendArray<float> params(backend, P), m(backend, P), v(backend, P);  // (P) fp32: master weights, moments
  BackendTensor grads(backend, P, s.dtype);                              // (P)
  params.upload(host_params);
  grads.upload(host_grads);
  backend.zero(m.get(), P * sizeof(float));
  backend.zero(v.get(), P * sizeof(float));
  constexpr float kGradScale = 1.0f;  // no clipping

  int step = 1;
  backend.adamw_update(params.get(), grads.get(), m.get(), v.get(), P, kLearningRate, kBeta1, kBeta2, kEps,
                       kWeightDecay, step, kGradScale);
  backend.synchronize();
  // Step 1 from zero moments: m = (1−β1)·g, v = (1−β2)·g², so the bias-corrected step is lr·g / (|g| + eps)
  // after the decay p·(1 − lr·wd). Checked to 1% of the step.
  for (std::size_t i : {std::size_t(0), P - 1}) {
    const double g = host_grads[i];
    const double want = host_params[i] * (1.0 - double(kLearningRate) * kWeightDecay) -
                        double(kLearningRate) * g / (std::fabs(g) + kEps);
    const std::string error = compare("params[" + std::to_string(i) + "] after step 1", params.download(i), want,
                                      kLearningRate, 1e-2);
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] {
    backend.adamw_update(params.get(), grads.get(), m.get(), v.get(), P, kLearningRate, kBeta1, kBeta2, kEps,
                         kWeightDecay, ++step, kGradScale);
  });
  return "";
}

std::string convert_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t P = s.params;
  const std::vector<float> host_master = pattern(P, 1);
  BackendArray<float> master(backend, P);    // (P) fp32 master weights
  BackendTensor params(backend, P, s.dtype); // (P): the copy the next forward reads
  master.upload(host_master);

  backend.convert(params.get(), master.get(), P);
  backend.synchronize();
  const std::vector<float> got = download_fp32(backend, params.get(), kCheckedElements);
  const std::vector<float> want =
      stored(std::vector<float>(host_master.begin(), host_master.begin() + kCheckedElements), s.dtype);
  for (std::size_t i = 0; i < kCheckedElements; ++i) {
    const std::string error = compare("params[" + std::to_string(i) + "]", got[i], want[i], 1.0, 0.0);
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] { backend.convert(params.get(), master.get(), P); });
  return "";
}

// ---- the Llama-style block (SPEC 2.5) ---------------------------------------------------------------
// Row 0 of an RMSNorm against the formula in double on its input row x: x · rstd · weight, rstd =
// 1/sqrt(mean(x²) + 1e-5); empty when it agrees.
template <typename Row>
std::string check_rmsnorm_row0(const Row& x, const std::vector<float>& weight, float rstd0,
                               const std::vector<float>& out_row0, int C, double tolerance) {
  double squares = 0.0;
  for (int i = 0; i < C; ++i) squares += double(x[i]) * x[i];
  const double r = 1.0 / std::sqrt(squares / C + 1e-5);
  std::string error = compare("rstd[0]", rstd0, r, r, kFp32Tolerance);
  for (int i = 0; i < C && error.empty(); ++i) {
    const double want = x[i] * r * weight[i];
    error = compare("out[0, " + std::to_string(i) + "]", out_row0[i], want, 1.0 + std::fabs(want), tolerance);
  }
  return error;
}

std::string rmsnorm_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::vector<float> host_inp = stored(pattern(std::size_t(N) * C, 1), s.dtype);
  const std::vector<float> host_weight = stored(pattern(C, 2), s.dtype);
  BackendTensor inp(backend, host_inp.size(), s.dtype);   // (N, C)
  BackendTensor weight(backend, C, s.dtype);              // (C)
  BackendTensor out(backend, host_inp.size(), s.dtype);   // (N, C)
  BackendArray<float> rstd(backend, N);
  inp.upload(host_inp);
  weight.upload(host_weight);

  backend.rmsnorm_forward(out.get(), rstd.get(), inp.get(), weight.get(), N, C);
  backend.synchronize();
  const std::string error = check_rmsnorm_row0(host_inp, host_weight, rstd.download(0),
                                                download_fp32(backend, out.get(), C), C, s.tolerance());
  if (!error.empty()) return error;
  time_calls(state, backend, [&] { backend.rmsnorm_forward(out.get(), rstd.get(), inp.get(), weight.get(), N, C); });
  return "";
}

// The block's x_mid = x + attention and RMSNorm 2 in one call, in place as the model calls it.
std::string residual_rmsnorm_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::vector<float> host_a = stored(pattern(std::size_t(N) * C, 1), s.dtype);
  const std::vector<float> host_b = stored(pattern(std::size_t(N) * C, 4), s.dtype);
  const std::vector<float> host_weight = stored(pattern(C, 2), s.dtype);
  BackendTensor x(backend, host_a.size(), s.dtype);         // (N, C): a, then out = a + b
  BackendTensor b(backend, host_b.size(), s.dtype);         // (N, C)
  BackendTensor weight(backend, C, s.dtype);                // (C)
  BackendTensor norm_out(backend, host_a.size(), s.dtype);  // (N, C)
  BackendArray<float> rstd(backend, N);
  x.upload(host_a);
  b.upload(host_b);
  weight.upload(host_weight);

  backend.residual_rmsnorm_forward(x.get(), norm_out.get(), rstd.get(), x.get(), b.get(), weight.get(), N, C);
  backend.synchronize();
  const std::vector<float> out_row0 = download_fp32(backend, x.get(), C);
  std::string error = check_sum_row0(out_row0, host_a, host_b, C, s.tolerance());
  if (error.empty()) {
    error = check_rmsnorm_row0(out_row0, host_weight, rstd.download(0), download_fp32(backend, norm_out.get(), C), C,
                               s.tolerance());
  }
  if (!error.empty()) return error;
  // x grows by b per call: at most by one per call, far from overflow
  time_calls(state, backend, [&] {
    backend.residual_rmsnorm_forward(x.get(), norm_out.get(), rstd.get(), x.get(), b.get(), weight.get(), N, C);
  });
  return "";
}

std::string rmsnorm_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const int N = s.N(), C = s.C;
  const std::size_t NC = std::size_t(N) * C;
  const std::vector<float> host_inp = stored(pattern(NC, 1), s.dtype);
  const std::vector<float> host_dout = stored(pattern(NC, 4), s.dtype);
  BackendTensor inp(backend, NC, s.dtype);      // (N, C)
  BackendTensor weight(backend, C, s.dtype);    // (C)
  BackendTensor out(backend, NC, s.dtype);      // (N, C)
  BackendTensor dout(backend, NC, s.dtype);     // (N, C)
  BackendTensor dinp(backend, NC, s.dtype);     // (N, C), accumulated
  BackendTensor dweight(backend, C, s.dtype);   // (C), accumulated
  BackendArray<float> rstd(backend, N);
  inp.upload(host_inp);
  weight.upload(pattern(C, 2));
  dout.upload(host_dout);
  backend.zero(dinp.get().data(), NC * dtype_bytes(s.dtype));
  backend.zero(dweight.get().data(), C * dtype_bytes(s.dtype));
  backend.rmsnorm_forward(out.get(), rstd.get(), inp.get(), weight.get(), N, C);

  backend.rmsnorm_backward(dinp.get(), dweight.get(), dout.get(), inp.get(), weight.get(), rstd.get(), N, C);
  backend.synchronize();
  // dweight (from zero) = Σ_n dout[n, :] · x[n, :] · rstd[n], rstd in double from the host. The gradients
  // keep accumulating over the timed calls: their values grow by O(√N) per call, far from overflow.
  const std::vector<float> got = download_fp32(backend, dweight.get(), C);
  std::vector<double> r(N);
  for (int n = 0; n < N; ++n) {
    double squares = 0.0;
    for (int c = 0; c < C; ++c) squares += double(host_inp[std::size_t(n) * C + c]) * host_inp[std::size_t(n) * C + c];
    r[n] = 1.0 / std::sqrt(squares / C + 1e-5);
  }
  for (int c = 0; c < C; ++c) {
    double want = 0.0, scale = 0.0;
    for (int n = 0; n < N; ++n) {
      const double term = double(host_dout[std::size_t(n) * C + c]) * host_inp[std::size_t(n) * C + c] * r[n];
      want += term;
      scale += std::fabs(term);
    }
    const std::string error = compare("dweight[" + std::to_string(c) + "]", got[c], want, scale, s.tolerance());
    if (!error.empty()) return error;
  }
  time_calls(state, backend, [&] {
    backend.rmsnorm_backward(dinp.get(), dweight.get(), dout.get(), inp.get(), weight.get(), rstd.get(), N, C);
  });
  return "";
}

// Rotary positions over the Q and K heads of a qkv buffer in one call (heads + kv_heads heads of d
// columns, rows W apart): the model's two calls (Q, then K) at once. Positions 0..T−1; the rotation keeps
// norms, so the timed calls, each rotating the same buffer again, stay in range.
std::string rope_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s, bool backward) {
  const int B = s.B, T = s.T, d = s.d(), rotated = s.heads + s.kv_heads;
  const std::vector<float> host_qkv = stored(pattern(std::size_t(B) * T * s.W(), 1), s.dtype);
  std::vector<int32_t> host_pos(T);
  for (int i = 0; i < T; ++i) host_pos[i] = i;
  BackendTensor qkv(backend, host_qkv.size(), s.dtype);  // (B, T, W)
  BackendArray<int32_t> pos(backend, T);
  qkv.upload(host_qkv);
  pos.upload(host_pos);
  auto call = [&] {
    if (backward) {
      backend.rope_backward(qkv.get(), s.W(), pos.get(), B, T, rotated, d, s.rope_theta);
    } else {
      backend.rope_forward(qkv.get(), s.W(), pos.get(), B, T, rotated, d, s.rope_theta);
    }
  };
  call();
  backend.synchronize();
  // token 0 (position 0) unchanged; token 1's pair (0, d/2) of head 0 rotated by ±1 radian
  const std::vector<float> got = download_fp32(backend, qkv.get(), 2 * std::size_t(s.W()));
  std::string error;
  for (int i = 0; i < rotated * d && error.empty(); ++i) {
    error = compare("x[0, 0, " + std::to_string(i) + "]", got[i], host_qkv[i], 1.0, s.tolerance());
  }
  const double x1 = host_qkv[s.W()], x2 = host_qkv[s.W() + d / 2], sn = backward ? -std::sin(1.0) : std::sin(1.0);
  if (error.empty()) error = compare("x[0, 1, 0]", got[s.W()], x1 * std::cos(1.0) - x2 * sn, 2.0, s.tolerance());
  if (error.empty()) {
    error = compare("x[0, 1, d/2]", got[s.W() + d / 2], x2 * std::cos(1.0) + x1 * sn, 2.0, s.tolerance());
  }
  if (!error.empty()) return error;
  time_calls(state, backend, call);
  return "";
}
std::string rope_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  return rope_benchmark(state, backend, s, false);
}
std::string rope_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  return rope_benchmark(state, backend, s, true);
}

double silu_reference(double g) { return g / (1.0 + std::exp(-g)); }

std::string swiglu_forward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t n = std::size_t(s.N()) * s.F;
  const std::vector<float> host_gate = stored(pattern(n, 1), s.dtype), host_up = stored(pattern(n, 2), s.dtype);
  BackendTensor gate(backend, n, s.dtype);  // (N, F): x·gate.w
  BackendTensor up(backend, n, s.dtype);    // (N, F): x·up.w
  BackendTensor out(backend, n, s.dtype);   // (N, F)
  gate.upload(host_gate);
  up.upload(host_up);

  backend.swiglu_forward(out.get(), gate.get(), up.get(), n);
  backend.synchronize();
  const std::string error = check_first_elements(
      backend, out.get(), "out", [&](std::size_t i) { return silu_reference(host_gate[i]) * host_up[i]; }, 1.0, s);
  if (!error.empty()) return error;
  time_calls(state, backend, [&] { backend.swiglu_forward(out.get(), gate.get(), up.get(), n); });
  return "";
}

std::string swiglu_backward_benchmark(benchmark::State& state, Backend& backend, const KernelShape& s) {
  const std::size_t n = std::size_t(s.N()) * s.F;
  const std::vector<float> host_gate = stored(pattern(n, 1), s.dtype), host_up = stored(pattern(n, 2), s.dtype);
  const std::vector<float> host_dout = stored(pattern(n, 3), s.dtype);
  BackendTensor gate(backend, n, s.dtype), up(backend, n, s.dtype), dout(backend, n, s.dtype);  // (N, F) each
  // The model writes dup over dout (in place); separate outputs keep every call's input the same.
  BackendTensor dgate(backend, n, s.dtype), dup(backend, n, s.dtype);
  gate.upload(host_gate);
  up.upload(host_up);
  dout.upload(host_dout);

  backend.swiglu_backward(dgate.get(), dup.get(), dout.get(), gate.get(), up.get(), n);
  backend.synchronize();
  std::string error = check_first_elements(
      backend, dgate.get(), "dgate",
      [&](std::size_t i) {
        const double g = host_gate[i], sig = 1.0 / (1.0 + std::exp(-g));
        return host_dout[i] * host_up[i] * sig * (1.0 + g * (1.0 - sig));
      },
      1.0, s);
  if (error.empty()) {
    error = check_first_elements(
        backend, dup.get(), "dup", [&](std::size_t i) { return host_dout[i] * silu_reference(host_gate[i]); }, 1.0, s);
  }
  if (!error.empty()) return error;
  time_calls(state, backend,
             [&] { backend.swiglu_backward(dgate.get(), dup.get(), dout.get(), gate.get(), up.get(), n); });
  return "";
}

// ---- registration --------------------------------------------------------------------------------

using KernelBenchmark = std::string (*)(benchmark::State&, Backend&, const KernelShape&);

// One kernel at one preset's shape: its name, its dimensions in words, its cost per call (flop for
// attention, bytes for the rest) and its benchmark.
struct KernelCase {
  std::string kernel, dims;
  double flop = 0, bytes = 0;
  KernelBenchmark run = nullptr;
};

KernelShape kernel_shape(const std::string& preset, DType dtype) {
  ModelConfig m;
  if (!model_preset(preset, &m)) throw std::invalid_argument("register_kernel_benchmarks: no preset " + preset);
  KernelShape s;
  s.preset = preset;
  s.dtype = dtype;
  s.B = kMicroBatch;
  s.T = m.seq;
  s.C = m.hidden;
  s.heads = m.heads;
  s.V = m.vocab;
  s.Vp = static_cast<int>(m.padded_vocab());
  s.F = m.ffn;
  s.kv_heads = m.kv();
  s.llama = m.llama();
  s.rope_theta = m.rope_theta;
  const std::vector<UnitInfo> units = gpt_units(m);
  s.params = units.back().offset + units.back().numel;  // as stored: with the vocabulary's padding
  return s;
}

// The kernels of one step at shape s. B micro-batch, T sequence, C hidden, NH heads, V vocabulary,
// F MLP width (4C), N = B·T rows, P parameters, e bytes per element of the benchmark's dtype. A llama
// preset: the kernels its block has and the gpt block has not (the rest are the gpt presets').
std::vector<KernelCase> kernel_cases(const KernelShape& s) {
  const double B = s.B, T = s.T, C = s.C, F = s.F, N = s.N(), P = static_cast<double>(s.params), e = s.e();
  const std::string tc = "B" + std::to_string(s.B) + "_T" + std::to_string(s.T) + "_C" + std::to_string(s.C);
  const std::string rows = "N" + std::to_string(s.N()) + "_C";
  const std::string params = "P" + std::to_string(s.params);
  using namespace kernel_cost;  // the formulas, with their reasons, in kernel_costs.h
  const std::string heads = "_NH" + std::to_string(s.heads);
  if (s.llama) {
    const std::string grouped = heads + "_KV" + std::to_string(s.kv_heads);
    const double rotated = static_cast<double>(s.heads + s.kv_heads) * s.d();  // Q and K columns per token
    return {
        {"attention_forward", tc + grouped, attention_forward_flop(B, T, C), 0, attention_forward_benchmark},
        {"attention_backward", tc + grouped, attention_backward_flop(B, T, C), 0, attention_backward_benchmark},
        {"rmsnorm_forward", rows + std::to_string(s.C), 0, rmsnorm_forward_bytes(N, C, e), rmsnorm_forward_benchmark},
        {"rmsnorm_backward", rows + std::to_string(s.C), 0, rmsnorm_backward_bytes(N, C, e),
         rmsnorm_backward_benchmark},
        {"residual_rmsnorm_forward", rows + std::to_string(s.C), 0, residual_rmsnorm_forward_bytes(N, C, e),
         residual_rmsnorm_forward_benchmark},
        {"rope_forward", tc + grouped, 0, rope_bytes(N, T, rotated, e), rope_forward_benchmark},
        {"rope_backward", tc + grouped, 0, rope_bytes(N, T, rotated, e), rope_backward_benchmark},
        {"swiglu_forward", rows + std::to_string(s.F), 0, swiglu_forward_bytes(N * F, e), swiglu_forward_benchmark},
        {"swiglu_backward", rows + std::to_string(s.F), 0, swiglu_backward_bytes(N * F, e),
         swiglu_backward_benchmark},
    };
  }
  std::vector<KernelCase> cases = {
      {"attention_forward", tc + heads, attention_forward_flop(B, T, C), 0, attention_forward_benchmark},
      {"attention_backward", tc + heads, attention_backward_flop(B, T, C), 0, attention_backward_benchmark},
      {"layernorm_forward", rows + std::to_string(s.C), 0, layernorm_forward_bytes(N, C, e), layernorm_forward_benchmark},
      {"layernorm_backward", rows + std::to_string(s.C), 0, layernorm_backward_bytes(N, C, e),
       layernorm_backward_benchmark},
      {"residual_layernorm_forward", rows + std::to_string(s.C), 0, residual_layernorm_forward_bytes(N, C, e),
       residual_layernorm_forward_benchmark},
      {"gelu_forward", rows + std::to_string(s.F), 0, gelu_forward_bytes(N * F, e), gelu_forward_benchmark},
      {"gelu_backward", rows + std::to_string(s.F), 0, gelu_backward_bytes(N * F, e), gelu_backward_benchmark},
      {"add", rows + std::to_string(s.C), 0, add_bytes(N * C, e), add_benchmark},
      {"embedding_forward", tc + "_V" + std::to_string(s.V), 0, embedding_forward_bytes(N, T, C, e),
       embedding_forward_benchmark},
      {"embedding_backward", tc + "_V" + std::to_string(s.V), 0, embedding_backward_bytes(N, T, C, e),
       embedding_backward_benchmark},
      {"cross_entropy_forward_backward", "N" + std::to_string(s.N()) + "_V" + std::to_string(s.Vp), 0,
       cross_entropy_bytes(N, s.Vp, e), cross_entropy_forward_backward_benchmark},
      {"sum_squares", params, 0, sum_squares_bytes(P, e), sum_squares_benchmark},
      {"zero", params, 0, zero_bytes(P, e), zero_benchmark},
      // fsdp: each reduce-scattered gradient block added into the rank's shard
      {"accumulate", params, 0, accumulate_bytes(P, e), accumulate_benchmark},
      // adamw_update in one call over every parameter (the apps update all their ranges in one call too)
      {"adamw", params, 0, adamw_bytes(P, e), adamw_benchmark},
  };
  if (s.dtype != DType::f32) {
    // mixed precision only: the master weights rounded into the parameters after AdamW
    cases.push_back({"convert", params, 0, convert_bytes(P, e), convert_benchmark});
  }
  return cases;
}

// What the attention keeps for its backward, for the label of its results.
std::string attention_label(const Backend& backend) {
  return backend.attention_keeps_probabilities() ? "probabilities kept (B·NH·T² fp32)"
                                                 : "fused: softmax statistics kept (B·NH·T fp32)";
}

void kernel_benchmark(benchmark::State& state, const MicroBackend& micro, const KernelShape& shape,
                      const KernelCase& kernel, int* failed_checks) {
  try {
    const std::string error = kernel.run(state, *micro.backend, shape);
    if (!error.empty()) {
      ++*failed_checks;
      state.SkipWithError(error.c_str());
      return;
    }
  } catch (const std::exception& e) {  // out of memory, a CUDA error, a dtype the backend refuses
    ++*failed_checks;
    state.SkipWithError(e.what());
    return;
  }
  if (kernel.flop > 0) {
    state.SetLabel(attention_label(*micro.backend));
    state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * kernel.flop, benchmark::Counter::kIsIterationInvariantRate);
  } else {
    state.counters["GB/s"] = benchmark::Counter(1e-9 * kernel.bytes, benchmark::Counter::kIsIterationInvariantRate);
  }
}

}  // namespace

void register_kernel_benchmarks(std::vector<MicroBackend>& backends, int* failed_checks) {
  for (const MicroBackend& micro : backends) {
    DType dtype;
    if (!parse_dtype(micro.dtype, &dtype)) {
      throw std::invalid_argument("register_kernel_benchmarks: dtype " + micro.dtype);
    }
    for (const char* preset : kModelPresets) {
      const KernelShape shape = kernel_shape(preset, dtype);
      for (const KernelCase& kernel : kernel_cases(shape)) {
        const std::string name =
            "kernel/" + micro.name + "/" + micro.dtype + "/" + kernel.kernel + "/" + preset + "/" + kernel.dims;
        MicroEntry entry;
        entry.table = "kernels";
        entry.backend = micro.name;
        entry.dtype = micro.dtype;
        entry.kernel = kernel.kernel;
        entry.shape = preset;
        entry.dims = kernel.dims;
        entry.flop = kernel.flop;
        entry.bytes = kernel.bytes;
        entry.peak_flop_per_s = micro.peak_flop_per_s;
        entry.peak_bytes_per_s = micro.peak_bytes_per_s;
        if (kernel.flop > 0) entry.label = attention_label(*micro.backend);
        add_micro_entry(name, entry);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [&micro, shape, kernel, failed_checks](benchmark::State& state) {
                                       kernel_benchmark(state, micro, shape, kernel, failed_checks);
                                     })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
}

}  // namespace pb
