// Tensor parallelism (Megatron-LM: Shoeybi et al. 2019) with sequence parallelism (Korthikanti et
// al. 2022), combined with data parallelism.
//
// The layers themselves are in the shared model (common/model.cpp), which slices attention heads,
// the MLP and the vocabulary over the tp group and calls Megatron's f and g operators
// (common/parallel.h). This strategy owns what is left: each rank's slices of the parameters, the
// sum of the gradients that sequence parallelism leaves partial (the LayerNorms'), the data-parallel
// all-reduce, and the norms over slices.
#pragma once

#include <vector>

#include "common/runner.h"

namespace CLI {
class App;
}

namespace pb {

class TensorParallelStrategy final : public Strategy {
 public:
  // held: the units this rank holds (a pipeline stage's; empty: all of them); data_group: the ranks
  // that hold the same slices and sum their gradients (null: the dp group; dp × cp with context
  // parallelism). Norms cover the held units only: a pipeline sums them over its stages.
  explicit TensorParallelStrategy(Runtime& runtime, std::vector<int> held = {}, Communicator* data_group = nullptr);

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override { state_.adamw(grad_scale, t, rt_.options.lr); }
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;

 private:
  // Σ x² over the model: sliced tensors summed over the tp group, whole ones counted once.
  double sum_squares_over_slices(ConstTensorPtr base);

  Runtime& rt_;
  ReplicatedState state_;
  const TensorParallel tp_;
  Communicator& data_group_;
};

// parabench-tp's options, which parabench-hybrid takes too.
struct TpOptions {
  int tp = 1;
  bool sequence_parallel = false;
};
// --tp and --sequence-parallel, with their defaults and help.
void add_tp_options(CLI::App& cli, TpOptions& tp);
// Their rules (throws ConfigError naming the option): tp ≥ 1 dividing heads and FFN (the vocabulary
// is padded to a multiple of tp), and, with sequence parallelism, a rank's tokens of a micro-batch
// (micro-batch × seq / cp).
void validate_tp_options(const TpOptions& tp, const Options& options, int cp = 1);

// A plan's slicing under --tp and --sequence-parallel (what predict_memory and the planner's collectives
// read): each rank's 1/tp of the sliced weights and activations; sequence parallelism only at tp > 1.
void plan_tp_slices(MemoryPlan& plan, int tp, bool sequence_parallel);

// parabench-tp: its options (kept by the definition), their rules, its layout, a rank's memory and the
// strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_tp_app();

}  // namespace pb
