// parabench-plan's model against the published figures (Megatron-LM's 18 and ZeRO's 16 bytes per
// parameter, ZeRO's 7.5B-on-64-GPUs table), the division of each shard strategy, the activation
// terms' scaling, the presets' parameter counts, SPEC 6's FLOP formula, tensor parallelism's memory
// (the tp app's formula) and collectives (bench/tp/README.md), expert parallelism's memory (bench/ep's
// plan_moe_memory, called here as parabench-ep calls it), collectives (bench/ep/README.md) and MoE
// FLOPs, context parallelism's memory (bench/cp's plan_cp_memory, called as parabench-cp calls it),
// exchanges (bench/cp/context_attention.cpp) and FLOPs, pipeline parallelism's memory per stage (bench/pp's
// predict_pipeline_memory, called as parabench-pp calls it), bubble and messages, the calibrated step
// time (the bus-bandwidth interpolation, the nearest measured GEMM, the compute as the sum of a rank's
// kernels against the FLOP formula), the fit verdict, the validation messages, and speed. Plans are
// built through the command line, as a user builds them.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <sstream>

#include "bench/plan/calibration.h"
#include "bench/plan/plan.h"
#include "bench/plan/plan_report.h"
#include "bench/plan/step_time.h"
#include "bench/pp/schedule.h"
#include "common/errors.h"
#include "common/runner.h"

