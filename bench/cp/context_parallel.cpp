#include "bench/cp/context_parallel.h"

#include <algorithm>

namespace pb {

ContextParallelStrategy::ContextParallelStrategy(Runtime& runtime, ContextAttention* attention)
    : rt_(runtime), attention_(attention), state_(runtime.model, runtime.backend, runtime.options.seed, runtime.precision.grads) {
  data_ranks_ = make_data_ranks(runtime.groups);  // dp × cp: the whole world of this app
}

double ContextParallelStrategy::reduce_loss(double local_loss) {
  // Each cp rank's loss covers its tokens; the harness then sums over dp.
  if (rt_.mp.cp.active()) rt_.mp.cp.comm->all_reduce_host(&local_loss, 1, HostReduce::sum);
  return local_loss;
}

void ContextParallelStrategy::finish_gradients() {
  if (data_ranks_->size() > 1) data_ranks_->all_reduce(state_.grads(), state_.size());
}

void ContextParallelStrategy::zero_grads() {
  take_step_time();  // the previous step has ended with a wait: its spans are complete
  state_.zero_grads();
}

void ContextParallelStrategy::optimizer_step(float grad_scale, int t) {
  state_.adamw(grad_scale, t, rt_.options.lr);
  step_finished_ = true;  // its attention time is read after the step's wait
}

void ContextParallelStrategy::take_step_time() {
  if (attention_ == nullptr) return;
  const double t = attention_->take_time_s();  // a step that did not finish (stopped) is forgotten
  if (step_finished_) times_.push_back(t);
  step_finished_ = false;
}

std::vector<float> ContextParallelStrategy::gather_full_gradients() {
  return download_fp32(rt_.backend, state_.grads(), state_.size());  // every rank holds it whole, summed
}

void ContextParallelStrategy::write_results(Communicator& world, ResultWriter* writer) {
  if (attention_ == nullptr) return;
  take_step_time();  // the last step's
  // Every rank finished the same steps: one gather of [ranks][steps], stored as [steps, ranks].
  const int ranks = world.size();
  const std::size_t steps = times_.size();
  std::vector<double> by_rank(steps * ranks);
  if (steps > 0) world.all_gather_host(times_.data(), by_rank.data(), steps * sizeof(double));
  all_times_.assign(steps * ranks, 0.0);
  for (int r = 0; r < ranks; ++r) {
    for (std::size_t s = 0; s < steps; ++s) all_times_[s * ranks + r] = by_rank[r * steps + s];
  }
  if (writer == nullptr) return;
  writer->write_f64("/cp/attention_time_s", all_times_, "s", {static_cast<int64_t>(steps), ranks});
}

void ContextParallelStrategy::summary_attributes(nlohmann::ordered_json& summary) {
  if (attention_ == nullptr || all_times_.empty()) return;
  // The load balance of the causal attention: the slowest rank's attention time over the fastest's,
  // summed over the measured steps (after warm-up; all steps if there are no more).
  const int ranks = rt_.options.world_size;
  const std::size_t steps = all_times_.size() / ranks;
  const std::size_t first = steps > static_cast<std::size_t>(rt_.options.warmup) ? rt_.options.warmup : 0;
  std::vector<double> total(ranks, 0.0);
  for (std::size_t s = first; s < steps; ++s) {
    for (int r = 0; r < ranks; ++r) total[r] += all_times_[s * ranks + r];
  }
  const auto [lo, hi] = std::minmax_element(total.begin(), total.end());
  summary["cp_attention_time_ratio"] = *lo > 0.0 ? *hi / *lo : 0.0;
}

}  // namespace pb
