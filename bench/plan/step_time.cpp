// One rank's training step as a list of kernel calls, read off common/model.cpp (GptModel::forward,
// backward, the dense MLP, the head and loss) and the optimizer pass, and their calibrated time.
//
// The work of each call is counted as parabench-micro counts it (bench/micro/kernels.cpp, "Cost per
// call"), so that a call at a benchmarked shape gets that benchmark's time exactly: attention in FLOPs
// (4·B·T²·C forward, 8·B·T²·C backward, the full T×T products), every other kernel in bytes read and
// written at each tensor's dtype (e bytes an activation, statistics 4).
#include "bench/plan/step_time.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "bench/micro/kernel_costs.h"
#include "common/errors.h"
#include "common/memory_model.h"

namespace pb::plan {
namespace {

// The kernels a calibration must have: their time is a large share of a step.
const std::set<std::string> kRequiredKernels = {"attention_forward", "attention_backward"};
// The bias gradient (column sums of dout inside matmul_backward) is no Backend method of its own; it is
// timed at the rate of sum_squares, the benchmarked kernel that likewise reads a buffer once and reduces it.
constexpr const char* kBiasGradientProxy = "sum_squares";

}  // namespace

std::vector<KernelCall> rank_step_kernels(const PlanConfig& c, const std::vector<int>& units, int64_t grad_elements,
                                          int64_t updated_elements) {
  if (c.is_moe() || c.is_cp()) {
    throw ConfigError("--calibration times the steps of --app dp, fsdp, tp and pp; --app " + c.app +
                      " is not modelled from a calibration yet (without --calibration its peak-based estimate stands)");
  }
  const MemoryPlan& m = c.memory;
  const ArchSpec& a = m.arch;
  const int t = m.tp;
  const double e = static_cast<double>(m.precision.act_bytes), ge = static_cast<double>(m.precision.grad_bytes);
  const int64_t b = m.micro_batch, S = a.seq, h = a.hidden, L = a.layers;
  const int64_t N = b * S;                               // tokens of a micro-batch
  const int64_t R = m.sequence_parallel ? N / t : N;     // rows of the residual stream on this rank
  const int64_t hl = h / t, qkv = a.qkv_width() / t, f_in = a.mlp_in_width() / t, fl = a.ffn / t,
                Vl = a.padded_vocab(t) / t;  // this rank's block of the padded vocabulary
  const double micro = static_cast<double>(c.grad_accum);  // micro-batches per step
  const bool full = m.recompute == "full";
  const bool selective_again = m.recompute == "selective" && m.attention_keeps_probabilities;
  int64_t blocks = 0;
  bool embedding = false, head = false;
  for (int u : units) {
    if (u == 0) embedding = true;
    else if (u == L + 1) head = true;
    else ++blocks;
  }

  std::vector<KernelCall> out;
  auto kernel = [&](const std::string& name, const std::string& what, double work, double calls, bool backward) {
    if (calls <= 0) return;
    KernelCall k;
    k.kernel = name;
    k.what = what;
    k.work = work;
    k.calls = calls;
    k.backward = backward;
    out.push_back(k);
  };
  auto matmul = [&](const std::string& what, int64_t rows, int64_t C, int64_t OC, double calls, bool backward) {
    if (calls <= 0) return;
    KernelCall k;
    k.kernel = "matmul";
    k.what = what;
    k.N = rows;
    k.C = C;
    k.OC = OC;
    k.work = 2.0 * rows * C * OC;
    k.calls = calls;
    k.backward = backward;
    out.push_back(k);
  };
  // A linear layer out (N, OC) = inp (N, C) · w (C, OC) + bias: its forward, and in backward
  // dinp (N, C) = dout (N, OC) · wᵀ, dweight (C, OC) += inpᵀ (C, N) · dout, dbias += column sums of dout.
  auto linear = [&](const std::string& what, int64_t C, int64_t OC, double forwards, double backwards, bool bias) {
    matmul(what + ", forward", N, C, OC, forwards, false);
    matmul(what + ", backward dinp", N, OC, C, backwards, true);
    matmul(what + ", backward dweight", C, N, OC, backwards, true);
    if (bias) kernel(kBiasGradientProxy, what + ", backward dbias (at sum_squares' rate)", N * OC * e, backwards, true);
  };

  // Per block: forwards run once per micro-batch, and again inside backward with full recomputation.
  const double block_forwards = blocks * micro, block_recomputes = full ? blocks * micro : 0.0;
  const double block_backwards = blocks * micro;
  const double ln_forward_bytes = kernel_cost::layernorm_forward_bytes(R, h, e);
  const double ln_backward_bytes = kernel_cost::layernorm_backward_bytes(R, h, e);
  // The MLP's activation: GELU's bytes (kernel_costs.h); SwiGLU (gated, not benchmarked) reads gate and
  // up and writes one output (3 tensors where GELU moves 2), and its backward moves 5 where GELU's 3.
  const double act_forward_bytes = kernel_cost::gelu_forward_bytes(N * fl, e) * (a.gated_mlp ? 1.5 : 1.0);
  const double act_backward_bytes = kernel_cost::gelu_backward_bytes(N * fl, e) * (a.gated_mlp ? 5.0 / 3.0 : 1.0);
  const double attention_flop = kernel_cost::attention_forward_flop(b, S, hl);
  for (const bool again : {false, true}) {  // the forward, then its recomputation inside backward
    const double n = again ? block_recomputes : block_forwards;
    const std::string when = again ? " (recomputed)" : "";
    kernel("layernorm_forward", "block LayerNorm 1, forward" + when, ln_forward_bytes, n, again);
    kernel("attention_forward", "block attention, forward" + when, attention_flop, n, again);
    kernel("residual_layernorm_forward", "block residual add and LayerNorm 2, forward" + when,
           kernel_cost::residual_layernorm_forward_bytes(R, h, e), n, again);
    kernel("add", "block residual add after the MLP" + when, kernel_cost::add_bytes(R * h, e), n, again);
    kernel("gelu_forward", std::string(a.gated_mlp ? "block SwiGLU" : "block GELU") + ", forward" + when,
           act_forward_bytes, n, again);
    if (again) {
      matmul("block qkv, forward (recomputed)", N, h, qkv, n, true);
      matmul("block attention output, forward (recomputed)", N, hl, h, n, true);
      matmul("block fc1, forward (recomputed)", N, h, f_in, n, true);
      matmul("block fc2, forward (recomputed)", N, fl, h, n, true);
    }
  }
  if (selective_again) kernel("attention_forward", "block attention, forward (selective recompute)", attention_flop,
                              block_backwards, true);
  linear("block qkv", h, qkv, block_forwards, block_backwards, a.biases);
  linear("block attention output", hl, h, block_forwards, block_backwards, a.biases);
  linear("block fc1", h, f_in, block_forwards, block_backwards, a.biases);
  linear("block fc2", fl, h, block_forwards, block_backwards, a.biases);
  kernel("attention_backward", "block attention, backward", kernel_cost::attention_backward_flop(b, S, hl),
         block_backwards, true);
  kernel("gelu_backward", std::string(a.gated_mlp ? "block SwiGLU" : "block GELU") + ", backward", act_backward_bytes,
         block_backwards, true);
  kernel("layernorm_backward", "block LayerNorms, backward", ln_backward_bytes, 2 * block_backwards, true);

  if (embedding) {
    const double positions = a.learned_positions ? static_cast<double>(S) : 0.0;
    kernel("embedding_forward", "embedding, forward", kernel_cost::embedding_forward_bytes(N, positions, h, e), micro,
           false);
    kernel("embedding_backward", "embedding, backward", kernel_cost::embedding_backward_bytes(N, positions, h, e),
           micro, true);
  }
  if (head) {
    kernel("layernorm_forward", "final LayerNorm, forward", ln_forward_bytes, micro, false);
    linear("head (logits)", h, Vl, micro, micro, false);
    // One fused pass (read the logits, overwrite them with dlogits) on one rank; with tp, the
    // vocabulary-parallel loss passes over its logits three times: two reads (row maxima, partial sums)
    // and the fused pass's read and write (finish), 2·N·V·e bytes more than the fused pass.
    const double extra_read_bytes = t > 1 ? 2.0 * N * Vl * e : 0.0;
    kernel("cross_entropy_forward_backward",
           t > 1 ? "vocabulary-parallel cross-entropy (three passes)" : "softmax cross-entropy, forward and backward",
           kernel_cost::cross_entropy_bytes(N, Vl, e) + extra_read_bytes, micro, true);
    kernel("layernorm_backward", "final LayerNorm, backward", ln_backward_bytes, micro, true);
  }
  // FSDP with sharded gradients (SHARD_GRAD_OP, FULL_SHARD, HYBRID_SHARD; bench/fsdp/fully_sharded.cpp):
  // per micro-batch and unit, the unit's whole gradient zeroed before its backward and, after the
  // reduce-scatter, the rank's block added into its shard.
  if (m.shard == ShardStrategy::shard_grad_op || m.shard == ShardStrategy::full_shard ||
      m.shard == ShardStrategy::hybrid_shard) {
    const std::vector<int64_t> unit_elements = unit_parameter_counts(m);
    double whole = 0, shard = 0;
    for (int u : units) {
      const int64_t piece = shard_elements(unit_elements[u], m.shard_ranks);
      whole += static_cast<double>(piece) * m.shard_ranks;
      shard += static_cast<double>(piece);
    }
    kernel("zero", "unit gradients zeroed before their backward (sharded gradients)", kernel_cost::zero_bytes(whole, ge),
           micro, true);
    kernel("accumulate", "reduce-scattered gradient blocks added into the shard", kernel_cost::accumulate_bytes(shard, ge),
           micro, true);
  }
  // Once per step: the gradients zeroed and their norm (every gradient the rank holds), AdamW over the
  // parameters it updates, and with bf16 parameters the master weights rounded into them.
  kernel("zero", "gradients zeroed", kernel_cost::zero_bytes(grad_elements, ge), 1, false);
  kernel("sum_squares", "gradient norm", kernel_cost::sum_squares_bytes(grad_elements, ge), 1, false);
  kernel("adamw", "AdamW", kernel_cost::adamw_bytes(updated_elements, ge), 1, false);
  if (m.precision.master_bytes > 0) {
    kernel("convert", "master weights into bf16 parameters", kernel_cost::convert_bytes(updated_elements, e), 1, false);
  }
  return out;
}

StepCompute calibrated_compute(const Calibration& cal, const PlanConfig& c, const std::vector<KernelCall>& calls) {
  StepCompute out;
  // The matrix products first: a calibration of another backend or dtype is refused with what it measured.
  std::vector<const KernelCall*> ordered;
  for (const KernelCall& call : calls) {
    if (call.kernel == "matmul") ordered.push_back(&call);
  }
  for (const KernelCall& call : calls) {
    if (call.kernel != "matmul") ordered.push_back(&call);
  }
  const bool any_kernel = std::any_of(cal.kernels.begin(), cal.kernels.end(), [&](const MeasuredKernel& k) {
    return k.backend == c.backend && k.dtype == c.dtype;
  });
  const double default_bandwidth = median_kernel_bandwidth(cal, c.backend, c.dtype);
  std::set<std::string> defaulted;
  for (const KernelCall* next : ordered) {
    const KernelCall& call = *next;
    KernelTime kt;
    kt.call = call;
    double per_call;
    if (call.kernel == "matmul") {
      per_call = gemm_seconds(cal, c.backend, c.dtype, call.N, call.C, call.OC, &kt.source);
    } else {
      if (!any_kernel) {
        throw ConfigError("--calibration " + cal.path + " has no kernel (/micro/kernels) measured on " + c.backend +
                          "/" + c.dtype + ": run parabench-micro with the kernel benchmarks (kernel/" + c.backend + "/" +
                          c.dtype + "/...)");
      }
      per_call = kernel_seconds(cal, c.backend, c.dtype, call.kernel, call.work, &kt.source);
      if (per_call < 0) {
        if (kRequiredKernels.count(call.kernel)) {
          throw ConfigError("--calibration " + cal.path + " has no " + call.kernel + " measured on " + c.backend + "/" +
                            c.dtype + " (/micro/kernels): the attention is too large a share of a step to assume");
        }
        if (!std::isfinite(default_bandwidth)) {
          throw ConfigError("--calibration " + cal.path + " has no memory-bound kernel measured on " + c.backend + "/" +
                            c.dtype + " (/micro/kernels), not even a default rate for " + call.kernel);
        }
        per_call = call.work / default_bandwidth;
        kt.source.row = "default: the median bytes/s of the calibration's memory-bound kernels";
        kt.source.fallback = true;
        defaulted.insert(call.kernel);
      }
    }
    kt.seconds = per_call * call.calls;
    out.seconds += kt.seconds;
    if (call.backward) out.backward_s += kt.seconds;
    out.kernels.push_back(kt);
  }
  for (const std::string& k : defaulted) {
    out.warnings.push_back("--calibration " + cal.path + " has no " + k + " on " + c.backend + "/" + c.dtype +
                           ": timed at the median bytes/s of its memory-bound kernels");
  }
  return out;
}

}  // namespace pb::plan