namespace pb::plan {
namespace {

std::vector<std::string> words(const std::string& command_line) {
  std::istringstream in(command_line);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// Every plan of a command line (more than one with --sweep); fails the test on a parse error.
std::vector<PlanResult> plans_of(const std::string& command_line) {
  PlanRequest request;
  const ParseOutcome outcome = parse_plan_request(words(command_line), &request);
  EXPECT_TRUE(outcome.run) << command_line << ": " << outcome.message;
  std::vector<PlanResult> results;
  for (const PlanConfig& c : request.plans) results.push_back(evaluate(c));
  return results;
}

PlanResult plan_of(const std::string& command_line) {
  std::vector<PlanResult> results = plans_of(command_line);
  EXPECT_EQ(results.size(), 1u) << command_line;
  return results.empty() ? PlanResult{} : results.front();
}

// The message of a command line that must be rejected with exit code 2.
std::string rejection_of(const std::string& command_line) {
  PlanRequest request;
  const ParseOutcome outcome = parse_plan_request(words(command_line), &request);
  EXPECT_FALSE(outcome.run) << command_line << " was accepted";
  EXPECT_EQ(outcome.exit_code, kExitConfig) << command_line;
  EXPECT_TRUE(outcome.is_error) << command_line;
  return outcome.message;
}

int64_t bytes(const PlanResult& r, MemCategory c) { return r.per_rank[c]; }

// ---- model-state bytes per parameter: the published figures ------------------------------------------

TEST(ModelStates, MegatronEighteenBytesPerParameterForBf16WithFp32Gradients) {
  // Megatron-LM theoretical_memory_usage.py: 18 bytes per parameter without the distributed optimizer
  // (bf16 weight 2, fp32 gradient 4, fp32 master weight 4, Adam m and v 8).
  for (const char* model : {"gpt2-124m", "llama3-8b", "gpt3-175b"}) {
    const PlanResult r = plan_of(std::string("--model ") + model + " --app fsdp --shard NO_SHARD --gpus 8 --dtype bf16");
    EXPECT_DOUBLE_EQ(r.model_state_bytes_per_param, 18.0) << model;
    EXPECT_EQ(bytes(r, MemCategory::parameters), 2 * r.stored_parameters);
    EXPECT_EQ(bytes(r, MemCategory::gradients), 4 * r.stored_parameters);
    EXPECT_EQ(bytes(r, MemCategory::master_parameters), 4 * r.stored_parameters);
    EXPECT_EQ(bytes(r, MemCategory::optimizer_states), 8 * r.stored_parameters);
  }
}

TEST(ModelStates, MegatronDistributedOptimizerIsSixPlusTwelveOverDp) {
  // theoretical_memory_usage.py with --use-distributed-optimizer: 6 + 12/dp bytes per parameter,
  // which is ZERO1 with fp32 gradients (master weights and Adam sharded, bf16 weights and fp32
  // gradients whole). 7.5e9 / 64 divides, so there is no padding.
  const PlanResult r = plan_of("--params 7.5e9 --app fsdp --gpus 64 --shard ZERO1 --dtype bf16");
  EXPECT_EQ(r.model_state_bytes, (6 * 64 + 12) * int64_t{7'500'000'000} / 64);
  EXPECT_DOUBLE_EQ(r.model_state_bytes_per_param, 6.0 + 12.0 / 64);
}

TEST(ModelStates, ZeroSixteenBytesPerParameterForBf16Gradients) {
  // ZeRO (Rajbhandari et al. 2020), section 3.1: 2Ψ + 2Ψ + KΨ with K = 12.
  const PlanResult r = plan_of("--model llama3-8b --app fsdp --shard NO_SHARD --dtype bf16 --grad-dtype bf16");
  EXPECT_DOUBLE_EQ(r.model_state_bytes_per_param, 16.0);
  EXPECT_EQ(bytes(r, MemCategory::gradients), 2 * r.parameters);
  EXPECT_EQ(bytes(r, MemCategory::master_parameters) + bytes(r, MemCategory::optimizer_states), 12 * r.parameters);
}

TEST(ModelStates, Fp32IsSixteenBytesPerParameterWithoutMasterWeights) {
  const PlanResult r = plan_of("--model gpt2-124m --app dp --dtype fp32");
  EXPECT_DOUBLE_EQ(r.model_state_bytes_per_param, 16.0);
  EXPECT_EQ(bytes(r, MemCategory::master_parameters), 0);
  EXPECT_EQ(bytes(r, MemCategory::parameters), 4 * r.stored_parameters);
}

// Megatron-LM's padded_vocab_size: the vocabulary stored padded to a multiple of 128 × tp; the padding
// is memory (and bytes moved), not parameters.
TEST(ModelStates, VocabularyPaddedAsMegatronPadsIt) {
  // The apps' GPT-2 small: GPT-2's 124,439,808 parameters and an untied head.w (50257 × 768).
  const int64_t h = 768, P = 124439808 + 50257 * h;
  const PlanResult r = plan_of("--model gpt2-124m --app dp --dtype fp32");
  EXPECT_EQ(r.parameters, P);
  EXPECT_EQ(r.stored_parameters, P + (50304 - 50257) * h * 2);  // embed.tok's rows and head.w's columns
  const PlanResult unpadded = plan_of("--model gpt2-124m --app dp --dtype fp32 --make-vocab-size-divisible-by 1");
  EXPECT_EQ(unpadded.stored_parameters, P);
  EXPECT_EQ(bytes(unpadded, MemCategory::parameters), 4 * P);
  const PlanResult tp4 = plan_of("--model gpt2-124m --app tp --tp 4 --gpus 4 --dtype fp32");
  EXPECT_EQ(tp4.config.memory.arch.padded_vocab(4), 50688);  // 99 × 512
  EXPECT_EQ(tp4.stored_parameters, P + (50688 - 50257) * h * 2);
  EXPECT_NE(tp4.stored_parameters, r.stored_parameters);  // a multiple of 128 × tp
  int64_t local = 0;
  for (int64_t u : unit_parameter_counts(tp4.config.memory.arch, 4)) local += u;
  EXPECT_EQ(tp4.rank_parameters, local);
  const int64_t tok_block = 50688 / 4 * h;  // embed.tok's rows of one tp rank
  EXPECT_EQ(unit_parameter_counts(tp4.config.memory.arch, 4)[0], tok_block + 1024 * h);
  EXPECT_EQ(rejection_of("--model gpt2-124m --make-vocab-size-divisible-by 0"),
            "--make-vocab-size-divisible-by 0 must be at least 1");
  EXPECT_EQ(rejection_of("--model gpt2-124m --make-vocab-size-divisible-by 4294967296"),
            "--make-vocab-size-divisible-by 4294967296 must be at most 1048576");
}

// ZeRO, figure 1 / section 5: Ψ = 7.5B, Nd = 64, K = 12: 120 GB (baseline), 31.4 GB (P_os),
// 16.6 GB (P_os+g), 1.9 GB (P_os+g+p), with GB = 1e9 bytes.
struct ZeroFigure {
  const char* shard;
  double gigabytes;  // as printed in the paper, one decimal
};
constexpr ZeroFigure kZeroFigures[] = {
    {"NO_SHARD", 120.0}, {"ZERO1", 31.4}, {"SHARD_GRAD_OP", 16.6}, {"FULL_SHARD", 1.9}};

double one_decimal(double x) { return std::round(x * 10.0) / 10.0; }

TEST(ModelStates, ZeroPaperFiguresForSevenPointFiveBillionParametersOnSixtyFourGpus) {
  const std::vector<PlanResult> results = plans_of(
      "--params 7.5e9 --app fsdp --gpus 64 --dtype bf16 --grad-dtype bf16 "
      "--sweep shard=NO_SHARD,ZERO1,SHARD_GRAD_OP,FULL_SHARD");
  ASSERT_EQ(results.size(), 4u);
  for (std::size_t i = 0; i < results.size(); ++i) {
    const double gb = static_cast<double>(results[i].model_state_bytes) / 1e9;
    EXPECT_EQ(one_decimal(gb), kZeroFigures[i].gigabytes) << kZeroFigures[i].shard << ": " << gb << " GB";
    EXPECT_EQ(results[i].per_rank.peak_total, results[i].model_state_bytes) << "--params has model states only";
  }
  // 7.5e9 / 64 divides exactly, so the figures are exact before rounding: 16Ψ, 4Ψ + 12Ψ/64, 2Ψ + 14Ψ/64, 16Ψ/64.
  EXPECT_EQ(results[0].model_state_bytes, 120'000'000'000);
  EXPECT_EQ(results[1].model_state_bytes, 31'406'250'000);
  EXPECT_EQ(results[2].model_state_bytes, 16'640'625'000);
  EXPECT_EQ(results[3].model_state_bytes, 1'875'000'000);
}

TEST(ModelStates, ZeroPaperFiguresHoldPerParameterForARealModel) {
  // The same division through predict_memory and a model's units (padding included): bytes per
  // parameter × 7.5e9 rounds to the paper's figures.
  const char* base = "--model llama3-8b --app fsdp --gpus 64 --dtype bf16 --grad-dtype bf16 --shard ";
  for (const ZeroFigure& f : kZeroFigures) {
    const PlanResult r = plan_of(std::string(base) + f.shard);
    EXPECT_EQ(one_decimal(r.model_state_bytes_per_param * 7.5), f.gigabytes) << f.shard;
  }
}

// ---- each shard strategy divides what it says it divides ----------------------------------------------

int64_t sharded_elements(const ArchSpec& arch, int ranks) {
  int64_t total = 0;
  for (int64_t u : unit_parameter_counts(arch)) total += shard_elements(u, ranks);
  return total;
}

TEST(ModelStates, EachShardStrategyDividesItsCategoriesWithPadding) {
  // gpt2-1.5b: units of awkward sizes (h = 1600, V = 50257) over 48 ranks, so padding is exercised.
  const int ranks = 48;
  const std::string base = "--model gpt2-1.5b --app fsdp --gpus " + std::to_string(ranks) + " --dtype bf16 --shard ";
  const PlanResult none = plan_of(base + "NO_SHARD");
  const int64_t P = none.stored_parameters;
  const int64_t own = sharded_elements(none.config.memory.arch, ranks);
  EXPECT_GT(own * ranks, P) << "the test needs units that do not divide";
  EXPECT_LT(own * ranks - P, static_cast<int64_t>(ranks) * 64) << "padding is less than one element per rank per unit";

  const PlanResult zero1 = plan_of(base + "ZERO1");
  EXPECT_EQ(bytes(zero1, MemCategory::master_parameters), 4 * own);
  EXPECT_EQ(bytes(zero1, MemCategory::optimizer_states), 8 * own);
  EXPECT_GE(bytes(zero1, MemCategory::parameters), 2 * P);  // whole (padded) weights and gradients
  EXPECT_LE(bytes(zero1, MemCategory::parameters), 2 * own * ranks);
  EXPECT_GE(bytes(zero1, MemCategory::gradients), 4 * P);

  const PlanResult grad_op = plan_of(base + "SHARD_GRAD_OP");
  EXPECT_EQ(bytes(grad_op, MemCategory::gradients), 4 * own);
  EXPECT_EQ(bytes(grad_op, MemCategory::master_parameters), 4 * own);
  EXPECT_EQ(bytes(grad_op, MemCategory::optimizer_states), 8 * own);
  EXPECT_GE(bytes(grad_op, MemCategory::parameters), 2 * P);

  const PlanResult full = plan_of(base + "FULL_SHARD");
  EXPECT_EQ(bytes(full, MemCategory::parameters), 2 * own);
  EXPECT_EQ(full.model_state_bytes, 18 * own);
  EXPECT_GT(bytes(full, MemCategory::comm_buffers), 0) << "FULL_SHARD gathers units into buffers";

  // HYBRID_SHARD over groups of 8 is FULL_SHARD over 8 ranks, whatever the number of groups.
  const PlanResult hybrid = plan_of(base + "HYBRID_SHARD --shard-group 8");
  const PlanResult full8 = plan_of("--model gpt2-1.5b --app fsdp --gpus 8 --dtype bf16 --shard FULL_SHARD");
  EXPECT_EQ(hybrid.model_state_bytes, full8.model_state_bytes);
  EXPECT_EQ(hybrid.model_state_bytes, 18 * sharded_elements(none.config.memory.arch, 8));

  // Activations and workspace do not depend on the strategy.
  for (const PlanResult* r : {&zero1, &grad_op, &full, &hybrid}) {
    EXPECT_EQ(bytes(*r, MemCategory::activations), bytes(none, MemCategory::activations));
    EXPECT_EQ(bytes(*r, MemCategory::workspace), bytes(none, MemCategory::workspace));
  }
}

TEST(ModelStates, PlannerUsesTheAppsFormula) {
  // The planner's plan of a dp run is the app's /memory/predicted for it (common/memory_model.h).
  Options o;
  ASSERT_TRUE(model_preset("small", &o.model));
  o.model.ffn = 4 * o.model.hidden;
  o.dtype = "fp32";
  o.micro_batch = 3;
  o.recompute = "none";
  const MemoryEstimate app = predict_memory(memory_plan_for(o, /*attention_keeps_probabilities=*/true));
  const PlanResult r = plan_of("--model small --app dp --gpus 4 --backend cpu --micro-batch 3");
  for (MemCategory c : all_mem_categories()) EXPECT_EQ(r.per_rank[c], app[c]) << mem_category_name(c);
  EXPECT_EQ(r.per_rank.peak_total, app.peak_total);
}

// ---- activations -------------------------------------------------------------------------------------

TEST(Activations, LinearInMicroBatch) {
  for (const char* backend : {"cpu", "cuda"}) {
    const std::vector<PlanResult> results =
        plans_of(std::string("--model gpt2-124m --app fsdp --gpus 4 --backend ") + backend + " --sweep micro-batch=1,2,4,8");
    ASSERT_EQ(results.size(), 4u);
    const int64_t one = bytes(results[0], MemCategory::activations);
    ASSERT_GT(one, 0);
    for (const PlanResult& r : results) {
      const int b = r.config.memory.micro_batch;
      EXPECT_EQ(bytes(r, MemCategory::activations), b * one) << backend << " micro-batch " << b;
      // Model states do not depend on the micro-batch.
      EXPECT_EQ(r.model_state_bytes, results[0].model_state_bytes);
    }
  }
}

TEST(Activations, FullRecomputeBelowSelectiveBelowNone) {
  // With the probabilities kept (cpu backend), selective recomputation drops a·b·S² per block.
  const std::vector<PlanResult> r =
      plans_of("--model gpt2-124m --app dp --backend cpu --micro-batch 2 --sweep recompute=none,selective,full");
  ASSERT_EQ(r.size(), 3u);
  const int64_t none = bytes(r[0], MemCategory::activations), selective = bytes(r[1], MemCategory::activations),
                full = bytes(r[2], MemCategory::activations);
  EXPECT_LT(full, selective);
  EXPECT_LT(selective, none);
  // Korthikanti et al.: selective saves nearly all of the attention term 5as/h of 34 + 5as/h.
  const ArchSpec& a = r[0].config.memory.arch;
  const int64_t probabilities = 4 * a.heads * 2 * a.seq * a.seq;  // fp32, per block, micro-batch 2
  EXPECT_GT(none - selective, (a.layers - 2) * probabilities);
  EXPECT_LE(none - selective, a.layers * probabilities);
}

// ---- presets ------------------------------------------------------------------------------------------

TEST(Presets, ParameterCountsMatchThePublishedSizes) {
  const std::pair<const char*, double> published[] = {
      {"llama3-405b", 405e9}, {"llama3-70b", 70.6e9}, {"llama3-8b", 8.03e9}, {"gpt3-175b", 175e9}};
  for (const auto& [name, count] : published) {
    ArchSpec a;
    ASSERT_TRUE(arch_preset(name, &a)) << name;
    EXPECT_NEAR(static_cast<double>(total_parameters(a)) / count, 1.0, 0.01) << name << ": " << total_parameters(a);
  }
  ArchSpec a;
  ASSERT_TRUE(arch_preset("llama3-405b", &a));
  EXPECT_EQ(total_parameters(a), 405'853'388'800);  // Meta's Llama-3.1-405B: 405.85B
  // SPEC's gpt2-124m has an untied head; tied, it is GPT-2 small as Hugging Face counts it.
  ASSERT_TRUE(arch_preset("gpt2-124m", &a));
  a.tied_embeddings = true;
  EXPECT_EQ(total_parameters(a), 124'439'808);
  EXPECT_FALSE(arch_preset("gpt5", &a));
}

TEST(Presets, ShapeOverridesFollowThePreset) {
  // GPT presets: kv-heads and ffn follow heads and hidden; Llama presets keep their GQA and ffn.
  const PlanResult gpt = plan_of("--model gpt2-124m --hidden 1024 --heads 16");
  EXPECT_EQ(gpt.config.memory.arch.kv_heads, 16);
  EXPECT_EQ(gpt.config.memory.arch.ffn, 4096);
  const PlanResult llama = plan_of("--model llama3-8b --heads 64 --kv-heads 16 --gated-mlp=false --tied-embeddings");
  EXPECT_EQ(llama.config.memory.arch.kv_heads, 16);
  EXPECT_EQ(llama.config.memory.arch.ffn, 14336);
  EXPECT_FALSE(llama.config.memory.arch.gated_mlp);
  EXPECT_TRUE(llama.config.memory.arch.tied_embeddings);
}

// ---- time estimate ---------------------------------------------------------------------------------------

TEST(Time, ModelFlopsReduceToSpecFormulaForTheGpt) {
  const PlanResult r = plan_of("--model gpt2-350m --app dp --gpus 8 --micro-batch 4");
  const ArchSpec& a = r.config.memory.arch;
  const double G = 32, S = a.seq, L = a.layers, h = a.hidden, V = a.vocab;
  const double spec = 72.0 * G * S * L * h * h * (1 + S / (6 * h) + V / (12 * h * L));
  EXPECT_NEAR(r.model_flops_per_step / spec, 1.0, 1e-12);
  EXPECT_NEAR(r.compute_s, spec / (8 * 989e12 * 0.4), 1e-12 * r.compute_s);
}

TEST(Time, GatedGqaFlopsCountEveryProjection) {
  ArchSpec a;
  ASSERT_TRUE(arch_preset("llama3-8b", &a));
  const double h = a.hidden, S = a.seq, kv = a.kv_heads * a.head_dim();
  const double per_token = a.layers * (2 * h * (h + 2 * kv) + 2 * h * h + 6 * h * a.ffn + 4 * S * h) + 2 * h * a.vocab;
  EXPECT_NEAR(model_flops_per_step(a, 16) / (3 * 16 * S * per_token), 1.0, 1e-12);
}

TEST(Time, RecomputationAddsFlopsToTheTimeNotToModelFlops) {
  const std::vector<PlanResult> r = plans_of("--model gpt2-124m --app dp --gpus 8 --sweep recompute=none,selective,full");
  ASSERT_EQ(r.size(), 3u);
  const ArchSpec& a = r[0].config.memory.arch;
  const double tokens = 8.0 * a.seq, h = a.hidden, S = a.seq;
  for (const PlanResult& p : r) EXPECT_DOUBLE_EQ(p.model_flops_per_step, r[0].model_flops_per_step);
  EXPECT_DOUBLE_EQ(r[0].hardware_flops_per_step, r[0].model_flops_per_step);
  EXPECT_NEAR(r[1].hardware_flops_per_step - r[0].model_flops_per_step, tokens * a.layers * 4 * S * h, 1e3);
  // Full: one more forward of the blocks (24h² + 4Sh per token each for the GPT), under a third of
  // the model FLOPs because the head is not recomputed.
  const double full_extra = tokens * a.layers * (24 * h * h + 4 * S * h);
  EXPECT_NEAR(r[2].hardware_flops_per_step / (r[0].model_flops_per_step + full_extra), 1.0, 1e-12);
  EXPECT_LT(full_extra, r[0].model_flops_per_step / 3);
  EXPECT_NEAR(r[2].compute_s / r[0].compute_s, r[2].hardware_flops_per_step / r[0].model_flops_per_step, 1e-12);
}

TEST(Time, RingCollectivesOverTheRightLinks) {
  // dp over 16 ranks on 2 nodes: one fp32 all-reduce of every gradient over the NIC (400 Gb/s).
  const PlanResult dp = plan_of("--model gpt2-124m --app dp --gpus 16 --dtype fp32");
  ASSERT_EQ(dp.comm.size(), 1u);
  EXPECT_EQ(dp.comm[0].op, "all_reduce");
  EXPECT_EQ(dp.comm[0].bytes, 4 * dp.stored_parameters);  // the vocabulary's padding travels too
  EXPECT_EQ(dp.comm[0].link_gbps, 400.0);
  EXPECT_NEAR(dp.comm[0].seconds, 2.0 * 15 / 16 * 4 * dp.stored_parameters / 50e9, 1e-9);
  EXPECT_DOUBLE_EQ(dp.step_s, std::max(dp.compute_s, dp.comm_s));
  // Inside one node: NVLink. --no-overlap adds compute and communication.
  const PlanResult node = plan_of("--model gpt2-124m --app dp --gpus 8 --no-overlap");
  EXPECT_EQ(node.comm[0].link_gbps, 3600.0);
  EXPECT_DOUBLE_EQ(node.step_s, node.compute_s + node.comm_s);
  // FULL_SHARD, grad-accum 2: per micro-batch, an all-gather of the bf16 weights for forward, one for
  // backward of every unit but the last (kept from its forward), and one reduce-scatter; whole units
  // padded to the 16 shards.
  const PlanResult fsdp = plan_of("--model gpt2-124m --app fsdp --gpus 16 --global-batch 32 --link-gbps 100");
  ASSERT_EQ(fsdp.comm.size(), 3u);
  const int64_t Vp = 50304, h = 768, head = h * Vp + 2 * h;  // final LayerNorm and head.w (padded vocabulary)
  const int64_t padded_head = (head + 15) / 16 * 16;
  EXPECT_EQ(fsdp.comm[0].op, "all_gather");
  EXPECT_EQ(fsdp.comm[0].calls, 2);
  EXPECT_GE(fsdp.comm[0].bytes, 2 * fsdp.stored_parameters);
  EXPECT_LT(fsdp.comm[0].bytes, 2 * (fsdp.stored_parameters + 16 * 16));  // at most 15 padding elements per unit
  EXPECT_EQ(fsdp.comm[1].op, "all_gather");
  EXPECT_EQ(fsdp.comm[1].bytes, fsdp.comm[0].bytes - 2 * padded_head);
  EXPECT_EQ(fsdp.comm[2].op, "reduce_scatter");
  EXPECT_EQ(fsdp.comm[2].calls, 2);
  EXPECT_EQ(fsdp.comm[2].bytes, 2 * fsdp.comm[0].bytes);  // fp32 gradients
  EXPECT_EQ(fsdp.comm[2].link_gbps, 100.0);
}

// ---- tensor parallelism --------------------------------------------------------------------------------

TEST(TensorParallel, PlannerUsesTheTpAppsFormula) {
  // The planner's tp plan is parabench-tp's /memory/predicted: memory_plan_for of the run, with tp and
  // sequence parallelism set (bench/tp/main.cpp), through common/memory_model.h.
  for (const char* model : {"tiny", "small"}) {
    for (const char* recompute : {"none", "selective", "full"}) {
      for (bool sp : {false, true}) {
        Options o;
        ASSERT_TRUE(model_preset(model, &o.model));
        o.model.ffn = 4 * o.model.hidden;
        o.dtype = "fp32";
        o.micro_batch = 2;
        o.recompute = recompute;
        MemoryPlan app_plan = memory_plan_for(o, /*attention_keeps_probabilities=*/true);
        app_plan.tp = 2;
        app_plan.sequence_parallel = sp;
        const MemoryEstimate app = predict_memory(app_plan);
        const PlanResult r = plan_of(std::string("--model ") + model + " --app tp --gpus 4 --tp 2 --backend cpu " +
                                     "--dtype fp32 --micro-batch 2 --recompute " + recompute +
                                     (sp ? " --sequence-parallel" : ""));
        const std::string where = std::string(model) + " " + recompute + (sp ? " sp" : "");
        for (MemCategory c : all_mem_categories()) {
          EXPECT_EQ(r.per_rank[c], app[c]) << where << " " << mem_category_name(c);
        }
        EXPECT_EQ(r.per_rank.peak_total, app.peak_total) << where;
        EXPECT_EQ(r.config.dp, 2);
        EXPECT_EQ(r.config.memory.shard, ShardStrategy::no_shard);
      }
    }
  }
}

TEST(TensorParallel, ParametersPerRankShrinkAsOneOverTp) {
  const std::vector<PlanResult> r = plans_of("--model llama3-70b --app tp --gpus 64 --dtype bf16 --sweep tp=1,2,4,8");
  ASSERT_EQ(r.size(), 4u);
  for (const PlanResult& p : r) {
    const int t = p.config.tp();
    EXPECT_EQ(p.config.dp, 64 / t);
    int64_t local = 0;
    for (int64_t u : unit_parameter_counts(p.config.memory.arch, t)) local += u;
    EXPECT_EQ(p.rank_parameters, local);
    EXPECT_EQ(bytes(p, MemCategory::parameters), 2 * local);
    EXPECT_EQ(p.model_state_bytes, 18 * local);
    // Only the 2L + 1 norm weights are whole on every rank (rotary positions, no biases), so P_local · tp
    // exceeds P by those copies: 0.013% at tp 8.
    const ArchSpec& a = p.config.memory.arch;
    EXPECT_EQ(local * t - p.stored_parameters, (2 * a.layers + 1) * a.hidden * (t - 1)) << "tp " << t;
    EXPECT_NEAR(p.model_state_bytes_per_param, 18.0 / t, 1e-3 * 18.0 / t) << "tp " << t;
  }
  EXPECT_EQ(r[0].rank_parameters, r[0].stored_parameters);
  // Activations shrink too, but not by tp: without sequence parallelism the residual stream, the
  // LayerNorm outputs and their statistics stay whole on every rank.
  for (std::size_t i = 1; i < r.size(); ++i) {
    EXPECT_LT(bytes(r[i], MemCategory::activations), bytes(r[i - 1], MemCategory::activations));
    EXPECT_GT(bytes(r[i], MemCategory::activations) * 2, bytes(r[i - 1], MemCategory::activations));
  }
}

TEST(TensorParallel, SequenceParallelLowersActivations) {
  const std::vector<PlanResult> r =
      plans_of("--model llama3-70b --app tp --gpus 64 --tp 8 --dtype bf16 --sweep sequence-parallel=false,true");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_FALSE(r[0].config.sequence_parallel());
  EXPECT_TRUE(r[1].config.sequence_parallel());
  EXPECT_LT(bytes(r[1], MemCategory::activations), bytes(r[0], MemCategory::activations));
  EXPECT_EQ(r[1].model_state_bytes, r[0].model_state_bytes);
  // What sequence parallelism splits, per docs/memory-model.md: per block the four (N, h) tensors and
  // the norm statistics (Llama's RMSNorm: 2 values per row; a LayerNorm's would be 4), plus the embedding
  // output, the final norm's output and statistics (1 per row). Each rank keeps N/t of the N rows.
  const ArchSpec& a = r[0].config.memory.arch;
  ASSERT_TRUE(a.rms_norm);
  const int64_t N = a.seq, t = 8, e = 2, h = a.hidden;
  EXPECT_EQ(bytes(r[0], MemCategory::activations) - bytes(r[1], MemCategory::activations),
            (N - N / t) * (a.layers * (2 * 4 + 4 * e * h) + 2 * e * h + 1 * 4));
  // One (B·S, h) buffer for the gathered or reduce-scattered activations.
  EXPECT_EQ(bytes(r[0], MemCategory::comm_buffers), 0);
  EXPECT_EQ(bytes(r[1], MemCategory::comm_buffers), N * h * e);
  // At tp 1 the flag changes nothing, as in the app.
  const PlanResult one = plan_of("--model llama3-8b --app tp --gpus 8 --tp 1 --sequence-parallel");
  EXPECT_FALSE(one.config.sequence_parallel());
  EXPECT_EQ(one.per_rank.bytes, plan_of("--model llama3-8b --app dp --gpus 8").per_rank.bytes);
}

TEST(TensorParallel, RanksDefaultToOneTpGroup) {
  const PlanResult one_group = plan_of("--model llama3-8b --app tp --tp 4");
  EXPECT_EQ(one_group.config.ranks, 4);
  EXPECT_EQ(one_group.config.dp, 1);
  const PlanResult with_dp = plan_of("--model llama3-8b --app tp --tp 4 --dp 3");
  EXPECT_EQ(with_dp.config.ranks, 12);
  EXPECT_EQ(with_dp.config.dp, 3);
  EXPECT_EQ(with_dp.config.global_batch, 3);
}

// The per-step collectives of bench/tp/README.md, "Communication per step per rank".
TEST(TensorParallel, CollectivesAreTheAppsPerMicroBatchFormulas) {
  const char* base =
      "--model small --app tp --gpus 8 --tp 4 --backend cpu --dtype fp32 --micro-batch 2 --global-batch 8";
  for (bool sp : {false, true}) {
    const PlanResult r = plan_of(std::string(base) + (sp ? " --sequence-parallel" : ""));
    const ArchSpec& a = r.config.memory.arch;
    const int64_t N = 2 * a.seq, h = a.hidden, L = a.layers, m = r.config.grad_accum;
    ASSERT_EQ(m, 2);
    std::map<std::string, int64_t> volume, calls;  // bytes × calls and calls per op, tp group only
    for (const CommEstimate& e : r.comm) {
      if (e.ranks != 4) continue;
      EXPECT_TRUE(e.blocking) << e.what;
      EXPECT_EQ(e.link_gbps, 3600.0) << "a tp group of 4 stays inside a node of 8";
      volume[e.op] += e.bytes * e.calls;
      calls[e.op] += e.calls;
    }
    if (!sp) {
      // all_reduce: 4·(N·h·(4L + 2) + 3N) bytes per micro-batch.
      EXPECT_EQ(volume["all_reduce"], m * 4 * (N * h * (4 * L + 2) + 3 * N));
      EXPECT_EQ(volume.count("all_gather"), 0u);
    } else {
      EXPECT_EQ(volume["all_gather"], m * 4 * N * h * (6 * L + 3));
      EXPECT_EQ(calls["all_gather"], m * (6 * L + 3));
      EXPECT_EQ(volume["reduce_scatter"], m * 4 * N * h * (4 * L + 2));
      EXPECT_EQ(calls["reduce_scatter"], m * (4 * L + 2));
      // the softmax statistics per micro-batch, and 4L + 2 LayerNorm gradients of h floats per step
      EXPECT_EQ(volume["all_reduce"], m * 4 * 3 * N + (4 * L + 2) * 4 * h);
    }
    // The dp all-reduce: a rank's gradients (P_local), over the 2 ranks 4 apart, once per step.
    const CommEstimate& dp = r.comm.back();
    EXPECT_EQ(dp.op, "all_reduce");
    EXPECT_EQ(dp.ranks, 2);
    EXPECT_EQ(dp.calls, 1);
    EXPECT_EQ(dp.bytes, 4 * r.rank_parameters);
    EXPECT_FALSE(dp.blocking);
  }
  // bf16: activations at 2 bytes; full recomputation repeats each block's two forward collectives.
  const PlanResult bf16 = plan_of("--model llama3-8b --app tp --gpus 16 --tp 8 --dtype bf16 --recompute full");
  const ArchSpec& a = bf16.config.memory.arch;
  ASSERT_GE(bf16.comm.size(), 1u);
  EXPECT_EQ(bf16.comm[0].bytes, 2 * a.seq * a.hidden);
  EXPECT_EQ(bf16.comm[0].calls, 4 * a.layers + 2 + 2 * a.layers);
}

TEST(TensorParallel, TpCollectivesBlockTheStep) {
  // tp 8 inside a node (NVLink), dp 8 across nodes (the NIC); the dp all-reduce overlaps compute, the
  // tp collectives add to it.
  const PlanResult r = plan_of("--model llama3-70b --app tp --gpus 64 --tp 8 --sequence-parallel --dtype bf16");
  double tp_s = 0, dp_s = 0;
  for (const CommEstimate& e : r.comm) {
    EXPECT_EQ(e.link_gbps, e.blocking ? 3600.0 : 400.0) << e.what;
    (e.blocking ? tp_s : dp_s) += e.seconds;
  }
  EXPECT_GT(tp_s, 0);
  EXPECT_GT(dp_s, 0);
  EXPECT_DOUBLE_EQ(r.blocking_comm_s, tp_s);
  EXPECT_DOUBLE_EQ(r.step_s, std::max(r.compute_s, dp_s) + tp_s);
  EXPECT_NEAR(r.compute_s, r.model_flops_per_step / (64 * 989e12 * 0.4), 1e-12 * r.compute_s);
  const PlanResult serial = plan_of("--model llama3-70b --app tp --gpus 64 --tp 8 --sequence-parallel --no-overlap");
  EXPECT_DOUBLE_EQ(serial.step_s, serial.compute_s + serial.comm_s);
  // A tp group wider than a node crosses the NIC.
  const PlanResult wide = plan_of("--model llama3-70b --app tp --gpus 64 --tp 8 --gpus-per-node 4");
  EXPECT_EQ(wide.comm.front().link_gbps, 400.0);
  // Sequence parallelism moves what the all-reduces move (one all-reduce = a reduce-scatter and an
  // all-gather) plus the LayerNorm outputs that backward gathers again: (6L+3) + (4L+2) halves against
  // 2·(4L+2), 1.25 times the time at the same link.
  const PlanResult no_sp = plan_of("--model llama3-70b --app tp --gpus 64 --tp 8");
  EXPECT_NEAR(r.blocking_comm_s / no_sp.blocking_comm_s, 1.25, 1e-3);
}

// ---- expert parallelism -----------------------------------------------------------------------------------

// The MoE model's parameters as bench/ep/README.md counts them (GELU experts, biases, learned positions):
// P_rep = V·h + S·h + L·(4h + 3h² + 3h + h² + h + h·E) + 2h + h·V replicated, 2h·f + f + h per expert.
int64_t replicated_moe_parameters(const ArchSpec& a, int64_t E) {
  const int64_t h = a.hidden, L = a.layers;
  return a.vocab * h + a.seq * h + L * (4 * h + 3 * h * h + 3 * h + h * h + h + h * E) + 2 * h + h * a.vocab;
}
int64_t expert_parameters(const ArchSpec& a) { return 2 * a.hidden * a.ffn + a.ffn + a.hidden; }

TEST(ExpertParallel, PlannerUsesTheEpAppsFormula) {
  // parabench-ep's /memory/predicted: memory_plan_for of the run, completed by plan_moe_memory
  // (bench/ep/main.cpp), through common/memory_model.h.
  for (const char* model : {"tiny", "small"}) {
    for (int ep : {1, 2, 4}) {
      for (double capacity : {0.0, 1.0, 1.25}) {
        for (const char* recompute : {"none", "selective", "full"}) {
          for (double aux : {0.0, 0.01}) {
            Options o;
            ASSERT_TRUE(model_preset(model, &o.model));
            o.model.ffn = 4 * o.model.hidden;
            o.dtype = "fp32";
            o.micro_batch = 2;
            o.recompute = recompute;
            MoeOptions moe;
            moe.experts = 8;
            moe.top_k = 2;
            moe.capacity_factor = capacity;
            moe.aux_loss = aux;
            MemoryPlan app_plan = memory_plan_for(o, /*attention_keeps_probabilities=*/true);
            plan_moe_memory(app_plan, moe, ep, /*micro_batches=*/1);  // global batch 2 × dp 4: no accumulation
            const MemoryEstimate app = predict_memory(app_plan);
            std::ostringstream command;
            command << "--model " << model << " --app ep --gpus 4 --ep " << ep << " --experts 8 --top-k 2"
                    << " --capacity-factor " << capacity << " --aux-loss " << aux << " --backend cpu --dtype fp32"
                    << " --micro-batch 2 --recompute " << recompute;
            const PlanResult r = plan_of(command.str());
            for (MemCategory c : all_mem_categories()) {
              EXPECT_EQ(r.per_rank[c], app[c]) << command.str() << ": " << mem_category_name(c);
            }
            EXPECT_EQ(r.per_rank.peak_total, app.peak_total) << command.str();
            EXPECT_EQ(r.config.dp, 4);
            EXPECT_EQ(r.config.grad_accum, 1);
            EXPECT_EQ(r.config.ep, ep);
            EXPECT_EQ(r.config.capacity(), moe_capacity(moe, 2 * o.model.seq));
            // Parameters: the whole MoE model, and a rank's share (replicated + its E/ep experts).
            const ArchSpec& a = r.config.memory.arch;
            const int64_t rep = replicated_moe_parameters(a, 8), expert = expert_parameters(a);
            EXPECT_EQ(r.parameters, rep + a.layers * 8 * expert) << command.str();
            EXPECT_EQ(r.rank_parameters, rep + a.layers * (8 / ep) * expert) << command.str();
            EXPECT_EQ(bytes(r, MemCategory::parameters), 4 * r.rank_parameters) << command.str();
          }
        }
      }
    }
  }
}

TEST(ExpertParallel, MixtralsParameterCount) {
  // Mixtral 8x7B (Jiang et al. 2024) is llama3-8b's block (h 4096, 32 heads, 8 key/value heads, SwiGLU
  // ffn 14336, RMSNorm, no biases, untied head) with 8 experts, top-2 and a 32000-token vocabulary:
  // 46.7B parameters, 12.9B of them active per token.
  const PlanResult r = plan_of("--model llama3-8b --vocab 32000 --app ep --gpus 8 --ep 8 --experts 8 --top-k 2");
  EXPECT_NEAR(static_cast<double>(r.parameters) / 46.7e9, 1.0, 1e-3) << r.parameters;
  const ArchSpec& a = r.config.memory.arch;
  const int64_t expert = 3 * a.hidden * a.ffn, L = a.layers;
  EXPECT_EQ(r.rank_parameters, r.parameters - L * 7 * expert) << "one expert per rank";
  EXPECT_NEAR(static_cast<double>(r.parameters - L * 6 * expert) / 12.9e9, 1.0, 1e-2) << "active: 2 of 8 experts";
}

TEST(ExpertParallel, ExpertsDivideModelStatesNotTheRest) {
  const std::vector<PlanResult> r = plans_of("--model llama3-8b --app ep --gpus 64 --experts 16 --top-k 2 "
                                             "--sweep ep=1,2,4,8,16");
  ASSERT_EQ(r.size(), 5u);
  const ArchSpec& a = r[0].config.memory.arch;
  const int64_t expert = a.mlp_in_width() * a.hidden + a.ffn * a.hidden;  // gated, no biases
  for (const PlanResult& p : r) {
    const int ep = p.config.ep;
    EXPECT_EQ(p.parameters, r[0].parameters);
    EXPECT_EQ(r[0].rank_parameters - p.rank_parameters, a.layers * (16 - 16 / ep) * expert) << "ep " << ep;
    EXPECT_EQ(p.model_state_bytes, 18 * p.rank_parameters) << "ep " << ep;
    // Activations and workspace do not depend on ep (E·C slots on every rank); the all-to-all buffers do.
    EXPECT_EQ(bytes(p, MemCategory::activations), bytes(r[0], MemCategory::activations));
    EXPECT_EQ(bytes(p, MemCategory::comm_buffers) > 0, ep > 1);
  }
  // E experts of llama3-8b's MLP: 16 × 32 × 3 × 4096 × 14336 expert parameters besides the rest.
  EXPECT_EQ(r[0].parameters - total_parameters(a), a.layers * (15 * expert + a.hidden * 16));
}

// The per-step collectives of bench/ep/README.md, "Communication per step per rank".
TEST(ExpertParallel, CollectivesAreTheAppsFormulas) {
  for (const char* recompute : {"none", "full"}) {
    const PlanResult r = plan_of(std::string("--model small --app ep --gpus 8 --ep 2 --experts 8 --top-k 2 "
                                             "--backend cpu --dtype fp32 --micro-batch 2 --global-batch 32 "
                                             "--recompute ") + recompute);
    const ArchSpec& a = r.config.memory.arch;
    const int64_t h = a.hidden, L = a.layers, m = r.config.grad_accum, N = 2 * a.seq, E = 8;
    ASSERT_EQ(m, 2);
    const int64_t C = (2 * N + E - 1) / E;  // ceil(1.0 · k · N / E)
    EXPECT_EQ(r.config.capacity(), C);
    ASSERT_EQ(r.comm.size(), 3u);
    const CommEstimate& a2a = r.comm[0];
    EXPECT_EQ(a2a.op, "all_to_all");
    EXPECT_EQ(a2a.bytes, 4 * E * C * h);
    EXPECT_EQ(a2a.calls, (std::string(recompute) == "full" ? 6 : 4) * m * L);
    EXPECT_EQ(a2a.ranks, 2);
    EXPECT_TRUE(a2a.blocking);
    EXPECT_EQ(a2a.link_gbps, 3600.0);
    EXPECT_EQ(r.comm[1].op, "all_reduce");
    EXPECT_EQ(r.comm[1].bytes, 4 * replicated_moe_parameters(a, E));
    EXPECT_EQ(r.comm[1].ranks, 8);
    EXPECT_EQ(r.comm[2].op, "all_reduce");
    EXPECT_EQ(r.comm[2].bytes, 4 * L * (E / 2) * expert_parameters(a));
    EXPECT_EQ(r.comm[2].ranks, 4);
    for (std::size_t i = 1; i < 3; ++i) {
      EXPECT_EQ(r.comm[i].calls, 1) << "one pass of the flat gradient buffer";
      EXPECT_FALSE(r.comm[i].blocking);
    }
    EXPECT_EQ(r.comm[1].bytes + r.comm[2].bytes, 4 * r.rank_parameters);
    EXPECT_DOUBLE_EQ(r.step_s, std::max(r.compute_s, r.comm[1].seconds + r.comm[2].seconds) + a2a.seconds);
  }
  // ep 1: no token moves, the experts are all-reduced over dp. ep = dp: no expert all-reduce.
  const PlanResult one = plan_of("--model small --app ep --gpus 4 --ep 1");
  ASSERT_EQ(one.comm.size(), 2u);
  EXPECT_EQ(one.comm[0].op, "all_reduce");
  EXPECT_EQ(one.comm[1].ranks, 4);
  const PlanResult all = plan_of("--model small --app ep --gpus 4 --ep 4");
  ASSERT_EQ(all.comm.size(), 2u);
  EXPECT_EQ(all.comm[0].op, "all_to_all");
  EXPECT_EQ(all.comm[1].ranks, 4);
  EXPECT_EQ(all.comm[1].bytes, 4 * replicated_moe_parameters(all.config.memory.arch, 8))
      << "bf16 by default, with fp32 gradients: 4 bytes per replicated parameter";
  // bf16: the slots move at 2 bytes; dropless (capacity factor 0): C = N, E/(c·k) times the data.
  const PlanResult bf16 = plan_of("--model small --app ep --gpus 4 --ep 2 --capacity-factor 0");
  const ArchSpec& a = bf16.config.memory.arch;
  EXPECT_EQ(bf16.comm[0].bytes, 2 * 8 * a.seq * a.hidden);
  EXPECT_EQ(bf16.comm[0].calls, 4 * a.layers);
  // --no-overlap: compute, then every collective.
  const PlanResult serial = plan_of("--model small --app ep --gpus 4 --ep 2 --no-overlap");
  EXPECT_DOUBLE_EQ(serial.step_s, serial.compute_s + serial.comm_s);
  // An ep group wider than a node crosses the NIC; the dp/ep group (ranks ep apart) too.
  const PlanResult wide = plan_of("--model small --app ep --gpus 16 --ep 16 --experts 16 --gpus-per-node 8");
  EXPECT_EQ(wide.comm[0].link_gbps, 400.0);
}

TEST(ExpertParallel, ModelFlopsCountKExpertsAndTheRouter) {
  // The app's model FLOPs for its MoE (common/runner.cpp with MoeMlp's term): 6·G·S·(L·(4h² + k·2h·f + h·E
  // + 2·S·h) + h·V), forward and backward, k experts per token in place of the dense MLP, and the router.
  const PlanResult r = plan_of("--model gpt2-124m --app ep --gpus 8 --ep 4 --experts 8 --top-k 2 --micro-batch 2");
  const ArchSpec& a = r.config.memory.arch;
  const double G = 16, S = a.seq, L = a.layers, h = a.hidden, f = a.ffn, V = a.vocab, E = 8, k = 2;
  const double app = 6 * G * S * (L * (4 * h * h + k * 2 * h * f + h * E + 2 * S * h) + h * V);
  EXPECT_NEAR(r.model_flops_per_step / app, 1.0, 1e-12);
  // k = 1 of one expert is the dense model plus the router (6·G·S·L·h).
  ArchSpec dense = a;
  MoeOptions one;
  one.experts = 1;
  one.top_k = 1;
  EXPECT_NEAR(moe_model_flops_per_step(a, one, 16) / (model_flops_per_step(dense, 16) + 6 * G * S * L * h), 1.0, 1e-12);
  // Capacity factor 1 with k·N/E whole: E·C = k·N slots, so the GPUs execute the model FLOPs.
  EXPECT_DOUBLE_EQ(r.hardware_flops_per_step, r.model_flops_per_step);
  // Dropless: every expert computes N slots, (E − k)·N more than the routed ones, per micro-batch and block.
  const PlanResult dropless =
      plan_of("--model gpt2-124m --app ep --gpus 8 --ep 4 --experts 8 --top-k 2 --micro-batch 2 --capacity-factor 0");
  const double N = 2 * S, micro_batches = G / 2;
  EXPECT_DOUBLE_EQ(dropless.model_flops_per_step, r.model_flops_per_step);
  EXPECT_NEAR(dropless.hardware_flops_per_step - r.model_flops_per_step,
              3 * micro_batches * L * (E - k) * N * 4 * h * f, 1e-9 * r.model_flops_per_step);
  // Full recomputation: one more forward of the blocks (what they execute); selective: attention only.
  const std::vector<PlanResult> rec = plans_of(
      "--model gpt2-124m --app ep --gpus 8 --ep 4 --experts 8 --top-k 2 --micro-batch 2 --sweep recompute=selective,full");
  ASSERT_EQ(rec.size(), 2u);
  EXPECT_NEAR(rec[0].hardware_flops_per_step - r.model_flops_per_step, G * S * L * 4 * S * h, 1e3);
  const double block = G * S * L * (8 * h * h + 4 * S * h + 2 * h * E + k * 4 * h * f);
  EXPECT_NEAR(rec[1].hardware_flops_per_step - r.model_flops_per_step, block, 1e-9 * block);
  EXPECT_DOUBLE_EQ(rec[1].model_flops_per_step, r.model_flops_per_step);
}

// ---- context parallelism -----------------------------------------------------------------------------------

constexpr CpAlgo kCpAlgos[] = {CpAlgo::ring, CpAlgo::allgather, CpAlgo::alltoall};

TEST(ContextParallel, PlannerUsesTheCpAppsFormula) {
  // parabench-cp's /memory/predicted and --dry-run: memory_plan_for of the run, completed by
  // plan_cp_memory (bench/cp/main.cpp), through common/memory_model.h. The layout changes which
  // positions a rank holds, not how many: the same bytes.
  for (const char* model : {"tiny", "small"}) {
    for (int cp : {1, 2, 4}) {
      for (CpAlgo algo : kCpAlgos) {
        for (const char* layout : {"zigzag", "contiguous"}) {
          for (const char* recompute : {"none", "selective", "full"}) {
            for (const char* backend : {"cpu", "cuda"}) {
              Options o;
              ASSERT_TRUE(model_preset(model, &o.model));
              o.dtype = "fp32";
              o.micro_batch = 2;
              o.recompute = recompute;
              MemoryPlan app_plan = memory_plan_for(o, /*attention_keeps_probabilities=*/std::string(backend) == "cpu");
              plan_cp_memory(app_plan, algo, cp);
              const MemoryEstimate app = predict_memory(app_plan);
              std::ostringstream command;
              command << "--model " << model << " --app cp --gpus 8 --cp " << cp << " --cp-algo " << cp_algo_name(algo)
                      << " --cp-layout " << layout << " --backend " << backend << " --dtype fp32 --micro-batch 2"
                      << " --recompute " << recompute;
              const PlanResult r = plan_of(command.str());
              for (MemCategory c : all_mem_categories()) {
                EXPECT_EQ(r.per_rank[c], app[c]) << command.str() << ": " << mem_category_name(c);
              }
              EXPECT_EQ(r.per_rank.peak_total, app.peak_total) << command.str();
              EXPECT_EQ(r.config.cp, cp);
              EXPECT_EQ(r.config.dp, 8 / cp);
              EXPECT_EQ(r.config.memory.cp, cp);
              EXPECT_EQ(r.config.cp_algo, algo);
              EXPECT_EQ(r.config.cp_zigzag, std::string(layout) == "zigzag");
              // Every rank holds every parameter.
              EXPECT_EQ(r.parameters, total_parameters(r.config.memory.arch));
              EXPECT_EQ(r.rank_parameters, r.parameters);
            }
          }
        }
      }
    }
  }
}

TEST(ContextParallel, RanksAreCpTimesDp) {
  const PlanResult one_group = plan_of("--model small --app cp --cp 4");
  EXPECT_EQ(one_group.config.ranks, 4) << "without --gpus, one cp group";
  EXPECT_EQ(one_group.config.dp, 1);
  const PlanResult with_dp = plan_of("--model small --app cp --cp 4 --dp 3");
  EXPECT_EQ(with_dp.config.ranks, 12);
  const PlanResult nodes = plan_of("--model small --app cp --nodes 2 --gpus-per-node 8 --cp 4 --micro-batch 2");
  EXPECT_EQ(nodes.config.dp, 4);
  EXPECT_EQ(nodes.config.global_batch, 8) << "micro-batch × dp: the cp ranks share their samples";
  EXPECT_EQ(plan_of("--model small --app cp --gpus 8").config.cp, 1);
}

TEST(ContextParallel, ActivationsFallWithCpModelStatesDoNot) {
  const std::vector<PlanResult> r =
      plans_of("--model llama3-8b --app cp --gpus 64 --recompute full --sweep cp=1,2,4,8,16");
  ASSERT_EQ(r.size(), 5u);
  for (std::size_t i = 1; i < r.size(); ++i) {
    EXPECT_EQ(r[i].model_state_bytes, r[0].model_state_bytes) << "every rank holds every parameter";
    EXPECT_LT(bytes(r[i], MemCategory::activations), bytes(r[i - 1], MemCategory::activations)) << r[i].config.cp;
    EXPECT_GT(bytes(r[i], MemCategory::comm_buffers), 0) << r[i].config.cp;
  }
  EXPECT_EQ(bytes(r[0], MemCategory::comm_buffers), 0);
  // At cp 1 the app runs the backend's attention: the plan is the dense data-parallel plan.
  const PlanResult dense = plan_of("--model llama3-8b --app dp --gpus 64 --recompute full");
  EXPECT_EQ(r[0].per_rank.bytes, dense.per_rank.bytes);
  EXPECT_EQ(r[0].per_rank.peak_total, dense.per_rank.peak_total);
}

// The per-step exchanges of parabench-cp (bench/cp/context_attention.cpp), per micro-batch and block,
// with rows = b·S/cp, and the gradient all-reduce once per step over dp × cp.
TEST(ContextParallel, ExchangesAreTheAppsPerMicroBatchFormulas) {
  for (int cp : {2, 4}) {
    for (CpAlgo algo : kCpAlgos) {
      for (const char* recompute : {"none", "selective", "full"}) {
        for (const char* backend : {"cpu", "cuda"}) {
          std::ostringstream command;
          command << "--model small --app cp --gpus 8 --cp " << cp << " --cp-algo " << cp_algo_name(algo)
                  << " --backend " << backend << " --dtype fp32 --micro-batch 2 --global-batch " << 2 * (8 / cp) * 3
                  << " --recompute " << recompute;
          const PlanResult r = plan_of(command.str());
          const ArchSpec& a = r.config.memory.arch;
          const int64_t h = a.hidden, L = a.layers, m = r.config.grad_accum, rows = 2 * a.seq / cp;
          ASSERT_EQ(m, 3) << command.str();
          const bool full = std::string(recompute) == "full";
          const bool cpu_selective = std::string(recompute) == "selective" && std::string(backend) == "cpu";
          std::map<std::string, std::pair<int64_t, int64_t>> by_op;  // op: (calls, bytes) per step
          for (const CommEstimate& e : r.comm) {
            if (e.op == "all_reduce") continue;
            EXPECT_EQ(e.ranks, cp) << command.str();
            EXPECT_TRUE(e.blocking) << command.str();
            by_op[e.op].first += e.calls;
            by_op[e.op].second += e.calls * e.bytes;
          }
          std::map<std::string, std::pair<int64_t, int64_t>> expected;
          switch (algo) {
            case CpAlgo::ring: {
              const int64_t calls = (3 * cp - 2 + (full ? cp - 1 : 0)) * L * m;
              expected["send_recv"] = {calls, calls * 4 * rows * 2 * h};
              break;
            }
            case CpAlgo::allgather: {
              const int64_t gathers = (full ? 3 : 2) * L * m, buffer = 4 * 2 * a.seq * 2 * h;
              expected["all_gather"] = {gathers, gathers * buffer};
              expected["reduce_scatter"] = {L * m, L * m * buffer};
              break;
            }
            case CpAlgo::alltoall: {
              const int64_t per_layer = full || cpu_selective ? 3 : 2;  // forward's 1 + 1 of each, + recomputation
              expected["all_to_all"] = {2 * per_layer * L * m, per_layer * L * m * (4 * rows * 3 * h + 4 * rows * h)};
              break;
            }
          }
          EXPECT_EQ(by_op, expected) << command.str();
          // The gradients of every parameter, over all 8 ranks (dp × cp), once, overlapped.
          const CommEstimate& grads = r.comm.back();
          EXPECT_EQ(grads.op, "all_reduce");
          EXPECT_EQ(grads.bytes, 4 * r.parameters);
          EXPECT_EQ(grads.ranks, 8);
          EXPECT_EQ(grads.calls, 1);
          EXPECT_FALSE(grads.blocking);
        }
      }
    }
  }
  // cp 1: the backend's attention, only the all-reduce; one rank: nothing at all.
  const PlanResult one = plan_of("--model small --app cp --gpus 4 --cp 1");
  ASSERT_EQ(one.comm.size(), 1u);
  EXPECT_EQ(one.comm[0].ranks, 4);
  EXPECT_TRUE(plan_of("--model small --app cp --gpus 1").comm.empty());
  // bf16: activations move at 2 bytes, gradients at their --grad-dtype.
  const PlanResult bf16 = plan_of("--model small --app cp --gpus 4 --cp 2 --cp-algo allgather");
  const ArchSpec& a = bf16.config.memory.arch;
  EXPECT_EQ(bf16.comm[0].bytes, 2 * a.seq * 2 * a.hidden);
  EXPECT_EQ(bf16.comm.back().bytes, 4 * bf16.parameters);
  // Grouped-query attention: only the kv heads' K|V travel; Ulysses sends Q|K|V of the qkv width.
  const PlanResult gqa = plan_of("--model llama3-8b --app cp --gpus 8 --cp 8 --seq 8192");
  const ArchSpec& g = gqa.config.memory.arch;
  EXPECT_EQ(gqa.comm[0].bytes, 2 * (8192 / 8) * 2 * g.kv_heads * g.head_dim());
  const PlanResult ulysses = plan_of("--model llama3-8b --app cp --gpus 8 --cp 8 --cp-algo alltoall");
  EXPECT_EQ(ulysses.comm[0].bytes, 2 * (8192 / 8) * g.qkv_width());
  // A cp group wider than a node crosses the NIC.
  EXPECT_EQ(plan_of("--model llama3-8b --app cp --gpus 16 --cp 16").comm[0].link_gbps, 400.0);
  EXPECT_EQ(plan_of("--model llama3-8b --app cp --gpus 16 --cp 8").comm[0].link_gbps, 3600.0);
}

TEST(ContextParallel, RingHopsHideBesideTheBlockAttention) {
  // Each K|V hop runs beside one block's attention (forward 4·rows·(S/cp)·h FLOPs, backward twice that):
  // only what exceeds it blocks. dK|dV hops, allgather's and alltoall's collectives block whole.
  const std::string base = "--model llama3-8b --app cp --gpus 64 --cp 8 --peak-tflops 1000 --mfu 0.5 --link-gbps ";
  const PlanResult slow = plan_of(base + "1");
  const ArchSpec& a = slow.config.memory.arch;
  const double rows = a.seq / 8, block_forward_s = 4 * rows * (a.seq / 8) * a.hidden / (1000e12 * 0.5);
  ASSERT_EQ(slow.comm.size(), 4u);
  EXPECT_EQ(slow.comm[0].op, "send_recv");
  EXPECT_NEAR(slow.comm[0].hidden_s, slow.comm[0].calls * block_forward_s, 1e-9 * slow.comm[0].hidden_s);
  EXPECT_NEAR(slow.comm[1].hidden_s, slow.comm[1].calls * 2 * block_forward_s, 1e-9 * slow.comm[1].hidden_s);
  EXPECT_EQ(slow.comm[2].hidden_s, 0.0) << "dK|dV hops follow the block's backward";
  EXPECT_NEAR(slow.comm[0].seconds / slow.comm[0].calls, slow.comm[0].bytes * 8 / 1e9, 1e-12)
      << "a send_recv moves its message once over the link";
  const PlanResult fast = plan_of(base + "1e9");
  for (std::size_t i = 0; i < 2; ++i) EXPECT_DOUBLE_EQ(fast.comm[i].hidden_s, fast.comm[i].seconds) << i;
  for (const PlanResult* r : {&slow, &fast}) {
    double blocking = 0;
    for (std::size_t i = 0; i < 3; ++i) blocking += r->comm[i].seconds - r->comm[i].hidden_s;
    EXPECT_NEAR(r->blocking_comm_s, blocking, 1e-12 * blocking);
    EXPECT_DOUBLE_EQ(r->step_s, std::max(r->compute_s, r->comm[3].seconds) + r->blocking_comm_s);
  }
  const PlanResult serial = plan_of(base + "1 --no-overlap");
  EXPECT_DOUBLE_EQ(serial.step_s, serial.compute_s + serial.comm[3].seconds + serial.blocking_comm_s);
  const PlanResult gather = plan_of("--model llama3-8b --app cp --gpus 64 --cp 8 --cp-algo allgather");
  EXPECT_DOUBLE_EQ(gather.blocking_comm_s, gather.comm[0].seconds + gather.comm[1].seconds);
}

TEST(ContextParallel, FlopsAreTheDenseModelsRecomputationAsTheAppRunsIt) {
  for (int cp : {1, 2, 4}) {
    for (CpAlgo algo : kCpAlgos) {
      for (const char* recompute : {"none", "selective", "full"}) {
        for (const char* backend : {"cpu", "cuda"}) {
          std::ostringstream command;
          command << "--model gpt2-124m --app cp --gpus 8 --cp " << cp << " --cp-algo " << cp_algo_name(algo)
                  << " --backend " << backend << " --dtype fp32 --micro-batch 2 --recompute " << recompute;
          const PlanResult r = plan_of(command.str());
          const ArchSpec& a = r.config.memory.arch;
          EXPECT_DOUBLE_EQ(r.model_flops_per_step, model_flops_per_step(a, 2 * 8 / cp)) << command.str();
          // Selective recomputation reruns attention only where it kept its probabilities.
          const bool keeps = std::string(backend) == "cpu" && (cp == 1 || algo == CpAlgo::alltoall);
          const std::string mode = recompute;
          const double extra = mode == "full" || (mode == "selective" && keeps)
                                   ? recompute_flops_per_step(a, r.config.global_batch, mode) : 0.0;
          EXPECT_DOUBLE_EQ(r.hardware_flops_per_step, r.model_flops_per_step + extra) << command.str();
          EXPECT_NEAR(r.compute_s, r.hardware_flops_per_step / (8 * 67e12 * 0.4), 1e-12 * r.compute_s);
        }
      }
    }
  }
  // The same tokens per step on the same ranks: cp and dp give the same compute.
  const PlanResult dp = plan_of("--model gpt2-124m --app dp --gpus 8 --micro-batch 2 --global-batch 16");
  const PlanResult cp = plan_of("--model gpt2-124m --app cp --gpus 8 --cp 4 --micro-batch 2 --global-batch 16");
  EXPECT_DOUBLE_EQ(cp.model_flops_per_step, dp.model_flops_per_step);
  EXPECT_DOUBLE_EQ(cp.compute_s, dp.compute_s);
}

TEST(ContextParallel, ReportsNameTheLayout) {
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model small --app cp --gpus 8 --cp 4 --cp-algo alltoall "
                                       "--cp-layout contiguous"), &request).run);
  const PlanResult r = evaluate(request.plans.front());
  const std::string table = render_table(request, {r});
  EXPECT_NE(table.find("--app cp, cp 4 (alltoall, contiguous): 32 tokens of each sequence per rank"), std::string::npos)
      << table;
  EXPECT_NE(table.find("cp 4 × dp 2"), std::string::npos) << table;
  EXPECT_NE(table.find("all_to_all Q|K|V"), std::string::npos) << table;
  const std::string json = render_json(request, {r});
  EXPECT_NE(json.find("\"cp_algo\": \"alltoall\""), std::string::npos);
  EXPECT_NE(json.find("\"cp_layout\": \"contiguous\""), std::string::npos);
  const std::string csv = render_csv({r});
  EXPECT_NE(csv.find(",cp,cp_algo,cp_layout,"), std::string::npos);
  EXPECT_NE(csv.find(",4,alltoall,contiguous,"), std::string::npos);
}


// ---- pipeline parallelism ---------------------------------------------------------------------------------

TEST(PipelineParallel, PlannerUsesTheAppsFormulaPerStage) {
  // The planner's pp plan is parabench-pp's /memory/predicted: bench/pp's predict_pipeline_memory of the
  // run's memory_plan_for (bench/pp/main.cpp), stage by stage.
  struct Case {
    const char* model;
    PipelineOptions pp;
    int micro_batch, micro_batches;
    const char* recompute;
  };
  const Case cases[] = {{"small", {4, "gpipe", 1}, 1, 8, "none"},
                        {"small", {4, "1f1b", 1}, 2, 8, "full"},
                        {"small", {2, "interleaved", 2}, 1, 4, "selective"},
                        {"small", {4, "naive", 1}, 1, 3, "none"},
                        {"tiny", {2, "1f1b", 1}, 1, 1, "none"}};
  for (const Case& k : cases) {
    Options o;
    ASSERT_TRUE(model_preset(k.model, &o.model));
    o.model.ffn = 4 * o.model.hidden;
    o.dtype = "fp32";
    o.micro_batch = k.micro_batch;
    o.recompute = k.recompute;
    const MemoryPlan app_plan = memory_plan_for(o, /*attention_keeps_probabilities=*/true);
    const int dp = 2;
    const PlanResult r = plan_of(std::string("--model ") + k.model + " --app pp --backend cpu --dtype fp32 --gpus " +
                                 std::to_string(k.pp.stages * dp) + " --pp " + std::to_string(k.pp.stages) +
                                 " --schedule " + k.pp.schedule + " --virtual-stages " + std::to_string(k.pp.chunks) +
                                 (k.pp.schedule == "interleaved" ? "" : "") + " --micro-batch " +
                                 std::to_string(k.micro_batch) + " --global-batch " +
                                 std::to_string(k.micro_batch * dp * k.micro_batches) + " --recompute " + k.recompute);
    ASSERT_EQ(r.per_stage.size(), static_cast<std::size_t>(k.pp.stages)) << k.pp.schedule;
    EXPECT_EQ(r.config.dp, dp);
    int64_t largest = 0;
    for (int s = 0; s < k.pp.stages; ++s) {
      const MemoryEstimate app = predict_pipeline_memory(app_plan, k.pp, s, k.micro_batches);
      for (MemCategory c : all_mem_categories()) {
        EXPECT_EQ(r.per_stage[s][c], app[c]) << k.pp.schedule << " stage " << s << " " << mem_category_name(c);
      }
      EXPECT_EQ(r.per_stage[s].peak_total, app.peak_total) << k.pp.schedule << " stage " << s;
      largest = std::max(largest, app.peak_total);
    }
    EXPECT_EQ(r.per_rank.peak_total, largest);
    EXPECT_EQ(r.per_rank.peak_total, r.per_stage[r.peak_stage].peak_total);
  }
}

TEST(PipelineParallel, StepIsTheBusiestStageOverOneMinusTheBubble) {
  // 1F1B over 4 stages and 8 micro-batches: (p − 1)/(m + p − 1) = 3/11 of the pipeline's time idle, so
  // the pipeline takes (m + p − 1)/m of the busiest stage's compute (dp 1: no all-reduce).
  const PlanResult r = plan_of("--model small --app pp --gpus 4 --pp 4 --global-batch 8 --dtype fp32");
  EXPECT_DOUBLE_EQ(r.bubble_fraction, 3.0 / 11.0);
  EXPECT_DOUBLE_EQ(r.bubble_fraction, theoretical_bubble_fraction("1f1b", 4, 8, 1));
  EXPECT_NEAR(r.bubble_s, r.compute_s * 3.0 / 8.0, 1e-15);
  EXPECT_NEAR(r.step_s, r.compute_s + r.bubble_s + r.exposed_comm_s, 1e-15);
  EXPECT_GT(r.exposed_comm_s, 0.0);  // the fill's and drain's messages
  // The last stage holds a block and the head: it is the busiest (4 blocks, 4 stages).
  const ArchSpec& a = r.config.memory.arch;
  const double tokens = 8.0 * a.seq;
  const double head_stage = 3.0 * tokens * (model_flops_per_step(a, 1) / (3.0 * a.seq) -
                                            (a.layers - 1) * (model_flops_per_step(a, 1) / (3.0 * a.seq) -
                                                              2.0 * a.hidden * a.vocab) / a.layers);
  EXPECT_NEAR(r.compute_s, head_stage / (r.config.peak_tflops * 1e12 * r.config.mfu), 1e-12);
  // Interleaving with 2 virtual stages halves the bubble.
  const PlanResult v2 =
      plan_of("--model small --app pp --gpus 2 --pp 2 --schedule interleaved --virtual-stages 2 --global-batch 8");
  EXPECT_DOUBLE_EQ(v2.bubble_fraction, (1.0 / 9.0) / 2.0);
}

TEST(PipelineParallel, MessagesAreTheBoundaryActivationsPerMicroBatch) {
  // b·S·h activation elements per message; v·m of each direction per step; a dp all-reduce of the largest
  // stage's gradients. pp 4 × dp 2 on 8 GPUs per node: stage pairs rank r, r + 2 share a node.
  const PlanResult r = plan_of("--model small --app pp --gpus 8 --pp 4 --micro-batch 2 --global-batch 16 "
                               "--dtype bf16");
  const ArchSpec& a = r.config.memory.arch;
  ASSERT_EQ(r.comm.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(r.comm[i].op, "send_recv");
    EXPECT_EQ(r.comm[i].bytes, 2 * a.seq * a.hidden * 2);
    EXPECT_EQ(r.comm[i].calls, 4);
    EXPECT_TRUE(r.comm[i].inside_node);
    EXPECT_TRUE(r.comm[i].blocking);
    EXPECT_NEAR(r.comm[i].hidden_s, r.comm[i].seconds * 1.0 / 4.0, 1e-18);  // 3 of the 4 are on the fill or drain
  }
  EXPECT_EQ(r.comm[2].op, "all_reduce");
  EXPECT_EQ(r.comm[2].ranks, 2);
  const std::vector<int64_t> units = unit_parameter_counts(a);
  EXPECT_EQ(r.comm[2].bytes, 4 * (units[0] + units[1]));  // stage 0: the embedding and a block, fp32 gradients
  // Across nodes when a stage pair spans two: 2 GPUs per node, dp 2.
  const PlanResult spread = plan_of("--model small --app pp --gpus 8 --gpus-per-node 2 --pp 4 --global-batch 8");
  EXPECT_FALSE(spread.comm[0].inside_node);
}

// ---- calibration: a parabench-micro result in place of the peaks -------------------------------------------

MeasuredKernel gemm_row(int64_t N, int64_t C, int64_t OC, double flop_per_s) {
  MeasuredKernel k;
  k.name = "gemm/cpu/fp32/x/N" + std::to_string(N) + "_C" + std::to_string(C) + "_OC" + std::to_string(OC);
  k.backend = "cpu";
  k.dtype = "fp32";
  k.kernel = "matmul";
  k.N = N;
  k.C = C;
  k.OC = OC;
  k.flop = 2.0 * N * C * OC;
  k.time_s = k.flop / flop_per_s;
  k.peak_fraction = std::nan("");
  return k;
}

MeasuredKernel kernel_row(const std::string& kernel, double flop, double bytes, double rate) {
  MeasuredKernel k;
  k.name = "kernel/cpu/fp32/" + kernel + "/x";
  k.backend = "cpu";
  k.dtype = "fp32";
  k.kernel = kernel;
  k.flop = flop;
  k.bytes = bytes;
  k.time_s = (flop > 0 ? flop : bytes) / rate;
  k.peak_fraction = std::nan("");
  return k;
}

MeasuredCollective collective_table(const std::string& op, std::vector<int64_t> sizes, std::vector<double> busbw) {
  MeasuredCollective t;
  t.op = op;
  t.ranks = 2;
  t.bytes = std::move(sizes);
  t.busbw = std::move(busbw);
  for (std::size_t i = 0; i < t.bytes.size(); ++i) t.time_s.push_back(static_cast<double>(t.bytes[i]) / t.busbw[i]);
  return t;
}

TEST(Calibration, BusBandwidthIsInterpolatedLogLog) {
  const MeasuredCollective t = collective_table("all_reduce", {1024, 4096, 65536}, {1e8, 4e8, 1e9});
  EXPECT_DOUBLE_EQ(interpolate_busbw(t, 1024), 1e8);
  EXPECT_NEAR(interpolate_busbw(t, 2048), 2e8, 1e-3);               // halfway in log size: geometric mean
  EXPECT_NEAR(interpolate_busbw(t, 16384), std::sqrt(4e8 * 1e9), 1e-3);
  EXPECT_DOUBLE_EQ(interpolate_busbw(t, 1 << 30), 1e9);              // above: the largest size's
  EXPECT_DOUBLE_EQ(interpolate_busbw(t, 512), 0.5e8);                // below: the smallest size's time
}

TEST(Calibration, GemmTakesTheColdRowsWhereThereAreSome) {
  // A step meets its operands out of cache: the cold rows time it, the cached ones only without them
  // (a file of an older parabench-micro), and a cold row of another dtype changes nothing.
  Calibration cal;
  cal.path = "cal.h5";
  MeasuredKernel cold = gemm_row(512, 256, 1024, 5e10);
  cold.cold = true;
  MeasuredKernel other = gemm_row(512, 256, 768, 1e10);
  other.dtype = "bf16";
  other.cold = true;
  cal.gemm = {gemm_row(512, 256, 1024, 2e11), cold, gemm_row(512, 256, 768, 1e11), other};
  RateSource source;
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 512, 256, 1024, &source), 2.0 * 512 * 256 * 1024 / 5e10);
  EXPECT_TRUE(source.exact && source.cold);
  // the only cold fp32 row is the nearest for another shape too: cached rows are not mixed in
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 512, 256, 768, &source), 2.0 * 512 * 256 * 768 / 5e10);
  EXPECT_FALSE(source.exact);
  cal.gemm = {gemm_row(512, 256, 1024, 2e11), other};
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 512, 256, 1024, &source), 2.0 * 512 * 256 * 1024 / 2e11);
  EXPECT_FALSE(source.cold);
}

TEST(Calibration, GemmTakesTheSameShapeElseTheNearestInFlops) {
  Calibration cal;
  cal.path = "cal.h5";
  cal.gemm = {gemm_row(512, 256, 768, 1e11), gemm_row(512, 256, 1024, 2e11), gemm_row(2048, 2048, 2048, 4e11)};
  RateSource source;
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 512, 256, 1024, &source), 2.0 * 512 * 256 * 1024 / 2e11);
  EXPECT_TRUE(source.exact);
  // (512, 768, 256) has the FLOPs of the first row; a transposed shape, so not exact.
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 512, 768, 256, &source), 2.0 * 512 * 768 * 256 / 1e11);
  EXPECT_FALSE(source.exact);
  EXPECT_EQ(source.row, cal.gemm[0].name);
  EXPECT_DOUBLE_EQ(gemm_seconds(cal, "cpu", "fp32", 4096, 1024, 4096, &source), 2.0 * 4096 * 1024 * 4096 / 4e11);
  try {
    gemm_seconds(cal, "cuda", "bf16", 512, 256, 1024, &source);
    ADD_FAILURE() << "no cuda/bf16 row";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("has no matrix product (/micro/gemm) measured on cuda/bf16 (it measured "
                                         "cpu/fp32)"),
              std::string::npos)
        << e.what();
  }
}

