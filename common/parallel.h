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
#include <cstdint>
#include <vector>

#include "common/communicator.h"
#include "common/groups.h"
#include "kernels/dtype.h"

namespace pb {

struct TensorParallel {
  Communicator* comm = nullptr;  // the tp group; null when tp = 1
  int size = 1;
  int rank = 0;
  bool sequence_parallel = false;

  bool active() const { return size > 1; }

  // f, backward: the input gradient of a column-parallel layer is the sum of every rank's part.
  void copy_to_tp_backward(TensorPtr dx, std::size_t n) const {
    if (active()) comm->all_reduce(dx, n);
  }
  // g, forward: the output of a row-parallel layer is the sum of every rank's part.
  void reduce_from_tp(TensorPtr y, std::size_t n) const {
    if (active()) comm->all_reduce(y, n);
  }
  // Sequence parallelism: rows of (B·S, h) split in tp contiguous blocks of shard_rows.
  // full (tp · shard_elems) = every rank's shard, in rank order.
  void gather_from_sp(ConstTensorPtr shard, TensorPtr full, std::size_t shard_elems) const {
    comm->all_gather(shard, full, shard_elems);
  }
  // shard (shard_elems) = this rank's block of Σ_ranks full.
  void scatter_to_sp(ConstTensorPtr full, TensorPtr shard, std::size_t shard_elems) const {
    comm->reduce_scatter(full, shard, shard_elems);
  }
};

// Expert parallelism (GShard, Lepikhin et al. 2020): the experts of every MoE layer are shared out
// over the ep group, E / ep whole experts per rank, and tokens travel to their experts' ranks and back
// by all-to-all. With ep = 1 every rank holds every expert and nothing travels.
struct ExpertParallel {
  Communicator* comm = nullptr;       // the ep group: ep consecutive data-parallel ranks; null when ep = 1
  Communicator* expert_dp = nullptr;  // the ranks that hold this rank's experts (dp / ep); null when ep = 1
  int size = 1;
  int rank = 0;

  bool active() const { return size > 1; }
};

// Context parallelism: every sequence split over the cp group by position, S / cp tokens per rank, as
// contiguous chunks: one per rank (contiguous), or two, chunks i and 2·cp − 1 − i of 2·cp (zigzag,
// which balances the causal attention's work). Its attention core (bench/cp) exchanges keys and values.
struct ContextParallel {
  Communicator* comm = nullptr;  // the cp group; null when cp = 1
  int size = 1;
  int rank = 0;
  bool zigzag = false;

  struct Chunk {
    int first = 0, length = 0;  // global positions first .. first + length − 1
  };
  bool active() const { return size > 1; }
  // The chunks of positions rank `r` holds of a sequence of `seq` tokens, in the order it holds them.
  std::vector<Chunk> chunks(int seq, int r) const {
    if (size == 1) return {{0, seq}};
    if (!zigzag) return {{r * (seq / size), seq / size}};
    const int c = seq / (2 * size);
    return {{r * c, c}, {(2 * size - 1 - r) * c, c}};
  }
  std::vector<Chunk> chunks(int seq) const { return chunks(seq, rank); }
  // This rank's tokens' global positions, in the order it holds them.
  std::vector<int32_t> positions(int seq, int r) const {
    std::vector<int32_t> out;
    for (const Chunk& c : chunks(seq, r)) {
      for (int i = 0; i < c.length; ++i) out.push_back(c.first + i);
    }
    return out;
  }
  // This rank's part of b sequences of `seq` values (b · seq in, b · seq / size out, in the order of
  // positions()): what the model takes of a micro-batch's tokens and targets. Identity at size 1.
  void select_local(const int32_t* full, int32_t* local, int b, int seq) const {
    const std::vector<int32_t> mine = positions(seq, rank);
    for (int s = 0; s < b; ++s) {
      for (std::size_t i = 0; i < mine.size(); ++i) local[s * mine.size() + i] = full[s * seq + mine[i]];
    }
  }
};

// Every model-parallel context of one rank, built once by the harness from the layout and its process
// groups, and passed to the model and the strategy: tensor (and sequence) parallelism, expert and
// context parallelism.
struct ModelParallel {
  TensorParallel tp;
  ExpertParallel ep;
  ContextParallel cp;
};

ModelParallel make_model_parallel(ProcessGroups& groups);

}  // namespace pb
