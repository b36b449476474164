// The analytic memory model behind /memory/predicted and parabench-plan: bytes per category for
// one rank, written beside the code that allocates them (GptModel::forward_backward, the model
// states of the strategies) so that the two can be checked against each other in tests.
// docs/memory-model.md derives every term and names its source.
//
// ArchSpec is a superset of the model the apps train (grouped-query attention, gated MLPs and tied
// embeddings exist only in plans); for the trained model the formulas reduce exactly to what the
// apps allocate.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/memory.h"
#include "common/options.h"

namespace pb {

struct MemoryEstimate {
  std::array<int64_t, kNumMemCategories> bytes{};
  int64_t peak_total = 0;
  int64_t& operator[](MemCategory c) { return bytes[static_cast<int>(c)]; }
  int64_t operator[](MemCategory c) const { return bytes[static_cast<int>(c)]; }
};

// ---- the architecture ------------------------------------------------------------------------------
struct ArchSpec {
  std::string name;
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, ffn = 0, vocab = 0, seq = 0;
  bool gated_mlp = false;        // SwiGLU-style: two input projections (gate, up) of width ffn
  bool tied_embeddings = false;  // the head reuses embed.tok
  bool learned_positions = true; // embed.pos [S, h] (false: rotary, no parameters)
  bool biases = true;            // linear biases and LayerNorm .b (false: Llama-style)
  bool rms_norm = false;         // RMSNorm (Llama): one fp32 statistic per row, not LayerNorm's two
  // Megatron's make-vocab-size-divisible-by: embed.tok and head.w (and the logits) are stored with
  // the vocabulary padded to a multiple of vocab_divisor · tp (ModelConfig::padded_vocab).
  int64_t vocab_divisor = 128;