// A calibration where every GEMM runs at 1e11 FLOP/s, the attention at 2e10, every memory-bound kernel at
// 5e9 bytes/s and every collective at 1e9 bytes/s of bus bandwidth.
std::shared_ptr<const Calibration> uniform_calibration() {
  auto cal = std::make_shared<Calibration>();
  cal->path = "uniform.h5";
  cal->gemm = {gemm_row(512, 256, 1024, 1e11)};
  cal->kernels = {kernel_row("attention_forward", 1e9, 0, 2e10), kernel_row("attention_backward", 2e9, 0, 2e10)};
  for (const char* k : {"layernorm_forward", "layernorm_backward", "residual_layernorm_forward", "gelu_forward",
                        "gelu_backward", "add",
                        "embedding_forward", "embedding_backward", "cross_entropy_forward_backward", "sum_squares",
                        "zero", "accumulate", "adamw"}) {
    cal->kernels.push_back(kernel_row(k, 0, 1e6, 5e9));
  }
  for (const char* op : {"all_reduce", "all_gather", "reduce_scatter", "send_recv_intra"}) {
    cal->collectives[op] = collective_table(op, {1024, int64_t{1} << 30}, {1e9, 1e9});
  }
  return cal;
}

PlanResult calibrated(const std::string& command_line) {
  PlanRequest request;
  const ParseOutcome outcome = parse_plan_request(words(command_line), &request);
  EXPECT_TRUE(outcome.run) << outcome.message;
  PlanConfig c = request.plans.front();
  c.calibration = uniform_calibration();
  return evaluate(c);
}

