// Hybrid parallelism: the strategies composed on one model, the way Megatron-LM and torchtitan apply
// them one after another (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
// Clusters Using Megatron-LM"; Llama 3's 4D parallelism).
//
// Ranks as SPEC section 3: tp innermost, then cp, dp, and pp outermost; ep subdivides dp. Nothing here is
// a second copy of a strategy: the model slices its layers over tp (common/model.cpp), context
// parallelism swaps in bench/cp's attention core, expert parallelism bench/ep's MoE MLP; the units of a
// pipeline stage run through bench/pp's PipelineSchedule; their state is kept by bench/tp's
// TensorParallelStrategy (whole, gradients all-reduced over the data ranks), bench/fsdp's sharded
// strategy (--shard) or bench/ep's (--moe). The data ranks are dp, or dp × cp with context parallelism
// (every rank of a cp group holds the same parameters: Megatron's distributed optimizer shards over them).
#pragma once

#include <memory>
#include <vector>

#include "bench/cp/context_parallel.h"
#include "bench/ep/expert_parallel.h"
#include "bench/fsdp/fully_sharded.h"
#include "bench/pp/pipeline_parallel.h"
#include "bench/tp/tensor_parallel.h"
#include "common/runner.h"

namespace pb {

// Every degree of the hybrid, as typed: each strategy's own options.
struct HybridOptions {
  TpOptions tp;
  PipelineOptions pp;
  CpOptions cp;
  EpOptions ep;
  bool moe = false;  // the MLP of every block a mixture of experts (bench/ep)
  FsdpCli shard{{}, "NO_SHARD"};  // NO_SHARD by default
  int data_ranks(int dp) const { return dp * cp.cp; }
};

class HybridStrategy final : public Strategy {
 public:
  // moe: the MoE part when --moe (owned by the harness).
  HybridStrategy(Runtime& runtime, const HybridOptions& options, MoeMlp* moe);

  ConstTensorPtr unit_params(int unit) override { return state_->unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_->unit_grads(unit); }
  void before_forward(int unit) override;
  void after_forward(int unit) override { state_->after_forward(unit); }
  void before_backward(int unit) override;
  void after_backward(int unit) override { state_->after_backward(unit); }
  void grad_ready(int unit) override { state_->grad_ready(unit); }

  void run_micro_batches(Runtime& runtime, const StepBatches& batches) override;
  double reduce_loss(double local_loss) override;
  void zero_grads() override {
    rt_.backend.take_span_seconds();  // the cp core's attention spans, not reported here: their events freed
    state_->zero_grads();
  }
  void begin_micro_batch(int micro, bool last) override { state_->begin_micro_batch(micro, last); }
  void finish_gradients() override { state_->finish_gradients(); }
  double global_grad_sum_squares() override { return over_stages(state_->global_grad_sum_squares()); }
  void optimizer_step(float grad_scale, int t) override { state_->optimizer_step(grad_scale, t); }
  std::vector<float> gather_full_gradients() override { return state_->gather_full_gradients(); }
  double global_param_sum_squares() override { return over_stages(state_->global_param_sum_squares()); }
  void write_results(Communicator& world, ResultWriter* writer) override;
  void summary_attributes(nlohmann::ordered_json& summary) override { state_->summary_attributes(summary); }

 private:
  double over_stages(double local) { return pipeline_ ? pipeline_->sum_over_stages(local) : local; }

  Runtime& rt_;
  std::unique_ptr<PipelineSchedule> pipeline_;  // pp > 1
  std::unique_ptr<Strategy> state_;             // the units' state: tp's, fsdp's or ep's strategy
};

// The predicted memory of a rank of the hybrid (SPEC 6): the plan completed by each strategy (tp slices,
// cp's attention core, ep's MoE part, the sharding over the data ranks), then the pipeline's replay of
// the stage's schedule when pp > 1.
MemoryEstimate predict_hybrid_memory(const HybridOptions& options, const Options& o, const MemoryPlan& base, int rank);

// parabench-hybrid: its options (kept by the definition, starting from `preset`: the command line's
// defaults, or a layout that parabench-plan --search sets without a command line), their rules, its
// layout, a rank's memory, the block parts and the strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_hybrid_app(const HybridOptions& preset = HybridOptions{});

}  // namespace pb
