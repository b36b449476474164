// Context parallelism (ring attention, Liu et al. 2023; Megatron-LM's context parallelism; Llama 3's
// all-gather; DeepSpeed-Ulysses), combined with data parallelism.
//
// Each rank of a cp group holds S/cp tokens of the same sequences (the harness hands the model this
// rank's positions, SPEC 2.3's samples unchanged) and every parameter. Everything but attention is
// per token; the attention core (context_attention.cpp) brings each query the keys and values of the
// other ranks. The strategy owns the model state, the gradient all-reduce over dp × cp (each cp rank
// saw other tokens of the same sequences), the loss summed over cp, and the attention times.
#pragma once

#include <vector>

#include "bench/cp/context_attention.h"
#include "common/runner.h"

namespace pb {

class ContextParallelStrategy final : public Strategy {
 public:
  // attention: the core (null at cp = 1, where the backend's attention runs).
  ContextParallelStrategy(Runtime& runtime, ContextAttention* attention);

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  double reduce_loss(double local_loss) override;
  void finish_gradients() override;
  double global_grad_sum_squares() override { return rt_.backend.sum_squares(state_.grads(), state_.size()); }
  void optimizer_step(float grad_scale, int t) override;
  double global_param_sum_squares() override { return rt_.backend.sum_squares(state_.master(), state_.size()); }
  std::vector<float> gather_full_gradients() override;
  void write_results(Communicator& world, ResultWriter* writer) override;
  void summary_attributes(nlohmann::ordered_json& summary) override;

 private:
  Runtime& rt_;
  ContextAttention* attention_;
  ReplicatedState state_;
  Communicator* data_ranks_;          // dp × cp: every rank that holds the same parameters
  std::vector<double> times_;         // this rank's attention time per finished step
  std::vector<double> all_times_;     // [steps, ranks], gathered by write_results
};

// parabench-cp: its options (kept by the definition), their rules, its layout, a rank's memory, the
// attention core and the strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_cp_app();

}  // namespace pb
