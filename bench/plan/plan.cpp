// The planner's model: presets, the GPU table, and one plan's memory (common/memory_model.h),
// fit verdict and step-time estimate. Every formula is closed-form, so a plan for 16384 ranks costs
// what a plan for one does. docs/memory-model.md and README.md give the sources.
#include "bench/plan/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace pb::plan {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Planner-only presets (SPEC section 8), from the published configurations:
// GPT-3 175B: Brown et al. 2020, table 2.1 (n_layers 96, d_model 12288, n_heads 96, n_ctx 2048),
//   GPT-2's 50257-token vocabulary, learned positions, biases, the input embedding tied to the head.
// Llama 3: Meta's config.json of Meta-Llama-3-8B / -70B and Llama-3.1-405B (num_hidden_layers,
//   hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size 128256),
//   SwiGLU MLP, RMSNorm (a weight, no bias), rotary positions, no biases, untied head, 8192-token
//   pre-training sequences (The Llama 3 Herd of Models, Dubey et al. 2024, section 3.4).
struct PlannerPreset {
  const char* name;
  int64_t layers, hidden, heads, kv_heads, ffn, vocab, seq;
  bool gated_mlp, tied_embeddings, learned_positions, biases;
};
constexpr PlannerPreset kPlannerPresets[] = {
    {"gpt3-175b", 96, 12288, 96, 96, 4 * 12288, 50257, 2048, false, true, true, true},
    {"llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, true, false, false, false},
    {"llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, true, false, false, false},
    {"llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192, true, false, false, false},
};

// SPEC section 6 peaks; links: NVLink 4 (H100, H200: 450 GB/s per direction) and NVLink 3 (A100:
// 300 GB/s), one 400 Gb/s NDR (H100, H200) or 200 Gb/s HDR (A100) InfiniBand NIC per GPU, as in DGX
// systems. Nominal rates: measured bus bandwidth (nccl-tests) is lower; pass it with --link-gbps.
const GpuSpec kGpus[] = {
    {"h100", 989.0, 67.0, 3600.0, 400.0},
    {"h200", 989.0, 67.0, 3600.0, 400.0},
    {"a100", 312.0, 19.5, 2400.0, 200.0},
};

// A ring collective over `group_ranks` ranks `stride` apart stays inside a node when the ranks it
// spans fit in one (groups are aligned, as SPEC 3 numbers ranks).
double link_for(const PlanConfig& c, int group_ranks, int stride) {
  if (c.link_gbps > 0) return c.link_gbps;
  const bool inside_node = static_cast<int64_t>(group_ranks) * stride <= c.gpus_per_node;
  return inside_node ? c.gpu.intra_node_gbps : c.gpu.inter_node_gbps;
}

// Ring algorithms: each rank moves 2(n-1)/n (all-reduce) or (n-1)/n (all-gather, reduce-scatter,
// all-to-all) of the buffer over its link (the bus-bandwidth convention of nccl-tests); a send_recv
// moves its message once each way, the send and the receive in the link's two directions at once.
CommEstimate collective(const PlanConfig& c, const std::string& op, const std::string& what, int64_t bytes,
                        int group_ranks, int stride, int64_t passes) {
  CommEstimate e;
  e.op = op;
  e.what = what;
  e.bytes = bytes;
  e.ranks = group_ranks;
  e.calls = passes;
  e.link_gbps = link_for(c, group_ranks, stride);
  const double n = group_ranks;
  const double factor = op == "all_reduce" ? 2.0 * (n - 1) / n : op == "send_recv" ? 1.0 : (n - 1) / n;
  const double bytes_per_s = e.link_gbps * 1e9 / 8.0;
  e.seconds = group_ranks > 1 ? passes * factor * static_cast<double>(bytes) / bytes_per_s : 0.0;
  return e;
}

// Tensor parallelism's collectives of one step, over the tp group (consecutive ranks, stride 1), as
// parabench-tp issues them (bench/tp/README.md, "Communication per step per rank"; tested against
// the app's /comm). N tokens per micro-batch, m micro-batches per step; activations are e bytes.
// Without sequence parallelism: per micro-batch 4L + 2 all-reduces of N·h (the embedding's g, two f
// and two g per block, the head's f). With it: 6L + 3 all-gathers and 4L + 2 reduce-scatters of the
// whole N·h buffer, and once per step one all-reduce per LayerNorm parameter tensor (h elements,
// gradient bytes). Both: the vocabulary-parallel cross-entropy's maxima and sums, 3N fp32 values in
// two all-reduces. Full recomputation runs each block's forward again: 2L more g's (all-reduces), or
// 2L more all-gathers and reduce-scatters. All are blocking: every one sits on the critical path.
std::vector<CommEstimate> tp_collectives(const PlanConfig& c) {
  const MemoryPlan& m = c.memory;
  const ArchSpec& a = m.arch;
  const int t = m.tp;
  std::vector<CommEstimate> out;
  if (t <= 1) return out;
  const int64_t N = static_cast<int64_t>(m.micro_batch) * a.seq, L = a.layers, micro_steps = c.grad_accum;
  const int64_t activation = N * a.hidden * m.precision.act_bytes;  // one (B·S, h) tensor
  const int64_t recomputed = m.recompute == "full" ? 2 * L : 0;     // forward collectives run again
  constexpr int64_t kStatBytes = 4;                                  // the softmax statistics are fp32
  auto blocking = [](CommEstimate e) {
    e.blocking = true;
    return e;
  };
  if (!m.sequence_parallel) {
    out.push_back(blocking(collective(c, "all_reduce", "activations (tp f, g)", activation, t, 1,
                                      (4 * L + 2 + recomputed) * micro_steps)));
  } else {
    out.push_back(blocking(collective(c, "all_gather", "activations (sequence-parallel f, g)", activation, t, 1,
                                      (6 * L + 3 + recomputed) * micro_steps)));
    out.push_back(blocking(collective(c, "reduce_scatter", "activations (sequence-parallel f, g)", activation, t, 1,
                                      (4 * L + 2 + recomputed) * micro_steps)));
  }
  out.push_back(blocking(collective(c, "all_reduce", "cross-entropy statistics (tp)", 3 * N * kStatBytes, t, 1,
                                    micro_steps)));
  if (m.sequence_parallel) {
    const int64_t norm_tensors = (2 * L + 1) * (a.biases ? 2 : 1);  // ln1, ln2 per block, final: .g (and .b)
    out.push_back(blocking(collective(c, "all_reduce", "LayerNorm gradients (sequence parallel)",
                                      a.hidden * m.precision.grad_bytes, t, 1, norm_tensors)));
  }
  return out;
}

// Expert parallelism's collectives of one step, as parabench-ep issues them (bench/ep/README.md,
// "Communication per step per rank"). ep > 1: per micro-batch and block, two all-to-alls in forward
// (dispatch, combine) and two in backward, two more per block with full recomputation, each of the
// (E, C, h) slot buffer, over the ep group (consecutive ranks): blocking, the experts wait for their
// tokens. Once per step: the replicated parameters' gradients all-reduced over dp (the app's L + 1
// runs of its flat buffer, one pass here), and the experts' over the dp/ep ranks holding the same
// experts (ep apart; L runs), overlapped with backward unless --no-overlap.
std::vector<CommEstimate> ep_collectives(const PlanConfig& c, int64_t rank_parameters) {
  const MemoryPlan& m = c.memory;
  const ArchSpec& a = m.arch;
  const int64_t N = static_cast<int64_t>(m.micro_batch) * a.seq, L = a.layers, E = c.moe.experts;
  // This rank's expert parameters: its MLP part per block (plan_moe_memory) less the router's h·E.
  const int64_t experts = L * (m.mlp_parameters - a.hidden * E), replicated = rank_parameters - experts;
  std::vector<CommEstimate> out;
  if (c.ep > 1) {
    const int64_t calls = (4 * L + (m.recompute == "full" ? 2 * L : 0)) * c.grad_accum;
    CommEstimate e = collective(c, "all_to_all", "expert slots (ep dispatch, combine)",
                                E * moe_capacity(c.moe, N) * a.hidden * m.precision.act_bytes, c.ep, 1, calls);
    e.blocking = true;
    out.push_back(e);
  }
  if (c.dp > 1) {
    out.push_back(collective(c, "all_reduce", "replicated gradients (dp)", replicated * m.precision.grad_bytes, c.dp, 1, 1));
  }
  if (c.dp / c.ep > 1) {
    out.push_back(collective(c, "all_reduce", "expert gradients (dp/ep)", experts * m.precision.grad_bytes,
                             c.dp / c.ep, c.ep, 1));
  }
  return out;
}

// Context parallelism's exchanges of one step, as parabench-cp issues them (bench/cp/context_attention.cpp;
// README.md, "Step-time estimate"), over the cp group (cp consecutive ranks, stride 1), when cp > 1.
// Per micro-batch and block, with rows = b·S/cp of this rank's tokens and kv = qkv_width − h the
// width of a row's K|V (2h for the GPT; GQA's narrower K|V moves fewer bytes):
//   ring       (cp − 1) K|V hops in forward (again in backward with --recompute full), (cp − 1) K|V hops
//              and cp dK|dV hops in backward, each a send_recv of rows·kv elements. A K|V hop runs
//              beside the attention of the block in hand (forward: 4·rows·(S/cp)·h FLOPs; backward
//              twice that) and only what exceeds it is on the critical path; the dK|dV hop follows its
//              block's backward and blocks.
//   allgather  one all-gather of every rank's K|V (b·S·kv elements) in forward, again in backward (and
//              in the recomputed forward), and one reduce-scatter of their gradients; blocking.
//   alltoall   (Ulysses) forward: Q|K|V to heads (rows·qkv_width elements sent) and the output back
//              (rows·h); backward the same two; the forward's two again with --recompute full, and with
//              selective where the core keeps the probabilities (the cpu backend); blocking.
// Once per step: every gradient all-reduced over the dp × cp ranks (all of them), overlapped with
// backward unless --no-overlap (the app all-reduces after backward: --no-overlap models it).
std::vector<CommEstimate> cp_collectives(const PlanConfig& c, int64_t parameters) {
  const MemoryPlan& m = c.memory;
  const ArchSpec& a = m.arch;
  const int n = c.cp;
  const int64_t L = a.layers, micro_steps = c.grad_accum, e = m.precision.act_bytes, h = a.hidden;
  const int64_t S = a.seq / n, rows = static_cast<int64_t>(m.micro_batch) * S, kv = a.qkv_width() - h;
  const bool full = m.recompute == "full";
  std::vector<CommEstimate> out;
  auto blocking = [&](const std::string& op, const std::string& what, int64_t bytes, int64_t calls_per_layer) {
    CommEstimate est = collective(c, op, what, bytes, n, 1, calls_per_layer * L * micro_steps);
    est.blocking = true;
    return est;
  };
  if (n > 1) {
    switch (c.cp_algo) {
      case CpAlgo::ring: {
        const double flops_per_s = c.peak_tflops * 1e12 * c.mfu;
        const double block_forward_s = 4.0 * static_cast<double>(rows) * S * h / flops_per_s;
        auto hop = [&](const std::string& what, int64_t calls_per_layer, double beside_s) {
          CommEstimate est = blocking("send_recv", what, rows * kv * e, calls_per_layer);
          if (est.calls > 0) est.hidden_s = est.calls * std::min(est.seconds / est.calls, beside_s);
          return est;
        };
        out.push_back(hop(full ? "K|V blocks, forward and recomputed forward (ring)" : "K|V blocks, forward (ring)",
                          (n - 1) * (full ? 2 : 1), block_forward_s));
        out.push_back(hop("K|V blocks, backward (ring)", n - 1, 2 * block_forward_s));
        out.push_back(hop("dK|dV blocks (ring, after each block's backward)", n, 0.0));
        break;
      }
      case CpAlgo::allgather: {
        const int64_t gathered = static_cast<int64_t>(m.micro_batch) * a.seq * kv * e;
        out.push_back(blocking("all_gather", "K|V of every cp rank (allgather)", gathered, full ? 3 : 2));
        out.push_back(blocking("reduce_scatter", "dK|dV of every cp rank (allgather)", gathered, 1));
        break;
      }
      case CpAlgo::alltoall: {
        const bool again = full || (m.recompute == "selective" && c.backend == "cpu");
        const int64_t calls = again ? 3 : 2;
        out.push_back(blocking("all_to_all", "Q|K|V and dQ|dK|dV, sequence <-> heads (Ulysses)",
                               rows * a.qkv_width() * e, calls));
        out.push_back(blocking("all_to_all", "attention output and its gradient (Ulysses)", rows * h * e, calls));
        break;
      }
    }
  }
  if (c.ranks > 1) {
    out.push_back(collective(c, "all_reduce", "gradients (dp × cp)", parameters * m.precision.grad_bytes, c.ranks, 1, 1));
  }
  return out;
}

// The collectives of one step (README.md, "Step-time estimate"). `parameters`: one rank's (P_local).
std::vector<CommEstimate> step_collectives(const PlanConfig& c, int64_t parameters) {
  const PrecisionSpec& p = c.memory.precision;
  const int64_t grad_bytes = parameters * p.grad_bytes;
  const int64_t micro_steps = c.grad_accum;
  std::vector<CommEstimate> out;
  if (c.is_moe()) return ep_collectives(c, parameters);
  if (c.is_cp()) return cp_collectives(c, parameters);
  if (c.app == "tp") {
    out = tp_collectives(c);
    // The dp group: ranks tp apart, holding the same slices; one all-reduce of a rank's gradients.
    out.push_back(collective(c, "all_reduce", "gradients (dp)", grad_bytes, c.dp, c.tp(), 1));
    return out;
  }
  // FSDP moves whole units padded to the shard layout (bench/fsdp): per unit, ceil(numel / n) · n elements.
  const int n = c.memory.shard == ShardStrategy::no_shard ? 1 : c.memory.shard_ranks;
  const std::vector<int64_t> units = unit_parameter_counts(c.memory);
  int64_t padded = 0;
  for (int64_t u : units) padded += shard_elements(u, n) * n;
  const int64_t last = shard_elements(units.back(), n) * n;  // the last unit stays gathered for its backward
  switch (c.memory.shard) {
    case ShardStrategy::no_shard:  // DDP: one all-reduce of the gradients, on the last micro-batch
      out.push_back(collective(c, "all_reduce", "gradients", grad_bytes, c.dp, 1, 1));
      break;
    case ShardStrategy::zero1:  // gradients reduced to their owner, updated weights gathered back
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, c.dp, 1, 1));
      out.push_back(collective(c, "all_gather", "parameters", padded * p.param_bytes, c.dp, 1, 1));
      break;
    case ShardStrategy::shard_grad_op:  // whole weights, gathered back after the update; gradients per micro-batch
      out.push_back(collective(c, "all_gather", "parameters", padded * p.param_bytes, c.dp, 1, 1));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, c.dp, 1, micro_steps));
      break;
    case ShardStrategy::full_shard:  // gathered for forward, and again for backward but the last unit
      out.push_back(collective(c, "all_gather", "parameters (forward)", padded * p.param_bytes, c.dp, 1, micro_steps));
      out.push_back(collective(c, "all_gather", "parameters (backward)", (padded - last) * p.param_bytes, c.dp, 1,
                               micro_steps));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, c.dp, 1, micro_steps));
      break;
    case ShardStrategy::hybrid_shard: {  // FULL_SHARD inside a group, the shards all-reduced across groups
      const int group = c.memory.shard_ranks, replicas = c.dp / group;
      out.push_back(collective(c, "all_gather", "parameters (forward)", padded * p.param_bytes, group, 1, micro_steps));
      out.push_back(collective(c, "all_gather", "parameters (backward)", (padded - last) * p.param_bytes, group, 1,
                               micro_steps));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, group, 1, micro_steps));
      out.push_back(collective(c, "all_reduce", "gradient shards", padded / group * p.grad_bytes, replicas, group, 1));
      break;
    }
  }
  return out;
}

