// The planner's model: presets, the GPU table, and one plan's memory (common/memory_model.h),
// fit verdict and step-time estimate. Every formula is closed-form, so a plan for 16384 ranks costs
// what a plan for one does. docs/memory-model.md and README.md give the sources.
#include "bench/plan/plan.h"

#include "bench/dp/data_parallel.h"
#include "bench/micro/busbw.h"
#include "bench/plan/app_registry.h"
#include "bench/plan/step_time.h"
#include "bench/pp/schedule.h"
#include "common/errors.h"

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
  bool gated_mlp, tied_embeddings, learned_positions, biases, rms_norm;
};
constexpr PlannerPreset kPlannerPresets[] = {
    {"gpt3-175b", 96, 12288, 96, 96, 4 * 12288, 50257, 2048, false, true, true, true, false},
    {"llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, true, false, false, false, true},
    {"llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, true, false, false, false, true},
    {"llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192, true, false, false, false, true},
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
bool group_inside_node(const PlanConfig& c, int group_ranks, int stride) {
  return static_cast<int64_t>(group_ranks) * stride <= c.gpus_per_node;
}

// The calibration's table for `op` over a group inside a node or across nodes, of the in-place or
// out-of-place variant where the calibration measured it; throws ConfigError when it did not measure the op.
const MeasuredCollective& calibrated_table(const PlanConfig& c, const std::string& op, bool inside_node,
                                           bool in_place) {
  const std::string table = op == "send_recv" ? (inside_node ? "send_recv_intra" : "send_recv_inter") : op;
  if (!in_place) {
    const auto separate = c.calibration->out_of_place.find(table);
    if (separate != c.calibration->out_of_place.end()) return separate->second;
  }
  const auto found = c.calibration->collectives.find(table);
  if (found == c.calibration->collectives.end()) {
    throw ConfigError("--calibration " + c.calibration->path + " has no /micro/collectives/" + table +
                      " (the plan's " + op + (op == "send_recv" ? (inside_node ? " inside a node" : " across nodes") : "") +
                      "): run parabench-micro with --ops including it" +
                      (table == "send_recv_inter" ? ", on two nodes or more" : ""));
  }
  return found->second;
}

// Times a collective whose op, bytes, ranks, calls and placement are set: at the nominal (or --link-gbps)
// link rate, or at the calibration's bus bandwidth measured at the size of each call the app issues
// (message_bytes; the bus bandwidth is taken as independent of the group's size, as nccl-tests' busbw
// is meant to be).
void time_collective(const PlanConfig& c, CommEstimate* e, int64_t message_bytes) {
  if (e->ranks <= 1 || e->calls <= 0 || e->bytes <= 0) {
    e->link_gbps = c.link_gbps > 0 ? c.link_gbps : e->inside_node ? c.gpu.intra_node_gbps : c.gpu.inter_node_gbps;
    e->seconds = 0.0;
    return;
  }
  const double factor = busbw_factor(e->op, e->ranks);
  if (c.calibration) {
    const MeasuredCollective& table = calibrated_table(c, e->op, e->inside_node, e->in_place);
    const double message = static_cast<double>(message_bytes > 0 ? std::min(message_bytes, e->bytes) : e->bytes);
    const double busbw = interpolate_busbw(table, message);
    const double messages = static_cast<double>(e->calls) * static_cast<double>(e->bytes) / message;
    e->measured = true;
    // The table's word holds where it measured: say where this collective is outside that.
    const std::string where = e->op + " of " + e->what + ": ";
    if (message > static_cast<double>(table.bytes.back())) {
      e->caveat = where + std::to_string(static_cast<int64_t>(message)) + "-byte messages timed at the bus bandwidth of " +
                  "the calibration's largest size, " + std::to_string(table.bytes.back()) + " bytes (parabench-micro --max-bytes)";
    } else if (message < static_cast<double>(table.bytes.front())) {
      e->caveat = where + std::to_string(static_cast<int64_t>(message)) + "-byte messages timed at the time of the " +
                  "calibration's smallest size, " + std::to_string(table.bytes.front()) + " bytes (parabench-micro --min-bytes)";
    }
    if (!e->inside_node && e->op != "send_recv" && table.nodes <= 1) {
      e->caveat += (e->caveat.empty() ? where : "; ") + std::string("the group spans nodes, but the calibration measured ") +
                   e->op + " on one node: inter-node links are likely slower (run parabench-micro on 2 nodes or more)";
    }
    e->link_gbps = busbw * 8.0 / 1e9;
    e->seconds = messages * factor * message / busbw;
    return;
  }
  e->link_gbps = c.link_gbps > 0 ? c.link_gbps : e->inside_node ? c.gpu.intra_node_gbps : c.gpu.inter_node_gbps;
  const double bytes_per_s = e->link_gbps * 1e9 / 8.0;
  e->seconds = static_cast<double>(e->calls) * factor * static_cast<double>(e->bytes) / bytes_per_s;
}

// Whether a calibrated plan's non-blocking collectives advance while the rank computes: NCCL's run on
// the GPU's own streams; MPI's advance only inside MPI calls (no progress thread), and a rank computing
// a unit between launching the next unit's gather and waiting on it makes none, so the gather's whole
// time is spent in the wait (measured: parabench-fsdp FULL_SHARD on 2 CPU ranks waits its gathers' full
// time, bench/plan/README.md).
bool progresses_while_computing(const PlanConfig& c) { return !(c.calibration && c.calibration->comm == "mpi"); }

// Whether FSDP's parameter gathers hide behind compute: FULL_SHARD's and HYBRID_SHARD's are prefetched
// (bench/fsdp/fully_sharded.cpp), where the collectives progress while the rank computes.
bool gathers_prefetched(const PlanConfig& c) {
  const ShardStrategy s = c.memory.shard;
  return (s == ShardStrategy::full_shard || s == ShardStrategy::hybrid_shard) && progresses_while_computing(c);
}

// One collective of `passes` calls (or whole-model passes) of `bytes` over `group_ranks` ranks
// `stride` apart. message_bytes: the size of each call the app issues when a pass is several calls
// (dp's buckets, fsdp's units); what a calibration's bandwidth is read at. in_place: whether the app's
// call sends from inside its receive buffer (CommEstimate::in_place).
CommEstimate collective(const PlanConfig& c, const std::string& op, const std::string& what, int64_t bytes,
                        int group_ranks, int stride, int64_t passes, int64_t message_bytes = 0,
                        bool in_place = true) {
  CommEstimate e;
  e.op = op;
  e.what = what;
  e.bytes = bytes;
  e.ranks = group_ranks;
  e.calls = passes;
  e.in_place = in_place;
  e.inside_node = group_inside_node(c, group_ranks, stride);
  time_collective(c, &e, message_bytes);
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

// Pipeline parallelism's messages and gradient all-reduce of one step, as parabench-pp sends them
// (bench/pp/README.md, "What each rank sends per step"): per micro-batch and boundary between virtual
// stages, the activations (b·S·h) forward and their gradient back, each one message: v·m activations
// per step from every stage but the last (its v − 1 first chunks' only), v·m gradients from every stage
// but the first (likewise); a stage between two others sends both. With dp > 1, one all-reduce of the stage's gradients (the largest
// stage's, `stage_parameters`) over its dp ranks (consecutive: stride 1), after the schedule.
// A message sits on the critical path only in the pipeline's fill (the first micro-batch's forward
// reaching the last virtual stage) and drain (the last backward coming back): V − 1 of each direction,
// V = p·v (naive, one micro-batch at a time: every message). The rest travel while other micro-batches
// compute (hidden_s).
std::vector<CommEstimate> pp_collectives(const PlanConfig& c, int64_t stage_parameters) {
  const MemoryPlan& m = c.memory;
  const int p = c.pp.stages, v = c.pp.chunks, dp = c.dp;
  std::vector<CommEstimate> out;
  if (p > 1) {
    // Stage s's ranks are s·dp ... s·dp + dp − 1 (SPEC 3: pipeline stages farthest apart); each sends to
    // the rank dp further. A boundary that any pair crosses between nodes sets the pace.
    bool inside_node = true;
    for (int s = 0; s + 1 < p && inside_node; ++s) {
      for (int i = 0; i < dp && inside_node; ++i) {
        const int64_t r = static_cast<int64_t>(s) * dp + i;
        inside_node = r / c.gpus_per_node == (r + dp) / c.gpus_per_node;
      }
    }
    const int64_t boundary = static_cast<int64_t>(m.micro_batch) * m.arch.seq * m.arch.hidden * m.precision.act_bytes;
    const int64_t per_step = static_cast<int64_t>(v) * c.grad_accum;
    const int64_t on_path = c.pp.schedule == "naive" ? static_cast<int64_t>(c.grad_accum) * (p - 1) : p * v - 1;
    for (const char* what : {"activations to the next stage", "activation gradients to the previous stage"}) {
      CommEstimate e;
      e.op = "send_recv";
      e.what = what;
      e.bytes = boundary;
      e.ranks = 2;
      e.calls = per_step;
      e.inside_node = inside_node;
      e.blocking = true;
      time_collective(c, &e, 0);
      e.hidden_s = e.seconds * static_cast<double>(std::max<int64_t>(0, per_step - on_path)) / per_step;
      out.push_back(e);
    }
  }
  if (dp > 1) {
    out.push_back(collective(c, "all_reduce", "gradients of the stage (dp)", stage_parameters * m.precision.grad_bytes,
                             dp, 1, 1));
    out.back().blocking = c.calibration != nullptr;  // as parabench-pp runs it: after the pipeline drains
  }
  return out;
}

// parabench-dp's buckets, from its own DataParallel::make_buckets (bench/dp/data_parallel.cpp): the units
// walked in backward order, a bucket closed once it holds --bucket-mb of gradients, a unit never split;
// each bucket is all-reduced as soon as backward has finished its units. With a calibration, the
// all-reduce is timed bucket by bucket at its own size, and the last bucket (the one with the embedding,
// ready when backward ends) is what no compute hides.
void dp_buckets(const PlanConfig& c, const std::vector<int64_t>& units, CommEstimate* e) {
  const int64_t grad_bytes = c.memory.precision.grad_bytes;
  // As DataParallel's constructor sizes them: --bucket-mb of gradients in their dtype.
  const auto bucket_elements =
      static_cast<std::size_t>(std::max(1.0, c.bucket_mb * 1024.0 * 1024.0 / static_cast<double>(grad_bytes)));
  std::vector<UnitInfo> unit_info(units.size());  // the flat gradient buffer's layout, unit after unit
  std::size_t offset = 0;
  for (std::size_t u = 0; u < units.size(); ++u) {
    unit_info[u].offset = offset;
    unit_info[u].numel = static_cast<std::size_t>(units[u]);
    offset += unit_info[u].numel;
  }
  e->seconds = 0;
  for (const DataParallel::Bucket& bucket : DataParallel::make_buckets(unit_info, bucket_elements)) {
    CommEstimate one = *e;
    one.bytes = static_cast<int64_t>(bucket.count) * grad_bytes;
    one.calls = 1;
    time_collective(c, &one, 0);
    e->seconds += one.seconds;
    e->exposed_s = one.seconds;  // the last one's
  }
}

// The gradient (and, sharded, parameter) collectives of one step over the data ranks: `group` ranks
// `stride` apart holding the same `units` (a rank's tp slices of its units; zero for units it does not
// hold), by the plan's sharding, as parabench-dp/-tp/-pp (NO_SHARD), parabench-fsdp and parabench-hybrid
// issue them.
std::vector<CommEstimate> data_collectives(const PlanConfig& c, std::vector<int64_t> units, int group, int stride) {
  const PrecisionSpec& p = c.memory.precision;
  const int64_t micro_steps = c.grad_accum;
  units.erase(std::remove(units.begin(), units.end(), 0), units.end());  // units not held
  int64_t parameters = 0;
  for (int64_t u : units) parameters += u;
  const int64_t grad_bytes = parameters * p.grad_bytes;
  std::vector<CommEstimate> out;
  // FSDP moves whole units padded to the shard layout (bench/fsdp): per unit, ceil(numel / n) · n elements.
  const int n = c.memory.shard == ShardStrategy::no_shard ? 1 : c.memory.shard_ranks;
  int64_t padded = 0;
  for (int64_t u : units) padded += shard_elements(u, n) * n;
  const int64_t last = shard_elements(units.back(), n) * n;  // the last unit stays gathered for its backward
  // The app issues one call per unit: a calibration's bandwidth is read at the mean unit's size.
  const int64_t unit_count = static_cast<int64_t>(units.size());
  auto per_unit = [&](int64_t elements, int64_t bytes_per_element, int64_t count) {
    return elements * bytes_per_element / std::max<int64_t>(1, count);
  };
  const int64_t bucket = static_cast<int64_t>(c.bucket_mb * 1024 * 1024);  // dp: buckets of at least this
  switch (c.memory.shard) {
    case ShardStrategy::no_shard:  // DDP: one all-reduce of the gradients, on the last micro-batch
      out.push_back(collective(c, "all_reduce", "gradients", grad_bytes, group, stride, 1,
                               c.app == "dp" ? bucket : per_unit(parameters, p.grad_bytes, unit_count)));
      if (c.app == "dp" && c.calibration) dp_buckets(c, units, &out.back());
      break;
    case ShardStrategy::zero1:  // gradients reduced to their owner, updated weights gathered back
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, group, stride, 1,
                               per_unit(padded, p.grad_bytes, unit_count)));
      out.push_back(collective(c, "all_gather", "parameters", padded * p.param_bytes, group, stride, 1,
                               per_unit(padded, p.param_bytes, unit_count)));
      break;
    case ShardStrategy::shard_grad_op:  // whole weights, gathered back after the update; gradients per micro-batch
      out.push_back(collective(c, "all_gather", "parameters", padded * p.param_bytes, group, stride, 1,
                               per_unit(padded, p.param_bytes, unit_count)));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, group, stride, micro_steps,
                               per_unit(padded, p.grad_bytes, unit_count)));
      break;
    case ShardStrategy::full_shard:  // gathered for forward, and again for backward but the last unit
      // (each into a unit buffer of its own: out of place)
      out.push_back(collective(c, "all_gather", "parameters (forward)", padded * p.param_bytes, group, stride, micro_steps,
                               per_unit(padded, p.param_bytes, unit_count), false));
      out.push_back(collective(c, "all_gather", "parameters (backward)", (padded - last) * p.param_bytes, group, stride,
                               micro_steps, per_unit(padded - last, p.param_bytes, unit_count - 1), false));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, group, stride, micro_steps,
                               per_unit(padded, p.grad_bytes, unit_count)));
      break;
    case ShardStrategy::hybrid_shard: {  // FULL_SHARD inside a group, the shards all-reduced across groups
      const int shard_group = c.memory.shard_ranks, replicas = group / shard_group;
      out.push_back(collective(c, "all_gather", "parameters (forward)", padded * p.param_bytes, shard_group, stride, micro_steps,
                               per_unit(padded, p.param_bytes, unit_count), false));
      out.push_back(collective(c, "all_gather", "parameters (backward)", (padded - last) * p.param_bytes, shard_group, stride,
                               micro_steps, per_unit(padded - last, p.param_bytes, unit_count - 1), false));
      out.push_back(collective(c, "reduce_scatter", "gradients", padded * p.grad_bytes, shard_group, stride, micro_steps,
                               per_unit(padded, p.grad_bytes, unit_count)));
      out.push_back(collective(c, "all_reduce", "gradient shards", padded / shard_group * p.grad_bytes, replicas, shard_group * stride, 1));
      break;
    }
  }
  return out;
}

