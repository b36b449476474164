// CUDA implementation of the Backend (see cuda_backend.h).
//
// Conventions: all work is queued on one compute stream, so a freed block can be handed out again at
// once (reuse is ordered by the stream); every launch is checked; every reduction runs in a fixed
// order (two-stage partial sums, no atomics), so a run is bitwise reproducible on the same GPU. Small
// internal buffers (partial sums, a vector of ones) live outside the tracker, as the CPU backend's
// per-thread scratch does; they are counted in /memory/device_peak_bytes. So do the bf16 copies of the
// matrix products' operands (bf16 mode only): library workspace like cuBLAS's own, in no category, and the
// fp32 staging copies of the context-parallel ops' inputs of mixed dtypes (backend scratch).
//
// Dtypes: each op checks the dtypes that must agree (one_dtype: std::invalid_argument naming the op and
// every argument's dtype) and launches the kernel template's instantiation for the tensors' element types
// (with_type / with_types: float for fp32, uint16_t for bf16), passing each tensor as `as<T>()`.
#include "kernels/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/errors.h"
#include "kernels/block_cache.h"
#include "kernels/cuda/kernels.cuh"
#ifdef PB_WITH_CUDNN
#include "kernels/cuda/cudnn_attention.h"
#endif

namespace pb {

static_assert(kernels::kAttMaxHeadDim == kCudaMaxHeadDim, "one head-dimension limit");

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                                   cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

namespace {
std::mutex g_async_failure_mutex;
std::string g_async_failure;             // the first failure reported from outside
std::atomic<bool> g_async_failed{false};  // set after g_async_failure

// RunError (exit 3) when the device has been marked failed (cuda_fail_async).
void throw_if_failed_async() {
  if (!g_async_failed.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(g_async_failure_mutex);
  throw RunError(kExitRuntime, g_async_failure);
}
}  // namespace

bool cuda_failed_async() { return g_async_failed.load(std::memory_order_acquire); }

std::string cuda_async_failure() {
  std::lock_guard<std::mutex> lock(g_async_failure_mutex);
  return g_async_failed.load() ? g_async_failure : std::string();
}

void cuda_prepare_environment() {
#ifdef PB_WITH_CUDNN
  CudnnAttention::prepare_environment();
#endif
}

void cuda_fail_async(const std::string& why) {
  std::lock_guard<std::mutex> lock(g_async_failure_mutex);
  if (g_async_failed.load()) return;
  g_async_failure = why;
  g_async_failed.store(true, std::memory_order_release);
}

namespace {

using namespace kernels;  // NOLINT: the kernels and their constants

void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw RunError(kExitRuntime, std::string(file) + ":" + std::to_string(line) + ": " + call +
                                   " failed: cuBLAS status " + std::to_string(static_cast<int>(status)));
}
#define PB_CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
// After every kernel launch (a member of CudaBackend): a configuration error names this launch; the site is
// remembered, so that a fault found at the next wait names the last launch before it; with
// CUDA_LAUNCH_BLOCKING=1 each launch is waited for, so a fault names its own launch.
#define PB_LAUNCH_CHECK() launch_check(__FILE__, __LINE__)

constexpr int kThreads = 256;        // elementwise and row kernels
constexpr int kReduceThreads = 1024;  // single-block final reductions

// Blocks for n threads; at least one, so that an empty tensor is a valid (idle) launch.
unsigned blocks_for(std::size_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::max<std::size_t>(1, (n + threads - 1) / threads));
}

// ---- dtypes: checks and dispatch -----------------------------------------------------------------
// f(e) with e a value of the element type of dtype t (float for fp32, uint16_t for bf16's bits), so that
// a generic lambda can name it (`using T = decltype(e)`) and launch the kernel templated on it.
template <typename F>
void with_type(DType t, F&& f) {
  if (t == DType::bf16) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}
template <typename F>
void with_types(DType a, DType b, F&& f) {
  with_type(a, [&](auto x) { with_type(b, [&](auto y) { f(x, y); }); });
}
template <typename F>
void with_types(DType a, DType b, DType c, F&& f) {
  with_type(a, [&](auto x) { with_types(b, c, [&](auto y, auto z) { f(x, y, z); }); });
}
// f(half) with half a std::integral_constant of the dK/dV kernels' head-dimension class for head
// dimension d (kernels.cuh, dkv_half_dim_class), so that `decltype(half)::value` can be a template argument.
template <typename F>
void with_dkv_class(int d, F&& f) {
  if (dkv_half_dim_class(d) == kDkvHalfDimSmall) {
    f(std::integral_constant<int, kDkvHalfDimSmall>{});
  } else {
    f(std::integral_constant<int, kDkvHalfDim>{});
  }
}

// A named tensor argument of an op (null: absent).
struct Arg {
  const char* name;
  ConstTensorPtr tensor;
};

// The one dtype of the non-null tensors among `args` (fp32 when there are none); otherwise
// std::invalid_argument naming the op and every argument's dtype.
DType one_dtype(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!a.tensor) continue;
    if (first == nullptr) {
      first = &a;
    } else if (a.tensor.dtype() != first->tensor.dtype()) {
      std::string what = std::string("cuda backend: ") + op + " takes its activations and parameters in one dtype " +
                         "(all fp32 or all bf16), not";
      const char* sep = " ";
      for (const Arg& b : args) {
        if (!b.tensor) continue;
        what += sep + std::string(b.name) + " " + dtype_name(b.tensor.dtype());
        sep = ", ";
      }
      throw std::invalid_argument(what);
    }
  }
  return first != nullptr ? first->tensor.dtype() : DType::f32;
}

// ---- the backend ---------------------------------------------------------------------------------
constexpr std::size_t kAllocAlignment = 256;

class CudaBackend final : public Backend {
 public:
  // One device per process: the backend makes `device` current once, and every call assumes it.
  CudaBackend(int device, bool bf16_matmul, bool cudnn_attention)
      : device_(device),
        bf16_matmul_(bf16_matmul),
        blocks_(kAllocAlignment, [this](std::size_t bytes) { return device_malloc(bytes); },
                [](void* ptr) { cudaFree(ptr); }) {
    PB_CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp prop{};
    PB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    name_ = prop.name;
    const char* blocking = std::getenv("CUDA_LAUNCH_BLOCKING");
    launch_blocking_ = blocking != nullptr && std::string(blocking) == "1";
    PB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    if (cudnn_attention) {
#ifdef PB_WITH_CUDNN
      cudnn_ = std::make_unique<CudnnAttention>(stream_, [this](std::size_t bytes) {
        return reserve(cudnn_workspace_, bytes);
      });
#else
      throw std::invalid_argument("cuda backend: this build has no cuDNN attention (PB_WITH_CUDNN)");
#endif
    }
    PB_CUBLAS_CHECK(cublasCreate(&cublas_));
    PB_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    PB_CUBLAS_CHECK(cublasLtCreate(&cublaslt_));
    PB_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));  // no TF32 for CUBLAS_COMPUTE_32F
    // the dK/dV kernels' shared memory at the largest head dimension, past the default 48 KiB: every
    // instantiation that the ops launch
    const int dkv_smem = static_cast<int>(attention_dkv_smem(kCudaMaxHeadDim));
    const auto allow_dkv_smem = [&](const void* kernel) {
      PB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dkv_smem));
    };
    for (int d : {2 * kDkvHalfDimSmall, kCudaMaxHeadDim}) {  // both head-dimension classes
      for (DType t : {DType::f32, DType::bf16}) {
        with_dkv_class(d, [&](auto half) {
          constexpr int kHalf = decltype(half)::value;
          with_type(t, [&](auto e) {
            using T = decltype(e);
            allow_dkv_smem(reinterpret_cast<const void*>(&attention_backward_dkv_kernel<T, kHalf>));
          });
          for (DType u : {DType::f32, DType::bf16}) {
            with_types(t, u, [&](auto o, auto i) {
              using TO = decltype(o);
              using TI = decltype(i);
              allow_dkv_smem(reinterpret_cast<const void*>(&attention_block_backward_dkv_kernel<TO, TI, kHalf>));
            });
          }
        });
      }
    }
    sample_device_memory();
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
#ifdef PB_WITH_CUDNN
    cudnn_.reset();
    cudaFree(cudnn_workspace_.ptr);
