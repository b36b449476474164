// A Chrome trace (the JSON "traceEvents" format that Perfetto and chrome://tracing open) with one
// process per rank and one track each for compute, communication and idle time.
#pragma once

#include <string>
#include <vector>

#include "common/communicator.h"

namespace pb {

enum class TraceTrack : int { compute = 0, communication = 1, idle = 2 };

class TraceRecorder {
 public:
  // Disabled recorders cost one branch per span.
  explicit TraceRecorder(bool enabled, double origin_s) : enabled_(enabled), origin_s_(origin_s) {}
  bool enabled() const { return enabled_; }
  // A span [start_s, end_s) in MPI_Wtime seconds; `args` is a JSON object text or empty.
  void span(TraceTrack track, const std::string& name, double start_s, double end_s, const std::string& args = "");
  // Collective over `world`: every rank's spans as the trace's JSON text on rank 0 (empty elsewhere),
  // for rank 0 to write to the --trace file it opened before the first step.
  std::string gather(Communicator& world, const std::vector<std::string>& hostnames) const;

 private:
  struct Span {
    TraceTrack track;
    std::string name, args;
    double start_s, end_s;
  };
  bool enabled_;
  double origin_s_;
  std::vector<Span> spans_;
};

}  // namespace pb
