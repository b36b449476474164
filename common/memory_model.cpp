#include "common/memory_model.h"

#include <algorithm>

namespace pb {

ArchSpec arch_from_model(const ModelConfig& m) {
  ArchSpec a;
  a.name = m.name;
  a.layers = m.layers;
  a.hidden = m.hidden;
  a.heads = m.heads;
  a.kv_heads = m.kv();
  a.ffn = m.ffn;
  if (m.llama()) {  // SPEC 2.5
    a.gated_mlp = true;
    a.learned_positions = false;
    a.biases = false;
    a.rms_norm = true;
  }
  a.vocab = m.vocab;
  a.vocab_divisor = m.vocab_divisor;
  a.seq = m.seq;
  return a;
}

MemoryPlan memory_plan_for(const Options& o, bool attention_keeps_probabilities) {
  MemoryPlan p;
  p.arch = arch_from_model(o.model);
  // SPEC 2.3's mixed precision with --dtype bf16: bf16 parameters and activations, fp32 master weights
  // and AdamW states, gradients in --grad-dtype.
  p.precision = o.dtype == "bf16" ? precision_bf16(o.grad_dtype == "bf16") : precision_fp32();
  p.micro_batch = o.micro_batch;
  p.recompute = o.recompute;
  p.attention_keeps_probabilities = attention_keeps_probabilities;
  return p;
}

namespace {
// The dense MLP of one block on one tp rank: fc1 (gate and up when gated) column-, fc2 row-parallel.
int64_t dense_mlp_parameters(const ArchSpec& a, int tp) {
  const int64_t bias = a.biases ? 1 : 0, mlp_in = a.mlp_in_width() / tp;
  return a.hidden * mlp_in + bias * mlp_in + a.ffn / tp * a.hidden + bias * a.hidden;
}
}  // namespace

std::vector<int64_t> unit_parameter_counts(const ArchSpec& a, int tp) {
  const int64_t h = a.hidden, Vl = a.padded_vocab(tp) / tp, S = a.seq;
  const int64_t bias = a.biases ? 1 : 0;
  std::vector<int64_t> units;
  units.push_back(Vl * h + (a.learned_positions ? S * h : 0));  // embed.tok (vocabulary-parallel, padded), embed.pos
  const int64_t norms = 2 * (h + bias * h);                         // ln1, ln2: .g (and .b)
  const int64_t qkv = a.qkv_width() / tp;
  const int64_t attention = h * qkv + bias * qkv + h / tp * h + bias * h;  // qkv column-, out row-parallel
  const int64_t mlp = dense_mlp_parameters(a, tp);
  for (int64_t l = 0; l < a.layers; ++l) units.push_back(norms + attention + mlp);
  units.push_back(h + bias * h + (a.tied_embeddings ? 0 : h * Vl));  // final_ln, head.w (column-parallel, padded)
  return units;
}

std::vector<int64_t> unit_parameter_counts(const MemoryPlan& p) {
  std::vector<int64_t> units = unit_parameter_counts(p.arch, p.tp);
  if (p.mlp_parameters >= 0) {
    const int64_t dense = dense_mlp_parameters(p.arch, p.tp);
    for (std::size_t u = 1; u + 1 < units.size(); ++u) units[u] += p.mlp_parameters - dense;
  }
  return units;
}

int64_t total_parameters(const ArchSpec& a) {
  ArchSpec unpadded = a;  // the model's parameters: the vocabulary's padding is storage, not parameters
  unpadded.vocab_divisor = 1;
  int64_t total = 0;
  for (int64_t u : unit_parameter_counts(unpadded)) total += u;
  return total;
}

PrecisionSpec precision_fp32() { return PrecisionSpec{}; }

PrecisionSpec precision_bf16(bool bf16_grads) {
  PrecisionSpec p;
  p.name = bf16_grads ? "bf16 (bf16 gradients)" : "bf16";
  p.param_bytes = 2;
  p.grad_bytes = bf16_grads ? 2 : 4;
  p.master_bytes = 4;
  p.optimizer_bytes = 8;
  p.act_bytes = 2;
  return p;
}

bool parse_shard_strategy(const std::string& name, ShardStrategy* out) {
  if (name == "NO_SHARD" || name == "NO_OP") *out = ShardStrategy::no_shard;
  else if (name == "ZERO1") *out = ShardStrategy::zero1;
  else if (name == "SHARD_GRAD_OP") *out = ShardStrategy::shard_grad_op;
  else if (name == "FULL_SHARD" || name == "FULLY_SHARD") *out = ShardStrategy::full_shard;
  else if (name == "HYBRID_SHARD") *out = ShardStrategy::hybrid_shard;
  else return false;
  return true;
}

const char* shard_strategy_name(ShardStrategy s) {
  switch (s) {
    case ShardStrategy::no_shard: return "NO_SHARD";
    case ShardStrategy::zero1: return "ZERO1";
    case ShardStrategy::shard_grad_op: return "SHARD_GRAD_OP";
    case ShardStrategy::full_shard: return "FULL_SHARD";
    case ShardStrategy::hybrid_shard: return "HYBRID_SHARD";
  }
  return "unknown";
}

int64_t shard_elements(int64_t numel, int ranks) { return (numel + ranks - 1) / ranks; }

ActivationEstimate predict_activations(const MemoryPlan& p) {
  return predict_stage_activations(p, p.arch.layers, true, true);
}

ActivationEstimate predict_stage_activations(const MemoryPlan& p, int64_t blocks, bool first, bool last) {
  const ArchSpec& a = p.arch;
  const int64_t t = p.tp;
  const int64_t S = a.seq / p.cp;                                 // tokens of a sequence on this rank
  const int64_t N = static_cast<int64_t>(p.micro_batch) * S;      // tokens of one micro-batch
  const int64_t R = p.sequence_parallel ? N / t : N;  // rows of the residual stream on this rank
  const int64_t h = a.hidden, f = a.ffn, Vl = a.padded_vocab(t) / t, L = blocks;
  const int64_t hl = h / t, fl = f / t, qkv = a.qkv_width() / t, mlp_in = a.mlp_in_width() / t;
  const int64_t e = p.precision.act_bytes;  // bytes of an activation element
  constexpr int64_t kStat = 4, kToken = 4, kLoss = 8;  // LayerNorm statistics fp32, tokens int32
  // Attention's saved state and backward scratch per block, for this rank's heads (see MemoryPlan):
  // the softmax's probabilities or its row statistics, both fp32 in every precision.
  const int64_t rows = static_cast<int64_t>(p.micro_batch) * (a.heads / t) * S;
  const int64_t backend_att = rows * (p.attention_keeps_probabilities ? S : 1) * kStat;
  const int64_t att_saved = p.attention_saved_bytes >= 0 ? p.attention_saved_bytes : backend_att;
  const int64_t att_scratch = p.attention_scratch_bytes >= 0 ? p.attention_scratch_bytes : backend_att;

  // As GptModel::forward_backward allocates them:
  const int64_t tokens = first || last ? 2 * N * kToken : 0;  // inputs and targets
  const int64_t embed_out = R * h * e;  // the embedding's output, or a copy of the stage's input
  // The MLP part: the dense MLP keeps fc1's output and its activation; another part says its own.
  const int64_t mlp_acts = p.mlp_activation_bytes >= 0 ? p.mlp_activation_bytes : e * (N * mlp_in + N * fl);
  // Its backward scratch: dfc1 (with sequence parallelism its input gradient goes to the backward's
  // (N, h) scratch, free while the MLP's backward runs).
  // SwiGLU (gated): dgate and dup, and a buffer for the up branch's input gradient where it does not fit
  // in dgate (f/tp < h).
  const int64_t gated_extra = a.gated_mlp && fl < h ? e * N * h : 0;
  const int64_t mlp_scratch = p.mlp_workspace_bytes >= 0 ? p.mlp_workspace_bytes : e * N * mlp_in + gated_extra;
  // A block: norm statistics (LayerNorm's mean and rstd, RMSNorm's rstd: 4 or 2 per row), ln1 out, qkv,
  // attention saved state, attention out, x_mid, ln2 out, the MLP's, x_out. Rows of the residual stream
  // are split by sequence parallelism; the tensors between a column- and a row-parallel layer by the tp split.
  const int64_t stats = a.rms_norm ? 1 : 2;  // per row of one norm
  const int64_t block_no_att = 2 * stats * R * kStat + e * (R * h + N * qkv + N * hl + R * h + R * h + R * h) + mlp_acts;
  const int64_t block_full = block_no_att + att_saved;
  const int64_t block_out = R * h * e;
  const int64_t head = last ? stats * R * kStat + e * (R * h + N * Vl) : 0;  // final norm's statistics and out, logits (padded)

  ActivationEstimate est;
  if (p.recompute == "full") {
    // Forward keeps each block's output; a block's full set exists only while it runs forward, and
    // again when backward recomputes it (after its saved output is freed: its input stays).
    est.forward_end_bytes = tokens + embed_out + L * block_out + head;
    const int64_t backward_peak = L > 0 ? tokens + embed_out + (L - 1) * block_out + block_full : 0;
    est.peak_bytes = std::max(est.forward_end_bytes, backward_peak);
  } else if (p.recompute == "selective" && p.attention_keeps_probabilities) {
    // Forward drops the attention probabilities; backward recomputes them (and a scratch copy of the
    // attention output) for one block at a time.
    est.forward_end_bytes = tokens + embed_out + L * block_no_att + head;
    const int64_t backward_peak = L > 0 ? tokens + embed_out + L * block_no_att + att_saved + N * hl * e : 0;
    est.peak_bytes = std::max(est.forward_end_bytes, backward_peak);
  } else {  // none; and selective with a fused attention, which keeps no probabilities to drop
    est.forward_end_bytes = tokens + embed_out + L * block_full + head;
    est.peak_bytes = est.forward_end_bytes;
  }
  est.backward_extra_bytes = est.peak_bytes - est.forward_end_bytes;
  // Backward scratch: the residual gradient (R·h), a column-parallel input's gradient (N·h, and its
  // reduce-scattered rows with sequence parallelism), the attention-output gradient, dqkv and the
  // attention scratch, held through the backward, and the MLP part's scratch during its backward;
  // plus the loss accumulator (a double).
  // With context parallelism the embedding's backward also holds the gradient of this rank's rows of
  // the position table (S/cp · h) for a moment, and full recomputation runs the attention core's
  // forward inside backward: whichever is largest comes on top of what backward holds.
  const int64_t cp_positions = p.cp > 1 && first && a.learned_positions ? S * h * kStat : 0;  // fp32 rows
  const int64_t recomputed_forward = p.recompute == "full" ? p.attention_forward_bytes : 0;
  // Rotary positions: the positions of this rank's tokens of a sequence (int32), held by the model.
  const int64_t rope_positions = a.learned_positions ? 0 : S * kToken;
  est.workspace_bytes = kLoss + rope_positions + e * (R * h + N * h + (p.sequence_parallel ? R * h : 0) + N * hl + N * qkv) +
                        att_scratch + p.attention_persistent_bytes +
                        std::max({mlp_scratch, cp_positions, recomputed_forward});
  return est;
}

// The largest sum of FSDP communication buffers at any point of a step: gathered unit parameters
// (FULL_SHARD, HYBRID_SHARD: the unit in use, plus the prefetched next one), the unsharded gradient
// of the unit in backward, and the reduce-scatter output. Replays the order of
// bench/fsdp/fully_sharded.cpp over the passes: in a forward the last held unit kept for its backward
// and the one before it prefetched, in a backward the previous unit prefetched.
int64_t predict_fsdp_comm_peak(const MemoryPlan& p, const std::vector<int64_t>& units, const std::vector<UnitPass>& passes) {
  const int n = p.shard_ranks;
  const int U = static_cast<int>(units.size());
  const int64_t pb = p.precision.param_bytes, gb = p.precision.grad_bytes;
  auto padded = [&](int u) { return shard_elements(units[u], n) * n; };
  const bool gathers = p.shard == ShardStrategy::full_shard || p.shard == ShardStrategy::hybrid_shard;
  const bool unit_grads = gathers || p.shard == ShardStrategy::shard_grad_op;
  std::vector<char> held(U, 0);
  int last = -1;
  for (const UnitPass& pass : passes) {
    for (int u = pass.first; u <= pass.last; ++u) held[u] = 1;
    last = std::max(last, pass.last);
  }
  int64_t peak = 0;
  if (!gathers) {
    // Nothing gathered: a unit's whole gradient and its reduce-scatter output beside it (SHARD_GRAD_OP, in
    // each backward), or ZERO1's reduce-scatter output of a unit after backward; the largest unit's.
    for (int u = 0; u < U; ++u) {
      if (!held[u]) continue;
      const int64_t output = shard_elements(units[u], n) * gb;
      peak = std::max(peak, unit_grads ? padded(u) * gb + output : output);
    }
    return peak;
  }
  std::vector<char> gathered(U, 0);
  int64_t current = 0;  // the gathered units and, during a pass, the buffers beside them
  auto gather = [&](int u) {
    if (u < 0 || u >= U || !held[u] || gathered[u]) return;
    gathered[u] = 1;
    current += padded(u) * pb;
    peak = std::max(peak, current);
  };
  auto release = [&](int u) {
    if (!gathered[u]) return;
    gathered[u] = 0;
    current -= padded(u) * pb;
  };
  for (const UnitPass& pass : passes) {
    current += pass.beside;
    peak = std::max(peak, current);
    if (pass.forward) {
      for (int u = pass.first; u <= pass.last; ++u) {
        gather(u);
        if (p.prefetch) gather(u == last ? last - 1 : u + 1);
        if (u != last) release(u);
      }
    } else {
      for (int u = pass.last; u >= pass.first; --u) {
        gather(u);
        if (p.prefetch) gather(u - 1);
        // The unit's whole gradient during its backward; after it, the unit's parameters are freed and
        // the reduce-scatter output sits beside the whole gradient.
        peak = std::max(peak, current + padded(u) * gb);
        release(u);
        peak = std::max(peak, current + padded(u) * gb + shard_elements(units[u], n) * gb);
      }
    }
    current -= pass.beside;
  }
  return peak;
}

MemoryEstimate predict_model_states(const std::vector<int64_t>& units, const PrecisionSpec& pr, ShardStrategy shard,
                                    int shard_ranks) {
  const int n = std::max(1, shard_ranks);
  int64_t full = 0, padded = 0, own = 0;  // elements: all units, padded to n, one rank's shards
  for (int64_t u : units) {
    full += u;
    padded += shard_elements(u, n) * n;
    own += shard_elements(u, n);
  }
  // ZeRO's stages: each shards one more kind of state (ZERO1: optimizer states and master weights;
  // SHARD_GRAD_OP: gradients too; FULL_SHARD, HYBRID_SHARD: parameters too). What stays whole is
  // padded to the shard layout, except under NO_SHARD, which has no layout.
  const bool opt_sharded = shard != ShardStrategy::no_shard;
  const bool params_sharded = shard == ShardStrategy::full_shard || shard == ShardStrategy::hybrid_shard;
  const bool grads_sharded = params_sharded || shard == ShardStrategy::shard_grad_op;
  const int64_t whole = opt_sharded ? padded : full;
  MemoryEstimate e;
  e[MemCategory::parameters] = (params_sharded ? own : whole) * pr.param_bytes;
  e[MemCategory::gradients] = (grads_sharded ? own : whole) * pr.grad_bytes;
  e[MemCategory::master_parameters] = (opt_sharded ? own : whole) * pr.master_bytes;
  e[MemCategory::optimizer_states] = (opt_sharded ? own : whole) * pr.optimizer_bytes;
  return e;
}

MemoryEstimate predict_memory(const MemoryPlan& p) {
  const std::vector<int64_t> units = unit_parameter_counts(p);
  MemoryEstimate e = predict_model_states(units, p.precision, p.shard, p.shard_ranks);
  const int U = static_cast<int>(units.size());
  e[MemCategory::comm_buffers] =
      p.shard == ShardStrategy::no_shard ? 0 : predict_fsdp_comm_peak(p, units, {{0, U - 1, true}, {0, U - 1, false}});
  // Sequence parallelism: one (B·S/cp, h) buffer at a time (a gathered column-parallel input, a
  // row-parallel output before its reduce-scatter, or a gathered output gradient), each freed before the
  // attention core runs: it and the core's exchanges do not coincide.
  const int64_t sp_rows = p.sequence_parallel ? static_cast<int64_t>(p.micro_batch) * (p.arch.seq / p.cp) *
                                                    p.arch.hidden * p.precision.act_bytes
                                              : 0;
  // They sit beside FSDP's gathered units and whole unit gradient, which live through a unit's compute; ZERO1's
  // only buffer, a reduce-scatter output after a unit's backward, comes when they are gone.
  const int64_t beside = std::max(sp_rows, p.attention_comm_bytes) + p.mlp_comm_bytes;
  int64_t& comm = e[MemCategory::comm_buffers];
  comm = p.shard == ShardStrategy::zero1 ? std::max(comm, beside) : comm + beside;
  const ActivationEstimate act = predict_activations(p);
  e[MemCategory::activations] = act.peak_bytes;
  e[MemCategory::workspace] = act.workspace_bytes;
  // The activation peak comes while backward holds its scratch; the communication buffers' peak is
  // added as if it coincided (an upper bound: they are small next to activations at these shapes).
  e.peak_total = e[MemCategory::parameters] + e[MemCategory::gradients] + e[MemCategory::master_parameters] +
                 e[MemCategory::optimizer_states] + act.peak_bytes + act.workspace_bytes +
                 e[MemCategory::comm_buffers];
  return e;
}

}  // namespace pb
