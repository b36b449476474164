#include "common/errors.h"

#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

namespace pb {
namespace {
std::function<void(const std::string&)>& abort_hook() {
  static std::function<void(const std::string&)> hook;
  return hook;
}
}  // namespace

void set_abort_hook(std::function<void(const std::string&)> hook) { abort_hook() = std::move(hook); }

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, length);
}

void abort_job(ExitCode code, const char* file, int line, const std::string& call,
               const std::string& message) {
  int rank = -1, size = 1, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  char host[256] = "unknown";
  gethostname(host, sizeof(host) - 1);
  std::fprintf(stderr, "parabench: [rank %d on %s] %s:%d: %s failed: %s\n", rank, host, file, line,
               call.c_str(), message.c_str());
  std::fflush(stderr);
  // Taken before it runs, so that a failure inside the hook does not run it again.
  const std::function<void(const std::string&)> hook = std::move(abort_hook());
  abort_hook() = nullptr;
  if (hook) hook(call + " failed: " + message);
  // Alone in the job there is nobody to stop, and the process's own exit status reaches the launcher
  // as it is: MPICH's Hydra (4.0) sometimes reports an MPI_Abort of a one-rank job as exit 1.
  if (initialized && size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

// Why the limit: UCX's TCP transport (MPICH ch4:ucx over Ethernet, UCX 1.13) hangs MPI_Finalize in
// about half of the 4-rank jobs of the test cluster, one rank waiting to close a connection whose peer already waits in the PMI barrier and no
// longer progresses it (openucx/ucx#8738).
void finalize_mpi_within_time_limit(const std::string& program, int exit_code) {
  double limit = 60.0;
  if (const char* text = std::getenv("PARABENCH_FINALIZE_TIMEOUT_S")) {
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    if (end != text && *end == '\0' && value >= 0.0) limit = value;  // NaN fails the comparison
  }
  std::fflush(nullptr);  // what stdio still holds, before anything can end the process
  if (limit == 0.0 || limit > 1e6) {
    MPI_Finalize();
    return;
  }
  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
  std::thread guard([&] {
    std::unique_lock<std::mutex> lock(mutex);
    const auto wait = std::chrono::milliseconds(static_cast<int64_t>(limit * 1000.0));
    if (finished.wait_for(lock, wait, [&] { return done; })) return;
    std::fprintf(stderr,
                 "%s: warning: MPI_Finalize has not returned after %g s (an MPI transport that cannot "
                 "close its connections, e.g. UCX over TCP: openucx/ucx#8738); exiting with the run's code %d, "
                 "its outputs complete\n",
                 program.c_str(), limit, exit_code);
    std::fflush(stderr);
    std::_Exit(exit_code);
  });
  MPI_Finalize();
  {
    std::lock_guard<std::mutex> lock(mutex);
    done = true;
  }
  finished.notify_one();
  guard.join();
}

}  // namespace pb