// parabench-hybrid's collectives of one step (bench/hybrid/README.md): each strategy's on a rank's share.
// tp's f and g (or sequence parallelism's) for the stage's L/pp blocks over b·S/cp tokens, with the
// embedding's and the head's counted on every stage (an upper bound for the middle stages); cp's
// exchanges of the stage's blocks for this rank's heads (width h/tp); pp's boundaries of the rank's rows
// (b·S/cp, / tp with sequence parallelism), stages tp·cp·dp ranks apart; and the gradients of the stage's
// units over the data ranks (dp × cp, tp apart) by the plan's sharding; all for a rank of `stage`.
std::vector<CommEstimate> hybrid_collectives(const PlanConfig& c, int stage) {
  const MemoryPlan& m = c.memory;
  const ArchSpec& a = m.arch;
  const int t = m.tp, p = c.pp.stages;
  int blocks = 0;  // of a rank of `stage` (the busiest), over its chunks
  for (int chunk = 0; chunk < c.pp.chunks; ++chunk) {
    blocks += pipeline_stage_blocks(static_cast<int>(a.layers), p * c.pp.chunks, chunk * p + stage);
  }
  std::vector<CommEstimate> out;
  PlanConfig share = c;  // a tp group's view: the stage's blocks, this cp rank's tokens
  share.memory.arch.layers = blocks;
  share.memory.arch.seq = a.seq / c.cp;
  for (CommEstimate& e : tp_collectives(share)) out.push_back(e);
  if (c.cp > 1) {
    PlanConfig heads = c;  // this tp rank's heads, the stage's blocks; the gradients below
    heads.memory.arch.layers = blocks;
    heads.memory.arch.hidden = a.hidden / t;
    heads.memory.arch.heads = a.heads / t;
    heads.memory.arch.kv_heads = std::max<int64_t>(1, a.kv_heads / t);
    heads.ranks = 1;
    heads.gpus_per_node = std::max(1, c.gpus_per_node / t);  // cp peers are tp apart: inside a node iff cp·tp fits
    for (CommEstimate& e : cp_collectives(heads, 0)) out.push_back(e);
  }
  if (p > 1) {
    PlanConfig stages = c;  // stage s's ranks are tp·cp·dp apart; the boundary is this rank's rows
    stages.dp = c.dp * c.cp * t;
    stages.memory.arch.seq = a.seq / c.cp;
    if (m.sequence_parallel) stages.memory.arch.hidden = a.hidden / t;
    for (CommEstimate& e : pp_collectives(stages, 0)) {
      if (e.op == "send_recv") out.push_back(e);
    }
  }
  std::vector<int64_t> units = unit_parameter_counts(m);
  const std::vector<int> held = pipeline_held_units(static_cast<int>(a.layers), c.pp, stage);
  for (std::size_t u = 0; u < units.size(); ++u) {
    if (std::find(held.begin(), held.end(), static_cast<int>(u)) == held.end()) units[u] = 0;
  }
  const bool prefetched = gathers_prefetched(c);
  for (CommEstimate& e : data_collectives(c, units, c.dp * c.cp, t)) {
    e.what += c.cp > 1 ? " (dp × cp)" : " (dp)";
    // With a calibration, as the app runs them: tp's strategy all-reduces after the pipeline (or backward);
    // fsdp's strategy waits on all but the prefetched gathers (and on those too through MPI).
    if (c.calibration && !(prefetched && e.op == "all_gather")) e.blocking = true;
    out.push_back(e);
  }
  return out;
}

