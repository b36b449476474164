// parabench-micro: Google Benchmark timings of the Backend's kernels and the Communicator's collectives,
// on every backend of this build and every rank of the job (see README.md). Rank 0 reports: Google
// Benchmark's console, the nccl-tests-like table of the collectives, and one HDF5 result file
// (SPEC 6, /micro). Its own options come first (print_help); every other flag is Google Benchmark's.
//
// Exit codes: 0 every benchmark ran and checked; 2 a bad command line, or a filter that matches no
// benchmark; 3 a benchmark failed its check (wrong data, out of memory) or the result file failed.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench/micro/backends.h"
#include "bench/micro/collectives.h"
#include "bench/micro/gemm.h"
#include "bench/micro/kernels.h"
#include "bench/micro/report.h"
#include "common/errors.h"
#include "common/metadata.h"
#include "common/mpi_communicator.h"
#include "common/results.h"
#include "kernels/cpu/cpu_backend.h"

namespace {

struct MicroOptions {
  int threads = 1;
  std::string cpu_gemm;        // the CPU backend's fp32 products: onednn or openblas (default: this build's first)
  std::string ops = "all";
  std::string min_bytes = "8", max_bytes = "1G";
  std::string comm = "auto";   // auto: nccl where this build has it and every rank sees a GPU, else mpi
  std::string dtype = "fp32";  // the collectives' buffers
  std::string out = "results/";
  std::string cluster, tag;
  bool overwrite = false;
  pb::CollectiveRequest request;  // resolved from ops, min_bytes, max_bytes
};

// "8", "64K", "1M", "1G" (powers of 1024, as nccl-tests' -b and -e) into bytes; false when not that.
bool parse_size(const std::string& text, int64_t* bytes) {
  if (text.empty()) return false;
  std::size_t end = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &end);
  } catch (const std::exception&) {
    return false;
  }
  int shift = 0;
  const std::string suffix = text.substr(end);
  if (suffix == "K" || suffix == "k") shift = 10;
  else if (suffix == "M" || suffix == "m") shift = 20;
  else if (suffix == "G" || suffix == "g") shift = 30;
  else if (!suffix.empty()) return false;
  if (value < 1 || value > (int64_t{1} << 40) >> shift) return false;
  *bytes = static_cast<int64_t>(value) << shift;
  return true;
}

// Resolves ops and the size range into o->request. Returns the error message, or "".
std::string resolve_request(MicroOptions* o) {
  const std::vector<std::string>& known = pb::collective_op_names();
  std::vector<std::string> ops;
  if (o->ops == "all") {
    ops = known;
  } else if (o->ops != "none") {
    std::stringstream list(o->ops);
    for (std::string op; std::getline(list, op, ',');) {
      bool found = false;
      for (const std::string& k : known) found = found || k == op;
      if (!found) {
        std::string names;
        for (const std::string& k : known) names += (names.empty() ? "" : ", ") + k;
        return "--ops: unknown collective '" + op + "' (known: " + names + ", or all, or none)";
      }
      ops.push_back(op);
    }
  }
  int64_t min_bytes = 0, max_bytes = 0;
  if (!parse_size(o->min_bytes, &min_bytes)) {
    return "--min-bytes " + o->min_bytes + " must be a size of at least 1 byte (e.g. 8, 64K, 1M, 1G)";
  }
  if (!parse_size(o->max_bytes, &max_bytes)) {
    return "--max-bytes " + o->max_bytes + " must be a size of at least 1 byte (e.g. 8, 64K, 1M, 1G)";
  }
  if (max_bytes < min_bytes) {
    return "--max-bytes " + o->max_bytes + " is below --min-bytes " + o->min_bytes + ": an empty size range";
  }
  o->request.ops = ops;
  o->request.dtype = o->dtype == "bf16" ? pb::DType::bf16 : pb::DType::f32;
  o->request.min_bytes = min_bytes;
  o->request.max_bytes = max_bytes;
  return "";
}

