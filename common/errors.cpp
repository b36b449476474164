#include "common/errors.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>

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
  int rank = -1, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char host[256] = "unknown";
  gethostname(host, sizeof(host) - 1);
  std::fprintf(stderr, "parabench: [rank %d on %s] %s:%d: %s failed: %s\n", rank, host, file, line,
               call.c_str(), message.c_str());
  std::fflush(stderr);
  // Taken before it runs, so that a failure inside the hook does not run it again.
  const std::function<void(const std::string&)> hook = std::move(abort_hook());
  abort_hook() = nullptr;
  if (hook) hook(call + " failed: " + message);
  if (initialized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace pb
