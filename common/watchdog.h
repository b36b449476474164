// A watchdog thread: it calls `check` every `period` seconds until it is destroyed; the first time
// `check` returns a message (non-empty), it calls `fail` with it once and stops checking.
//
// The NCCL communicators use one each (common/device_communicators.cpp), as PyTorch's ProcessGroupNCCL
// does: a collective that fails on a peer or never completes makes the host wait forever in a stream
// synchronisation, which no code on the host's own thread can interrupt; the watchdog sees the error
// (ncclCommGetAsyncError) or the deadline pass, aborts the communicator (its kernels end, the stream
// drains) and marks the device failed, so the next wait ends the run with exit 3.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace pb {

class Watchdog {
 public:
  Watchdog(double period_s, std::function<std::string()> check, std::function<void(const std::string&)> fail);
  ~Watchdog();  // stops and joins the thread (within one period)
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  bool fired() const;  // `fail` has been called

 private:
  void run();

  const double period_s_;
  const std::function<std::string()> check_;
  const std::function<void(const std::string&)> fail_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  bool fired_ = false;
  std::thread thread_;  // last: started once the rest is set
};

// The deadline of the oldest unfinished operation: a message naming `what` when `now_s` is more than
// `timeout_s` past `enqueued_s`, else empty.
std::string deadline_message(const std::string& what, double enqueued_s, double now_s, double timeout_s);

}  // namespace pb
