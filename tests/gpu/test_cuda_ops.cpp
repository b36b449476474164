// Every CUDA backend op against the CPU backend on the same random inputs.
//
// Outputs are poisoned with NaN on both backends first, so an element a kernel forgets to write
// fails the comparison; accumulating outputs start from the same random values on both. The error
// is ‖gpu − cpu‖ / ‖cpu‖: at most 1e-5 in fp32 (cuBLAS without TF32), 1e-2 for the matrix products
// in bf16. Integer outputs (the mixture of experts' expert indices, slots and counts) are poisoned
// with a value no op writes and must match exactly; a log-sum-exp is −inf exactly where the CPU's is.
// The bf16 products must also be fast: at 8192³ at least 4× the fp32 ones, so that they cannot pass
// on a silent fp32 path. Without a visible GPU every test reports itself skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"

namespace pb {
namespace {

using FVec = std::vector<float>;
using IVec = std::vector<int32_t>;
constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 1e-2;
constexpr int32_t kIntPoison = -123456789;  // no valid expert index, slot (≥ −1) or count (≥ 0)

// One tensor on both backends.
struct Twin {
  float* cpu = nullptr;
  float* gpu = nullptr;
  std::size_t n = 0;
};
// One int32 tensor on both backends.
struct IntTwin {
  int32_t* cpu = nullptr;
  int32_t* gpu = nullptr;
  std::size_t n = 0;
};
// One tensor on both backends, the GPU's in a dtype of its own (fp32 or bf16) and the CPU's in fp32 holding
// the same values (rounded to bf16 where the GPU's is bf16): the bf16 ops against the CPU's fp32 ones.
struct Typed {
  float* cpu = nullptr;
  TensorPtr gpu;
  std::size_t n = 0;
};
using BVec = std::vector<uint16_t>;
BVec to_bf16(const FVec& x) {
  BVec b(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) b[i] = cpu::float_to_bf16(x[i]);
  return b;
}
FVec to_f32(const BVec& b) {
  FVec x(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) x[i] = cpu::bf16_to_float(b[i]);
  return x;
}
FVec bf16_values(const FVec& x) { return to_f32(to_bf16(x)); }
// ‖got − ref‖ / ‖ref‖, infinite when got holds a NaN or an infinity.
double rel_error_of(const FVec& got, const FVec& ref) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    diff += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_visible_device_count() == 0) GTEST_SKIP() << "no GPU visible: the CUDA ops are not checked here";
    cpu_ = make_cpu_backend(2);
    gpu_ = make_cuda_backend(0, /*bf16_matmul=*/false);
  }

  FVec random(std::size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> u(lo, hi);
    FVec v(n);
    for (float& x : v) x = u(rng_);
    return v;
  }
  Twin put(const FVec& host) {
    Twin t{cpu_->alloc_floats(host.size(), MemCategory::activations),
           gpu_->alloc_floats(host.size(), MemCategory::activations), host.size()};
    cpu_->upload(t.cpu, host.data(), host.size() * sizeof(float));
    gpu_->upload(t.gpu, host.data(), host.size() * sizeof(float));
    return t;
  }
  Twin poisoned(std::size_t n) { return put(FVec(n, std::numeric_limits<float>::quiet_NaN())); }
  int32_t* put_tokens(Backend& be, const std::vector<int32_t>& tokens) {
    auto* p = static_cast<int32_t*>(be.alloc(tokens.size() * sizeof(int32_t), MemCategory::activations));
    be.upload(p, tokens.data(), tokens.size() * sizeof(int32_t));
    return p;
  }
  FVec get(Backend& be, const float* p, std::size_t n) {
    FVec v(n);
    be.download(v.data(), p, n * sizeof(float));
    return v;
  }
  IntTwin put_ints(const IVec& host) { return {put_tokens(*cpu_, host), put_tokens(*gpu_, host), host.size()}; }
  IntTwin poisoned_ints(std::size_t n) { return put_ints(IVec(n, kIntPoison)); }
  IVec get_ints(Backend& be, const int32_t* p, std::size_t n) {
    IVec v(n);
    be.download(v.data(), p, n * sizeof(int32_t));
    return v;
  }
  // A double on one backend (a loss sum that an op accumulates into), and its value.
  double* put_double(Backend& be, double initial) {
    auto* p = static_cast<double*>(be.alloc(sizeof(double), MemCategory::activations));
    be.upload(p, &initial, sizeof(double));
    return p;
  }
  double get_double(Backend& be, const double* p) {
    double v = 0.0;
    be.download(&v, p, sizeof(double));
    return v;
  }

  // ‖gpu − cpu‖ / ‖cpu‖ (infinite when the GPU left a NaN or wrote one).
  double rel_error(const Twin& t) {
    const FVec c = get(*cpu_, t.cpu, t.n), g = get(*gpu_, t.gpu, t.n);
    double diff = 0.0, ref = 0.0;
    for (std::size_t i = 0; i < t.n; ++i) {
      if (!std::isfinite(g[i])) return std::numeric_limits<double>::infinity();
      diff += (static_cast<double>(g[i]) - c[i]) * (static_cast<double>(g[i]) - c[i]);
      ref += static_cast<double>(c[i]) * c[i];
    }
    return ref > 0.0 ? std::sqrt(diff / ref) : std::sqrt(diff);
  }
  void expect_close(const Twin& t, const std::string& what, double tol = kFp32Tol) {
    const double e = rel_error(t);
    EXPECT_LE(e, tol) << what << ": relative error " << e;
  }
  // Integer outputs: element for element (the poison, left by an unwritten element, never matches).
  void expect_same_ints(const IntTwin& t, const std::string& what) {
    EXPECT_EQ(get_ints(*gpu_, t.gpu, t.n), get_ints(*cpu_, t.cpu, t.n)) << what;
  }
  // A log-sum-exp: −inf exactly where the CPU's is (a query that sees no key), the finite entries to tol.
  void expect_close_lse(const Twin& t, const std::string& what, double tol = kFp32Tol) {
    const FVec c = get(*cpu_, t.cpu, t.n), g = get(*gpu_, t.gpu, t.n);
    double diff = 0.0, ref = 0.0;
    std::size_t mismatched = 0;
    for (std::size_t i = 0; i < t.n; ++i) {
      const bool c_none = std::isinf(c[i]) && c[i] < 0, g_none = std::isinf(g[i]) && g[i] < 0;
      if (c_none || g_none || !std::isfinite(g[i])) {
        mismatched += c_none != g_none || (!g_none && !std::isfinite(g[i]));
        continue;
      }
      diff += (static_cast<double>(g[i]) - c[i]) * (static_cast<double>(g[i]) - c[i]);
      ref += static_cast<double>(c[i]) * c[i];
    }
    EXPECT_EQ(mismatched, 0u) << what << ": −inf where the CPU's is not, or the other way round, or not finite";
    const double e = ref > 0.0 ? std::sqrt(diff / ref) : std::sqrt(diff);
    EXPECT_LE(e, tol) << what << ": relative error " << e;
  }
  // Bit for bit (copies and zeros); a NaN left by an unwritten element never compares equal.
  void expect_identical(const Twin& t, const std::string& what) {
    const FVec c = get(*cpu_, t.cpu, t.n), g = get(*gpu_, t.gpu, t.n);
    std::size_t bad = 0, first = t.n;
    for (std::size_t i = 0; i < t.n; ++i) {
      if (!(g[i] == c[i]) || std::signbit(g[i]) != std::signbit(c[i])) {
        if (bad++ == 0) first = i;
      }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << t.n << " elements differ, the first at " << first
                       << " (gpu " << (first < t.n ? g[first] : 0.0f) << ", cpu " << (first < t.n ? c[first] : 0.0f)
                       << ")";
  }

  // ---- bf16 tensors ----
  // host values as a tensor of dtype t on the GPU and their (rounded) fp32 values on the CPU
  Typed put_typed(const FVec& host, DType t) {
    const FVec values = t == DType::bf16 ? bf16_values(host) : host;
    Typed x{cpu_->alloc_floats(host.size(), MemCategory::activations),
            gpu_->alloc_tensor(host.size(), t, MemCategory::activations), host.size()};
    cpu_->upload(x.cpu, values.data(), values.size() * sizeof(float));
    if (t == DType::bf16) {
      const BVec bits = to_bf16(values);
      gpu_->upload(x.gpu.data(), bits.data(), bits.size() * sizeof(uint16_t));
    } else {
      gpu_->upload(x.gpu.data(), values.data(), values.size() * sizeof(float));
    }
    return x;
  }
  Typed put_bf16(const FVec& host) { return put_typed(host, DType::bf16); }
  Typed poisoned_typed(std::size_t n, DType t) {
    return put_typed(FVec(n, std::numeric_limits<float>::quiet_NaN()), t);
  }
  // The GPU tensor's values as floats.
  FVec get_typed(ConstTensorPtr p, std::size_t n) {
    if (p.dtype() == DType::f32) return get(*gpu_, static_cast<const float*>(p.data()), n);
    BVec bits(n);
    gpu_->download(bits.data(), p.data(), n * sizeof(uint16_t));
    return to_f32(bits);
  }
  // The GPU's result to the CPU's fp32 one: fp32 to kFp32Tol, bf16 to tol (kBf16Tol: intermediates round
  // differently).
  void expect_typed_close(const Typed& t, const std::string& what, double bf16_tol = kBf16Tol) {
    const double e = rel_error_of(get_typed(t.gpu, t.n), get(*cpu_, t.cpu, t.n));
    const bool fp32 = t.gpu.dtype() == DType::f32;
    EXPECT_LE(e, fp32 ? kFp32Tol : bf16_tol) << what << " (" << dtype_name(t.gpu.dtype()) << "): relative error " << e;
  }
  // A bf16 result of an elementwise op: each element within one bf16 ulp of the CPU's fp32 result rounded.
  void expect_within_ulp(const Typed& t, const std::string& what) {
    ASSERT_EQ(t.gpu.dtype(), DType::bf16) << what;
    BVec bits(t.n);
    gpu_->download(bits.data(), t.gpu.data(), t.n * sizeof(uint16_t));
    const BVec ref = to_bf16(get(*cpu_, t.cpu, t.n));
    auto ordinal = [](uint16_t b) { return (b & 0x8000u) != 0 ? -static_cast<int>(b & 0x7FFFu) : static_cast<int>(b); };
    std::size_t bad = 0, first = 0;
    for (std::size_t i = 0; i < t.n; ++i) {
      const bool nan = (bits[i] & 0x7F80u) == 0x7F80u && (bits[i] & 0x007Fu) != 0;
      if (nan || std::abs(ordinal(bits[i]) - ordinal(ref[i])) > 1) {
        if (bad++ == 0) first = i;
      }
    }
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << t.n << " elements more than one bf16 ulp from the rounded "
                       << "fp32 result, the first at " << first;
  }

  // The fused attention of gpu_ on tensors of dtype t against the CPU's fp32 attention on the same values,
  // forward and backward, at each (B, S, C, heads, key/value heads) (grouped-query attention, SPEC 2.5, where
  // the last two differ); with `twice`, the backward again gives the same bits.
  void check_typed_attention(const std::vector<std::tuple<int, int, int, int, int>>& shapes, DType t,
                             const std::string& tag, bool twice) {
    for (auto [B, S, C, NH, KvH] : shapes) {
      const std::string shape = tag + "B" + std::to_string(B) + " S" + std::to_string(S) + " C" + std::to_string(C) +
                                " heads " + std::to_string(NH) + " kv heads " + std::to_string(KvH);
      const std::size_t width = C + 2 * std::size_t(KvH) * (C / NH);
      const std::size_t nqkv = std::size_t(B) * S * width, nout = std::size_t(B) * S * C;
      Typed qkv = put_typed(random(nqkv, -2.0f, 2.0f), t), out = poisoned_typed(nout, t);
      float* saved_cpu = cpu_->alloc_floats(cpu_->attention_saved_floats(B, S, NH), MemCategory::activations);
      float* saved_gpu = gpu_->alloc_floats(gpu_->attention_saved_floats(B, S, NH), MemCategory::activations);
      cpu_->attention_gqa_forward(out.cpu, saved_cpu, qkv.cpu, B, S, C, NH, KvH);
      gpu_->attention_gqa_forward(out.gpu, saved_gpu, qkv.gpu, B, S, C, NH, KvH);
      expect_typed_close(out, "attention_forward " + shape);
      Typed dout = put_typed(random(nout), t), dqkv = poisoned_typed(nqkv, t);
      float* scratch_cpu = cpu_->alloc_floats(cpu_->attention_scratch_floats(B, S, NH), MemCategory::workspace);
      float* scratch_gpu = gpu_->alloc_floats(gpu_->attention_scratch_floats(B, S, NH), MemCategory::workspace);
      cpu_->attention_gqa_backward(dqkv.cpu, scratch_cpu, dout.cpu, out.cpu, qkv.cpu, saved_cpu, B, S, C, NH, KvH);
      gpu_->attention_gqa_backward(dqkv.gpu, scratch_gpu, dout.gpu, out.gpu, qkv.gpu, saved_gpu, B, S, C, NH, KvH);
      expect_typed_close(dqkv, "attention_backward dqkv " + shape);
      if (!twice) continue;
      Typed again = poisoned_typed(nqkv, t);
      gpu_->attention_gqa_backward(again.gpu, scratch_gpu, dout.gpu, out.gpu, qkv.gpu, saved_gpu, B, S, C, NH, KvH);
      EXPECT_EQ(get_typed(again.gpu, nqkv), get_typed(dqkv.gpu, nqkv)) << "attention_backward twice " << shape;
    }
  }

  std::mt19937 rng_{20261126};
  std::unique_ptr<Backend> cpu_, gpu_;
};

