#include "bench/pp/schedule.h"

#include <algorithm>
#include <stdexcept>

namespace pb {

std::vector<PipelineStep> pipeline_schedule(const std::string& schedule, int p, int s, int m, int v) {
  std::vector<PipelineStep> steps;
  auto F = [&](int micro, int chunk = 0) { steps.push_back({true, micro, chunk}); };
  auto B = [&](int micro, int chunk = 0) { steps.push_back({false, micro, chunk}); };
  if (schedule == "naive") {
    for (int i = 0; i < m; ++i) {
      F(i);
      B(i);
    }
  } else if (schedule == "gpipe") {
    for (int i = 0; i < m; ++i) F(i);
    for (int i = 0; i < m; ++i) B(i);
  } else if (schedule == "1f1b") {
    // Stage s starts p − s − 1 micro-batches ahead, so that the last stage alternates at once.
    const int warmup = std::min(p - s - 1, m);
    for (int i = 0; i < warmup; ++i) F(i);
    for (int i = 0; i < m - warmup; ++i) {
      F(warmup + i);
      B(i);
    }
    for (int i = m - warmup; i < m; ++i) B(i);
  } else if (schedule == "interleaved") {
    // Megatron-LM: the k-th forward of a rank is micro-batch (k / (p·v))·p + k mod p on chunk
    // (k / p) mod v; backwards take the chunks in reverse. Needs m divisible by p.
    const int total = m * v;
    auto micro_of = [&](int k) { return (k / (p * v)) * p + k % p; };
    auto forward_chunk = [&](int k) { return (k / p) % v; };
    auto backward_chunk = [&](int k) { return v - 1 - (k / p) % v; };
    const int warmup = std::min((p - s - 1) * 2 + (v - 1) * p, total);
    for (int k = 0; k < warmup; ++k) F(micro_of(k), forward_chunk(k));
    for (int k = 0; k < total - warmup; ++k) {
      F(micro_of(warmup + k), forward_chunk(warmup + k));
      B(micro_of(k), backward_chunk(k));
    }
    for (int k = total - warmup; k < total; ++k) B(micro_of(k), backward_chunk(k));
  } else {
    throw std::invalid_argument("unknown pipeline schedule " + schedule);
  }
  return steps;
}

double theoretical_bubble_fraction(const std::string& schedule, int p, int m, int v) {
  if (schedule == "naive") return (p - 1.0) / p;
  const double bubble = (p - 1.0) / (m + p - 1.0);
  return schedule == "interleaved" ? bubble / v : bubble;
}

}  // namespace pb
