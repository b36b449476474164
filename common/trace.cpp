#include "common/trace.h"

#include <algorithm>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "common/errors.h"

namespace pb {
namespace {
const char* track_name(TraceTrack t) {
  switch (t) {
    case TraceTrack::compute: return "compute";
    case TraceTrack::communication: return "communication";
    case TraceTrack::idle: return "idle";
  }
  return "other";
}
}  // namespace

void TraceRecorder::span(TraceTrack track, const std::string& name, double start_s, double end_s,
                         const std::string& args) {
  if (enabled_) spans_.push_back(Span{track, name, args, start_s, end_s});
}

std::string TraceRecorder::gather(Communicator& world, const std::vector<std::string>& hostnames) const {
  // This rank's events as JSON text, gathered to every rank padded to the longest.
  nlohmann::json events = nlohmann::json::array();
  const int rank = world.rank();
  for (const Span& s : spans_) {
    nlohmann::json e = {{"name", s.name},
                        {"cat", track_name(s.track)},
                        {"ph", "X"},
                        {"pid", rank},
                        {"tid", static_cast<int>(s.track)},
                        {"ts", (s.start_s - origin_s_) * 1e6},
                        {"dur", (s.end_s - s.start_s) * 1e6}};
    if (!s.args.empty()) e["args"] = nlohmann::json::parse(s.args);
    events.push_back(e);
  }
  const std::string mine = events.dump();
  double length = static_cast<double>(mine.size());
  world.all_reduce_host(&length, 1, HostReduce::max);
  const std::size_t width = static_cast<std::size_t>(length) + 1;
  std::string padded = mine;
  padded.resize(width, '\0');
  std::vector<char> all(width * world.size());
  world.all_gather_host(padded.data(), all.data(), width);
  if (rank != 0) return "";

  nlohmann::json trace;
  trace["displayTimeUnit"] = "ms";
  nlohmann::json& out = trace["traceEvents"];
  out = nlohmann::json::array();
  for (int r = 0; r < world.size(); ++r) {
    const std::string label = "rank " + std::to_string(r) + (r < static_cast<int>(hostnames.size()) ? " (" + hostnames[r] + ")" : "");
    out.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", r}, {"args", {{"name", label}}}});
    out.push_back({{"name", "process_sort_index"}, {"ph", "M"}, {"pid", r}, {"args", {{"sort_index", r}}}});
    for (TraceTrack t : {TraceTrack::compute, TraceTrack::communication, TraceTrack::idle}) {
      out.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", r}, {"tid", static_cast<int>(t)},
                     {"args", {{"name", track_name(t)}}}});
    }
    const char* text = all.data() + width * r;
    for (auto& e : nlohmann::json::parse(text)) out.push_back(std::move(e));
  }
  return trace.dump() + "\n";
}

}  // namespace pb