TEST_F(CudaOps, MatmulForwardAndBackwardFp32AndBf16) {
  for (bool bf16 : {false, true}) {
    gpu_ = make_cuda_backend(0, bf16);
    const double tol = bf16 ? kBf16Tol : kFp32Tol;
    for (auto [N, C, OC] : {std::tuple{34, 72, 200}, std::tuple{256, 768, 2304}, std::tuple{7, 5, 3}}) {
      const std::string shape = (bf16 ? "bf16 " : "fp32 ") + std::to_string(N) + "x" + std::to_string(C) + "x" +
                                std::to_string(OC);
      Twin inp = put(random(std::size_t(N) * C)), w = put(random(std::size_t(C) * OC)), b = put(random(OC));
      Twin out = poisoned(std::size_t(N) * OC);
      cpu_->matmul_forward(out.cpu, inp.cpu, w.cpu, b.cpu, N, C, OC);
      gpu_->matmul_forward(out.gpu, inp.gpu, w.gpu, b.gpu, N, C, OC);
      expect_close(out, "matmul_forward with bias " + shape, tol);
      Twin out2 = poisoned(std::size_t(N) * OC);
      cpu_->matmul_forward(out2.cpu, inp.cpu, w.cpu, nullptr, N, C, OC);
      gpu_->matmul_forward(out2.gpu, inp.gpu, w.gpu, nullptr, N, C, OC);
      expect_close(out2, "matmul_forward without bias " + shape, tol);

      Twin dout = put(random(std::size_t(N) * OC)), dinp = poisoned(std::size_t(N) * C);
      Twin dw = put(random(std::size_t(C) * OC)), db = put(random(OC));  // accumulated into
      cpu_->matmul_backward(dinp.cpu, dw.cpu, db.cpu, dout.cpu, inp.cpu, w.cpu, N, C, OC);
      gpu_->matmul_backward(dinp.gpu, dw.gpu, db.gpu, dout.gpu, inp.gpu, w.gpu, N, C, OC);
      expect_close(dinp, "matmul_backward dinp " + shape, tol);
      expect_close(dw, "matmul_backward dweight " + shape, tol);
      expect_close(db, "matmul_backward dbias " + shape, kFp32Tol);  // a fp32 matrix-vector product
      Twin dw2 = put(random(std::size_t(C) * OC));
      cpu_->matmul_backward(nullptr, dw2.cpu, nullptr, dout.cpu, inp.cpu, w.cpu, N, C, OC);
      gpu_->matmul_backward(nullptr, dw2.gpu, nullptr, dout.gpu, inp.gpu, w.gpu, N, C, OC);
      expect_close(dw2, "matmul_backward dweight only " + shape, tol);
    }
  }
}

// The bf16 products take bf16 operands (CUDA_R_16BF, fp32 accumulation), which only the tensor cores
// run: at N = C = OC = 8192 (1.1 TFLOP a call) matmul_forward in bf16 must be at least 4× as fast as in
// fp32 (CUDA cores, TF32 off; an H100 or H200 is about 15× apart in peak), the operand conversion
// included. A bf16 mode that silently ran fp32 arithmetic would be about as fast as fp32 and fail. The
// bf16 result also agrees with the fp32 one to 1e-2.
TEST_F(CudaOps, Bf16MatmulIsTensorCoreFast) {
  constexpr int N = 8192, C = 8192, OC = 8192;
  constexpr int kTimed = 5;
  const double flop = 2.0 * N * C * OC;
  const FVec inp_host = random(std::size_t(N) * C), w_host = random(std::size_t(C) * OC);
  gpu_.reset();  // one backend at a time on the device
  auto run = [&](bool bf16, FVec& out_host) {
    std::unique_ptr<Backend> be = make_cuda_backend(0, bf16);
    float* inp = be->alloc_floats(inp_host.size(), MemCategory::activations);
    float* w = be->alloc_floats(w_host.size(), MemCategory::parameters);
    float* out = be->alloc_floats(std::size_t(N) * OC, MemCategory::activations);
    be->upload(inp, inp_host.data(), inp_host.size() * sizeof(float));
    be->upload(w, w_host.data(), w_host.size() * sizeof(float));
    be->matmul_forward(out, inp, w, nullptr, N, C, OC);  // warm-up: cuBLAS's heuristics, the bf16 scratch
    be->synchronize();
    std::vector<double> seconds;
    for (int i = 0; i < kTimed; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      be->matmul_forward(out, inp, w, nullptr, N, C, OC);
      be->synchronize();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    out_host.resize(std::size_t(N) * OC);
    be->download(out_host.data(), out, out_host.size() * sizeof(float));
    be->free(out);
    be->free(w);
    be->free(inp);
    std::sort(seconds.begin(), seconds.end());
    return seconds[kTimed / 2];
  };
  FVec out_fp32, out_bf16;
  const double t_fp32 = run(false, out_fp32), t_bf16 = run(true, out_bf16);
  std::printf("matmul_forward %dx%dx%d, median of %d: fp32 %.3f ms (%.1f TFLOP/s), bf16 %.3f ms (%.1f TFLOP/s), "
              "%.1fx\n",
              N, C, OC, kTimed, t_fp32 * 1e3, flop / t_fp32 / 1e12, t_bf16 * 1e3, flop / t_bf16 / 1e12,
              t_fp32 / t_bf16);
  RecordProperty("fp32_tflops", std::to_string(flop / t_fp32 / 1e12));
  RecordProperty("bf16_tflops", std::to_string(flop / t_bf16 / 1e12));
  EXPECT_GE(t_fp32 / t_bf16, 4.0) << "bf16 matmul_forward is not 4× as fast as fp32: no tensor cores?";
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = 0; i < out_fp32.size(); ++i) {
    diff += (static_cast<double>(out_bf16[i]) - out_fp32[i]) * (static_cast<double>(out_bf16[i]) - out_fp32[i]);
    ref += static_cast<double>(out_fp32[i]) * out_fp32[i];
  }
  EXPECT_LE(std::sqrt(diff / ref), kBf16Tol) << "bf16 against fp32 at 8192³";
}

TEST_F(CudaOps, LayerNormForwardAndBackward) {
  for (auto [N, C] : {std::pair{34, 72}, std::pair{300, 768}, std::pair{3, 5}}) {
    const std::string shape = std::to_string(N) + "x" + std::to_string(C);
    FVec x = random(std::size_t(N) * C, -3.0f, 3.0f);
    Twin inp = put(x), w = put(random(C)), b = put(random(C));
    Twin out = poisoned(std::size_t(N) * C), mean = poisoned(N), rstd = poisoned(N);
    cpu_->layernorm_forward(out.cpu, mean.cpu, rstd.cpu, inp.cpu, w.cpu, b.cpu, N, C);
    gpu_->layernorm_forward(out.gpu, mean.gpu, rstd.gpu, inp.gpu, w.gpu, b.gpu, N, C);
    expect_close(out, "layernorm_forward out " + shape);
    expect_close(mean, "layernorm_forward mean " + shape);
    expect_close(rstd, "layernorm_forward rstd " + shape);
    {  // the residual add fused with it, in place (out aliases a), as the model calls it
      Twin sum = put(random(std::size_t(N) * C, -3.0f, 3.0f)), branch = put(random(std::size_t(N) * C, -3.0f, 3.0f));
      Twin ln = poisoned(std::size_t(N) * C), m2 = poisoned(N), r2 = poisoned(N);
      cpu_->residual_layernorm_forward(sum.cpu, ln.cpu, m2.cpu, r2.cpu, sum.cpu, branch.cpu, w.cpu, b.cpu, N, C);
      gpu_->residual_layernorm_forward(sum.gpu, ln.gpu, m2.gpu, r2.gpu, sum.gpu, branch.gpu, w.gpu, b.gpu, N, C);
      expect_close(sum, "residual_layernorm_forward out " + shape);
      expect_close(ln, "residual_layernorm_forward ln_out " + shape);
      expect_close(m2, "residual_layernorm_forward mean " + shape);
      expect_close(r2, "residual_layernorm_forward rstd " + shape);
    }
    // The backward runs on each backend's own statistics; all three outputs accumulate.
    Twin dout = put(random(std::size_t(N) * C)), dinp = put(random(std::size_t(N) * C));
    Twin dw = put(random(C)), db = put(random(C));
    cpu_->layernorm_backward(dinp.cpu, dw.cpu, db.cpu, dout.cpu, inp.cpu, w.cpu, mean.cpu, rstd.cpu, N, C);
    gpu_->layernorm_backward(dinp.gpu, dw.gpu, db.gpu, dout.gpu, inp.gpu, w.gpu, mean.gpu, rstd.gpu, N, C);
    expect_close(dinp, "layernorm_backward dinp " + shape);
    expect_close(dw, "layernorm_backward dweight " + shape);
    expect_close(db, "layernorm_backward dbias " + shape);
    // Bitwise reproducible parameter gradients (sums over rows in a fixed order).
    auto param_grads = [&] {
      Twin dw0 = put(FVec(C, 0.0f)), db0 = put(FVec(C, 0.0f));
      gpu_->layernorm_backward(dinp.gpu, dw0.gpu, db0.gpu, dout.gpu, inp.gpu, w.gpu, mean.gpu, rstd.gpu, N, C);
      return std::pair{get(*gpu_, dw0.gpu, C), get(*gpu_, db0.gpu, C)};
    };
    EXPECT_EQ(param_grads(), param_grads()) << "layernorm_backward twice " << shape;
  }
}

TEST_F(CudaOps, FusedAttentionForwardAndBackward) {
  // Head dimensions 24, 64 and 128 (the limit); sequences that cross 32-key tiles unevenly.
  for (auto [B, S, C, NH] : {std::tuple{2, 70, 72, 3}, std::tuple{1, 33, 128, 2}, std::tuple{2, 130, 256, 2},
                             std::tuple{1, 1, 16, 4}}) {
    const std::string shape =
        "B" + std::to_string(B) + " S" + std::to_string(S) + " C" + std::to_string(C) + " heads " + std::to_string(NH);
    const std::size_t nqkv = std::size_t(B) * S * 3 * C, nout = std::size_t(B) * S * C;
    Twin qkv = put(random(nqkv, -2.0f, 2.0f));
    Twin out = poisoned(nout);
    float* saved_cpu = cpu_->alloc_floats(cpu_->attention_saved_floats(B, S, NH), MemCategory::activations);
    float* saved_gpu = gpu_->alloc_floats(gpu_->attention_saved_floats(B, S, NH), MemCategory::activations);
    cpu_->attention_forward(out.cpu, saved_cpu, qkv.cpu, B, S, C, NH);
    gpu_->attention_forward(out.gpu, saved_gpu, qkv.gpu, B, S, C, NH);
    expect_close(out, "attention_forward " + shape);

    Twin dout = put(random(nout)), dqkv = poisoned(nqkv);
    float* scratch_cpu = cpu_->alloc_floats(cpu_->attention_scratch_floats(B, S, NH), MemCategory::workspace);
    float* scratch_gpu = gpu_->alloc_floats(gpu_->attention_scratch_floats(B, S, NH), MemCategory::workspace);
    cpu_->attention_backward(dqkv.cpu, scratch_cpu, dout.cpu, out.cpu, qkv.cpu, saved_cpu, B, S, C, NH);
    gpu_->attention_backward(dqkv.gpu, scratch_gpu, dout.gpu, out.gpu, qkv.gpu, saved_gpu, B, S, C, NH);
    expect_close(dqkv, "attention_backward dqkv " + shape);

    // Bitwise reproducible: the same call again gives the same bits.
    Twin again = poisoned(nqkv);
    gpu_->attention_backward(again.gpu, scratch_gpu, dout.gpu, out.gpu, qkv.gpu, saved_gpu, B, S, C, NH);
    const FVec first = get(*gpu_, dqkv.gpu, nqkv), second = get(*gpu_, again.gpu, nqkv);
    EXPECT_EQ(0, std::memcmp(first.data(), second.data(), nqkv * sizeof(float))) << "attention_backward " << shape;
  }
  // The attention keeps statistics, not probabilities: no S×S buffer.
  EXPECT_FALSE(gpu_->attention_keeps_probabilities());
  EXPECT_EQ(gpu_->attention_saved_floats(2, 4096, 32), std::size_t(2) * 32 * 4096);
}

