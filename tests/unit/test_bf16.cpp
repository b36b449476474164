// bf16 on the CPU: the rounding of kernels/cpu/bf16.h, the products of kernels/cpu/bf16_gemm.h and the
// CPU backend's matrix products with bf16 operands, against float64 references.
//
// Rounding: every fp32 → bf16 conversion equals the nearer of the two bf16 neighbours of the value
// (computed here in double), ties to the even one; infinities and NaNs keep their kind and sign.
// Products: with bf16 operands, products of two bf16 numbers are exact in fp32, so the only error is
// the fp32 accumulation: ≤ 1e-5 relative against a double reference from the same rounded operands, for
// every combination of transposes, β = 0 and 1, leading dimensions wider than the rows, odd sizes and
// K = 0. The backend's products with --dtype bf16 equal that reference (≤ 1e-5) and differ from the fp32
// products by bf16's rounding (between 1e-5 and 2e-2 relative), so a silent fp32 path fails.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/bf16_gemm.h"
#include "kernels/cpu/cpu_backend.h"

namespace {

using pb::cpu::bf16_to_float;
using pb::cpu::float_to_bf16;

// The bf16 nearest to x by exhaustive comparison of its two neighbours in double (ties: even).
uint16_t nearest_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation: towards zero in magnitude
  if ((u & 0xFFFFu) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // next in magnitude (may be inf)
  const double dx = std::fabs(static_cast<double>(x));
  const double dlo = std::fabs(dx - std::fabs(static_cast<double>(bf16_to_float(lo))));
  const double hi_value = std::fabs(static_cast<double>(bf16_to_float(hi)));
  // rounding past the largest finite bf16 goes to infinity as IEEE's round-to-nearest does: the
  // halfway point to the next (unrepresentable) power of two is the threshold
  const double dhi = std::isinf(hi_value) ? std::fabs(dx - std::ldexp(1.0, 128)) : std::fabs(dx - hi_value);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1u) == 0 ? lo : hi;
}

TEST(Bf16, RoundsToNearestEven) {
  // ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 → 1 (even); 1 + 3·2^-8 → 1 + 2^-6 (even)
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(bf16_to_float(float_to_bf16(-1.0f - std::ldexp(1.0f, -8))), -1.0f);
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // beyond bf16's largest: inf
  const uint16_t nan = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(bf16_to_float(nan)));
  uint32_t signalling = 0x7F800001u;  // a NaN whose payload lies in the dropped bits: must stay NaN
  float s;
  std::memcpy(&s, &signalling, sizeof s);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(s))));

  std::mt19937 rng(14);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = bits(rng);
    float x;
    std::memcpy(&x, &u, sizeof x);
    if (std::isnan(x)) continue;
    ASSERT_EQ(float_to_bf16(x), nearest_bf16(x)) << "x = " << x << " bits " << std::hex << u;
  }
  // denormals and values near 1
  for (uint32_t u : {0x00000001u, 0x00008000u, 0x00018000u, 0x007FFFFFu, 0x3F808000u, 0x3F818000u, 0x3F80FFFFu}) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    EXPECT_EQ(float_to_bf16(x), nearest_bf16(x)) << std::hex << u;
  }
}

