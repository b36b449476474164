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

void MemoryTracker::on_alloc(MemCategory c, std::size_t bytes) {
  const int i = static_cast<int>(c);
  current_[i] += static_cast<int64_t>(bytes);
  current_total_ += static_cast<int64_t>(bytes);
  snap_.peak[i] = std::max(snap_.peak[i], current_[i]);
  snap_.peak_total = std::max(snap_.peak_total, current_total_);
}

void MemoryTracker::on_free(MemCategory c, std::size_t bytes) {
  const int i = static_cast<int>(c);
  if (current_[i] < static_cast<int64_t>(bytes)) {
    throw std::logic_error(std::string("memory tracker: freeing more ") + mem_category_name(c) +
                           " bytes than were allocated");
  }
  current_[i] -= static_cast<int64_t>(bytes);
  current_total_ -= static_cast<int64_t>(bytes);
}

}  // namespace pb
