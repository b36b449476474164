// parabench-plan: the analytic model behind /memory/predicted as a tool (SPEC section 8). A plan is
// one model on one layout; it gives per-rank memory by category (common/memory_model.h, the same
// formulas the apps record), cluster totals, a fit verdict and a labelled step-time estimate.
// docs/memory-model.md derives the memory formulas; README.md here the time model and the options.
//
// Modelled: dp, fsdp, tp (tensor parallelism × data parallelism, with or without sequence
// parallelism), pp (pipeline parallelism × data parallelism; its options, validation and memory per
// stage are bench/pp's, pipeline_plan.h), ep (the mixture-of-experts model of bench/ep, expert
// parallelism × data parallelism; its memory is bench/ep's plan_moe_memory) and cp (context
// parallelism × data parallelism; its memory is bench/cp's plan_cp_memory) and hybrid (bench/hybrid:
// tp × pp × cp × dp, sharded over the data ranks; its memory is the hybrid app's own prediction, its time
// the others' collectives on a stage's share). The step time comes from the device table's peaks, or from a parabench-micro calibration
// (--calibration: calibration.h, step_time.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench/cp/context_attention.h"
#include "bench/ep/moe.h"
#include "bench/plan/calibration.h"
#include "bench/pp/pipeline_plan.h"
#include "common/memory_model.h"

namespace pb {
struct AppDefinition;
}

namespace pb::plan {

// ---- what the planner knows ------------------------------------------------------------------------
// The presets of SPEC section 4 (the GPT the apps train) and the planner-only ones of section 8.
bool arch_preset(const std::string& name, ArchSpec* out);
std::vector<std::string> arch_preset_names();

// Peak dense TFLOP/s of SPEC section 6 and nominal per-GPU link rates (Gbit/s, one direction).
struct GpuSpec {
  std::string name;
  double peak_bf16_tflops = 0, peak_fp32_tflops = 0;
  double intra_node_gbps = 0; // NVLink per GPU, one direction
  double inter_node_gbps = 0; // one InfiniBand NIC per GPU
};
bool gpu_spec(const std::string& name, GpuSpec* out);
std::vector<std::string> gpu_names();

// ---- one resolved plan ---------------------------------------------------------------------------------
struct PlanConfig {
  std::string model;          // preset name, or "custom"
  int64_t params_override = 0;  // --params N: model states only, of N parameters in one unit
  std::string app;            // dp | fsdp | tp | pp | ep | cp | hybrid
  int ranks = 1;              // world size W
  int gpus_per_node = 8;
  int dp = 1;                 // dp = W for the dp, fsdp and ep apps, W / tp for tp, W / pp for pp, W / cp for cp
  PipelineOptions pp;         // --app pp: stages, schedule, virtual stages (as the app describes them); else 1 stage
  // The app's own definition (app_registry.h: every --app the planner models), holding the options it
  // parsed, and the Options of this plan that its validation and memory read. Null in a PlanConfig built
  // by hand (tests), whose memory is common/memory_model.h's predict_memory of `memory`.
  std::shared_ptr<const AppDefinition> definition;
  Options app_options;
  int ep = 1;                 // --app ep: expert-parallel degree (groups of ep consecutive dp ranks); else 1
  MoeOptions moe;             // --app ep: experts, top-k, capacity factor, auxiliary loss
  int cp = 1;                 // --app cp: context-parallel degree (groups of cp consecutive ranks); else 1
  CpAlgo cp_algo = CpAlgo::ring;  // --app cp: how the cp ranks exchange keys and values
  bool cp_zigzag = true;      // --app cp: zigzag (2·cp chunks, rank i holds i and 2cp−1−i) or contiguous
  // arch, precision, micro-batch, recompute, attention, shard, shard ranks, and the tp degree
  // (memory.tp, 1 but for --app tp) and sequence parallelism (memory.sequence_parallel, only with tp > 1);
  // --app ep: the MoE part's terms (memory.mlp_*, set by plan_moe_memory); --app cp: the attention
  // core's terms (memory.cp, memory.attention_*, set by plan_cp_memory)
  MemoryPlan memory;
  std::string backend, dtype, grad_dtype;
  int64_t global_batch = 1;
  int64_t grad_accum = 1;
  bool overlap = true;        // dp, tp: not --no-overlap (tp: the dp all-reduce); fsdp: not --no-prefetch
  double bucket_mb = 25.0;    // dp only; no effect on memory (buckets are views)
  GpuSpec gpu;
  double peak_tflops = 0;     // per rank, for the compute time
  double mfu = 0.4;           // assumed model-FLOPs utilisation
  double link_gbps = 0;       // > 0: every collective runs at this rate (--link-gbps)
  double gpu_memory_gib = 0;  // > 0: check the fit (--gpu-memory)
  double power_w = 0;         // > 0: a device's (a rank's) average power during a step (--power-w): the energy
  // --calibration: a parabench-micro result whose measured rates time the step (else the peaks above).
  std::shared_ptr<const Calibration> calibration;
  // The sweep values that made this plan from the base command line, as KEY=VALUE.
  std::vector<std::pair<std::string, std::string>> swept;

