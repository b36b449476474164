// Backend memory for parabench-micro's benchmarks: a tensor freed however the benchmark ends, filled
// with a fixed pseudo-random pattern (so that a product or a reduction works on data, not on zeros).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/bf16.h"

namespace pb {

// n values in [-1, 1), exact in fp32, from a 64-bit linear congruential generator seeded per operand.
inline std::vector<float> pattern(std::size_t n, uint64_t seed) {
  std::vector<float> values(n);
  uint64_t state = seed;
  for (float& x : values) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<float>(static_cast<double>(state >> 40) / double(1 << 24) * 2.0 - 1.0);  // top 24 bits
  }
  return values;
}

// A tensor of backend memory in the benchmark's dtype (fp32, or bf16 as mixed precision stores its
// activations and weights), freed however the benchmark ends.
class BackendTensor {
 public:
  BackendTensor(Backend& backend, std::size_t count, DType dtype)
      : backend_(backend), ptr_(backend.alloc_tensor(count, dtype, MemCategory::workspace)) {}
  ~BackendTensor() { backend_.free(ptr_); }
  BackendTensor(const BackendTensor&) = delete;
  BackendTensor& operator=(const BackendTensor&) = delete;
  TensorPtr get() const { return ptr_; }
  // host values, rounded to bf16 on the way when the tensor is bf16
  void upload(const std::vector<float>& values) {
    if (ptr_.dtype() == DType::f32) {
      backend_.upload(ptr_.data(), values.data(), values.size() * sizeof(float));
      return;
    }
    std::vector<uint16_t> bits(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) bits[i] = cpu::float_to_bf16(values[i]);
    backend_.upload(ptr_.data(), bits.data(), bits.size() * sizeof(uint16_t));
  }

 private:
  Backend& backend_;
  TensorPtr ptr_;
};

}  // namespace pb
