// The analytic memory model behind /memory/predicted: bytes per category for one rank, written
// beside the code that allocates them (GptModel::forward_backward, the strategies) so that the two
// can be checked against each other. docs/memory-model.md derives every term.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "common/memory.h"
#include "common/options.h"

namespace pb {

struct MemoryEstimate {
  std::array<int64_t, kNumMemCategories> bytes{};
  int64_t peak_total = 0;
  int64_t& operator[](MemCategory c) { return bytes[static_cast<int>(c)]; }
  int64_t operator[](MemCategory c) const { return bytes[static_cast<int>(c)]; }
};

// What the backend keeps for attention (its own formula: probabilities on the CPU).
struct AttentionFootprint {
  std::size_t saved_floats = 0;    // per block, kept from forward to backward
  std::size_t scratch_floats = 0;  // backward scratch
};

// The unsharded fp32 model trained with the micro-batch of `options`, whole on this rank:
// parameters, gradients and AdamW states of all P parameters, the activations one micro-batch keeps
// at the end of its forward, and the backward scratch. comm_buffers is the strategy's to add.
MemoryEstimate predict_replicated_model_memory(const Options& options, const AttentionFootprint& attention);

}  // namespace pb