std::string format_gib(double bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.2f GiB", bytes / kGiB);
  return text;
}

}  // namespace

bool arch_preset(const std::string& name, ArchSpec* out) {
  ModelConfig model;
  if (model_preset(name, &model)) {
    *out = arch_from_model(model);
    return true;
  }
  for (const PlannerPreset& p : kPlannerPresets) {
    if (name != p.name) continue;
    ArchSpec a;
    a.name = p.name;
    a.layers = p.layers;
    a.hidden = p.hidden;
    a.heads = p.heads;
    a.kv_heads = p.kv_heads;
    a.ffn = p.ffn;
    a.vocab = p.vocab;
    a.seq = p.seq;
    a.gated_mlp = p.gated_mlp;
    a.tied_embeddings = p.tied_embeddings;
    a.learned_positions = p.learned_positions;
    a.biases = p.biases;
    *out = a;
    return true;
  }
  return false;
}

std::vector<std::string> arch_preset_names() {
  std::vector<std::string> names = model_preset_names();
  for (const PlannerPreset& p : kPlannerPresets) names.emplace_back(p.name);
  return names;
}

bool gpu_spec(const std::string& name, GpuSpec* out) {
  for (const GpuSpec& g : kGpus) {
    if (name == g.name) {
      *out = g;
      return true;
    }
  }
  return false;
}

