// cuDNN fused attention (see cudnn_attention.h). One graph per direction and shape, built on first use
// and kept: building costs milliseconds to seconds, executing microseconds.
#include "kernels/cuda/cudnn_attention.h"

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "common/errors.h"
#include "kernels/cuda/cuda_backend.h"

namespace pb {

namespace fe = cudnn_frontend;

namespace {

std::string shape_text(int B, int S, int C, int heads, int kv_heads) {
  return "B " + std::to_string(B) + ", S " + std::to_string(S) + ", hidden " + std::to_string(C) + ", heads " +
         std::to_string(heads) + (kv_heads != heads ? ", key/value heads " + std::to_string(kv_heads) : "");
}

// RunError (exit 3) naming the step; a cuDNN problem on a cluster is never a reason not to run, so the
// message names the way around it.
void check_fe(fe::error_t status, const char* step, const std::string& shape) {
  if (status.is_good()) return;
  throw RunError(kExitRuntime, std::string("cuDNN attention: ") + step + " failed for " + shape + ": " +
                                   status.get_message() + " (run with --attention native to use parabench's kernels)");
}

void check_cudnn(cudnnStatus_t status, const char* call) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  throw RunError(kExitRuntime, std::string("cuDNN: ") + call + " failed: " + cudnnGetErrorString(status) +
                                   " (run with --attention native to use parabench's kernels)");
}

using TensorRef = std::shared_ptr<fe::graph::Tensor_attributes>;

// (B, heads, S, d) over a row-major (B, S, row) buffer whose head j starts at column j·d.
TensorRef bhsd(fe::graph::Graph& g, const char* name, int64_t B, int64_t H, int64_t S, int64_t d, int64_t row) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_dim({B, H, S, d}).set_stride({S * row, d, row, 1}));
}

}  // namespace

struct CudnnAttention::Plan {
  fe::graph::Graph graph;
  TensorRef q, k, v, o, d_o, stats, dq, dk, dv;
  int64_t workspace_bytes = 0;
};

namespace {
// The deterministic backward decomposes through a dP workspace of B·heads·S²·2 bytes (the frontend's
// scaled_dot_product_flash_attention.h), which no memory category holds. It is taken up to the limit in
// CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT (parabench's cap below unless the user set another; −1: no
// limit); beyond it, on Hopper with cuDNN 9.25 or later, the frontend switches to its ordered-dQ
// accumulation (deterministic, workspace linear in S); elsewhere the non-deterministic backward runs
// instead (said once, and Backend::deterministic() turns false).
constexpr int64_t kDpWorkspaceCapBytes = int64_t{256} << 20;  // the frontend's own default cap
constexpr std::size_t kOrderedDqVersion = 92500;
constexpr const char* kDpLimitVariable = "CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT";

int64_t dp_workspace_bytes(int64_t B, int64_t H, int64_t S) {
  const int64_t sq = (S + 63) / 64 * 64, skv = (S + 127) / 128 * 128;
  return B * H * sq * skv * 2;
}

// The dP workspace limit in effect (−1: none), as the frontend reads it.
int64_t dp_workspace_limit() {
  const char* text = std::getenv(kDpLimitVariable);
  if (text == nullptr) return kDpWorkspaceCapBytes;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return end != text && *end == '\0' ? static_cast<int64_t>(value) : kDpWorkspaceCapBytes;
}

}  // namespace

void CudnnAttention::prepare_environment() {
  setenv(kDpLimitVariable, std::to_string(kDpWorkspaceCapBytes).c_str(), /*overwrite=*/0);
}

namespace {
bool ordered_dq_available() {  // Hopper (SM 9.x) and cuDNN 9.25 or later
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && cudnnGetVersion() >= kOrderedDqVersion;
}
}  // namespace

