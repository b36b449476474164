// The allocator both backends hand out memory through: a cache of freed blocks by rounded size over a
// raw allocator (aligned_alloc, cudaMalloc). The same shapes come back every step, so after the first
// step nothing reaches the raw allocator. Every live block is reported to the tracker under its
// category; cached blocks are not (the tracker counts what the model holds).
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <unordered_map>

#include "common/memory.h"

namespace pb {

class BlockCache {
 public:
  using Allocate = std::function<void*(std::size_t bytes)>;  // throws when out of memory
  using Release = std::function<void(void* ptr)>;

  BlockCache(std::size_t alignment, Allocate allocate, Release release);
  ~BlockCache();  // releases the cached blocks; live ones are their owners'
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  void* alloc(std::size_t bytes, MemCategory category);
  void free(void* ptr);  // null is ignored; a pointer this cache did not hand out is a logic error
  void release_cached();  // gives every cached block back to the raw allocator
  void release_live();    // ... and every live one (a backend's teardown)
  MemoryTracker& tracker() { return tracker_; }

 private:
  struct Block {
    std::size_t bytes;
    std::size_t rounded;
    MemCategory category;
  };
  std::size_t alignment_;
  Allocate allocate_;
  Release release_;
  MemoryTracker tracker_;
  std::unordered_map<void*, Block> live_;
  std::multimap<std::size_t, void*> cache_;
};

}  // namespace pb