// The collectives of one step (README.md, "Step-time estimate"). `parameters`: one rank's (P_local; pp:
// the largest stage's).
std::vector<CommEstimate> step_collectives(const PlanConfig& c, int64_t parameters) {
  const PrecisionSpec& p = c.memory.precision;
  const int64_t grad_bytes = parameters * p.grad_bytes;
  const int64_t micro_steps = c.grad_accum;
  std::vector<CommEstimate> out;
  if (c.is_moe()) return ep_collectives(c, parameters);
  if (c.is_cp()) return cp_collectives(c, parameters);
  if (c.is_pp()) return pp_collectives(c, parameters);
  if (c.app == "tp") {
    out = tp_collectives(c);
    // The dp group: ranks tp apart, holding the same slices; one all-reduce of a rank's gradients
    // (parabench-tp issues it after backward: with a calibration, as the app runs, it blocks).
    out.push_back(collective(c, "all_reduce", "gradients (dp)", grad_bytes, c.dp, c.tp(), 1));
    out.back().blocking = c.calibration != nullptr;
    return out;
  }
  out = data_collectives(c, unit_parameter_counts(c.memory), c.dp, 1);
  const int n = c.memory.shard == ShardStrategy::no_shard ? 1 : c.memory.shard_ranks;
  const std::vector<int64_t> units = unit_parameter_counts(c.memory);
  if (c.calibration && c.app == "fsdp") {
    // As parabench-fsdp runs them (bench/fsdp/fully_sharded.cpp): the reduce-scatters, all-reduces and the
    // gathers after the optimizer step are called in place and wait; only FULL_SHARD's (and HYBRID_SHARD's)
    // gathers are prefetched, the next unit's while one computes, but the first unit of each micro-batch's
    // forward, which nothing before it prefetches; and through MPI not even those (they wait too).
    const bool prefetched = gathers_prefetched(c);
    for (CommEstimate& e : out) {
      if (!(prefetched && e.op == "all_gather")) {
        e.blocking = true;
      } else if (e.what == "parameters (forward)") {
        CommEstimate first = e;
        first.bytes = shard_elements(units.front(), n) * n * p.param_bytes;
        first.calls = micro_steps;
        time_collective(c, &first, 0);
        e.exposed_s = std::min(e.seconds, first.seconds);
      }
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
    a.rms_norm = p.rms_norm;
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

namespace {

// What one rank holding `units` (embedding 0, blocks 1..L, head L+1) executes per step at the
// peak-based model's FLOP counts: forward and backward (3× forward) of its blocks and head over its
// m micro-batches, and what recomputation runs again.
double stage_hardware_flops(const PlanConfig& c, const std::vector<int>& units) {
  const ArchSpec& a = c.memory.arch;
  int64_t blocks = 0;
  bool head = false;
  for (int u : units) {
    if (u == a.layers + 1) head = true;
    else if (u > 0) ++blocks;
  }
  const double tokens = static_cast<double>(c.grad_accum) * c.memory.micro_batch * a.seq;
  double flops = 3.0 * tokens * (blocks * block_forward_flops_per_token(a) + (head ? head_flops_per_token(a) : 0.0));
  if (c.memory.recompute == "full") flops += tokens * blocks * block_forward_flops_per_token(a);
  if (c.memory.recompute == "selective") flops += tokens * blocks * attention_core_flops_per_token(a);
  return flops;
}

std::vector<int> all_units(const ArchSpec& a) {
  std::vector<int> units(static_cast<std::size_t>(a.layers + 2));
  for (std::size_t u = 0; u < units.size(); ++u) units[u] = static_cast<int>(u);
  return units;
}

// The calibrated compute of the rank holding `units` with memory `memory` (its gradients and AdamW shard).
StepCompute rank_compute(const PlanConfig& c, const std::vector<int>& units, const MemoryEstimate& memory) {
  const PrecisionSpec& p = c.memory.precision;
  const int64_t grad_elements = memory[MemCategory::gradients] / p.grad_bytes;
  const int64_t updated_elements = memory[MemCategory::optimizer_states] / p.optimizer_bytes;
  return calibrated_compute(*c.calibration, c, rank_step_kernels(c, units, grad_elements, updated_elements));
}

}  // namespace

PlanResult evaluate(const PlanConfig& c) {
  PlanResult r;
  r.config = c;
  const MemoryPlan& m = c.memory;
  const int L = static_cast<int>(m.arch.layers);
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
      whole.arch.vocab_divisor = 1;  // parameters, not the vocabulary's padding
      r.parameters = 0;
      for (int64_t u : unit_parameter_counts(whole)) r.parameters += u;
    }
    if (c.definition) {  // the app's own memory of each distinct rank (pp: each stage); the largest peak decides the fit
      std::vector<MemoryEstimate> ranks;
      if (c.is_hybrid()) {  // the ranks of a stage hold the same bytes: one per stage
        const Layout layout = c.definition->layout(c.app_options);
        for (int s = 0; s < layout.pp; ++s) {
          ranks.push_back(c.definition->predict_memory(c.app_options, m, layout.rank_of({s, 0, 0, 0})));
        }
      } else {
        ranks = distinct_rank_memory(*c.definition, c.app_options, m);
      }
      int peak = 0;
      for (std::size_t s = 0; s < ranks.size(); ++s) {
        if (ranks[s].peak_total > ranks[peak].peak_total) peak = static_cast<int>(s);
      }
      r.per_rank = ranks[peak];
      if (c.is_pp()) {  // the stages differ; the other apps' distinct ranks (tp, cp coordinates) hold the same
        r.per_stage = ranks;
        r.peak_stage = peak;
      }
    } else {
      r.per_rank = predict_memory(m);  // with m.tp and m.sequence_parallel: one tp rank's slices
    }
  }
  r.stored_parameters = r.parameters;
  if (!c.model_states_only()) {  // the vocabulary's padding: embed.tok's rows, and head.w's columns when untied
    const ArchSpec& a = m.arch;
    r.stored_parameters += (a.padded_vocab(m.tp) - a.vocab) * a.hidden * (a.tied_embeddings ? 1 : 2);
  }
  r.rank_parameters = r.stored_parameters;
  if (!c.model_states_only() && (m.tp > 1 || c.is_moe())) {
    r.rank_parameters = 0;  // tp: a rank's slices; ep: the replicated parameters and its E/ep experts
    for (int64_t u : unit_parameter_counts(m)) r.rank_parameters += u;
  }
  if (c.is_pp()) {  // the stage of largest peak's units (a rank's tp slices of them)
    const std::vector<int64_t> units = unit_parameter_counts(m);
    r.rank_parameters = 0;
    for (int u : pipeline_held_units(L, c.pp, r.peak_stage)) r.rank_parameters += units[u];
  }
  r.model_state_bytes = r.per_rank[MemCategory::parameters] + r.per_rank[MemCategory::master_parameters] +
                        r.per_rank[MemCategory::gradients] + r.per_rank[MemCategory::optimizer_states];
  r.model_state_bytes_per_param = static_cast<double>(r.model_state_bytes) / static_cast<double>(r.stored_parameters);
  r.cluster_peak_total = r.per_rank.peak_total * c.ranks;
  if (c.is_pp()) {
    r.cluster_peak_total = 0;
    for (const MemoryEstimate& e : r.per_stage) r.cluster_peak_total += e.peak_total * (c.ranks / c.pp.stages);
  }

  if (c.gpu_memory_gib > 0) {
    r.fit_checked = true;
    r.capacity_bytes = static_cast<int64_t>(std::llround(c.gpu_memory_gib * kGiB));
    r.excess_bytes = r.per_rank.peak_total - r.capacity_bytes;
    r.fits = r.excess_bytes <= 0;
  }
  if (c.model_states_only()) return r;

  r.has_time = true;
  if (c.is_moe()) {
    r.model_flops_per_step = moe_model_flops_per_step(m.arch, c.moe, c.global_batch);
    r.hardware_flops_per_step = moe_hardware_flops_per_step(m.arch, c.moe, c.global_batch, m.micro_batch, m.recompute);
  } else if (c.is_cp()) {
    r.model_flops_per_step = model_flops_per_step(m.arch, c.global_batch);
    r.hardware_flops_per_step = cp_hardware_flops_per_step(c);
  } else {
    r.model_flops_per_step = model_flops_per_step(m.arch, c.global_batch);
    r.hardware_flops_per_step = r.model_flops_per_step + recompute_flops_per_step(m.arch, c.global_batch, m.recompute);
  }

  // Compute: one rank's (every rank alike), or a pipeline's busiest stage's, whose schedule then idles
  // it for the bubble.
  const double flops_per_s = c.peak_tflops * 1e12 * c.mfu;  // --mfu: the share of peak sustained on what runs
  int64_t pipeline_parameters = r.rank_parameters;
  double backward_s = -1;  // with a calibration: the busiest rank's backward compute
  int busiest_stage = 0;   // pp: the stage whose compute sets the pipeline's pace
  if (c.is_pp()) {
    const std::vector<int64_t> units = unit_parameter_counts(m);
    pipeline_parameters = 0;
    for (int s = 0; s < c.pp.stages; ++s) {
      const std::vector<int> held = pipeline_held_units(L, c.pp, s);
      int64_t held_parameters = 0;
      for (int u : held) held_parameters += units[u];
      pipeline_parameters = std::max(pipeline_parameters, held_parameters);
      double busy;
      if (c.calibration) {
        StepCompute stage = rank_compute(c, held, r.per_stage[s]);
        busy = stage.seconds;
        if (s == 0 || busy > r.compute_s) {
          r.kernels = std::move(stage.kernels);
          r.warnings = std::move(stage.warnings);
          backward_s = stage.backward_s;
        }
      } else {
        busy = stage_hardware_flops(c, held) / (static_cast<double>(m.tp) * c.cp) / flops_per_s;  // hybrid: tp·cp share it
      }
      if (s == 0 || busy > r.compute_s) busiest_stage = s;
      r.compute_s = std::max(r.compute_s, busy);
    }
    r.bubble_fraction = theoretical_bubble_fraction(c.pp.schedule, c.pp.stages, static_cast<int>(c.grad_accum),
                                                    c.pp.chunks);
    r.bubble_s = r.compute_s * r.bubble_fraction / (1.0 - r.bubble_fraction);
  } else if (c.calibration) {
    StepCompute rank = rank_compute(c, all_units(m.arch), r.per_rank);
    r.compute_s = rank.seconds;
    backward_s = rank.backward_s;
    r.kernels = std::move(rank.kernels);
    r.warnings = std::move(rank.warnings);
  } else {
    r.compute_s = r.hardware_flops_per_step / (static_cast<double>(c.ranks) * flops_per_s);
  }

  r.comm = c.is_hybrid() ? hybrid_collectives(c, busiest_stage)
                         : step_collectives(c, c.is_pp() ? pipeline_parameters : r.rank_parameters);
  for (const CommEstimate& e : r.comm) {
    if (!e.caveat.empty()) r.warnings.push_back(e.caveat);
  }
  double overlappable = 0;  // what may hide behind the whole step's compute (the gradient collectives)
  double tail = 0;          // what of it may not (exposed_s)
  for (const CommEstimate& e : r.comm) {
    r.comm_s += e.seconds;
    if (e.blocking) {
      r.blocking_comm_s += e.seconds - e.hidden_s;  // cp's ring, pp's messages: less what hides
    } else {
      overlappable += e.seconds - e.exposed_s;
      tail += e.exposed_s;
    }
  }
  // Overlapped communication hides behind compute; blocking collectives (tp's, ep's, cp's, pp's) add to it.
  // Gradient all-reduces start in backward, so only backward hides them where a calibration tells it
  // apart; fsdp's prefetched gathers run beside forward as well, so the whole step hides fsdp's.
  const double pipeline_s = r.compute_s + r.bubble_s;
  const double hiding_s = backward_s >= 0 && c.app != "fsdp" ? backward_s : pipeline_s;
  r.step_s = c.overlap ? pipeline_s + std::max(0.0, overlappable - hiding_s) + tail + r.blocking_comm_s
                       : pipeline_s + overlappable + tail + r.blocking_comm_s;
  r.exposed_comm_s = r.step_s - pipeline_s;
  r.tokens_per_s = static_cast<double>(c.global_batch) * m.arch.seq / r.step_s;
  r.mfu = r.model_flops_per_step / (r.step_s * c.ranks * c.peak_tflops * 1e12);
  // Energy: every rank's device at --power-w for the whole step (a measured run's /summary power per device).
  r.energy_j_per_step = c.power_w > 0 ? c.power_w * c.ranks * r.step_s : std::nan("");
  r.joules_per_token = r.energy_j_per_step / r.tokens_per_s / r.step_s;
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