TEST(Calibration, ComputeIsTheSumOfTheRanksKernelsAtTheirRates) {
  // One rank of dp: its matrix products are the model's (3 × forward: forward, dinp, dweight), its
  // attention the S×S products (SPEC 6), the rest memory-bound; each at the calibration's rate.
  for (const char* recompute : {"none", "full"}) {
    const PlanResult r = calibrated(std::string("--model small --backend cpu --dtype fp32 --micro-batch 4 "
                                                "--global-batch 8 --recompute ") + recompute);
    const ArchSpec& a = r.config.memory.arch;
    const double G = 8, tokens = G * a.seq, attention = 3.0 * tokens * a.layers * 4.0 * a.seq * a.hidden;
    const double model = model_flops_per_step(a, 8);
    double matmul_flops = 0, attention_flops = 0, memory_bytes = 0, sum = 0;
    for (const KernelTime& k : r.kernels) {
      sum += k.seconds;
      if (k.call.kernel == "matmul") matmul_flops += k.call.work * k.call.calls;
      else if (k.call.kernel.rfind("attention", 0) == 0) attention_flops += k.call.work * k.call.calls;
      else memory_bytes += k.call.work * k.call.calls;
    }
    const bool full = std::string(recompute) == "full";
    const double again = full ? tokens * a.layers * (2.0 * a.hidden * (a.qkv_width() + a.hidden + 2 * a.ffn)) : 0.0;
    EXPECT_NEAR(matmul_flops / (model - attention + again), 1.0, 1e-12) << recompute;
    EXPECT_NEAR(attention_flops / (attention * (full ? 4.0 / 3.0 : 1.0)), 1.0, 1e-12) << recompute;
    EXPECT_NEAR(r.compute_s, matmul_flops / 1e11 + attention_flops / 2e10 + memory_bytes / 5e9, 1e-12) << recompute;
    EXPECT_NEAR(r.compute_s, sum, 1e-12);
    EXPECT_TRUE(r.warnings.empty());
  }
}

