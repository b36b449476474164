#include "common/watchdog.h"

#include <chrono>
#include <cstdio>
#include <utility>

namespace pb {

Watchdog::Watchdog(double period_s, std::function<std::string()> check, std::function<void(const std::string&)> fail)
    : period_s_(period_s), check_(std::move(check)), fail_(std::move(fail)), thread_([this] { run(); }) {}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

bool Watchdog::fired() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fired_;
}

void Watchdog::run() {
  const auto period = std::chrono::duration<double>(period_s_);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (wake_.wait_for(lock, period, [this] { return stop_; })) break;
    lock.unlock();
    std::string message;
    try {
      message = check_();
    } catch (const std::exception& e) {
      message = std::string("the watchdog's check failed: ") + e.what();
    }
    lock.lock();
    if (!message.empty() && !stop_) {
      fired_ = true;
      lock.unlock();
      fail_(message);
      return;
    }
  }
}

std::string deadline_message(const std::string& what, double enqueued_s, double now_s, double timeout_s) {
  if (now_s - enqueued_s <= timeout_s) return "";
  char text[160];
  std::snprintf(text, sizeof(text), " did not finish within %.0f s (--distributed-timeout-minutes %g)", timeout_s,
                timeout_s / 60.0);
  return what + text;
}

}  // namespace pb