  int64_t head_dim() const { return hidden / heads; }
  int64_t qkv_width() const { return hidden + 2 * kv_heads * head_dim(); }  // [Q | K | V]
  int64_t mlp_in_width() const { return gated_mlp ? 2 * ffn : ffn; }
  int64_t padded_vocab(int64_t tp = 1) const { return padded_vocab_size(vocab, vocab_divisor, tp); }
};
ArchSpec arch_from_model(const ModelConfig& model);  // the trained GPT of SPEC section 2

// Parameters of each unit in forward order: embedding, one entry per block, final LayerNorm + head;
// with tp > 1, one tensor-parallel rank's slices (LayerNorms, row-parallel biases and the position
// table are whole on every rank).
std::vector<int64_t> unit_parameter_counts(const ArchSpec& arch, int tp = 1);
int64_t total_parameters(const ArchSpec& arch);  // the model's, without the vocabulary's padding

// ---- precision -------------------------------------------------------------------------------------
// Bytes per element of each kind of state. fp32: 4 / 4 / 0 master / 8 AdamW, activations 4.
// bf16 (mixed precision as SPEC 2.3): bf16 weights 2, fp32 gradients 4 (bf16_grads: 2), fp32 master
// weights 4, fp32 AdamW 8, activations 2: Megatron's 18 (or ZeRO's 16) bytes per parameter.
struct PrecisionSpec {
  std::string name = "fp32";
  int64_t param_bytes = 4, grad_bytes = 4, master_bytes = 0, optimizer_bytes = 8, act_bytes = 4;
  int64_t model_state_bytes() const { return param_bytes + grad_bytes + master_bytes + optimizer_bytes; }
};
PrecisionSpec precision_fp32();
PrecisionSpec precision_bf16(bool bf16_grads);

// ---- sharding ----------------------------------------------------------------------------------------
enum class ShardStrategy { no_shard, zero1, shard_grad_op, full_shard, hybrid_shard };
// Accepts the names of SPEC section 4 and the aliases NO_OP and FULLY_SHARD.
bool parse_shard_strategy(const std::string& name, ShardStrategy* out);
const char* shard_strategy_name(ShardStrategy s);
// Elements of one rank's shard of a unit of `numel` elements split over `ranks`, padded so that every
// rank holds the same count: ceil(numel / ranks).
int64_t shard_elements(int64_t numel, int ranks);

// ---- one rank's plan -----------------------------------------------------------------------------------
struct MemoryPlan {
  ArchSpec arch;
  PrecisionSpec precision;
  int micro_batch = 1;
  std::string recompute = "none";  // none | selective | full
  // Attention's saved state: the CPU backend keeps the probabilities (heads · b · S² per block);
  // a fused (flash) kernel keeps only the softmax statistics (heads · b · S).
  bool attention_keeps_probabilities = true;
  ShardStrategy shard = ShardStrategy::no_shard;
  int shard_ranks = 1;       // ranks a unit is sharded over (dp, or --shard-group for HYBRID_SHARD)
  bool prefetch = true;      // FULL_SHARD / HYBRID_SHARD: the next unit is gathered while one computes
  int tp = 1;                // tensor-parallel degree: heads, FFN and vocabulary split tp ways
  bool sequence_parallel = false;  // LayerNorm and residual activations split tp ways along the sequence
  // A strategy's MLP part in place of the dense MLP (bench/ep's mixture of experts): what it keeps
  // per block for backward and the scratch of its backward, in bytes; < 0: the dense MLP's.
  int64_t mlp_activation_bytes = -1;
  int64_t mlp_workspace_bytes = -1;
  int64_t mlp_parameters = -1;    // this rank's MLP parameters per block (experts it holds, routers)
  int64_t mlp_comm_bytes = 0;     // the part's communication buffers at their peak (dispatch, combine)
  // Context parallelism: each rank holds S / cp tokens of every sequence; its attention core (bench/cp)
  // states its own terms per block in bytes (< 0: the backend attention's): what it keeps for backward,
  // its backward scratch, what it holds all the time (positions), what its forward needs while it runs
  // (counted with full recomputation, when that forward runs inside backward), and its communication
  // buffers at their peak.
  int cp = 1;
  int64_t attention_saved_bytes = -1;
  int64_t attention_scratch_bytes = -1;
  int64_t attention_persistent_bytes = 0;
  int64_t attention_forward_bytes = 0;
  int64_t attention_comm_bytes = 0;
  int64_t attention_forward_comm_bytes = 0;  // the same during its forward (≤ attention_comm_bytes)
};

// Activations the model keeps for backward at its peak, and the backward scratch, for one
// micro-batch of the unsharded model (the terms GptModel allocates).
struct ActivationEstimate {
  int64_t peak_bytes = 0;            // activations category
  int64_t forward_end_bytes = 0;     // held when backward starts
  int64_t workspace_bytes = 0;       // backward scratch + loss accumulator
  int64_t backward_extra_bytes = 0;  // recomputed tensors above forward_end_bytes during backward (≥ 0 excess)
};
ActivationEstimate predict_activations(const MemoryPlan& plan);
// The same for one micro-batch on a pipeline stage (or model chunk) of `blocks` blocks, with the
// embedding (first) and the head (last) or without; the whole model is (L, true, true).
ActivationEstimate predict_stage_activations(const MemoryPlan& plan, int64_t blocks, bool first, bool last);

// The model-state categories (parameters, master_parameters, gradients, optimizer_states) of one
// rank for units of the given parameter counts, sharded as `shard` over `shard_ranks` (padding
// included). ZERO1 and SHARD_GRAD_OP keep whole (padded) parameters on every rank.
MemoryEstimate predict_model_states(const std::vector<int64_t>& unit_params, const PrecisionSpec& precision,
                                    ShardStrategy shard, int shard_ranks);

// A pass over a contiguous range of units (a pipeline chunk's, or the whole model's): their forward in
// increasing order, or their backward in decreasing order.
struct UnitPass {
  int first = 0, last = 0;
  bool forward = true;
  int64_t beside = 0;  // other communication buffers live during the pass (a pipeline's boundaries), bytes
};
// FSDP's communication buffers at their peak (gathered parameters, a unit's whole gradient, the
// reduce-scatter output) over a step's passes, as bench/fsdp/fully_sharded.cpp issues them; the units
// held are those the passes cover. units: this rank's parameters of every unit of the model. With
// FULL_SHARD and HYBRID_SHARD each pass's `beside` bytes are added to the buffers of that pass (the
// peak of the sum); the other strategies' buffers come after a unit's backward, outside the passes'
// accounting, and `beside` is not added to them.
int64_t predict_fsdp_comm_peak(const MemoryPlan& plan, const std::vector<int64_t>& units,
                               const std::vector<UnitPass>& passes);

// The parameters of each unit of one rank for a plan: those of its tp slices, with the MLP part's
// in place of the dense MLP's.
std::vector<int64_t> unit_parameter_counts(const MemoryPlan& plan);

// Every category for one rank, and the peak of their sum.
MemoryEstimate predict_memory(const MemoryPlan& plan);

// The plan of an app's run: its model, dtype, micro-batch and recompute mode (no sharding).
MemoryPlan memory_plan_for(const Options& options, bool attention_keeps_probabilities);

}  // namespace pb
