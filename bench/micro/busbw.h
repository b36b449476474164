// nccl-tests' bus-bandwidth convention (its PERFORMANCE.md), the one place parabench-micro reports it and
// the planner times collectives with it: busbw = algbw · factor, what each rank's link carries, so that
// figures compare across ops and group sizes. all_reduce moves 2(n−1)/n of the buffer over each link;
// all_gather, reduce_scatter and all_to_all (n−1)/n; broadcast and a send_recv (each direction at once)
// the whole message.
#pragma once

#include <stdexcept>
#include <string>

namespace pb {

inline double busbw_factor(const std::string& op, int n) {
  if (op == "all_reduce") return 2.0 * (n - 1) / n;
  if (op == "all_gather" || op == "reduce_scatter" || op == "all_to_all") return static_cast<double>(n - 1) / n;
  if (op == "broadcast" || op == "send_recv") return 1.0;
  throw std::invalid_argument("busbw_factor: no collective " + op);
}

}  // namespace pb