std::vector<std::string> gpu_names() {
  std::vector<std::string> names;
  for (const GpuSpec& g : kGpus) names.push_back(g.name);
  return names;
}

int64_t PlanConfig::capacity() const {
  return is_moe() ? moe_capacity(moe, static_cast<int64_t>(memory.micro_batch) * memory.arch.seq) : 0;
}

namespace {
// Forward FLOPs of one block per token: 2 per multiply-add of each weight matrix, and the two S×S
// attention products (Q·Kᵀ and P·V, 2·S·h each, counted in full as SPEC 6 and Megatron do).
double attention_core_flops_per_token(const ArchSpec& a) { return 4.0 * a.seq * a.hidden; }
double attention_part_flops_per_token(const ArchSpec& a) {
  const double h = a.hidden;
  return 2.0 * h * a.qkv_width()                  // Q, K, V projections
         + 2.0 * h * h                            // output projection
         + attention_core_flops_per_token(a);     // attention scores and values
}
// One MLP (the dense one, or one expert) over one token: fc1 (gate and up) and fc2.
double mlp_flops_per_token(const ArchSpec& a) { return 2.0 * a.hidden * (a.mlp_in_width() + a.ffn); }
double block_forward_flops_per_token(const ArchSpec& a) {
  return attention_part_flops_per_token(a) + mlp_flops_per_token(a);
}
double head_flops_per_token(const ArchSpec& a) { return 2.0 * a.hidden * a.vocab; }
// MoE: the router's logits, x·router.w (h × E).
double router_flops_per_token(const ArchSpec& a, const MoeOptions& moe) { return 2.0 * a.hidden * moe.experts; }
// What one MoE block executes forward for one micro-batch of N tokens: attention and the router per
// token, the experts over the E·C slots (every slot computed, empty or not: the padded exchange).
double moe_block_forward_flops_per_micro_batch(const ArchSpec& a, const MoeOptions& moe, int micro_batch) {
  const int64_t N = static_cast<int64_t>(micro_batch) * a.seq;
  const double slots = static_cast<double>(moe.experts) * moe_capacity(moe, N);
  return static_cast<double>(N) * (attention_part_flops_per_token(a) + router_flops_per_token(a, moe)) +
         slots * mlp_flops_per_token(a);
}
}  // namespace

