#include "common/runner.h"

#include <mpi.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <sstream>
#include <thread>

#include "common/data.h"
#include "common/energy.h"
#include "common/errors.h"
#include "common/memory_log.h"
#include "common/metadata.h"
#include "common/mpi_communicator.h"
#include "common/results.h"
#include "common/step_rules.h"
#include "common/timer.h"
#include "kernels/cpu/cpu_backend.h"
#ifdef PB_WITH_CUDA
#include "common/device_communicators.h"
#include "kernels/cuda/cuda_backend.h"
#endif

#ifndef PB_VERSION
#define PB_VERSION "0.0.0"
#endif
#ifndef PB_GIT_COMMIT
#define PB_GIT_COMMIT "unknown"
#endif

namespace pb {

Precision precision_of(const Options& options) {
  Precision p;
  if (!parse_dtype(options.dtype, &p.compute) || !parse_dtype(options.grad_dtype, &p.grads)) {
    throw std::invalid_argument("precision_of: unvalidated dtype " + options.dtype + " / " + options.grad_dtype);
  }
  return p;
}

namespace {

// The first of SIGTERM (Slurm's time limit, scancel), SIGINT (Ctrl-C) and SIGHUP (a closed terminal)
// that arrived; every rank checks it after each step, and the ranks stop together.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) {
  if (g_stop_signal == 0) g_stop_signal = sig;
}

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigset_t stops;
  sigemptyset(&stops);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) {
    sigaction(sig, &action, nullptr);
    sigaddset(&stops, sig);
  }
  // No computing thread is interrupted: the signals are blocked in this thread and in the OpenMP threads it
  // starts later, and a thread of their own takes them (or MPI's threads, started before, run the handler).
  // A stop signal delivered into oneDNN's sgemm corrupted the heap (1 run in 5 of tests/app/test_sigterm.py).
  pthread_sigmask(SIG_BLOCK, &stops, nullptr);
  std::thread([stops] {
    for (;;) {
      int sig = 0;
      if (sigwait(&stops, &sig) == 0) on_stop_signal(sig);
    }
  }).detach();
  // A file-size limit (ulimit -f) makes a write fail with EFBIG, reported like any failed write,
  // instead of ending the process without a word.
  std::signal(SIGXFSZ, SIG_IGN);
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
  }
  return "a signal";
}

// Exit code of a run stopped by a signal: 128 + its number, as a shell reports it (SPEC section 5).
ExitCode signal_exit_code(int sig) {
  return sig == SIGINT ? kExitInterrupt : sig == SIGHUP ? kExitHangup : kExitInterrupted;
}

// What the ranks agree on after each step (the maximum over ranks wins): go on, stop for a signal
// (its number), or stop because rank 0 could not write its outputs.
constexpr double kStopWriteFailed = 1000.0;

constexpr double kMiB = 1024.0 * 1024.0;

double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Model FLOPs of one step (SPEC section 6): forward + backward (3×) of the matrix products,
// attention counted as the full S×S product, recomputation never counted.
struct FlopModel {
  double flops_per_step;
  std::string formula;
};
FlopModel model_flops(const Options& o, const MlpPart* mlp) {
  const double G = o.global_batch, S = o.model.seq, L = o.model.layers, h = o.model.hidden, V = o.model.vocab,
               f = o.model.ffn;
  if (o.model.llama()) {  // SPEC 2.5: [Q | K | V] of (a + 2·kv)·d columns; SwiGLU's three products, or the part's
    const double qkv = static_cast<double>(o.model.qkv_width());
    const bool part = mlp != nullptr && !mlp->flops_term().empty();
    const double mlp_weights = part ? mlp->matmul_weights_per_token() : 3.0 * h * f;
    return {6.0 * G * S * (L * (h * qkv + h * h + mlp_weights + 2.0 * S * h) + h * V),
            "6*G*S*(L*(h*(a+2*kv)*d + h^2 + " + (part ? mlp->flops_term() : std::string("3*h*f")) + " + 2*S*h) + h*V)"};
  }
  if (mlp != nullptr && !mlp->flops_term().empty()) {  // a replaced MLP: its own matrix products per token
    return {6.0 * G * S * (L * (4.0 * h * h + mlp->matmul_weights_per_token() + 2.0 * S * h) + h * V),
            "6*G*S*(L*(4h^2 + " + mlp->flops_term() + " + 2*S*h) + h*V)"};
  }
  if (o.model.ffn == 4 * o.model.hidden) {
    return {72.0 * G * S * L * h * h * (1.0 + S / (6.0 * h) + V / (12.0 * h * L)),
            "72*G*S*L*h^2*(1 + S/(6h) + V/(12*h*L))"};
  }
  return {6.0 * G * S * (L * (4.0 * h * h + 2.0 * h * f + 2.0 * S * h) + h * V),
          "6*G*S*(L*(4h^2 + 2*h*f + 2*S*h) + h*V)"};
}

// Peak TFLOP/s per rank: --peak-tflops, else the dense peak of the GPU model (device_peak,
// common/metadata.h) for the dtype of the matrix products (bf16 tensor cores, or fp32 without TF32),
// else 0: MFU is then NaN (CPUs, unknown GPUs).
double resolve_peak_tflops(const Options& o, const std::string& device_name) {
  if (o.peak_tflops >= 0.0) return o.peak_tflops;
  if (o.backend != "cuda") return 0.0;
  DevicePeak peak;
  if (device_peak(device_name, &peak)) return o.dtype == "bf16" ? peak.bf16_tflops : peak.fp32_tflops;
  return 0.0;
}

// The precision recipe of the run, added to its /config (SPEC 2.3): parameters and activations in
// --dtype, gradients in --grad-dtype (both already in the config), fp32 master weights beside bf16
// parameters, and how the matrix products compute.
nlohmann::ordered_json describe_precision(nlohmann::ordered_json config, const Precision& precision,
                                          const Backend& backend) {
  config["master_weights"] = precision.master_weights() ? "fp32" : "none";
  config["matmul_precision"] = backend.matmul_precision();
#ifdef PB_WITH_CUDA
  if (config.value("attention", "") == "cudnn") config["attention_library"] = cuda_cudnn_version();
#endif
  return config;
}

// The CPU backend, or the GPU of this rank: local rank modulo the GPUs it can see.
std::unique_ptr<Backend> make_backend(const Options& opt, int local_rank) {
#ifdef PB_WITH_CUDA
  if (opt.backend == "cuda") {
    return make_cuda_backend(device_index_for(local_rank, cuda_visible_device_count()), opt.dtype == "bf16",
                             opt.attention == "cudnn");
  }
#else
  (void)local_rank;
#endif
  cpu::SgemmLibrary sgemm = cpu::default_sgemm_library();
  if (!cpu::parse_sgemm_library(opt.cpu_gemm, &sgemm)) {  // options.cpp admits only this build's libraries
    throw RunError(kExitConfig, "--cpu-gemm " + opt.cpu_gemm + ": not a library of this build");
  }
  return make_cpu_backend(opt.threads, opt.dtype == "bf16", sgemm);
}