// parabench-micro's own options out of argv; Google Benchmark's stay for benchmark::Initialize.
// Returns -1 to go on, else the exit code (0 after --help).
int parse_micro_options(int* argc, char** argv, bool lead, MicroOptions* o) {
  CLI::App cli{"parabench-micro: the Backend's kernels and the Communicator's collectives, timed with Google "
               "Benchmark (its flags, --benchmark_filter=REGEX and friends, pass through; --help lists both)"};
  cli.allow_extras();
  cli.set_help_flag();  // --help goes to Google Benchmark's handler too, after ours
  bool help = false;
  cli.add_flag("-h,--help", help, "this help, then Google Benchmark's flags");
  cli.add_option("--threads", o->threads, "compute threads of the CPU backend (default: the node's cores over its ranks, as the apps)")
      ->check(CLI::Range(1, 1 << 16));
  cli.add_option("--cpu-gemm", o->cpu_gemm, "onednn | openblas: the CPU backend's fp32 matrix products, as the apps' "
                 "--cpu-gemm (default: onednn where built with it)")
      ->check(CLI::IsMember(pb::cpu::sgemm_libraries()));
  cli.add_option("--ops", o->ops, "collectives, comma-separated: " + [] {
    std::string names;
    for (const std::string& k : pb::collective_op_names()) names += (names.empty() ? "" : ",") + k;
    return names;
  }() + "; all or none")->capture_default_str();
  cli.add_option("--min-bytes", o->min_bytes, "smallest message (nccl-tests' size); sizes double from it up to --max-bytes")
      ->capture_default_str();
  cli.add_option("--max-bytes", o->max_bytes, "largest message (suffixes K, M, G)")->capture_default_str();
  cli.add_option("--comm", o->comm, "the collectives' communicator: auto, mpi, nccl")
      ->check(CLI::IsMember({"auto", "mpi", "nccl"}))
      ->capture_default_str();
  cli.add_option("--dtype", o->dtype, "the collectives' buffers: fp32, or bf16 (sums in bf16 on the wire, as NCCL)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  cli.add_option("--out", o->out, "result directory or .h5 path")->capture_default_str();
  cli.add_option("--cluster", o->cluster, "cluster name stored with the run");
  cli.add_option("--tag", o->tag, "free text stored with the run");
  cli.add_flag("--overwrite", o->overwrite, "replace an existing --out X.h5 (never the file of a run still in progress)");
  try {
    cli.parse(*argc, argv);
  } catch (const CLI::ParseError& e) {
    if (lead) std::fprintf(stderr, "parabench-micro: error: %s\n", e.what());
    return pb::kExitConfig;
  }
  if (help) {
    if (lead) {
      std::printf("%s\nGoogle Benchmark's flags:\n", cli.help().c_str());
      benchmark::PrintDefaultHelp();
    }
    return pb::kExitComplete;
  }
  const std::string error = resolve_request(o);
  if (!error.empty()) {
    if (lead) std::fprintf(stderr, "parabench-micro: error: %s\n", error.c_str());
    return pb::kExitConfig;
  }
  // What CLI11 left (Google Benchmark's flags, in order) goes back into argv for benchmark::Initialize.
  const std::vector<std::string> rest = cli.remaining();
  static std::vector<std::string> kept;  // argv points into it until the end of main
  kept.assign(rest.begin(), rest.end());
  *argc = 1;
  for (std::string& arg : kept) argv[(*argc)++] = arg.data();
  argv[*argc] = nullptr;
  return -1;
}

// Google Benchmark's own file output (--benchmark_out) is rank 0's: the other ranks would truncate it.
void drop_benchmark_out(int* argc, char** argv) {
  int kept = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strncmp(argv[i], "--benchmark_out", std::strlen("--benchmark_out")) != 0) argv[kept++] = argv[i];
  }
  *argc = kept;
  argv[kept] = nullptr;
}

// Google Benchmark's flag words: true unless one of its false words.
bool truthy(std::string value) {
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return value != "false" && value != "0" && value != "no" && value != "off" && value != "f" && value != "n";
}

// How random interleaving was asked for (the flag, or its environment variable), or "". Every rank must
// run the benchmarks in the same order, since the collectives meet in each, and Google Benchmark
// shuffles them with a seed of each process's own.
std::string random_interleaving(int argc, char** argv) {
  constexpr const char* kFlag = "--benchmark_enable_random_interleaving";
  const char* const env = std::getenv("BENCHMARK_ENABLE_RANDOM_INTERLEAVING");
  std::string asked = env && truthy(env) ? "BENCHMARK_ENABLE_RANDOM_INTERLEAVING" : "";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == kFlag) asked = arg;
    else if (arg.rfind(std::string(kFlag) + "=", 0) == 0) asked = truthy(arg.substr(std::strlen(kFlag) + 1)) ? arg : "";
  }
  return asked;
}