CudnnAttention::CudnnAttention(cudaStream_t stream, std::function<void*(std::size_t)> workspace)
    : stream_(stream), workspace_(std::move(workspace)) {
  cudnnHandle_t handle = nullptr;
  check_cudnn(cudnnCreate(&handle), "cudnnCreate");
  handle_ = handle;
  check_cudnn(cudnnSetStream(handle, stream_), "cudnnSetStream");
}

CudnnAttention::~CudnnAttention() {
  forward_plans_.clear();
  backward_plans_.clear();
  if (handle_ != nullptr) cudnnDestroy(static_cast<cudnnHandle_t>(handle_));
}

std::string CudnnAttention::version() {
  const std::size_t v = cudnnGetVersion();  // major·10000 + minor·100 + patch (cuDNN 9)
  return "cuDNN " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100) +
         " (frontend " + std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_PATCH_VERSION) + ")";
}

CudnnAttention::Plan& CudnnAttention::plan(bool backward, int B, int S, int C, int heads, int kv_heads) {
  auto& plans = backward ? backward_plans_ : forward_plans_;
  const Key key{B, S, C, heads, kv_heads};
  auto hit = plans.find(key);
  if (hit != plans.end()) return *hit->second;

  const std::string shape = shape_text(B, S, C, heads, kv_heads);
  const int64_t H = heads, Hkv = kv_heads, d = C / heads, Sl = S, Bl = B;
  const int64_t row = C + 2 * Hkv * d;  // a token's qkv values
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  auto handle = static_cast<cudnnHandle_t>(handle_);

  // Built with or without the deterministic backward; the first that cuDNN supports is kept.
  auto build = [&](bool deterministic) -> std::pair<std::unique_ptr<Plan>, fe::error_t> {
    auto p = std::make_unique<Plan>();
    fe::graph::Graph& g = p->graph;
    g.set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    p->q = bhsd(g, "Q", Bl, H, Sl, d, row);
    p->k = bhsd(g, "K", Bl, Hkv, Sl, d, row);
    p->v = bhsd(g, "V", Bl, Hkv, Sl, d, row);
    if (!backward) {
      auto options = fe::graph::SDPA_attributes()
                         .set_name("parabench_attention")
                         .set_generate_stats(true)
                         .set_attn_scale(scale)
                         .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                         .set_diagonal_band_right_bound(0);
      auto [o, stats] = g.sdpa(p->q, p->k, p->v, options);
      o->set_output(true).set_dim({Bl, H, Sl, d}).set_stride({Sl * C, d, C, 1});
      stats->set_output(true).set_data_type(fe::DataType_t::FLOAT).set_dim({Bl, H, Sl, 1}).set_stride({H * Sl, Sl, 1, 1});
      p->o = o;
      p->stats = stats;
    } else {
      p->o = bhsd(g, "O", Bl, H, Sl, d, C);
      p->d_o = bhsd(g, "dO", Bl, H, Sl, d, C);
      p->stats = g.tensor(fe::graph::Tensor_attributes()
                              .set_name("Stats")
                              .set_dim({Bl, H, Sl, 1})
                              .set_stride({H * Sl, Sl, 1, 1})
                              .set_data_type(fe::DataType_t::FLOAT));
      auto options = fe::graph::SDPA_backward_attributes()
                         .set_name("parabench_attention_backward")
                         .set_attn_scale(scale)
                         .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                         .set_diagonal_band_right_bound(0)
                         .set_deterministic_algorithm(deterministic);
      auto [dq, dk, dv] = g.sdpa_backward(p->q, p->k, p->v, p->o, p->d_o, p->stats, options);
      dq->set_output(true).set_dim({Bl, H, Sl, d}).set_stride({Sl * row, d, row, 1});
      for (const TensorRef& t : {dk, dv}) t->set_output(true).set_dim({Bl, Hkv, Sl, d}).set_stride({Sl * row, d, row, 1});
      p->dq = dq;
      p->dk = dk;
      p->dv = dv;
    }
    fe::error_t status = g.validate();
    if (status.is_good()) status = g.build_operation_graph(handle);
    if (status.is_good()) status = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
    if (status.is_good()) status = g.check_support(handle);
    if (status.is_good()) status = g.build_plans(handle);
    if (status.is_good()) status = g.get_workspace_size(p->workspace_bytes);
    return {std::move(p), status};
  };

  // The deterministic backward where it fits (above); otherwise, or where cuDNN has none for the shape,
  // the non-deterministic one, said once.
  const int64_t dp_bytes = dp_workspace_bytes(Bl, H, Sl), limit = dp_workspace_limit();
  const bool fits = limit < 0 || dp_bytes <= limit || ordered_dq_available();
  auto [built, status] = build(fits);
  std::string why_not = fits ? "" : "its deterministic backward would need a dP workspace of " +
                                        std::to_string(dp_bytes >> 20) + " MiB (B·heads·S²·2 bytes; over " +
                                        kDpLimitVariable + " = " + std::to_string(limit) +
                                        "; Hopper with cuDNN 9.25 or later avoids it)";
  if (backward && fits && status.is_bad()) {
    why_not = "cuDNN has no deterministic backward for it (" + status.get_message() + ")";
    std::tie(built, status) = build(false);
  }
  if (backward && !why_not.empty() && status.is_good()) {
    if (deterministic_) {
      std::fprintf(stderr,
                   "parabench: cuDNN attention backward for %s: %s; the non-deterministic one runs, so this run is "
                   "not bitwise repeatable (/summary deterministic = 0)\n",
                   shape.c_str(), why_not.c_str());
    }
    deterministic_ = false;
  }
  check_fe(status, backward ? "building the backward graph" : "building the forward graph", shape);
  return *plans.emplace(key, std::move(built)).first->second;
}

