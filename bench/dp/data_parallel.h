// Data parallelism with bucketed, overlapped gradient all-reduce (PyTorch DDP; Li et al. 2020,
// "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").
//
// Every rank holds the whole model and trains on its own samples. The flat gradient buffer is cut
// into buckets of about --bucket-mb, from the end of the model backwards (the order in which
// backward completes them). A bucket is all-reduced with a non-blocking collective as soon as
// every unit it covers has its gradient, so communication overlaps the rest of the backward pass.
// Buckets are views of the gradient buffer: no copies, no extra memory. With gradient accumulation
// only the last micro-batch communicates.
#pragma once

#include <cstddef>
#include <vector>

#include "common/runner.h"

namespace pb {

struct DataParallelOptions {
  double bucket_mb = 25.0;
  bool overlap = true;
};

class DataParallel final : public Strategy {
 public:
  DataParallel(Runtime& runtime, const DataParallelOptions& options);

  // The buckets as [first, first + count) ranges of the flat gradient buffer, last unit first.
  struct Bucket {
    std::size_t first = 0, count = 0;
  };
  static std::vector<Bucket> make_buckets(const std::vector<UnitInfo>& units, std::size_t bucket_elems);
  const std::vector<Bucket>& buckets() const { return buckets_; }

  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }
  void zero_grads() override { state_.zero_grads(); }
  void begin_micro_batch(int micro, bool last) override;
  void grad_ready(int unit) override;
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override;
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;

 private:
  void launch_ready_buckets(std::size_t ready_from);

  Runtime& rt_;
  ReplicatedState state_;
  Communicator& dp_comm_;
  DataParallelOptions options_;
  std::vector<Bucket> buckets_;
  struct InFlight {
    Request request;
    std::size_t bucket;
    double launched_s;
    bool traced = false;
  };
  void trace_completed(InFlight& f);
  std::vector<InFlight> in_flight_;
  std::size_t next_bucket_ = 0;  // buckets launched so far this step (in order)
  bool sync_this_micro_batch_ = false;
};

// parabench-dp: its options (kept by the definition), their rules, its layout, a rank's memory and the
// strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_dp_app();

}  // namespace pb
