// --memory-log DIR (project addition): each rank writes DIR/rank<r>.tsv, the history of its memory in
// the order it happened: every allocation and free with its address, category and bytes, the marks of
// the steps, micro-batches and optimizer, and every tensor buffer handed to a communicator. Like
// PyTorch's memory snapshots, it answers what held memory when; analysis/memory_log.py reads it and
// checks each allocation's category against its lifetime (SPEC section 6's definitions).
//
// File format: '#' lines first (the run), then one tab-separated event per line:
//   alloc  <address>  <category>  <bytes>
//   free   <address>  <category>  <bytes>
//   mark   <name>                                  (memory_mark_name)
//   use    <address>  <op>:<role>  <bytes>          (role: buf, send or recv)
// Addresses are hexadecimal; a block freed and allocated again may come back at the same address.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "common/communicator.h"
#include "common/memory.h"

namespace pb {

class MemoryLog final : public MemoryObserver {
 public:
  // Creates `dir` if missing and opens dir/rank<rank>.tsv; throws std::runtime_error naming the path.
  MemoryLog(const std::string& dir, int rank, int world_size, const std::string& header);
  ~MemoryLog() override;
  MemoryLog(const MemoryLog&) = delete;
  MemoryLog& operator=(const MemoryLog&) = delete;

  // Observes `tracker` from now until this log is destroyed (whichever of the two goes first: the
  // backend that owns the tracker must outlive the log or be observed no longer).
  void observe(MemoryTracker& tracker);

  void on_alloc(const void* ptr, MemCategory c, std::size_t bytes) override;
  void on_free(const void* ptr, MemCategory c, std::size_t bytes) override;
  void on_mark(MemoryMark mark) override;
  // A communicator call's buffer (null ones are not logged).
  void on_use(const void* ptr, std::size_t bytes, CommOp op, const char* role);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  MemoryTracker* observed_ = nullptr;
};

// The communicator `inner` with every tensor buffer of its calls logged to `log` before the call,
// and its sub-communicators (split) likewise. Counts and times are inner's.
std::unique_ptr<Communicator> logging_communicator(Communicator& inner, MemoryLog& log);

}  // namespace pb
