// The watchdog of the NCCL communicators (common/watchdog.h): the thread and the deadline rule, with a
// check that stands in for ncclCommGetAsyncError and the pending operations' events (the communicator
// itself needs a GPU: tests/gpu).
#include "common/watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pb {
namespace {

using Clock = std::chrono::steady_clock;

// What `fail` received, and a way to wait for it.
struct Failures {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::string> messages;
  void add(const std::string& m) {
    std::lock_guard<std::mutex> lock(mutex);
    messages.push_back(m);
    cv.notify_all();
  }
  bool wait_for_one(double seconds) {
    std::unique_lock<std::mutex> lock(mutex);
    return cv.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return !messages.empty(); });
  }
};

TEST(Watchdog, FailsOnceWithTheFirstMessage) {
  Failures failures;
  std::atomic<int> checks{0};
  {
    Watchdog dog(
        0.005, [&] { return ++checks >= 3 ? "NCCL failed: remote process exited (check " + std::to_string(checks) + ")" : ""; },
        [&](const std::string& m) { failures.add(m); });
    ASSERT_TRUE(failures.wait_for_one(10.0));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // it has stopped checking
    EXPECT_TRUE(dog.fired());
  }
  ASSERT_EQ(failures.messages.size(), 1u);
  EXPECT_EQ(failures.messages[0], "NCCL failed: remote process exited (check 3)");
  EXPECT_EQ(checks.load(), 3);
}

TEST(Watchdog, QuietChecksNeverFailAndTheDestructorStopsItPromptly) {
  Failures failures;
  std::atomic<int> checks{0};
  const auto start = Clock::now();
  {
    Watchdog dog(0.01, [&] { ++checks; return std::string(); }, [&](const std::string& m) { failures.add(m); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(dog.fired());
  }
  EXPECT_GE(checks.load(), 2);
  EXPECT_TRUE(failures.messages.empty());
  // A long period does not hold up the destructor: it wakes the thread.
  const auto before = Clock::now();
  { Watchdog dog(3600.0, [] { return std::string(); }, [](const std::string&) {}); }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - before).count(), 5.0);
  (void)start;
}

TEST(Watchdog, AThrowingCheckIsAFailure) {
  Failures failures;
  Watchdog dog(0.005, []() -> std::string { throw std::runtime_error("cudaEventQuery: invalid handle"); },
               [&](const std::string& m) { failures.add(m); });
  ASSERT_TRUE(failures.wait_for_one(10.0));
  EXPECT_EQ(failures.messages[0], "the watchdog's check failed: cudaEventQuery: invalid handle");
}

TEST(Watchdog, DeadlineMessage) {
  EXPECT_EQ(deadline_message("NCCL all_reduce of 4096 bytes", 100.0, 700.0, 600.0), "");  // at the deadline
  EXPECT_EQ(deadline_message("NCCL all_reduce of 4096 bytes", 100.0, 700.5, 600.0),
            "NCCL all_reduce of 4096 bytes did not finish within 600 s (--distributed-timeout-minutes 10)");
  EXPECT_EQ(deadline_message("NCCL send of 8 bytes", 0.0, 31.0, 30.0),
            "NCCL send of 8 bytes did not finish within 30 s (--distributed-timeout-minutes 0.5)");
}

}  // namespace
}  // namespace pb
