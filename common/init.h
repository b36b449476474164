// The initialisation rule of SPEC section 2.1: every element a pure function of
// (seed, parameter name, global element index), so any slice of any layout computes its own values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pb {

uint64_t splitmix_mix(uint64_t z);
uint64_t fnv1a64(const std::string& name);
// u(seed, name, i) in [0, 1).
double spec_uniform(uint64_t seed, const std::string& name, uint64_t index);

// std of a named parameter per SPEC 2.1 (0 for biases and LayerNorm .b, which are zeros; LayerNorm .g
// is ones: see `init_kind`).
enum class InitKind { uniform, zeros, ones };
struct InitRule {
  InitKind kind;
  double std;
};
InitRule init_rule(const std::string& name, int num_layers);

// Fills `out` with elements [first, first + count) of the named tensor's flat (row-major, global)
// element sequence.
void init_values(float* out, uint64_t seed, const std::string& name, int num_layers, uint64_t first,
                 std::size_t count);

// Fills out[k] with the element of global index indices[k] of the named tensor.
void init_values_at(float* out, uint64_t seed, const std::string& name, int num_layers, const uint64_t* indices,
                    std::size_t count);

}  // namespace pb