void CudnnAttention::forward(void* out, float* lse, const void* qkv, int B, int S, int C, int heads, int kv_heads) {
  Plan& p = plan(false, B, S, C, heads, kv_heads);
  auto* base = static_cast<uint16_t*>(const_cast<void*>(qkv));
  const std::size_t v_col = static_cast<std::size_t>(C) + static_cast<std::size_t>(C / heads) * kv_heads;
  std::unordered_map<TensorRef, void*> pack = {
      {p.q, base}, {p.k, base + C}, {p.v, base + v_col}, {p.o, out}, {p.stats, lse}};
  void* workspace = p.workspace_bytes > 0 ? workspace_(static_cast<std::size_t>(p.workspace_bytes)) : nullptr;
  check_fe(p.graph.execute(static_cast<cudnnHandle_t>(handle_), pack, workspace), "the forward",
           shape_text(B, S, C, heads, kv_heads));
}

void CudnnAttention::backward(void* dqkv, const void* dout, const void* out, const void* qkv, const float* lse, int B,
                              int S, int C, int heads, int kv_heads) {
  Plan& p = plan(true, B, S, C, heads, kv_heads);
  auto* base = static_cast<uint16_t*>(const_cast<void*>(qkv));
  auto* dbase = static_cast<uint16_t*>(dqkv);
  const std::size_t v_col = static_cast<std::size_t>(C) + static_cast<std::size_t>(C / heads) * kv_heads;
  std::unordered_map<TensorRef, void*> pack = {
      {p.q, base},          {p.k, base + C},       {p.v, base + v_col},
      {p.o, const_cast<void*>(out)}, {p.d_o, const_cast<void*>(dout)}, {p.stats, const_cast<float*>(lse)},
      {p.dq, dbase},        {p.dk, dbase + C},     {p.dv, dbase + v_col}};
  void* workspace = p.workspace_bytes > 0 ? workspace_(static_cast<std::size_t>(p.workspace_bytes)) : nullptr;
  check_fe(p.graph.execute(static_cast<cudnnHandle_t>(handle_), pack, workspace), "the backward",
           shape_text(B, S, C, heads, kv_heads));
}

}  // namespace pb