// ---- context parallelism (kernels/backend.h) ------------------------------------------------------------
// One rank of a zigzag context-parallel group over S = 4·half tokens: its queries at {0..half−1} ∪
// {3·half..4·half−1} with its own keys and values in its qkv buffer (stride 3C), the middle block packed
// (stride 2C; the first half of the queries sees none of it) and a block in the future of every query (out
// 0, lse −inf). The whole flash-style pass on both backends, each feeding its own results on: forward per
// block, merge, delta, every block's backward accumulating into random gradients.
std::vector<int32_t> cp_span(int first, int last) {
  std::vector<int32_t> p;
  for (int i = first; i <= last; ++i) p.push_back(i);
  return p;
}

TEST_F(CudaOps, ContextParallelAttention) {
  // head dimensions 24, 64, 128 (the limit), 3; query and key counts that cross the 8-row, 32- and 64-key tiles
  for (auto [B, half, C, NH] : {std::tuple{2, 35, 72, 3}, std::tuple{1, 65, 128, 2}, std::tuple{2, 20, 256, 2},
                                std::tuple{3, 3, 15, 5}}) {
    const std::string shape = "B" + std::to_string(B) + " half " + std::to_string(half) + " C" + std::to_string(C) +
                              " heads " + std::to_string(NH);
    const int Sq = 2 * half, Sk = 2 * half, Sf = 5;
    std::vector<int32_t> pos_q = cp_span(0, half - 1), pos_mid = cp_span(half, 3 * half - 1);
    for (int32_t p : cp_span(3 * half, 4 * half - 1)) pos_q.push_back(p);
    const std::vector<int32_t> pos_future = cp_span(4 * half, 4 * half + Sf - 1);
    const IntTwin d_pos_q = put_ints(pos_q), d_pos_mid = put_ints(pos_mid), d_pos_future = put_ints(pos_future);
    const std::size_t nqkv = std::size_t(B) * Sq * 3 * C, nout = std::size_t(B) * Sq * C;
    const std::size_t nkv = std::size_t(B) * Sk * 2 * C, nkvf = std::size_t(B) * Sf * 2 * C;
    const std::size_t nstat = std::size_t(B) * NH * Sq;
    Twin qkv = put(random(nqkv, -2.0f, 2.0f)), kv = put(random(nkv, -2.0f, 2.0f));
    Twin kvf = put(random(nkvf, -2.0f, 2.0f));
    // blocks: (k, v, stride, positions, Sk) on each backend
    struct Blk {
      const float* k;
      const float* v;
      int stride;
      const int32_t* pos;
      int S;
    };
    auto blocks = [&](bool gpu) {
      const float* q = gpu ? qkv.gpu : qkv.cpu;
      const float* m = gpu ? kv.gpu : kv.cpu;
      const float* f = gpu ? kvf.gpu : kvf.cpu;
      return std::vector<Blk>{{q + C, q + 2 * C, 3 * C, gpu ? d_pos_q.gpu : d_pos_q.cpu, Sq},
                              {m, m + C, 2 * C, gpu ? d_pos_mid.gpu : d_pos_mid.cpu, Sk},
                              {f, f + C, 2 * C, gpu ? d_pos_future.gpu : d_pos_future.cpu, Sf}};
    };
    const char* names[] = {"own block", "middle block", "future block"};

    // forward: block 0 into (out, lse), the others into (out_b, lse_b), each merged in
    Twin out = poisoned(nout), lse = poisoned(nstat);
    for (int i = 0; i < 3; ++i) {
      const std::string what = std::string(names[i]) + " " + shape;
      Twin ob = poisoned(nout), lb = poisoned(nstat);
      Twin& o = i == 0 ? out : ob;
      Twin& l = i == 0 ? lse : lb;
      for (bool gpu : {false, true}) {
        Backend& be = gpu ? *gpu_ : *cpu_;
        const Blk blk = blocks(gpu)[i];
        be.attention_block_forward(gpu ? o.gpu : o.cpu, gpu ? l.gpu : l.cpu, gpu ? qkv.gpu : qkv.cpu, blk.k, blk.v,
                                   3 * C, blk.stride, gpu ? d_pos_q.gpu : d_pos_q.cpu, blk.pos, B, Sq, blk.S, C, NH);
      }
      if (i == 2) {  // every query in its past: exactly 0 and −inf
        EXPECT_EQ(get(*gpu_, o.gpu, nout), FVec(nout, 0.0f)) << "attention_block_forward out " << what;
        EXPECT_EQ(get(*gpu_, l.gpu, nstat), FVec(nstat, -std::numeric_limits<float>::infinity())) << what;
      } else {
        expect_close(o, "attention_block_forward out " + what);
        expect_close_lse(l, "attention_block_forward lse " + what);
      }
      if (i == 0) continue;
      cpu_->attention_merge(out.cpu, lse.cpu, ob.cpu, lb.cpu, B, Sq, C, NH);
      gpu_->attention_merge(out.gpu, lse.gpu, ob.gpu, lb.gpu, B, Sq, C, NH);
      expect_close(out, "attention_merge out " + what);
      expect_close_lse(lse, "attention_merge lse " + what);
    }

    // backward: delta from the merged out, then every block's, accumulating
    Twin dout = put(random(nout)), delta = poisoned(nstat);
    cpu_->attention_block_delta(delta.cpu, dout.cpu, out.cpu, B, Sq, C, NH);
    gpu_->attention_block_delta(delta.gpu, dout.gpu, out.gpu, B, Sq, C, NH);
    expect_close(delta, "attention_block_delta " + shape);
    const FVec dqkv0 = random(nqkv), dkv0 = random(nkv), dkvf0 = random(nkvf);
    auto backward = [&](Backend& be, bool gpu, float* dqkv, float* dkv, float* dkvf) {
      float* dk[3] = {dqkv + C, dkv, dkvf};
      const std::vector<Blk> blks = blocks(gpu);
      for (int i = 0; i < 3; ++i) {
        be.attention_block_backward(dqkv, dk[i], dk[i] + C, gpu ? dout.gpu : dout.cpu,
                                    gpu ? lse.gpu : lse.cpu, gpu ? delta.gpu : delta.cpu, gpu ? qkv.gpu : qkv.cpu,
                                    blks[i].k, blks[i].v, 3 * C, blks[i].stride, gpu ? d_pos_q.gpu : d_pos_q.cpu,
                                    blks[i].pos, B, Sq, blks[i].S, C, NH);
      }
    };
    Twin dqkv = put(dqkv0), dkv = put(dkv0), dkvf = put(dkvf0);
    backward(*cpu_, false, dqkv.cpu, dkv.cpu, dkvf.cpu);
    backward(*gpu_, true, dqkv.gpu, dkv.gpu, dkvf.gpu);
    expect_close(dqkv, "attention_block_backward dq and the own dk, dv " + shape);
    expect_close(dkv, "attention_block_backward dk, dv of the middle block " + shape);
    EXPECT_EQ(get(*gpu_, dkvf.gpu, nkvf), dkvf0) << "the future block's dk, dv: nothing added " << shape;

    // bitwise reproducible: the same calls again from the same start
    Twin again_q = put(dqkv0), again_kv = put(dkv0), again_f = put(dkvf0);
    backward(*gpu_, true, again_q.gpu, again_kv.gpu, again_f.gpu);
    EXPECT_EQ(get(*gpu_, again_q.gpu, nqkv), get(*gpu_, dqkv.gpu, nqkv)) << "attention_block_backward twice " << shape;
    EXPECT_EQ(get(*gpu_, again_kv.gpu, nkv), get(*gpu_, dkv.gpu, nkv)) << "attention_block_backward twice " << shape;
  }
}

// copy_2d: the copied rows and columns bit for bit, every other float of dst unchanged (on both backends).
TEST_F(CudaOps, Copy2d) {
  struct Copy {
    std::size_t rows, cols, src_stride, dst_stride;
  };
  for (const Copy& cp : {Copy{5, 7, 10, 9}, Copy{300, 1536, 2304, 1536}, Copy{300, 1536, 1536, 2304},
                         Copy{64, 64, 64, 64}, Copy{1, 5, 2, 3}, Copy{3, 1, 2, 4}, Copy{0, 5, 6, 6},
                         Copy{4, 0, 6, 6}}) {
    const std::string what = "copy_2d rows " + std::to_string(cp.rows) + " cols " + std::to_string(cp.cols) +
                             " strides " + std::to_string(cp.src_stride) + ", " + std::to_string(cp.dst_stride);
    const std::size_t extra = 2;  // rows of dst past the copied ones
    Twin src = put(random((cp.rows + extra) * std::max(cp.src_stride, cp.cols)));
    Twin dst = put(random((cp.rows + extra) * std::max(cp.dst_stride, cp.cols)));
    cpu_->copy_2d(dst.cpu, cp.dst_stride, src.cpu, cp.src_stride, cp.rows, cp.cols);
    gpu_->copy_2d(dst.gpu, cp.dst_stride, src.gpu, cp.src_stride, cp.rows, cp.cols);
    expect_identical(dst, what);
  }
}

TEST_F(CudaOps, ElementwiseOps) {
  const std::size_t n = 100003;
  Twin x = put(random(n, -5.0f, 5.0f)), y = put(random(n)), dout = put(random(n));
  Twin g = poisoned(n);
  cpu_->gelu_forward(g.cpu, x.cpu, n);
  gpu_->gelu_forward(g.gpu, x.gpu, n);
  expect_close(g, "gelu_forward");
  Twin dg = poisoned(n);
  cpu_->gelu_backward(dg.cpu, x.cpu, dout.cpu, n);
  gpu_->gelu_backward(dg.gpu, x.gpu, dout.gpu, n);
  expect_close(dg, "gelu_backward");
  Twin sum = poisoned(n);
  cpu_->add(sum.cpu, x.cpu, y.cpu, n);
  gpu_->add(sum.gpu, x.gpu, y.gpu, n);
  expect_close(sum, "add");
  cpu_->accumulate(y.cpu, x.cpu, n);
  gpu_->accumulate(y.gpu, x.gpu, n);
  expect_close(y, "accumulate");
  cpu_->scale(y.cpu, -0.37f, n);
  gpu_->scale(y.gpu, -0.37f, n);
  expect_close(y, "scale");
  EXPECT_NEAR(cpu_->sum_squares(x.cpu, n), gpu_->sum_squares(x.gpu, n), 1e-9 * cpu_->sum_squares(x.cpu, n));
  EXPECT_EQ(gpu_->sum_squares(x.gpu, 0), 0.0);
}

