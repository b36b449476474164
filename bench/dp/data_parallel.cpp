#include "bench/dp/data_parallel.h"

#include <algorithm>
#include <cmath>

#include "common/timer.h"

namespace pb {

DataParallel::DataParallel(Runtime& runtime, const DataParallelOptions& options)
    : rt_(runtime), state_(runtime.model, runtime.backend, runtime.options.seed, runtime.precision.grads),
      dp_comm_(*runtime.groups.dp), options_(options) {
  // --bucket-mb of gradients in their dtype
  const double grad_bytes = static_cast<double>(dtype_bytes(runtime.precision.grads));
  const auto bucket_elems = static_cast<std::size_t>(std::max(1.0, options.bucket_mb * 1024.0 * 1024.0 / grad_bytes));
  buckets_ = make_buckets(rt_.model.units(), bucket_elems);
}

std::vector<DataParallel::Bucket> DataParallel::make_buckets(const std::vector<UnitInfo>& units,
                                                             std::size_t bucket_elems) {
  // Walk the units in backward order, closing a bucket once it holds at least bucket_elems; a unit
  // is never split, so a bucket is ready exactly when its lowest unit is.
  std::vector<Bucket> buckets;
  Bucket current;
  for (auto u = units.rbegin(); u != units.rend(); ++u) {
    current.first = u->offset;
    current.count += u->numel;
    if (current.count >= bucket_elems) {
      buckets.push_back(current);
      current = Bucket{};
    }
  }
  if (current.count > 0) buckets.push_back(current);
  return buckets;
}

void DataParallel::begin_micro_batch(int /*micro*/, bool last) {
  sync_this_micro_batch_ = last;
  next_bucket_ = 0;
}

void DataParallel::launch_ready_buckets(std::size_t ready_from) {
  // Gradients [ready_from, end) are final: launch every bucket inside that range, in order.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].first >= ready_from) {
    const Bucket& b = buckets_[next_bucket_];
    in_flight_.push_back({dp_comm_.all_reduce_async(state_.grads() + b.first, b.count), next_bucket_, wall_time_s()});
    ++next_bucket_;
  }
}

void DataParallel::trace_completed(InFlight& f) {
  // The span ends when this rank first saw the bucket complete.
  if (f.traced) return;
  f.traced = true;
  const Bucket& b = buckets_[f.bucket];
  rt_.trace.span(TraceTrack::communication, "all_reduce bucket " + std::to_string(f.bucket), f.launched_s, wall_time_s(),
                 "{\"bytes\": " + std::to_string(b.count * dtype_bytes(state_.grads().dtype())) + "}");
}

void DataParallel::grad_ready(int unit) {
  if (!sync_this_micro_batch_ || !options_.overlap) return;
  launch_ready_buckets(rt_.model.units()[unit].offset);
  // MPI progresses a non-blocking collective only inside MPI calls: poke the ones in flight.
  for (InFlight& f : in_flight_) {
    if (f.request->test()) trace_completed(f);
  }
}

void DataParallel::finish_gradients() {
  if (options_.overlap) {
    launch_ready_buckets(0);  // normally none left: the embedding's grad_ready launched the last
  } else {
    for (std::size_t i = 0; i < buckets_.size(); ++i) {
      const double t0 = wall_time_s();
      dp_comm_.all_reduce(state_.grads() + buckets_[i].first, buckets_[i].count);
      InFlight done{nullptr, i, t0};
      trace_completed(done);
    }
  }
  for (InFlight& f : in_flight_) {
    f.request->wait();
    trace_completed(f);
  }
  in_flight_.clear();
}

double DataParallel::global_grad_sum_squares() {
  // Every rank holds the same, fully reduced gradient.
  return rt_.backend.sum_squares(state_.grads(), rt_.model.num_parameters());
}

void DataParallel::optimizer_step(float grad_scale, int t) {
  state_.adamw(grad_scale, t, rt_.options.lr);
}

std::vector<float> DataParallel::gather_full_gradients() {
  return download_fp32(rt_.backend, state_.grads(), rt_.model.num_parameters());  // every rank holds it reduced
}

double DataParallel::global_param_sum_squares() {
  return rt_.backend.sum_squares(state_.master(), rt_.model.num_parameters());
}

}  // namespace pb
