// parabench-tp as one AppDefinition: what the harness runs (bench/tp/main.cpp) and what parabench-plan
// plans with --app tp (bench/plan/app_registry.cpp): the options, their rules, the layout, the memory of
// a rank and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <memory>
#include <string>

#include "bench/tp/tensor_parallel.h"
#include "common/errors.h"

namespace pb {
namespace {
void require_divisible(const char* option, long long value, int tp, const char* what = "") {
  if (value % tp != 0) {
    throw ConfigError(std::string(option) + " " + std::to_string(value) + " is not divisible by --tp " +
                      std::to_string(tp) + what);
  }
}
}  // namespace

void plan_tp_slices(MemoryPlan& plan, int tp, bool sequence_parallel) {
  plan.tp = tp;
  plan.sequence_parallel = sequence_parallel && tp > 1;  // no split at tp 1
}

void add_tp_options(CLI::App& cli, TpOptions& tp) {
  cli.add_option("--tp", tp.tp, "tensor-parallel degree (consecutive ranks)")->capture_default_str();
  cli.add_flag("--sequence-parallel", tp.sequence_parallel,
               "split LayerNorm and residual activations along the sequence (Korthikanti et al. 2022)");
}

void validate_tp_options(const TpOptions& t, const Options& o, int cp) {
  const int tp = t.tp;
  if (tp < 1) throw ConfigError("--tp " + std::to_string(tp) + " must be at least 1");
  require_divisible("--heads", o.model.heads, tp);
  if (o.model.llama() && o.model.kv() % tp != 0) {  // each rank holds kv/tp key/value heads, none replicated
    throw ConfigError("--kv-heads " + std::to_string(o.model.kv()) + " is not divisible by --tp " + std::to_string(tp) +
                      ": tensor parallelism splits the key/value heads over its ranks (replicating them is not "
                      "implemented)");
  }
  require_divisible("--ffn", o.model.ffn, tp);
  if (t.sequence_parallel) {
    // A rank's tokens of a micro-batch: each sequence's S / cp with context parallelism.
    const long long tokens = static_cast<long long>(o.micro_batch) * (o.model.seq / cp);
    require_divisible(cp > 1 ? "--micro-batch × --seq / --cp" : "--micro-batch × --seq", tokens, tp,
                      " (sequence parallelism splits the micro-batch's tokens)");
  }
  if (tp > 1 && !o.dump_gradients.empty()) throw ConfigError("--dump-gradients needs --tp 1");
}

AppDefinition make_tp_app() {
  // The options live as long as the definition's functions that read them.
  auto s = std::make_shared<TpOptions>();
  AppDefinition app;
  app.name = "tp";
  app.options.add = [s](CLI::App& cli) { add_tp_options(cli, *s); };
  app.options.model_parallel_size = [s] { return std::max(1, s->tp); };
  app.options.model_parallel_options = [s] { return "--tp " + std::to_string(s->tp); };
  app.options.validate = [s](const Options& o) {
    validate_tp_options(*s, o);
  };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["tp"] = s->tp;
    config["sequence_parallel"] = s->sequence_parallel;
  };
  app.layout = [s](const Options& o) {
    Layout layout{1, o.dp, 1, s->tp};
    layout.sequence_parallel = s->sequence_parallel && s->tp > 1;
    return layout;
  };
  app.predict_memory = [s](const Options&, const MemoryPlan& base, int /*rank*/) {
    MemoryPlan plan = base;
    plan_tp_slices(plan, s->tp, s->sequence_parallel);
    return predict_memory(plan);
  };
  app.make_strategy = [](Runtime& runtime) { return std::make_unique<TensorParallelStrategy>(runtime); };
  return app;
}

}  // namespace pb