double moe_model_flops_per_step(const ArchSpec& a, const MoeOptions& moe, int64_t global_batch) {
  const double block = attention_part_flops_per_token(a) + router_flops_per_token(a, moe) +
                       moe.top_k * mlp_flops_per_token(a);  // k experts per token in place of the dense MLP
  return 3.0 * static_cast<double>(global_batch) * a.seq * (a.layers * block + head_flops_per_token(a));
}

double moe_hardware_flops_per_step(const ArchSpec& a, const MoeOptions& moe, int64_t global_batch, int micro_batch,
                                   const std::string& recompute) {
  const double micro_batches = static_cast<double>(global_batch) / micro_batch;  // over all ranks
  const double tokens = static_cast<double>(global_batch) * a.seq;
  const double blocks = micro_batches * a.layers * moe_block_forward_flops_per_micro_batch(a, moe, micro_batch);
  double flops = 3.0 * (blocks + tokens * head_flops_per_token(a));
  if (recompute == "full") flops += blocks;
  if (recompute == "selective") flops += tokens * a.layers * attention_core_flops_per_token(a);
  return flops;
}

double model_flops_per_step(const ArchSpec& a, int64_t global_batch) {
  const double per_token = a.layers * block_forward_flops_per_token(a) + head_flops_per_token(a);
  return 3.0 * static_cast<double>(global_batch) * a.seq * per_token;  // forward + backward (2× forward)
}

