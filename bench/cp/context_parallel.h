// Context parallelism (ring attention, Liu et al. 2023; Megatron-LM's context parallelism; Llama 3's
// all-gather; DeepSpeed-Ulysses), combined with data parallelism.
//
// Each rank of a cp group holds S/cp tokens of the same sequences (the harness hands the model this
// rank's positions, SPEC 2.3's samples unchanged) and every parameter. Everything but attention is
// per token; the attention core (context_attention.cpp) brings each query the keys and values of the
// other ranks. The strategy owns the model state, the gradient all-reduce over dp × cp (each cp rank
// saw other tokens of the same sequences), the loss summed over cp, and the attention times.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "bench/cp/context_attention.h"
#include "common/runner.h"

namespace CLI {
class App;
}

namespace pb {

class ContextParallelStrategy final : public Strategy {
 public:
  // attention: the core (null at cp = 1, where the backend's attention runs).
  ContextParallelStrategy(Runtime& runtime, ContextAttention* attention);

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override;
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
  void take_step_time();              // the attention time of the step that ended last, into times_
  bool step_finished_ = false;        // a step has finished whose attention time is not yet taken
  std::vector<double> times_;         // this rank's attention time per finished step
  std::vector<double> all_times_;     // [steps, ranks], gathered by write_results
};

// parabench-cp's options, which parabench-hybrid takes too.
struct CpOptions {
  int cp = 1;
  std::string algo_name = "ring", layout_name = "zigzag";
  CpAlgo algo = CpAlgo::ring;  // from algo_name, by validate_cp_options
};
// --cp, --cp-algo and --cp-layout, with their defaults and help.
void add_cp_options(CLI::App& cli, CpOptions& cp);
// Their rules (throws ConfigError naming the option): a known algorithm and layout, the sequence
// divisible into the layout's chunks, one exchange within an MPI count, and with alltoall the rank's
// heads (heads / tp) divisible by cp. Resolves cp.algo.
void validate_cp_options(CpOptions& cp, const Options& options, int tp = 1);
// The attention core of a rank (null at cp = 1: the backend's attention runs), for the rank's heads.
std::unique_ptr<ContextAttention> make_context_attention(const CpOptions& cp, const Options& options, Backend& backend,
                                                         const ModelParallel& mp);
// The ranks that hold the same parameters under context parallelism, dp × cp (those of one tp and pp
// position), which sum their gradients; owned by the groups.
Communicator* make_data_ranks(ProcessGroups& groups);

// parabench-cp: its options (kept by the definition), their rules, its layout, a rank's memory, the
// attention core and the strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_cp_app();

}  // namespace pb
