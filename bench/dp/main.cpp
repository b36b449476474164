// parabench-dp: the reference model trained with data parallelism (see README.md).
#include <CLI/CLI.hpp>

#include "bench/dp/data_parallel.h"
#include "common/errors.h"
#include "common/runner.h"

int main(int argc, char** argv) {
  constexpr double kMaxBucketMb = 1 << 20;  // 1 TiB: larger means "one bucket" anyway
  pb::DataParallelOptions dp;
  bool no_overlap = false;

  pb::AppDefinition app;
  app.name = "dp";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--bucket-mb", dp.bucket_mb, "gradient bucket size in MiB")->capture_default_str();
    cli.add_flag("--no-overlap", no_overlap, "all-reduce the gradients after backward, not during it");
  };
  app.options.validate = [&](const pb::Options&) {
    if (!(dp.bucket_mb > 0.0 && dp.bucket_mb <= kMaxBucketMb)) {
      throw pb::ConfigError("--bucket-mb " + std::to_string(dp.bucket_mb) + " must be positive and at most " +
                            std::to_string(static_cast<int>(kMaxBucketMb)) + " (MiB)");
    }
    dp.overlap = !no_overlap;
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["bucket_mb"] = dp.bucket_mb;
    config["no_overlap"] = no_overlap;
  };
  app.layout = [](const pb::Options& o) { return pb::Layout{1, o.dp, 1, 1}; };
  app.predict_memory = [](const pb::Options&, const pb::MemoryPlan& plan, int /*rank*/) {
    // The whole model on every rank; buckets are views of the gradient buffer, so no comm buffers.
    return pb::predict_memory(plan);
  };
  app.make_strategy = [&](pb::Runtime& runtime) { return std::make_unique<pb::DataParallel>(runtime, dp); };
  return pb::run_app(argc, argv, app);
}
