// The planner's command line: the options of the apps under the same names (SPEC sections 4 and 8),
// validated like the apps validate theirs (exit 2, a message naming the option, the value and the
// rule), and --sweep, which re-reads the command line once per point with the swept option replaced,
// so that a swept plan is exactly the plan of the command written out by hand.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <set>

#include "bench/cp/context_parallel.h"
#include "bench/fsdp/fully_sharded.h"
#include "bench/plan/app_registry.h"
#include "bench/plan/plan.h"
#include "bench/tp/tensor_parallel.h"
#include "common/errors.h"

#ifndef PB_VERSION
#define PB_VERSION "0.0.0"
#endif

namespace pb::plan {
namespace {

constexpr int64_t kMaxSweepPoints = 100000;
constexpr int kMaxRanks = 1 << 26;
constexpr int64_t kMaxVocabDivisor = 1 << 20;  // keeps divisor × tp and the padded vocabulary far from overflow
// Options that describe the invocation rather than a plan: never swept.
const std::set<std::string> kNotSweepable = {"help", "version", "sweep", "format", "require-fit", "calibration",
                                             "search", "top"};
// What --search varies itself (search.h): not to be given with it.
const std::vector<std::string> kSearched = {"--tp", "--sequence-parallel", "--pp", "--schedule", "--virtual-stages",
                                            "--cp", "--cp-algo", "--cp-layout", "--dp", "--shard", "--shard-group",
                                            "--no-prefetch", "--micro-batch", "--recompute"};

// Everything the command line can say, before resolution.
struct RawOptions {
  std::string model = "small";
  double params = 0;
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, seq = 0, vocab = 0, ffn = 0;
  int64_t vocab_divisor = 128;
  bool gated_mlp = false, tied_embeddings = false;
  std::string app = "dp";
  int gpus = 0, nodes = 0, gpus_per_node = 8, dp = 0;
  // The apps planned from their own definition (app_registry.h), each holding the options it put on this
  // command line, and those options' names (for "an option of --app pp, not of --app dp"). dp's
  // --bucket-mb and --no-overlap (--no-overlap also for tp, pp, ep and cp), fsdp's --shard, --shard-group
  // and --no-prefetch, tp's --tp and --sequence-parallel, ep's --ep, --experts, --top-k,
  // --capacity-factor and --aux-loss, and cp's --cp, --cp-algo and --cp-layout are among them.
  std::vector<std::pair<const RegisteredApp*, std::shared_ptr<AppDefinition>>> apps;
  std::map<std::string, std::vector<std::string>> app_option_names;
  int micro_batch = 1;
  int64_t global_batch = 0;
  std::string recompute = "none", dtype, grad_dtype = "fp32", backend = "cuda";
  std::string gpu = "h100";
  double peak_tflops = 0, mfu = 0.4, link_gbps = 0, gpu_memory = 0, power_w = 0;
  std::string calibration;    // a parabench-micro result file
  std::vector<std::string> sweep;
  std::string format = "table";
  bool require_fit = false;
  bool moe = false;               // --app hybrid: its MoE MLP
  bool search = false;            // --search
  int top = 10;
  std::vector<std::string> args;  // the command line (a sweep's point's): --app hybrid's definition reads it
};

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string str(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", v);
  return text;
}

[[noreturn]] void reject(const std::string& message) { throw ConfigError(message); }

// The options of registered app `name` as its definition describes them (its parsed values).
nlohmann::ordered_json described_options(const RawOptions& r, const std::string& name) {
  nlohmann::ordered_json described;
  for (const auto& [app, definition] : r.apps) {
    if (name == app->name) definition->options.describe(described);
  }
  return described;
}

void require_positive(const char* option, int64_t value) {
  if (value < 1) reject(std::string(option) + " " + std::to_string(value) + " must be at least 1");
}

void require_positive_real(const char* option, double value) {
  if (!(value > 0.0 && std::isfinite(value))) {
    reject(std::string(option) + " " + str(value) + " must be a finite positive number");
  }
}

std::unique_ptr<CLI::App> make_cli(RawOptions& r) {
  auto cli = std::make_unique<CLI::App>(
      "parabench-plan: per-rank memory by category, cluster totals and a step-time estimate for any model on "
      "any layout, from the formulas behind /memory/predicted (docs/memory-model.md)",
      "parabench-plan");
  cli->set_version_flag("--version", std::string("parabench ") + PB_VERSION);
  cli->get_formatter()->column_width(34);
  // Model.
  cli->add_option("--model", r.model, "preset: " + join(arch_preset_names(), ", "))->capture_default_str();
  cli->add_option("--params", r.params,
                  "planner only: model states (no activations, no time) for this many parameters, e.g. 7.5e9");
  cli->add_option("--layers", r.layers, "transformer blocks (overrides the preset)");
  cli->add_option("--hidden", r.hidden, "hidden size");
  cli->add_option("--heads", r.heads, "attention (query) heads");
  cli->add_option("--kv-heads", r.kv_heads, "key/value heads, grouped-query attention (default: the preset's)");
  cli->add_option("--seq", r.seq, "sequence length");
  cli->add_option("--vocab", r.vocab, "vocabulary size");
  cli->add_option("--make-vocab-size-divisible-by", r.vocab_divisor,
                  "store the vocabulary padded to a multiple of this × tp (Megatron-LM's option)")
      ->capture_default_str();
  cli->add_option("--ffn", r.ffn, "MLP width (default 4·hidden, or the preset's)");
  cli->add_flag("--gated-mlp", r.gated_mlp, "SwiGLU MLP: gate and up projections of width ffn (=false to turn off)");
  cli->add_flag("--tied-embeddings", r.tied_embeddings, "the head reuses embed.tok (=false to untie)");
  // Layout.
  cli->add_option("--app", r.app, "dp | fsdp | tp | pp | ep | cp | hybrid (every degree above at once)")
      ->capture_default_str();
  cli->add_option("--gpus", r.gpus, "ranks in the cluster (one per GPU)");
  cli->add_option("--nodes", r.nodes, "nodes; ranks = nodes × --gpus-per-node");
  cli->add_option("--gpus-per-node", r.gpus_per_node, "GPUs (ranks) per node")->capture_default_str();
  cli->add_option("--dp", r.dp, "data-parallel degree (default: the ranks / --tp, / --pp or / --cp)");
  for (const RegisteredApp& app : registered_apps()) {  // the app's own options, defaults and help (pp: --pp, ...)
    auto definition = std::make_shared<AppDefinition>(app.make());
    if (app.composes) {  // hybrid: the others' options (read again by its definition), and its --moe
      cli->add_flag("--moe", r.moe, "--app hybrid: every block's MLP a mixture of experts (not modelled yet)");
      r.app_option_names[app.name] = {"--moe"};
      r.apps.emplace_back(&app, definition);
      continue;
    }
    std::set<std::string> before;
    for (const CLI::Option* o : cli->get_options()) before.insert(o->get_name());
    definition->options.add(*cli);
    for (const CLI::Option* o : cli->get_options()) {
      if (!before.count(o->get_name())) r.app_option_names[app.name].push_back(o->get_name());
    }
    r.apps.emplace_back(&app, definition);
  }
  // Batch, precision, backend.
  cli->add_option("--micro-batch", r.micro_batch, "samples per micro-batch")->capture_default_str();
  cli->add_option("--global-batch", r.global_batch, "samples per step (default micro-batch · dp)");
  cli->add_option("--recompute", r.recompute, "none | selective | full")->capture_default_str();
  cli->add_option("--dtype", r.dtype, "fp32 | bf16 (default bf16 on cuda, fp32 on cpu)");
  cli->add_option("--grad-dtype", r.grad_dtype, "fp32 | bf16 gradients (bf16 only with --dtype bf16)")
      ->capture_default_str();
  cli->add_option("--backend", r.backend, "cuda (flash attention statistics) | cpu (keeps the probabilities)")
      ->capture_default_str();
  // Hardware and the time estimate.
  cli->add_option("--gpu", r.gpu, "GPU of the peak and link table: " + join(gpu_names(), ", "))->capture_default_str();
  cli->add_option("--peak-tflops", r.peak_tflops, "per-rank peak TFLOP/s (default: the --gpu table for --dtype)");
  cli->add_option("--mfu", r.mfu, "share of peak sustained on executed FLOPs (the MFU without recomputation)")
      ->capture_default_str();
  cli->add_option("--link-gbps", r.link_gbps,
                  "per-rank bus bandwidth in Gbit/s for every collective (default: NVLink inside a node, the NIC across)");
  cli->add_option("--gpu-memory", r.gpu_memory, "GiB per GPU: check that peak_total fits");
  cli->add_option("--power-w", r.power_w,
                  "a device's average power during a step in W (a run's /summary power_nvml_w_per_device): the "
                  "energy per step and per token beside the step time");
  cli->add_option("--calibration", r.calibration,
                  "a parabench-micro result file (.h5): time the step from its measured kernels and collectives "
                  "instead of --gpu's peaks and links (--app dp, fsdp, tp, pp, hybrid at cp 1)");
  cli->add_flag("--require-fit", r.require_fit, "exit 1 when a plan does not fit --gpu-memory");
  cli->add_flag("--search", r.search,
                "--app hybrid: every layout (tp, pp, schedule, cp, dp, shard, recompute, micro-batch) that fits "
                "--gpu-memory, fastest first");
  cli->add_option("--top", r.top, "--search: how many layouts to print (0: every one that fits)")->capture_default_str();
  // Output.
  cli->add_option("--sweep", r.sweep, "KEY=V1,V2,...: one plan per value (repeat for a cartesian product)");
  cli->add_option("--format", r.format, "table | csv | json")->capture_default_str();
  return cli;
}

// CLI11 reads a vector of arguments from its back.
void parse_args(CLI::App& cli, std::vector<std::string> args) {
  std::reverse(args.begin(), args.end());
  cli.parse(args);
}

// The resolved, validated plan of a parsed command line.
// `calibration`: the --calibration file, read once for every point of a sweep (null without it).
PlanConfig resolve(const CLI::App& cli, const RawOptions& r, const std::shared_ptr<const Calibration>& calibration) {
  auto given = [&](const char* name) { return cli.count(name) > 0; };
  PlanConfig c;

  // ---- app ------------------------------------------------------------------------------------------
  if (!find_registered_app(r.app)) reject("--app " + r.app + " must be dp, fsdp, tp, pp, ep, cp or hybrid");
  c.app = r.app;
  const bool hybrid = r.app == "hybrid";
  const int requested_tp = described_options(r, "tp").at("tp").get<int>();
  if (requested_tp > 1 && c.app == "fsdp") {
    reject("--tp " + std::to_string(requested_tp) + " with --app fsdp: fsdp with tp > 1 is --app hybrid "
           "(--app tp models tp × dp)");
  }
  // The registered apps' degrees (as each describes its options): at least 1, and above 1 only for their
  // own app; their other options only for their own app.
  std::shared_ptr<AppDefinition> definition;  // --app's (every modelled app is registered)
  for (const auto& [app, app_definition] : r.apps) {
    nlohmann::ordered_json described;
    app_definition->options.describe(described);
    const int degree = app->degree_option ? described.value(std::string(app->degree_option).substr(2), 1) : 1;
    if (app->degree_option) require_positive(app->degree_option, degree);
    if (app->name == c.app) {
      definition = app_definition;
      continue;
    }
    // --app hybrid takes every degree and the options of tp, pp, cp, ep and fsdp (its own definition reads
    // them below); not dp's buckets or --no-overlap, which parabench-hybrid does not have.
    if (hybrid && std::string(app->name) != "dp") continue;
    if (degree > 1) {
      reject(std::string(app->degree_option) + " " + std::to_string(degree) + " is a degree of --app " + app->name + "; --app " +
             c.app + " has no " + app->parallelism + " (use --app " + app->name + ")");
    }
    for (const std::string& option : r.app_option_names.at(app->name)) {
      const bool shared = std::find(app->shared_options.begin(), app->shared_options.end(), option) !=
                          app->shared_options.end();
      if ((!app->degree_option || option != app->degree_option) && !shared && given(option.c_str())) {
        reject(option + " is an option of --app " + app->name + ", not of --app " + c.app);
      }
    }
  }
  if (hybrid) {
    // Its definition's options are the other apps' (which this command line parsed): read them again.
    CLI::App own;
    own.allow_extras();
    definition->options.add(own);
    parse_args(own, r.args);
    if (r.moe) reject("--app hybrid --moe: not modelled yet (--app ep plans the mixture of experts)");
    if (calibration && definition->layout(Options{}).cp > 1) {  // the layout's degrees, as parsed
      reject("--calibration times --app hybrid's steps at --cp 1 only; context parallelism is not modelled from a "
             "calibration yet (without --calibration its peak-based estimate stands)");
    }
    if (given("--no-overlap") || given("--bucket-mb")) {
      reject(std::string(given("--no-overlap") ? "--no-overlap" : "--bucket-mb") +
             " is an option of --app dp (and the time model of tp, pp, ep and cp), not of --app hybrid");
    }
  } else if (r.moe) {
    reject("--moe is an option of --app hybrid, not of --app " + c.app);
  }
  // The degree beside dp: ranks = dp × model_parallel (tp's or cp's consecutive ranks, pp's stages).
  const RegisteredApp* registered = find_registered_app(c.app);
  const int model_parallel = definition->options.model_parallel_size();  // every modelled app is registered
  const std::string model_parallel_option = hybrid                   ? definition->options.model_parallel_options()
                                            : registered->degree_option ? registered->degree_option
                                                                        : "--dp";
  if (c.app == "fsdp" && given("--no-overlap")) {
    reject("--no-overlap is an option of --app dp, tp, pp, ep and cp, not of --app fsdp (use --no-prefetch)");
  }

  // ---- model ------------------------------------------------------------------------------------------
  ArchSpec& a = c.memory.arch;
  if (given("--params")) {
    if (c.app == "tp") reject("--params has no model shape to slice: --app tp needs --model (and shape options)");
    if (hybrid) reject("--params has no layers, heads or sequence to split: --app hybrid needs --model (and shape options)");
    if (c.app == "ep") reject("--params has no MLP to split into experts: --app ep needs --model (and shape options)");
    if (c.app == "cp") reject("--params has no sequence to split: --app cp needs --model (and shape options)");
    if (c.app == "pp") reject("--params has no layers to cut into stages: --app pp needs --model (and shape options)");
    for (const char* option : {"--model", "--layers", "--hidden", "--heads", "--kv-heads", "--seq", "--vocab", "--ffn",
                               "--gated-mlp", "--tied-embeddings", "--make-vocab-size-divisible-by"}) {
      if (given(option)) reject(std::string("--params replaces the model: give either --params or ") + option);
    }
    if (!(r.params >= 1 && r.params < 1e18 && r.params == std::floor(r.params))) {
      reject("--params " + str(r.params) + " must be a whole number of parameters, at least 1");
    }
    c.model = "params";
    c.params_override = static_cast<int64_t>(r.params);
  } else {
    ArchSpec preset;
    if (!arch_preset(r.model, &preset)) {
      reject("--model " + r.model + " is not a preset; choose one of " + join(arch_preset_names(), ", "));
    }
    c.model = r.model;
    a = preset;
    // A given shape option overrides the preset; kv-heads and ffn follow heads and hidden where the
    // preset does (multi-head attention, ffn = 4·hidden), and keep the preset's value otherwise.
    if (given("--layers")) a.layers = r.layers;
    if (given("--hidden")) a.hidden = r.hidden;
    if (given("--heads")) a.heads = r.heads;
    if (given("--seq")) a.seq = r.seq;
    if (given("--vocab")) a.vocab = r.vocab;
    if (given("--kv-heads")) a.kv_heads = r.kv_heads;
    else if (preset.kv_heads == preset.heads) a.kv_heads = a.heads;
    if (given("--ffn")) a.ffn = r.ffn;
    else if (preset.ffn == 4 * preset.hidden) a.ffn = 4 * a.hidden;
    if (given("--gated-mlp")) a.gated_mlp = r.gated_mlp;
    if (given("--tied-embeddings")) a.tied_embeddings = r.tied_embeddings;
    a.vocab_divisor = r.vocab_divisor;
    if (a.vocab_divisor > kMaxVocabDivisor) {
      reject("--make-vocab-size-divisible-by " + std::to_string(a.vocab_divisor) + " must be at most " +
             std::to_string(kMaxVocabDivisor));
    }
    for (auto [name, value] : {std::pair{"--layers", a.layers}, {"--hidden", a.hidden}, {"--heads", a.heads},
                               {"--kv-heads", a.kv_heads}, {"--seq", a.seq}, {"--vocab", a.vocab}, {"--ffn", a.ffn},
                               {"--make-vocab-size-divisible-by", a.vocab_divisor}}) {
      require_positive(name, value);
    }
    if (a.hidden % a.heads != 0) {
      reject("--hidden " + std::to_string(a.hidden) + " is not divisible by --heads " + std::to_string(a.heads));
    }
    if (a.heads % a.kv_heads != 0) {
      reject("--heads " + std::to_string(a.heads) + " is not divisible by --kv-heads " + std::to_string(a.kv_heads) +
             " (each key/value head serves the same number of query heads)");
    }
  }

  // ---- ranks ---------------------------------------------------------------------------------------------
  require_positive("--gpus-per-node", r.gpus_per_node);
  c.gpus_per_node = r.gpus_per_node;
  int64_t ranks = 1;
  if (given("--nodes")) {
    require_positive("--nodes", r.nodes);
    ranks = static_cast<int64_t>(r.nodes) * r.gpus_per_node;
    if (given("--gpus") && r.gpus != ranks) {
      reject("--gpus " + std::to_string(r.gpus) + " does not match --nodes " + std::to_string(r.nodes) +
             " × --gpus-per-node " + std::to_string(r.gpus_per_node) + " = " + std::to_string(ranks));
    }
  } else if (given("--gpus")) {
    require_positive("--gpus", r.gpus);
    ranks = r.gpus;
  } else if (given("--dp")) {
    require_positive("--dp", r.dp);
    ranks = static_cast<int64_t>(r.dp) * model_parallel;
  } else {
    ranks = model_parallel;  // one tensor- or context-parallel group, or one pipeline
  }
  if (ranks > kMaxRanks) {
    reject("the plan has " + std::to_string(ranks) + " ranks; the planner takes at most " + std::to_string(kMaxRanks));
  }
  c.ranks = static_cast<int>(ranks);
  const std::string ranks_source = given("--nodes") ? "--nodes × --gpus-per-node" : "--gpus";
  if (c.ranks % model_parallel != 0) {
    if (hybrid) {
      reject(ranks_source + " " + std::to_string(c.ranks) + " is not divisible by " + model_parallel_option + " = " +
             std::to_string(model_parallel) + " (dp = ranks / (tp · pp · cp))");
    }
    const std::string degree = model_parallel_option.substr(2);
    reject(ranks_source + " " + std::to_string(c.ranks) + " is not divisible by " + model_parallel_option + " " +
           std::to_string(model_parallel) + " (dp = ranks / " + degree + ")");
  }
  c.dp = c.ranks / model_parallel;
  if (given("--dp")) {
    require_positive("--dp", r.dp);
    if (c.ranks % r.dp != 0) {
      reject(ranks_source + " " + std::to_string(c.ranks) + " is not divisible by --dp " + std::to_string(r.dp));
    }
    if ((c.app == "tp" || c.app == "pp" || c.app == "cp" || hybrid) && r.dp != c.dp) {
      reject("--dp " + std::to_string(r.dp) + " does not match " + ranks_source + " " + std::to_string(c.ranks) +
             " / " + model_parallel_option + " " + std::to_string(model_parallel) + " = " + std::to_string(c.dp));
    }
    if (r.dp != c.dp) {
      reject("--dp " + std::to_string(r.dp) + " leaves a factor " + std::to_string(c.ranks / r.dp) + " of the " +
             std::to_string(c.ranks) + " ranks (" + ranks_source + ") unused: --app " + c.app +
             " has no other degree, so dp is the number of ranks");
    }
  }

  // ---- sharding: fsdp's --shard, --shard-group and --no-prefetch are validated by parabench-fsdp's rules
  // and set on the plan by its plan_fsdp_sharding once the plan is complete (below) --------------------------
  MemoryPlan& m = c.memory;
  if (c.app != "fsdp") {  // dp, tp, pp, ep and cp: no sharding; every rank of a dp group holds the same (tp: sliced) model states
    m.shard = ShardStrategy::no_shard;
    m.shard_ranks = 1;
    // dp's --bucket-mb (validated by parabench-dp's rules below; refused above for the other apps) and
    // --no-overlap, which tp, pp, ep and cp take too, as dp's definition holds them.
    const nlohmann::ordered_json dp = described_options(r, "dp");
    c.bucket_mb = dp.at("bucket_mb").get<double>();
    c.overlap = !dp.at("no_overlap").get<bool>();
  }

  // ---- batch -------------------------------------------------------------------------------------------
  require_positive("--micro-batch", r.micro_batch);
  m.micro_batch = r.micro_batch;
  const int64_t per_step = static_cast<int64_t>(r.micro_batch) * c.dp;
  if (r.search && !given("--global-batch")) reject("--search needs --global-batch, the samples per step of every layout");
  c.global_batch = given("--global-batch") ? r.global_batch : per_step;
  require_positive("--global-batch", c.global_batch);
  if (r.search) {
    // The base of a search (dp = ranks): each layout checks its own dp and micro-batch (search.cpp).
    if (c.global_batch > std::numeric_limits<int>::max()) reject("--global-batch " + std::to_string(c.global_batch) + " is too large");
  } else if (c.global_batch % per_step != 0) {
    reject("--global-batch " + std::to_string(c.global_batch) + " is not a multiple of --micro-batch " +
           std::to_string(r.micro_batch) + " × dp " + std::to_string(c.dp) + " = " + std::to_string(per_step));
  }
  c.grad_accum = std::max<int64_t>(1, c.global_batch / per_step);
  if (r.recompute != "none" && r.recompute != "selective" && r.recompute != "full") {
    reject("--recompute " + r.recompute + " must be none, selective or full");
  }
  m.recompute = r.recompute;

  // ---- backend and precision ---------------------------------------------------------------------------
  // With a calibration, the backend it measured is the default (its GPU where it measured one).
  std::string backend = r.backend;
  if (calibration && !given("--backend")) {
    const std::vector<std::string> measured = calibration->measured_precisions();
    const bool cuda = std::any_of(measured.begin(), measured.end(), [](const std::string& p) { return p.rfind("cuda/", 0) == 0; });
    backend = cuda || measured.empty() ? "cuda" : "cpu";
  }
  if (backend != "cpu" && backend != "cuda") reject("--backend " + backend + " must be cpu or cuda");
  c.backend = backend;
  m.attention_keeps_probabilities = c.backend == "cpu";
  c.dtype = r.dtype.empty() ? (c.backend == "cuda" ? "bf16" : "fp32") : r.dtype;
  if (c.dtype != "fp32" && c.dtype != "bf16") reject("--dtype " + c.dtype + " must be fp32 or bf16");
  if (r.grad_dtype != "fp32" && r.grad_dtype != "bf16") reject("--grad-dtype " + r.grad_dtype + " must be fp32 or bf16");
  if (r.grad_dtype == "bf16" && c.dtype != "bf16") {
    reject("--grad-dtype bf16 needs --dtype bf16 (fp32 training keeps fp32 gradients)");
  }
  c.grad_dtype = r.grad_dtype;
  m.precision = c.dtype == "bf16" ? precision_bf16(c.grad_dtype == "bf16") : precision_fp32();

  // ---- hardware and time ------------------------------------------------------------------------------
  if (!gpu_spec(r.gpu, &c.gpu)) reject("--gpu " + r.gpu + " must be one of " + join(gpu_names(), ", "));
  if (given("--peak-tflops")) require_positive_real("--peak-tflops", r.peak_tflops);
  const double table_peak = c.dtype == "bf16" ? c.gpu.peak_bf16_tflops : c.gpu.peak_fp32_tflops;
  // With a calibration the peak only divides the MFU: the device's, as parabench-micro knew it (NaN on CPUs).
  const double default_peak =
      calibration ? calibrated_peak_flop_per_s(*calibration, c.backend, c.dtype) / 1e12 : table_peak;
  c.peak_tflops = given("--peak-tflops") ? r.peak_tflops : default_peak;
  if (!(r.mfu > 0.0 && r.mfu <= 1.0)) reject("--mfu " + str(r.mfu) + " must be in (0, 1]");
  c.mfu = r.mfu;
  for (const char* option : {"--mfu", "--link-gbps"}) {
    if (calibration && given(option)) {
      reject(std::string(option) + " is an assumption of the peak-based estimate; --calibration " + calibration->path +
             " measures the rates instead (give one or the other)");
    }
  }
  if (given("--link-gbps")) require_positive_real("--link-gbps", r.link_gbps);
  c.link_gbps = given("--link-gbps") ? r.link_gbps : 0.0;
  if (given("--gpu-memory")) require_positive_real("--gpu-memory", r.gpu_memory);
  c.gpu_memory_gib = given("--gpu-memory") ? r.gpu_memory : 0.0;
  if (given("--power-w")) require_positive_real("--power-w", r.power_w);
  c.power_w = given("--power-w") ? r.power_w : 0.0;

  // ---- an app planned from its own definition: its rules on the plan; its options as it describes them ----
  if (definition) {
    // The planner's shapes are int64: a micro-batch's tokens must fit the app's int expert slots.
    if (c.app == "ep" && static_cast<int64_t>(m.micro_batch) * a.seq > std::numeric_limits<int>::max()) {
      reject("--micro-batch × --seq " + std::to_string(static_cast<int64_t>(m.micro_batch) * a.seq) +
             " is too many tokens per micro-batch for the expert slots");
    }
    c.app_options = app_options_of(c);
    definition->options.validate(c.app_options);  // throws ConfigError with the app's own message
    nlohmann::ordered_json described;
    definition->options.describe(described);
    if (c.app == "fsdp") {  // the sharding the app predicts with, for the time model and --params
      FsdpOptions fsdp;
      if (!parse_shard_strategy(described.at("shard").get<std::string>(), &fsdp.shard)) {
        reject("--shard " + described.at("shard").get<std::string>() + ": not a shard strategy");  // the app parsed it
      }
      fsdp.shard_group = described.at("shard_group").get<int>();
      fsdp.prefetch = !described.at("no_prefetch").get<bool>();
      plan_fsdp_sharding(c.memory, fsdp, c.dp);
      c.overlap = c.memory.prefetch;
    }
    if (c.app == "tp") {  // the slices the app predicts with, for the time model and each rank's parameters
      plan_tp_slices(c.memory, described.at("tp").get<int>(), described.at("sequence_parallel").get<bool>());
      // Grouped-query attention, which parabench-tp's model has not (its key/value heads are its heads).
      if (a.kv_heads % c.memory.tp != 0) {
        reject("--kv-heads " + std::to_string(a.kv_heads) + " is not divisible by --tp " + std::to_string(c.memory.tp) +
               " (each rank holds whole key/value heads; they are not replicated)");
      }
    }
    if (c.is_moe()) {  // the router and E/ep experts per block, for the time model and each rank's parameters
      c.ep = described.at("ep").get<int>();
      c.moe.experts = described.at("experts").get<int>();
      c.moe.top_k = described.at("top_k").get<int>();
      c.moe.capacity_factor = described.at("capacity_factor").get<double>();
      c.moe.aux_loss = described.at("aux_loss").get<double>();
      plan_moe_memory(c.memory, c.moe, c.ep, static_cast<int>(c.grad_accum));  // bench/ep's model, as the app predicts
    }
    if (c.is_cp()) {  // this rank's S/cp tokens, for the time model
      c.cp = described.at("cp").get<int>();
      if (!parse_cp_algo(described.at("cp_algo").get<std::string>(), &c.cp_algo)) {
        reject("--cp-algo " + described.at("cp_algo").get<std::string>() + ": not an algorithm");  // the app parsed it
      }
      c.cp_zigzag = described.at("cp_layout").get<std::string>() == "zigzag";
      plan_cp_memory(c.memory, c.cp_algo, c.cp);  // bench/cp's model, as the app predicts
    }
    if (c.is_pp()) {
      c.pp.stages = described.at("pp").get<int>();
      c.pp.schedule = described.at("schedule").get<std::string>();
      c.pp.chunks = described.at("virtual_stages").get<int>();
    }
    if (hybrid) {  // every degree, as parabench-hybrid predicts with them (predict_hybrid_memory)
      plan_tp_slices(c.memory, described.at("tp").get<int>(), described.at("sequence_parallel").get<bool>());
      if (a.kv_heads % c.memory.tp != 0) {
        reject("--kv-heads " + std::to_string(a.kv_heads) + " is not divisible by --tp " + std::to_string(c.memory.tp) +
               " (each rank holds whole key/value heads; they are not replicated)");
      }
      c.pp.stages = described.at("pp").get<int>();
      c.pp.schedule = described.at("schedule").get<std::string>();
      c.pp.chunks = described.at("virtual_stages").get<int>();
      c.cp = described.at("cp").get<int>();
      if (!parse_cp_algo(described.at("cp_algo").get<std::string>(), &c.cp_algo)) {
        reject("--cp-algo " + described.at("cp_algo").get<std::string>() + ": not an algorithm");  // the app parsed it
      }
      c.cp_zigzag = described.at("cp_layout").get<std::string>() == "zigzag";
      plan_cp_memory(c.memory, c.cp_algo, c.cp);  // for this rank's heads: after the tp slices
      FsdpOptions fsdp;
      if (!parse_shard_strategy(described.at("shard").get<std::string>(), &fsdp.shard)) {
        reject("--shard " + described.at("shard").get<std::string>() + ": not a shard strategy");  // the app parsed it
      }
      fsdp.shard_group = described.at("shard_group").get<int>();
      fsdp.prefetch = !described.at("no_prefetch").get<bool>();
      plan_fsdp_sharding(c.memory, fsdp, c.dp * c.cp);  // over the data ranks
    }
    c.definition = definition;
  }

  // ---- calibration: the plan's step must be timeable from it (a GEMM and attention of its backend and
  // dtype, every collective it issues), else exit 2 now, naming what is missing ------------------------------
  if (calibration) {
    c.calibration = calibration;
    evaluate(c);
  }
  return c;
}

// "micro_batch", "--micro-batch" and "micro-batch" name the same option.
std::string normalise_key(std::string key) {
  while (!key.empty() && key.front() == '-') key.erase(key.begin());
  std::replace(key.begin(), key.end(), '_', '-');
  return key;
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = text.find(sep, start);
    parts.push_back(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return parts;
    start = end + 1;
  }
}

// Options a sweep can vary: every option of a plan (value options, and flags with true/false).
std::vector<std::string> sweepable_keys(const CLI::App& cli) {
  std::vector<std::string> keys;
  for (const CLI::Option* o : cli.get_options()) {
    const std::string key = normalise_key(o->get_name());
    if (!kNotSweepable.count(key)) keys.push_back(key);
  }
  return keys;
}

Sweep parse_sweep(const CLI::App& cli, const std::string& text) {
  const std::size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    reject("--sweep " + text + " must be KEY=V1,V2,... (e.g. --sweep micro-batch=1,2,4,8)");
  }
  Sweep s;
  s.key = normalise_key(text.substr(0, eq));
  const std::vector<std::string> keys = sweepable_keys(cli);
  if (std::find(keys.begin(), keys.end(), s.key) == keys.end()) {
    reject("--sweep " + text + ": " + s.key + " is not an option a sweep can vary; choose one of " + join(keys, ", "));
  }
  s.values = split(text.substr(eq + 1), ',');
  for (const std::string& v : s.values) {
    if (v.empty()) reject("--sweep " + text + " has an empty value");
  }
  return s;
}

// The command line without --sweep and without the swept options, which each point then appends.
std::vector<std::string> strip_options(const CLI::App& cli, const std::vector<std::string>& args,
                                       const std::vector<std::string>& keys) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < args.size(); ++i) {
    bool dropped = false;
    for (const std::string& key : keys) {
      const std::string flag = "--" + key;
      if (args[i] == flag) {
        const CLI::Option* o = cli.get_option_no_throw(flag);
        if (o && o->get_expected_min() > 0) ++i;  // its value is the next argument
        dropped = true;
      } else if (args[i].rfind(flag + "=", 0) == 0) {
        dropped = true;
      }
      if (dropped) break;
    }
    if (!dropped) out.push_back(args[i]);
  }
  return out;
}

}  // namespace