// --memory-log: every rank's history of its memory (common/memory_log.h), from the first allocation
// on. Every rank opens its own file; when one cannot, the lowest such rank says why and every rank
// returns exit 3 before any step.
int open_memory_log(const Options& opt, MpiCommunicator& world, Backend& backend, std::unique_ptr<MemoryLog>* log) {
  if (opt.memory_log.empty()) return kExitComplete;
  std::string error;
  try {
    *log = std::make_unique<MemoryLog>(opt.memory_log, world.rank(), world.size(),
                                       "app " + opt.app + ", backend " + opt.backend + ", dtype " + opt.dtype +
                                           ", recompute " + opt.recompute + ", steps " + std::to_string(opt.steps) +
                                           ", micro-batches per step " + std::to_string(opt.grad_accum));
  } catch (const std::exception& e) {
    error = e.what();
  }
  double lowest_failed = error.empty() ? 0.0 : world.size() - world.rank();  // the max names the lowest rank
  world.all_reduce_host(&lowest_failed, 1, HostReduce::max);
  if (lowest_failed == 0.0) {
    (*log)->observe(backend.tracker());
    return kExitComplete;
  }
  if (world.size() - world.rank() == static_cast<int>(lowest_failed)) {
    std::fprintf(stderr, "parabench-%s: error: %s (rank %d)\n", opt.app.c_str(), error.c_str(), world.rank());
  }
  log->reset();
  return kExitRuntime;
}

// The communicator the process groups are split from, when it is not `world` itself: with the CUDA
// backend, NCCL, or MPI staged through pinned host memory (--comm mpi).
std::unique_ptr<Communicator> make_device_world(const Options& opt, MpiCommunicator& world, Backend& backend) {
#ifdef PB_WITH_CUDA
  if (opt.backend == "cuda") {
    if (opt.comm == "nccl") {
      MPI_Comm dup;
      PB_MPI_CHECK(MPI_Comm_dup(world.handle(), &dup));
      return make_nccl_communicator(dup, cuda_compute_stream(backend), 60.0 * opt.distributed_timeout_minutes);
    }
    return make_host_staged_communicator(world.split(0, world.rank()), cuda_compute_stream(backend));
  }
#else
  (void)opt, (void)world, (void)backend;
#endif
  return nullptr;
}

std::string format_g(double x) {
  if (std::isnan(x)) return "nan";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", x);
  return buf;
}

std::string format_mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f", bytes / kMiB);
  return buf;
}

void print_header(const Options& o, const Layout& layout, const SystemInfo& sys, const Backend& backend,
                  std::size_t num_params, const std::vector<MemoryEstimate>& predicted) {
  std::printf("parabench-%s %s (git %s)  cluster %s  %d ranks on %d node(s)\n", o.app.c_str(), PB_VERSION,
              PB_GIT_COMMIT, sys.cluster.c_str(), o.world_size, sys.nodes);
  std::printf("backend %s (%s), comm %s, dtype %s, %d thread(s) per rank\n", backend.name().c_str(),
              backend.device_name().c_str(), o.comm.c_str(), o.dtype.c_str(), o.threads);
  if (o.dtype != "fp32") {
    std::printf("precision: parameters and activations bf16, fp32 master weights, %s gradients; products: %s\n",
                o.grad_dtype.c_str(), backend.matmul_precision().c_str());
  }
  const int64_t padded = o.model.padded_vocab(layout.tp);
  const std::string vocab = std::to_string(o.model.vocab) +
                            (padded != o.model.vocab ? " (stored padded to " + std::to_string(padded) + ")" : "");
  char block[96] = "";  // SPEC 2.5's block: its key/value heads and rotary base
  if (o.model.llama()) {
    std::snprintf(block, sizeof block, " (llama: kv heads %d, rope theta %g)", o.model.kv(), o.model.rope_theta);
  }
  std::printf("model %s%s: layers %d hidden %d heads %d seq %d vocab %s ffn %d, %.2fM parameters\n",
              o.model.name.c_str(), block, o.model.layers, o.model.hidden, o.model.heads, o.model.seq, vocab.c_str(),
              o.model.ffn, num_params / 1e6);
  std::printf("batch: micro-batch %d × dp %d × grad-accum %d = global batch %d (%lld tokens); %d steps, %d warm-up\n",
              o.micro_batch, o.dp, o.grad_accum, o.global_batch, static_cast<long long>(o.tokens_per_step()), o.steps, o.warmup);
  std::printf("layout: %s\n", layout.describe().c_str());
  std::printf("predicted memory per rank (MiB):");
  for (MemCategory c : all_mem_categories()) {
    std::printf(" %s %s", mem_category_name(c), format_mib(predicted[0][c]).c_str());
  }
  std::printf(" peak_total %s\n", format_mib(predicted[0].peak_total).c_str());
  bool uniform = std::all_of(predicted.begin(), predicted.end(),
                             [&](const MemoryEstimate& e) { return e.bytes == predicted[0].bytes; });
  if (!uniform) std::printf("  (rank 0 shown; ranks differ, see /memory/predicted)\n");
  std::fflush(stdout);
}

struct StepRecord {
  double loss, grad_norm, time_max_s;
  std::vector<double> rank_times;
  double host_waits;  // the most of any rank (Backend::host_waits)
};

// The same file: the same path, or the same inode where both exist.
bool same_file(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty()) return false;
  if (a == b) return true;
  struct stat sa {}, sb {};
  return stat(a.c_str(), &sa) == 0 && stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// An output file of rank 0 (--trace, --json-log), opened before step 1 so that a bad path fails
