// parabench-hybrid as one AppDefinition: what the harness runs (bench/hybrid/main.cpp) and what
// parabench-plan plans with --app hybrid (bench/plan/app_registry.cpp). Every option and rule is the
// strategy's own (bench/tp, pp, cp, ep, fsdp); this file adds the rules of their combination.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <memory>
#include <string>

#include "bench/hybrid/hybrid.h"
#include "common/errors.h"

namespace pb {
namespace {

std::string degree(const char* option, int value) { return std::string(option) + " " + std::to_string(value); }

// The combinations this app cannot run, named by their options (exit 2).
void validate_combination(const HybridOptions& h, const Options& o) {
  const bool sharded = h.shard.fsdp.shard != ShardStrategy::no_shard;
  const std::string shard = std::string("--shard ") + shard_strategy_name(h.shard.fsdp.shard);
  if (!h.moe && h.ep.ep != 1) throw ConfigError(degree("--ep", h.ep.ep) + " needs --moe (experts to share out)");
  if (h.moe) {
    // The MoE part routes a rank's whole tokens of a micro-batch (its capacity is of b·S tokens): it
    // composes with tensor parallelism (every tp rank routes the same tokens), pipelines and data
    // parallelism, not with context parallelism's S/cp tokens per rank.
    if (h.cp.cp > 1) throw ConfigError("--moe with " + degree("--cp", h.cp.cp) + " is not supported: use --cp 1");
    if (h.tp.sequence_parallel && h.tp.tp > 1) {
      throw ConfigError("--moe with --sequence-parallel is not supported (the experts route every token of a tp group)");
    }
    if (sharded) throw ConfigError("--moe with " + shard + " is not supported: use --shard NO_SHARD");
  }
  if (h.pp.stages > 1 && o.comm == "nccl") {
    throw ConfigError(degree("--pp", h.pp.stages) + " needs --comm mpi: the pipeline's messages are matched by tag, "
                      "which NCCL does not do");
  }
  if (h.pp.stages > 1 && !o.dump_gradients.empty()) throw ConfigError("--dump-gradients needs --pp 1");
}

}  // namespace

MemoryEstimate predict_hybrid_memory(const HybridOptions& h, const Options& o, const MemoryPlan& base, int rank) {
  MemoryPlan plan = base;
  plan_tp_slices(plan, h.tp.tp, h.tp.sequence_parallel);
  plan_cp_memory(plan, h.cp.algo, h.cp.cp);  // for this rank's heads: after the tp slices
  if (h.moe) plan_moe_memory(plan, h.ep.moe, h.ep.ep, o.grad_accum);
  plan_fsdp_sharding(plan, h.shard.fsdp, h.data_ranks(o.dp));
  if (h.pp.stages == 1) return predict_memory(plan);
  const Layout layout{h.pp.stages, o.dp, h.cp.cp, h.tp.tp};
  return predict_pipeline_memory(plan, h.pp, layout.coord(rank).pp, o.grad_accum);
}

AppDefinition make_hybrid_app(const HybridOptions& preset) {
  // The options live as long as the definition's functions that read them.
  struct State : HybridOptions {
    MoeMlp* mlp = nullptr;  // owned by the harness
  };
  auto s = std::make_shared<State>();
  static_cast<HybridOptions&>(*s) = preset;
  AppDefinition app;
  app.name = "hybrid";
  app.options.add = [s](CLI::App& cli) {
    add_tp_options(cli, s->tp);
    add_pipeline_options(cli, s->pp);
    add_cp_options(cli, s->cp);
    cli.add_flag("--moe", s->moe, "every block's MLP a mixture of experts (the --ep, --experts ... options)");
    add_ep_options(cli, s->ep);
    add_fsdp_options(cli, s->shard, s->shard.shard_name);
  };
  app.options.model_parallel_size = [s] {
    return std::max(1, s->tp.tp) * std::max(1, s->pp.stages) * std::max(1, s->cp.cp);
  };
  app.options.model_parallel_options = [s] {
    return degree("--tp", s->tp.tp) + " × " + degree("--pp", s->pp.stages) + " × " + degree("--cp", s->cp.cp);
  };
  app.options.validate = [s](const Options& o) {
    // Each degree's own rules; then their combination.
    if (s->tp.tp < 1) throw ConfigError(degree("--tp", s->tp.tp) + " must be at least 1");
    validate_cp_options(s->cp, o, s->tp.tp);  // first: tp's sequence-parallel rule divides the sequence by cp
    validate_tp_options(s->tp, o, s->cp.cp);
    validate_pipeline_options(s->pp, o.model.layers, o.grad_accum, o.global_batch);
    validate_fsdp_options(s->shard, s->data_ranks(o.dp), s->cp.cp > 1 ? "the data ranks dp × cp" : "dp");
    if (s->moe) validate_ep_options(s->ep, o);
    validate_combination(*s, o);
  };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["tp"] = s->tp.tp;
    config["sequence_parallel"] = s->tp.sequence_parallel;
    config["pp"] = s->pp.stages;
    config["schedule"] = s->pp.schedule;
    config["virtual_stages"] = s->pp.chunks;
    config["cp"] = s->cp.cp;
    config["cp_algo"] = cp_algo_name(s->cp.algo);
    config["cp_layout"] = s->cp.layout_name;
    config["moe"] = s->moe;
    config["ep"] = s->ep.ep;
    if (s->moe) {
      config["experts"] = s->ep.moe.experts;
      config["top_k"] = s->ep.moe.top_k;
      config["capacity_factor"] = s->ep.moe.capacity_factor;
      config["aux_loss"] = s->ep.moe.aux_loss;
    }
    config["shard"] = shard_strategy_name(s->shard.fsdp.shard);
    config["shard_group"] = s->shard.fsdp.shard_group;
    config["no_prefetch"] = s->shard.no_prefetch;
  };
  app.layout = [s](const Options& o) {
    Layout layout{s->pp.stages, o.dp, s->cp.cp, s->tp.tp};
    layout.sequence_parallel = s->tp.sequence_parallel && s->tp.tp > 1;
    layout.cp_zigzag = s->cp.layout_name == "zigzag";
    layout.ep = s->moe ? s->ep.ep : 1;
    return layout;
  };
  app.predict_memory = [s](const Options& o, const MemoryPlan& base, int rank) {
    return predict_hybrid_memory(*s, o, base, rank);
  };
  app.block_parts = [s](const Options& o, Backend& backend, const ModelParallel& mp) {
    OwnedBlockParts parts;
    parts.attention = make_context_attention(s->cp, o, backend, mp);
    if (s->moe) {
      auto mlp = make_moe_mlp(s->ep, o, backend, mp);
      s->mlp = mlp.get();
      parts.mlp = std::move(mlp);
    }
    return parts;
  };
  app.make_strategy = [s](Runtime& runtime) {
    return std::make_unique<HybridStrategy>(runtime, *s, s->moe ? s->mlp : nullptr);
  };
  return app;
}

}  // namespace pb
