#include "common/options.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <climits>
#include <cmath>
#include <sstream>

#include "common/errors.h"
#include "common/results.h"

#ifndef PB_VERSION
#define PB_VERSION "0.0.0"
#endif

namespace pb {
namespace {

struct Preset {
  const char* name;
  int layers, hidden, heads, seq, vocab;
  const char* arch = "gpt";
  int kv_heads = 0;  // llama
  int ffn = 0;       // 0: the arch's default (4h; llama: llama_default_ffn)
  double rope_theta = 10000.0;
};
constexpr Preset kPresets[] = {
    {"tiny", 2, 64, 4, 32, 256},           {"small", 4, 256, 8, 128, 4096},
    {"gpt2-124m", 12, 768, 12, 1024, 50257}, {"gpt2-350m", 24, 1024, 16, 1024, 50257},
    {"gpt2-1.5b", 48, 1600, 25, 1024, 50257}, {"block-4k", 4, 4096, 32, 2048, 32000},
    // SPEC 2.5's Llama-style block: a tiny one for tests, and Llama 3.2 1B's shape.
    {"llama-tiny", 2, 64, 4, 32, 256, "llama", 2, 192},
    {"llama3-1b", 16, 2048, 32, 2048, 128256, "llama", 8, 8192, 500000.0},
};

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

[[noreturn]] void reject(const std::string& message) { throw ConfigError(message); }

void require_positive(const char* option, long long value) {
  if (value < 1) reject(std::string(option) + " " + std::to_string(value) + " must be at least 1");
}

// The seed as the spec's 64-bit integer: decimal digits only, at most 2^64 - 1 (no wrapping, no clamping).
uint64_t parse_seed(const std::string& text) {
  const std::string rule = "--seed " + text + " must be an integer from 0 to 18446744073709551615";
  if (text.empty() || text.size() > 20 || text.find_first_not_of("0123456789") != std::string::npos) reject(rule);
  uint64_t value = 0;
  for (char c : text) {
    if (__builtin_mul_overflow(value, uint64_t{10}, &value) ||
        __builtin_add_overflow(value, static_cast<uint64_t>(c - '0'), &value)) {
      reject(rule);
    }
  }
  return value;
}

// Every size the apps and the memory model derive from the options is a sum of a few dozen products
// of these factors, times at most 18 bytes. Each product is checked here in 64 bits and kept under
// 2^50 elements, so that no later sum or byte count can overflow (2^50 · 2^5 bytes · 2^6 terms < 2^63).
constexpr int64_t kMaxElements = int64_t{1} << 50;

int64_t checked_product(const std::string& what, std::initializer_list<std::pair<const char*, int64_t>> factors) {
  int64_t product = 1;
  std::string named;
  for (const auto& [name, value] : factors) named += std::string(named.empty() ? "" : " × ") + name + " " + std::to_string(value);
  for (const auto& [name, value] : factors) {
    if (__builtin_mul_overflow(product, value, &product) || product > kMaxElements) {
      reject("the configuration is too large: " + what + " (" + named + ") exceeds 2^50 elements");
    }
  }
  return product;
}

void check_derived_sizes(const Options& o) {
  const ModelConfig& m = o.model;
  const int64_t b = o.micro_batch, S = m.seq, h = m.hidden, a = m.heads, f = m.ffn, V = m.vocab, L = m.layers;
  checked_product("the token embedding", {{"--vocab", V}, {"--hidden", h}});
  checked_product("the logits of a micro-batch", {{"--micro-batch", b}, {"--seq", S}, {"--vocab", V}});
  // The vocabulary as stored, padded for as many tp ranks as there are ranks (at most).
  checked_product("the padded vocabulary", {{"--make-vocab-size-divisible-by", m.vocab_divisor}, {"ranks", o.world_size}});
  const int64_t Vp = m.padded_vocab(o.world_size);
  if (Vp > INT_MAX) {
    reject("--make-vocab-size-divisible-by " + std::to_string(m.vocab_divisor) + " pads the vocabulary to " +
           std::to_string(Vp) + " entries, more than " + std::to_string(INT_MAX));
  }
  checked_product("the token embedding", {{"the padded vocabulary", Vp}, {"--hidden", h}});
  checked_product("the position embedding", {{"--seq", S}, {"--hidden", h}});
  if (m.llama()) {  // qkv and out at most 4h columns; gate, up and down
    checked_product("the blocks' weights", {{"--layers", L}, {"--hidden", h}, {"4·--hidden + 3·--ffn", 4 * h + 3 * f}});
  } else {
    checked_product("the blocks' weights", {{"--layers", L}, {"--hidden", h}, {"4·--hidden + 2·--ffn", 4 * h + 2 * f}});
  }
  checked_product("the logits of a micro-batch", {{"--micro-batch", b}, {"--seq", S}, {"the padded vocabulary", Vp}});
  checked_product("the activations of a micro-batch", {{"--layers", L}, {"--micro-batch", b}, {"--seq", S},
                                                       {"16·--hidden + 2·--ffn", 16 * h + 2 * f}});
  checked_product("the attention probabilities", {{"--layers", L}, {"--micro-batch", b}, {"--heads", a},
                                                  {"--seq", S}, {"--seq", S}});
  checked_product("the tokens of a step", {{"--global-batch", o.global_batch}, {"--seq", S}});
  if (b * S > INT_MAX) {
    reject("--micro-batch " + std::to_string(b) + " × --seq " + std::to_string(S) + " = " + std::to_string(b * S) +
           " tokens per micro-batch exceeds " + std::to_string(INT_MAX));
  }
  checked_product("the data of a run", {{"--steps", o.steps}, {"--global-batch", o.global_batch}, {"--seq + 1", S + 1}});
}

}  // namespace

bool model_preset(const std::string& name, ModelConfig* out) {
  for (const Preset& p : kPresets) {
    if (name == p.name) {
      *out = ModelConfig{p.name, p.layers, p.hidden, p.heads, p.seq, p.vocab, 4 * p.hidden};
      out->arch = p.arch;
      out->kv_heads = p.kv_heads;
      out->rope_theta = p.rope_theta;
      if (out->llama()) out->ffn = p.ffn > 0 ? p.ffn : static_cast<int>(llama_default_ffn(p.hidden));
      return true;
    }
  }
  return false;
}

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

ParseResult parse_options(const std::string& app_name, int argc, char** argv, const Environment& env,
                          const AppOptions& app_options, Options* o) {
  Options& opt = *o;
  opt.app = app_name;
  opt.world_size = env.world_size;
  for (int i = 0; i < argc; ++i) opt.argv.emplace_back(argv[i]);

  CLI::App cli{"parabench-" + app_name + ": trains the reference transformer with " + app_name +
                   " parallelism and measures it (see docs/SPEC.md)",
               "parabench-" + app_name};
  cli.set_version_flag("--version", std::string("parabench ") + PB_VERSION);
  cli.get_formatter()->column_width(34);

  std::string model_name = "small";
  ModelConfig shape;  // explicit shape options; 0 = from preset
  std::string backend, comm, dtype, attention, cpu_gemm;
  int global_batch = 0, dp = 0, threads = 0;
  double peak = -1.0;

  cli.add_option("--model", model_name, "model preset: " + join(model_preset_names(), ", "))
      ->capture_default_str();
  cli.add_option("--layers", shape.layers, "transformer blocks (overrides the preset)");
  cli.add_option("--hidden", shape.hidden, "hidden size");
  cli.add_option("--heads", shape.heads, "attention heads");
  cli.add_option("--seq", shape.seq, "sequence length");
  cli.add_option("--vocab", shape.vocab, "vocabulary size");
  cli.add_option("--make-vocab-size-divisible-by", shape.vocab_divisor,
                 "store the vocabulary padded to a multiple of this × tp (Megatron-LM's option)")
      ->capture_default_str();
  cli.add_option("--ffn", shape.ffn, "MLP width (default 4·hidden; llama: the multiple of 64 at or above 8·hidden/3)");
  std::string arch;
  cli.add_option("--arch", arch, "gpt | llama: the block of SPEC 2 or 2.5 (default: the preset's, gpt)");
  cli.add_option("--kv-heads", shape.kv_heads, "llama: key/value heads, dividing --heads (default --heads)");
  double rope_theta = 0.0;
  cli.add_option("--rope-theta", rope_theta, "llama: the base of the rotary angles (default 10000)");
  cli.add_option("--micro-batch", opt.micro_batch, "samples per micro-batch")->capture_default_str();
  cli.add_option("--global-batch", global_batch, "samples per step (default micro-batch · dp)");
  cli.add_option("--steps", opt.steps, "training steps")->capture_default_str();
  cli.add_option("--warmup", opt.warmup, "steps left out of the summary")->capture_default_str();
  std::string seed = "1234";
  cli.add_option("--seed", seed, "seed of initialisation and data (0 to 2^64 - 1)")->type_name("UINT64")->capture_default_str();
  cli.add_option("--lr", opt.lr, "AdamW learning rate")->capture_default_str();
  cli.add_option("--clip", opt.clip, "gradient-norm clipping (0: off)")->capture_default_str();
  cli.add_option("--backend", backend, "cpu | cuda (default: cuda when built with CUDA and a GPU is visible)");
  cli.add_option("--comm", comm, "mpi | nccl (default: nccl for cuda when each rank of a node has its own GPU)");
  cli.add_option("--distributed-timeout-minutes", opt.distributed_timeout_minutes,
                 "a NCCL operation unfinished after this long aborts the run (exit 3), as Megatron-LM's")
      ->capture_default_str();
  cli.add_option("--dtype", dtype, "fp32 | bf16 (default fp32 on cpu, bf16 on cuda)");
  cli.add_option("--attention", attention,
                 "native | cudnn: parabench's attention kernels or cuDNN's fused attention (default: cudnn for "
                 "cuda with bf16 where built with cuDNN)");
  cli.add_option("--cpu-gemm", cpu_gemm,
                 "onednn | openblas: the CPU backend's fp32 matrix products (default: onednn where built with it)");
  cli.add_option("--grad-dtype", opt.grad_dtype, "fp32 | bf16: parameter gradients (bf16 only with --dtype bf16)")
      ->capture_default_str();
  cli.add_option("--recompute", opt.recompute, "none | selective | full")->capture_default_str();
  cli.add_option("--dp", dp, "data-parallel degree (default: derived from the world size)");
  cli.add_option("--threads", threads, "compute threads per rank (default: cores per rank)");
  cli.add_option("--out", opt.out, "result directory or .h5 path")->capture_default_str();
  cli.add_option("--cluster", opt.cluster, "cluster name stored with the run");
  cli.add_option("--tag", opt.tag, "free text stored with the run");
  cli.add_option("--peak-tflops", peak, "per-rank peak TFLOP/s for MFU");
  cli.add_option("--trace", opt.trace, "write a Chrome trace JSON to this path");
  cli.add_option("--json-log", opt.json_log, "write one JSON object per step to this path");
  cli.add_option("--memory-log", opt.memory_log,
                 "write each rank's allocations, frees and communicator buffers, in order, to DIR/rank<r>.tsv");
  cli.add_option("--dump-gradients", opt.dump_gradients,
                 "for the reference tests: write losses and the step-0 gradients to this .h5 file");
  cli.add_flag("--dry-run", opt.dry_run, "validate, print the layout, the predicted memory and whether it fits, exit");
  cli.add_flag("--quiet", opt.quiet, "print only the final PARABENCH_RESULT line");
  cli.add_flag("--overwrite", opt.overwrite,
               "replace an existing --out X.h5 (never the file of a run still in progress)");
  bool no_memory_check = false;
  cli.add_flag("--no-memory-check", no_memory_check,
               "run even when the predicted peak memory per rank exceeds what the rank can use");
  if (app_options.add) app_options.add(cli);

  ParseResult result;
  try {
    cli.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    result.message = cli.help();
    return result;
  } catch (const CLI::CallForVersion&) {
    result.message = std::string("parabench ") + PB_VERSION;
    return result;
  } catch (const CLI::ParseError& e) {
    result.exit_code = kExitConfig;
    result.is_error = true;
    result.message = std::string(e.what()) + "\nRun with --help for the options.";
    return result;
  }

  try {
    // ---- model ------------------------------------------------------------------------------------
    if (!model_preset(model_name, &opt.model)) {
      reject("--model " + model_name + " is not a preset; choose one of " + join(model_preset_names(), ", "));
    }
    ModelConfig& m = opt.model;
    // An option given explicitly overrides the preset, whatever its value (0 is then an error).
    auto given = [&](const char* name) { return cli.count(name) > 0; };
    if (given("--layers")) m.layers = shape.layers;
    if (given("--hidden")) m.hidden = shape.hidden;
    if (given("--heads")) m.heads = shape.heads;
    if (given("--seq")) m.seq = shape.seq;
    if (given("--vocab")) m.vocab = shape.vocab;
    m.vocab_divisor = shape.vocab_divisor;
    if (given("--arch")) {
      if (arch != "gpt" && arch != "llama") reject("--arch " + arch + " must be gpt or llama");
      if (arch != m.arch) {  // the preset's kv heads and rotary base belong to its own block
        m.kv_heads = 0;
        m.rope_theta = 10000.0;
      }
      m.arch = arch;
    }
    if (!m.llama()) {
      for (const char* name : {"--kv-heads", "--rope-theta"}) {
        if (given(name)) reject(std::string(name) + " belongs to the llama block: add --arch llama");
      }
    }
    if (given("--kv-heads")) m.kv_heads = shape.kv_heads;
    if (given("--rope-theta")) m.rope_theta = rope_theta;
    const int64_t preset_ffn = m.ffn;
    const bool preset_width = !given("--hidden") && !given("--arch");
    if (given("--ffn")) {
      m.ffn = shape.ffn;
    } else if (m.hidden > INT_MAX / 4) {
      reject("--hidden " + std::to_string(m.hidden) + " is too large: the default --ffn 4 × hidden exceeds " +
             std::to_string(INT_MAX));
    } else if (m.llama()) {  // a llama preset's own width, unless its shape changed
      m.ffn = static_cast<int>(preset_width ? preset_ffn : llama_default_ffn(m.hidden));
    } else {
      m.ffn = 4 * m.hidden;
    }
    for (auto [name, value] : {std::pair{"--layers", m.layers}, {"--hidden", m.hidden}, {"--heads", m.heads},
                               {"--seq", m.seq}, {"--vocab", m.vocab}, {"--ffn", m.ffn},
                               {"--make-vocab-size-divisible-by", m.vocab_divisor}}) {
      require_positive(name, value);
    }
    if (m.hidden % m.heads != 0) {
      reject("--hidden " + std::to_string(m.hidden) + " is not divisible by --heads " + std::to_string(m.heads));
    }
    if (m.llama()) {
      if (given("--kv-heads") && m.kv_heads < 1) {
        reject("--kv-heads " + std::to_string(m.kv_heads) + " must be at least 1");
      }
      if (m.heads % m.kv() != 0) {
        reject("--kv-heads " + std::to_string(m.kv()) + " must divide --heads " + std::to_string(m.heads) +
               " (each key/value head serves heads / kv-heads query heads)");
      }
      if (m.head_dim() % 2 != 0) {
        reject("--hidden " + std::to_string(m.hidden) + " / --heads " + std::to_string(m.heads) + " = head dimension " +
               std::to_string(m.head_dim()) + ": rotary positions (--arch llama) need an even one");
      }
      if (!(m.rope_theta > 1.0 && std::isfinite(m.rope_theta))) {
        reject("--rope-theta " + std::to_string(m.rope_theta) + " must be a finite number above 1");
      }
    }

    // ---- schedule of steps --------------------------------------------------------------------------
    require_positive("--micro-batch", opt.micro_batch);
    require_positive("--steps", opt.steps);
    if (opt.warmup < 0) reject("--warmup " + std::to_string(opt.warmup) + " must not be negative");
    if (opt.warmup >= opt.steps) {
      reject("--warmup " + std::to_string(opt.warmup) + " must be less than --steps " + std::to_string(opt.steps) +
             " so that at least one step is measured");
    }
    if (!(opt.lr > 0.0 && std::isfinite(opt.lr))) reject("--lr " + std::to_string(opt.lr) + " must be a finite positive number");
    if (!(opt.clip >= 0.0 && std::isfinite(opt.clip))) {
      reject("--clip " + std::to_string(opt.clip) + " must be 0 (off) or a finite positive number");
    }

    // ---- backend, communicator, precision -------------------------------------------------------------
    if (backend.empty()) backend = env.cuda_built && env.visible_gpus > 0 ? "cuda" : "cpu";
    if (backend != "cpu" && backend != "cuda") reject("--backend " + backend + " must be cpu or cuda");
    if (backend == "cuda" && !env.cuda_built) {
      reject("--backend cuda is not available: this build has no CUDA backend (configure with --preset cuda)");
    }
    if (backend == "cuda" && env.visible_gpus == 0) reject("--backend cuda needs a visible GPU, and none is");
    opt.backend = backend;
    // NCCL takes one GPU per rank: ranks that share a GPU communicate through MPI.
    const bool own_gpu = backend == "cuda" && env.distinct_gpus;
    if (comm.empty()) comm = own_gpu ? "nccl" : "mpi";
    if (comm != "mpi" && comm != "nccl") reject("--comm " + comm + " must be mpi or nccl");
    if (comm == "nccl" && backend != "cuda") reject("--comm nccl needs --backend cuda");
    if (comm == "nccl" && !own_gpu) {
      reject("--comm nccl needs a GPU of its own for every rank, and the " + std::to_string(env.ranks_per_node) +
             " ranks of a node share GPUs (each sees " + std::to_string(env.visible_gpus) + "): use --comm mpi");
    }
    opt.comm = comm;
    if (!(opt.distributed_timeout_minutes > 0.0)) {
      reject("--distributed-timeout-minutes " + std::to_string(opt.distributed_timeout_minutes) + " must be positive");
    }
    if (dtype.empty()) dtype = backend == "cuda" ? "bf16" : "fp32";
    if (dtype != "fp32" && dtype != "bf16") reject("--dtype " + dtype + " must be fp32 or bf16");
    opt.dtype = dtype;
    if (opt.grad_dtype != "fp32" && opt.grad_dtype != "bf16") {
      reject("--grad-dtype " + opt.grad_dtype + " must be fp32 or bf16");
    }
    if (opt.grad_dtype == "bf16" && dtype != "bf16") reject("--grad-dtype bf16 needs --dtype bf16");
    if (backend == "cuda" && m.hidden / m.heads > env.cuda_max_head_dim) {
      reject("--hidden " + std::to_string(m.hidden) + " / --heads " + std::to_string(m.heads) + " = head dimension " +
             std::to_string(m.hidden / m.heads) + ": the CUDA attention takes at most " +
             std::to_string(env.cuda_max_head_dim));
    }
    // cuDNN's fused attention: bf16 tensors, head dimensions in multiples of 8; parabench's own kernels
    // stay selectable, so a cuDNN problem on a cluster never blocks a run.
    const int head_dim = m.hidden / m.heads;
    const bool cudnn_fits = backend == "cuda" && env.cudnn_built && dtype == "bf16" && head_dim % 8 == 0;
    if (attention.empty()) attention = cudnn_fits ? "cudnn" : "native";
    if (attention != "native" && attention != "cudnn") reject("--attention " + attention + " must be native or cudnn");
    if (attention == "cudnn" && !cudnn_fits) {
      if (backend != "cuda") reject("--attention cudnn needs --backend cuda");
      if (!env.cudnn_built) {
        reject("--attention cudnn is not available: this build has no cuDNN attention (configure with cuDNN 9 and "
               "the cuDNN frontend's headers, which scripts/setup.sh fetches); use --attention native");
      }
      if (dtype != "bf16") reject("--attention cudnn takes --dtype bf16 (fp32 attention runs --attention native)");
      reject("--attention cudnn takes head dimensions in multiples of 8, not --hidden " + std::to_string(m.hidden) +
             " / --heads " + std::to_string(m.heads) + " = " + std::to_string(head_dim) + "; use --attention native");
    }
    opt.attention = attention;
    // The CPU's sgemm library: oneDNN's where the build has it, else OpenBLAS's; either stays selectable.
    const std::vector<std::string>& gemms = env.cpu_gemm_libraries;
    if (!given("--cpu-gemm")) cpu_gemm = backend == "cpu" ? gemms.front() : "none";
    else if (backend != "cpu") reject("--cpu-gemm applies to --backend cpu (the CUDA backend's products run cuBLAS)");
    if (backend == "cpu" && std::find(gemms.begin(), gemms.end(), cpu_gemm) == gemms.end()) {
      if (cpu_gemm == "onednn") {
        reject("--cpu-gemm onednn is not available: this build has no oneDNN (Debian: libdnnl-dev, which "
               "scripts/setup.sh installs); use --cpu-gemm openblas");
      }
      reject("--cpu-gemm " + cpu_gemm + " must be onednn or openblas");
    }
    opt.cpu_gemm = cpu_gemm;
    if (opt.recompute != "none" && opt.recompute != "selective" && opt.recompute != "full") {
      reject("--recompute " + opt.recompute + " must be none, selective or full");
    }

    // ---- layout -----------------------------------------------------------------------------------------
    const int model_parallel = app_options.model_parallel_size();
    if (env.world_size % model_parallel != 0) {
      reject("the world size " + std::to_string(env.world_size) + " (MPI ranks) is not divisible by " +
             app_options.model_parallel_options() + " (product " + std::to_string(model_parallel) + ")");
    }
    const int derived_dp = env.world_size / model_parallel;
    if (given("--dp") && dp != derived_dp) {
      reject("--dp " + std::to_string(dp) + " does not match the world size: " + std::to_string(env.world_size) +
             " ranks / " + std::to_string(model_parallel) + " give dp " + std::to_string(derived_dp));
    }
    opt.dp = derived_dp;
    const int64_t per_step = int64_t{opt.micro_batch} * opt.dp;
    if (!given("--global-batch") && per_step > INT_MAX) {
      reject("--micro-batch " + std::to_string(opt.micro_batch) + " × dp " + std::to_string(opt.dp) + " = " +
             std::to_string(per_step) + " samples per step exceeds " + std::to_string(INT_MAX) +
             " (the global batch)");
    }
    opt.global_batch = given("--global-batch") ? global_batch : static_cast<int>(per_step);
    require_positive("--global-batch", opt.global_batch);
    if (opt.global_batch % per_step != 0) {
      reject("--global-batch " + std::to_string(opt.global_batch) + " is not a multiple of --micro-batch " +
             std::to_string(opt.micro_batch) + " × dp " + std::to_string(opt.dp) + " = " + std::to_string(per_step));
    }
    opt.grad_accum = static_cast<int>(opt.global_batch / per_step);

    if (given("--threads")) require_positive("--threads", threads);
    opt.threads = given("--threads") ? threads : std::max(1, env.cores_per_rank);
    if (given("--peak-tflops") && !(peak >= 0.0 && std::isfinite(peak))) {
      reject("--peak-tflops " + std::to_string(peak) + " must be a finite number ≥ 0");
    }
    opt.peak_tflops = given("--peak-tflops") ? peak : -1.0;
    opt.seed = parse_seed(seed);
    if (opt.out.empty()) reject("--out must not be empty");
    for (const auto& [name, value] : {std::pair{"--out", &opt.out}, {"--trace", &opt.trace}, {"--json-log", &opt.json_log},
                                    {"--memory-log", &opt.memory_log}}) {
      for (char c : *value) {
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) reject(std::string(name) + " must not contain control characters");
      }
    }
    if (int64_t{opt.steps} * env.world_size > kMaxStepEntries) {
      reject("--steps " + std::to_string(opt.steps) + " × " + std::to_string(env.world_size) +
             " ranks exceeds the result file's " + std::to_string(kMaxStepEntries) + " per-step time entries");
    }
    check_derived_sizes(opt);
    opt.memory_check = !no_memory_check;

    if (app_options.validate) app_options.validate(opt);

    if (env.slurm_ntasks > 1 && env.world_size == 1) {
      reject("SLURM_NTASKS is " + std::to_string(env.slurm_ntasks) +
             " but MPI sees one rank: the app was built or launched without the cluster's MPI "
             "(use srun --mpi=pmi2|pmix or the MPI's mpiexec)");
    }
  } catch (const ConfigError& e) {
    result.exit_code = kExitConfig;
    result.is_error = true;
    result.message = e.what();
    return result;
  }
  result.run = true;
  return result;
}