// before any work; every write is flushed and checked, and a failure names the file and the reason.
class OutputFile {
 public:
  // `taken`: the files this run already writes, by option; an output that is one of them, or the
  // result file of a run in progress, is refused (exit 2) rather than truncated.
  OutputFile(const char* option, const std::string& path,
             const std::vector<std::pair<const char*, std::string>>& taken)
      : option_(option), path_(path) {
    if (path.empty()) return;
    for (const auto& [other_option, other] : taken) {
      if (same_file(path, other)) {
        throw RunError(kExitConfig, std::string(option) + " " + path + " is the file of " + other_option + " too");
      }
    }
    if (result_file_in_use(path)) {
      throw RunError(kExitConfig, std::string(option) + " " + path + " is the result file of a run in progress");
    }
    struct stat st {};
    created_ = stat(path.c_str(), &st) != 0;
    file_ = std::fopen(path.c_str(), "w");
    if (file_ == nullptr) fail("cannot open it for writing");
  }
  ~OutputFile() {
    if (file_ != nullptr) std::fclose(file_);
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  // Closes it, and removes it if this run created it (the run stopped before step 1).
  void discard() noexcept {
    if (file_ == nullptr) return;
    std::fclose(file_);
    file_ = nullptr;
    if (created_) std::remove(path_.c_str());
  }
  // Appends `text` and flushes it to the file system.
  void write(const std::string& text) {
    if (file_ == nullptr) return;
    errno = 0;
    if (std::fwrite(text.data(), 1, text.size(), file_) != text.size() || std::fflush(file_) != 0) fail("write failed");
  }
  void close() {
    if (file_ == nullptr) return;
    const int rc = std::fclose(file_);
    file_ = nullptr;
    if (rc != 0) fail("closing it failed");
  }

 private:
  [[noreturn]] void fail(const char* what) {
    const std::string reason = errno != 0 ? std::strerror(errno) : "unknown error";
    if (file_ != nullptr) std::fclose(file_);
    file_ = nullptr;
    throw RunError(kExitRuntime, std::string(option_) + " " + path_ + ": " + what + ": " + reason);
  }
  const char* option_;
  std::string path_;
  std::FILE* file_ = nullptr;
  bool created_ = false;
};

std::string format_gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / (kMiB * 1024.0));
  return buf;
}

// The memory check of SPEC section 5: each rank's predicted peak against what it can use, the GPU's
// free memory shared by the ranks on it, or the node's available host memory shared by the node's
// ranks. Collective; every rank returns the same verdict: empty when every rank fits (or nothing is
// known), else the message naming the worst rank and both numbers.
std::string check_memory_fits(const Options& opt, MpiCommunicator& world, const NodeLocal& local,
                              const std::vector<MemoryEstimate>& predicted) {
  // What each rank can use, by how many ranks share it, and where the number came from.
  struct Budget {
    int64_t bytes = -1;  // -1: unknown
    int64_t sharing = 1;
    int64_t source = 0;  // index into kSources
  };
  static const char* const kSources[] = {"MemAvailable of its node", "its memory cgroup's limit less usage",
                                         "the free memory of its GPU"};
  Budget mine;
  mine.sharing = local.local_size;
  int64_t available = -1;
#ifdef PB_WITH_CUDA
  if (opt.backend == "cuda") {
    std::size_t free_bytes = 0, total_bytes = 0;
    PB_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    available = static_cast<int64_t>(free_bytes);
    const int gpus = std::max(1, cuda_visible_device_count());
    mine.sharing = (local.local_size + gpus - 1) / gpus;  // ranks on a GPU, when each rank sees them all
    mine.source = 2;
  }
#endif
  if (opt.backend != "cuda") {
    std::string source;
    available = host_memory_available_bytes(&source);
    mine.source = source == "MemAvailable" ? 0 : 1;
  }
  mine.bytes = available < 0 ? -1 : available / std::max<int64_t>(1, mine.sharing);
  std::vector<Budget> budgets(opt.world_size);
  world.all_gather_host(&mine, budgets.data(), sizeof(Budget));
  int worst = -1;
  double worst_ratio = 1.0;
  for (int r = 0; r < opt.world_size; ++r) {
    if (budgets[r].bytes < 0) continue;
    const double ratio = static_cast<double>(predicted[r].peak_total) / std::max<int64_t>(1, budgets[r].bytes);
    if (ratio > worst_ratio) worst = r, worst_ratio = ratio;
  }
  if (worst < 0) return "";
  const Budget& b = budgets[worst];
  return "the predicted peak memory of rank " + std::to_string(worst) + ", " + format_gib(predicted[worst].peak_total) +
         ", exceeds the " + format_gib(b.bytes) + " it can use (" + kSources[b.source] + " shared by " +
         std::to_string(b.sharing) + " rank(s)); reduce --micro-batch, the model or the ranks per node, "
         "use --recompute, or add --no-memory-check to run anyway";
}

void write_dump(const Options& opt, const AppOptions& app_options, const GptModel& model,
                const std::vector<float>& grads, const std::vector<double>& losses, const std::vector<double>& norms) {
  GradientDump dump;
  const ModelConfig& m = opt.model;
  dump.attributes = {{"layers", m.layers},   {"hidden", m.hidden},           {"heads", m.heads},
                     {"seq", m.seq},         {"vocab", m.vocab},             {"ffn", m.ffn},
                     {"micro_batch", opt.micro_batch}, {"global_batch", opt.global_batch},
                     {"steps", static_cast<int64_t>(losses.size())}, {"seed", opt.seed},
                     {"lr", opt.lr},         {"clip", opt.clip}};
  dump.attributes["arch"] = m.arch;  // SPEC 2.5's block for the reference: its key/value heads and rotary base
  dump.attributes["kv_heads"] = m.kv();
  dump.attributes["rope_theta"] = m.rope_theta;
  if (app_options.describe) {  // the app's own options (experts, top_k, ...) for the reference
    nlohmann::ordered_json extra;
    app_options.describe(extra);
    for (const auto& [key, value] : extra.items()) {
      if (value.is_number() || value.is_boolean()) dump.attributes[key] = value;
    }
  }
  dump.losses = losses;
  dump.grad_norms = norms;
  for (const UnitInfo& u : model.units()) {  // the spec's tensors (tp 1): the vocabulary's padding left out
    for (const TensorInfo& t : u.tensors) {
      const int64_t rows = t.global_rows, cols = t.global_cols;
      dump.shapes.emplace_back(t.name, t.is_matrix ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{cols});
      std::vector<float>& g = dump.grads.emplace_back();
      for (int64_t r = 0; r < rows; ++r) {
        const auto first = grads.begin() + static_cast<std::ptrdiff_t>(t.offset + r * t.cols);
        g.insert(g.end(), first, first + cols);
      }
    }
  }
  write_gradient_dump(opt.dump_gradients, dump);
}

// /energy/<source> of the result file: what each source reads, per column who reads it (−1: nobody)
// and what; a source without a counter says why (its joules dataset is absent).
void write_energy_sources(ResultWriter& writer, const std::vector<EnergySource>& sources) {
  for (const EnergySource& s : sources) {
    const std::string group = "/energy/" + s.name;
    writer.write_attributes(group, {{"counter", s.counter},
                                    {"columns", s.columns},
                                    {"available", static_cast<int64_t>(s.available ? 1 : 0)},
                                    {"reason", s.reason}});
    std::vector<int64_t> read_by(s.read_by.begin(), s.read_by.end());
    writer.write_i64(group + "/read_by", read_by, "1");
    writer.write_strings(group + "/detail", s.detail);
  }
}

