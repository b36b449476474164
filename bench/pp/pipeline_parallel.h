// Pipeline parallelism: contiguous layers per stage, activations and their gradients sent
// point-to-point between stages, the micro-batches of a step (its grad accumulation) run in the
// order of a schedule (schedule.h), combined with data parallelism.
//
// Stage s of p holds blocks [s·L/p, (s+1)·L/p); the first also the embedding, the last the final
// LayerNorm, the head and the loss. Interleaved: virtual stage k = chunk·p + s holds blocks
// [k·L/(p·v), (k+1)·L/(p·v)). Each rank measures the compute time of its forward and backward steps;
// the rest of the schedule's time is the bubble (/pipeline/bubble_fraction).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/pp/pipeline_plan.h"
#include "bench/pp/schedule.h"
#include "common/memory_model.h"
#include "common/runner.h"

namespace pb {

// parabench-pp: its options (kept by the definition), their rules, its layout (stages farthest apart,
// SPEC 3), each rank's memory and the strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_pipeline_app();

// A pipeline's step (ARCHITECTURE seam 6): the micro-batches of a step through this rank's chunks in the
// order of the schedule, each chunk's input received from the previous virtual stage and its output sent
// to the next (and their gradients back), the bubble measured. Whatever holds a stage's units runs its
// micro-batches through it: parabench-pp's PipelineParallel, and parabench-hybrid around tensor, context
// and sharded data parallelism.
class PipelineSchedule {
 public:
  PipelineSchedule(Runtime& runtime, const PipelineOptions& options);

  // One step: the strategy says where the units' parameters and gradients are (its UnitHooks) and hears
  // of each micro-batch before its backward (begin_micro_batch; `last` for the step's last one).
  void run(Runtime& runtime, const StepBatches& batches, Strategy& hooks);
  // MPI moves a non-blocking message only inside MPI calls: between units, poke the ones in flight,
  // so that a neighbour does not wait for this stage's whole forward or backward.
  void progress();
  // A value summed over the stages (collective over the pp group): the loss, which only the last stage
  // computes, and sums of squares over the disjoint units of the stages.
  double sum_over_stages(double local);
  // /pipeline/bubble_fraction [ranks] with its theoretical value (collective; writer null but on rank 0).
  void write_results(Communicator& world, ResultWriter* writer);
  int stages() const { return stages_; }

 private:
  int virtual_stage(int chunk) const { return chunk * stages_ + stage_; }
  int rank_of(int virtual_stage) const { return virtual_stage % stages_; }
  int tag(int micro, int virtual_stage, bool forward) const;

  PipelineOptions options_;
  int grad_accum_, warmup_;
  // This step's messages in flight: forward outputs being sent, gradients posted for receipt, the
  // input gradient being sent.
  std::map<std::pair<int, int>, Request> output_sends_;
  std::map<std::pair<int, int>, std::pair<TensorPtr, Request>> output_grads_;
  Request input_grad_send_;
  Communicator& pp_;
  int stages_, stage_, virtual_stages_;
  std::vector<double> bubble_;  // per measured step: idle share of the schedule's time
};

// Pipeline parallelism over data parallelism: the stage's units whole (ReplicatedState), run through the
// schedule, gradients all-reduced over dp.
class PipelineParallel final : public Strategy {
 public:
  PipelineParallel(Runtime& runtime, const PipelineOptions& options);

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  void run_micro_batches(Runtime& runtime, const StepBatches& batches) override {
    schedule_.run(runtime, batches, *this);
  }
  double reduce_loss(double local_loss) override { return schedule_.sum_over_stages(local_loss); }
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override { state_.adamw(grad_scale, t, rt_.options.lr); }
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;
  void write_results(Communicator& world, ResultWriter* writer) override { schedule_.write_results(world, writer); }
  void before_forward(int) override { schedule_.progress(); }
  void before_backward(int) override { schedule_.progress(); }

 private:
  Runtime& rt_;
  PipelineSchedule schedule_;
  ReplicatedState state_;
};

}  // namespace pb
