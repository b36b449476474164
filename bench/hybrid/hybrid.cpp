#include "bench/hybrid/hybrid.h"

namespace pb {

HybridStrategy::HybridStrategy(Runtime& runtime, const HybridOptions& o, MoeMlp* moe) : rt_(runtime) {
  ProcessGroups& groups = runtime.groups;
  // The ranks that hold the same parameters: dp, or dp × cp.
  Communicator* data_ranks = o.cp.cp > 1 ? make_data_ranks(groups) : groups.dp.get();
  std::vector<int> held;  // empty: every unit
  if (o.pp.stages > 1) {
    pipeline_ = std::make_unique<PipelineSchedule>(runtime, o.pp);
    held = pipeline_held_units(runtime.options.model.layers, o.pp, groups.coord.pp);
  }
  if (moe != nullptr) {  // validation: cp 1, NO_SHARD
    state_ = std::make_unique<ExpertParallelStrategy>(runtime, *moe, held);
  } else if (o.shard.fsdp.shard != ShardStrategy::no_shard) {
    state_ = std::make_unique<FullyShardedDataParallel>(runtime, o.shard.fsdp, held, data_ranks);
  } else {
    state_ = std::make_unique<TensorParallelStrategy>(runtime, held, data_ranks);
  }
}

void HybridStrategy::before_forward(int unit) {
  if (pipeline_) pipeline_->progress();
  state_->before_forward(unit);
}

void HybridStrategy::before_backward(int unit) {
  if (pipeline_) pipeline_->progress();
  state_->before_backward(unit);
}

void HybridStrategy::run_micro_batches(Runtime& runtime, const StepBatches& batches) {
  if (pipeline_) {
    pipeline_->run(runtime, batches, *this);
  } else {
    Strategy::run_micro_batches(runtime, batches);
  }
}

double HybridStrategy::reduce_loss(double local_loss) {
  // Each cp rank's loss covers its tokens, and only the last stage computes one; the harness then sums
  // over dp.
  if (rt_.mp.cp.active()) rt_.mp.cp.comm->all_reduce_host(&local_loss, 1, HostReduce::sum);
  return over_stages(local_loss);
}

void HybridStrategy::write_results(Communicator& world, ResultWriter* writer) {
  if (pipeline_) pipeline_->write_results(world, writer);
  state_->write_results(world, writer);
}

}  // namespace pb