// The energy lines of rank 0's summary.
void print_energy(const std::vector<EnergySource>& sources, const nlohmann::ordered_json& e) {
  if (e["energy_sources"].get<std::string>().empty()) {
    std::printf("  %-22s", "energy");
    for (const EnergySource& s : sources) std::printf(" %s: %s;", s.name.c_str(), s.reason.c_str());
    std::printf("\n");
    return;
  }
  std::printf("  %-22s %12.4f   (%s)\n", "energy per step (J)", e["energy_j_per_step"].get<double>(),
              e["energy_sources"].get<std::string>().c_str());
  for (const EnergySource& s : sources) {
    if (!s.available) continue;
    const std::string label = "power per " + std::string(s.name == "nvml" ? "GPU" : "node CPU") + " (W)";
    std::printf("  %-22s %12.2f   (%s, %lld device(s))\n", label.c_str(),
                e["power_" + s.name + "_w_per_device"].get<double>(), s.name.c_str(),
                static_cast<long long>(e[s.name + "_devices"].get<int64_t>()));
  }
  std::printf("  %-22s %12.4g\n", "joules per token", e["joules_per_token"].get<double>());
  std::printf("  %-22s %12.4g\n", "tokens per joule", e["tokens_per_joule"].get<double>());
}

// Every rank ends with rank 0's exit code, which can still change while rank 0 writes the summary.
int rank0_exit_code(MpiCommunicator& world, int exit_code) {
  double code = world.rank() == 0 ? exit_code : -1.0;
  world.all_reduce_host(&code, 1, HostReduce::max);
  return static_cast<int>(code);
}

// /summary, /memory and /comm of rank 0's file. Throws RunError.
void write_summary(ResultWriter& writer, const nlohmann::ordered_json& summary,
                   const std::vector<MemoryEstimate>& predicted, const std::vector<std::vector<int64_t>>& measured_mem,
                   const std::vector<int64_t>& measured_peak, const std::vector<int64_t>& device_peak,
                   const std::vector<std::vector<int64_t>>& comm_calls, const std::vector<std::vector<int64_t>>& comm_bytes,
                   const std::vector<std::vector<double>>& comm_time) {
  writer.write_attributes("/summary", summary);
  int ci = 0;
  for (MemCategory c : all_mem_categories()) {
    std::vector<int64_t> pred;
    for (const MemoryEstimate& e : predicted) pred.push_back(e[c]);
    writer.write_i64(std::string("/memory/measured/") + mem_category_name(c), measured_mem[ci++], "bytes");
    writer.write_i64(std::string("/memory/predicted/") + mem_category_name(c), pred, "bytes");
  }
  std::vector<int64_t> pred_peak;
  for (const MemoryEstimate& e : predicted) pred_peak.push_back(e.peak_total);
  writer.write_i64("/memory/measured/peak_total", measured_peak, "bytes");
  writer.write_i64("/memory/predicted/peak_total", pred_peak, "bytes");
  writer.write_i64("/memory/device_peak_bytes", device_peak, "bytes");
  for (int op = 0; op < kNumCommOps; ++op) {
    const std::string base = std::string("/comm/") + comm_op_name(static_cast<CommOp>(op));
    writer.write_i64(base + "/calls", comm_calls[op], "1");
    writer.write_i64(base + "/bytes", comm_bytes[op], "bytes");
    writer.write_f64(base + "/time_s", comm_time[op], "s");
  }
}

// The steps, the report and the result file, after validation. Throws RunError.
int train_and_report(const AppDefinition& app, Options& opt, MpiCommunicator& world) {
  const int world_rank = world.rank();
  const bool lead = world_rank == 0;
  const bool talk = lead && !opt.quiet;

  // The cluster profile's prices are configuration: a bad one ends every rank with exit 2, before
  // anything is allocated.
  Prices prices;
  if (const std::string error = read_prices(world.handle(), &prices); !error.empty()) {
    if (lead) std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), error.c_str());
    return kExitConfig;
  }
  const NodeLocal local = node_local(world.handle());
  std::unique_ptr<Backend> backend = make_backend(opt, local.local_rank);
  std::unique_ptr<MemoryLog> memory_log;
  if (const int code = open_memory_log(opt, world, *backend, &memory_log); code != kExitComplete) return code;
  opt.peak_tflops = resolve_peak_tflops(opt, backend->device_name());
  const Layout layout = app.layout(opt);
  const std::unique_ptr<Communicator> device_world = make_device_world(opt, world, *backend);
  Communicator& group_base = device_world ? *device_world : world;
  // With --memory-log, the groups log the buffers their calls are handed.
  const std::unique_ptr<Communicator> logged_base = memory_log ? logging_communicator(group_base, *memory_log) : nullptr;
  ProcessGroups groups = make_process_groups(logged_base ? *logged_base : group_base, layout);
  const ModelParallel mp = make_model_parallel(groups);
  const OwnedBlockParts owned_parts = app.block_parts ? app.block_parts(opt, *backend, mp) : OwnedBlockParts{};
  const BlockParts parts = owned_parts.view();

  const MemoryPlan plan = memory_plan_for(opt, backend->attention_keeps_probabilities());
  std::vector<MemoryEstimate> predicted;
  for (int r = 0; r < opt.world_size; ++r) predicted.push_back(app.predict_memory(opt, plan, r));

  int device_index = -1;
#ifdef PB_WITH_CUDA
  if (opt.backend == "cuda") device_index = device_index_for(local.local_rank, cuda_visible_device_count());
#endif
  SystemInfo sys = collect_system_info(world.handle(), opt.cluster, prices, device_index);
#ifdef PB_WITH_CUDA
  if (opt.backend == "cuda") {
    std::size_t free_bytes = 0, total_bytes = 0;
    PB_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    sys.gpu_model = backend->device_name();
    sys.gpu_memory_bytes = static_cast<int64_t>(total_bytes);
    sys.gpus_per_node = cuda_visible_device_count();
  }
