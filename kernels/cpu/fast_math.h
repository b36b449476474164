// Vectorisable exp and tanh for the CPU backend's loops (kernels/cpu/cpu_backend.cpp, cp_ops.cpp):
// libm's expf and tanhf are scalar calls and cost a fifth of a training step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pb::cpu {

// exp(x) in plain arithmetic (Cephes' expf: range reduction by ln 2 and a degree-6 polynomial,
// within 2 ulp), so that loops calling it vectorise. The argument is clamped to [−87.3, 88.4]: below
// it the result is 2^−126 ≈ 1.2e-38, not 0, so callers that need an exact 0 (a masked score) write it.
inline float exp_approx(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447505531f, x));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // x = n·ln2 + r, |r| ≤ ln2/2
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e_r * scale;
}

// The largest of x[0..n) (−∞ for n = 0), in 16 independent lanes so that it vectorises: GCC leaves a
// std::max loop (and an `omp simd reduction(max)`) scalar, one dependent compare per element, without
// -ffinite-math-only. A maximum is exact in any order, so the value is a left-to-right scan's.
inline float max_of(const float* x, int n) {
  constexpr int kLanes = 16;
  float lane[kLanes];
  for (float& l : lane) l = -INFINITY;
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = lane[j] > x[i + j] ? lane[j] : x[i + j];
  }
  float m = -INFINITY;
  for (; i < n; ++i) m = std::max(m, x[i]);
  for (float l : lane) m = std::max(m, l);
  return m;
}

// tanh(u) = 1 − 2 / (exp(2u) + 1): exact limits ±1, absolute error ~1e-7 near 0.
inline float tanh_approx(float u) { return 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f); }

}  // namespace pb::cpu