double recompute_flops_per_step(const ArchSpec& a, int64_t global_batch, const std::string& recompute) {
  const double tokens = static_cast<double>(global_batch) * a.seq;
  if (recompute == "full") return tokens * a.layers * block_forward_flops_per_token(a);
  if (recompute == "selective") return tokens * a.layers * attention_core_flops_per_token(a);
  return 0.0;
}

double cp_hardware_flops_per_step(const PlanConfig& c) {
  const ArchSpec& a = c.memory.arch;
  const std::string& recompute = c.memory.recompute;
  double flops = model_flops_per_step(a, c.global_batch);
  const bool keeps_probabilities = c.backend == "cpu" && (c.cp == 1 || c.cp_algo == CpAlgo::alltoall);
  if (recompute == "full" || (recompute == "selective" && keeps_probabilities)) {
    flops += recompute_flops_per_step(a, c.global_batch, recompute);
  }
  return flops;
}

PlanResult evaluate(const PlanConfig& c) {
  PlanResult r;
  r.config = c;
  const MemoryPlan& m = c.memory;
  if (c.model_states_only()) {
    // One unit of N parameters: ZeRO's accounting, without activations or buffers.
    r.parameters = c.params_override;
    r.per_rank = predict_model_states({c.params_override}, m.precision, m.shard, m.shard_ranks);
    for (int64_t bytes : r.per_rank.bytes) r.per_rank.peak_total += bytes;
  } else {
    r.parameters = total_parameters(m.arch);
    if (c.is_moe()) {  // the router and all E experts in every block: the plan of one ep rank holding them all
      MemoryPlan whole = m;
      plan_moe_memory(whole, c.moe, 1, c.grad_accum);
      r.parameters = 0;
      for (int64_t u : unit_parameter_counts(whole)) r.parameters += u;
    }
    r.per_rank = predict_memory(m);  // with m.tp and m.sequence_parallel: one tp rank's slices
  }
  r.rank_parameters = r.parameters;
  if (!c.model_states_only() && (m.tp > 1 || c.is_moe())) {
    r.rank_parameters = 0;  // tp: a rank's slices; ep: the replicated parameters and its E/ep experts
    for (int64_t u : unit_parameter_counts(m)) r.rank_parameters += u;
  }
  r.model_state_bytes = r.per_rank[MemCategory::parameters] + r.per_rank[MemCategory::master_parameters] +
                        r.per_rank[MemCategory::gradients] + r.per_rank[MemCategory::optimizer_states];
  r.model_state_bytes_per_param = static_cast<double>(r.model_state_bytes) / static_cast<double>(r.parameters);
  r.cluster_peak_total = r.per_rank.peak_total * c.ranks;

  if (c.gpu_memory_gib > 0) {
    r.fit_checked = true;
    r.capacity_bytes = static_cast<int64_t>(std::llround(c.gpu_memory_gib * kGiB));
    r.excess_bytes = r.per_rank.peak_total - r.capacity_bytes;
    r.fits = r.excess_bytes <= 0;
  }

  if (!c.model_states_only()) {
    r.has_time = true;
    if (c.is_moe()) {
      r.model_flops_per_step = moe_model_flops_per_step(m.arch, c.moe, c.global_batch);
      r.hardware_flops_per_step =
          moe_hardware_flops_per_step(m.arch, c.moe, c.global_batch, m.micro_batch, m.recompute);
    } else if (c.is_cp()) {
      r.model_flops_per_step = model_flops_per_step(m.arch, c.global_batch);
      r.hardware_flops_per_step = cp_hardware_flops_per_step(c);
    } else {
      r.model_flops_per_step = model_flops_per_step(m.arch, c.global_batch);
      r.hardware_flops_per_step =
          r.model_flops_per_step + recompute_flops_per_step(m.arch, c.global_batch, m.recompute);
    }
    // --mfu is the share of peak the GPUs sustain on what they execute, recomputation included.
    r.compute_s = r.hardware_flops_per_step / (static_cast<double>(c.ranks) * c.peak_tflops * 1e12 * c.mfu);
    r.comm = step_collectives(c, r.rank_parameters);
    double overlappable = 0;  // what may hide behind the whole step's compute (the gradient collectives)
    for (const CommEstimate& e : r.comm) {
      r.comm_s += e.seconds;
      if (e.blocking) r.blocking_comm_s += e.seconds - e.hidden_s;  // cp's ring: less what hides beside its block
      else overlappable += e.seconds;
    }
    // Overlapped communication hides behind compute; blocking collectives (tp's, ep's, cp's) add to it.
    r.step_s = c.overlap ? std::max(r.compute_s, overlappable) + r.blocking_comm_s
                         : r.compute_s + overlappable + r.blocking_comm_s;
    r.tokens_per_s = static_cast<double>(c.global_batch) * m.arch.seq / r.step_s;
  }
  return r;
}

std::string fit_message(const PlanResult& r) {
  if (!r.fit_checked || r.fits) return "";
  char gpu[32];
  std::snprintf(gpu, sizeof(gpu), "%g", r.config.gpu_memory_gib);
  const double percent = 100.0 * static_cast<double>(r.excess_bytes) / static_cast<double>(r.capacity_bytes);
  char pct[32];
  std::snprintf(pct, sizeof(pct), "%.1f%%", percent);
  return "does not fit: needs " + format_gib(static_cast<double>(r.per_rank.peak_total)) + " per rank, " +
         format_gib(static_cast<double>(r.excess_bytes)) + " (" + pct + ") more than --gpu-memory " + gpu;
}

}  // namespace pb::plan
