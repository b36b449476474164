#include "common/memory.h"

#include <algorithm>
#include <stdexcept>

namespace pb {

const char* mem_category_name(MemCategory c) {
  switch (c) {
    case MemCategory::parameters: return "parameters";
    case MemCategory::master_parameters: return "master_parameters";
    case MemCategory::gradients: return "gradients";
    case MemCategory::optimizer_states: return "optimizer_states";
    case MemCategory::activations: return "activations";
    case MemCategory::comm_buffers: return "comm_buffers";
    case MemCategory::workspace: return "workspace";
  }
  return "unknown";
}

std::array<MemCategory, kNumMemCategories> all_mem_categories() {
  return {MemCategory::parameters,  MemCategory::master_parameters, MemCategory::gradients,
          MemCategory::optimizer_states, MemCategory::activations, MemCategory::comm_buffers,
          MemCategory::workspace};
}

const char* memory_mark_name(MemoryMark m) {
  switch (m) {
    case MemoryMark::step_begin: return "step_begin";
    case MemoryMark::forward_begin: return "forward_begin";
    case MemoryMark::forward_end: return "forward_end";
    case MemoryMark::backward_begin: return "backward_begin";
    case MemoryMark::backward_end: return "backward_end";
    case MemoryMark::optimizer_begin: return "optimizer_begin";
    case MemoryMark::step_end: return "step_end";
  }
  return "unknown";
}

void MemoryTracker::on_alloc(MemCategory c, std::size_t bytes, const void* ptr) {
  const int i = static_cast<int>(c);
  current_[i] += static_cast<int64_t>(bytes);
  current_total_ += static_cast<int64_t>(bytes);
  snap_.peak[i] = std::max(snap_.peak[i], current_[i]);
  snap_.peak_total = std::max(snap_.peak_total, current_total_);
  if (observer_ != nullptr) observer_->on_alloc(ptr, c, bytes);
}

void MemoryTracker::on_free(MemCategory c, std::size_t bytes, const void* ptr) {
  const int i = static_cast<int>(c);
  if (current_[i] < static_cast<int64_t>(bytes)) {
    throw std::logic_error(std::string("memory tracker: freeing more ") + mem_category_name(c) +
                           " bytes than were allocated");
  }
  current_[i] -= static_cast<int64_t>(bytes);
  current_total_ -= static_cast<int64_t>(bytes);
  if (observer_ != nullptr) observer_->on_free(ptr, c, bytes);
}

}  // namespace pb
