// The calibrated compute time of one rank's training step: the kernels common/model.cpp calls, with
// the shapes this plan's rank computes them at (tp splits the heads, the MLP and the vocabulary;
// sequence parallelism the rows of the LayerNorms and residuals; a pipeline stage holds its units),
// each timed at the rate a parabench-micro calibration measured for the same kernel, backend and dtype
// (calibration.h). README.md, "Calibrated step time", states the model and what it leaves out.
#pragma once

#include <string>
#include <vector>

#include "bench/plan/calibration.h"
#include "bench/plan/plan.h"

namespace pb::plan {

// The kernel calls of one step of a rank that holds `units` (embedding 0, blocks 1..L, head L+1;
// every unit but with --app pp) and keeps `grad_elements` gradients and updates `updated_elements`
// parameters (its AdamW shard). Matrix products are "matmul" calls, a backward's two products listed
// apart (dinp (N, OC)·Wᵀ and dweight inpᵀ·dout); the other kernels' work follows bench/micro/kernels.cpp.
// Throws ConfigError for the apps whose step it does not model (ep, cp).
std::vector<KernelCall> rank_step_kernels(const PlanConfig& config, const std::vector<int>& units,
                                          int64_t grad_elements, int64_t updated_elements);

// The calibrated compute of those calls: their seconds, forward and backward apart.
struct StepCompute {
  double seconds = 0, backward_s = 0;
  std::vector<KernelTime> kernels;
  std::vector<std::string> warnings;  // memory-bound kernels timed at the default rate
};
// Throws ConfigError when the calibration lacks a matrix product or an attention kernel of the plan's
// backend and dtype, or every memory-bound kernel.
StepCompute calibrated_compute(const Calibration& calibration, const PlanConfig& config,
                               const std::vector<KernelCall>& calls);

}  // namespace pb::plan
