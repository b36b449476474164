// The command line of SPEC section 4, parsed with CLI11 and validated identically on every rank
// before anything is allocated. Apps add their own options through `AppOptions`.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace CLI {
class App;
}

namespace pb {

// The vocabulary as stored (SPEC 2, Megatron-LM's padding): the smallest multiple of divisor · tp that
// is at least vocab.
inline int64_t padded_vocab_size(int64_t vocab, int64_t divisor, int64_t tp) {
  const int64_t multiple = divisor * tp;
  return (vocab + multiple - 1) / multiple * multiple;
}

struct ModelConfig {
  std::string name = "small";
  int layers = 0, hidden = 0, heads = 0, seq = 0, vocab = 0, ffn = 0;
  // Megatron-LM's make-vocab-size-divisible-by: embed.tok and head.w are stored with the vocabulary
  // padded to a multiple of vocab_divisor · tp (SPEC 2.1), so that the logits' GEMMs and each tensor-
  // parallel rank's block stay aligned. The padding is zero and masked out of the loss.
  int vocab_divisor = 128;
  // The block (SPEC 2.5): "gpt" (section 2) or "llama" (RMSNorm, rotary positions, grouped-query
  // attention with kv_heads key/value heads, a SiLU-gated MLP, no biases).
  std::string arch = "gpt";
  int kv_heads = 0;  // 0: heads (the gpt block always)
  double rope_theta = 10000.0;
  bool llama() const { return arch == "llama"; }
  int head_dim() const { return hidden / heads; }
  int kv() const { return kv_heads > 0 ? kv_heads : heads; }
  // Columns of attn.qkv.w: [Q | K | V], Q of all heads, K and V of the kv heads.
  int64_t qkv_width() const { return int64_t{heads + 2 * kv()} * head_dim(); }
  int64_t padded_vocab(int tp = 1) const { return padded_vocab_size(vocab, vocab_divisor, tp); }
};

// The llama block's default MLP width (SPEC 2.5): the smallest multiple of 64 that is at least 8h/3.
inline int64_t llama_default_ffn(int64_t hidden) { return (8 * hidden + 3 * 64 - 1) / (3 * 64) * 64; }

// Looks up a preset of SPEC section 4; false when unknown.
bool model_preset(const std::string& name, ModelConfig* out);
std::vector<std::string> model_preset_names();

struct Options {
  std::string app;
  ModelConfig model;
  int micro_batch = 1;
  int global_batch = 0;  // 0: micro_batch · dp
  int steps = 10;
  int warmup = 2;
  uint64_t seed = 1234;
  double lr = 3e-4;
  double clip = 1.0;
  std::string backend;  // resolved: "cpu" or "cuda"
  std::string comm;     // resolved: "mpi" or "nccl"
  double distributed_timeout_minutes = 10.0;  // a NCCL operation unfinished after this aborts the run
  std::string dtype;    // resolved: "fp32" or "bf16" (parameters and activations)
  std::string attention;  // resolved: "native" (parabench's kernels) or "cudnn" (cuDNN's fused attention)
  std::string cpu_gemm;   // resolved: "onednn" or "openblas" (the CPU backend's fp32 products); "none" on cuda
  std::string grad_dtype = "fp32";  // parameter gradients: "fp32" or "bf16" (only with --dtype bf16)
  std::string recompute = "none";
  int dp = 0;           // 0 until resolved
  int threads = 0;      // 0 until resolved
  std::string out = "results/";
  std::string cluster;
  std::string tag;
  double peak_tflops = -1.0;  // < 0: from the device table
  std::string trace;
  std::string json_log;
  std::string memory_log;  // a directory: each rank's allocation history (common/memory_log.h)
  std::string dump_gradients;  // tests only: see write_gradient_dump
  bool dry_run = false;
  bool quiet = false;
  bool overwrite = false;     // --out X.h5 may replace an existing file (not one a running run holds)
  bool memory_check = true;   // refuse a run whose predicted peak does not fit (--no-memory-check: off)

  // Derived by validation.
  int world_size = 1;
  int grad_accum = 1;
  std::vector<std::string> argv;

  int64_t tokens_per_step() const { return int64_t{global_batch} * model.seq; }
};

// What an app adds: its options on the parser, its checks, and its resolved values for /config.
struct AppOptions {
  std::function<void(CLI::App&)> add;
  // Product of the app's non-data-parallel degrees (tp · pp · cp); dp = world / this.
  std::function<int()> model_parallel_size = [] { return 1; };
  // The options behind that product, for messages ("--tp 4").
  std::function<std::string()> model_parallel_options = [] { return std::string("the model-parallel degrees"); };
  std::function<void(const Options&)> validate;       // throws ConfigError
  std::function<void(nlohmann::ordered_json&)> describe;
};

// Outcome of parsing: run, or stop now with an exit code (help, version, error) after printing.
struct ParseResult {
  bool run = false;
  int exit_code = 0;
  std::string message;  // printed by rank 0 only (help text, version, or the error)
  bool is_error = false;
};

struct Environment {
  int world_size = 1;
  int cores_per_rank = 1;      // cores of this node / ranks on this node
  int ranks_per_node = 1;
  bool cuda_built = false;
  int visible_gpus = 0;        // per rank, as CUDA_VISIBLE_DEVICES leaves them
  bool distinct_gpus = false;  // the ranks of every node drive distinct GPUs (their PCI bus ids differ)
  int cuda_max_head_dim = 0;   // the CUDA attention's limit (kCudaMaxHeadDim)
  bool cudnn_built = false;    // the CUDA backend has cuDNN's fused attention (PB_WITH_CUDNN)
  std::vector<std::string> cpu_gemm_libraries = {"openblas"};  // this build's, its default first
  int slurm_ntasks = 0;        // SLURM_NTASKS, 0 when unset
};

// Parses and validates argv (identical on every rank, so every rank reaches the same verdict).
ParseResult parse_options(const std::string& app, int argc, char** argv, const Environment& env,
                          const AppOptions& app_options, Options* options);

// Every resolved option under its option name ('_' for '-'), plus app, grad_accum, world_size.
nlohmann::ordered_json describe_options(const Options& options, const AppOptions& app_options);

}  // namespace pb
