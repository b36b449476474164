// Ranks and process groups of SPEC section 3: r = tp_i + tp·(cp_i + cp·(dp_i + dp·pp_i)).
// Tensor-parallel peers are consecutive ranks; pipeline stages are farthest apart. Expert
// parallelism subdivides each data-parallel group into groups of ep consecutive dp ranks.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/communicator.h"

namespace pb {

struct Layout {
  int pp = 1, dp = 1, cp = 1, tp = 1;
  int ep = 1;  // expert-parallel degree: divides dp; adds no ranks
  bool sequence_parallel = false;  // tp > 1: LayerNorm and residual activations split along the sequence
  bool cp_zigzag = false;          // cp > 1: each rank holds chunks i and 2·cp − 1 − i of 2·cp (else chunk i of cp)

  struct Coord {
    int pp = 0, dp = 0, cp = 0, tp = 0;
  };
  int world_size() const { return pp * dp * cp * tp; }
  Coord coord(int rank) const;
  int rank_of(const Coord& c) const;
  std::string describe() const;  // "pp 1 × dp 4 × cp 1 × tp 1"
};

// The communicators of one rank: each contains the ranks that differ only in that coordinate.
struct ProcessGroups {
  Layout layout;
  Layout::Coord coord;
  Communicator* world = nullptr;  // not owned
  std::unique_ptr<Communicator> tp, cp, dp, pp;
  // ep > 1: the ep consecutive dp ranks that share out the experts, and the dp / ep ranks that hold
  // the same experts (expert_dp, the same position in every ep group); null otherwise.
  std::unique_ptr<Communicator> ep, expert_dp;
  // Further communicators a strategy splits off (FSDP's shard and replica groups); owned here so
  // that their calls, bytes and time are reported with the rest.
  // `name` says what the group is in /comm_groups (SPEC 6): "dp_cp" (the ranks of one tp and pp position),
  // "shard", "replicate".
  std::vector<std::unique_ptr<Communicator>> extra;
  std::vector<std::string> extra_names;
  Communicator* adopt(std::unique_ptr<Communicator> comm, const std::string& name) {
    extra.push_back(std::move(comm));
    extra_names.push_back(name);
    return extra.back().get();
  }
  // Every communicator of this rank with its name (world, tp, cp, dp, pp, ep, expert_dp, then the
  // adopted ones), for accounting; the same list on every rank.
  std::vector<std::pair<std::string, const Communicator*>> named() const;
  std::vector<const Communicator*> all() const;
};

ProcessGroups make_process_groups(Communicator& world, const Layout& layout);

}  // namespace pb