TEST(Bf16, ToBf16OverABuffer) {
  std::vector<float> x(1001);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  std::vector<uint16_t> b(x.size());
  pb::cpu::to_bf16(b.data(), x.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ASSERT_EQ(b[i], nearest_bf16(x[i]));
}

double relative_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

std::vector<float> random_values(std::size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

struct GemmCase {
  bool trans_a, trans_b;
  int M, N, K, pad;  // pad: leading dimensions exceed the stored rows by this much
  float beta;
};

TEST(Bf16Gemm, MatchesDoubleReferenceOfRoundedOperands) {
  pb::cpu::Bf16Gemm gemm;
  for (const GemmCase c : {GemmCase{false, false, 37, 29, 53, 0, 0.0f}, GemmCase{false, true, 37, 29, 53, 0, 1.0f},
                           GemmCase{true, false, 37, 29, 53, 3, 1.0f}, GemmCase{true, true, 37, 29, 53, 5, 0.0f},
                           GemmCase{false, false, 1, 67, 72, 0, 1.0f}, GemmCase{true, false, 72, 40, 34, 0, 1.0f},
                           GemmCase{false, false, 64, 256, 64, 0, 0.0f}}) {
    SCOPED_TRACE(::testing::Message() << "transA " << c.trans_a << " transB " << c.trans_b << " M " << c.M << " N "
                                      << c.N << " K " << c.K << " pad " << c.pad << " beta " << c.beta);
    const int a_rows = c.trans_a ? c.K : c.M, a_cols = c.trans_a ? c.M : c.K;
    const int b_rows = c.trans_b ? c.N : c.K, b_cols = c.trans_b ? c.K : c.N;
    const int lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
    std::vector<float> a = random_values(static_cast<std::size_t>(a_rows) * lda, 1);
    std::vector<float> b = random_values(static_cast<std::size_t>(b_rows) * ldb, 2);
    std::vector<float> cmat = random_values(static_cast<std::size_t>(c.M) * ldc, 3);
    std::vector<uint16_t> ab(a.size()), bb(b.size());
    pb::cpu::to_bf16(ab.data(), a.data(), a.size());
    pb::cpu::to_bf16(bb.data(), b.data(), b.size());
    std::vector<double> ref(static_cast<std::size_t>(c.M) * c.N);
    for (int i = 0; i < c.M; ++i) {
      for (int j = 0; j < c.N; ++j) {
        double acc = c.beta * static_cast<double>(cmat[static_cast<std::size_t>(i) * ldc + j]);
        for (int k = 0; k < c.K; ++k) {
          const uint16_t av = c.trans_a ? ab[static_cast<std::size_t>(k) * lda + i] : ab[static_cast<std::size_t>(i) * lda + k];
          const uint16_t bv = c.trans_b ? bb[static_cast<std::size_t>(j) * ldb + k] : bb[static_cast<std::size_t>(k) * ldb + j];
          acc += static_cast<double>(bf16_to_float(av)) * bf16_to_float(bv);
        }
        ref[static_cast<std::size_t>(i) * c.N + j] = acc;
      }
    }
    std::vector<float> out = cmat;
    if (c.beta == 0.0f) {  // β = 0 must overwrite: the product's elements start as NaN
      for (int i = 0; i < c.M; ++i) {
        for (int j = 0; j < c.N; ++j) out[static_cast<std::size_t>(i) * ldc + j] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    gemm.run(c.trans_a, c.trans_b, c.M, c.N, c.K, ab.data(), lda, bb.data(), ldb, c.beta, out.data(), ldc);
    std::vector<float> got(ref.size());
    for (int i = 0; i < c.M; ++i) {
      for (int j = 0; j < c.N; ++j) got[static_cast<std::size_t>(i) * c.N + j] = out[static_cast<std::size_t>(i) * ldc + j];
      for (int j = c.N; j < ldc; ++j) {  // the padding between rows of C is never written
        ASSERT_EQ(out[static_cast<std::size_t>(i) * ldc + j], cmat[static_cast<std::size_t>(i) * ldc + j]);
      }
    }
    EXPECT_LE(relative_error(got, ref), 1e-5);
  }
}

TEST(Bf16Gemm, EmptySumLeavesOrZeroesC) {
  pb::cpu::Bf16Gemm gemm;
  std::vector<float> c(6, 5.0f);
  gemm.run(false, false, 2, 3, 0, nullptr, 1, nullptr, 3, 1.0f, c.data(), 3);
  for (float v : c) EXPECT_EQ(v, 5.0f);
  gemm.run(false, false, 2, 3, 0, nullptr, 1, nullptr, 3, 0.0f, c.data(), 3);
  for (float v : c) EXPECT_EQ(v, 0.0f);
  EXPECT_THROW(gemm.run(false, false, 2, 3, 1, nullptr, 1, nullptr, 3, 0.5f, c.data(), 3), std::invalid_argument);
}

TEST(Bf16Gemm, SaysWhichLibraryRunsIt) {
  const std::string library = pb::cpu::bf16_gemm_library();
  if (pb::cpu::bf16_gemm_native()) {
    EXPECT_NE(library.find("oneDNN"), std::string::npos) << library;
  } else {
    EXPECT_NE(library.find("fp32 sgemm on bf16-rounded operands"), std::string::npos) << library;
  }
  std::printf("bf16 GEMM on this machine: %s\n", library.c_str());
}

// The backend's forward and backward products with bf16 operands.
class CpuBf16Matmul : public ::testing::Test {
 protected:
  static constexpr int N = 34, C = 72, OC = 40;
  std::unique_ptr<pb::Backend> bf16 = pb::make_cpu_backend(2, true);
  std::unique_ptr<pb::Backend> fp32 = pb::make_cpu_backend(2, false);

  std::vector<float> run(pb::Backend& be, const std::vector<std::vector<float>>& inputs,
                         const std::function<void(pb::Backend&, std::vector<float*>&)>& op, std::size_t result,
                         std::size_t result_size) {
    std::vector<float*> ptrs;
    for (const auto& v : inputs) {
      float* p = be.alloc_floats(v.size(), pb::MemCategory::workspace);
      be.upload(p, v.data(), v.size() * sizeof(float));
      ptrs.push_back(p);
    }
    op(be, ptrs);
    std::vector<float> out(result_size);
    be.download(out.data(), ptrs[result], result_size * sizeof(float));
    for (float* p : ptrs) be.free(p);
    return out;
  }
  static double round_trip(float x) { return bf16_to_float(float_to_bf16(x)); }
};

TEST_F(CpuBf16Matmul, ForwardRoundsOperandsAndAccumulatesInFp32) {
  EXPECT_NE(bf16->matmul_precision().find("bf16 operands, fp32 accumulation"), std::string::npos);
  EXPECT_EQ(fp32->matmul_precision().rfind("fp32: ", 0), 0u) << fp32->matmul_precision();  // and its sgemm library
  const auto inp = random_values(N * C, 11), w = random_values(C * OC, 12), bias = random_values(OC, 13);
  const std::vector<float> poison(N * OC, std::numeric_limits<float>::quiet_NaN());
  auto op = [](pb::Backend& be, std::vector<float*>& p) { be.matmul_forward(p[3], p[0], p[1], p[2], N, C, OC); };
  const auto got = run(*bf16, {inp, w, bias, poison}, op, 3, N * OC);
  const auto got32 = run(*fp32, {inp, w, bias, poison}, op, 3, N * OC);
  std::vector<double> ref(N * OC), ref32(N * OC);
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < OC; ++o) {
      double acc = bias[o], acc32 = bias[o];  // the bias is added in fp32, not rounded
      for (int c = 0; c < C; ++c) {
        acc += round_trip(inp[n * C + c]) * round_trip(w[c * OC + o]);
        acc32 += static_cast<double>(inp[n * C + c]) * w[c * OC + o];
      }
      ref[n * OC + o] = acc;
      ref32[n * OC + o] = acc32;
    }
  }
  EXPECT_LE(relative_error(got, ref), 1e-5);
  const double rounding = relative_error(got, ref32);  // bf16's 8 bits: about 2^-9 per operand
  EXPECT_GT(rounding, 1e-5);
  EXPECT_LT(rounding, 2e-2);
  EXPECT_LE(relative_error(got32, ref32), 1e-5);
}

TEST_F(CpuBf16Matmul, BackwardRoundsOperandsAndAccumulatesIntoFp32) {
  const auto inp = random_values(N * C, 21), w = random_values(C * OC, 22), dout = random_values(N * OC, 23);
  const auto dw0 = random_values(C * OC, 24);  // dweight accumulates onto what is there
  const std::vector<float> poison(N * C, std::numeric_limits<float>::quiet_NaN());
  std::vector<double> ref_dinp(N * C), ref_dw(C * OC);
  for (int n = 0; n < N; ++n) {
    for (int c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int o = 0; o < OC; ++o) acc += round_trip(dout[n * OC + o]) * round_trip(w[c * OC + o]);
      ref_dinp[n * C + c] = acc;
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int o = 0; o < OC; ++o) {
      double acc = dw0[c * OC + o];
      for (int n = 0; n < N; ++n) acc += round_trip(inp[n * C + c]) * round_trip(dout[n * OC + o]);
      ref_dw[c * OC + o] = acc;
    }
  }
  auto op = [](pb::Backend& be, std::vector<float*>& p) {
    be.matmul_backward(p[4], p[3], nullptr, p[2], p[0], p[1], N, C, OC);
  };
  const auto dinp = run(*bf16, {inp, w, dout, dw0, poison}, op, 4, N * C);
  const auto dw = run(*bf16, {inp, w, dout, dw0, poison}, op, 3, C * OC);
  EXPECT_LE(relative_error(dinp, ref_dinp), 1e-5);
  EXPECT_LE(relative_error(dw, ref_dw), 1e-5);
}

}  // namespace
