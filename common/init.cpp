#include "common/init.h"

#include <cmath>

namespace pb {

uint64_t splitmix_mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t fnv1a64(const std::string& name) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

namespace {
// u() with the per-tensor part hoisted: key = mix(seed ^ fnv1a64(name)).
inline double uniform_from_key(uint64_t key, uint64_t index) {
  return static_cast<double>(splitmix_mix(key + index) >> 11) * 0x1.0p-53;
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

double spec_uniform(uint64_t seed, const std::string& name, uint64_t index) {
  return uniform_from_key(splitmix_mix(seed ^ fnv1a64(name)), index);
}

InitRule init_rule(const std::string& name, int num_layers) {
  const double base = 0.02;
  const double residual = 0.02 / std::sqrt(2.0 * num_layers);
  if (ends_with(name, ".g")) return {InitKind::ones, 0.0};
  if (ends_with(name, ".b")) return {InitKind::zeros, 0.0};
  if (ends_with(name, "attn.out.w") || ends_with(name, "fc2.w") || ends_with(name, ".down.w")) {
    return {InitKind::uniform, residual};  // the projections into the residual stream (SPEC 2.1, 2.5)
  }
  return {InitKind::uniform, base};  // embed.tok, embed.pos, qkv.w, fc1.w, head.w, router.w
}

void init_values(float* out, uint64_t seed, const std::string& name, int num_layers, uint64_t first,
                 std::size_t count) {
  const InitRule rule = init_rule(name, num_layers);
  if (rule.kind != InitKind::uniform) {
    const float value = rule.kind == InitKind::ones ? 1.0f : 0.0f;
    for (std::size_t i = 0; i < count; ++i) out[i] = value;
    return;
  }
  const uint64_t key = splitmix_mix(seed ^ fnv1a64(name));
  const double amplitude = rule.std * std::sqrt(3.0);
  for (std::size_t i = 0; i < count; ++i) {
    const double u = uniform_from_key(key, first + i);
    out[i] = static_cast<float>(amplitude * (2.0 * u - 1.0));
  }
}

void init_values_at(float* out, uint64_t seed, const std::string& name, int num_layers, const uint64_t* indices,
                    std::size_t count) {
  const InitRule rule = init_rule(name, num_layers);
  if (rule.kind != InitKind::uniform) {
    init_values(out, seed, name, num_layers, 0, count);
    return;
  }
  const uint64_t key = splitmix_mix(seed ^ fnv1a64(name));
  const double amplitude = rule.std * std::sqrt(3.0);
  for (std::size_t i = 0; i < count; ++i) {
    out[i] = static_cast<float>(amplitude * (2.0 * uniform_from_key(key, indices[i]) - 1.0));
  }
}

}  // namespace pb
