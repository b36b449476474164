// The CPU backend's fp32 matrix products: OpenBLAS's sgemm, or oneDNN's where the build found oneDNN
// (its sgemm ran the model's products about a tenth faster than OpenBLAS's on the test machine's
// AVX-512 core; bench/dp/README.md). The library is the run's choice (--cpu-gemm), recorded in the
// result file's matmul_precision.
#pragma once

#include <string>
#include <vector>

namespace pb::cpu {

enum class SgemmLibrary { openblas, onednn };

// The libraries this build can run, its default first: "onednn" (where oneDNN was found), "openblas".
std::vector<std::string> sgemm_libraries();
// The library of that name; false for an unknown name or one this build lacks.
bool parse_sgemm_library(const std::string& name, SgemmLibrary* out);
SgemmLibrary default_sgemm_library();
// "onednn", "openblas": the name parse_sgemm_library takes.
const char* sgemm_library_name(SgemmLibrary library);
// "OpenBLAS 0.3.21 sgemm (SkylakeX)", "oneDNN 2.6.3 sgemm".
std::string sgemm_library_description(SgemmLibrary library);

// Row-major C (M, N) = α · op(A) (M, K) · op(B) (K, N) + β·C, with op(X) = Xᵀ when trans_x (A is then
// stored (K, M) with leading dimension lda, B (N, K)). Inside an OpenMP parallel region both libraries
// run the product on the calling thread alone, so the sums of a per-head call do not depend on the
// thread count; a product called outside one is split over the backend's threads (OpenBLAS by rows and
// columns, oneDNN possibly also along K: the same inputs and thread count give the same bits).
void sgemm(SgemmLibrary library, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

}  // namespace pb::cpu
