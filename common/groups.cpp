#include "common/groups.h"

#include <stdexcept>

#include "common/parallel.h"

namespace pb {

Layout::Coord Layout::coord(int rank) const {
  Coord c;
  c.tp = rank % tp;
  rank /= tp;
  c.cp = rank % cp;
  rank /= cp;
  c.dp = rank % dp;
  c.pp = rank / dp;
  return c;
}

int Layout::rank_of(const Coord& c) const { return c.tp + tp * (c.cp + cp * (c.dp + dp * c.pp)); }

std::string Layout::describe() const {
  return "pp " + std::to_string(pp) + " × dp " + std::to_string(dp) + " × cp " + std::to_string(cp) +
         " × tp " + std::to_string(tp) + (ep > 1 ? " (ep " + std::to_string(ep) + " within dp)" : "");
}

std::vector<std::pair<std::string, const Communicator*>> ProcessGroups::named() const {
  std::vector<std::pair<std::string, const Communicator*>> out = {
      {"world", world}, {"tp", tp.get()}, {"cp", cp.get()}, {"dp", dp.get()}, {"pp", pp.get()}};
  if (ep) out.emplace_back("ep", ep.get());
  if (expert_dp) out.emplace_back("expert_dp", expert_dp.get());
  for (std::size_t i = 0; i < extra.size(); ++i) out.emplace_back(extra_names[i], extra[i].get());
  return out;
}

std::vector<const Communicator*> ProcessGroups::all() const {
  std::vector<const Communicator*> out;
  for (const auto& [name, comm] : named()) out.push_back(comm);
  return out;
}

ProcessGroups make_process_groups(Communicator& world, const Layout& layout) {
  if (layout.world_size() != world.size()) {
    throw std::logic_error("layout " + layout.describe() + " does not cover " + std::to_string(world.size()) +
                           " ranks");
  }
  ProcessGroups g;
  g.layout = layout;
  g.world = &world;
  g.coord = layout.coord(world.rank());
  const Layout::Coord c = g.coord;
  // Color: the rank with this coordinate zeroed; key: the coordinate itself.
  auto color_without = [&](Layout::Coord k, int Layout::Coord::*field) {
    k.*field = 0;
    return layout.rank_of(k);
  };
  g.tp = world.split(color_without(c, &Layout::Coord::tp), c.tp);
  g.cp = world.split(color_without(c, &Layout::Coord::cp), c.cp);
  g.dp = world.split(color_without(c, &Layout::Coord::dp), c.dp);
  g.pp = world.split(color_without(c, &Layout::Coord::pp), c.pp);
  if (layout.ep > 1) {
    if (layout.dp % layout.ep != 0) {
      throw std::logic_error("ep " + std::to_string(layout.ep) + " does not divide dp " + std::to_string(layout.dp));
    }
    // Split the dp group: ep groups of consecutive dp ranks, and across them the holders of the same experts.
    g.ep = g.dp->split(c.dp / layout.ep, c.dp % layout.ep);
    g.expert_dp = g.dp->split(c.dp % layout.ep, c.dp / layout.ep);
  }
  return g;
}

ModelParallel make_model_parallel(ProcessGroups& groups) {
  ModelParallel mp;
  if (groups.layout.tp > 1) {
    mp.tp.comm = groups.tp.get();
    mp.tp.size = groups.tp->size();
    mp.tp.rank = groups.tp->rank();
    mp.tp.sequence_parallel = groups.layout.sequence_parallel;
  }
  if (groups.layout.cp > 1) {
    mp.cp.comm = groups.cp.get();
    mp.cp.size = groups.cp->size();
    mp.cp.rank = groups.cp->rank();
    mp.cp.zigzag = groups.layout.cp_zigzag;
  }
  if (groups.ep) {
    mp.ep.comm = groups.ep.get();
    mp.ep.expert_dp = groups.expert_dp.get();
    mp.ep.size = groups.ep->size();
    mp.ep.rank = groups.ep->rank();
  }
  return mp;
}

}  // namespace pb