// --benchmark_list_tests prints the names and runs nothing: no result file.
bool listing_only(int argc, char** argv) {
  constexpr const char* kFlag = "--benchmark_list_tests";
  bool listing = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == kFlag) listing = true;
    else if (arg.rfind(std::string(kFlag) + "=", 0) == 0) listing = truthy(arg.substr(std::strlen(kFlag) + 1));
  }
  return listing;
}

// Every rank takes rank 0's verdict (a failure to create the result file, a run that failed), so that
// all exit with the same code.
int agree(MPI_Comm world, int code) {
  MPI_Bcast(&code, 1, MPI_INT, 0, world);
  return code;
}

int run(int argc, char** argv) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const bool lead = rank == 0;
  const std::vector<std::string> full_argv(argv, argv + argc);

  MicroOptions o;
  // As the apps: the node's cores shared by its ranks.
  const pb::NodeLocal local = pb::node_local(MPI_COMM_WORLD);
  o.threads = std::max(1, pb::online_cores() / local.local_size);
  if (const int code = parse_micro_options(&argc, argv, lead, &o); code >= 0) return code;
  if (!lead) drop_benchmark_out(&argc, argv);
  // Google Benchmark's display format: with json or csv, stdout is that document alone, and the
  // collectives' table and the PARABENCH_RESULT line go to stderr.
  const std::string format = pb::benchmark_format(argc, argv);
  std::FILE* const info = format == "console" ? stdout : stderr;
  if (const std::string interleaving = random_interleaving(argc, argv); size > 1 && !interleaving.empty()) {
    if (lead) {
      std::fprintf(stderr, "parabench-micro: error: %s needs one rank: each rank would run the benchmarks in an "
                           "order of its own, and the collectives would not meet\n", interleaving.c_str());
    }
    return pb::kExitConfig;
  }
  const bool listing = listing_only(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (argc > 1) {
    if (lead) std::fprintf(stderr, "parabench-micro: error: unknown option %s (see --help)\n", argv[1]);
    return pb::kExitConfig;
  }
  o.cluster = pb::resolve_cluster_name(o.cluster);
  pb::Prices prices;
  if (const std::string error = pb::read_prices(MPI_COMM_WORLD, &prices); !error.empty()) {
    if (lead) std::fprintf(stderr, "parabench-micro: error: %s\n", error.c_str());
    return pb::kExitConfig;
  }

  pb::cpu::SgemmLibrary sgemm = pb::cpu::default_sgemm_library();
  if (!o.cpu_gemm.empty()) pb::cpu::parse_sgemm_library(o.cpu_gemm, &sgemm);  // checked by CLI11
  o.cpu_gemm = pb::cpu::sgemm_library_name(sgemm);
  std::vector<pb::MicroBackend> backends = pb::make_micro_backends(o.threads, sgemm);
  const std::string cuda = pb::add_cuda_backends(&backends, local.local_rank);
  pb::MpiCommunicator mpi_world(MPI_COMM_WORLD);
  // NCCL only where every rank has a GPU of its own (NCCL refuses two ranks on one GPU): the communicator
  // is made by all ranks or by none.
  int every_rank_has_cuda = backends.back().name == "cuda";
  MPI_Allreduce(MPI_IN_PLACE, &every_rank_has_cuda, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  const bool own_gpus = pb::node_ranks_hold_distinct_devices(MPI_COMM_WORLD, pb::micro_device_id(local.local_rank));
  std::unique_ptr<pb::Communicator> nccl_world;
  if (o.comm != "mpi" && every_rank_has_cuda && own_gpus) nccl_world = pb::make_nccl_world(backends);
  if (o.comm == "nccl" && !nccl_world) {
    if (lead) {
      std::fprintf(stderr, "parabench-micro: error: --comm nccl: %s\n",
                   backends.back().name != "cuda" ? cuda.c_str()
                   : !every_rank_has_cuda         ? "a rank of the job sees no GPU"
                                                  : "ranks of a node share a GPU (NCCL needs one per rank): use --comm mpi");
    }
    return pb::kExitConfig;
  }
  pb::Communicator& world = nccl_world ? *nccl_world : mpi_world;
  // The collectives' buffers live where the communicator reads them: the GPU for NCCL, host memory for MPI.
  pb::Backend& buffers = *(nccl_world ? backends.back().backend : backends.front().backend);

  benchmark::AddCustomContext("threads", std::to_string(o.threads));
  benchmark::AddCustomContext("cpu", pb::cpu_model_name());
  benchmark::AddCustomContext("cuda", cuda);
  benchmark::AddCustomContext("ranks", std::to_string(size));
  benchmark::AddCustomContext("comm", world.name());

  // The result file first: a bad --out is reported before any benchmark runs, and a job killed midway
  // leaves a file that says "running".
  std::unique_ptr<pb::ResultWriter> writer;
  const pb::SystemInfo system = pb::collect_system_info(MPI_COMM_WORLD, o.cluster, prices);
  int code = pb::kExitComplete;
  if (lead && !listing) {
    try {
      writer = std::make_unique<pb::ResultWriter>(pb::ResultFileRequest{o.out, "micro", o.cluster, size, 0, o.overwrite, {}});
      nlohmann::ordered_json config;
      config["app"] = "micro";
      config["world_size"] = size;
      config["threads"] = o.threads;
      config["cpu_gemm"] = o.cpu_gemm;
      config["comm"] = world.name();
      std::string ops;
      for (const std::string& op : o.request.ops) ops += (ops.empty() ? "" : ",") + op;
      config["ops"] = ops;
      config["min_bytes"] = o.request.min_bytes;
      config["max_bytes"] = o.request.max_bytes;
      config["dtype"] = o.dtype;
      config["cluster"] = o.cluster;
      config["tag"] = o.tag;
      config["out"] = o.out;
      writer->write_config(config, full_argv);
      writer->write_system(system);
      writer->commit_header();
      writer->publish();
    } catch (const pb::RunError& e) {
      std::fprintf(stderr, "parabench-micro: error: %s\n", e.what());
      code = e.code;
      writer.reset();
    }
  }
  if (const int agreed = agree(MPI_COMM_WORLD, code); agreed != pb::kExitComplete) return agreed;

  int failed_checks = 0;
  pb::register_gemm_benchmarks(backends, &failed_checks);
  pb::register_kernel_benchmarks(backends, &failed_checks);
  pb::register_collective_benchmarks(world, mpi_world, buffers, o.request, &failed_checks);

  pb::MicroReporter reporter(lead, format);
  const std::size_t ran = benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (ran == 0) {
    if (lead) {
      std::fprintf(stderr, "parabench-micro: error: no benchmark matches --benchmark_filter=%s "
                           "(--benchmark_list_tests lists them)\n", benchmark::GetBenchmarkFilter().c_str());
      if (writer) writer->discard();  // a command-line error leaves no file, as in the apps
    }
    return pb::kExitConfig;
  }
  if (listing) return pb::kExitComplete;
  // A kernel can fail on one rank alone (its check, its memory); the collectives fail on every rank.
  int most_failed = failed_checks;
  MPI_Allreduce(MPI_IN_PLACE, &most_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  code = most_failed > 0 ? pb::kExitRuntime : pb::kExitComplete;
  if (lead) {
    reporter.print_collectives_table(info);
    std::string error;
    if (failed_checks > 0) error = std::to_string(failed_checks) + " benchmark run(s) failed (see their error above)";
    if (most_failed > failed_checks) {
      error += (error.empty() ? "" : "; ") + std::string("another rank had ") + std::to_string(most_failed) +
               " failed benchmark run(s) (its errors are not reported: rank 0 reports)";
    }
    try {
      reporter.write(*writer);
      writer->set_status(error.empty() ? "complete" : "failed", error);
      writer->close();
      std::fprintf(info, "PARABENCH_RESULT app=micro ranks=%d benchmarks=%zu failed=%d status=%s file=%s\n", size, ran,
                  failed_checks, error.empty() ? "complete" : "failed", writer->path().c_str());
    } catch (const pb::RunError& e) {
      std::fprintf(stderr, "parabench-micro: error: %s\n", e.what());
      code = pb::kExitRuntime;
    }
    if (!error.empty()) std::fprintf(stderr, "parabench-micro: %s\n", error.c_str());
    std::fflush(info);
  }
  return agree(MPI_COMM_WORLD, code);
}

}  // namespace

int main(int argc, char** argv) {
  pb::disable_hdf5_exit_handler();
  int provided = 0;
  PB_MPI_CHECK(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided));
  int code = pb::kExitRuntime;
  try {
    code = run(argc, argv);
  } catch (const std::exception& e) {
    pb::abort_job(pb::kExitRuntime, __FILE__, __LINE__, "parabench-micro", e.what());
  }
  pb::finalize_mpi_within_time_limit("parabench-micro", code);
  return code;
}
