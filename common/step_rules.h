// The arithmetic of SPEC 2.3 that a step's loss curve cannot see: which samples a data-parallel rank
// trains on, and by how much clipping scales the gradients. Each is a function of its own, so that
// tests/unit/test_step_rules.cpp checks it against the spec's formula at its edges; the runner
// (common/runner.cpp) calls these and nothing else for them.
#pragma once

#include <cstdint>

namespace pb {

// The first sample of the micro-batch that data-parallel rank `dp_rank` (of dp) trains in micro-step
// `micro` of step `step`; the micro-batch is that sample and the next micro_batch − 1. SPEC 2.3: sample
// k of a step (0 ≤ k < G = dp · micro_batch · grad_accum) goes to rank (k / micro_batch) mod dp in
// micro-step k / (micro_batch · dp), so the ranks' micro-batches interleave: round-robin, not rank-major.
inline uint64_t first_sample(uint64_t step, uint64_t global_batch, int micro, int micro_batch, int dp, int dp_rank) {
  return step * global_batch + static_cast<uint64_t>(micro) * micro_batch * dp +
         static_cast<uint64_t>(dp_rank) * micro_batch;
}

// The factor clipping multiplies every gradient by, as torch.nn.utils.clip_grad_norm_: clip / (norm + 1e-6)
// when clipping is on (clip > 0) and the norm exceeds it, else exactly 1.
inline float clip_scale(double norm, double clip) {
  return clip > 0.0 && norm > clip ? static_cast<float>(clip / (norm + 1e-6)) : 1.0f;
}

}  // namespace pb