  int nodes() const { return (ranks + gpus_per_node - 1) / gpus_per_node; }
  int tp() const { return memory.tp; }
  bool sequence_parallel() const { return memory.sequence_parallel; }
  bool model_states_only() const { return params_override > 0; }
  bool is_moe() const { return app == "ep"; }
  bool is_hybrid() const { return app == "hybrid"; }
  // A pipeline or context-parallel plan: --app pp or cp, or a hybrid with that degree above 1.
  bool is_cp() const { return app == "cp" || (is_hybrid() && cp > 1); }
  bool is_pp() const { return app == "pp" || (is_hybrid() && pp.stages > 1); }
  const char* cp_layout() const { return cp_zigzag ? "zigzag" : "contiguous"; }
  // --app ep: expert slots per expert and micro-batch (bench/ep's moe_capacity of b·S tokens).
  int64_t capacity() const;
};

// One collective of the step-time estimate.
struct CommEstimate {
  std::string op;       // all_reduce | all_gather | reduce_scatter | all_to_all | send_recv (cp's ring: each
                        // call one send to the next rank and one receive from the previous, at once; pp:
                        // one message to a neighbouring stage)
  std::string what;     // "gradients", "parameters", ...
  int64_t bytes = 0;    // buffer size per call (the full, unsharded tensor; nccl-tests' "size")
  int ranks = 1;        // ranks in the group
  int64_t calls = 0;    // whole-model passes per step (the apps issue one call per unit or bucket);
                        // tp: calls per step, the cross-entropy statistics' two (N and 2N floats) as one;
                        // ep: the all-to-alls' calls per step; its all-reduces one pass each (L + 1 and L calls);
                        // cp: calls per step (send_recv: the sends, as many as the receives);
                        // pp: the sends per step of each stage that sends them (README.md)
  bool inside_node = true;  // the group's ranks share a node (NVLink; send_recv_intra of a calibration)
  double link_gbps = 0; // rate used: nominal, --link-gbps, or the calibration's bus bandwidth at this size
  bool measured = false;  // timed from a calibration's /micro/collectives
  std::string caveat;     // with a calibration: why its table may not hold for this collective (a size
                          // outside the measured range, a group across nodes timed on one node), or ""
  double seconds = 0;   // per step, all calls
  bool blocking = false;  // on the critical path whatever the overlap: tp's collectives, ep's all-to-alls, cp's
  double hidden_s = 0;  // of `seconds`, what hides behind compute: cp's ring K|V hops beside the attention
                        // of the block in hand; pp's messages but those on the pipeline's fill and drain
  double exposed_s = 0;  // of an overlapped collective's `seconds`, what no compute hides (with a calibration,
                        // as the app runs: dp's last bucket, all-reduced once backward has ended; FULL_SHARD's
                        // first gather of each micro-batch, which nothing prefetched)
  bool in_place = true;  // the app's buffers: all-reduces and gathers in place but FULL_SHARD's and
                         // HYBRID_SHARD's gathers, into a unit buffer of their own (a calibration's rows of
                         // that variant time it)
};

struct PlanResult {
  PlanConfig config;
  int64_t parameters = 0;                // of the whole model (ep: the router and all E experts per block)
  int64_t stored_parameters = 0;         // parameters + the vocabulary's padding in embed.tok and head.w
                                         // (Megatron's padded_vocab_size), what memory holds
  int64_t rank_parameters = 0;           // a rank's slices before any sharding, as stored: P_local of tp,
                                         // ep's replicated parameters and E/ep experts per block, P otherwise
  MemoryEstimate per_rank;               // every category and peak_total, bytes (pp: the stage of largest peak)
  std::vector<MemoryEstimate> per_stage; // --app pp: pipeline stage s's ranks (s·dp ... s·dp + dp − 1)
  int peak_stage = 0;                    // --app pp: the stage per_rank is
  int64_t model_state_bytes = 0;         // parameters + master + gradients + optimizer, one rank
  double model_state_bytes_per_param = 0;  // model_state_bytes / stored_parameters
  int64_t cluster_peak_total = 0;        // per_rank.peak_total × ranks (every rank is alike; pp: Σ stages × dp)
  bool fit_checked = false, fits = true;
  int64_t capacity_bytes = 0, excess_bytes = 0;  // excess > 0: does not fit by that much
  // Step-time estimate (none with --params).
  bool has_time = false;
  double model_flops_per_step = 0;       // SPEC 6, generalised (model_flops_per_step below)
  double hardware_flops_per_step = 0;    // + what recomputation runs again (recompute_flops_per_step)
  double compute_s = 0, comm_s = 0, step_s = 0, tokens_per_s = 0;
  // With --power-w: power_w × ranks × step_s, and per token; NaN without it.
  double energy_j_per_step = 0, joules_per_token = 0;
  double blocking_comm_s = 0;            // the part of comm_s that no compute hides (tp's, ep's, cp's
                                         // collectives; cp ring: less what hides behind block attention)
  // pp: compute_s is the busiest stage's; the schedule leaves it idle bubble_fraction of the pipeline's
  // time (bench/pp's theoretical_bubble_fraction), bubble_s = compute_s · f / (1 − f).
  double bubble_fraction = 0, bubble_s = 0;
  double exposed_comm_s = 0;             // step_s − compute_s − bubble_s: communication no compute hides
  double mfu = 0;                        // model FLOPs / (step × ranks × peak); NaN where the peak is unknown
  std::vector<CommEstimate> comm;
  // --calibration: each kernel of the (busiest) rank's step and its measured rate; warnings about
  // kernels timed at the default rate.
  std::vector<KernelTime> kernels;
  std::vector<std::string> warnings;
};

// Model FLOPs of one step: 3 × forward matmul FLOPs, attention counted as a full S×S product,
// recomputation not counted. Reduces to SPEC 6's 72·G·S·L·h²·(1 + S/(6h) + V/(12hL)) for the GPT.
double model_flops_per_step(const ArchSpec& arch, int64_t global_batch);

// FLOPs that recomputation adds to a step: full, one more forward of every block; selective, the
// attention products Q·Kᵀ and P·V again. Model FLOPs never count them (SPEC 6); the time does.
double recompute_flops_per_step(const ArchSpec& arch, int64_t global_batch, const std::string& recompute);

// --app ep (the mixture of experts of bench/ep): each block's MLP is a router (2·h·E FLOPs per token
// forward) and k expert MLPs per token, in place of one dense MLP. Model FLOPs count the k experts of
// every token (dropped assignments included); what the GPUs execute (the time) counts the experts over
// their E·C slots per micro-batch (capacity padding; dropped assignments not at all), and recomputation
// as above (full: the MoE block's forward again, slots included; selective: attention only).
double moe_model_flops_per_step(const ArchSpec& arch, const MoeOptions& moe, int64_t global_batch);
double moe_hardware_flops_per_step(const ArchSpec& arch, const MoeOptions& moe, int64_t global_batch, int micro_batch,
                                   const std::string& recompute);

// --app cp (bench/cp): model FLOPs are the dense model's (context parallelism does not change the
// math). What the GPUs execute adds recomputation as the app runs it: full, one more forward of every
// block; selective, the attention products again only where the attention keeps its probabilities
// (cp 1: the backend's, the cpu backend; cp > 1: the alltoall core on the cpu backend): ring and
// allgather keep log-sum-exp statistics, a fused kernel its softmax statistics, nothing to recompute.
double cp_hardware_flops_per_step(const PlanConfig& config);

// The whole plan: memory, fit, time. Closed-form: no loop over ranks. Throws ConfigError when a
// calibration lacks what the plan needs (a GEMM or attention of its backend and dtype, a collective).
PlanResult evaluate(const PlanConfig& config);

// "does not fit: needs X GiB per rank, Y GiB (Z%) more than --gpu-memory G", or "" when it fits.
std::string fit_message(const PlanResult& result);

// ---- the command line ------------------------------------------------------------------------------------
struct Sweep {
  std::string key;                  // option name without dashes, e.g. "micro-batch"
  std::vector<std::string> values;
};

enum class Format { table, csv, json };

struct PlanRequest {
  std::vector<PlanConfig> plans;  // one per point of the sweeps' cartesian product (or the one plan)
  std::vector<Sweep> sweeps;
  Format format = Format::table;
  bool require_fit = false;
  // --search: plans[0] is the base of the search (search.h), which prints the `top` fastest layouts that
  // fit (all: 0).
  bool search = false;
  int top = 10;
};

struct ParseOutcome {
  bool run = false;        // false: print `message` and exit with `exit_code`
  int exit_code = 0;
  std::string message;
  bool is_error = false;
};

// Parses and validates the command line (args without the program name) into plans. Errors are
// exit code 2 with a message that names the option, the value and the rule.
ParseOutcome parse_plan_request(const std::vector<std::string>& args, PlanRequest* request);

}  // namespace pb::plan
