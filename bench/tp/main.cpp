// parabench-tp: the reference model trained with tensor (and sequence) parallelism, combined with
// data parallelism (see README.md).
#include <CLI/CLI.hpp>

#include "bench/tp/tensor_parallel.h"
#include "common/errors.h"
#include "common/runner.h"

namespace {
void require_divisible(const char* option, long long value, int tp, const char* what = "") {
  if (value % tp != 0) {
    throw pb::ConfigError(std::string(option) + " " + std::to_string(value) + " is not divisible by --tp " +
                          std::to_string(tp) + what);
  }
}
}  // namespace

int main(int argc, char** argv) {
  int tp = 1;
  bool sequence_parallel = false;

  pb::AppDefinition app;
  app.name = "tp";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--tp", tp, "tensor-parallel degree (consecutive ranks)")->capture_default_str();
    cli.add_flag("--sequence-parallel", sequence_parallel,
                 "split LayerNorm and residual activations along the sequence (Korthikanti et al. 2022)");
  };
  app.options.model_parallel_size = [&] { return std::max(1, tp); };
  app.options.model_parallel_options = [&] { return "--tp " + std::to_string(tp); };
  app.options.validate = [&](const pb::Options& o) {
    if (tp < 1) throw pb::ConfigError("--tp " + std::to_string(tp) + " must be at least 1");
    require_divisible("--heads", o.model.heads, tp);
    require_divisible("--ffn", o.model.ffn, tp);
    require_divisible("--vocab", o.model.vocab, tp, " (the vocabulary is split, not padded)");
    if (sequence_parallel) {
      require_divisible("--micro-batch × --seq", static_cast<long long>(o.micro_batch) * o.model.seq, tp,
                        " (sequence parallelism splits the micro-batch's tokens)");
    }
    if (tp > 1 && !o.dump_gradients.empty()) throw pb::ConfigError("--dump-gradients needs --tp 1");
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["tp"] = tp;
    config["sequence_parallel"] = sequence_parallel;
  };
  app.layout = [&](const pb::Options& o) {
    pb::Layout layout{1, o.dp, 1, tp};
    layout.sequence_parallel = sequence_parallel && tp > 1;
    return layout;
  };
  app.predict_memory = [&](const pb::Options&, const pb::MemoryPlan& base, int /*rank*/) {
    pb::MemoryPlan plan = base;
    plan.tp = tp;
    plan.sequence_parallel = sequence_parallel && tp > 1;
    return pb::predict_memory(plan);
  };
  app.make_strategy = [](pb::Runtime& runtime) { return std::make_unique<pb::TensorParallelStrategy>(runtime); };
  return pb::run_app(argc, argv, app);
}
