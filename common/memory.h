// Memory tracker: current and peak bytes per category (SPEC section 6) and the peak of their sum.
// Backends call `on_alloc` / `on_free` for every allocation, so the result file's
// /memory/measured means the same thing on every backend.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pb {

enum class MemCategory : int {
  parameters = 0,
  master_parameters,
  gradients,
  optimizer_states,
  activations,
  comm_buffers,
  workspace,
};
inline constexpr int kNumMemCategories = 7;

const char* mem_category_name(MemCategory c);
// All categories in schema order, for loops.
std::array<MemCategory, kNumMemCategories> all_mem_categories();

struct MemorySnapshot {
  std::array<int64_t, kNumMemCategories> peak{};  // peak bytes per category
  int64_t peak_total = 0;                        // peak of the sum at any instant
};

class MemoryTracker {
 public:
  void on_alloc(MemCategory c, std::size_t bytes);
  void on_free(MemCategory c, std::size_t bytes);

  int64_t current(MemCategory c) const { return current_[static_cast<int>(c)]; }
  int64_t current_total() const { return current_total_; }
  MemorySnapshot snapshot() const { return snap_; }

 private:
  std::array<int64_t, kNumMemCategories> current_{};
  int64_t current_total_ = 0;
  MemorySnapshot snap_;
};

}  // namespace pb
