// The one clock of step times and trace spans: monotonic seconds.
#pragma once

#include <chrono>

namespace pb {

inline double wall_time_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace pb
