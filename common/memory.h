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

// Where a run is, for a MemoryObserver: the harness marks its steps and optimizer, the model each
// micro-batch's forward and backward (with pipelines, of one stage). Allocation lifetimes are read
// against these marks (analysis/memory_log.py checks each category against its definition).
enum class MemoryMark : int {
  step_begin = 0,
  forward_begin,
  forward_end,
  backward_begin,
  backward_end,
  optimizer_begin,
  step_end,
};
const char* memory_mark_name(MemoryMark m);

// Sees every allocation and free with its pointer, and the marks: --memory-log's recorder.
class MemoryObserver {
 public:
  virtual ~MemoryObserver() = default;
  virtual void on_alloc(const void* ptr, MemCategory c, std::size_t bytes) = 0;
  virtual void on_free(const void* ptr, MemCategory c, std::size_t bytes) = 0;
  virtual void on_mark(MemoryMark mark) = 0;
};

struct MemorySnapshot {
  std::array<int64_t, kNumMemCategories> peak{};  // peak bytes per category
  int64_t peak_total = 0;                        // peak of the sum at any instant
};

class MemoryTracker {
 public:
  // ptr: the block's address, for the observer only.
  void on_alloc(MemCategory c, std::size_t bytes, const void* ptr = nullptr);
  void on_free(MemCategory c, std::size_t bytes, const void* ptr = nullptr);
  // Null: none (the default; then an allocation costs no more than the counting).
  void set_observer(MemoryObserver* observer) { observer_ = observer; }
  void mark(MemoryMark m) {
    if (observer_ != nullptr) observer_->on_mark(m);
  }

  int64_t current(MemCategory c) const { return current_[static_cast<int>(c)]; }
  int64_t current_total() const { return current_total_; }
  MemorySnapshot snapshot() const { return snap_; }

 private:
  std::array<int64_t, kNumMemCategories> current_{};
  int64_t current_total_ = 0;
  MemorySnapshot snap_;
  MemoryObserver* observer_ = nullptr;
};

// Marks `begin` now and `end` when the scope is left (also by an exception).
class MemoryMarkScope {
 public:
  MemoryMarkScope(MemoryTracker& tracker, MemoryMark begin, MemoryMark end) : tracker_(tracker), end_(end) {
    tracker_.mark(begin);
  }
  ~MemoryMarkScope() { tracker_.mark(end_); }
  MemoryMarkScope(const MemoryMarkScope&) = delete;
  MemoryMarkScope& operator=(const MemoryMarkScope&) = delete;

 private:
  MemoryTracker& tracker_;
  MemoryMark end_;
};

}  // namespace pb
