// The model-parallel operators that layers call (ARCHITECTURE.md seam 4), named after Megatron-LM's
// (Shoeybi et al. 2019; Korthikanti et al. 2022). With tp = 1 every one is the identity, so the
// single-rank model runs the same code.
//
//   f  copy_to_tp          forward: identity            backward: all-reduce over tp
//   g  reduce_from_tp      forward: all-reduce over tp  backward: identity
//      gather_from_sp      forward: all-gather rows     backward: reduce-scatter rows
//      scatter_to_sp       forward: reduce-scatter rows backward: all-gather rows
// The layer calls the half it needs (forward or backward) at the place the operator stands.
#pragma once

#include <cstddef>

#include "common/communicator.h"

namespace pb {

struct TensorParallel {
  Communicator* comm = nullptr;  // the tp group; null when tp = 1
  int size = 1;
  int rank = 0;
  bool sequence_parallel = false;

  bool active() const { return size > 1; }

  // f, backward: the input gradient of a column-parallel layer is the sum of every rank's part.
  void copy_to_tp_backward(float* dx, std::size_t n) const {
    if (active()) comm->all_reduce(dx, n);
  }
  // g, forward: the output of a row-parallel layer is the sum of every rank's part.
  void reduce_from_tp(float* y, std::size_t n) const {
    if (active()) comm->all_reduce(y, n);
  }
  // Sequence parallelism: rows of (B·S, h) split in tp contiguous blocks of shard_rows.
  // full (tp · shard_elems) = every rank's shard, in rank order.
  void gather_from_sp(const float* shard, float* full, std::size_t shard_elems) const {
    comm->all_gather(shard, full, shard_elems);
  }
  // shard (shard_elems) = this rank's block of Σ_ranks full.
  void scatter_to_sp(const float* full, float* shard, std::size_t shard_elems) const {
    comm->reduce_scatter(full, shard, shard_elems);
  }
};

}  // namespace pb