TEST(Calibration, CollectivesAtTheMeasuredBusBandwidthAndTheBreakdownAddsUp) {
  // dp 2: one all-reduce of every fp32 gradient, at 1e9 bytes/s of bus bandwidth: 2(n−1)/n · 4P / 1e9.
  const PlanResult dp = calibrated("--model small --gpus 2 --backend cpu --dtype fp32 --micro-batch 4");
  ASSERT_EQ(dp.comm.size(), 1u);
  EXPECT_TRUE(dp.comm[0].measured);
  EXPECT_NEAR(dp.comm[0].seconds, 4.0 * dp.parameters / 1e9, 1e-12);
  // One bucket (the small model's 20 MiB of gradients under --bucket-mb 25): ready when backward ends,
  // so nothing hides it.
  EXPECT_DOUBLE_EQ(dp.comm[0].exposed_s, dp.comm[0].seconds);
  EXPECT_DOUBLE_EQ(dp.step_s, dp.compute_s + dp.comm[0].seconds);
  // 1 MiB buckets: one per unit (each holds more), the embedding's last; the others hide behind compute.
  const PlanResult buckets = calibrated("--model small --gpus 2 --backend cpu --dtype fp32 --micro-batch 4 "
                                        "--bucket-mb 1");
  const std::vector<int64_t> units = unit_parameter_counts(buckets.config.memory.arch);
  EXPECT_NEAR(buckets.comm[0].seconds, 4.0 * buckets.parameters / 1e9, 1e-12);
  EXPECT_NEAR(buckets.comm[0].exposed_s, 4.0 * units[0] / 1e9, 1e-12);
  EXPECT_DOUBLE_EQ(buckets.step_s, std::max(buckets.compute_s, buckets.comm[0].seconds - buckets.comm[0].exposed_s) +
                                       buckets.comm[0].exposed_s);
  // fsdp FULL_SHARD as the app runs it: the reduce-scatters wait; the gathers are prefetched but the first
  // unit's (the embedding's) of each micro-batch.
  const PlanResult fsdp = calibrated("--model small --app fsdp --gpus 2 --backend cpu --dtype fp32 --micro-batch 4");
  const std::vector<int64_t> fsdp_units = unit_parameter_counts(fsdp.config.memory.arch);
  for (const CommEstimate& e : fsdp.comm) {
    EXPECT_EQ(e.blocking, e.op == "reduce_scatter") << e.what;
    const double first = e.what == "parameters (forward)" ? 4.0 * fsdp_units[0] * 0.5 / 1e9 : 0.0;
    EXPECT_NEAR(e.exposed_s, first, 1e-12) << e.what;
  }
  // FULL_SHARD's gathers go into a unit buffer of their own: the calibration's out-of-place rows time them
  // where it has some, and the zeroing and accumulation of the sharded gradients are kernels of the step.
  {
    PlanRequest request;
    ASSERT_TRUE(parse_plan_request(words("--model small --app fsdp --gpus 2 --backend cpu --dtype fp32 "
                                         "--micro-batch 4"), &request).run);
    PlanConfig c = request.plans.front();
    auto cal = std::make_shared<Calibration>(*uniform_calibration());
    cal->out_of_place["all_gather"] = collective_table("all_gather", {1024, int64_t{1} << 30}, {5e8, 5e8});
    c.calibration = cal;
    const PlanResult separate = evaluate(c);
    ASSERT_EQ(separate.comm.size(), fsdp.comm.size());
    for (std::size_t i = 0; i < fsdp.comm.size(); ++i) {
      const CommEstimate& e = separate.comm[i];
      EXPECT_EQ(e.in_place, e.op != "all_gather") << e.what;
      EXPECT_NEAR(e.seconds, fsdp.comm[i].seconds * (e.in_place ? 1.0 : 2.0), 1e-15) << e.what;
      EXPECT_FALSE(e.blocking && e.op == "all_gather") << e.what;
    }
    // Through MPI (no progress while the rank computes) the prefetched gathers wait as the rest do.
    cal->comm = "mpi";
    const PlanResult mpi = evaluate(c);
    double all = 0;
    for (const CommEstimate& e : mpi.comm) {
      EXPECT_TRUE(e.blocking) << e.what;
      EXPECT_EQ(e.exposed_s, 0.0) << e.what;
      all += e.seconds;
    }
    EXPECT_NEAR(mpi.step_s, mpi.compute_s + all, 1e-15);
    double zeroed = 0, accumulated = 0;
    for (const KernelTime& k : mpi.kernels) {
      if (k.call.what.find("unit gradients zeroed") == 0) zeroed += k.call.work * k.call.calls;
      if (k.call.kernel == "accumulate") accumulated += k.call.work * k.call.calls;
    }
    double whole = 0;
    for (int64_t u : unit_parameter_counts(mpi.config.memory.arch)) whole += 2.0 * shard_elements(u, 2);
    EXPECT_DOUBLE_EQ(zeroed, 4.0 * whole);             // every unit's whole fp32 gradient, once per micro-batch
    EXPECT_DOUBLE_EQ(accumulated, 3.0 * 4.0 * whole / 2);  // y += x over the rank's shard
  }
  // NO_SHARD keeps whole gradients: no unit gradient to zero, nothing accumulated.
  for (const KernelTime& k : calibrated("--model small --app fsdp --shard NO_SHARD --gpus 2 --backend cpu --dtype fp32 "
                                        "--micro-batch 4").kernels) {
    EXPECT_NE(k.call.kernel, "accumulate");
    EXPECT_NE(k.call.what.find("unit gradients zeroed"), 0u);
  }
  // pp 2: the busiest stage's kernels, the bubble, the fill's and drain's messages.
  const PlanResult pp =
      calibrated("--model small --app pp --gpus 2 --pp 2 --backend cpu --dtype fp32 --micro-batch 4 --global-batch 16");
  EXPECT_DOUBLE_EQ(pp.bubble_fraction, 1.0 / 5.0);
  EXPECT_NEAR(pp.bubble_s, pp.compute_s / 4.0, 1e-15);
  EXPECT_NEAR(pp.step_s, pp.compute_s + pp.bubble_s + pp.exposed_comm_s, 1e-15);
  const double message = 4.0 * 128 * 256 * 4 / 1e9;  // b·S·h fp32 at 1e9 bytes/s
  EXPECT_NEAR(pp.exposed_comm_s, 2 * message, 1e-15);  // one forward and one backward on the path
  // Missing collectives and unmodelled apps are configuration errors that say what is missing.
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model small --app tp --gpus 2 --tp 2 --backend cpu --dtype fp32 "
                                       "--sequence-parallel"), &request).run);
  PlanConfig c = request.plans.front();
  auto cal = std::make_shared<Calibration>(*uniform_calibration());
  cal->collectives.erase("all_gather");
  c.calibration = cal;
  try {
    evaluate(c);
    ADD_FAILURE() << "no all_gather measured";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("has no /micro/collectives/all_gather"), std::string::npos) << e.what();
  }
  ASSERT_TRUE(parse_plan_request(words("--model small --app cp --gpus 2 --cp 2 --backend cpu"), &request).run);
  c = request.plans.front();
  c.calibration = uniform_calibration();
  EXPECT_THROW(evaluate(c), ConfigError);
}