TEST_F(CudaOps, EmbeddingForwardAndBackward) {
  const int B = 3, S = 37, C = 72, V = 67;
  std::vector<int32_t> tokens(B * S);
  std::uniform_int_distribution<int32_t> tok(-5, V - 1);  // negatives: another rank's vocabulary block
  for (int32_t& t : tokens) t = tok(rng_);
  tokens[0] = tokens[1] = tokens[2] = 7;  // repeated tokens: several rows into one gradient row
  int32_t* tc = put_tokens(*cpu_, tokens);
  int32_t* tg = put_tokens(*gpu_, tokens);
  Twin table = put(random(std::size_t(V) * C)), pos = put(random(std::size_t(S) * C));
  for (bool with_pos : {true, false}) {
    Twin out = poisoned(std::size_t(B) * S * C);
    cpu_->embedding_forward(out.cpu, tc, table.cpu, with_pos ? pos.cpu : nullptr, B, S, C);
    gpu_->embedding_forward(out.gpu, tg, table.gpu, with_pos ? pos.gpu : nullptr, B, S, C);
    expect_close(out, with_pos ? "embedding_forward" : "embedding_forward without positions");
  }
  Twin dout = put(random(std::size_t(B) * S * C));
  Twin dtok = put(random(std::size_t(V) * C)), dpos = put(random(std::size_t(S) * C));
  cpu_->embedding_backward(dtok.cpu, dpos.cpu, dout.cpu, tc, B, S, C);
  gpu_->embedding_backward(dtok.gpu, dpos.gpu, dout.gpu, tg, B, S, C);
  expect_close(dtok, "embedding_backward dtok");
  expect_close(dpos, "embedding_backward dpos");
  // Bitwise reproducible: one writer per element, rows added in token order.
  Twin d1 = put(FVec(std::size_t(V) * C, 0.0f)), d2 = put(FVec(std::size_t(V) * C, 0.0f));
  gpu_->embedding_backward(d1.gpu, nullptr, dout.gpu, tg, B, S, C);
  gpu_->embedding_backward(d2.gpu, nullptr, dout.gpu, tg, B, S, C);
  EXPECT_EQ(get(*gpu_, d1.gpu, d1.n), get(*gpu_, d2.gpu, d2.n)) << "embedding_backward twice";
}

TEST_F(CudaOps, CrossEntropyFusedAndVocabularyParallel) {
  // Rows Vp apart: the vocabulary padded as the model stores it (50257 → 50304).
  for (auto [N, V, Vp] : {std::tuple{34, 67, 67}, std::tuple{64, 50257, 50304}}) {
    const std::string shape = std::to_string(N) + "x" + std::to_string(V) + "/" + std::to_string(Vp);
    std::vector<int32_t> targets(N);
    std::uniform_int_distribution<int32_t> t(0, V - 1);
    for (int32_t& x : targets) x = t(rng_);
    int32_t* tc = put_tokens(*cpu_, targets);
    int32_t* tg = put_tokens(*gpu_, targets);
    FVec z = random(std::size_t(N) * Vp, -8.0f, 8.0f);
    z[5] = 120.0f;  // one dominant logit: the other probabilities underflow
    const float scale = 1.0f / (3.0f * N);
    auto loss_on = [&](Backend& be, double initial) {
      auto* p = static_cast<double*>(be.alloc(sizeof(double), MemCategory::activations));
      be.upload(p, &initial, sizeof(double));
      return p;
    };
    auto read_loss = [&](Backend& be, const double* p) {
      double v = 0.0;
      be.download(&v, p, sizeof(double));
      return v;
    };

    Twin logits = put(z);
    double* lc = loss_on(*cpu_, 0.25);
    double* lg = loss_on(*gpu_, 0.25);  // accumulated into
    cpu_->cross_entropy_forward_backward(logits.cpu, lc, tc, N, V, Vp, scale);
    gpu_->cross_entropy_forward_backward(logits.gpu, lg, tg, N, V, Vp, scale);
    expect_close(logits, "cross_entropy dlogits " + shape);
    EXPECT_NEAR(read_loss(*cpu_, lc), read_loss(*gpu_, lg), 1e-6 * std::abs(read_loss(*cpu_, lc))) << shape;

    // The vocabulary-parallel steps on one rank (no reductions between them); a fifth of the targets
    // belong to another rank's vocabulary block (negative).
    for (std::size_t i = 0; i < targets.size(); i += 5) targets[i] = -1;
    tc = put_tokens(*cpu_, targets);
    tg = put_tokens(*gpu_, targets);
    Twin logits2 = put(z), row_max = poisoned(N), sums = poisoned(2 * std::size_t(N));
    cpu_->cross_entropy_row_max(row_max.cpu, logits2.cpu, N, V, Vp);
    gpu_->cross_entropy_row_max(row_max.gpu, logits2.gpu, N, V, Vp);
    expect_close(row_max, "cross_entropy_row_max " + shape);
    cpu_->cross_entropy_partials(sums.cpu, logits2.cpu, tc, row_max.cpu, N, V, Vp);
    gpu_->cross_entropy_partials(sums.gpu, logits2.gpu, tg, row_max.gpu, N, V, Vp);
    expect_close(sums, "cross_entropy_partials " + shape);
    double* lc2 = loss_on(*cpu_, 0.0);
    double* lg2 = loss_on(*gpu_, 0.0);
    cpu_->cross_entropy_finish(logits2.cpu, lc2, tc, row_max.cpu, sums.cpu, N, V, Vp, scale);
    gpu_->cross_entropy_finish(logits2.gpu, lg2, tg, row_max.gpu, sums.gpu, N, V, Vp, scale);
    expect_close(logits2, "cross_entropy_finish dlogits " + shape);
    EXPECT_NEAR(read_loss(*cpu_, lc2), read_loss(*gpu_, lg2), 1e-6 * std::abs(read_loss(*cpu_, lc2))) << shape;
  }
}

// ---- mixture of experts (kernels/backend.h; SPEC section 9) ------------------------------------------
// N prime, and N > 256 (several blocks of the one-thread-per-token kernels); E = 1, 3, 5, 8, 40, and 300
// (several blocks of moe_assign's one thread per expert); k = 1, 2, 3, 4 and k = E; h odd, h > 32 (each
// lane of dgate's warp sums several columns) and h = 256.
struct MoeShape {
  int N, E, k, h;
};
const MoeShape kMoeShapes[] = {{37, 5, 2, 7}, {17, 3, 1, 13},  {29, 5, 3, 45},   {13, 3, 3, 5},   {1, 5, 5, 3},
                               {9, 1, 1, 4},  {64, 8, 2, 256}, {515, 40, 4, 33}, {101, 300, 2, 5}};

std::string moe_str(const MoeShape& sh) {
  return "N" + std::to_string(sh.N) + " E" + std::to_string(sh.E) + " k" + std::to_string(sh.k) + " h" +
         std::to_string(sh.h);
}

// (capacity, C): no limit (N: an expert takes each token at most once), the capacity of factor 1 with C
// equal to it (as the app runs) and with spare slots, 1, and 0 (every assignment dropped). C ≥ capacity
// slots per expert; unused slots are always left, so the zeroing of dispatch and combine's backward shows.
std::vector<std::pair<int, int>> moe_capacities(const MoeShape& sh) {
  const int factor1 = (sh.k * sh.N + sh.E - 1) / sh.E;
  return {{sh.N, sh.N}, {factor1, factor1}, {factor1, factor1 + 3}, {1, 2}, {0, 1}};
}

