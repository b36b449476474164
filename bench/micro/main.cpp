// parabench-micro: Google Benchmark timings of the Backend's kernels, on every backend of this build
// (see README.md). Its own option is --threads; every other flag is Google Benchmark's.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench/micro/backends.h"
#include "bench/micro/gemm.h"
#include "common/errors.h"
#include "kernels/cpu/cpu_backend.h"

namespace {

constexpr const char* kThreadsOption = "--threads";

void print_help() {
  std::printf(
      "parabench-micro: times the Backend's kernels (gemm/<backend>/<dtype>/<shape>) with Google Benchmark.\n"
      "  %s N   compute threads of the CPU backend (default: omp_get_max_threads(), i.e. OMP_NUM_THREADS\n"
      "                or the cores)\n"
      "Google Benchmark's flags:\n",
      kThreadsOption);
  benchmark::PrintDefaultHelp();
}

// Takes "--threads N" or "--threads=N" out of argv (before Google Benchmark sees it). Returns false
// with the message in *error when the value is not an integer of at least 1.
bool take_threads_option(int* argc, char** argv, int* threads, std::string* error) {
  const std::size_t prefix = std::strlen(kThreadsOption);
  int kept = 1;
  for (int i = 1; i < *argc; ++i) {
    const char* arg = argv[i];
    const char* value = nullptr;
    if (std::strcmp(arg, kThreadsOption) == 0) {
      if (i + 1 == *argc) {
        *error = std::string(kThreadsOption) + " needs a value: the number of compute threads (at least 1)";
        return false;
      }
      value = argv[++i];
    } else if (std::strncmp(arg, kThreadsOption, prefix) == 0 && arg[prefix] == '=') {
      value = arg + prefix + 1;
    } else {
      argv[kept++] = argv[i];
      continue;
    }
    char* end = nullptr;
    const long parsed = std::strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0' || parsed < 1 || parsed > 1 << 16) {
      *error = std::string(kThreadsOption) + " " + value + " must be an integer from 1 to 65536";
      return false;
    }
    *threads = static_cast<int>(parsed);
  }
  *argc = kept;
  argv[kept] = nullptr;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = omp_get_max_threads();
  std::string error;
  if (!take_threads_option(&argc, argv, &threads, &error)) {
    std::fprintf(stderr, "parabench-micro: %s\n", error.c_str());
    return pb::kExitConfig;
  }
  benchmark::Initialize(&argc, argv, print_help);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return pb::kExitConfig;

  std::vector<pb::MicroBackend> backends = pb::make_micro_backends(threads);
  const std::string cuda = pb::add_cuda_backends(&backends);
  benchmark::AddCustomContext("threads", std::to_string(threads));
  benchmark::AddCustomContext("cpu", pb::cpu_model_name());
  benchmark::AddCustomContext("cuda", cuda);

  int failed_checks = 0;
  pb::register_gemm_benchmarks(backends, &failed_checks);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (failed_checks > 0) {
    std::fprintf(stderr, "parabench-micro: %d benchmark run(s) failed (see their error above)\n", failed_checks);
    return pb::kExitRuntime;
  }
  return pb::kExitComplete;
}
