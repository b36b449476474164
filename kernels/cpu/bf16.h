// bfloat16 on the CPU: the upper 16 bits of an IEEE fp32, held as uint16_t bits. Conversion from fp32
// rounds to nearest, ties to even (as __float2bfloat16_rn, torch's .to(bfloat16) and the AVX-512 BF16
// instruction vcvtneps2bf16); a NaN stays a quiet NaN of the same sign.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace pb::cpu {

inline uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN: keep it quiet
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// dst[i] = bf16(src[i]) for n elements (OpenMP over the calling thread's team).
void to_bf16(uint16_t* dst, const float* src, std::size_t n);

}  // namespace pb::cpu
