// parabench-fsdp as one AppDefinition: what the harness runs (bench/fsdp/main.cpp) and what
// parabench-plan plans with --app fsdp (bench/plan/app_registry.cpp): the options, their rules, the
// layout, the memory of a rank and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <memory>
#include <string>

#include "bench/fsdp/fully_sharded.h"
#include "common/errors.h"

namespace pb {

void plan_fsdp_sharding(MemoryPlan& plan, const FsdpOptions& fsdp, int dp) {
  plan.shard = fsdp.shard;
  plan.shard_ranks = fsdp.shard == ShardStrategy::hybrid_shard ? fsdp.shard_group
                     : fsdp.shard == ShardStrategy::no_shard  ? 1
                                                              : dp;
  plan.prefetch = fsdp.prefetch;
}

void add_fsdp_options(CLI::App& cli, FsdpCli& s, const std::string& default_shard) {
  s.shard_name = default_shard;
  cli.add_option("--shard", s.shard_name,
                 "NO_SHARD | ZERO1 | SHARD_GRAD_OP | FULL_SHARD | HYBRID_SHARD (aliases NO_OP, FULLY_SHARD)")
      ->capture_default_str();
  cli.add_option("--shard-group", s.fsdp.shard_group, "HYBRID_SHARD: ranks per shard group")
      ->each([&s](const std::string&) { s.shard_group_given = true; });
  cli.add_flag("--no-prefetch", s.no_prefetch, "FULL_SHARD, HYBRID_SHARD: gather each unit only when it is needed");
}

void validate_fsdp_options(FsdpCli& s, int data_ranks, const std::string& data_ranks_name) {
  FsdpOptions& fsdp = s.fsdp;
  if (!parse_shard_strategy(s.shard_name, &fsdp.shard)) {
    throw ConfigError("--shard " + s.shard_name +
                      " must be NO_SHARD, ZERO1, SHARD_GRAD_OP, FULL_SHARD or HYBRID_SHARD (aliases NO_OP, FULLY_SHARD)");
  }
  const bool hybrid = fsdp.shard == ShardStrategy::hybrid_shard;
  const bool group_given = s.shard_group_given;
  if (hybrid && !group_given) {
    throw ConfigError("--shard HYBRID_SHARD needs --shard-group N, the ranks a unit is sharded over");
  }
  if (!hybrid && group_given) {
    throw ConfigError("--shard-group is for --shard HYBRID_SHARD only, not " + std::string(shard_strategy_name(fsdp.shard)));
  }
  const bool gathers = hybrid || fsdp.shard == ShardStrategy::full_shard;
  if (s.no_prefetch && !gathers) {
    throw ConfigError(std::string("--no-prefetch applies to FULL_SHARD and HYBRID_SHARD only, not --shard ") +
                      shard_strategy_name(fsdp.shard));
  }
  if (hybrid && fsdp.shard_group < 1) {
    throw ConfigError("--shard-group " + std::to_string(fsdp.shard_group) + " must be at least 1");
  }
  if (hybrid && data_ranks % fsdp.shard_group != 0) {
    throw ConfigError("--shard-group " + std::to_string(fsdp.shard_group) + " does not divide " + data_ranks_name + " " +
                      std::to_string(data_ranks));
  }
  fsdp.prefetch = !s.no_prefetch;
}

AppDefinition make_fsdp_app() {
  // The options live as long as the definition's functions that read them.
  auto s = std::make_shared<FsdpCli>();
  AppDefinition app;
  app.name = "fsdp";
  app.options.add = [s](CLI::App& cli) { add_fsdp_options(cli, *s); };
  app.options.validate = [s](const Options& o) { validate_fsdp_options(*s, o.dp); };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["shard"] = shard_strategy_name(s->fsdp.shard);
    config["shard_group"] = s->fsdp.shard_group;
    config["no_prefetch"] = s->no_prefetch;
  };
  app.layout = [](const Options& o) { return Layout{1, o.dp, 1, 1}; };
  app.predict_memory = [s](const Options& o, const MemoryPlan& base, int /*rank*/) {
    MemoryPlan plan = base;
    plan_fsdp_sharding(plan, s->fsdp, o.dp);
    return predict_memory(plan);
  };
  app.make_strategy = [s](Runtime& runtime) { return std::make_unique<FullyShardedDataParallel>(runtime, s->fsdp); };
  return app;
}

}  // namespace pb
