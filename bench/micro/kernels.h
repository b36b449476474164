// The Backend's kernels other than the matrix product, timed at the shapes a model preset's step runs
// them: attention forward and backward, LayerNorm forward and backward, GELU forward and backward,
// softmax cross-entropy, AdamW over a parameter buffer (README.md gives each FLOP and byte formula).
#pragma once

#include <vector>

#include "bench/micro/backends.h"

namespace pb {

// Registers kernel/<backend>/<dtype>/<kernel>/<preset>/<dims> for every backend, and its MicroEntry
// (table "kernels"). Same lifetime and failure rules as register_gemm_benchmarks.
void register_kernel_benchmarks(std::vector<MicroBackend>& backends, int* failed_checks);

}  // namespace pb