#endif
  if (talk) print_header(opt, layout, sys, *backend, gpt_num_parameters(opt.model, parts.mlp), predicted);

  // ---- the memory check: before the model allocates anything ------------------------------------
  const std::string does_not_fit = check_memory_fits(opt, world, local, predicted);

  if (opt.dry_run) {
    if (lead) {
      std::printf("dry run: configuration valid; predicted memory per rank (MiB)\n  rank");
      for (MemCategory c : all_mem_categories()) std::printf(" %16s", mem_category_name(c));
      std::printf(" %16s\n", "peak_total");
      for (int r = 0; r < opt.world_size; ++r) {
        const Layout::Coord c = layout.coord(r);
        std::printf("  %4d", r);
        for (MemCategory cat : all_mem_categories()) std::printf(" %16s", format_mib(predicted[r][cat]).c_str());
        std::printf(" %16s   (pp %d dp %d cp %d tp %d)\n", format_mib(predicted[r].peak_total).c_str(), c.pp, c.dp,
                    c.cp, c.tp);
      }
      std::printf("memory: %s\n", does_not_fit.empty() ? "fits (every rank's predicted peak within what it can use)"
                                                        : ("does not fit: " + does_not_fit).c_str());
      std::fflush(stdout);
    }
    if (!does_not_fit.empty() && opt.memory_check) {
      if (lead) std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), does_not_fit.c_str());
      return kExitConfig;
    }
    return kExitComplete;
  }
  if (!does_not_fit.empty()) {
    if (opt.memory_check) {
      if (lead) std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), does_not_fit.c_str());
      return kExitConfig;
    }
    if (lead) std::fprintf(stderr, "parabench-%s: warning (--no-memory-check): %s\n", opt.app.c_str(), does_not_fit.c_str());
  }

  // ---- the energy counters (common/energy.h): who reads which -------------------------------------
  std::string gpu_bus_id;
#ifdef PB_WITH_CUDA
  if (device_index >= 0) gpu_bus_id = cuda_device_pci_bus_id(device_index);
