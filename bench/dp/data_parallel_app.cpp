// parabench-dp as one AppDefinition: what the harness runs (bench/dp/main.cpp) and what parabench-plan
// plans with --app dp (bench/plan/app_registry.cpp): the options, their rules, the layout, the memory of
// a rank and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <memory>

#include "bench/dp/data_parallel.h"
#include "common/errors.h"

namespace pb {

AppDefinition make_dp_app() {
  constexpr double kMaxBucketMb = 1 << 20;  // 1 TiB: larger means "one bucket" anyway
  // The options live as long as the definition's functions that read them.
  struct State {
    DataParallelOptions dp;
    bool no_overlap = false;
  };
  auto s = std::make_shared<State>();
  AppDefinition app;
  app.name = "dp";
  app.options.add = [s](CLI::App& cli) {
    cli.add_option("--bucket-mb", s->dp.bucket_mb, "gradient bucket size in MiB")->capture_default_str();
    cli.add_flag("--no-overlap", s->no_overlap, "all-reduce the gradients after backward, not during it");
  };
  app.options.validate = [s](const Options&) {
    if (!(s->dp.bucket_mb > 0.0 && s->dp.bucket_mb <= kMaxBucketMb)) {
      throw ConfigError("--bucket-mb " + std::to_string(s->dp.bucket_mb) + " must be positive and at most " +
                        std::to_string(static_cast<int>(kMaxBucketMb)) + " (MiB)");
    }
    s->dp.overlap = !s->no_overlap;
  };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["bucket_mb"] = s->dp.bucket_mb;
    config["no_overlap"] = s->no_overlap;
  };
  app.layout = [](const Options& o) { return Layout{1, o.dp, 1, 1}; };
  app.predict_memory = [](const Options&, const MemoryPlan& plan, int /*rank*/) {
    // The whole model on every rank; buckets are views of the gradient buffer, so no comm buffers.
    return predict_memory(plan);
  };
  app.make_strategy = [s](Runtime& runtime) { return std::make_unique<DataParallel>(runtime, s->dp); };
  return app;
}

}  // namespace pb