TEST(Calibration, AMissingMemoryBoundKernelTakesTheMedianRateWithAWarning) {
  auto cal = std::make_shared<Calibration>(*uniform_calibration());
  cal->kernels.erase(std::remove_if(cal->kernels.begin(), cal->kernels.end(),
                                    [](const MeasuredKernel& k) { return k.kernel == "add"; }),
                     cal->kernels.end());
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model small --backend cpu --dtype fp32"), &request).run);
  PlanConfig c = request.plans.front();
  c.calibration = cal;
  const PlanResult r = evaluate(c);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("has no add on cpu/fp32"), std::string::npos) << r.warnings[0];
  bool found = false;
  for (const KernelTime& k : r.kernels) {
    if (k.call.kernel != "add") continue;
    found = true;
    EXPECT_TRUE(k.source.fallback);
    EXPECT_NEAR(k.seconds, k.call.work * k.call.calls / 5e9, 1e-15);
  }
  EXPECT_TRUE(found);
  // The attention may not be assumed.
  cal->kernels.erase(std::remove_if(cal->kernels.begin(), cal->kernels.end(),
                                    [](const MeasuredKernel& k) { return k.kernel == "attention_backward"; }),
                     cal->kernels.end());
  EXPECT_THROW(evaluate(c), ConfigError);
}