#endif
  EnergyMeter energy(world, sys.hostnames, sys.local_ranks, gpu_bus_id, powercap_root());
  std::vector<StepSeries> energy_series;
  for (const EnergySource& source : energy.sources()) {
    if (source.available) {
      energy_series.push_back({"/energy/" + source.name + "/joules", static_cast<int64_t>(source.read_by.size()), "J"});
    }
  }

  // ---- the outputs of rank 0, created and checked before any step; every rank learns the verdict -----
  std::shared_ptr<ResultWriter> writer;
  std::unique_ptr<OutputFile> json_log, trace_file;
  std::string create_error;
  int create_code = kExitComplete;
  if (lead) {
    try {
      writer = std::make_shared<ResultWriter>(ResultFileRequest{opt.out, opt.app, opt.cluster, opt.world_size,
                                                                opt.steps, opt.overwrite, energy_series});
      nlohmann::ordered_json config = describe_options(opt, app.options);
      config["padded_vocab"] = opt.model.padded_vocab(layout.tp);  // as embed.tok and head.w are stored
      writer->write_config(describe_precision(config, precision_of(opt), *backend), opt.argv);
      writer->write_system(sys);
      write_energy_sources(*writer, energy.sources());
      writer->commit_header();
      json_log = std::make_unique<OutputFile>(
          "--json-log", opt.json_log,
          std::vector<std::pair<const char*, std::string>>{{"--out", writer->path()}, {"--dump-gradients", opt.dump_gradients}});
      trace_file = std::make_unique<OutputFile>(
          "--trace", opt.trace,
          std::vector<std::pair<const char*, std::string>>{
              {"--out", writer->path()}, {"--json-log", opt.json_log}, {"--dump-gradients", opt.dump_gradients}});
      if (same_file(opt.dump_gradients, writer->path())) {
        throw RunError(kExitConfig, "--dump-gradients " + opt.dump_gradients + " is the file of --out too");
      }
      writer->publish();
    } catch (const RunError& e) {
      create_error = e.what();
      create_code = e.code;
      if (trace_file) trace_file->discard();
      if (json_log) json_log->discard();
      if (writer) writer->discard();
      writer.reset();
    }
  }
  double create_failed = create_code;
  world.all_reduce_host(&create_failed, 1, HostReduce::max);
  if (create_failed != 0.0) {
    if (lead) std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), create_error.c_str());
    return static_cast<int>(create_failed);
  }
  // From here a failure of this process (a failed MPI, CUDA or HDF5 call, out of memory) marks the
  // file failed with its message before the job is aborted.
  if (lead) set_abort_hook([writer](const std::string& message) { writer->mark_failed(message); });

  const Precision precision = precision_of(opt);
  GptModel model(opt.model, *backend, opt.micro_batch, opt.recompute, mp, parts, precision.compute);
  TraceRecorder trace(!opt.trace.empty(), wall_time_s());
  Runtime runtime{opt, groups, *backend, model, trace, mp, precision};
  std::unique_ptr<Strategy> strategy = app.make_strategy(runtime);
  SyntheticData data(opt.seed, opt.model.vocab, opt.model.seq);
  const FlopModel flops = model_flops(opt, parts.mlp);

  const int b = opt.micro_batch, S = opt.model.seq;
  const float loss_scale = 1.0f / (static_cast<float>(opt.global_batch) * S);  // mean over G·S tokens
  std::vector<StepRecord> records;
  std::vector<std::vector<std::vector<double>>> energy_rows(energy.sources().size());  // [source][step][column]
  std::vector<float> step0_grads;
  std::vector<double> dump_losses, dump_norms;
  std::string status = "complete", error;
  int exit_code = kExitComplete;
  std::string write_error;  // rank 0: the first failed write of its outputs

  for (int step = 0; step < opt.steps; ++step) {
    const double t_arrive = wall_time_s();
    world.barrier();  // steps start together, so a rank's time is its own work and waiting
    const double t0 = wall_time_s();
    energy.start();
    trace.span(TraceTrack::idle, "step barrier", t_arrive, t0);
    const std::uint64_t waits_before = backend->host_waits();
    backend->tracker().mark(MemoryMark::step_begin);
    strategy->zero_grads();
    StepBatches batches;
    batches.step = step;
    batches.count = opt.grad_accum;
    batches.loss_scale = loss_scale;
    batches.fill = [&](int micro, int32_t* tokens_out, int32_t* targets_out) {
      data.samples(first_sample(step, opt.global_batch, micro, b, opt.dp, groups.coord.dp), b, tokens_out,
                   targets_out);
    };
    strategy->run_micro_batches(runtime, batches);
    const double t_sync = wall_time_s();
    strategy->finish_gradients();
    trace.span(TraceTrack::communication, "finish gradients", t_sync, wall_time_s());
    double loss = strategy->reduce_loss(model.take_loss());
    groups.dp->all_reduce_host(&loss, 1, HostReduce::sum);
    const double grad_norm = std::sqrt(strategy->global_grad_sum_squares());
    if (!opt.dump_gradients.empty()) {
      if (step == 0) step0_grads = strategy->gather_full_gradients();
      dump_losses.push_back(loss);
      dump_norms.push_back(grad_norm);
    }
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      status = "failed";
      error = "numerical failure at step " + std::to_string(step + 1) + ": loss " + std::to_string(loss) +
              ", grad_norm " + std::to_string(grad_norm);
      exit_code = kExitNumerical;
      if (lead) std::fprintf(stderr, "parabench-%s: %s\n", opt.app.c_str(), error.c_str());
      break;
    }
    const float grad_scale = clip_scale(grad_norm, opt.clip);
    const double t_opt = wall_time_s();
    backend->tracker().mark(MemoryMark::optimizer_begin);
    strategy->optimizer_step(grad_scale, step + 1);
    backend->synchronize();
    backend->tracker().mark(MemoryMark::step_end);
    trace.span(TraceTrack::compute, "optimizer", t_opt, wall_time_s());
    const double elapsed = wall_time_s() - t0;
    const std::vector<double> joules = energy.stop();

    StepRecord rec{loss, grad_norm, 0.0, std::vector<double>(opt.world_size),
                   static_cast<double>(backend->host_waits() - waits_before)};
    // each rank's time and the joules of the counters it reads, in one message
    std::vector<double> mine{elapsed};
    mine.insert(mine.end(), joules.begin(), joules.end());
    std::vector<double> all(mine.size() * opt.world_size);
    world.all_gather_host(mine.data(), all.data(), mine.size() * sizeof(double));
    for (int r = 0; r < opt.world_size; ++r) rec.rank_times[r] = all[r * mine.size()];
    rec.time_max_s = *std::max_element(rec.rank_times.begin(), rec.rank_times.end());
    std::vector<std::vector<double>> series_rows;  // the sources with counters, as energy_series
    for (std::size_t src = 0; src < energy.sources().size(); ++src) {
      const EnergySource& source = energy.sources()[src];
      std::vector<double> row;
      for (int reader : source.read_by) row.push_back(reader >= 0 ? all[reader * mine.size() + 1 + src] : std::nan(""));
      energy_rows[src].push_back(row);
      if (source.available) series_rows.push_back(row);
    }
    double maxima[2] = {static_cast<double>(backend->tracker().snapshot().peak_total), rec.host_waits};
    world.all_reduce_host(maxima, 2, HostReduce::max);
    const double peak = maxima[0];
    rec.host_waits = maxima[1];
    records.push_back(rec);

    if (lead) {
      try {
        writer->append_step(loss, grad_norm, rec.rank_times, series_rows);
      } catch (const RunError& e) {
        if (write_error.empty()) write_error = e.what();
      }
      const double tokens_per_s = opt.tokens_per_step() / rec.time_max_s;
      const double tflops = flops.flops_per_step / rec.time_max_s / opt.world_size / 1e12;
      if (talk) {
        std::printf("step %4d/%d  loss %.6f  grad_norm %.4f  time %.4f s  tokens/s %.0f  TFLOP/s/rank %.3f  peak %s MiB%s\n",
                    step + 1, opt.steps, loss, grad_norm, rec.time_max_s, tokens_per_s, tflops,
                    format_mib(static_cast<int64_t>(peak)).c_str(), step < opt.warmup ? "  (warm-up)" : "");
        std::fflush(stdout);
      }
      nlohmann::ordered_json j;
      j["step"] = step + 1;
      j["loss"] = loss;
      j["grad_norm"] = grad_norm;
      j["step_time_s"] = rec.time_max_s;
      j["tokens_per_s"] = tokens_per_s;
      j["tflops_per_rank"] = tflops;
      j["peak_mem_bytes"] = static_cast<int64_t>(peak);
      j["warmup"] = step < opt.warmup;
      try {
        json_log->write(j.dump() + "\n");
      } catch (const RunError& e) {
        if (write_error.empty()) write_error = e.what();
      }
    }

    double stop = !write_error.empty() ? kStopWriteFailed : static_cast<double>(g_stop_signal);
    world.all_reduce_host(&stop, 1, HostReduce::max);
    if (stop == kStopWriteFailed) {
      status = "failed";
      error = "stopped after step " + std::to_string(step + 1) + " of " + std::to_string(opt.steps) + ": " + write_error;
      exit_code = kExitRuntime;
      if (lead) std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), error.c_str());
      break;
    }
    if (stop != 0.0 && step + 1 < opt.steps) {
      const int sig = static_cast<int>(stop);
      status = "interrupted";
      error = std::string("stopped by ") + signal_name(sig) + " after step " + std::to_string(step + 1) + " of " +
              std::to_string(opt.steps);
      exit_code = signal_exit_code(sig);
      if (lead) std::fprintf(stderr, "parabench-%s: %s\n", opt.app.c_str(), error.c_str());
      break;
    }
  }

  // ---- summary over the measured steps (after warm-up; all finished steps if fewer) ---------------
  std::vector<int> measured_steps;
  for (std::size_t i = 0; i < records.size(); ++i) {
    if (static_cast<int>(i) >= opt.warmup) measured_steps.push_back(static_cast<int>(i));
  }
  if (measured_steps.empty()) {
    for (std::size_t i = 0; i < records.size(); ++i) measured_steps.push_back(static_cast<int>(i));
  }
  std::vector<double> measured;
  std::vector<std::vector<double>> rank_times;
  double host_waits = 0.0;  // the most in a measured step
  for (const StepRecord& r : records) rank_times.push_back(r.rank_times);
  for (int i : measured_steps) {
    measured.push_back(records[i].time_max_s);
    host_waits = std::max(host_waits, records[i].host_waits);
  }
  const double step_time = median(measured);
  const double tokens_per_s = opt.tokens_per_step() / step_time;
  const double tflops_per_rank = flops.flops_per_step / step_time / opt.world_size / 1e12;
  const double mfu = opt.peak_tflops > 0.0 ? tflops_per_rank / opt.peak_tflops : std::nan("");
  const double final_param_norm = std::sqrt(strategy->global_param_sum_squares());

  // ---- memory and communication, gathered per rank ------------------------------------------------
  const MemorySnapshot snap = backend->tracker().snapshot();
  auto gather_i64 = [&](int64_t v) {
    std::vector<int64_t> all(opt.world_size);
    world.all_gather_host(&v, all.data(), sizeof(int64_t));
    return all;
  };
  auto gather_f64 = [&](double v) {
    std::vector<double> all(opt.world_size);
    world.all_gather_host(&v, all.data(), sizeof(double));
    return all;
  };
  std::vector<std::vector<int64_t>> measured_mem;
  for (MemCategory c : all_mem_categories()) measured_mem.push_back(gather_i64(snap.peak[static_cast<int>(c)]));
  const std::vector<int64_t> measured_peak = gather_i64(snap.peak_total);
  const int64_t device_bytes = backend->device_memory_peak_bytes();
  const std::vector<int64_t> device_peak = gather_i64(device_bytes >= 0 ? device_bytes : process_peak_rss_bytes());
  CommStats comm{};
  for (const Communicator* c : groups.all()) {
    for (int op = 0; op < kNumCommOps; ++op) {
      comm[op].calls += c->stats()[op].calls;
      comm[op].bytes += c->stats()[op].bytes;
      comm[op].time_s += c->stats()[op].time_s;
    }
  }
  std::vector<std::vector<int64_t>> comm_calls, comm_bytes;
  std::vector<std::vector<double>> comm_time;
  for (int op = 0; op < kNumCommOps; ++op) {
    comm_calls.push_back(gather_i64(comm[op].calls));
    comm_bytes.push_back(gather_i64(comm[op].bytes));
    comm_time.push_back(gather_f64(comm[op].time_s));
  }
  // The same per process group (every rank has the same list): calls and bytes of each group and
  // operation, gathered in one message as [rank][group][op][calls, bytes].
  const auto named_groups = groups.named();
  const std::size_t per_rank = named_groups.size() * kNumCommOps * 2;
  std::vector<int64_t> mine;
  for (const auto& [name, c] : named_groups) {
    for (int op = 0; op < kNumCommOps; ++op) {
      mine.push_back(c->stats()[op].calls);
      mine.push_back(c->stats()[op].bytes);
    }
  }
  std::vector<int64_t> by_group(per_rank * opt.world_size);
  world.all_gather_host(mine.data(), by_group.data(), per_rank * sizeof(int64_t));

  if (trace.enabled()) {
    try {
      const std::string text = trace.gather(world, sys.hostnames);
      if (lead) {
        trace_file->write(text);
        trace_file->close();
      }
    } catch (const RunError& e) {
      if (write_error.empty()) write_error = e.what();
    }
  }
  try {
    strategy->write_results(world, lead ? writer.get() : nullptr);
  } catch (const RunError& e) {  // rank 0's writes, after the strategy's collectives
    if (write_error.empty()) write_error = e.what();
  }
  double nondeterministic = backend->deterministic() ? 0.0 : 1.0;  // any rank's
  world.all_reduce_host(&nondeterministic, 1, HostReduce::max);
  if (!lead) return rank0_exit_code(world, exit_code);
  if (!opt.dump_gradients.empty()) write_dump(opt, app.options, model, step0_grads, dump_losses, dump_norms);

  nlohmann::ordered_json summary;
  summary["measured_steps"] = static_cast<int64_t>(measured.size());
  summary["step_time_s"] = step_time;
  summary["step_time_s_min"] = measured.empty() ? std::nan("") : *std::min_element(measured.begin(), measured.end());
  summary["step_time_s_max"] = measured.empty() ? std::nan("") : *std::max_element(measured.begin(), measured.end());
  summary["tokens_per_s"] = tokens_per_s;
  summary["model_flops_per_step"] = flops.flops_per_step;
  summary["model_flops_formula"] = flops.formula;
  summary["tflops_per_rank"] = tflops_per_rank;
  summary["peak_tflops_per_rank"] = opt.peak_tflops;
  summary["mfu"] = mfu;
  summary["host_waits_per_step"] = static_cast<int64_t>(host_waits);
  summary["deterministic"] = static_cast<int64_t>(1.0 - nondeterministic);
  summary["final_loss"] = records.empty() ? std::nan("") : records.back().loss;
  summary["final_param_norm"] = final_param_norm;
  const nlohmann::ordered_json energy_figures =
      energy_summary(energy.sources(), energy_rows, rank_times, measured_steps, static_cast<double>(opt.tokens_per_step()));
  for (const auto& [key, value] : energy_figures.items()) summary[key] = value;
  nlohmann::ordered_json strategy_summary = nlohmann::ordered_json::object();
  strategy->summary_attributes(strategy_summary);
  for (const auto& [key, value] : strategy_summary.items()) summary[key] = value;
  try {
    write_summary(*writer, summary, predicted, measured_mem, measured_peak, device_peak, comm_calls, comm_bytes, comm_time);
    // /comm_groups/<group>/<op>/{calls,bytes} [ranks]: the operations a group carried on some rank.
    for (std::size_t g = 0; g < named_groups.size(); ++g) {
      for (int op = 0; op < kNumCommOps; ++op) {
        std::vector<int64_t> calls(opt.world_size), bytes(opt.world_size);
        bool used = false;
        for (int r = 0; r < opt.world_size; ++r) {
          const std::size_t at = r * per_rank + (g * kNumCommOps + op) * 2;
          calls[r] = by_group[at];
          bytes[r] = by_group[at + 1];
          used = used || calls[r] > 0;
        }
        if (!used) continue;
        const std::string base = "/comm_groups/" + named_groups[g].first + "/" + comm_op_name(static_cast<CommOp>(op));
        writer->write_i64(base + "/calls", calls, "1");
        writer->write_i64(base + "/bytes", bytes, "bytes");
      }
    }
  } catch (const RunError& e) {
    if (write_error.empty()) write_error = e.what();
  }
  try {
    json_log->close();
  } catch (const RunError& e) {
    if (write_error.empty()) write_error = e.what();
  }
  if (!write_error.empty() && exit_code != kExitRuntime) {  // a failure at the end: the steps are measured
    status = "failed";
    error = write_error;
    exit_code = kExitRuntime;
    std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), error.c_str());
  }
  if (writer->broken()) {
    writer->mark_failed(error);
  } else {
    try {
      writer->set_status(status, error);
    } catch (const RunError& e) {
      // The summary is lost; the steps flushed so far stay readable.
      status = "failed";
      error = e.what();
      exit_code = kExitRuntime;
      std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), error.c_str());
      writer->mark_failed(error);
    }
  }

  try {
    writer->close();
  } catch (const RunError& e) {
    status = "failed";
    error = e.what();
    exit_code = kExitRuntime;
    std::fprintf(stderr, "parabench-%s: error: %s\n", opt.app.c_str(), error.c_str());
  }

  const int64_t peak_max = *std::max_element(measured_peak.begin(), measured_peak.end());
  if (talk) {
    std::printf("\nsummary: %zu measured step(s), status %s\n", measured.size(), status.c_str());
    std::printf("  %-22s %12.4f   (min %.4f, max %.4f)\n", "step time (s), median", step_time,
                summary["step_time_s_min"].get<double>(), summary["step_time_s_max"].get<double>());
    std::printf("  %-22s %12.0f\n", "tokens/s", tokens_per_s);
    std::printf("  %-22s %12.4f\n", "TFLOP/s per rank", tflops_per_rank);
    std::printf("  %-22s %12.4f\n", "MFU", mfu);
    std::printf("  %-22s %12.6f\n", "final loss", summary["final_loss"].get<double>());
    print_energy(energy.sources(), energy_figures);
    for (const auto& [key, value] : strategy_summary.items()) {
      if (value.is_number()) std::printf("  %-22s %12.4f\n", key.c_str(), value.get<double>());
    }
    std::printf("  memory per rank, max over ranks (MiB):   predicted    measured\n");
    int ci = 0;
    for (MemCategory c : all_mem_categories()) {
      int64_t pmax = 0;
      for (const MemoryEstimate& e : predicted) pmax = std::max(pmax, e[c]);
      const int64_t mmax = *std::max_element(measured_mem[ci].begin(), measured_mem[ci].end());
      ++ci;
      std::printf("    %-20s %20s %11s\n", mem_category_name(c), format_mib(pmax).c_str(), format_mib(mmax).c_str());
    }
    int64_t ppmax = 0;
    for (const MemoryEstimate& e : predicted) ppmax = std::max(ppmax, e.peak_total);
    std::printf("    %-20s %20s %11s\n", "peak_total", format_mib(ppmax).c_str(), format_mib(peak_max).c_str());
    std::printf("    %-20s %20s %11s\n", "process (VmHWM)", "",
                format_mib(*std::max_element(device_peak.begin(), device_peak.end())).c_str());
    std::printf("  communication (rank 0):");
    for (int op = 0; op < kNumCommOps; ++op) {
      if (comm_calls[op][0] > 0) {
        std::printf(" %s %lld calls %s MiB %.4f s;", comm_op_name(static_cast<CommOp>(op)),
                    static_cast<long long>(comm_calls[op][0]), format_mib(comm_bytes[op][0]).c_str(),
                    comm_time[op][0]);
      }
    }
    std::printf("\n  result file: %s\n", writer->path().c_str());
  }
  std::printf("PARABENCH_RESULT app=%s ranks=%d step_time_s=%.6g tokens_per_s=%.6g tflops_per_rank=%.6g mfu=%s "
              "peak_mem_bytes=%lld status=%s file=%s\n",
              opt.app.c_str(), opt.world_size, step_time, tokens_per_s, tflops_per_rank,
              format_g(mfu).c_str(), static_cast<long long>(peak_max), status.c_str(),
              writer->path().c_str());
  std::fflush(stdout);
  set_abort_hook(nullptr);
  return rank0_exit_code(world, exit_code);
}

}  // namespace

