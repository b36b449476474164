// bf16 matrix products on the CPU (kernels/cpu/bf16_gemm.h): oneDNN's matmul, or OpenBLAS's sgemm on
// the widened operands where oneDNN was not found at build time.
#include "kernels/cpu/bf16_gemm.h"

#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "kernels/cpu/bf16.h"

#ifdef PB_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace pb::cpu {

void to_bf16(uint16_t* dst, const float* src, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

namespace {
// The shape of one product: a primitive is made for each and kept.
using ShapeKey = std::tuple<bool, bool, int, int, int, int, int, int, bool>;

// Without a bf16 kernel (no oneDNN, or a CPU without AVX-512 BF16 or AMX): the operands widened back to
// fp32 and multiplied by sgemm, the same rounding of the inputs at fp32 speed.
class WidenedGemm {
 public:
  void run(bool trans_a, bool trans_b, int M, int N, int K, const uint16_t* A, int lda, const uint16_t* B, int ldb,
           float beta, float* C, int ldc) {
    const std::size_t a_size = static_cast<std::size_t>((trans_a ? K : M) - 1) * lda + (trans_a ? M : K);
    const std::size_t b_size = static_cast<std::size_t>((trans_b ? N : K) - 1) * ldb + (trans_b ? K : N);
    a_.resize(a_size);
    b_.resize(b_size);
    widen(a_.data(), A, a_size);
    widen(b_.data(), B, b_size);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                1.0f, a_.data(), lda, b_.data(), ldb, beta, C, ldc);
  }

 private:
  static void widen(float* dst, const uint16_t* src, std::size_t n) {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
  std::vector<float> a_, b_;
};

constexpr const char* kWidened = "fp32 sgemm on bf16-rounded operands";

#ifdef PB_HAVE_DNNL

// The kernel oneDNN picks for a representative product (a block's first matrix product), or the
// reason there is none.
struct DnnlProbe {
  bool available = false;
  std::string description;
};
const DnnlProbe& dnnl_probe() {
  static const DnnlProbe probe = [] {
    const dnnl_version_t* v = dnnl_version();
    DnnlProbe p;
    p.description = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
    try {
      using dt = dnnl::memory::data_type;
      using dims = dnnl::memory::dims;
      const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
      const dnnl::memory::desc a(dims{512, 768}, dt::bf16, dims{768, 1}), b(dims{768, 2304}, dt::bf16, dims{2304, 1}),
          c(dims{512, 2304}, dt::f32, dims{2304, 1});
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), engine);
      p.available = true;
      p.description += " (" + std::string(pd.impl_info_str()) + ")";
    } catch (const dnnl::error&) {
      // oneDNN has no bf16 matmul for this CPU (it needs AVX-512 BF16 or AMX, or AVX-512 emulation)
      p.description = std::string(kWidened) + ": " + p.description + " has no bf16 matmul for this CPU";
    }
    return p;
  }();
  return probe;
}
}  // namespace

struct Bf16Gemm::Impl {
  struct Product {
    dnnl::matmul primitive;
    dnnl::memory a, b, c;
  };
  std::unique_ptr<dnnl::engine> engine;
  std::unique_ptr<dnnl::stream> stream;
  std::map<ShapeKey, std::unique_ptr<Product>> products;
  WidenedGemm widened;

  Impl() {
    if (!dnnl_probe().available) return;
    engine = std::make_unique<dnnl::engine>(dnnl::engine::kind::cpu, 0);
    stream = std::make_unique<dnnl::stream>(*engine);
  }

