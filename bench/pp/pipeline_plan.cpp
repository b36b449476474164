// The pipeline's shared pieces (pipeline_plan.h): its options and their rules, the units each stage
// holds, and the memory formula of each stage, as parabench-pp runs them and parabench-plan --app pp
// plans them. Not the schedules (schedule.cpp) nor the training (pipeline_parallel.cpp).
#include "bench/pp/pipeline_plan.h"

#include <CLI/CLI.hpp>

#include <algorithm>

#include "bench/pp/schedule.h"
#include "common/errors.h"

namespace pb {
namespace {
constexpr int64_t kMaxTag = 32767;  // the smallest MPI_TAG_UB the MPI standard allows
}  // namespace

void add_pipeline_options(CLI::App& cli, PipelineOptions& pp) {
  cli.add_option("--pp", pp.stages, "pipeline stages (ranks farthest apart)")->capture_default_str();
  cli.add_option("--schedule", pp.schedule, "naive | gpipe | 1f1b | interleaved")->capture_default_str();
  cli.add_option("--virtual-stages", pp.chunks, "interleaved: model chunks per rank")->capture_default_str();
}

void validate_pipeline_options(const PipelineOptions& pp, int64_t layers, int64_t grad_accum, int64_t global_batch) {
  const std::string& s = pp.schedule;
  if (s != "naive" && s != "gpipe" && s != "1f1b" && s != "interleaved") {
    throw ConfigError("--schedule " + s + " must be naive, gpipe, 1f1b or interleaved");
  }
  if (pp.stages < 1) throw ConfigError("--pp " + std::to_string(pp.stages) + " must be at least 1");
  if (pp.chunks < 1) throw ConfigError("--virtual-stages " + std::to_string(pp.chunks) + " must be at least 1");
  if (s == "interleaved" && pp.chunks < 2) {
    throw ConfigError("--schedule interleaved needs --virtual-stages 2 or more (1 is the 1f1b schedule)");
  }
  if (s != "interleaved" && pp.chunks != 1) {
    throw ConfigError("--virtual-stages " + std::to_string(pp.chunks) + " applies to --schedule interleaved only");
  }
  const int64_t virtual_stages = static_cast<int64_t>(pp.stages) * pp.chunks;
  if (layers < virtual_stages) {
    throw ConfigError("--layers " + std::to_string(layers) + " is fewer than --pp " + std::to_string(pp.stages) +
                      " × --virtual-stages " + std::to_string(pp.chunks) + " (every virtual stage holds a block)");
  }
  if (s == "interleaved" && grad_accum % pp.stages != 0) {
    throw ConfigError("--schedule interleaved needs micro-batches per step (grad accumulation " +
                      std::to_string(grad_accum) + ") divisible by --pp " + std::to_string(pp.stages));
  }
  if (2 * grad_accum * virtual_stages > kMaxTag) {
    throw ConfigError("--global-batch " + std::to_string(global_batch) + ": too many micro-batches per step (" +
                      std::to_string(grad_accum) + ") for MPI message tags with " + std::to_string(virtual_stages) +
                      " virtual stages");
  }
}

int pipeline_stage_blocks(int layers, int virtual_stages, int k) {
  const int V = virtual_stages, most = (layers + V - 1) / V, fewer = most * V - layers;
  const int order = k <= V - 1 - k ? 2 * k : 2 * (V - 1 - k) + 1;  // 0, V − 1, 1, V − 2, ...
  return order < fewer ? most - 1 : most;
}

GptModel::Stage pipeline_stage_units(int layers, int virtual_stages, int k) {
  int first_block = 0;  // blocks are units 1..L
  for (int j = 0; j < k; ++j) first_block += pipeline_stage_blocks(layers, virtual_stages, j);
  GptModel::Stage s;
  s.first_unit = k == 0 ? 0 : 1 + first_block;
  s.last_unit = k == virtual_stages - 1 ? layers + 1 : first_block + pipeline_stage_blocks(layers, virtual_stages, k);
  return s;
}

std::vector<int> pipeline_held_units(int layers, const PipelineOptions& o, int stage) {
  std::vector<int> units;
  for (int chunk = 0; chunk < o.chunks; ++chunk) {
    const GptModel::Stage s = pipeline_stage_units(layers, o.stages * o.chunks, chunk * o.stages + stage);
    for (int u = s.first_unit; u <= s.last_unit; ++u) units.push_back(u);
  }
  return units;
}

MemoryEstimate predict_pipeline_memory(const MemoryPlan& plan, const PipelineOptions& o, int stage, int m) {
  const int V = o.stages * o.chunks, L = static_cast<int>(plan.arch.layers);
  // This rank's units (its tp slices, the plan's MLP part), those of the stage's chunks held, each sharded
  // as the plan says (NO_SHARD for parabench-pp).
  const std::vector<int64_t> unit_params = unit_parameter_counts(plan);
  std::vector<int64_t> held;
  for (int u : pipeline_held_units(L, o, stage)) held.push_back(unit_params[u]);
  MemoryEstimate e = predict_model_states(held, plan.precision, plan.shard, plan.shard_ranks);

  // Replay the schedule: a micro-batch's forward leaves its chunk's activations until its backward,
  // which needs a little more while it runs (recomputation); receive and send buffers of one
  // boundary (this rank's rows × h: b·S/cp tokens, / tp with sequence parallelism) each.
  const int64_t tokens = static_cast<int64_t>(plan.micro_batch) * (plan.arch.seq / plan.cp);
  const int64_t rows = plan.sequence_parallel ? tokens / plan.tp : tokens;
  const int64_t boundary = rows * plan.arch.hidden * plan.precision.act_bytes;
  // What a chunk's forward and backward allocate themselves beside the boundaries: sequence parallelism's
  // gathered rows (one (b·S/cp, h) buffer at a time) or the attention core's exchanges (never at once:
  // common/memory_model.cpp), and the MLP part's.
  const int64_t sp = plan.sequence_parallel ? tokens * plan.arch.hidden * plan.precision.act_bytes : 0;
  const int64_t forward_extra = std::max(sp, plan.attention_forward_comm_bytes) + plan.mlp_comm_bytes;
  const int64_t backward_extra = std::max(sp, plan.attention_comm_bytes) + plan.mlp_comm_bytes;
  int64_t live = 0, act_peak = 0, comm_peak = 0;
  int64_t sending = 0;  // the last input gradient sent, whose buffer lives until the next backward
  int64_t posted = 0;   // gradient buffers posted after forwards, waiting for their backward
  std::vector<UnitPass> passes;  // the units' forwards and backwards in schedule order (for FSDP's gathers)
  std::vector<GptModel::Stage> chunk_units(o.chunks);
  std::vector<ActivationEstimate> chunk_activations(o.chunks);  // one micro-batch on each of the rank's chunks
  for (int chunk = 0; chunk < o.chunks; ++chunk) {
    const int k = chunk * o.stages + stage;
    const GptModel::Stage s = pipeline_stage_units(L, V, k);
    const int64_t blocks = std::min(s.last_unit, L) - std::max(s.first_unit, 1) + 1;
    chunk_units[chunk] = s;
    chunk_activations[chunk] = predict_stage_activations(plan, blocks, k == 0, k == V - 1);
  }
  for (const PipelineStep& step : pipeline_schedule(o.schedule, o.stages, stage, m, o.chunks)) {
    const int k = step.chunk * o.stages + stage;
    const GptModel::Stage& s = chunk_units[step.chunk];
    const ActivationEstimate& a = chunk_activations[step.chunk];
    // The boundaries live while the pass runs: the received input (forward) or the input gradient to send
    // (backward) beside the posted gradient buffers, and in a forward the last input gradient still
    // being sent. FSDP's gathered units and gradients come beside them (the extras of sequence
    // parallelism, cp and the MLP part stay added to those at their own peak, below).
    const int64_t boundaries = (step.forward ? sending : 0) + posted + (k > 0 ? boundary : 0);
    passes.push_back({s.first_unit, s.last_unit, step.forward, boundaries});
    if (step.forward) {
      comm_peak = std::max(comm_peak, boundaries + forward_extra);
      if (k < V - 1) posted += boundary;
      comm_peak = std::max(comm_peak, sending + posted);
      live += a.forward_end_bytes;
      act_peak = std::max(act_peak, live);
    } else {
      sending = 0;  // waited for before the backward
      comm_peak = std::max(comm_peak, boundaries + backward_extra);
      act_peak = std::max(act_peak, live + a.backward_extra_bytes);
      live -= a.forward_end_bytes;
      if (k < V - 1) posted -= boundary;
      if (k > 0) sending = boundary;
    }
  }
  e[MemCategory::activations] = act_peak;
  e[MemCategory::workspace] = predict_activations(plan).workspace_bytes;  // every backward's scratch
  // The sharded units' buffers: FULL_SHARD's and HYBRID_SHARD's gathers and gradients beside the
  // boundaries of their pass (the peak of the sum); the other strategies' at their own peak, added (an
  // upper bound where it does not coincide with the boundaries'). The extras beside both stay added.
  if (plan.shard == ShardStrategy::full_shard || plan.shard == ShardStrategy::hybrid_shard) {
    const int64_t extra = std::max(forward_extra, backward_extra);
    comm_peak = std::max(comm_peak, predict_fsdp_comm_peak(plan, unit_params, passes) + extra);
  } else if (plan.shard != ShardStrategy::no_shard) {
    comm_peak += predict_fsdp_comm_peak(plan, unit_params, passes);
  }
  e[MemCategory::comm_buffers] = comm_peak;
  e.peak_total = 0;
  for (int64_t bytes : e.bytes) e.peak_total += bytes;  // an upper bound: the peaks may not coincide
  return e;
}

}  // namespace pb
