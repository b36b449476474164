// Matrix products with bf16 operands and fp32 accumulation on the CPU, through oneDNN's matmul (the
// library PyTorch's CPU backend uses: AVX-512 BF16 and AMX kernels where the CPU has them). Without
// oneDNN at build time (PB_HAVE_DNNL undefined), or on a CPU for which it has no bf16 matmul (AVX2
// only), the operands are widened back to fp32 and OpenBLAS's sgemm runs the product: the same rounding
// of the inputs, without the speed; `bf16_gemm_library()` says which, and the run's /config records it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace pb::cpu {

// Row-major C (M, N) = op(A) (M, K) · op(B) (K, N) + β·C, with op(X) = Xᵀ when trans_x (A is then
// stored (K, M) with leading dimension lda, B (N, K)). A and B are bf16 bits (kernels/cpu/bf16.h), C is
// fp32; β is 0 (C overwritten) or 1 (accumulated). Primitives are made once per shape and kept.
class Bf16Gemm {
 public:
  Bf16Gemm();
  ~Bf16Gemm();
  Bf16Gemm(const Bf16Gemm&) = delete;
  Bf16Gemm& operator=(const Bf16Gemm&) = delete;

  void run(bool trans_a, bool trans_b, int M, int N, int K, const uint16_t* A, int lda, const uint16_t* B, int ldb,
           float beta, float* C, int ldc);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "oneDNN <version> (<kernel>)" naming the kernel a representative product runs on, or the fallback and
// why: "fp32 sgemm on bf16-rounded operands: oneDNN 2.6.3 has no bf16 matmul for this CPU".
std::string bf16_gemm_library();
// True when the products run on a bf16 kernel (oneDNN found one for this CPU), false for the fallback.
bool bf16_gemm_native();

}  // namespace pb::cpu