  // The primitive of a shape, made on first use; null when oneDNN has no kernel for it (that shape then
  // runs widened, with a warning once).
  Product* product(bool trans_a, bool trans_b, int M, int N, int K, int lda, int ldb, int ldc, bool accumulate) {
    const ShapeKey key{trans_a, trans_b, M, N, K, lda, ldb, ldc, accumulate};
    auto it = products.find(key);
    if (it != products.end()) return it->second.get();
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    std::unique_ptr<Product> made;
    try {
      // op(A) is (M, K): stored row-major (M, K) with stride lda, or as Aᵀ (K, M), i.e. strides (1, lda).
      const dnnl::memory::desc a_md(dims{M, K}, dt::bf16, trans_a ? dims{1, lda} : dims{lda, 1});
      const dnnl::memory::desc b_md(dims{K, N}, dt::bf16, trans_b ? dims{1, ldb} : dims{ldb, 1});
      const dnnl::memory::desc c_md(dims{M, N}, dt::f32, dims{ldc, 1});
      dnnl::primitive_attr attr;
      if (accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.0f);  // C = A·B + C
        attr.set_post_ops(ops);
      }
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, *engine);
      // The kernel for this shape may differ from the probe's (transposed operands): say so if it is
      // oneDNN's reference implementation, which is correct but orders of magnitude slower.
      const std::string kernel = pd.impl_info_str();
      if (kernel.rfind("ref", 0) == 0) {
        std::fprintf(stderr, "parabench: oneDNN runs the bf16 matmul %c%c M %d N %d K %d on its reference kernel "
                     "(%s): slow\n", trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, kernel.c_str());
      }
      made.reset(new Product{dnnl::matmul(pd), dnnl::memory(a_md, *engine, DNNL_MEMORY_NONE),
                             dnnl::memory(b_md, *engine, DNNL_MEMORY_NONE),
                             dnnl::memory(c_md, *engine, DNNL_MEMORY_NONE)});
    } catch (const dnnl::error& e) {
      std::fprintf(stderr, "parabench: oneDNN has no bf16 matmul for %c%c M %d N %d K %d (%s); sgemm on the rounded "
                   "operands runs it\n", trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, e.what());
    }
    return products.emplace(key, std::move(made)).first->second.get();
  }

  void run(bool trans_a, bool trans_b, int M, int N, int K, const uint16_t* A, int lda, const uint16_t* B, int ldb,
           float beta, float* C, int ldc) {
    Product* p = engine ? product(trans_a, trans_b, M, N, K, lda, ldb, ldc, beta != 0.0f) : nullptr;
    if (p == nullptr) {
      widened.run(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
      return;
    }
    p->a.set_data_handle(const_cast<uint16_t*>(A));
    p->b.set_data_handle(const_cast<uint16_t*>(B));
    p->c.set_data_handle(C);
    p->primitive.execute(*stream, {{DNNL_ARG_SRC, p->a}, {DNNL_ARG_WEIGHTS, p->b}, {DNNL_ARG_DST, p->c}});
    stream->wait();
  }
};

std::string bf16_gemm_library() { return dnnl_probe().description; }
bool bf16_gemm_native() { return dnnl_probe().available; }

#else  // no oneDNN at build time
}  // namespace

struct Bf16Gemm::Impl : WidenedGemm {};

std::string bf16_gemm_library() { return std::string(kWidened) + ": built without oneDNN"; }
bool bf16_gemm_native() { return false; }

#endif

Bf16Gemm::Bf16Gemm() : impl_(std::make_unique<Impl>()) {}
Bf16Gemm::~Bf16Gemm() = default;

void Bf16Gemm::run(bool trans_a, bool trans_b, int M, int N, int K, const uint16_t* A, int lda, const uint16_t* B,
                   int ldb, float beta, float* C, int ldc) {
  if (beta != 0.0f && beta != 1.0f) throw std::invalid_argument("Bf16Gemm: beta must be 0 or 1");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: C = β·C
    if (beta == 0.0f) {
      for (int i = 0; i < M; ++i) std::fill(C + static_cast<std::size_t>(i) * ldc, C + static_cast<std::size_t>(i) * ldc + N, 0.0f);
    }
    return;
  }
  impl_->run(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace pb::cpu