nlohmann::ordered_json describe_options(const Options& o, const AppOptions& app_options) {
  nlohmann::ordered_json c;
  c["app"] = o.app;
  c["model"] = o.model.name;
  c["layers"] = o.model.layers;
  c["hidden"] = o.model.hidden;
  c["heads"] = o.model.heads;
  c["seq"] = o.model.seq;
  c["vocab"] = o.model.vocab;
  c["make_vocab_size_divisible_by"] = o.model.vocab_divisor;
  c["ffn"] = o.model.ffn;
  c["arch"] = o.model.arch;
  c["kv_heads"] = o.model.kv();
  c["rope_theta"] = o.model.rope_theta;
  c["micro_batch"] = o.micro_batch;
  c["global_batch"] = o.global_batch;
  c["grad_accum"] = o.grad_accum;
  c["steps"] = o.steps;
  c["warmup"] = o.warmup;
  c["seed"] = o.seed;
  c["lr"] = o.lr;
  c["clip"] = o.clip;
  c["backend"] = o.backend;
  c["comm"] = o.comm;
  c["distributed_timeout_minutes"] = o.distributed_timeout_minutes;
  c["dtype"] = o.dtype;
  c["attention"] = o.attention;
  c["cpu_gemm"] = o.cpu_gemm;
  c["grad_dtype"] = o.grad_dtype;
  c["recompute"] = o.recompute;
  c["dp"] = o.dp;
  c["threads"] = o.threads;
  c["world_size"] = o.world_size;
  c["out"] = o.out;
  c["cluster"] = o.cluster;
  c["tag"] = o.tag;
  c["peak_tflops"] = o.peak_tflops;
  c["trace"] = o.trace;
  c["json_log"] = o.json_log;
  c["dry_run"] = o.dry_run;
  c["quiet"] = o.quiet;
  c["overwrite"] = o.overwrite;
  c["memory_check"] = o.memory_check;
  if (app_options.describe) app_options.describe(c);
  return c;
}

}  // namespace pb
