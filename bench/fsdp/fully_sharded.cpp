#include "bench/fsdp/fully_sharded.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/timer.h"

namespace pb {

FullyShardedDataParallel::FullyShardedDataParallel(Runtime& runtime, const FsdpOptions& options, std::vector<int> held,
                                                   Communicator* data_group)
    : rt_(runtime), be_(runtime.backend), options_(options),
      data_group_(data_group != nullptr ? *data_group : *runtime.groups.dp) {
  Communicator& dp = data_group_;
  shard_group_ = &dp;
  if (options_.shard == ShardStrategy::hybrid_shard) {
    // Shard groups of consecutive dp ranks; the ranks holding the same shard form a replica group.
    const int g = options_.shard_group;
    shard_group_ = rt_.groups.adopt(dp.split(dp.rank() / g, dp.rank() % g), "shard");
    replicate_group_ = rt_.groups.adopt(dp.split(dp.rank() % g, dp.rank() / g), "replicate");
  }
  // NO_SHARD is the degenerate layout: one "shard" per unit, the whole unit.
  const bool no_shard = options_.shard == ShardStrategy::no_shard;
  shard_size_ = no_shard ? 1 : shard_group_->size();
  shard_rank_ = no_shard ? 0 : shard_group_->rank();

  const std::vector<UnitInfo>& units = rt_.model.units();
  held_.assign(units.size(), held.empty());
  for (int u : held) held_[u] = true;
  first_held_ = static_cast<int>(std::find(held_.begin(), held_.end(), true) - held_.begin());
  last_held_ = static_cast<int>(held_.rend() - std::find(held_.rbegin(), held_.rend(), true)) - 1;
  for (std::size_t i = 0; i < units.size(); ++i) {
    const UnitInfo& u = units[i];
    UnitLayout l;
    l.numel = held_[i] ? u.numel : 0;
    l.shard = static_cast<std::size_t>(shard_elements(static_cast<int64_t>(l.numel), shard_size_));
    const std::size_t begin = std::min(l.numel, shard_rank_ * l.shard);
    l.valid = std::min(l.numel, begin + l.shard) - begin;
    l.full_offset = full_total_;
    l.shard_offset = shard_total_;
    full_total_ += l.shard * shard_size_;
    shard_total_ += l.shard;
    layout_.push_back(l);
  }

  // Persistent state, by strategy (see the header).
  const std::size_t param_elems = params_sharded() ? shard_total_ : full_total_;
  const std::size_t grad_elems = grads_sharded() ? shard_total_ : full_total_;
  params_ = be_.alloc_tensor(param_elems, rt_.model.dtype(), MemCategory::parameters);
  // Mixed precision: fp32 master weights, sharded as the optimizer states (ZeRO-1 and up).
  if (rt_.precision.master_weights()) master_ = be_.alloc_floats(shard_total_, MemCategory::master_parameters);
  grads_ = be_.alloc_tensor(grad_elems, rt_.precision.grads, MemCategory::gradients);
  adam_m_ = be_.alloc_floats(shard_total_, MemCategory::optimizer_states);
  adam_v_ = be_.alloc_floats(shard_total_, MemCategory::optimizer_states);
  be_.zero(params_.data(), param_elems * dtype_bytes(params_.dtype()));  // padding stays zero
  zero_grads();
  for (float* p : {master_, adam_m_, adam_v_}) {
    if (p != nullptr) be_.zero(p, shard_total_ * sizeof(float));
  }
  for (std::size_t u = 0; u < layout_.size(); ++u) {
    // SPEC 2.1: every value from its global index, so a shard initialises itself.
    const UnitLayout& l = layout_[u];
    if (!held_[u]) continue;
    if (master_ != nullptr) {  // this rank's shard of the master weights (the parameters: below, rounded)
      init_flat_range(be_, units, units[u].offset + shard_rank_ * l.shard, l.valid, master_ + l.shard_offset,
                      rt_.options.seed, rt_.options.model.layers);
    }
    if (params_sharded()) {
      init_flat_range(be_, units, units[u].offset + shard_rank_ * l.shard, l.valid, params_ + l.shard_offset,
                      rt_.options.seed, rt_.options.model.layers);
    } else {
      init_flat_range(be_, units, units[u].offset, l.numel, params_ + l.full_offset, rt_.options.seed,
                      rt_.options.model.layers);
    }
  }
  gathered_.assign(layout_.size(), nullptr);
  gathering_.resize(layout_.size());
  gather_issued_.resize(layout_.size());
  unit_grad_.assign(layout_.size(), nullptr);
}

FullyShardedDataParallel::~FullyShardedDataParallel() {
  for (std::size_t u = 0; u < layout_.size(); ++u) release(static_cast<int>(u));
  for (float* p : {adam_v_, adam_m_, master_}) be_.free(p);
  for (TensorPtr p : {grads_, params_}) be_.free(p);
}

bool FullyShardedDataParallel::params_sharded() const {
  return options_.shard == ShardStrategy::full_shard || options_.shard == ShardStrategy::hybrid_shard;
}

bool FullyShardedDataParallel::grads_sharded() const {
  return params_sharded() || options_.shard == ShardStrategy::shard_grad_op;
}

TensorPtr FullyShardedDataParallel::shard_params(int u) {
  const UnitLayout& l = layout_[u];
  return params_sharded() ? params_ + l.shard_offset : params_ + l.full_offset + shard_rank_ * l.shard;
}

float* FullyShardedDataParallel::shard_fp32_params(int u) {
  return master_ != nullptr ? master_ + layout_[u].shard_offset : shard_params(u).as<float>();
}

void FullyShardedDataParallel::all_gather_params(int u) {
  if (params_sharded() || options_.shard == ShardStrategy::no_shard) return;
  const UnitLayout& l = layout_[u];
  shard_group_->all_gather(shard_params(u), params_ + l.full_offset, l.shard);
}

TensorPtr FullyShardedDataParallel::shard_grads(int u) {
  const UnitLayout& l = layout_[u];
  return grads_sharded() ? grads_ + l.shard_offset : grads_ + l.full_offset + shard_rank_ * l.shard;
}

// ---- parameters: whole, or gathered around each use (FULL_SHARD) ------------------------------------

void FullyShardedDataParallel::gather(int u, bool async) {
  if (u < 0 || u >= static_cast<int>(layout_.size()) || !held_[u] || gathered_[u] != nullptr) return;
  const UnitLayout& l = layout_[u];
  const double issued_s = wall_time_s();
  gathered_[u] = be_.alloc_tensor(l.shard * shard_size_, params_.dtype(), MemCategory::comm_buffers);
  if (async) {
    gathering_[u] = shard_group_->all_gather_async(params_ + l.shard_offset, gathered_[u], l.shard);
    gather_issued_[u] = {issued_s, hook_};
  } else {
    shard_group_->all_gather(params_ + l.shard_offset, gathered_[u], l.shard);
    trace_gather(u, {issued_s, hook_}, /*prefetch=*/false);
  }
}

void FullyShardedDataParallel::trace_gather(int u, const GatherIssue& issue, bool prefetch) {
  // From the call to its completion; which hook issued it and whether ahead of its use (bench/fsdp/README.md,
  // "Order of the gathers").
  if (!rt_.trace.enabled()) return;
  rt_.trace.span(TraceTrack::communication, "all_gather unit " + std::to_string(u), issue.issued_s, wall_time_s(),
                 "{\"unit\": " + std::to_string(u) + ", \"prefetch\": " + (prefetch ? "true" : "false") +
                     ", \"issued_in\": \"" + issue.hook + "\"}");
}

void FullyShardedDataParallel::wait_gathered(int u) {
  gather(u, /*async=*/false);
  if (gathering_[u]) {
    gathering_[u]->wait();
    gathering_[u].reset();
    trace_gather(u, gather_issued_[u], /*prefetch=*/true);
  }
}

void FullyShardedDataParallel::release(int u) {
  if (gathering_[u]) {  // a prefetch never waited on (not on the apps' paths)
    gathering_[u]->wait();
    gathering_[u].reset();
    trace_gather(u, gather_issued_[u], /*prefetch=*/true);
  }
  be_.free(gathered_[u]);
  gathered_[u] = nullptr;
}

ConstTensorPtr FullyShardedDataParallel::unit_params(int u) {
  return params_sharded() ? gathered_[u] : params_ + layout_[u].full_offset;
}

void FullyShardedDataParallel::before_forward(int u) {
  if (!params_sharded()) return;
  if (rt_.trace.enabled()) hook_ = "before_forward " + std::to_string(u);  // for the trace's gather spans
  const int last = last_held_;
  wait_gathered(u);
  // Prefetch the next unit to be used: the next in forward or, after the last unit (which stays
  // gathered for its own backward), the first of backward; none when that is not held (the next
  // pipeline stage's).
  if (options_.prefetch) gather(u == last ? last - 1 : u + 1, /*async=*/true);
}

void FullyShardedDataParallel::after_forward(int u) {
  if (params_sharded() && u != last_held_) release(u);
}

void FullyShardedDataParallel::before_backward(int u) {
  if (params_sharded()) {
    if (rt_.trace.enabled()) hook_ = "before_backward " + std::to_string(u);  // for the trace's gather spans
    wait_gathered(u);
    if (options_.prefetch) gather(u - 1, /*async=*/true);
  }
  if (grads_sharded()) {
    // The unit's whole gradient exists only during its backward.
    const std::size_t whole = layout_[u].shard * shard_size_;
    unit_grad_[u] = be_.alloc_tensor(whole, grads_.dtype(), MemCategory::comm_buffers);
    be_.zero(unit_grad_[u].data(), whole * dtype_bytes(grads_.dtype()));
  }
}

void FullyShardedDataParallel::after_backward(int u) {
  if (params_sharded()) release(u);
}

// ---- gradients ---------------------------------------------------------------------------------------

TensorPtr FullyShardedDataParallel::unit_grads(int u) {
  return grads_sharded() ? unit_grad_[u] : grads_ + layout_[u].full_offset;
}

void FullyShardedDataParallel::zero_grads() {
  be_.zero(grads_.data(), (grads_sharded() ? shard_total_ : full_total_) * dtype_bytes(grads_.dtype()));
}

void FullyShardedDataParallel::reduce_scatter_into_shard(int u, ConstTensorPtr whole) {
  // shard += this rank's block of Σ_ranks whole (in the gradients' dtype)
  const UnitLayout& l = layout_[u];
  TensorPtr block = be_.alloc_tensor(l.shard, grads_.dtype(), MemCategory::comm_buffers);
  shard_group_->reduce_scatter(whole, block, l.shard);
  if (grads_sharded()) {
    be_.accumulate(shard_grads(u), block, l.shard);
  } else {
    be_.copy(shard_grads(u).data(), block.data(), l.shard * dtype_bytes(grads_.dtype()));  // ZERO1: in place
  }
  be_.free(block);
}

void FullyShardedDataParallel::grad_ready(int u) {
  switch (options_.shard) {
    case ShardStrategy::no_shard:
      if (last_micro_batch_) data_group_.all_reduce(grads_ + layout_[u].full_offset, layout_[u].numel);
      break;
    case ShardStrategy::zero1:
      // Gradients accumulate whole; the last micro-batch reduce-scatters them.
      if (last_micro_batch_) reduce_scatter_into_shard(u, grads_ + layout_[u].full_offset);
      break;
    default:
      // Every micro-batch reduce-scatters its unit gradient into the shard, then frees it.
      reduce_scatter_into_shard(u, unit_grad_[u]);
      be_.free(unit_grad_[u]);
      unit_grad_[u] = nullptr;
      break;
  }
}

template <typename Fn>
void FullyShardedDataParallel::for_each_shard_piece(Fn&& fn) const {
  const std::vector<UnitInfo>& units = rt_.model.units();
  for (std::size_t u = 0; u < layout_.size(); ++u) {
    const UnitLayout& l = layout_[u];
    if (l.valid == 0) continue;
    for_each_tensor_piece(units, units[u].offset + shard_rank_ * l.shard, l.valid,
                          [&](std::size_t at, std::size_t n, const TensorInfo& t, std::size_t) {
                            fn(static_cast<int>(u), at, n, t);
                          });
  }
}

void FullyShardedDataParallel::finish_gradients() {
  // Sequence parallelism: the LayerNorms' gradients of this rank's shards cover its tp rank's rows only;
  // sum their pieces over the tp group (the shards of a data rank are the same ranges on every tp rank).
  const TensorParallel& tp = rt_.mp.tp;
  if (tp.active() && tp.sequence_parallel) {
    for_each_shard_piece([&](int u, std::size_t at, std::size_t n, const TensorInfo& t) {
      if (t.partial_under_sequence_parallel()) tp.comm->all_reduce(shard_grads(u) + at, n);
    });
  }
  // HYBRID_SHARD: the shard groups hold partial sums of the same shard; add them up.
  if (replicate_group_ != nullptr && replicate_group_->size() > 1) replicate_group_->all_reduce(grads_, shard_total_);
}

template <typename ShardOf>
double FullyShardedDataParallel::sum_squares(ShardOf shard_of) {
  // Over this rank's shards (padding is zero), then over the shard group; one wait for all of them.
  enum { kWhole, kSliced };
  double sums[2] = {0.0, 0.0};
  std::vector<Backend::SquaresPiece> pieces;
  const TensorParallel& tp = rt_.mp.tp;
  if (!tp.active()) {
    for (std::size_t u = 0; u < layout_.size(); ++u) {
      pieces.push_back({shard_of(static_cast<int>(u)), layout_[u].shard, kWhole});
    }
    be_.sum_squares(sums, 1, pieces);
  } else {
    // A shard is a range of the unit's flat elements: its pieces of sliced tensors are summed over the tp
    // group too, those of whole tensors (the same on every tp rank) only once.
    for_each_shard_piece([&](int u, std::size_t at, std::size_t n, const TensorInfo& t) {
      pieces.push_back({shard_of(u) + at, n, t.split == TpSplit::none ? kWhole : kSliced});
    });
    be_.sum_squares(sums, 2, pieces);
    tp.comm->all_reduce_host(&sums[kSliced], 1, HostReduce::sum);
  }
  double sum = sums[kWhole] + sums[kSliced];
  if (options_.shard != ShardStrategy::no_shard) shard_group_->all_reduce_host(&sum, 1, HostReduce::sum);
  return sum;
}

double FullyShardedDataParallel::global_grad_sum_squares() {
  return sum_squares([&](int u) { return ConstTensorPtr(shard_grads(u)); });
}

double FullyShardedDataParallel::global_param_sum_squares() {
  return sum_squares([&](int u) { return static_cast<const float*>(shard_fp32_params(u)); });
}

// ---- optimizer ---------------------------------------------------------------------------------------

void FullyShardedDataParallel::optimizer_step(float grad_scale, int t) {
  const std::vector<UnitInfo>& units = rt_.model.units();
  for (std::size_t u = 0; u < layout_.size(); ++u) {
    const UnitLayout& l = layout_[u];
    const int ui = static_cast<int>(u);
    if (!held_[u]) continue;
    adamw_flat_range(be_, units, units[u].offset + shard_rank_ * l.shard, l.valid, shard_fp32_params(ui),
                     shard_grads(ui), adam_m_ + l.shard_offset, adam_v_ + l.shard_offset, grad_scale, t,
                     rt_.options.lr);
    if (master_ != nullptr) be_.convert(shard_params(ui), shard_fp32_params(ui), l.valid);  // the bf16 copy
    // ZERO1 and SHARD_GRAD_OP keep whole parameters: every rank's updated shard goes to every rank.
    all_gather_params(ui);
  }
}

std::vector<float> FullyShardedDataParallel::gather_full_gradients() {
  if (first_held_ != 0 || last_held_ != static_cast<int>(layout_.size()) - 1) {
    throw std::logic_error("--dump-gradients needs every unit on the rank");  // rejected by validation
  }
  std::vector<float> host(rt_.model.num_parameters());
  const std::vector<UnitInfo>& units = rt_.model.units();
  for (std::size_t u = 0; u < layout_.size(); ++u) {
    const UnitLayout& l = layout_[u];
    TensorPtr whole = be_.alloc_tensor(l.shard * shard_size_, grads_.dtype(), MemCategory::workspace);
    if (options_.shard == ShardStrategy::no_shard) {
      be_.copy(whole.data(), (grads_ + l.full_offset).data(), l.numel * dtype_bytes(grads_.dtype()));
    } else {
      shard_group_->all_gather(shard_grads(static_cast<int>(u)), whole, l.shard);
    }
    const std::vector<float> values = download_fp32(be_, whole, l.numel);
    std::copy(values.begin(), values.end(), host.begin() + static_cast<std::ptrdiff_t>(units[u].offset));
    be_.free(whole);
  }
  return host;
}

}  // namespace pb