// ---- fit ---------------------------------------------------------------------------------------------------

TEST(Fit, APlanThatDoesNotFitSaysByHowMuch) {
  const PlanResult r = plan_of("--model llama3-70b --app fsdp --shard NO_SHARD --gpus 8 --gpu-memory 80");
  ASSERT_TRUE(r.fit_checked);
  EXPECT_FALSE(r.fits);
  EXPECT_EQ(r.capacity_bytes, int64_t{80} << 30);
  EXPECT_EQ(r.excess_bytes, r.per_rank.peak_total - (int64_t{80} << 30));
  const std::string message = fit_message(r);
  EXPECT_NE(message.find("does not fit: needs "), std::string::npos) << message;
  EXPECT_NE(message.find(" GiB per rank, "), std::string::npos) << message;
  EXPECT_NE(message.find("%) more than --gpu-memory 80"), std::string::npos) << message;

  const PlanResult small = plan_of("--model gpt2-124m --app dp --gpus 8 --tp 1 --pp 1 --gpu-memory 80");
  EXPECT_TRUE(small.fits);
  EXPECT_EQ(fit_message(small), "");
  EXPECT_FALSE(plan_of("--model gpt2-124m").fit_checked) << "no --gpu-memory, no verdict";
}

// ---- validation --------------------------------------------------------------------------------------------

