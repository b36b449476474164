// parabench-plan --search: which layout of a model fits these GPUs, and which is fastest?
//
// Every layout of parabench-hybrid for the base plan's model, ranks, global batch, precision and GPU:
// tp (powers of 2 up to a node, dividing heads, key/value heads, FFN and vocabulary; sequence parallelism
// on whenever tp > 1), cp (1 to 32, ring, zigzag), pp (any degree up to the layers with tp · cp · pp
// dividing the ranks; 1F1B, and interleaved with 2 or 4 virtual stages where the app takes it), dp the rest;
// the sharding over the data ranks (NO_SHARD, ZERO1, SHARD_GRAD_OP, FULL_SHARD, and HYBRID_SHARD over the
// data ranks of a node), recomputation (none, selective, full) and the micro-batch (1, 2, 4, 8). Each is
// checked by the hybrid app's own rules (what it would refuse is skipped), planned by evaluate() (the
// app's memory per stage, the composed step time) and kept when its largest peak fits --gpu-memory. With a
// --calibration the step times are the measured rates' (cp 1 only: context parallelism is not timed from
// one yet); a layout the calibration cannot time (a collective it did not measure) is counted apart.
// Ranked by predicted step time: with the ranks and the global batch fixed, the same order as tokens/s
// per GPU.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench/plan/plan.h"

namespace pb::plan {

struct SearchResult {
  std::vector<PlanResult> ranked;  // the layouts that fit, fastest first
  int64_t candidates = 0;          // layouts enumerated
  int64_t accepted = 0;            // of them, the ones the hybrid app accepts
  int64_t unplanned = 0;           // of those, the ones a --calibration cannot time (the first one's reason)
  std::string unplanned_reason;
  double seconds = 0;              // wall time of the search
};

// base: a resolved --app hybrid plan at degree 1 everywhere (model, ranks, global batch, precision, GPU,
// --gpu-memory; calibration none), whose micro-batch and recompute are searched too.
SearchResult search_layouts(const PlanConfig& base);

}  // namespace pb::plan