TEST_F(CudaOps, MixtureOfExperts) {
  bool saw_drops = false, saw_all_kept = false;
  for (const MoeShape& sh : kMoeShapes) {
    const int N = sh.N, E = sh.E, k = sh.k, h = sh.h;
    const std::string shape = moe_str(sh);
    const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E, nX = std::size_t(N) * h;

    // Logits in [−2, 2), expert 0 favoured on two tokens of three (so that a capacity of factor 1
    // drops), every fourth token's drawn from {0, 0.5, 1} (ties, also across the k-th place).
    FVec z = random(nP, -2.0f, 2.0f);
    std::uniform_int_distribution<int> level(0, 2);
    for (int n = 0; n < N; ++n) {
      float* row = z.data() + std::size_t(n) * E;
      if (n % 4 == 3) {
        for (int e = 0; e < E; ++e) row[e] = 0.5f * level(rng_);
      }
      if (n % 3 != 2) row[0] += 1.5f;
    }

    // Router: each backend's outputs feed its own later ops (the integer ones are equal or failed here).
    Twin logits = put(z), gate = poisoned(nA), probs = poisoned(nP);
    IntTwin expert = poisoned_ints(nA);
    cpu_->moe_router_forward(expert.cpu, gate.cpu, probs.cpu, logits.cpu, N, E, k);
    gpu_->moe_router_forward(expert.gpu, gate.gpu, probs.gpu, logits.gpu, N, E, k);
    expect_same_ints(expert, "moe_router_forward expert " + shape);
    expect_close(gate, "moe_router_forward gate " + shape);
    expect_close(probs, "moe_router_forward probs " + shape);

    Twin dgate = put(random(nA)), dlogits = poisoned(nP);  // overwritten
    cpu_->moe_router_backward(dlogits.cpu, dgate.cpu, gate.cpu, expert.cpu, N, E, k);
    gpu_->moe_router_backward(dlogits.gpu, dgate.gpu, gate.gpu, expert.gpu, N, E, k);
    expect_close(dlogits, "moe_router_backward dlogits " + shape);

    const auto capacities = moe_capacities(sh);
    for (std::size_t ci = 0; ci < capacities.size(); ++ci) {
      const int capacity = capacities[ci].first, C = capacities[ci].second;
      const std::string what = shape + " capacity " + std::to_string(capacity) + " C " + std::to_string(C);
      const std::size_t nB = std::size_t(E) * C * h;

      // Capacity: slots and counts, both overwritten.
      IntTwin slot = poisoned_ints(nA), counts = poisoned_ints(2 * std::size_t(E));
      cpu_->moe_assign(slot.cpu, counts.cpu, expert.cpu, N, E, k, capacity);
      gpu_->moe_assign(slot.gpu, counts.gpu, expert.gpu, N, E, k, capacity);
      expect_same_ints(slot, "moe_assign slot " + what);
      expect_same_ints(counts, "moe_assign counts " + what);
      const IVec slots = get_ints(*gpu_, slot.gpu, nA);
      const bool dropped = std::count(slots.begin(), slots.end(), -1) > 0;
      (dropped ? saw_drops : saw_all_kept) = true;

      // Auxiliary loss, accumulating into dlogits and aux_sum: from zeros (the increment alone) ...
      const float coef = 0.37f;
      Twin aux_dz = put(FVec(nP, 0.0f));
      double* aux_c = put_double(*cpu_, 0.25);
      double* aux_g = put_double(*gpu_, 0.25);
      cpu_->moe_aux_loss(aux_dz.cpu, aux_c, probs.cpu, counts.cpu, N, E, k, coef, 0.25f);
      gpu_->moe_aux_loss(aux_dz.gpu, aux_g, probs.gpu, counts.gpu, N, E, k, coef, 0.25f);
      expect_close(aux_dz, "moe_aux_loss dlogits from zero " + what);
      const double ref_aux = get_double(*cpu_, aux_c), gpu_aux = get_double(*gpu_, aux_g);
      EXPECT_NEAR(ref_aux, gpu_aux, 1e-6 * std::abs(ref_aux)) << "moe_aux_loss aux_sum " << what;
      EXPECT_GT(ref_aux, 0.25) << what;
      // ... and, once, onto the router's gradient (the app's order), at a grad_scale that makes the
      // two terms of a similar size.
      if (ci == 0) {
        cpu_->moe_aux_loss(dlogits.cpu, aux_c, probs.cpu, counts.cpu, N, E, k, coef, static_cast<float>(N));
        gpu_->moe_aux_loss(dlogits.gpu, aux_g, probs.gpu, counts.gpu, N, E, k, coef, static_cast<float>(N));
        expect_close(dlogits, "moe_router_backward + moe_aux_loss dlogits " + what);
        EXPECT_NEAR(get_double(*cpu_, aux_c), get_double(*gpu_, aux_g), 1e-6 * get_double(*cpu_, aux_c)) << what;
      }

      // Dispatch: buf zeroed, kept tokens copied (exact); its backward overwrites dinp.
      Twin inp = put(random(nX)), buf = poisoned(nB);
      cpu_->moe_dispatch(buf.cpu, inp.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
      gpu_->moe_dispatch(buf.gpu, inp.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
      expect_identical(buf, "moe_dispatch buf " + what);
      Twin dbuf = put(random(nB)), dinp = poisoned(nX);
      cpu_->moe_dispatch_backward(dinp.cpu, dbuf.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
      gpu_->moe_dispatch_backward(dinp.gpu, dbuf.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
      expect_close(dinp, "moe_dispatch_backward dinp " + what);

      // Combine of the experts' outputs y (every slot holds values), and its backward: dbuf zeroed
      // and scattered, dgate overwritten (0 for a dropped assignment).
      Twin y = put(random(nB)), out = poisoned(nX);
      cpu_->moe_combine(out.cpu, y.cpu, gate.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
      gpu_->moe_combine(out.gpu, y.gpu, gate.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
      expect_close(out, "moe_combine out " + what);
      Twin dout = put(random(nX)), cdbuf = poisoned(nB), cdgate = poisoned(nA);
      cpu_->moe_combine_backward(cdbuf.cpu, cdgate.cpu, dout.cpu, y.cpu, gate.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
      gpu_->moe_combine_backward(cdbuf.gpu, cdgate.gpu, dout.gpu, y.gpu, gate.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
      expect_close(cdbuf, "moe_combine_backward dbuf " + what);
      expect_close(cdgate, "moe_combine_backward dgate " + what);
      // Bitwise reproducible: dgate's warp sums in a fixed order.
      Twin again = poisoned(nA), again_dbuf = poisoned(nB);
      gpu_->moe_combine_backward(again_dbuf.gpu, again.gpu, dout.gpu, y.gpu, gate.gpu, expert.gpu, slot.gpu, N, E, k, C,
                                 h);
      const FVec first = get(*gpu_, cdgate.gpu, nA), second = get(*gpu_, again.gpu, nA);
      EXPECT_EQ(0, std::memcmp(first.data(), second.data(), nA * sizeof(float))) << "moe_combine_backward " << what;
    }
  }
  EXPECT_TRUE(saw_drops && saw_all_kept) << "the cases cover capacities that drop and that keep every assignment";
}

// Equal logits: the lower expert index first, also where the tie straddles the k-th place; rows far
// above and below 0 (exp over- and underflows in fp32 without the shift by the maximum). The rows of
// tests/unit/test_cpu_ops.cpp (MoeRouterTiesAndLargeLogits), with their expected order.
TEST_F(CudaOps, MixtureOfExpertsRouterTiesAndLargeLogits) {
  const int N = 6, E = 5;
  const FVec z = {1, 3, 3, 0, 3,                  // three-way tie for first
                  0, 0, 0, 0, 0,                  // all equal
                  2, 1, 1, 5, 1,                  // tie below the first pick
                  99, 104, 99, 104, 102,          // ties, exp(104) overflows fp32
                  -200, -100, -100, -300, -250,   // ties, exp(−200) underflows
                  0.5f, 0.5f, 0.25f, 0.5f, 0.75f};
  const int32_t order[N][E] = {{1, 2, 4, 0, 3}, {0, 1, 2, 3, 4}, {3, 0, 1, 2, 4},
                               {1, 3, 4, 0, 2}, {1, 2, 0, 4, 3}, {4, 0, 1, 3, 2}};
  Twin logits = put(z);
  for (int k : {1, 2, 3, E}) {
    const std::string what = "ties k" + std::to_string(k);
    const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E;
    Twin gate = poisoned(nA), probs = poisoned(nP);
    IntTwin expert = poisoned_ints(nA);
    cpu_->moe_router_forward(expert.cpu, gate.cpu, probs.cpu, logits.cpu, N, E, k);
    gpu_->moe_router_forward(expert.gpu, gate.gpu, probs.gpu, logits.gpu, N, E, k);
    expect_same_ints(expert, "moe_router_forward expert " + what);
    const IVec got = get_ints(*gpu_, expert.gpu, nA);
    for (int n = 0; n < N; ++n) {
      for (int j = 0; j < k; ++j) {
        EXPECT_EQ(got[std::size_t(n) * k + j], order[n][j]) << what << " row " << n << " pick " << j;
      }
    }
    expect_close(gate, "moe_router_forward gate " + what);
    expect_close(probs, "moe_router_forward probs " + what);
    Twin dgate = put(random(nA)), dlogits = poisoned(nP);
    cpu_->moe_router_backward(dlogits.cpu, dgate.cpu, gate.cpu, expert.cpu, N, E, k);
    gpu_->moe_router_backward(dlogits.gpu, dgate.gpu, gate.gpu, expert.gpu, N, E, k);
    expect_close(dlogits, "moe_router_backward dlogits " + what);
  }
}

TEST_F(CudaOps, CopyZeroUploadDownload) {
  const std::size_t n = 4099;
  const FVec x = random(n);
  Twin a = put(x), b = poisoned(n);
  gpu_->copy(b.gpu, a.gpu, n * sizeof(float));
  EXPECT_EQ(get(*gpu_, b.gpu, n), x);
  gpu_->zero(b.gpu, n * sizeof(float));
  EXPECT_EQ(get(*gpu_, b.gpu, n), FVec(n, 0.0f));
}

TEST_F(CudaOps, AdamW) {
  const std::size_t n = 70001;
  Twin p = put(random(n)), g = put(random(n, -0.1f, 0.1f)), m = put(random(n, -0.01f, 0.01f));
  Twin v = put(random(n, 0.0f, 1e-4f));
  for (int t = 1; t <= 3; ++t) {
    cpu_->adamw_update(p.cpu, g.cpu, m.cpu, v.cpu, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
    gpu_->adamw_update(p.gpu, g.gpu, m.gpu, v.gpu, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
  }
  expect_close(p, "adamw params");
  expect_close(m, "adamw m");
  expect_close(v, "adamw v");
}

TEST_F(CudaOps, CachingAllocatorReportsToTheTracker) {
  MemoryTracker& tr = gpu_->tracker();
  const int64_t before = tr.current(MemCategory::gradients);
  void* a = gpu_->alloc(1000, MemCategory::gradients);
  EXPECT_EQ(tr.current(MemCategory::gradients), before + 1000);
  gpu_->free(a);
  EXPECT_EQ(tr.current(MemCategory::gradients), before);
  void* b = gpu_->alloc(1000, MemCategory::optimizer_states);
  EXPECT_EQ(a, b) << "a freed block of the same size is reused";
  gpu_->zero(b, 1000);
  gpu_->free(b);
  EXPECT_GT(gpu_->device_memory_peak_bytes(), 0);
}

// ---- bf16 tensors (kernels/backend.h: each tensor in its own dtype) -------------------------------------
// Every op on bf16 tensors (cuBLAS included) against the CPU backend's fp32 op on fp32 tensors holding the
// same values: a bf16 output of an elementwise op within one bf16 ulp of the rounded fp32 result, one
// whose intermediates round differently (products, reductions, softmax) within kBf16Tol; an fp32 output
// of an op that only reads bf16 (statistics, losses, fp32 gradient accumulators) within kFp32Tol.
constexpr DType kF32 = DType::f32, kBf16 = DType::bf16;

TEST_F(CudaOps, Bf16TensorsMatmul) {
  for (bool bf16_matmul : {false, true}) {  // the mode rounds fp32 operands; bf16 tensors are used as they are
    gpu_ = make_cuda_backend(0, bf16_matmul);
    for (auto [N, C, OC] : {std::tuple{34, 72, 200}, std::tuple{256, 768, 2304}, std::tuple{7, 5, 3}}) {
      const std::string shape = std::string(bf16_matmul ? "bf16_matmul " : "") + std::to_string(N) + "x" +
                                std::to_string(C) + "x" + std::to_string(OC);
      Typed inp = put_bf16(random(std::size_t(N) * C)), w = put_bf16(random(std::size_t(C) * OC));
      Typed b = put_bf16(random(OC));
      Typed out = poisoned_typed(std::size_t(N) * OC, kBf16), out2 = poisoned_typed(std::size_t(N) * OC, kBf16);
      cpu_->matmul_forward(out.cpu, inp.cpu, w.cpu, b.cpu, N, C, OC);
      gpu_->matmul_forward(out.gpu, inp.gpu, w.gpu, b.gpu, N, C, OC);
      expect_typed_close(out, "matmul_forward with bias " + shape);
      cpu_->matmul_forward(out2.cpu, inp.cpu, w.cpu, nullptr, N, C, OC);
      gpu_->matmul_forward(out2.gpu, inp.gpu, w.gpu, nullptr, N, C, OC);
      expect_typed_close(out2, "matmul_forward without bias " + shape);
      // fc1 and its GELU: fused by cuBLASLt's GELU_AUX_BIAS epilogue where OC allows (200 and 2304: a
      // multiple of 8), the two ops otherwise; the pre-activation kept for backward either way.
      Typed act = poisoned_typed(std::size_t(N) * OC, kBf16), pre = poisoned_typed(std::size_t(N) * OC, kBf16);
      cpu_->matmul_gelu_forward(act.cpu, pre.cpu, inp.cpu, w.cpu, b.cpu, N, C, OC);
      gpu_->matmul_gelu_forward(act.gpu, pre.gpu, inp.gpu, w.gpu, b.gpu, N, C, OC);
      expect_typed_close(pre, "matmul_gelu_forward pre-activation " + shape);
      expect_typed_close(act, "matmul_gelu_forward GELU " + shape);
      // fc2's backward with GELU's (inp as fc2's input, weight as fc2's, dpre the gradient at fc1's output):
      // fused by cuBLASLt's DGELU epilogue where C allows (72 and 768: a multiple of 8), the two ops
      // otherwise; fc2's parameter gradients accumulated as matmul_backward's.
      {
        Typed pre_in = put_bf16(random(std::size_t(N) * C, -3.0f, 3.0f)), dy = put_bf16(random(std::size_t(N) * OC));
        Typed dpre = poisoned_typed(std::size_t(N) * C, kBf16);
        Typed dw = put_typed(random(std::size_t(C) * OC), kF32), db = put_typed(random(OC), kF32);
        cpu_->matmul_gelu_backward(dpre.cpu, dw.cpu, db.cpu, dy.cpu, inp.cpu, w.cpu, pre_in.cpu, N, C, OC);
        gpu_->matmul_gelu_backward(dpre.gpu, dw.gpu, db.gpu, dy.gpu, inp.gpu, w.gpu, pre_in.gpu, N, C, OC);
        expect_typed_close(dpre, "matmul_gelu_backward dpre " + shape);
        expect_typed_close(dw, "matmul_gelu_backward dweight " + shape);
        expect_typed_close(db, "matmul_gelu_backward dbias " + shape);
      }

      // backward on bf16 activations; dweight and dbias (accumulated into) in each dtype, and one of each
      Typed dout = put_bf16(random(std::size_t(N) * OC));
      for (auto [tw, tb] : {std::pair{kF32, kF32}, std::pair{kBf16, kBf16}, std::pair{kBf16, kF32}}) {
        const std::string what = shape + " dweight " + dtype_name(tw) + " dbias " + dtype_name(tb);
        Typed dinp = poisoned_typed(std::size_t(N) * C, kBf16);
        Typed dw = put_typed(random(std::size_t(C) * OC), tw), db = put_typed(random(OC), tb);
        cpu_->matmul_backward(dinp.cpu, dw.cpu, db.cpu, dout.cpu, inp.cpu, w.cpu, N, C, OC);
        gpu_->matmul_backward(dinp.gpu, dw.gpu, db.gpu, dout.gpu, inp.gpu, w.gpu, N, C, OC);
        expect_typed_close(dinp, "matmul_backward dinp " + what);
        expect_typed_close(dw, "matmul_backward dweight " + what);
        expect_typed_close(db, "matmul_backward dbias " + what);
      }
      // fp32 activations into bf16 parameter gradients (fp32 products, added and rounded once)
      Typed inp32 = put_typed(random(std::size_t(N) * C), kF32), w32 = put_typed(random(std::size_t(C) * OC), kF32);
      Typed dout32 = put_typed(random(std::size_t(N) * OC), kF32);
      Typed dw = put_bf16(random(std::size_t(C) * OC)), db = put_bf16(random(OC));
      cpu_->matmul_backward(nullptr, dw.cpu, db.cpu, dout32.cpu, inp32.cpu, w32.cpu, N, C, OC);
      gpu_->matmul_backward(nullptr, dw.gpu, db.gpu, dout32.gpu, inp32.gpu, w32.gpu, N, C, OC);
      expect_typed_close(dw, "matmul_backward bf16 dweight of fp32 activations " + shape);
      expect_typed_close(db, "matmul_backward bf16 dbias of fp32 activations " + shape);
    }
  }
  // activations and parameters of two dtypes: refused
  Typed a32 = put_typed(random(12), kF32), w16 = put_bf16(random(12)), o16 = poisoned_typed(9, kBf16);
  EXPECT_THROW(gpu_->matmul_forward(o16.gpu, a32.gpu, w16.gpu, nullptr, 3, 4, 3), std::invalid_argument);
  EXPECT_THROW(gpu_->matmul_backward(o16.gpu, a32.gpu, nullptr, a32.gpu, w16.gpu, w16.gpu, 3, 4, 3),
               std::invalid_argument);  // dout fp32, dinp, inp and weight bf16
}

// bf16 tensors as operands on the tensor cores (no conversion): at 8192³ matmul_forward on bf16 tensors at
// least 4× as fast as on fp32 tensors (CUDA cores, TF32 off), and within 1e-2 of it.
TEST_F(CudaOps, Bf16TensorMatmulIsTensorCoreFast) {
  constexpr int N = 8192, C = 8192, OC = 8192;
  constexpr int kTimed = 5;
  const double flop = 2.0 * N * C * OC;
  const FVec inp_host = random(std::size_t(N) * C), w_host = random(std::size_t(C) * OC);
  gpu_.reset();  // one backend at a time on the device
  auto run = [&](DType t, FVec& out_host) {
    std::unique_ptr<Backend> be = make_cuda_backend(0, /*bf16_matmul=*/false);
    TensorPtr inp = be->alloc_tensor(inp_host.size(), t, MemCategory::activations);
    TensorPtr w = be->alloc_tensor(w_host.size(), t, MemCategory::parameters);
    TensorPtr out = be->alloc_tensor(std::size_t(N) * OC, t, MemCategory::activations);
    for (auto [dst, src] : {std::pair{inp, &inp_host}, std::pair{w, &w_host}}) {
      if (t == kBf16) {
        const BVec bits = to_bf16(*src);
        be->upload(dst.data(), bits.data(), bits.size() * sizeof(uint16_t));
      } else {
        be->upload(dst.data(), src->data(), src->size() * sizeof(float));
      }
    }
    be->matmul_forward(out, inp, w, nullptr, N, C, OC);  // warm-up: cuBLAS's heuristics
    be->synchronize();
    std::vector<double> seconds;
    for (int i = 0; i < kTimed; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      be->matmul_forward(out, inp, w, nullptr, N, C, OC);
      be->synchronize();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    out_host.resize(std::size_t(N) * OC);
    if (t == kBf16) {
      BVec bits(out_host.size());
      be->download(bits.data(), out.data(), bits.size() * sizeof(uint16_t));
      out_host = to_f32(bits);
    } else {
      be->download(out_host.data(), out.data(), out_host.size() * sizeof(float));
    }
    be->free(out);
    be->free(w);
    be->free(inp);
    std::sort(seconds.begin(), seconds.end());
    return seconds[kTimed / 2];
  };
  FVec out_fp32, out_bf16;
  const double t_fp32 = run(kF32, out_fp32), t_bf16 = run(kBf16, out_bf16);
  std::printf("matmul_forward %dx%dx%d on fp32 and bf16 tensors, median of %d: fp32 %.3f ms (%.1f TFLOP/s), "
              "bf16 %.3f ms (%.1f TFLOP/s), %.1fx\n",
              N, C, OC, kTimed, t_fp32 * 1e3, flop / t_fp32 / 1e12, t_bf16 * 1e3, flop / t_bf16 / 1e12,
              t_fp32 / t_bf16);
  RecordProperty("bf16_tensor_tflops", std::to_string(flop / t_bf16 / 1e12));
  EXPECT_GE(t_fp32 / t_bf16, 4.0) << "matmul_forward on bf16 tensors is not 4× as fast as on fp32: no tensor cores?";
  EXPECT_LE(rel_error_of(out_bf16, out_fp32), kBf16Tol) << "bf16 tensors against fp32 at 8192³";
}

TEST_F(CudaOps, Bf16LayerNorm) {
  for (auto [N, C] : {std::pair{34, 72}, std::pair{300, 768}, std::pair{3, 5}}) {
    const std::string shape = std::to_string(N) + "x" + std::to_string(C);
    Typed inp = put_bf16(random(std::size_t(N) * C, -3.0f, 3.0f)), w = put_bf16(random(C)), b = put_bf16(random(C));
    Typed out = poisoned_typed(std::size_t(N) * C, kBf16);
    Twin mean = poisoned(N), rstd = poisoned(N);
    cpu_->layernorm_forward(out.cpu, mean.cpu, rstd.cpu, inp.cpu, w.cpu, b.cpu, N, C);
    gpu_->layernorm_forward(out.gpu, mean.gpu, rstd.gpu, inp.gpu, w.gpu, b.gpu, N, C);
    expect_typed_close(out, "layernorm_forward out " + shape);
    expect_close(mean, "layernorm_forward mean (fp32) " + shape);
    expect_close(rstd, "layernorm_forward rstd (fp32) " + shape);
    for (auto [tw, tb] : {std::pair{kBf16, kBf16}, std::pair{kF32, kBf16}}) {
      const std::string what = shape + " dweight " + dtype_name(tw) + " dbias " + dtype_name(tb);
      Typed dout = put_bf16(random(std::size_t(N) * C)), dinp = put_bf16(random(std::size_t(N) * C));
      Typed dw = put_typed(random(C), tw), db = put_typed(random(C), tb);
      cpu_->layernorm_backward(dinp.cpu, dw.cpu, db.cpu, dout.cpu, inp.cpu, w.cpu, mean.cpu, rstd.cpu, N, C);
      gpu_->layernorm_backward(dinp.gpu, dw.gpu, db.gpu, dout.gpu, inp.gpu, w.gpu, mean.gpu, rstd.gpu, N, C);
      expect_typed_close(dinp, "layernorm_backward dinp " + what);
      expect_typed_close(dw, "layernorm_backward dweight " + what);
      expect_typed_close(db, "layernorm_backward dbias " + what);
    }
  }
}

TEST_F(CudaOps, Bf16FusedAttention) {
  check_typed_attention({{2, 70, 72, 3, 3}, {1, 33, 128, 2, 2}, {2, 130, 256, 2, 2}, {1, 1, 16, 4, 4}}, kBf16, "",
                        false);
  Typed qkv = put_bf16(random(3 * 16)), out32 = poisoned_typed(16, kF32);
  float* saved = gpu_->alloc_floats(4, MemCategory::activations);
  EXPECT_THROW(gpu_->attention_forward(out32.gpu, saved, qkv.gpu, 1, 1, 16, 4), std::invalid_argument);
}

// ---- the Llama-style block (SPEC 2.5) -------------------------------------------------------------------
// Grouped-query attention in parabench's fused kernels, fp32 and bf16: groups of 2, 3 and 4 (multi-query),
// llama3-1b's heads; the backward twice gives the same bits.
TEST_F(CudaOps, GroupedQueryAttention) {
  for (DType t : {kF32, kBf16}) {
    check_typed_attention({{2, 70, 64, 4, 2}, {1, 130, 96, 6, 2}, {1, 33, 128, 4, 1}, {1, 256, 2048, 32, 8}}, t, "",
                          true);
  }
  Typed qkv = put_typed(random(4 * 16), kF32), out = poisoned_typed(16, kF32);
  float* saved = gpu_->alloc_floats(4, MemCategory::activations);
  EXPECT_THROW(gpu_->attention_gqa_forward(out.gpu, saved, qkv.gpu, 1, 1, 16, 4, 3), std::invalid_argument);
}

// RMSNorm (with the residual add), rotary positions and SwiGLU in fp32 and bf16, forward and backward,
// against the CPU's fp32 ops on the same values.
TEST_F(CudaOps, LlamaBlockOps) {
  for (DType t : {kF32, kBf16}) {
    for (auto [N, C] : {std::pair{34, 72}, std::pair{300, 2048}, std::pair{3, 5}}) {
      const std::string shape = std::string(dtype_name(t)) + " " + std::to_string(N) + "x" + std::to_string(C);
      const std::size_t n = std::size_t(N) * C;
      Typed inp = put_typed(random(n, -3.0f, 3.0f), t), w = put_typed(random(C, 0.5f, 1.5f), t);
      Typed out = poisoned_typed(n, t);
      Twin rstd = poisoned(N);
      cpu_->rmsnorm_forward(out.cpu, rstd.cpu, inp.cpu, w.cpu, N, C);
      gpu_->rmsnorm_forward(out.gpu, rstd.gpu, inp.gpu, w.gpu, N, C);
      expect_typed_close(out, "rmsnorm_forward out " + shape);
      expect_close(rstd, "rmsnorm_forward rstd (fp32) " + shape);
      Typed sum = put_typed(random(n, -3.0f, 3.0f), t), branch = put_typed(random(n, -3.0f, 3.0f), t);
      Typed norm = poisoned_typed(n, t);
      Twin r2 = poisoned(N);
      cpu_->residual_rmsnorm_forward(sum.cpu, norm.cpu, r2.cpu, sum.cpu, branch.cpu, w.cpu, N, C);
      gpu_->residual_rmsnorm_forward(sum.gpu, norm.gpu, r2.gpu, sum.gpu, branch.gpu, w.gpu, N, C);
      expect_typed_close(sum, "residual_rmsnorm_forward out " + shape);
      expect_typed_close(norm, "residual_rmsnorm_forward norm_out " + shape);
      for (DType tw : {t, kF32}) {
        const std::string what = shape + " dweight " + dtype_name(tw);
        Typed dout = put_typed(random(n), t), dinp = put_typed(random(n), t), dw = put_typed(random(C), tw);
        cpu_->rmsnorm_backward(dinp.cpu, dw.cpu, dout.cpu, inp.cpu, w.cpu, rstd.cpu, N, C);
        gpu_->rmsnorm_backward(dinp.gpu, dw.gpu, dout.gpu, inp.gpu, w.gpu, rstd.gpu, N, C);
        expect_typed_close(dinp, "rmsnorm_backward dinp " + what);
        expect_typed_close(dw, "rmsnorm_backward dweight " + what);
      }
    }
    // rotary positions on the K heads of a grouped qkv buffer, at context-parallel (unsorted) positions
    const int B = 2, S = 13, H = 4, KvH = 2, d = 64, C = H * d, W = C + 2 * KvH * d;
    const IntTwin pos = put_ints({0, 1, 2, 3, 40, 41, 42, 43, 8191, 8190, 9, 1000, 7});
    Typed x = put_typed(random(std::size_t(B) * S * W, -2.0f, 2.0f), t);
    auto at = [](const Typed& y, std::size_t offset) {  // (CPU, GPU) pointers `offset` elements in
      return std::pair{y.cpu + offset, TensorPtr(static_cast<char*>(y.gpu.data()) + offset * dtype_bytes(y.gpu.dtype()),
                                                 y.gpu.dtype())};
    };
    auto [xc, xg] = at(x, C);
    cpu_->rope_forward(xc, W, pos.cpu, B, S, KvH, d, 500000.0);
    gpu_->rope_forward(xg, W, pos.gpu, B, S, KvH, d, 500000.0);
    expect_typed_close(x, std::string("rope_forward ") + dtype_name(t));
    cpu_->rope_backward(xc, W, pos.cpu, B, S, KvH, d, 500000.0);
    gpu_->rope_backward(xg, W, pos.gpu, B, S, KvH, d, 500000.0);
    expect_typed_close(x, std::string("rope_backward ") + dtype_name(t));
    EXPECT_THROW(gpu_->rope_forward(xg, W, pos.gpu, B, S, KvH, 63, 10000.0), std::invalid_argument);
    // SwiGLU, the backward's dup in place of dout
    const std::size_t n = 100003;
    Typed gate = put_typed(random(n, -6.0f, 6.0f), t), up = put_typed(random(n, -2.0f, 2.0f), t);
    Typed act = poisoned_typed(n, t), dgate = poisoned_typed(n, t), dup = put_typed(random(n), t);
    cpu_->swiglu_forward(act.cpu, gate.cpu, up.cpu, n);
    gpu_->swiglu_forward(act.gpu, gate.gpu, up.gpu, n);
    expect_typed_close(act, std::string("swiglu_forward ") + dtype_name(t));
    cpu_->swiglu_backward(dgate.cpu, dup.cpu, dup.cpu, gate.cpu, up.cpu, n);
    gpu_->swiglu_backward(dgate.gpu, dup.gpu, dup.gpu, gate.gpu, up.gpu, n);
    expect_typed_close(dgate, std::string("swiglu_backward dgate ") + dtype_name(t));
    expect_typed_close(dup, std::string("swiglu_backward dup ") + dtype_name(t));
  }
}

#ifdef PB_WITH_CUDNN
// --attention cudnn: cuDNN's fused attention (kernels/cuda/cudnn_attention.h) on bf16 tensors against the
// CPU's fp32 attention on the same values, to the bf16 tolerance as parabench's own bf16 kernels; head
// dimensions 8 to 128, sequences that are no multiple of its tiles; the backward twice gives the same bits
// (the deterministic algorithm); fp32 tensors are refused.
TEST_F(CudaOps, CudnnFusedAttention) {
  gpu_ = make_cuda_backend(0, /*bf16_matmul=*/false, /*cudnn_attention=*/true);
  check_typed_attention({{2, 70, 72, 3, 3}, {1, 33, 128, 2, 2}, {2, 130, 256, 2, 2}, {1, 1, 16, 2, 2},
                         {2, 1024, 768, 12, 12}}, kBf16, "cuDNN ", true);
  // grouped-query attention (SPEC 2.5): groups of 2 and 4, multi-query, and llama3-1b's heads (32 of 64 over 8)
  check_typed_attention({{2, 130, 256, 4, 2}, {1, 70, 128, 4, 1}, {1, 512, 2048, 32, 8}}, kBf16, "cuDNN ", true);
  Typed qkv = put_typed(random(3 * 16), kF32), out32 = poisoned_typed(16, kF32);
  float* saved = gpu_->alloc_floats(4, MemCategory::activations);
  EXPECT_THROW(gpu_->attention_forward(out32.gpu, saved, qkv.gpu, 1, 1, 16, 2), std::invalid_argument);
}
#endif

// The zigzag pass of ContextParallelAttention on bf16 queries, keys and values, op by op: before each op
// the CPU's tensors take the GPU's values (so each comparison is of one op on the same inputs). The running
// out and every gradient (dq, dk, dv) in `out_dtype`, the blocks' partial outs bf16 (merged into an fp32
// out as well as a bf16 one). `mixed`: the middle block's keys and values fp32 with bf16 queries (the
// backend stages its inputs in fp32), and its dk fp32 while its dv is bf16 (staged, accumulated in fp32
// and rounded back).
TEST_F(CudaOps, Bf16ContextParallelAttention) {
  auto sync = [&](auto& x, std::size_t n) {  // the CPU's copy takes the GPU's values
    const FVec values = get_typed(x.gpu, n);
    cpu_->upload(x.cpu, values.data(), n * sizeof(float));
  };
  for (auto [B, half, C, NH] : {std::tuple{2, 35, 72, 3}, std::tuple{1, 65, 128, 2}, std::tuple{3, 3, 15, 5}}) {
    const std::string shape = "B" + std::to_string(B) + " half " + std::to_string(half) + " C" + std::to_string(C) +
                              " heads " + std::to_string(NH);
    for (auto [out_dtype, mixed] : {std::pair{kBf16, false}, std::pair{kF32, false}, std::pair{kBf16, true},
                                    std::pair{kF32, true}}) {
      const std::string what = shape + ", outputs " + dtype_name(out_dtype) + (mixed ? ", mixed dtypes" : "");
      const int Sq = 2 * half, Sk = 2 * half, Sf = 5;
      std::vector<int32_t> pos_q = cp_span(0, half - 1), pos_mid = cp_span(half, 3 * half - 1);
      for (int32_t p : cp_span(3 * half, 4 * half - 1)) pos_q.push_back(p);
      const std::vector<int32_t> pos_future = cp_span(4 * half, 4 * half + Sf - 1);
      const IntTwin d_pos_q = put_ints(pos_q), d_pos_mid = put_ints(pos_mid), d_pos_future = put_ints(pos_future);
      const std::size_t nqkv = std::size_t(B) * Sq * 3 * C, nout = std::size_t(B) * Sq * C;
      const std::size_t nkv = std::size_t(B) * Sk * 2 * C, nkvf = std::size_t(B) * Sf * 2 * C;
      const std::size_t nstat = std::size_t(B) * NH * Sq;
      Typed qkv = put_bf16(random(nqkv, -2.0f, 2.0f)), kv = put_typed(random(nkv, -2.0f, 2.0f), mixed ? kF32 : kBf16);
      Typed kvf = put_bf16(random(nkvf, -2.0f, 2.0f));
      struct Blk {
        const Typed* kv;
        int offset, stride;  // k at kv + offset, v at kv + offset + C
        const IntTwin* pos;
        int S;
      };
      const Blk blocks[] = {{&qkv, C, 3 * C, &d_pos_q, Sq}, {&kv, 0, 2 * C, &d_pos_mid, Sk},
                            {&kvf, 0, 2 * C, &d_pos_future, Sf}};
      const char* names[] = {"own block", "middle block", "future block"};
      auto at = [&](bool gpu, const Typed& x, int offset) { return gpu ? x.gpu + offset : TensorPtr(x.cpu + offset); };

      // forward: block 0 into (out, lse), the others into bf16 (out_b, lse_b), each merged in
      Typed out = poisoned_typed(nout, out_dtype);
      Twin lse = poisoned(nstat);
      for (int i = 0; i < 3; ++i) {
        const std::string bwhat = std::string(names[i]) + " " + what;
        const Blk& blk = blocks[i];
        Typed ob = poisoned_typed(nout, kBf16);
        Twin lb = poisoned(nstat);
        Typed& o = i == 0 ? out : ob;
        Twin& l = i == 0 ? lse : lb;
        for (bool gpu : {false, true}) {
          Backend& be = gpu ? *gpu_ : *cpu_;
          be.attention_block_forward(at(gpu, o, 0), gpu ? l.gpu : l.cpu, at(gpu, qkv, 0), at(gpu, *blk.kv, blk.offset),
                                     at(gpu, *blk.kv, blk.offset + C), 3 * C, blk.stride,
                                     gpu ? d_pos_q.gpu : d_pos_q.cpu, gpu ? blk.pos->gpu : blk.pos->cpu, B, Sq, blk.S,
                                     C, NH);
        }
        expect_typed_close(o, "attention_block_forward out " + bwhat);
        expect_close_lse(l, "attention_block_forward lse (fp32) " + bwhat);
        if (i == 0) continue;
        sync(out, nout);
        sync(lse, nstat);
        sync(ob, nout);
        sync(lb, nstat);
        cpu_->attention_merge(out.cpu, lse.cpu, ob.cpu, lb.cpu, B, Sq, C, NH);
        gpu_->attention_merge(out.gpu, lse.gpu, ob.gpu, lb.gpu, B, Sq, C, NH);
        expect_typed_close(out, "attention_merge out " + bwhat);
        expect_close_lse(lse, "attention_merge lse (fp32) " + bwhat);
      }
      sync(out, nout);
      sync(lse, nstat);

      // delta of bf16 dout and the merged out (fp32)
      Typed dout = put_bf16(random(nout));
      Twin delta = poisoned(nstat);
      cpu_->attention_block_delta(delta.cpu, dout.cpu, out.cpu, B, Sq, C, NH);
      gpu_->attention_block_delta(delta.gpu, dout.gpu, out.gpu, B, Sq, C, NH);
      expect_close(delta, "attention_block_delta (fp32) " + what);
      sync(delta, nstat);

      // backward, accumulating from the same values: dq and the own dk, dv in the (B, Sq, 3C) buffer; the
      // middle block's dk at column 0 of one (B, Sk, 2C) buffer and its dv at column C of another
      Typed dqkv = put_typed(random(nqkv), out_dtype), dk_mid = put_typed(random(nkv), mixed ? kF32 : out_dtype);
      Typed dv_mid = put_typed(random(nkv), mixed ? kBf16 : out_dtype), dkvf = put_typed(random(nkvf), out_dtype);
      const FVec dkvf0 = get_typed(dkvf.gpu, nkvf);
      for (bool gpu : {false, true}) {
        Backend& be = gpu ? *gpu_ : *cpu_;
        const TensorPtr dk[3] = {at(gpu, dqkv, C), at(gpu, dk_mid, 0), at(gpu, dkvf, 0)};
        const TensorPtr dv[3] = {at(gpu, dqkv, 2 * C), at(gpu, dv_mid, C), at(gpu, dkvf, C)};
        for (int i = 0; i < 3; ++i) {
          const Blk& blk = blocks[i];
          be.attention_block_backward(at(gpu, dqkv, 0), dk[i], dv[i], at(gpu, dout, 0), gpu ? lse.gpu : lse.cpu,
                                      gpu ? delta.gpu : delta.cpu, at(gpu, qkv, 0), at(gpu, *blk.kv, blk.offset),
                                      at(gpu, *blk.kv, blk.offset + C), 3 * C, blk.stride,
                                      gpu ? d_pos_q.gpu : d_pos_q.cpu, gpu ? blk.pos->gpu : blk.pos->cpu, B, Sq, blk.S,
                                      C, NH);
        }
      }
      expect_typed_close(dqkv, "attention_block_backward dq and the own dk, dv " + what);
      expect_typed_close(dk_mid, "attention_block_backward dk of the middle block " + what);
      expect_typed_close(dv_mid, "attention_block_backward dv of the middle block " + what);
      EXPECT_EQ(get_typed(dkvf.gpu, nkvf), dkvf0) << "the future block's dk, dv: nothing added " << what;
    }
  }
}

// gelu on [−3, 3] (below, 1 + tanh cancels and the CPU's tanh_approx is further than a bf16 ulp from the
// exact result), add, accumulate, convert and scale with any dtype per argument, Σx², copy_2d.
TEST_F(CudaOps, Bf16ElementwiseOps) {
  const std::size_t n = 100003;
  Typed x = put_bf16(random(n, -3.0f, 3.0f)), dout = put_bf16(random(n));
  Typed g = poisoned_typed(n, kBf16);
  cpu_->gelu_forward(g.cpu, x.cpu, n);
  gpu_->gelu_forward(g.gpu, x.gpu, n);
  expect_within_ulp(g, "gelu_forward");
  Typed dg = put_bf16(get(*cpu_, dout.cpu, n));  // dinp aliases dout
  cpu_->gelu_backward(dg.cpu, x.cpu, dg.cpu, n);
  gpu_->gelu_backward(dg.gpu, x.gpu, dg.gpu, n);
  expect_within_ulp(dg, "gelu_backward (in place)");

  for (DType to : {kF32, kBf16}) {
    for (DType ta : {kF32, kBf16}) {
      const std::string two = std::string(dtype_name(to)) + " " + dtype_name(ta);
      Typed a = put_typed(random(n, -5.0f, 5.0f), ta);
      for (DType tb : {kF32, kBf16}) {
        Typed b = put_typed(random(n), tb), sum = poisoned_typed(n, to);
        cpu_->add(sum.cpu, a.cpu, b.cpu, n);
        gpu_->add(sum.gpu, a.gpu, b.gpu, n);
        const std::string what = "add " + two + " " + dtype_name(tb);
        to == kBf16 ? expect_within_ulp(sum, what) : expect_typed_close(sum, what);
      }
      Typed y = put_typed(random(n), to);
      cpu_->accumulate(y.cpu, a.cpu, n);
      gpu_->accumulate(y.gpu, a.gpu, n);
      to == kBf16 ? expect_within_ulp(y, "accumulate " + two) : expect_typed_close(y, "accumulate " + two);
      // convert: fp32 → bf16 rounds to nearest even (the bits exactly), bf16 → fp32 and the same dtype exact
      Typed c = poisoned_typed(n, to);
      gpu_->convert(c.gpu, a.gpu, n);
      const FVec values = get(*cpu_, a.cpu, n);
      EXPECT_EQ(get_typed(c.gpu, n), to == kBf16 ? bf16_values(values) : values) << "convert " << two;
    }
  }
  Typed y = put_bf16(random(n));
  cpu_->scale(y.cpu, -0.37f, n);
  gpu_->scale(y.gpu, -0.37f, n);
  expect_within_ulp(y, "scale");
  const double ref_ss = cpu_->sum_squares(x.cpu, n);
  EXPECT_NEAR(gpu_->sum_squares(x.gpu, n), ref_ss, 1e-9 * ref_ss) << "sum_squares of bf16";

  // copy_2d in bf16: the element size from the dtype, bit for bit
  const std::size_t rows = 300, cols = 1536, src_stride = 2304, dst_stride = 1537;
  Typed src = put_bf16(random(rows * src_stride)), dst = put_bf16(random(rows * dst_stride));
  cpu_->copy_2d(dst.cpu, dst_stride, src.cpu, src_stride, rows, cols);
  gpu_->copy_2d(dst.gpu, dst_stride, src.gpu, src_stride, rows, cols);
  EXPECT_EQ(get_typed(dst.gpu, dst.n), get(*cpu_, dst.cpu, dst.n)) << "copy_2d bf16";

  // one dtype where the contract asks for one
  Typed o32 = poisoned_typed(8, kF32), i16 = put_bf16(random(8));
  EXPECT_THROW(gpu_->gelu_forward(o32.gpu, i16.gpu, 8), std::invalid_argument);
  EXPECT_THROW(gpu_->copy_2d(o32.gpu, 8, i16.gpu, 8, 1, 8), std::invalid_argument);
}

TEST_F(CudaOps, Bf16Embedding) {
  const int B = 3, S = 37, C = 72, V = 67;
  std::vector<int32_t> tokens(B * S);
  std::uniform_int_distribution<int32_t> tok(-5, V - 1);
  for (int32_t& t : tokens) t = tok(rng_);
  tokens[0] = tokens[1] = tokens[2] = tokens[B * S - 1] = 7;  // repeated tokens
  int32_t* tc = put_tokens(*cpu_, tokens);
  int32_t* tg = put_tokens(*gpu_, tokens);
  Typed table = put_bf16(random(std::size_t(V) * C)), pos = put_bf16(random(std::size_t(S) * C));
  for (bool with_pos : {true, false}) {
    Typed out = poisoned_typed(std::size_t(B) * S * C, kBf16);
    cpu_->embedding_forward(out.cpu, tc, table.cpu, with_pos ? pos.cpu : nullptr, B, S, C);
    gpu_->embedding_forward(out.gpu, tg, table.gpu, with_pos ? ConstTensorPtr(pos.gpu) : nullptr, B, S, C);
    expect_within_ulp(out, with_pos ? "embedding_forward" : "embedding_forward without positions");
  }
  Typed dout = put_bf16(random(std::size_t(B) * S * C));
  for (auto [ttok, tpos] : {std::pair{kBf16, kF32}, std::pair{kF32, kBf16}, std::pair{kBf16, kBf16}}) {
    const std::string what = std::string(" dtok ") + dtype_name(ttok) + " dpos " + dtype_name(tpos);
    Typed dtok = put_typed(random(std::size_t(V) * C), ttok), dpos = put_typed(random(std::size_t(S) * C), tpos);
    cpu_->embedding_backward(dtok.cpu, dpos.cpu, dout.cpu, tc, B, S, C);
    gpu_->embedding_backward(dtok.gpu, dpos.gpu, dout.gpu, tg, B, S, C);
    ttok == kBf16 ? expect_within_ulp(dtok, "embedding_backward dtok" + what)
                  : expect_typed_close(dtok, "embedding_backward dtok" + what);
    tpos == kBf16 ? expect_within_ulp(dpos, "embedding_backward dpos" + what)
                  : expect_typed_close(dpos, "embedding_backward dpos" + what);
  }
  // bitwise reproducible in bf16 too
  Typed d1 = put_bf16(FVec(std::size_t(V) * C, 0.0f)), d2 = put_bf16(FVec(std::size_t(V) * C, 0.0f));
  gpu_->embedding_backward(d1.gpu, nullptr, dout.gpu, tg, B, S, C);
  gpu_->embedding_backward(d2.gpu, nullptr, dout.gpu, tg, B, S, C);
  EXPECT_EQ(get_typed(d1.gpu, d1.n), get_typed(d2.gpu, d2.n)) << "embedding_backward twice (bf16)";
}

TEST_F(CudaOps, Bf16CrossEntropy) {
  // Rows Vp apart: the vocabulary padded as the model stores it (50257 → 50304).
  for (auto [N, V, Vp] : {std::tuple{34, 67, 67}, std::tuple{64, 50257, 50304}}) {
    const std::string shape = std::to_string(N) + "x" + std::to_string(V) + "/" + std::to_string(Vp);
    std::vector<int32_t> targets(N);
    std::uniform_int_distribution<int32_t> t(0, V - 1);
    for (int32_t& x : targets) x = t(rng_);
    FVec z = random(std::size_t(N) * Vp, -8.0f, 8.0f);
    z[5] = 120.0f;  // one dominant logit
    const float scale = 1.0f / (3.0f * N);
    Typed logits = put_bf16(z);
    double* lc = put_double(*cpu_, 0.25);
    double* lg = put_double(*gpu_, 0.25);
    cpu_->cross_entropy_forward_backward(logits.cpu, lc, put_tokens(*cpu_, targets), N, V, Vp, scale);
    gpu_->cross_entropy_forward_backward(logits.gpu, lg, put_tokens(*gpu_, targets), N, V, Vp, scale);
    expect_typed_close(logits, "cross_entropy dlogits " + shape);
    EXPECT_NEAR(get_double(*gpu_, lg), get_double(*cpu_, lc), kFp32Tol * std::abs(get_double(*cpu_, lc))) << shape;

    for (std::size_t i = 0; i < targets.size(); i += 5) targets[i] = -1;
    int32_t* tc = put_tokens(*cpu_, targets);
    int32_t* tg = put_tokens(*gpu_, targets);
    Typed logits2 = put_bf16(z);
    Twin row_max = poisoned(N), sums = poisoned(2 * std::size_t(N));
    cpu_->cross_entropy_row_max(row_max.cpu, logits2.cpu, N, V, Vp);
    gpu_->cross_entropy_row_max(row_max.gpu, logits2.gpu, N, V, Vp);
    expect_close(row_max, "cross_entropy_row_max (fp32) " + shape);
    cpu_->cross_entropy_partials(sums.cpu, logits2.cpu, tc, row_max.cpu, N, V, Vp);
    gpu_->cross_entropy_partials(sums.gpu, logits2.gpu, tg, row_max.gpu, N, V, Vp);
    expect_close(sums, "cross_entropy_partials (fp32) " + shape);
    double* lc2 = put_double(*cpu_, 0.0);
    double* lg2 = put_double(*gpu_, 0.0);
    cpu_->cross_entropy_finish(logits2.cpu, lc2, tc, row_max.cpu, sums.cpu, N, V, Vp, scale);
    gpu_->cross_entropy_finish(logits2.gpu, lg2, tg, row_max.gpu, sums.gpu, N, V, Vp, scale);
    expect_typed_close(logits2, "cross_entropy_finish dlogits " + shape);
    EXPECT_NEAR(get_double(*gpu_, lg2), get_double(*cpu_, lc2), kFp32Tol * std::abs(get_double(*cpu_, lc2))) << shape;
  }
}

// The mixture-of-experts ops on bf16 logits, dlogits and token buffers (gates, probabilities, dgate fp32):
// the routing exact, dispatch bit for bit, the sums of a few terms within one ulp.
TEST_F(CudaOps, Bf16MixtureOfExperts) {
  for (const MoeShape& sh : {kMoeShapes[0], kMoeShapes[2], kMoeShapes[6], kMoeShapes[7]}) {
    const int N = sh.N, E = sh.E, k = sh.k, h = sh.h;
    const int capacity = (k * N + E - 1) / E, C = capacity + 3;
    const std::string what = moe_str(sh) + " capacity " + std::to_string(capacity);
    const std::size_t nA = std::size_t(N) * k, nP = std::size_t(N) * E, nX = std::size_t(N) * h,
                      nB = std::size_t(E) * C * h;
    FVec z = random(nP, -2.0f, 2.0f);
    for (int n = 0; n < N; ++n) z[std::size_t(n) * E] += n % 3 != 2 ? 1.5f : 0.0f;
    Typed logits = put_bf16(z);
    Twin gate = poisoned(nA), probs = poisoned(nP);
    IntTwin expert = poisoned_ints(nA);
    cpu_->moe_router_forward(expert.cpu, gate.cpu, probs.cpu, logits.cpu, N, E, k);
    gpu_->moe_router_forward(expert.gpu, gate.gpu, probs.gpu, logits.gpu, N, E, k);
    expect_same_ints(expert, "moe_router_forward expert " + what);
    expect_close(gate, "moe_router_forward gate (fp32) " + what);
    expect_close(probs, "moe_router_forward probs (fp32) " + what);
    Twin dgate = put(random(nA));
    Typed dlogits = poisoned_typed(nP, kBf16);
    cpu_->moe_router_backward(dlogits.cpu, dgate.cpu, gate.cpu, expert.cpu, N, E, k);
    gpu_->moe_router_backward(dlogits.gpu, dgate.gpu, gate.gpu, expert.gpu, N, E, k);
    expect_typed_close(dlogits, "moe_router_backward dlogits " + what);

    IntTwin slot = poisoned_ints(nA), counts = poisoned_ints(2 * std::size_t(E));
    cpu_->moe_assign(slot.cpu, counts.cpu, expert.cpu, N, E, k, capacity);
    gpu_->moe_assign(slot.gpu, counts.gpu, expert.gpu, N, E, k, capacity);
    expect_same_ints(slot, "moe_assign slot " + what);
    double* aux_c = put_double(*cpu_, 0.0);
    double* aux_g = put_double(*gpu_, 0.0);
    Typed aux_dz = put_bf16(random(nP));
    cpu_->moe_aux_loss(aux_dz.cpu, aux_c, probs.cpu, counts.cpu, N, E, k, 0.37f, static_cast<float>(N));
    gpu_->moe_aux_loss(aux_dz.gpu, aux_g, probs.gpu, counts.gpu, N, E, k, 0.37f, static_cast<float>(N));
    expect_typed_close(aux_dz, "moe_aux_loss dlogits " + what);
    EXPECT_NEAR(get_double(*gpu_, aux_g), get_double(*cpu_, aux_c), 1e-6 * get_double(*cpu_, aux_c)) << what;

    Typed inp = put_bf16(random(nX)), buf = poisoned_typed(nB, kBf16);
    cpu_->moe_dispatch(buf.cpu, inp.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
    gpu_->moe_dispatch(buf.gpu, inp.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
    EXPECT_EQ(get_typed(buf.gpu, nB), get(*cpu_, buf.cpu, nB)) << "moe_dispatch buf " << what;
    Typed dbuf = put_bf16(random(nB)), dinp = poisoned_typed(nX, kBf16);
    cpu_->moe_dispatch_backward(dinp.cpu, dbuf.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
    gpu_->moe_dispatch_backward(dinp.gpu, dbuf.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
    expect_within_ulp(dinp, "moe_dispatch_backward dinp " + what);

    Typed y = put_bf16(random(nB)), out = poisoned_typed(nX, kBf16);
    cpu_->moe_combine(out.cpu, y.cpu, gate.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
    gpu_->moe_combine(out.gpu, y.gpu, gate.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
    expect_within_ulp(out, "moe_combine out " + what);
    Typed cdout = put_bf16(random(nX)), cdbuf = poisoned_typed(nB, kBf16);
    Twin cdgate = poisoned(nA);
    cpu_->moe_combine_backward(cdbuf.cpu, cdgate.cpu, cdout.cpu, y.cpu, gate.cpu, expert.cpu, slot.cpu, N, E, k, C, h);
    gpu_->moe_combine_backward(cdbuf.gpu, cdgate.gpu, cdout.gpu, y.gpu, gate.gpu, expert.gpu, slot.gpu, N, E, k, C, h);
    expect_within_ulp(cdbuf, "moe_combine_backward dbuf " + what);
    expect_close(cdgate, "moe_combine_backward dgate (fp32) " + what);
  }
}

TEST_F(CudaOps, Bf16GradientsAdamW) {
  const std::size_t n = 70001;
  Twin p = put(random(n)), m = put(random(n, -0.01f, 0.01f)), v = put(random(n, 0.0f, 1e-4f));
  Typed g = put_bf16(random(n, -0.1f, 0.1f));
  for (int t = 1; t <= 3; ++t) {
    cpu_->adamw_update(p.cpu, g.cpu, m.cpu, v.cpu, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
    gpu_->adamw_update(p.gpu, g.gpu, m.gpu, v.gpu, n, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f);
  }
  expect_close(p, "adamw params (bf16 gradients)");
  expect_close(m, "adamw m (bf16 gradients)");
  expect_close(v, "adamw v (bf16 gradients)");
}

}  // namespace
}  // namespace pb