TEST(Validation, BadPlansNameTheOptionAndTheRule) {
  const std::pair<const char*, const char*> cases[] = {
      {"--gpus 12 --dp 8", "--gpus 12 is not divisible by --dp 8"},
      {"--gpus 16 --dp 8", "--dp 8 leaves a factor 2"},
      {"--nodes 2 --gpus-per-node 8 --gpus 12", "--gpus 12 does not match --nodes 2 × --gpus-per-node 8 = 16"},
      {"--app fsdp --gpus 12 --shard HYBRID_SHARD --shard-group 5", "--shard-group 5 does not divide dp 12"},
      {"--app fsdp --gpus 8 --shard HYBRID_SHARD", "--shard HYBRID_SHARD needs --shard-group"},
      {"--app fsdp --gpus 8 --shard FULL_SHARD --shard-group 4", "--shard-group is for --shard HYBRID_SHARD only"},
      {"--app fsdp --shard ZERO3", "--shard ZERO3 must be NO_SHARD, ZERO1"},
      {"--app dp --shard FULL_SHARD", "--shard is an option of --app fsdp, not of --app dp"},
      {"--app fsdp --no-overlap", "--no-overlap is an option of --app dp"},
      {"--model tiny --hidden 66", "--hidden 66 is not divisible by --heads 4"},
      {"--model llama3-8b --kv-heads 5", "--heads 32 is not divisible by --kv-heads 5"},
      {"--model gpt6", "--model gpt6 is not a preset"},
      {"--gpus 4 --micro-batch 2 --global-batch 12", "--global-batch 12 is not a multiple of --micro-batch 2 × dp 4 = 8"},
      {"--dtype fp16", "--dtype fp16 must be fp32 or bf16"},
      {"--dtype fp32 --grad-dtype bf16", "--grad-dtype bf16 needs --dtype bf16"},
      {"--recompute some", "--recompute some must be none, selective or full"},
      {"--app hybrid --moe", "--app hybrid --moe: not modelled yet"},
      {"--pp 2", "--pp 2 is a degree of --app pp; --app dp has no pipeline parallelism (use --app pp)"},
      {"--pp 0", "--pp 0 must be at least 1"},
      {"--app zero", "--app zero must be dp, fsdp, tp, pp, ep, cp or hybrid"},
      // pipeline parallelism: what parabench-pp rejects (bench/pp's validate_pipeline_options), and options of other apps
      {"--app pp --pp 8", "--layers 4 is fewer than --pp 8 × --virtual-stages 1"},
      {"--app pp --pp 2 --schedule zigzag", "--schedule zigzag must be naive, gpipe, 1f1b or interleaved"},
      {"--app pp --pp 2 --schedule interleaved", "--schedule interleaved needs --virtual-stages 2 or more"},
      {"--app pp --pp 2 --virtual-stages 2", "--virtual-stages 2 applies to --schedule interleaved only"},
      {"--app pp --pp 2 --schedule interleaved --virtual-stages 2 --global-batch 3",
       "--schedule interleaved needs micro-batches per step (grad accumulation 3) divisible by --pp 2"},
      {"--app pp --pp 2 --global-batch 20000", "--global-batch 20000: too many micro-batches per step (20000)"},
      {"--app pp --gpus 6 --pp 4", "--gpus 6 is not divisible by --pp 4 (dp = ranks / pp)"},
      {"--app pp --gpus 8 --pp 2 --dp 2", "--dp 2 does not match --gpus 8 / --pp 2 = 4"},
      {"--app pp --pp 2 --tp 2", "--tp 2 is a degree of --app tp; --app pp has no tensor parallelism"},
      {"--app pp --shard FULL_SHARD", "--shard is an option of --app fsdp, not of --app pp"},
      {"--app pp --params 1e9", "--params has no layers to cut into stages: --app pp needs --model"},
      {"--schedule gpipe", "--schedule is an option of --app pp, not of --app dp"},
      {"--app tp --tp 2 --virtual-stages 2", "--virtual-stages is an option of --app pp, not of --app tp"},
      // expert parallelism: what parabench-ep rejects, and options of other apps
      {"--app ep --gpus 4 --experts 6 --ep 4", "--experts 6 is not divisible by --ep 4"},
      {"--app ep --gpus 6 --ep 4", "--ep 4 does not divide the data-parallel degree 6"},
      {"--app ep --nodes 1 --gpus-per-node 6 --dp 6 --ep 4", "--ep 4 does not divide the data-parallel degree 6"},
      {"--app ep --top-k 0", "--top-k 0 must be between 1 and --experts 8"},
      {"--app ep --experts 4 --top-k 5", "--top-k 5 must be between 1 and --experts 4"},
      {"--app ep --experts 0", "--experts 0 must be at least 1"},
      {"--app ep --ep 0", "--ep 0 must be at least 1"},
      {"--app ep --capacity-factor=-1", "--capacity-factor -1 must be 0 (no limit) or positive"},
      {"--app ep --aux-loss=-0.5", "--aux-loss -0.5 must be 0 (none) or positive"},
      {"--app ep --gpus 4 --tp 2", "--tp 2 is a degree of --app tp; --app ep has no tensor parallelism"},
      {"--app ep --gpus 4 --pp 2", "--pp 2 is a degree of --app pp; --app ep has no pipeline parallelism"},
      {"--app ep --shard FULL_SHARD", "--shard is an option of --app fsdp, not of --app ep"},
      {"--app ep --sequence-parallel", "--sequence-parallel is an option of --app tp, not of --app ep"},
      {"--app ep --bucket-mb 10", "--bucket-mb is an option of --app dp, not of --app ep"},
      {"--app ep --params 1e9", "--params has no MLP to split into experts: --app ep needs --model"},
      {"--gpus 4 --ep 2", "--ep 2 is a degree of --app ep; --app dp has no expert parallelism"},
      {"--app tp --tp 2 --ep 2", "--ep 2 is a degree of --app ep; --app tp has no expert parallelism"},
      {"--experts 4", "--experts is an option of --app ep, not of --app dp"},
      {"--app fsdp --top-k 1", "--top-k is an option of --app ep, not of --app fsdp"},
      {"--app tp --capacity-factor 2", "--capacity-factor is an option of --app ep, not of --app tp"},
      {"--aux-loss 0.01", "--aux-loss is an option of --app ep, not of --app dp"},
      {"--app ep --gpus 8 --sweep ep=2,3", "--sweep ep=3: --experts 8 is not divisible by --ep 3"},
      {"--app ep --cp 2", "--cp 2 is a degree of --app cp; --app ep has no context parallelism (use --app cp)"},
      // context parallelism: what parabench-cp rejects, and options of other apps
      {"--model tiny --app cp --cp 3", "--seq 32 is not divisible by 6 (--cp-layout zigzag splits each sequence into "
                                       "2 × --cp chunks)"},
      {"--model tiny --app cp --cp 3 --cp-layout contiguous",
       "--seq 32 is not divisible by 3 (--cp-layout contiguous splits each sequence into --cp chunks)"},
      {"--model tiny --seq 33 --app cp", "--seq 33 is not divisible by 2 (--cp-layout zigzag"},
      {"--model tiny --app cp --gpus 8 --cp 8 --cp-algo alltoall",
       "--heads 4 is not divisible by --cp 8 (--cp-algo alltoall gives each rank heads/cp heads)"},
      {"--app cp --cp-algo tree", "--cp-algo tree must be ring, allgather or alltoall"},
      {"--app cp --cp-layout striped", "--cp-layout striped must be zigzag or contiguous"},
      {"--app cp --cp 0", "--cp 0 must be at least 1"},
      {"--app cp --gpus 6 --cp 4", "--gpus 6 is not divisible by --cp 4 (dp = ranks / cp)"},
      {"--app cp --gpus 8 --cp 2 --dp 2", "--dp 2 does not match --gpus 8 / --cp 2 = 4"},
      {"--app cp --cp 2 --tp 2", "--tp 2 is a degree of --app tp; --app cp has no tensor parallelism"},
      {"--app cp --cp 2 --pp 2", "--pp 2 is a degree of --app pp; --app cp has no pipeline parallelism"},
      {"--app cp --cp 2 --ep 2", "--ep 2 is a degree of --app ep; --app cp has no expert parallelism"},
      {"--app cp --shard FULL_SHARD", "--shard is an option of --app fsdp, not of --app cp"},
      {"--app cp --experts 4", "--experts is an option of --app ep, not of --app cp"},
      {"--app cp --sequence-parallel", "--sequence-parallel is an option of --app tp, not of --app cp"},
      {"--app cp --bucket-mb 10", "--bucket-mb is an option of --app dp, not of --app cp"},
      {"--app cp --params 1e9", "--params has no sequence to split: --app cp needs --model"},
      {"--gpus 4 --cp 2", "--cp 2 is a degree of --app cp; --app dp has no context parallelism (use --app cp)"},
      {"--app tp --tp 2 --cp 2", "--cp 2 is a degree of --app cp; --app tp has no context parallelism"},
      {"--app fsdp --cp-algo ring", "--cp-algo is an option of --app cp, not of --app fsdp"},
      {"--cp-layout contiguous", "--cp-layout is an option of --app cp, not of --app dp"},
      {"--model tiny --app cp --gpus 8 --sweep cp=2,8 --cp-algo alltoall", "--sweep cp=8: --heads 4 is not divisible"},
      // tensor parallelism: what parabench-tp rejects, and GQA's key/value heads
      {"--tp 8", "--tp 8 is a degree of --app tp; --app dp has no tensor parallelism"},
      {"--app fsdp --gpus 16 --tp 2", "--tp 2 with --app fsdp: fsdp with tp > 1 is --app hybrid"},
      {"--app tp --tp 0", "--tp 0 must be at least 1"},
      {"--model llama3-70b --app tp --gpus 12 --tp 8", "--gpus 12 is not divisible by --tp 8"},
      {"--model llama3-70b --app tp --nodes 3 --gpus-per-node 2 --tp 4",
       "--nodes × --gpus-per-node 6 is not divisible by --tp 4"},
      {"--model llama3-70b --app tp --gpus 16 --tp 4 --dp 2", "--dp 2 does not match --gpus 16 / --tp 4 = 4"},
      {"--model llama3-70b --app tp --gpus 48 --tp 3", "--heads 64 is not divisible by --tp 3"},
      {"--model llama3-8b --app tp --gpus 16 --tp 16", "--kv-heads 8 is not divisible by --tp 16"},
      {"--model tiny --ffn 250 --app tp --tp 4", "--ffn 250 is not divisible by --tp 4"},
      {"--model gpt3-175b --make-vocab-size-divisible-by 0", "--make-vocab-size-divisible-by 0 must be at least 1"},
      {"--model tiny --seq 31 --app tp --tp 2 --sequence-parallel",
       "--micro-batch × --seq 31 is not divisible by --tp 2 (sequence parallelism splits the micro-batch's tokens)"},
      {"--sequence-parallel", "--sequence-parallel is an option of --app tp, not of --app dp"},
      {"--app fsdp --sequence-parallel", "--sequence-parallel is an option of --app tp, not of --app fsdp"},
      {"--app tp --tp 2 --params 1e9", "--params has no model shape to slice: --app tp needs --model"},
      {"--app tp --bucket-mb 10", "--bucket-mb is an option of --app dp, not of --app tp"},
      {"--model llama3-70b --app tp --gpus 64 --sweep tp=8,16",
       "--sweep tp=16: --kv-heads 8 is not divisible by --tp 16"},
      {"--params 7.5e9 --model small", "--params replaces the model"},
      {"--params 0.5", "--params 0.5 must be a whole number"},
      {"--gpu-memory=-3", "--gpu-memory -3 must be a finite positive number"},
      {"--mfu 1.5", "--mfu 1.5 must be in (0, 1]"},
      {"--gpu v100", "--gpu v100 must be one of h100, h200, a100"},
      {"--sweep micro-batch", "--sweep micro-batch must be KEY=V1,V2"},
      {"--sweep colour=1,2", "colour is not an option a sweep can vary"},
      {"--sweep micro-batch=1,,2", "has an empty value"},
      {"--sweep micro-batch=1 --sweep micro_batch=2", "--sweep micro-batch is given twice"},
      {"--sweep micro-batch=1,two", "--sweep micro-batch=two: Could not convert: --micro-batch"},
      {"--gpus 8 --sweep dp=4,8", "--sweep dp=4: --dp 4 leaves a factor 2"},
      {"--format xml", "--format xml must be table, csv or json"},
      {"--layers", "--layers"},
  };
  for (const auto& [command_line, expected] : cases) {
    const std::string message = rejection_of(command_line);
    EXPECT_NE(message.find(expected), std::string::npos) << command_line << "\n  said: " << message;
  }
}

// Every app is planned from its own definition (bench/<app>/*_app.cpp): its rules, word for word, are the
// planner's, including those the planner had no branch for.
TEST(Validation, TheAppsOwnRulesAreThePlannersRules) {
  const std::pair<const char*, const char*> cases[] = {
      {"--app dp --bucket-mb 2000000", "--bucket-mb 2000000.000000 must be positive and at most 1048576 (MiB)"},
      {"--app fsdp --shard NO_SHARD --no-prefetch", "--no-prefetch applies to FULL_SHARD and HYBRID_SHARD only, not --shard NO_SHARD"},
      {"--app fsdp --gpus 8 --shard HYBRID_SHARD --shard-group 0", "--shard-group 0 must be at least 1"},
      {"--app ep --gpus 4 --experts 8 --micro-batch 64 --seq 4096 --hidden 8192 --heads 64",
       "× capacity × --hidden/--ffn is too large for one all-to-all"},
      {"--app cp --gpus 2 --cp 2 --micro-batch 64 --seq 8192 --hidden 2048 --heads 16",
       "--micro-batch × --seq × 3 × --hidden is too large for one exchange of keys and values"},
      {"--app ep --gpus 4 --tp 2", "--tp 2 is a degree of --app tp; --app ep has no tensor parallelism (use --app tp)"},
  };
  for (const auto& [command_line, expected] : cases) {
    const std::string message = rejection_of(command_line);
    EXPECT_NE(message.find(expected), std::string::npos) << command_line << "\n  said: " << message;
  }
}

// Each --app the planner models carries its app's definition, whose memory the plan reports.
TEST(Registry, EveryModelledAppIsPlannedFromItsDefinition) {
  for (const char* app : {"dp", "fsdp", "tp", "pp", "ep", "cp"}) {
    const PlanResult r = plan_of(std::string("--model small --gpus 4 --app ") + app);
    ASSERT_NE(r.config.definition, nullptr) << app;
    EXPECT_EQ(r.config.definition->name, app);
  }
}

// ---- sweeps ------------------------------------------------------------------------------------------------

TEST(Sweep, CartesianProductFirstSweepSlowest) {
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--app fsdp --gpus 8 --micro-batch 3 --sweep shard=NO_SHARD,FULL_SHARD "
                                       "--sweep micro-batch=1,2,4"),
                                 &request)
                  .run);
  ASSERT_EQ(request.plans.size(), 6u);
  const char* shards[] = {"NO_SHARD", "NO_SHARD", "NO_SHARD", "FULL_SHARD", "FULL_SHARD", "FULL_SHARD"};
  const int micro[] = {1, 2, 4, 1, 2, 4};
  for (std::size_t i = 0; i < 6; ++i) {
    EXPECT_STREQ(shard_strategy_name(request.plans[i].memory.shard), shards[i]);
    EXPECT_EQ(request.plans[i].memory.micro_batch, micro[i]) << "the sweep replaces --micro-batch 3";
    ASSERT_EQ(request.plans[i].swept.size(), 2u);
    EXPECT_EQ(request.plans[i].swept[1].second, std::to_string(micro[i]));
  }
}

TEST(Sweep, TpSweepGivesOneRowPerDegree) {
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model llama3-70b --app tp --gpus 64 --sequence-parallel --sweep tp=1,2,4,8"),
                                 &request)
                  .run);
  ASSERT_EQ(request.plans.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) {
    const int t = 1 << i;
    EXPECT_EQ(request.plans[i].tp(), t);
    EXPECT_EQ(request.plans[i].dp, 64 / t);
    EXPECT_EQ(request.plans[i].sequence_parallel(), t > 1);
  }
}

TEST(Sweep, ASweptPlanIsThePlanWrittenOut) {
  const std::vector<PlanResult> swept =
      plans_of("--model llama3-8b --app fsdp --gpus 64 --sweep seq=2048,8192 --sweep tied-embeddings=false,true");
  ASSERT_EQ(swept.size(), 4u);
  const PlanResult by_hand = plan_of("--model llama3-8b --app fsdp --gpus 64 --seq 8192 --tied-embeddings");
  EXPECT_EQ(swept[3].per_rank.bytes, by_hand.per_rank.bytes);
  EXPECT_EQ(swept[3].per_rank.peak_total, by_hand.per_rank.peak_total);
  EXPECT_EQ(swept[2].parameters, swept[0].parameters) << "rotary positions: no parameter depends on seq";
  EXPECT_EQ(swept[2].parameters - swept[3].parameters, 4096 * 128256) << "tying drops the head";
}

// ---- speed -------------------------------------------------------------------------------------------------

TEST(Speed, A405BillionParameterTpPlanOver16384GpusTakesUnderASecond) {
  const auto start = std::chrono::steady_clock::now();
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model llama3-405b --app tp --gpus 16384 --tp 8 --sequence-parallel "
                                       "--recompute full --gpu-memory 80 --format json"),
                                 &request)
                  .run);
  const PlanResult r = evaluate(request.plans.front());
  const std::string text = render_json(request, {r});
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
  EXPECT_EQ(r.config.dp, 2048);
  EXPECT_NEAR(static_cast<double>(r.rank_parameters) * 8 / static_cast<double>(r.parameters), 1.0, 1e-3);
  EXPECT_NE(text.find("\"tp\": 8"), std::string::npos);
}

TEST(Speed, A405BillionParameterPlanOver16384GpusTakesUnderASecond) {
  const auto start = std::chrono::steady_clock::now();
  PlanRequest request;
  ASSERT_TRUE(parse_plan_request(words("--model llama3-405b --app fsdp --gpus 16384 --shard FULL_SHARD "
                                       "--gpu-memory 80 --format json"),
                                 &request)
                  .run);
  const PlanResult r = evaluate(request.plans.front());
  const std::string text = render_json(request, {r});
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
  EXPECT_GT(r.parameters, 400'000'000'000);
  EXPECT_EQ(r.config.ranks, 16384);
  EXPECT_EQ(r.cluster_peak_total, r.per_rank.peak_total * 16384);
  EXPECT_FALSE(text.empty());
}

}  // namespace
}  // namespace pb::plan
