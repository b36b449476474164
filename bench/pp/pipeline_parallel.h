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

class PipelineParallel final : public Strategy {
 public:
  PipelineParallel(Runtime& runtime, const PipelineOptions& options);

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  void run_micro_batches(Runtime& runtime, const StepBatches& batches) override;
  double reduce_loss(double local_loss) override;
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override { state_.adamw(grad_scale, t, rt_.options.lr); }
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;
  void write_results(Communicator& world, ResultWriter* writer) override;
  // MPI moves a non-blocking message only inside MPI calls: between units, poke the ones in flight,
  // so that a neighbour does not wait for this stage's whole forward or backward.
  void before_forward(int) override { progress(); }
  void before_backward(int) override { progress(); }

 private:
  int virtual_stage(int chunk) const { return chunk * stages_ + stage_; }
  int rank_of(int virtual_stage) const { return virtual_stage % stages_; }
  int tag(int micro, int virtual_stage, bool forward) const;

  void progress();

  Runtime& rt_;
  PipelineOptions options_;
  // This step's messages in flight: forward outputs being sent, gradients posted for receipt, the
  // input gradient being sent.
  std::map<std::pair<int, int>, Request> output_sends_;
  std::map<std::pair<int, int>, std::pair<TensorPtr, Request>> output_grads_;
  Request input_grad_send_;
  Communicator& pp_;
  int stages_, stage_, virtual_stages_;
  ReplicatedState state_;
  std::vector<double> bubble_;  // per measured step: idle share of the schedule's time
};

}  // namespace pb