#endif
    blocks_.release_live();  // the cached ones go with blocks_
    lt_plans_.clear();
    cudaFree(lt_workspace_.ptr);
    cublasLtDestroy(cublaslt_);
    cudaFree(scratch_.ptr);
    cudaFree(bf16_a_.ptr);
    cudaFree(bf16_b_.ptr);
    cudaFree(ones_f32_.ptr);
    cudaFree(ones_bf16_.ptr);
    cudaFree(adamw_ranges_.ptr);
    for (const Span& span : spans_) {
      cudaEventDestroy(span.start);
      if (span.stop != nullptr) cudaEventDestroy(span.stop);
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    cudaFreeHost(host_doubles_);
    for (UploadSlot& slot : upload_slots_) {
      cudaFreeHost(slot.host);
      if (slot.copied != nullptr) cudaEventDestroy(slot.copied);
    }
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  std::string device_name() const override { return name_; }
  std::string matmul_precision() const override {
    if (!bf16_matmul_) return "fp32";
    int version = 0;
    cublasGetVersion(cublas_, &version);
    return "bf16 operands, fp32 accumulation: cuBLAS " + std::to_string(version) +
           " (cublasGemmEx, CUDA_R_16BF operands, CUBLAS_COMPUTE_32F; bf16 tensors with a bias: cublasLtMatmul, "
           "the bias (and fc1's GELU) in its epilogue)";
  }
  bool deterministic() const override {
#ifdef PB_WITH_CUDNN
    if (cudnn_) return cudnn_->deterministic();
#endif
    return true;
  }
  cudaStream_t stream() const { return stream_; }

  // ---- memory: a per-size cache over cudaMalloc (kernels/block_cache.h); reuse of a freed block is
  // ordered by the one compute stream ---------------------------------------------------------------
  void* alloc(std::size_t bytes, MemCategory category) override { return blocks_.alloc(bytes, category); }
  void free(void* ptr) override { blocks_.free(ptr); }
  MemoryTracker& tracker() override { return blocks_.tracker(); }
  int64_t device_memory_peak_bytes() override {
    sample_device_memory();
    return device_peak_;
  }

  // Spans: a pair of events recorded on the stream, read once the work is done (take_span_seconds
  // follows a wait); the events are reused.
  void begin_span() override {
    if (span_open_) throw std::logic_error("begin_span: a span is open (spans do not nest)");
    span_open_ = true;
    spans_.push_back(Span{take_event(), nullptr});
    PB_CUDA_CHECK(cudaEventRecord(spans_.back().start, stream_));
  }
  void end_span() override {
    if (!span_open_) throw std::logic_error("end_span: no span is open");
    span_open_ = false;
    spans_.back().stop = take_event();
    PB_CUDA_CHECK(cudaEventRecord(spans_.back().stop, stream_));
  }
  double take_span_seconds() override {
    double sum = 0.0;
    std::vector<Span> open;
    for (const Span& span : spans_) {
      if (span.stop == nullptr) {  // still open: kept for its end
        open.push_back(span);
        continue;
      }
      PB_CUDA_CHECK(cudaEventSynchronize(span.stop));  // done already: the caller has waited
      float ms = 0.0f;
      PB_CUDA_CHECK(cudaEventElapsedTime(&ms, span.start, span.stop));
      sum += ms * 1e-3;
      free_events_.push_back(span.start);
      free_events_.push_back(span.stop);
    }
    spans_ = std::move(open);
    return sum;
  }

  // Without waiting for the stream: the bytes go into a pinned staging slot at once (the caller may reuse
  // its buffer on return) and from there to the device in stream order. A slot is reused once its copy
  // has completed, kUploadSlots copies later; an upload larger than a slot goes through the ring in
  // slot-sized pieces (the parameters' initialisation, before the first step).
  void upload(void* dst, const void* src, std::size_t bytes) override {
    for (std::size_t at = 0; at < bytes; at += kUploadSlotBytes) {
      const std::size_t n = std::min(kUploadSlotBytes, bytes - at);
      UploadSlot& slot = upload_slots_[next_upload_slot_];
      next_upload_slot_ = (next_upload_slot_ + 1) % kUploadSlots;
      if (slot.host == nullptr) {
        PB_CUDA_CHECK(cudaMallocHost(&slot.host, kUploadSlotBytes));
        PB_CUDA_CHECK(cudaEventCreateWithFlags(&slot.copied, cudaEventDisableTiming));
      } else {
        PB_CUDA_CHECK(cudaEventSynchronize(slot.copied));  // a copy queued kUploadSlots uploads ago
      }
      std::memcpy(slot.host, static_cast<const char*>(src) + at, n);
      PB_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + at, slot.host, n, cudaMemcpyHostToDevice, stream_));
      PB_CUDA_CHECK(cudaEventRecord(slot.copied, stream_));
    }
  }
  void copy(void* dst, const void* src, std::size_t bytes) override {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void zero(void* dst, std::size_t bytes) override { PB_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_)); }

 protected:
  void do_download(void* dst, const void* src, std::size_t bytes) override {
    PB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    stream_synchronize(__FILE__, __LINE__);
  }
  void do_synchronize() override {
    stream_synchronize(__FILE__, __LINE__);
    sample_device_memory();
  }
  // Each piece's fixed chunks (sum_squares_partial_kernel), then their sum added to the piece's bin
  // (add_sum_doubles_kernel), piece after piece in stream order; one copy of the bins to the host, one wait.
  void do_sum_squares(double* sums, int bins, const std::vector<SquaresPiece>& pieces) override {
    std::size_t most_chunks = 1;
    for (const SquaresPiece& p : pieces) most_chunks = std::max(most_chunks, (p.n + kSumChunk - 1) / kSumChunk);
    double* bin_sums = static_cast<double*>(scratch(sizeof(double) * (bins + most_chunks)));
    double* partial = bin_sums + bins;
    PB_CUDA_CHECK(cudaMemsetAsync(bin_sums, 0, sizeof(double) * bins, stream_));
    for (const SquaresPiece& p : pieces) {
      if (p.n == 0) continue;
      const std::size_t chunks = (p.n + kSumChunk - 1) / kSumChunk;
      with_type(p.x.dtype(), [&](auto e) {
        using T = decltype(e);
        sum_squares_partial_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, stream_>>>(partial, p.x.as<T>(),
                                                                                               p.n);
      });
      PB_LAUNCH_CHECK();
      add_sum_doubles_kernel<<<1, kReduceThreads, 0, stream_>>>(bin_sums + p.bin, partial, chunks);
      PB_LAUNCH_CHECK();
    }
    double* host = host_doubles(bins);
    PB_CUDA_CHECK(cudaMemcpyAsync(host, bin_sums, sizeof(double) * bins, cudaMemcpyDeviceToHost, stream_));
    stream_synchronize(__FILE__, __LINE__);
    std::copy(host, host + bins, sums);
  }

 public:

  // ---- matrix products: row-major tensors as cuBLAS's column-major transposes --------------------
  // Bias: broadcast into the output first (its bits: exact in either dtype), then the product added with
  // β = 1, so that cuBLAS adds the two in fp32 and a bf16 output is rounded once (no epilogue kernel).
  void matmul_forward(TensorPtr out, ConstTensorPtr inp, ConstTensorPtr weight, ConstTensorPtr bias, int N, int C,
                      int OC) override {
    const DType t = one_dtype("matmul_forward", {{"out", out}, {"inp", inp}, {"weight", weight}, {"bias", bias}});
    // bf16 tensors with a bias: one cuBLASLt product with the bias added in its epilogue (fp32, rounded
    // once, as below), no broadcast pass and no read of out.
    if (t == DType::bf16 && bias && lt_matmul({LtEpilogue::bias, OC, N, C, weight.data(), inp.data(), out.data(), bias.data(), nullptr})) {
      return;
    }
    if (bias) {
      with_type(t, [&](auto e) {
        using T = decltype(e);
        broadcast_rows_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * OC), kThreads, 0, stream_>>>(
            out.as<T>(), bias.as<T>(), N, OC);
      });
      PB_LAUNCH_CHECK();
    }
    // outᵀ (OC, N) = weightᵀ (OC, C) · inpᵀ (C, N)
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, OC, N, C, weight, OC, inp, C, bias ? 1.0f : 0.0f, out, OC);
  }

  // dinp, dout, inp and weight of one dtype; dweight and dbias each fp32 or bf16 (accumulated: β = 1).
  void matmul_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr inp,
                       ConstTensorPtr weight, int N, int C, int OC) override {
    one_dtype("matmul_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    // dinpᵀ (C, N) = weight (C, OC) · doutᵀ (OC, N)
    if (dinp) gemm(CUBLAS_OP_T, CUBLAS_OP_N, C, N, OC, weight, OC, dout, OC, 0.0f, dinp, C);
    // dweightᵀ (OC, C) += doutᵀ (OC, N) · inp (N, C)
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, OC, C, N, dout, OC, inp, C, 1.0f, dweight, OC);
    if (dbias) add_column_sums(dbias, dout, N, OC);  // dbias (OC) += doutᵀ · 1
  }

  // bf16 with a bias: one cuBLASLt product, GELU applied in its epilogue to the fp32 sum plus bias, which
  // is also written (rounded) to pre for the backward (CUBLASLT_EPILOGUE_GELU_AUX_BIAS). Otherwise, and
  // where cuBLASLt has no algorithm for it, the product and a GELU pass.
  void matmul_gelu_forward(TensorPtr act, TensorPtr pre, ConstTensorPtr inp, ConstTensorPtr weight, ConstTensorPtr bias,
                           int N, int C, int OC) override {
    const DType t = one_dtype("matmul_gelu_forward",
                              {{"act", act}, {"pre", pre}, {"inp", inp}, {"weight", weight}, {"bias", bias}});
    if (t == DType::bf16 && bias &&
        lt_matmul({LtEpilogue::gelu_aux_bias, OC, N, C, weight.data(), inp.data(), act.data(), bias.data(), pre.data()})) {
      return;
    }
    Backend::matmul_gelu_forward(act, pre, inp, weight, bias, N, C, OC);
  }

  // bf16: fc2's input gradient and GELU's backward in one cuBLASLt product (CUBLASLT_EPILOGUE_DGELU: the
  // fp32 sum times gelu_tanh'(pre), rounded once), then fc2's parameter gradients as matmul_backward
  // computes them. Otherwise, and where cuBLASLt has no algorithm for it, the product and a GELU pass.
  void matmul_gelu_backward(TensorPtr dpre, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr inp,
                            ConstTensorPtr weight, ConstTensorPtr pre, int N, int C, int OC) override {
    const DType t = one_dtype("matmul_gelu_backward",
                              {{"dpre", dpre}, {"dout", dout}, {"inp", inp}, {"weight", weight}, {"pre", pre}});
    // dpreᵀ (C, N) = weight (C, OC) · doutᵀ (OC, N), then ⊙ gelu'(preᵀ)
    if (t == DType::bf16 &&
        lt_matmul({LtEpilogue::dgelu, C, N, OC, weight.data(), dout.data(), dpre.data(), nullptr, pre.data()})) {
      matmul_backward(nullptr, dweight, dbias, dout, inp, weight, N, C, OC);
      return;
    }
    Backend::matmul_gelu_backward(dpre, dweight, dbias, dout, inp, weight, pre, N, C, OC);
  }

  // ---- LayerNorm ---------------------------------------------------------------------------------
  void layernorm_forward(TensorPtr out, float* mean, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight,
                         ConstTensorPtr bias, int N, int C) override {
    const DType t =
        one_dtype("layernorm_forward", {{"out", out}, {"inp", inp}, {"weight", weight}, {"bias", bias}});
    if (N == 0) return;
    with_type(t, [&](auto e) {
      using T = decltype(e);
      layernorm_forward_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          out.as<T>(), mean, rstd, inp.as<T>(), weight.as<T>(), bias.as<T>(), N, C);
    });
    PB_LAUNCH_CHECK();
  }

  void residual_layernorm_forward(TensorPtr out, TensorPtr ln_out, float* mean, float* rstd, ConstTensorPtr a,
                                  ConstTensorPtr b, ConstTensorPtr weight, ConstTensorPtr bias, int N, int C) override {
    const DType t = one_dtype("residual_layernorm_forward", {{"out", out}, {"ln_out", ln_out}, {"a", a}, {"b", b},
                                                             {"weight", weight}, {"bias", bias}});
    if (N == 0) return;
    with_type(t, [&](auto e) {
      using T = decltype(e);
      residual_layernorm_forward_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          out.as<T>(), ln_out.as<T>(), mean, rstd, a.as<T>(), b.as<T>(), weight.as<T>(), bias.as<T>(), N, C);
    });
    PB_LAUNCH_CHECK();
  }

  // dinp, dout, inp and weight of one dtype; dweight and dbias each fp32 or bf16.
  void layernorm_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr inp,
                          ConstTensorPtr weight, const float* mean, const float* rstd, int N, int C) override {
    const DType t =
        one_dtype("layernorm_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    if (N == 0) return;
    const auto [chunks, rows_per_chunk] = param_chunks(N);
    float* partial = scratch_floats(2 * static_cast<std::size_t>(chunks) * C);
    with_type(t, [&](auto e) {
      using T = decltype(e);
      layernorm_backward_input_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          dinp.as<T>(), dout.as<T>(), inp.as<T>(), weight.as<T>(), mean, rstd, N, C);
      PB_LAUNCH_CHECK();
      layernorm_param_partials_kernel<T><<<dim3(blocks_for(C), chunks), kThreads, 0, stream_>>>(
          partial, dout.as<T>(), inp.as<T>(), mean, rstd, N, C, rows_per_chunk);
      PB_LAUNCH_CHECK();
    });
    with_types(dweight.dtype(), dbias.dtype(), [&](auto w, auto b) {
      using TW = decltype(w);
      using TB = decltype(b);
      layernorm_param_finish_kernel<TW, TB><<<blocks_for(C), kThreads, 0, stream_>>>(dweight.as<TW>(), dbias.as<TB>(),
                                                                                      partial, chunks, C);
    });
    PB_LAUNCH_CHECK();
  }

  // ---- attention ---------------------------------------------------------------------------------
  std::size_t attention_saved_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S;  // log-sum-exp per query row
  }
  bool attention_keeps_probabilities() const override { return false; }
  std::size_t attention_scratch_floats(int B, int S, int num_heads) const override {
    return static_cast<std::size_t>(B) * num_heads * S;  // D = Σ dout·out per query row
  }

  void attention_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C,
                         int num_heads) override {
    attention_gqa_forward(out, saved, qkv, B, S, C, num_heads, num_heads);
  }
  void attention_backward(TensorPtr dqkv, float* scratch_d, ConstTensorPtr dout, ConstTensorPtr out,
                          ConstTensorPtr qkv, const float* saved, int B, int S, int C, int num_heads) override {
    attention_gqa_backward(dqkv, scratch_d, dout, out, qkv, saved, B, S, C, num_heads, num_heads);
  }

  // Grouped-query attention (SPEC 2.5): the fused kernels (kernels.cuh, QkvLayout) or cuDNN's, which take
  // fewer key/value heads than query heads as they are.
  void attention_gqa_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int num_heads,
                             int kv_heads) override {
    const DType t = one_dtype("attention_forward", {{"out", out}, {"qkv", qkv}});
    check_attention_shape(B, C, num_heads);
    check_kv_heads("attention_forward", num_heads, kv_heads);
    if (B == 0 || S == 0) return;
#ifdef PB_WITH_CUDNN
    if (cudnn_) {
      require_cudnn_dtype("attention_forward", t);
      cudnn_->forward(out.data(), saved, qkv.data(), B, S, C, num_heads, kv_heads);
      return;
    }
#endif
    const dim3 grid((S + kAttRows - 1) / kAttRows, B * num_heads);
    with_type(t, [&](auto e) {
      using T = decltype(e);
      attention_forward_kernel<T><<<grid, kAttWarps * 32, attention_row_smem(C / num_heads, false), stream_>>>(
          out.as<T>(), saved, qkv.as<T>(), S, C, num_heads, kv_heads);
    });
    PB_LAUNCH_CHECK();
  }

  void attention_gqa_backward(TensorPtr dqkv, float* scratch_d, ConstTensorPtr dout, ConstTensorPtr out,
                              ConstTensorPtr qkv, const float* saved, int B, int S, int C, int num_heads,
                              int kv_heads) override {
    const DType t =
        one_dtype("attention_backward", {{"dqkv", dqkv}, {"dout", dout}, {"out", out}, {"qkv", qkv}});
    check_attention_shape(B, C, num_heads);
    check_kv_heads("attention_backward", num_heads, kv_heads);
    if (B == 0 || S == 0) return;
#ifdef PB_WITH_CUDNN
    if (cudnn_) {  // the log-sum-exp the forward saved; no scratch
      require_cudnn_dtype("attention_backward", t);
      cudnn_->backward(dqkv.data(), dout.data(), out.data(), qkv.data(), saved, B, S, C, num_heads, kv_heads);
      return;
    }
#endif
    const int d = C / num_heads;
    const std::size_t rows = static_cast<std::size_t>(B) * num_heads * S;
    const dim3 rows_grid((S + kAttRows - 1) / kAttRows, B * num_heads);
    const dim3 keys_grid((S + kDkvKeys - 1) / kDkvKeys, B * kv_heads);
    with_type(t, [&](auto e) {
      using T = decltype(e);
      attention_backward_dot_kernel<T, T><<<blocks_for(rows * 32), kThreads, 0, stream_>>>(
          scratch_d, dout.as<T>(), out.as<T>(), B, S, C, num_heads);
      PB_LAUNCH_CHECK();
      attention_backward_dq_kernel<T><<<rows_grid, kAttWarps * 32, attention_row_smem(d, true), stream_>>>(
          dqkv.as<T>(), dout.as<T>(), qkv.as<T>(), saved, scratch_d, S, C, num_heads, kv_heads);
      PB_LAUNCH_CHECK();
      with_dkv_class(d, [&](auto half) {
        constexpr int kHalf = decltype(half)::value;
        attention_backward_dkv_kernel<T, kHalf><<<keys_grid, kDkvWarps * 32, attention_dkv_smem(d), stream_>>>(
            dqkv.as<T>(), dout.as<T>(), qkv.as<T>(), saved, scratch_d, S, C, num_heads, kv_heads);
      });
      PB_LAUNCH_CHECK();
    });
  }

  // ---- the Llama-style block (SPEC 2.5) ----------------------------------------------------------
  void rmsnorm_forward(TensorPtr out, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight, int N, int C) override {
    const DType t = one_dtype("rmsnorm_forward", {{"out", out}, {"inp", inp}, {"weight", weight}});
    if (N == 0) return;
    with_type(t, [&](auto e) {
      using T = decltype(e);
      rmsnorm_forward_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          out.as<T>(), rstd, inp.as<T>(), weight.as<T>(), N, C);
    });
    PB_LAUNCH_CHECK();
  }
  void residual_rmsnorm_forward(TensorPtr out, TensorPtr norm_out, float* rstd, ConstTensorPtr a, ConstTensorPtr b,
                                ConstTensorPtr weight, int N, int C) override {
    const DType t = one_dtype("residual_rmsnorm_forward",
                              {{"out", out}, {"norm_out", norm_out}, {"a", a}, {"b", b}, {"weight", weight}});
    if (N == 0) return;
    with_type(t, [&](auto e) {
      using T = decltype(e);
      residual_rmsnorm_forward_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          out.as<T>(), norm_out.as<T>(), rstd, a.as<T>(), b.as<T>(), weight.as<T>(), N, C);
    });
    PB_LAUNCH_CHECK();
  }
  // dinp, dout, inp and weight of one dtype; dweight fp32 or bf16.
  void rmsnorm_backward(TensorPtr dinp, TensorPtr dweight, ConstTensorPtr dout, ConstTensorPtr inp,
                        ConstTensorPtr weight, const float* rstd, int N, int C) override {
    const DType t =
        one_dtype("rmsnorm_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"weight", weight}});
    if (N == 0) return;
    const auto [chunks, rows_per_chunk] = param_chunks(N);
    float* partial = scratch_floats(static_cast<std::size_t>(chunks) * C);
    with_type(t, [&](auto e) {
      using T = decltype(e);
      rmsnorm_backward_input_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * 32), kThreads, 0, stream_>>>(
          dinp.as<T>(), dout.as<T>(), inp.as<T>(), weight.as<T>(), rstd, N, C);
      PB_LAUNCH_CHECK();
      layernorm_param_partials_kernel<T><<<dim3(blocks_for(C), chunks), kThreads, 0, stream_>>>(
          partial, dout.as<T>(), inp.as<T>(), /*mean=*/nullptr, rstd, N, C, rows_per_chunk);
      PB_LAUNCH_CHECK();
    });
    with_type(dweight.dtype(), [&](auto w) {
      using TW = decltype(w);
      layernorm_param_finish_kernel<TW, float><<<blocks_for(C), kThreads, 0, stream_>>>(dweight.as<TW>(),
                                                                                         /*dbias=*/nullptr, partial,
                                                                                         chunks, C);
    });
    PB_LAUNCH_CHECK();
  }
  void rope_forward(TensorPtr x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                    double theta) override {
    rope(x, row_stride, pos, B, S, heads, d, theta, 1.0f);
  }
  void rope_backward(TensorPtr dx, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                     double theta) override {
    rope(dx, row_stride, pos, B, S, heads, d, theta, -1.0f);
  }
  void swiglu_forward(TensorPtr out, ConstTensorPtr gate, ConstTensorPtr up, std::size_t n) override {
    with_type(one_dtype("swiglu_forward", {{"out", out}, {"gate", gate}, {"up", up}}), [&](auto e) {
      using T = decltype(e);
      swiglu_forward_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(out.as<T>(), gate.as<T>(), up.as<T>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  void swiglu_backward(TensorPtr dgate, TensorPtr dup, ConstTensorPtr dout, ConstTensorPtr gate, ConstTensorPtr up,
                       std::size_t n) override {
    const DType t = one_dtype("swiglu_backward",
                              {{"dgate", dgate}, {"dup", dup}, {"dout", dout}, {"gate", gate}, {"up", up}});
    with_type(t, [&](auto e) {
      using T = decltype(e);
      swiglu_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(dgate.as<T>(), dup.as<T>(), dout.as<T>(),
                                                                         gate.as<T>(), up.as<T>(), n);
    });
    PB_LAUNCH_CHECK();
  }

  // ---- elementwise -------------------------------------------------------------------------------
  void gelu_forward(TensorPtr out, ConstTensorPtr inp, std::size_t n) override {
    with_type(one_dtype("gelu_forward", {{"out", out}, {"inp", inp}}), [&](auto e) {
      using T = decltype(e);
      gelu_forward_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(out.as<T>(), inp.as<T>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  void gelu_backward(TensorPtr dinp, ConstTensorPtr inp, ConstTensorPtr dout, std::size_t n) override {
    with_type(one_dtype("gelu_backward", {{"dinp", dinp}, {"inp", inp}, {"dout", dout}}), [&](auto e) {
      using T = decltype(e);
      gelu_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(dinp.as<T>(), inp.as<T>(), dout.as<T>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  // add, accumulate and convert: any dtype per argument.
  void add(TensorPtr out, ConstTensorPtr a, ConstTensorPtr b, std::size_t n) override {
    with_types(out.dtype(), a.dtype(), b.dtype(), [&](auto o, auto x, auto y) {
      using TO = decltype(o);
      using TA = decltype(x);
      using TB = decltype(y);
      add_kernel<TO, TA, TB><<<blocks_for(n), kThreads, 0, stream_>>>(out.as<TO>(), a.as<TA>(), b.as<TB>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  void accumulate(TensorPtr y, ConstTensorPtr x, std::size_t n) override {
    with_types(y.dtype(), x.dtype(), [&](auto ey, auto ex) {
      using TY = decltype(ey);
      using TX = decltype(ex);
      accumulate_kernel<TY, TX><<<blocks_for(n), kThreads, 0, stream_>>>(y.as<TY>(), x.as<TX>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  void convert(TensorPtr dst, ConstTensorPtr src, std::size_t n) override {
    if (dst.dtype() == src.dtype()) {  // a plain copy
      if (n > 0) {
        PB_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), n * dtype_bytes(dst.dtype()), cudaMemcpyDeviceToDevice,
                                      stream_));
      }
      return;
    }
    with_types(dst.dtype(), src.dtype(), [&](auto d, auto s) {
      using TD = decltype(d);
      using TS = decltype(s);
      convert_kernel<TD, TS><<<blocks_for(n), kThreads, 0, stream_>>>(dst.as<TD>(), src.as<TS>(), n);
    });
    PB_LAUNCH_CHECK();
  }
  void scale(TensorPtr y, float alpha, std::size_t n) override {
    with_type(y.dtype(), [&](auto e) {
      using T = decltype(e);
      scale_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(y.as<T>(), alpha, n);
    });
    PB_LAUNCH_CHECK();
  }

  // ---- embedding ---------------------------------------------------------------------------------
  void embedding_forward(TensorPtr out, const int32_t* tokens, ConstTensorPtr tok, ConstTensorPtr pos, int B, int S,
                         int C) override {
    const DType t = one_dtype("embedding_forward", {{"out", out}, {"tok", tok}, {"pos", pos}});
    with_type(t, [&](auto e) {
      using T = decltype(e);
      embedding_forward_kernel<T><<<blocks_for(static_cast<std::size_t>(B) * S * C), kThreads, 0, stream_>>>(
          out.as<T>(), tokens, tok.as<T>(), pos.as<T>(), B * S, S, C);
    });
    PB_LAUNCH_CHECK();
  }
  // dout in either dtype, dtok and dpos each fp32 or bf16. An fp32 dtok adds the rows in place, one token
  // partition per thread as before; a bf16 one sums each token's rows in fp32 first (two int32 per row of
  // chain in backend scratch) and rounds once.
  void embedding_backward(TensorPtr dtok, TensorPtr dpos, ConstTensorPtr dout, const int32_t* tokens, int B, int S,
                          int C) override {
    const int N = B * S;
    with_type(dout.dtype(), [&](auto e) {
      using T = decltype(e);
      if (N > 0) {  // the rows sorted by token (stable), then each token's run summed by one thread per column
        const std::size_t n = static_cast<std::size_t>(N);
        std::size_t sort_bytes = 0;
        PB_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr),
                                                      static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr), N, 0, 32, stream_));
        const std::size_t pairs_bytes = (4 * sizeof(int32_t) * n + 255) / 256 * 256;  // then cub's, aligned
        auto* keys = static_cast<int32_t*>(scratch(pairs_bytes + sort_bytes));
        int32_t *rows = keys + n, *sorted_keys = keys + 2 * n, *sorted_rows = keys + 3 * n;
        void* sort_temp = reinterpret_cast<char*>(keys) + pairs_bytes;
        embedding_sort_keys_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(keys, rows, tokens, N);
        PB_LAUNCH_CHECK();
        PB_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys, sorted_keys, rows, sorted_rows, N,
                                                      0, 32, stream_));
        with_type(dtok.dtype(), [&](auto g) {
          using TG = decltype(g);
          embedding_backward_sorted_kernel<TG, T><<<blocks_for(n * C), kThreads, 0, stream_>>>(
              dtok.as<TG>(), dout.as<T>(), sorted_keys, sorted_rows, N, C);
        });
        PB_LAUNCH_CHECK();
      }
      if (dpos) {
        with_type(dpos.dtype(), [&](auto g) {
          using TG = decltype(g);
          embedding_backward_pos_kernel<TG, T><<<blocks_for(static_cast<std::size_t>(S) * C), kThreads, 0, stream_>>>(
              dpos.as<TG>(), dout.as<T>(), B, S, C);
        });
        PB_LAUNCH_CHECK();
      }
    });
  }

  // ---- loss: the logits in either dtype ----------------------------------------------------------
  void cross_entropy_forward_backward(TensorPtr logits, double* loss_sum, const int32_t* targets, int N, int V, int Vp,
                                      float scale) override {
    if (N == 0) return;
    double* row_loss = static_cast<double*>(scratch(sizeof(double) * N));
    with_type(logits.dtype(), [&](auto e) {
      using T = decltype(e);
      cross_entropy_kernel<T><<<N, kThreads, 0, stream_>>>(logits.as<T>(), row_loss, targets, V, Vp, scale);
    });
    PB_LAUNCH_CHECK();
    sum_rows(loss_sum, row_loss, N, scale);
  }
  void cross_entropy_row_max(float* row_max, ConstTensorPtr logits, int N, int V, int Vp) override {
    if (N == 0) return;
    with_type(logits.dtype(), [&](auto e) {
      using T = decltype(e);
      cross_entropy_row_max_kernel<T><<<N, kThreads, 0, stream_>>>(row_max, logits.as<T>(), V, Vp);
    });
    PB_LAUNCH_CHECK();
  }
  void cross_entropy_partials(float* sums, ConstTensorPtr logits, const int32_t* targets, const float* row_max, int N,
                              int V, int Vp) override {
    if (N == 0) return;
    with_type(logits.dtype(), [&](auto e) {
      using T = decltype(e);
      cross_entropy_partials_kernel<T><<<N, kThreads, 0, stream_>>>(sums, logits.as<T>(), targets, row_max, N, V,
                                                                    Vp);
    });
    PB_LAUNCH_CHECK();
  }
  void cross_entropy_finish(TensorPtr logits, double* loss_sum, const int32_t* targets, const float* row_max,
                            const float* sums, int N, int V, int Vp, float scale) override {
    if (N == 0) return;
    double* row_loss = static_cast<double*>(scratch(sizeof(double) * N));
    with_type(logits.dtype(), [&](auto e) {
      using T = decltype(e);
      cross_entropy_finish_kernel<T><<<N, kThreads, 0, stream_>>>(logits.as<T>(), row_loss, targets, row_max, sums, N,
                                                                  V, Vp, scale);
    });
    PB_LAUNCH_CHECK();
    sum_rows(loss_sum, row_loss, N, scale);
  }

  // ---- context parallelism: the fused attention's kernels by position, over one block of keys ------
  // The kernels take one dtype for the inputs (q, k, v; and dout in the backward) and one for the
  // outputs (out; dq; dk and dv), any of the four combinations, so bf16 queries and keys accumulate into
  // fp32 or bf16 gradients directly. Inputs of mixed dtypes are staged: each copied into a packed fp32
  // buffer in backend scratch and read from there; dk and dv of different dtypes likewise (copied in,
  // accumulated in fp32, copied back, rounded once).
  void attention_block_forward(TensorPtr out, float* lse, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v,
                               int q_stride, int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq,
                               int Sk, int C, int heads, int kv_heads) override {
    check_attention_shape(B, C, heads);
    if (kv_heads == 0) kv_heads = heads;
    check_kv_heads("attention_block_forward", heads, kv_heads);
    if (B == 0 || Sq == 0) return;
    const std::size_t q_rows = static_cast<std::size_t>(B) * Sq, kv_rows = static_cast<std::size_t>(B) * Sk;
    const int ckv = C / heads * kv_heads;  // the key/value heads' columns
    if (!(q.dtype() == k.dtype() && k.dtype() == v.dtype())) {
      float* staged = scratch_floats(static_cast<std::size_t>(C) * q_rows + 2 * static_cast<std::size_t>(ckv) * kv_rows);
      q = stage(staged, q, q_stride, q_rows, C);
      k = stage(staged + q_rows * C, k, kv_stride, kv_rows, ckv);
      v = stage(staged + q_rows * C + kv_rows * ckv, v, kv_stride, kv_rows, ckv);
      q_stride = C;
      kv_stride = ckv;
    }
    const dim3 grid((Sq + kAttRows - 1) / kAttRows, B * heads);
    with_types(out.dtype(), q.dtype(), [&](auto o, auto i) {
      using TO = decltype(o);
      using TI = decltype(i);
      attention_block_forward_kernel<TO, TI><<<grid, kAttWarps * 32, attention_row_smem(C / heads, false), stream_>>>(
          out.as<TO>(), lse, q.as<TI>(), k.as<TI>(), v.as<TI>(), q_stride, kv_stride, pos_q, pos_k, Sq, Sk, C, heads,
          kv_heads);
    });
    PB_LAUNCH_CHECK();
  }
  void attention_merge(TensorPtr out, float* lse, ConstTensorPtr out_b, const float* lse_b, int B, int Sq, int C,
                       int heads) override {
    const std::size_t warps = static_cast<std::size_t>(B) * Sq * heads;
    if (warps == 0) return;
    with_types(out.dtype(), out_b.dtype(), [&](auto o, auto ob) {
      using TO = decltype(o);
      using TB = decltype(ob);
      attention_merge_kernel<TO, TB><<<blocks_for(warps * 32), kThreads, 0, stream_>>>(out.as<TO>(), lse,
                                                                                     out_b.as<TB>(), lse_b, B, Sq, C,
                                                                                     heads);
    });
    PB_LAUNCH_CHECK();
  }
  void attention_block_delta(float* delta, ConstTensorPtr dout, ConstTensorPtr out, int B, int Sq, int C,
                             int heads) override {
    const std::size_t rows = static_cast<std::size_t>(B) * heads * Sq;
    if (rows == 0) return;
    with_types(dout.dtype(), out.dtype(), [&](auto g, auto o) {
      using TA = decltype(g);
      using TB = decltype(o);
      attention_backward_dot_kernel<TA, TB><<<blocks_for(rows * 32), kThreads, 0, stream_>>>(
          delta, dout.as<TA>(), out.as<TB>(), B, Sq, C, heads);
    });
    PB_LAUNCH_CHECK();
  }
  void attention_block_backward(TensorPtr dq, TensorPtr dk, TensorPtr dv, ConstTensorPtr dout, const float* lse,
                                const float* delta, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v, int q_stride,
                                int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk,
                                int C, int heads, int kv_heads) override {
    check_attention_shape(B, C, heads);
    if (kv_heads == 0) kv_heads = heads;
    check_kv_heads("attention_block_backward", heads, kv_heads);
    if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing to add
    const int d = C / heads, ckv = d * kv_heads;  // ckv: the key/value heads' columns
    const std::size_t q_rows = static_cast<std::size_t>(B) * Sq, kv_rows = static_cast<std::size_t>(B) * Sk;
    const bool stage_inputs = !(q.dtype() == k.dtype() && k.dtype() == v.dtype() && v.dtype() == dout.dtype());
    const bool stage_dkv = dk.dtype() != dv.dtype();
    const std::size_t cols = static_cast<std::size_t>(C), kv_cols = static_cast<std::size_t>(ckv);
    const std::size_t staged_floats =
        (stage_inputs ? 2 * q_rows * cols + 2 * kv_rows * kv_cols : 0) + (stage_dkv ? 2 * kv_rows * kv_cols : 0);
    float* staged = staged_floats > 0 ? scratch_floats(staged_floats) : nullptr;
    const int dq_stride = q_stride, dkv_stride = kv_stride;  // the gradients' own strides, whatever is staged
    if (stage_inputs) {
      q = stage(staged, q, q_stride, q_rows, C);
      dout = stage(staged + q_rows * cols, dout, C, q_rows, C);
      k = stage(staged + 2 * q_rows * cols, k, kv_stride, kv_rows, ckv);
      v = stage(staged + 2 * q_rows * cols + kv_rows * kv_cols, v, kv_stride, kv_rows, ckv);
      staged += 2 * q_rows * cols + 2 * kv_rows * kv_cols;
      q_stride = C;
      kv_stride = ckv;
    }
    TensorPtr dk_run = dk, dv_run = dv;
    if (stage_dkv) {
      dk_run = stage(staged, dk, dkv_stride, kv_rows, ckv);
      dv_run = stage(staged + kv_rows * kv_cols, dv, dkv_stride, kv_rows, ckv);
    }
    const int dkv_run_stride = stage_dkv ? ckv : dkv_stride;
    // two kernels, each gradient row with one writer: dq per query row, dk and dv per key row
    const dim3 rows_grid((Sq + kAttRows - 1) / kAttRows, B * heads);
    const dim3 keys_grid((Sk + kDkvKeys - 1) / kDkvKeys, B * kv_heads);
    with_types(dq.dtype(), q.dtype(), [&](auto o, auto i) {
      using TO = decltype(o);
      using TI = decltype(i);
      attention_block_backward_dq_kernel<TO, TI>
          <<<rows_grid, kAttWarps * 32, attention_row_smem(d, true), stream_>>>(
              dq.as<TO>(), dq_stride, dout.as<TI>(), lse, delta, q.as<TI>(), k.as<TI>(), v.as<TI>(), q_stride,
              kv_stride, pos_q, pos_k, Sq, Sk, C, heads, kv_heads);
    });
    PB_LAUNCH_CHECK();
    with_types(dk_run.dtype(), q.dtype(), [&](auto o, auto i) {
      using TO = decltype(o);
      using TI = decltype(i);
      with_dkv_class(d, [&](auto half) {
        constexpr int kHalf = decltype(half)::value;
        const std::size_t smem = attention_dkv_smem(d);
        attention_block_backward_dkv_kernel<TO, TI, kHalf><<<keys_grid, kDkvWarps * 32, smem, stream_>>>(
            dk_run.as<TO>(), dv_run.as<TO>(), dkv_run_stride, dout.as<TI>(), lse, delta, q.as<TI>(), k.as<TI>(),
            v.as<TI>(), q_stride, kv_stride, pos_q, pos_k, Sq, Sk, C, heads, kv_heads);
      });
    });
    PB_LAUNCH_CHECK();
    if (stage_dkv) {
      unstage(dk, dkv_stride, dk_run.as<float>(), kv_rows, ckv);
      unstage(dv, dkv_stride, dv_run.as<float>(), kv_rows, ckv);
    }
  }
  void copy_2d(TensorPtr dst, std::size_t dst_stride, ConstTensorPtr src, std::size_t src_stride, std::size_t rows,
               std::size_t cols) override {
    const std::size_t bytes = dtype_bytes(one_dtype("copy_2d", {{"dst", dst}, {"src", src}}));
    if (rows == 0 || cols == 0) return;
    const std::size_t width = cols * bytes;
    if (rows == 1) {  // a single row: any strides (cudaMemcpy2D wants pitches of at least the width)
      PB_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), width, cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    PB_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), dst_stride * bytes, src.data(), src_stride * bytes, width, rows,
                                    cudaMemcpyDeviceToDevice, stream_));
  }

  // ---- mixture of experts: logits, dlogits and the token buffers in either dtype -------------------
  void moe_router_forward(int32_t* expert, float* gate, float* probs, ConstTensorPtr logits, int N, int E,
                          int k) override {
    with_type(logits.dtype(), [&](auto e) {
      using T = decltype(e);
      moe_router_forward_kernel<T><<<blocks_for(N), kThreads, 0, stream_>>>(expert, gate, probs, logits.as<T>(), N, E,
                                                                            k);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_router_backward(TensorPtr dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                           int E, int k) override {
    with_type(dlogits.dtype(), [&](auto e) {
      using T = decltype(e);
      moe_router_backward_kernel<T><<<blocks_for(N), kThreads, 0, stream_>>>(dlogits.as<T>(), dgate, gate, expert, N,
                                                                             E, k);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                  int capacity) override {
    moe_assign_kernel<<<blocks_for(E), kThreads, 0, stream_>>>(slot, counts, expert, N, E, k, capacity);
    PB_LAUNCH_CHECK();
  }
  void moe_aux_loss(TensorPtr dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                    float coef, float grad_scale) override {
    if (N == 0) return;  // no tokens: no loss, as on the CPU
    double* prob_sum = static_cast<double*>(scratch(sizeof(double) * E));
    moe_prob_sums_kernel<<<blocks_for(E), kThreads, 0, stream_>>>(prob_sum, probs, N, E);
    PB_LAUNCH_CHECK();
    moe_aux_loss_sum_kernel<<<1, kThreads, 0, stream_>>>(aux_sum, prob_sum, counts, N, E, k, coef);
    PB_LAUNCH_CHECK();
    with_type(dlogits.dtype(), [&](auto e) {
      using T = decltype(e);
      moe_aux_loss_grad_kernel<T><<<blocks_for(N), kThreads, 0, stream_>>>(dlogits.as<T>(), probs, counts, N, E, k,
                                                                           coef, grad_scale);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_dispatch(TensorPtr buf, ConstTensorPtr inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                    int C, int h) override {
    const DType t = one_dtype("moe_dispatch", {{"buf", buf}, {"inp", inp}});
    PB_CUDA_CHECK(cudaMemsetAsync(buf.data(), 0, dtype_bytes(t) * E * static_cast<std::size_t>(C) * h, stream_));
    with_type(t, [&](auto e) {
      using T = decltype(e);
      moe_dispatch_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * k * h), kThreads, 0, stream_>>>(
          buf.as<T>(), inp.as<T>(), expert, slot, N, k, C, h);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_dispatch_backward(TensorPtr dinp, ConstTensorPtr dbuf, const int32_t* expert, const int32_t* slot, int N,
                             int /*E*/, int k, int C, int h) override {
    with_type(one_dtype("moe_dispatch_backward", {{"dinp", dinp}, {"dbuf", dbuf}}), [&](auto e) {
      using T = decltype(e);
      moe_dispatch_backward_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * h), kThreads, 0, stream_>>>(
          dinp.as<T>(), dbuf.as<T>(), expert, slot, N, k, C, h);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_combine(TensorPtr out, ConstTensorPtr buf, const float* gate, const int32_t* expert, const int32_t* slot,
                   int N, int /*E*/, int k, int C, int h) override {
    with_type(one_dtype("moe_combine", {{"out", out}, {"buf", buf}}), [&](auto e) {
      using T = decltype(e);
      moe_combine_kernel<T><<<blocks_for(static_cast<std::size_t>(N) * h), kThreads, 0, stream_>>>(
          out.as<T>(), buf.as<T>(), gate, expert, slot, N, k, C, h);
    });
    PB_LAUNCH_CHECK();
  }
  void moe_combine_backward(TensorPtr dbuf, float* dgate, ConstTensorPtr dout, ConstTensorPtr buf, const float* gate,
                            const int32_t* expert, const int32_t* slot, int N, int E, int k, int C,
                            int h) override {
    const DType t = one_dtype("moe_combine_backward", {{"dbuf", dbuf}, {"dout", dout}, {"buf", buf}});
    PB_CUDA_CHECK(cudaMemsetAsync(dbuf.data(), 0, dtype_bytes(t) * E * static_cast<std::size_t>(C) * h, stream_));
    const std::size_t assignments = static_cast<std::size_t>(N) * k;
    with_type(t, [&](auto e) {
      using T = decltype(e);
      moe_combine_backward_dbuf_kernel<T><<<blocks_for(assignments * h), kThreads, 0, stream_>>>(
          dbuf.as<T>(), dout.as<T>(), gate, expert, slot, N, k, C, h);
      PB_LAUNCH_CHECK();
      moe_combine_backward_dgate_kernel<T><<<blocks_for(assignments * 32), kThreads, 0, stream_>>>(  // a warp each
          dgate, dout.as<T>(), buf.as<T>(), expert, slot, N, k, C, h);
      PB_LAUNCH_CHECK();
    });
  }

  // ---- optimizer ---------------------------------------------------------------------------------
  void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v, std::size_t n, float lr, float beta1,
                    float beta2, float eps, float weight_decay, int t, float grad_scale) override {
    const float bias1 = 1.0f - std::pow(beta1, static_cast<float>(t));
    const float bias2 = 1.0f - std::pow(beta2, static_cast<float>(t));
    with_type(grads.dtype(), [&](auto e) {
      using TG = decltype(e);
      adamw_kernel<TG><<<blocks_for(n), kThreads, 0, stream_>>>(params, grads.as<TG>(), m, v, n, beta1, beta2, eps,
                                                                lr / bias1, std::sqrt(bias2), 1.0f - lr * weight_decay,
                                                                grad_scale);
    });
    PB_LAUNCH_CHECK();
  }
  // One launch for every range: the table of ranges uploaded (staged, no wait) into adamw_ranges_, then
  // adamw_ranges_kernel over all their elements.
  void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v, const std::vector<AdamwRange>& ranges,
                    float lr, float beta1, float beta2, float eps, int t, float grad_scale) override {
    std::vector<AdamwRangeDesc> table;
    table.reserve(ranges.size());
    std::size_t total = 0;
    for (const AdamwRange& r : ranges) {
      if (r.n == 0) continue;
      table.push_back(AdamwRangeDesc{total, r.begin, r.n, 1.0f - lr * r.weight_decay});
      total += r.n;
    }
    if (table.empty()) return;
    const float bias1 = 1.0f - std::pow(beta1, static_cast<float>(t));
    const float bias2 = 1.0f - std::pow(beta2, static_cast<float>(t));
    auto* desc = static_cast<AdamwRangeDesc*>(reserve(adamw_ranges_, sizeof(AdamwRangeDesc) * table.size()));
    upload(desc, table.data(), sizeof(AdamwRangeDesc) * table.size());
    with_type(grads.dtype(), [&](auto e) {
      using TG = decltype(e);
      adamw_ranges_kernel<TG><<<blocks_for(total), kThreads, 0, stream_>>>(
          params, grads.as<TG>(), m, v, desc, static_cast<int>(table.size()), total, beta1, beta2, eps, lr / bias1,
          std::sqrt(bias2), grad_scale);
    });
    PB_LAUNCH_CHECK();
  }

 private:
  // A device buffer that grows to the largest size asked of it.
  struct DeviceBuffer {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };

  // C (m, n) = op_a(A) (m, k) · op_b(B) (k, n) + β·C, column-major, α = 1, accumulated in fp32
  // (CUBLAS_COMPUTE_32F; TF32 off: CUBLAS_DEFAULT_MATH) and written in C's dtype (β·C read in it and the
  // sum rounded once). The one place that decides the operand types: bf16 tensors are CUDA_R_16BF
  // operands as they are; fp32 tensors with bf16_matmul_ are first rounded to bf16 (nearest even) into
  // bf16_a_ and bf16_b_ and passed as CUDA_R_16BF, so only the bf16 tensor cores can run the product (no
  // fp32 path to fall back on); fp32 tensors without it are fp32 operands. cuBLAS has no fp32-operand
  // product into a bf16 C: that one goes through an fp32 product in backend scratch, then written into C
  // (β = 0) or added to it (β = 1), rounded once.
  void gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, ConstTensorPtr A, int lda,
            ConstTensorPtr B, int ldb, float beta, TensorPtr C, int ldc) {
    if (A.dtype() != B.dtype()) throw std::logic_error("gemm: operands of two dtypes");  // the ops check
    const float alpha = 1.0f;
    const void* a = A.data();
    const void* b = B.data();
    cudaDataType_t operand_type = CUDA_R_32F;
    if (A.dtype() == DType::bf16) {
      operand_type = CUDA_R_16BF;
    } else if (bf16_matmul_) {
      a = to_bf16(bf16_a_, A.as<float>(), operand_elements(op_a, m, k, lda));
      b = to_bf16(bf16_b_, B.as<float>(), operand_elements(op_b, k, n, ldb));
      operand_type = CUDA_R_16BF;
    }
    if (operand_type == CUDA_R_32F && C.dtype() == DType::bf16) {
      if (ldc != m || (beta != 0.0f && beta != 1.0f)) throw std::logic_error("gemm: a bf16 C of fp32 operands");
      const std::size_t count = static_cast<std::size_t>(m) * n;
      float* product = scratch_floats(count);
      const float zero = 0.0f;
      PB_CUBLAS_CHECK(cublasGemmEx(cublas_, op_a, op_b, m, n, k, &alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb, &zero,
                                   product, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      if (beta == 0.0f) {
        convert_kernel<uint16_t, float><<<blocks_for(count), kThreads, 0, stream_>>>(C.as<uint16_t>(), product, count);
      } else {
        accumulate_kernel<uint16_t, float><<<blocks_for(count), kThreads, 0, stream_>>>(C.as<uint16_t>(), product,
                                                                                       count);
      }
      PB_LAUNCH_CHECK();
      return;
    }
    PB_CUBLAS_CHECK(cublasGemmEx(cublas_, op_a, op_b, m, n, k, &alpha, a, operand_type, lda, b, operand_type, ldb,
                                 &beta, C.data(), cuda_type(C.dtype()), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // dbias (OC) += Σ_rows dout (N, OC): the column sums in fp32 as a product with a vector of ones, added
  // in dbias's dtype. fp32 both: cublasSgemv (β = 1). A bf16 dout: cublasGemmEx with bf16 operands (dout
  // and bf16 ones), fp32 accumulation, C = dbias in its dtype, β = 1 (a bf16 dbias rounded once). An fp32
  // dout into a bf16 dbias: cublasSgemv into fp32 scratch, then added, rounded once.
  void add_column_sums(TensorPtr dbias, ConstTensorPtr dout, int N, int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (dout.dtype() == DType::bf16) {
      PB_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, OC, 1, N, &one, dout.data(), CUDA_R_16BF, OC,
                                   ones(N, DType::bf16), CUDA_R_16BF, std::max(N, 1), &one, dbias.data(),
                                   cuda_type(dbias.dtype()), OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    const auto* ones_f32 = static_cast<const float*>(ones(N, DType::f32));
    if (dbias.dtype() == DType::f32) {
      PB_CUBLAS_CHECK(cublasSgemv(cublas_, CUBLAS_OP_N, OC, N, &one, dout.as<float>(), OC, ones_f32, 1, &one,
                                  dbias.as<float>(), 1));
      return;
    }
    float* sums = scratch_floats(OC);
    PB_CUBLAS_CHECK(cublasSgemv(cublas_, CUBLAS_OP_N, OC, N, &one, dout.as<float>(), OC, ones_f32, 1, &zero, sums, 1));
    accumulate_kernel<uint16_t, float><<<blocks_for(OC), kThreads, 0, stream_>>>(dbias.as<uint16_t>(), sums, OC);
    PB_LAUNCH_CHECK();
  }

  static cudaDataType_t cuda_type(DType t) { return t == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

  // cuBLASLt's products with an epilogue, bf16 operands and output, fp32 accumulation (CUBLAS_COMPUTE_32F),
  // column-major: D (m, n; ld m) = op(A) · B, B (k, n; ld k).
  // - bias: A (m, k; ld m), D = A·B + bias, the bias (bf16, one per row of D) added to the fp32 sum in the
  //   epilogue and rounded once: what the broadcast-and-β = 1 product computes. matmul_forward's
  //   outᵀ (OC, N) = weightᵀ (OC, C) · inpᵀ (C, N) + bias.
  // - gelu_aux_bias: as bias, then D = gelu_tanh(sum + bias) and aux = sum + bias, both rounded once from
  //   fp32 (CUBLASLT_EPILOGUE_GELU_AUX_BIAS): matmul_gelu_forward.
  // - dgelu: A stored (k, m; ld k) and transposed, D = (Aᵀ·B) ⊙ gelu_tanh'(aux), the fp32 sum scaled
  //   before rounding (CUBLASLT_EPILOGUE_DGELU): matmul_gelu_backward's dpreᵀ (C, N) = weight (C, OC) ·
  //   doutᵀ (OC, N), aux = preᵀ.
  // aux (bf16, laid out as D) needs 16-byte alignment and m divisible by 8; a bias not aligned to 16 bytes
  // is not promised to work with the epilogue. The algorithm is cuBLASLt's first heuristic choice for the
  // shape, the epilogue and the operands' alignments, looked up once per shape and kept; false (the
  // caller then takes the unfused path) when there is none.
  enum class LtEpilogue : int { bias, gelu_aux_bias, dgelu };
  struct LtProduct {
    LtEpilogue epilogue;
    int m, n, k;
    const void* a;
    const void* b;
    void* d;
    const void* bias;  // bias and gelu_aux_bias
    const void* aux;   // gelu_aux_bias (written) and dgelu (read)
  };
  static std::uint32_t alignment(const void* p) {
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    std::uint32_t a = 256;
    while (a > 2 && address % a != 0) a /= 2;
    return a;
  }
  bool lt_matmul(const LtProduct& p) {
    if (p.m == 0 || p.n == 0 || p.k == 0) return false;
    const bool with_bias = p.epilogue != LtEpilogue::dgelu;
    const bool with_aux = p.epilogue != LtEpilogue::bias;
    if (with_bias && alignment(p.bias) < 16) return false;
    if (with_aux && (alignment(p.aux) < 16 || p.m % 8 != 0)) return false;
    const LtKey key{static_cast<int>(p.epilogue), p.m, p.n, p.k, alignment(p.a), alignment(p.b), alignment(p.d)};
    auto hit = lt_plans_.find(key);
    if (hit == lt_plans_.end()) hit = lt_plans_.emplace(key, lt_plan(key)).first;
    LtPlan& plan = *hit->second;
    if (!plan.found) return false;
    if (with_bias) {
      PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias,
                                                     sizeof(p.bias)));
    }
    if (with_aux) {
      PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.aux,
                                                     sizeof(p.aux)));
    }
    const float alpha = 1.0f, beta = 0.0f;
    void* workspace = plan.workspace_bytes > 0 ? reserve(lt_workspace_, plan.workspace_bytes) : nullptr;
    PB_CUBLAS_CHECK(cublasLtMatmul(cublaslt_, plan.desc, &alpha, p.a, plan.a, p.b, plan.b, &beta, p.d, plan.d, p.d,
                                   plan.d, &plan.algo, workspace, plan.workspace_bytes, stream_));
    return true;
  }
  // The epilogue, the shape (m, n, k) and the alignments in bytes of A, B and D.
  using LtKey = std::tuple<int, int, int, int, std::uint32_t, std::uint32_t, std::uint32_t>;
  struct LtPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    std::size_t workspace_bytes = 0;
    bool found = false;
    ~LtPlan() {
      if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
      if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
      if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
      if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
    }
  };
  static constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;  // as PyTorch gives cuBLASLt on Hopper
  std::unique_ptr<LtPlan> lt_plan(const LtKey& key) {
    const auto [epilogue_index, m, n, k, align_a, align_b, align_d] = key;
    const auto epilogue = static_cast<LtEpilogue>(epilogue_index);
    auto plan = std::make_unique<LtPlan>();
    PB_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const bool transa = epilogue == LtEpilogue::dgelu;
    const cublasOperation_t op_a = transa ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = CUBLAS_OP_N;
    PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    const cublasLtEpilogue_t lt_epilogue = epilogue == LtEpilogue::bias            ? CUBLASLT_EPILOGUE_BIAS
                                           : epilogue == LtEpilogue::gelu_aux_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                                                                    : CUBLASLT_EPILOGUE_DGELU;
    PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &lt_epilogue,
                                                   sizeof(lt_epilogue)));
    if (epilogue != LtEpilogue::dgelu) {
      const cudaDataType_t bias_type = CUDA_R_16BF;
      PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                     sizeof(bias_type)));
    }
    if (epilogue != LtEpilogue::bias) {  // the pre-activation: bf16, laid out as D (ld m)
      const int64_t aux_ld = m;
      PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld,
                                                     sizeof(aux_ld)));
      const cudaDataType_t aux_type = CUDA_R_16BF;
      PB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
                                                     &aux_type, sizeof(aux_type)));
    }
    if (transa) {
      PB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, k, m, k));
    } else {
      PB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, m, k, m));
    }
    PB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, k, n, k));
    PB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, CUDA_R_16BF, m, n, m));
    cublasLtMatmulPreference_t preference = nullptr;
    PB_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    const std::size_t workspace = kLtWorkspaceBytes;
    PB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace, sizeof(workspace)));
    for (const auto& [attribute, bytes] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
                                           std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
                                           std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d},
                                           std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d}}) {
      PB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &bytes, sizeof(bytes)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(cublaslt_, plan->desc, plan->a, plan->b, plan->d,
                                                                 plan->d, preference, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(preference);
    if (status == CUBLAS_STATUS_SUCCESS && found > 0) {
      plan->algo = result.algo;
      plan->workspace_bytes = result.workspaceSize;
      plan->found = true;
    }
    return plan;
  }

  // `rows` rows of `cols` elements of src (rows `stride` apart, either dtype) as a packed fp32 copy at dst
  // (rows `cols` apart), which it returns.
  float* stage(float* dst, ConstTensorPtr src, int stride, std::size_t rows, int cols) {
    const std::size_t count = rows * cols;
    if (count == 0) return dst;
    with_type(src.dtype(), [&](auto e) {
      using T = decltype(e);
      convert_2d_kernel<float, T><<<blocks_for(count), kThreads, 0, stream_>>>(dst, cols, src.as<T>(), stride, rows,
                                                                              cols);
    });
    PB_LAUNCH_CHECK();
    return dst;
  }
  // Its inverse: the packed fp32 rows at src back into dst (rows `stride` apart, its dtype: rounded once).
  void unstage(TensorPtr dst, int stride, const float* src, std::size_t rows, int cols) {
    const std::size_t count = rows * cols;
    if (count == 0) return;
    with_type(dst.dtype(), [&](auto e) {
      using T = decltype(e);
      convert_2d_kernel<T, float><<<blocks_for(count), kThreads, 0, stream_>>>(dst.as<T>(), stride, src, cols, rows,
                                                                              cols);
    });
    PB_LAUNCH_CHECK();
  }

  // Elements of a column-major operand whose op() is (rows, cols) with leading dimension ld: the span
  // from its first element to its last.
  static std::size_t operand_elements(cublasOperation_t op, int rows, int cols, int ld) {
    const int stored_rows = op == CUBLAS_OP_N ? rows : cols, stored_cols = op == CUBLAS_OP_N ? cols : rows;
    if (stored_rows == 0 || stored_cols == 0) return 0;
    return static_cast<std::size_t>(ld) * (stored_cols - 1) + stored_rows;
  }

  // `n` floats rounded to bf16 into `buf` (grown as needed; the stream orders its reuse by the next
  // product after this one has read it).
  const void* to_bf16(DeviceBuffer& buf, const float* x, std::size_t n) {
    auto* out = static_cast<uint16_t*>(reserve(buf, std::max<std::size_t>(n, 1) * sizeof(uint16_t)));
    if (n > 0) {
      float_to_bf16_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(out, x, n);
      PB_LAUNCH_CHECK();
    }
    return out;
  }

  void sum_rows(double* loss_sum, const double* row_loss, int N, float scale) {
    sum_rows_kernel<<<1, kReduceThreads, 0, stream_>>>(loss_sum, row_loss, N, scale);
    PB_LAUNCH_CHECK();
  }

  static void check_kv_heads(const char* op, int heads, int kv_heads) {
    if (kv_heads < 1 || heads % kv_heads != 0) {
      throw std::invalid_argument(std::string("cuda backend: ") + op + ": " + std::to_string(kv_heads) +
                                  " key/value heads do not divide " + std::to_string(heads) + " heads");
    }
  }
  // LayerNorm's and RMSNorm's weight gradients sum their rows in chunks (at most 128, in order):
  // {chunks, rows per chunk}.
  static std::pair<int, int> param_chunks(int N) {
    constexpr int kMaxChunks = 128;
    const int rows_per_chunk = (N + kMaxChunks - 1) / kMaxChunks;
    return {(N + rows_per_chunk - 1) / rows_per_chunk, rows_per_chunk};
  }
  void rope(TensorPtr x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d, double theta,
            float sign) {
    if (d % 2 != 0) throw std::invalid_argument("cuda backend: rope: the head dimension " + std::to_string(d) + " is odd");
    const std::size_t threads = static_cast<std::size_t>(B) * S * (d / 2);
    if (threads == 0 || heads == 0) return;
    with_type(x.dtype(), [&](auto e) {
      using T = decltype(e);
      rope_kernel<T><<<blocks_for(threads), kThreads, 0, stream_>>>(x.as<T>(), row_stride, pos, B, S, heads, d, theta,
                                                                    sign);
    });
    PB_LAUNCH_CHECK();
  }
  static void check_attention_shape(int B, int C, int heads) {
    if (C / heads > kCudaMaxHeadDim) {
      throw RunError(kExitConfig, "the CUDA attention takes head dimensions up to " + std::to_string(kCudaMaxHeadDim) +
                                      ", not " + std::to_string(C / heads));
    }
    if (static_cast<int64_t>(B) * heads > 65535) {  // the grid's y dimension
      throw RunError(kExitConfig, "the CUDA attention takes micro-batch × heads up to 65535, not " +
                                      std::to_string(static_cast<int64_t>(B) * heads));
    }
  }

  static void require_cudnn_dtype(const char* op, DType t) {
    if (t != DType::bf16) {
      throw std::invalid_argument(std::string("cuda backend: ") + op + " through cuDNN takes bf16 tensors, not " +
                                  dtype_name(t));
    }
  }

  // cudaMalloc, emptying the cache once when the device is full.
  void* device_malloc(std::size_t bytes) {
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      stream_synchronize(__FILE__, __LINE__);
      blocks_.release_cached();
      status = cudaMalloc(&ptr, bytes);
    }
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw RunError(kExitRuntime, "CUDA out of memory: " + std::to_string(bytes) + " bytes requested with " +
                                       std::to_string(blocks_.tracker().current_total()) + " bytes in use");
    }
    PB_CUDA_CHECK(status);
    sample_device_memory();
    return ptr;
  }

  // At least `bytes` in `buf`: cudaMalloc'ed directly (device_malloc, not the block cache: backend
  // workspace, in no memory category), replaced by a larger one after the stream has drained when it
  // is too small.
  void* reserve(DeviceBuffer& buf, std::size_t bytes) {
    if (bytes > buf.bytes) {
      stream_synchronize(__FILE__, __LINE__);
      PB_CUDA_CHECK(cudaFree(buf.ptr));
      buf = DeviceBuffer{};
      buf.ptr = device_malloc(bytes);  // empties the cache once when the device is full
      buf.bytes = bytes;
    }
    return buf.ptr;
  }

  // Backend-internal buffer, grown on demand; its users run one after another on the stream (an op that
  // needs several regions at once takes one buffer and divides it).
  void* scratch(std::size_t bytes) { return reserve(scratch_, bytes); }
  float* scratch_floats(std::size_t count) {
    return static_cast<float*>(scratch(sizeof(float) * std::max<std::size_t>(count, 1)));
  }

  // A vector of n ones in dtype t (at least n; grown as needed).
  const void* ones(int n, DType t) {
    Ones& o = t == DType::bf16 ? ones_bf16_ : ones_f32_;
    if (static_cast<std::size_t>(n) > o.count) {
      stream_synchronize(__FILE__, __LINE__);
      PB_CUDA_CHECK(cudaFree(o.ptr));
      o = Ones{};
      PB_CUDA_CHECK(cudaMalloc(&o.ptr, dtype_bytes(t) * n));
      o.count = n;
      with_type(t, [&](auto e) {
        using T = decltype(e);
        fill_kernel<T><<<blocks_for(n), kThreads, 0, stream_>>>(static_cast<T*>(o.ptr), 1.0f, n);
      });
      PB_LAUNCH_CHECK();
      sample_device_memory();
    }
    return o.ptr;
  }

  void launch_check(const char* file, int line) {
    throw_if_failed_async();
    cuda_check(cudaGetLastError(), "kernel launch", file, line);
    last_launch_file_ = file;
    last_launch_line_ = line;
    if (launch_blocking_) cuda_check(cudaStreamSynchronize(stream_), "kernel (CUDA_LAUNCH_BLOCKING=1)", file, line);
  }
  // A wait for the stream. A fault of a kernel queued since the last wait surfaces here, not where the
  // kernel was launched: the error names this wait and the last launch before it.
  void stream_synchronize(const char* file, int line) {
    const cudaError_t status = cudaStreamSynchronize(stream_);
    throw_if_failed_async();  // an aborted communicator ends its kernels: the wait ends, the run too
    if (status == cudaSuccess) return;
    const std::string last = last_launch_file_ == nullptr
                                 ? std::string("no kernel launched yet")
                                 : std::string("the last kernel launched at ") + last_launch_file_ + ":" +
                                       std::to_string(last_launch_line_);
    cuda_check(status,
               ("cudaStreamSynchronize (a fault in work queued since the last wait; " + last +
                "; rerun with CUDA_LAUNCH_BLOCKING=1 to name the faulting launch)")
                   .c_str(),
               file, line);
  }

  cudaEvent_t take_event() {
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    PB_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }

  // At least n doubles of pinned host memory (grown after a wait: nothing queued reads it then).
  double* host_doubles(int n) {
    if (static_cast<std::size_t>(n) > host_doubles_count_) {
      stream_synchronize(__FILE__, __LINE__);
      PB_CUDA_CHECK(cudaFreeHost(host_doubles_));
      host_doubles_ = nullptr;
      host_doubles_count_ = 0;
      PB_CUDA_CHECK(cudaMallocHost(&host_doubles_, sizeof(double) * n));
      host_doubles_count_ = static_cast<std::size_t>(n);
    }
    return host_doubles_;
  }

  // Device memory in use (every process on the GPU, the CUDA context and libraries included).
  void sample_device_memory() {
    std::size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      device_peak_ = std::max(device_peak_, static_cast<int64_t>(total_bytes - free_bytes));
    }
  }

  int device_;
  bool bf16_matmul_;  // the matrix products on bf16 operands (bf16_a_, bf16_b_), else fp32
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t cublaslt_ = nullptr;  // the bf16 products with a bias epilogue
  std::map<LtKey, std::unique_ptr<LtPlan>> lt_plans_;
  DeviceBuffer lt_workspace_;  // cuBLASLt's workspace: library workspace, in no memory category
  BlockCache blocks_;  // its destructor frees the cached blocks, after the stream is drained
  DeviceBuffer scratch_;
  // The bf16 copies of a product's two operands (bf16_matmul_ only). Library workspace like cuBLAS's:
  // cudaMalloc'ed directly, counted by device_memory_peak_bytes, in no memory category.
  DeviceBuffer bf16_a_, bf16_b_;
  struct Ones {
    void* ptr = nullptr;
    std::size_t count = 0;
  };
  Ones ones_f32_, ones_bf16_;  // for the column sums of dbias
