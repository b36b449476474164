#include "kernels/block_cache.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace pb {

BlockCache::BlockCache(std::size_t alignment, Allocate allocate, Release release)
    : alignment_(alignment), allocate_(std::move(allocate)), release_(std::move(release)) {}

BlockCache::~BlockCache() { release_cached(); }

void* BlockCache::alloc(std::size_t bytes, MemCategory category) {
  const std::size_t rounded = std::max(alignment_, (bytes + alignment_ - 1) / alignment_ * alignment_);
  void* ptr = nullptr;
  auto hit = cache_.find(rounded);
  if (hit != cache_.end()) {
    ptr = hit->second;
    cache_.erase(hit);
  } else {
    ptr = allocate_(rounded);
  }
  live_[ptr] = Block{bytes, rounded, category};
  tracker_.on_alloc(category, bytes, ptr);
  return ptr;
}

void BlockCache::free(void* ptr) {
  if (ptr == nullptr) return;
  auto it = live_.find(ptr);
  if (it == live_.end()) throw std::logic_error("free of a pointer the backend did not allocate");
  tracker_.on_free(it->second.category, it->second.bytes, ptr);
  cache_.emplace(it->second.rounded, ptr);
  live_.erase(it);
}

void BlockCache::release_cached() {
  for (auto& [size, ptr] : cache_) release_(ptr);
  cache_.clear();
}

void BlockCache::release_live() {
  for (auto& [ptr, block] : live_) release_(ptr);
  live_.clear();
}

}  // namespace pb
