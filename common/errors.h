// Exit codes of SPEC section 5 and the checks every library call goes through.
//
// A failed check prints rank, host, file:line, the call and the library's message, then aborts the
// whole job with the code of its class (MPI_Abort), so no rank is left waiting in a collective; a job
// of one rank just exits with the code.
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

namespace pb {

enum ExitCode : int {
  kExitComplete = 0,
  kExitConfig = 2,       // bad command line or configuration
  kExitRuntime = 3,      // MPI, CUDA, NCCL, HDF5, out of memory, I/O
  kExitNumerical = 4,    // NaN or Inf loss or gradient
  kExitHangup = 129,     // SIGHUP (128 + 1), as a shell reports it
  kExitInterrupt = 130,  // SIGINT (Ctrl-C)
  kExitInterrupted = 143 // SIGTERM (Slurm's time limit, scancel)
};

// A configuration error found by validation: the message names the option, the value and the rule.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failure after validation, with its exit code.
struct RunError : std::runtime_error {
  RunError(ExitCode code, const std::string& what) : std::runtime_error(what), code(code) {}
  ExitCode code;
};

// Prints "[rank R on HOST] file:line: call failed: message", runs the abort hook (once), and aborts
// the job with `code` (one rank: exits with it).
[[noreturn]] void abort_job(ExitCode code, const char* file, int line, const std::string& call,
                            const std::string& message);

// The last word of this process before abort_job ends the job: the runner of rank 0 marks its result
// file failed with the message. The one piece of process-wide state, as an abort handler must be.
void set_abort_hook(std::function<void(const std::string& message)> hook);

std::string mpi_error_string(int code);

// MPI_Finalize, bounded by PARABENCH_FINALIZE_TIMEOUT_S seconds (default 60; 0 or more than 10^6,
// inf included: unbounded; anything else that is not a number: the default). Called after everything
// the process reports is written and closed: one that cannot leave MPI_Finalize warns, naming
// `program`, and exits with `exit_code` instead of holding its allocation until the job's time limit.
void finalize_mpi_within_time_limit(const std::string& program, int exit_code);

}  // namespace pb

#define PB_MPI_CHECK(call)                                                                      \
  do {                                                                                          \
    const int pb_mpi_rc_ = (call);                                                              \
    if (pb_mpi_rc_ != 0 /* MPI_SUCCESS */)                                                      \
      ::pb::abort_job(::pb::kExitRuntime, __FILE__, __LINE__, #call, ::pb::mpi_error_string(pb_mpi_rc_)); \
  } while (0)
