// Expert parallelism (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021) combined
// with data parallelism.
//
// Every rank trains on its own samples (dp = world size). Attention, embeddings, LayerNorms and
// routers are replicated; each rank of an ep group (ep consecutive dp ranks) holds E/ep whole experts,
// and the MoE MLP (bench/ep/moe.cpp) moves tokens to them by all-to-all. The strategy owns the model
// state, the gradient reductions (replicated tensors over the dp group, experts over the dp / ep
// ranks that hold the same experts), the norms over both, and the routing statistics.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "bench/ep/moe.h"
#include "common/runner.h"

namespace CLI {
class App;
}

namespace pb {

class ExpertParallelStrategy final : public Strategy {
 public:
  // held: the units this rank holds (a pipeline stage's; empty: all of them). The routing statistics are
  // summed over every rank of this rank's tp position (dp and the pipeline's stages, which route other
  // tokens or other layers; the tp ranks of a group route the same tokens).
  ExpertParallelStrategy(Runtime& runtime, MoeMlp& moe, std::vector<int> held = {});

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override;
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;
  void write_results(Communicator& world, ResultWriter* writer) override;
  void summary_attributes(nlohmann::ordered_json& summary) override;

 private:
  // A run of consecutive tensors of one kind in the flat buffers: replicated, or experts.
  struct Run {
    std::size_t first = 0, count = 0;
    bool experts = false;
  };
  // Σ x² over the model: experts summed over the ep group, tensor-parallel slices over the tp group,
  // replicated tensors counted once.
  double sum_squares(ConstTensorPtr base);
  // max / mean of the tokens per expert, summed over the finished steps, for the worst layer.
  double imbalance() const;

  Runtime& rt_;
  MoeMlp& moe_;
  ReplicatedState state_;
  std::vector<Run> runs_;
  Communicator* stats_group_;  // the ranks whose statistics add up to the global batch's (dp × pp)
  MoeStepStats pending_;  // this step's statistics over the global batch, kept once the step finishes
  std::vector<int64_t> kept_, dropped_;  // [steps, layers, experts], [steps, layers]
  std::vector<double> aux_loss_;         // [steps]
};

// parabench-ep's options, which parabench-hybrid takes too (with --moe).
struct EpOptions {
  int ep = 1;
  MoeOptions moe;
};
// --ep, --experts, --top-k, --capacity-factor and --aux-loss, with their defaults and help.
void add_ep_options(CLI::App& cli, EpOptions& ep);
// Their rules (throws ConfigError naming the option): experts, top-k, capacity and coefficient in range,
// ep dividing the experts and the data-parallel degree, the dispatch within one all-to-all.
void validate_ep_options(const EpOptions& ep, const Options& options);
// The MoE MLP part of a rank, its experts shared out over mp.ep.
std::unique_ptr<MoeMlp> make_moe_mlp(const EpOptions& ep, const Options& options, Backend& backend,
                                     const ModelParallel& mp);

// parabench-ep: its options (kept by the definition), their rules, its layout, a rank's memory, the MoE
// block part and the strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_ep_app();

}  // namespace pb
