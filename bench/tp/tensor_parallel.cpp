#include "bench/tp/tensor_parallel.h"

#include <stdexcept>
#include <utility>
#include <vector>

namespace pb {
TensorParallelStrategy::TensorParallelStrategy(Runtime& runtime, std::vector<int> held, Communicator* data_group)
    : rt_(runtime),
      state_(runtime.model, runtime.backend, runtime.options.seed, runtime.precision.grads, std::move(held)),
      tp_(runtime.mp.tp), data_group_(data_group != nullptr ? *data_group : *runtime.groups.dp) {}

void TensorParallelStrategy::finish_gradients() {
  // Sequence parallelism: each rank's LayerNorm gradients cover its rows only; sum them.
  if (tp_.active() && tp_.sequence_parallel) {
    state_.for_each_tensor([&](const TensorInfo& t, std::size_t at) {
      if (t.partial_under_sequence_parallel()) tp_.comm->all_reduce(state_.grads() + at, t.numel());
    });
  }
  // Data parallelism: the ranks with the same slices (the dp group, or dp × cp) sum their gradients.
  if (data_group_.size() > 1) data_group_.all_reduce(state_.grads(), state_.size());
}

double TensorParallelStrategy::sum_squares_over_slices(ConstTensorPtr base) {
  enum { kWhole, kSliced };
  std::vector<Backend::SquaresPiece> pieces;
  state_.for_each_tensor([&](const TensorInfo& t, std::size_t at) {
    pieces.push_back({base + at, t.numel(), t.split == TpSplit::none ? kWhole : kSliced});
  });
  double sums[2];
  rt_.backend.sum_squares(sums, 2, pieces);
  if (tp_.active()) tp_.comm->all_reduce_host(&sums[kSliced], 1, HostReduce::sum);
  return sums[kSliced] + sums[kWhole];
}

double TensorParallelStrategy::global_grad_sum_squares() { return sum_squares_over_slices(state_.grads()); }

double TensorParallelStrategy::global_param_sum_squares() { return sum_squares_over_slices(state_.master()); }

std::vector<float> TensorParallelStrategy::gather_full_gradients() {
  if (tp_.active()) throw std::logic_error("--dump-gradients needs --tp 1");  // rejected by validation
  return download_fp32(rt_.backend, state_.grads(), state_.size());
}

}  // namespace pb