#ifdef PB_WITH_CUDNN
  std::unique_ptr<CudnnAttention> cudnn_;  // --attention cudnn
  DeviceBuffer cudnn_workspace_;
#endif
  struct Span {
    cudaEvent_t start, stop;  // stop null while open
  };
  std::vector<Span> spans_;
  std::vector<cudaEvent_t> free_events_;
  bool span_open_ = false;
  bool launch_blocking_ = false;  // CUDA_LAUNCH_BLOCKING=1: every launch waited for
  const char* last_launch_file_ = nullptr;
  int last_launch_line_ = 0;
  double* host_doubles_ = nullptr;  // pinned, for the norms' bins
  std::size_t host_doubles_count_ = 0;
  DeviceBuffer adamw_ranges_;  // the table of the last multi-range AdamW
  struct UploadSlot {
    void* host = nullptr;  // pinned, kUploadSlotBytes
    cudaEvent_t copied = nullptr;
  };
  // A ring longer than a step's uploads (its micro-batches' tokens, a table per AdamW call): in a step a
  // slot's copy is long done when it comes round again. 64 MiB of pinned memory at most.
  static constexpr int kUploadSlots = 64;
  static constexpr std::size_t kUploadSlotBytes = std::size_t{1} << 20;
  std::array<UploadSlot, kUploadSlots> upload_slots_{};
  int next_upload_slot_ = 0;
  int64_t device_peak_ = 0;
};

}  // namespace

std::string cuda_device_pci_bus_id(int device) {
  char id[64] = {};
  if (cudaDeviceGetPCIBusId(id, sizeof(id), device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return id;
}

int cuda_visible_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for a CPU run
    return 0;
  }
  return count;
}

bool cuda_cudnn_attention_built() {
#ifdef PB_WITH_CUDNN
  return true;
#else
  return false;
#endif
}

std::string cuda_cudnn_version() {
#ifdef PB_WITH_CUDNN
  return CudnnAttention::version();
#else
  return "";
#endif
}

std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16_matmul, bool cudnn_attention) {
  return std::make_unique<CudaBackend>(device, bf16_matmul, cudnn_attention);
}

cudaStream_t cuda_compute_stream(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) throw std::logic_error("cuda_compute_stream: not a CUDA backend");
  return cuda->stream();
}

}  // namespace pb
