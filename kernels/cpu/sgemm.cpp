#include "kernels/cpu/sgemm.h"

#include <cblas.h>

#include <stdexcept>
#include <string>

#ifdef PB_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

namespace pb::cpu {

std::vector<std::string> sgemm_libraries() {
#ifdef PB_HAVE_DNNL
  return {"onednn", "openblas"};
#else
  return {"openblas"};
#endif
}

bool parse_sgemm_library(const std::string& name, SgemmLibrary* out) {
  if (name == "openblas") {
    *out = SgemmLibrary::openblas;
    return true;
  }
#ifdef PB_HAVE_DNNL
  if (name == "onednn") {
    *out = SgemmLibrary::onednn;
    return true;
  }
#endif
  return false;
}

SgemmLibrary default_sgemm_library() {
  SgemmLibrary library = SgemmLibrary::openblas;
  parse_sgemm_library(sgemm_libraries().front(), &library);
  return library;
}

const char* sgemm_library_name(SgemmLibrary library) {
  return library == SgemmLibrary::onednn ? "onednn" : "openblas";
}

std::string sgemm_library_description(SgemmLibrary library) {
#ifdef PB_HAVE_DNNL
  if (library == SgemmLibrary::onednn) {
    const dnnl_version_t* v = dnnl_version();
    return "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) +
           " sgemm";
  }
#endif
  (void)library;
#ifdef OPENBLAS_VERSION
  std::string version = OPENBLAS_VERSION;  // " OpenBLAS 0.3.21 "
  version = version.substr(version.find_first_not_of(' '));
  version = version.substr(0, version.find_last_not_of(' ') + 1);
#else
  const std::string version = "OpenBLAS";
#endif
  return version + " sgemm (" + openblas_get_corename() + ")";
}

void sgemm(SgemmLibrary library, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
#ifdef PB_HAVE_DNNL
  if (library == SgemmLibrary::onednn) {
    const dnnl_status_t status = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb,
                                            beta, C, ldc);
    if (status != dnnl_success) {
      throw std::runtime_error("oneDNN sgemm failed (dnnl_status_t " + std::to_string(static_cast<int>(status)) +
                               ") on a " + std::to_string(M) + "×" + std::to_string(N) + "×" + std::to_string(K) +
                               " product");
    }
    return;
  }
#endif
  (void)library;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha,
              A, lda, B, ldb, beta, C, ldc);
}

}  // namespace pb::cpu