ParseOutcome parse_plan_request(const std::vector<std::string>& args, PlanRequest* request) {
  ParseOutcome outcome;
  RawOptions raw;
  raw.args = args;
  std::unique_ptr<CLI::App> cli = make_cli(raw);
  try {
    parse_args(*cli, args);
  } catch (const CLI::CallForHelp&) {
    outcome.message = cli->help();
    return outcome;
  } catch (const CLI::CallForVersion&) {
    outcome.message = std::string("parabench ") + PB_VERSION;
    return outcome;
  } catch (const CLI::ParseError& e) {
    outcome.exit_code = kExitConfig;
    outcome.is_error = true;
    outcome.message = std::string(e.what()) + "\nRun with --help for the options.";
    return outcome;
  }

  try {
    if (raw.format == "table") request->format = Format::table;
    else if (raw.format == "csv") request->format = Format::csv;
    else if (raw.format == "json") request->format = Format::json;
    else reject("--format " + raw.format + " must be table, csv or json");
    request->require_fit = raw.require_fit;
    if (raw.search) {
      if (raw.app != "hybrid") reject("--search plans --app hybrid's layouts: give --app hybrid (not --app " + raw.app + ")");
      if (!raw.sweep.empty()) reject("--search and --sweep: give one or the other (--search varies the layout itself)");
      for (const std::string& option : kSearched) {
        if (cli->count(option) > 0) reject(option + " is what --search varies; leave it out");
      }
      if (cli->count("--gpu-memory") == 0) reject("--search needs --gpu-memory GIB, the memory a layout must fit");
      if (raw.top < 0) reject("--top " + std::to_string(raw.top) + " must be 0 (all) or more");
      request->search = true;
      request->top = raw.top;
    } else if (cli->count("--top") > 0) {
      reject("--top is an option of --search");
    }
    std::shared_ptr<const Calibration> calibration;
    if (!raw.calibration.empty()) calibration = std::make_shared<const Calibration>(read_calibration(raw.calibration));

    request->sweeps.clear();
    int64_t points = 1;
    for (const std::string& text : raw.sweep) {
      Sweep s = parse_sweep(*cli, text);
      for (const Sweep& earlier : request->sweeps) {
        if (earlier.key == s.key) reject("--sweep " + s.key + " is given twice; put all its values in one --sweep");
      }
      points *= static_cast<int64_t>(s.values.size());
      if (points > kMaxSweepPoints) reject("the sweeps make more than " + std::to_string(kMaxSweepPoints) + " plans");
      request->sweeps.push_back(std::move(s));
    }

    request->plans.clear();
    if (request->sweeps.empty()) {
      request->plans.push_back(resolve(*cli, raw, calibration));
      return ParseOutcome{true, 0, "", false};
    }

    std::vector<std::string> stripped_keys = {"sweep"};
    for (const Sweep& s : request->sweeps) stripped_keys.push_back(s.key);
    const std::vector<std::string> base = strip_options(*cli, args, stripped_keys);
    // Odometer over the sweeps' values, the first --sweep varying slowest.
    std::vector<std::size_t> index(request->sweeps.size(), 0);
    for (int64_t point = 0; point < points; ++point) {
      std::vector<std::string> point_args = base;
      std::vector<std::pair<std::string, std::string>> swept;
      for (std::size_t k = 0; k < request->sweeps.size(); ++k) {
        const Sweep& s = request->sweeps[k];
        point_args.push_back("--" + s.key + "=" + s.values[index[k]]);
        swept.emplace_back(s.key, s.values[index[k]]);
      }
      // A --sweep over shard may keep a --shard-group that only its HYBRID_SHARD points use: the other
      // points plan without it (it changes nothing there; parabench-fsdp refuses it there).
      for (const auto& [key, value] : swept) {
        ShardStrategy shard;
        if (key == "shard" && parse_shard_strategy(value, &shard) && shard != ShardStrategy::hybrid_shard) {
          point_args = strip_options(*cli, point_args, {"shard-group"});
        }
      }
      RawOptions point_raw;
      point_raw.args = point_args;
      std::unique_ptr<CLI::App> point_cli = make_cli(point_raw);
      std::string where;
      for (const auto& [key, value] : swept) where += (where.empty() ? "" : ", ") + key + "=" + value;
      try {
        parse_args(*point_cli, point_args);
        request->plans.push_back(resolve(*point_cli, point_raw, calibration));
      } catch (const CLI::ParseError& e) {
        reject("--sweep " + where + ": " + e.what());
      } catch (const ConfigError& e) {
        reject("--sweep " + where + ": " + e.what());
      }
      request->plans.back().swept = swept;
      for (std::size_t k = request->sweeps.size(); k-- > 0;) {
        if (++index[k] < request->sweeps[k].values.size()) break;
        index[k] = 0;
      }
    }
  } catch (const ConfigError& e) {
    outcome.exit_code = kExitConfig;
    outcome.is_error = true;
    outcome.message = e.what();
    return outcome;
  }
  outcome.run = true;
  return outcome;
}

}  // namespace pb::plan
