// Pipeline schedules as the ordered list of forward and backward steps one stage runs.
//
//   naive        layer-wise model parallelism: one micro-batch at a time, through every stage and back
//   gpipe        all forwards, then all backwards (Huang et al. 2019)
//   1f1b         PipeDream-Flush (Narayanan et al. 2021): warm-up forwards, then one forward and one
//                backward alternately, then the remaining backwards
//   interleaved  1F1B over v model chunks per rank (Narayanan et al. 2021, Megatron-LM's
//                interleaved schedule); micro-batches go in groups of p through each chunk
#pragma once

#include <string>
#include <vector>

namespace pb {

struct PipelineStep {
  bool forward = true;
  int micro = 0;  // micro-batch
  int chunk = 0;  // model chunk of this rank (0 unless interleaved): virtual stage chunk·p + stage
};

// The steps of `stage` (0..stages-1) for `micro_batches` micro-batches and `chunks` model chunks
// per rank. Throws std::invalid_argument for an unknown schedule.
std::vector<PipelineStep> pipeline_schedule(const std::string& schedule, int stages, int stage, int micro_batches,
                                            int chunks);

// The idle share of a stage's step that the schedule implies with equal forward and backward times
// per micro-batch and stage: (p−1)/(m+p−1) for gpipe and 1f1b, divided by v when interleaved,
// (p−1)/p for naive.
double theoretical_bubble_fraction(const std::string& schedule, int stages, int micro_batches, int chunks);

}  // namespace pb