void Strategy::run_micro_batches(Runtime& rt, const StepBatches& batches) {
  const int b = rt.options.micro_batch, S = rt.options.model.seq;
  const std::size_t n = static_cast<std::size_t>(b) * S;
  std::vector<int32_t> tokens(n), targets(n);
  // Context parallelism: the model takes each sequence's tokens at this rank's positions.
  const ContextParallel& cp = rt.mp.cp;
  std::vector<int32_t> local_tokens(n / cp.size), local_targets(n / cp.size);
  for (int micro = 0; micro < batches.count; ++micro) {
    batches.fill(micro, tokens.data(), targets.data());
    cp.select_local(tokens.data(), local_tokens.data(), b, S);
    cp.select_local(targets.data(), local_targets.data(), b, S);
    const double t0 = wall_time_s();
    begin_micro_batch(micro, micro == batches.count - 1);
    rt.model.forward_backward(local_tokens.data(), local_targets.data(), batches.loss_scale, *this);
    rt.trace.span(TraceTrack::compute, "forward+backward", t0, wall_time_s(),
                  "{\"step\": " + std::to_string(batches.step + 1) + ", \"micro_batch\": " + std::to_string(micro) + "}");
  }
}

int run_app(int argc, char** argv, const AppDefinition& app) {
  disable_hdf5_exit_handler();
  int provided = 0;
#ifdef PB_WITH_CUDA
  cuda_prepare_environment();  // before MPI's and CUDA's threads
#endif
  PB_MPI_CHECK(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided));
  int exit_code = kExitComplete;
  {
    MpiCommunicator world(MPI_COMM_WORLD);
    const NodeLocal local = node_local(MPI_COMM_WORLD);
    Environment env;
    env.world_size = world.size();
    env.cores_per_rank = std::max(1, online_cores() / local.local_size);
    env.slurm_ntasks = std::atoi(env_or("SLURM_NTASKS", "0").c_str());
    env.ranks_per_node = local.local_size;
    env.cpu_gemm_libraries = cpu::sgemm_libraries();
#ifdef PB_WITH_CUDA
    env.cuda_built = true;
    env.visible_gpus = cuda_visible_device_count();
    // The GPU each rank would drive (its node-local rank modulo what it sees, as the backend picks it),
    // by PCI bus id: under srun --gpus-per-task or a per-rank CUDA_VISIBLE_DEVICES each rank sees one GPU,
    // device 0, yet the GPUs differ.
    env.distinct_gpus = node_ranks_hold_distinct_devices(
        MPI_COMM_WORLD, env.visible_gpus > 0 ? cuda_device_pci_bus_id(local.local_rank % env.visible_gpus) : "");
    env.cuda_max_head_dim = kCudaMaxHeadDim;
    env.cudnn_built = cuda_cudnn_attention_built();
#endif

    Options opt;
    const ParseResult parsed = parse_options(app.name, argc, argv, env, app.options, &opt);
    if (!parsed.run) {
      if (world.rank() == 0) {
        std::fprintf(parsed.is_error ? stderr : stdout, parsed.is_error ? "parabench-%s: error: %s\n" : "%s%s\n",
                     parsed.is_error ? app.name.c_str() : "", parsed.message.c_str());
      }
      exit_code = parsed.exit_code;
    } else {
      install_stop_handlers();
      opt.cluster = resolve_cluster_name(opt.cluster);
      try {
        exit_code = train_and_report(app, opt, world);
#ifdef PB_WITH_CUDA
        // A NCCL failure seen only while the run was being released (an abort during a drain): exit 3.
        if (cuda_failed_async()) {
          abort_job(kExitRuntime, __FILE__, __LINE__, "parabench-" + app.name, cuda_async_failure());
        }
#endif
      } catch (const RunError& e) {
        abort_job(e.code, __FILE__, __LINE__, "parabench-" + app.name, e.what());
      } catch (const std::bad_alloc&) {
        abort_job(kExitRuntime, __FILE__, __LINE__, "parabench-" + app.name, "out of memory");
      } catch (const std::exception& e) {
        abort_job(kExitRuntime, __FILE__, __LINE__, "parabench-" + app.name, e.what());
      }
    }
  }
  finalize_mpi_within_time_limit("parabench-" + app.name, exit_code);
  return exit_code;
}

}  // namespace pb
