// parabench-fsdp: the reference model trained with sharded data parallelism (see README.md).
#include <CLI/CLI.hpp>

#include "bench/fsdp/fully_sharded.h"
#include "common/errors.h"
#include "common/runner.h"

int main(int argc, char** argv) {
  pb::FsdpOptions fsdp;
  std::string shard_name = "FULL_SHARD";
  bool no_prefetch = false;
  CLI::Option* shard_group_option = nullptr;

  pb::AppDefinition app;
  app.name = "fsdp";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--shard", shard_name,
                   "NO_SHARD | ZERO1 | SHARD_GRAD_OP | FULL_SHARD | HYBRID_SHARD (aliases NO_OP, FULLY_SHARD)")
        ->capture_default_str();
    shard_group_option = cli.add_option("--shard-group", fsdp.shard_group, "HYBRID_SHARD: ranks per shard group");
    cli.add_flag("--no-prefetch", no_prefetch, "FULL_SHARD, HYBRID_SHARD: gather each unit only when it is needed");
  };
  app.options.validate = [&](const pb::Options& o) {
    if (!pb::parse_shard_strategy(shard_name, &fsdp.shard)) {
      throw pb::ConfigError("--shard " + shard_name +
                            " must be NO_SHARD, ZERO1, SHARD_GRAD_OP, FULL_SHARD or HYBRID_SHARD (or NO_OP, FULLY_SHARD)");
    }
    const bool hybrid = fsdp.shard == pb::ShardStrategy::hybrid_shard;
    const bool group_given = shard_group_option->count() > 0;
    if (hybrid && !group_given) throw pb::ConfigError("--shard HYBRID_SHARD needs --shard-group N");
    if (!hybrid && group_given) {
      throw pb::ConfigError("--shard-group " + std::to_string(fsdp.shard_group) + " applies to --shard HYBRID_SHARD only");
    }
    const bool gathers = hybrid || fsdp.shard == pb::ShardStrategy::full_shard;
    if (no_prefetch && !gathers) {
      throw pb::ConfigError(std::string("--no-prefetch applies to FULL_SHARD and HYBRID_SHARD only, not --shard ") +
                            pb::shard_strategy_name(fsdp.shard));
    }
    if (hybrid && (fsdp.shard_group < 1 || o.dp % fsdp.shard_group != 0)) {
      throw pb::ConfigError("--shard-group " + std::to_string(fsdp.shard_group) + " must divide dp " + std::to_string(o.dp));
    }
    fsdp.prefetch = !no_prefetch;
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["shard"] = pb::shard_strategy_name(fsdp.shard);
    config["shard_group"] = fsdp.shard_group;
    config["no_prefetch"] = no_prefetch;
  };
  app.layout = [](const pb::Options& o) { return pb::Layout{1, o.dp, 1, 1}; };
  app.predict_memory = [&](const pb::Options& o, const pb::MemoryPlan& base, int /*rank*/) {
    pb::MemoryPlan plan = base;
    plan.shard = fsdp.shard;
    plan.shard_ranks = fsdp.shard == pb::ShardStrategy::hybrid_shard ? fsdp.shard_group : o.dp;
    plan.prefetch = fsdp.prefetch;
    return pb::predict_memory(plan);
  };
  app.make_strategy = [&](pb::Runtime& runtime) {
    return std::make_unique<pb::FullyShardedDataParallel>(runtime, fsdp);
  };
  return pb::run_app(argc, argv, app);
}
