// parabench-pp as one AppDefinition: what the harness runs (bench/pp/main.cpp) and what parabench-plan
// plans with --app pp (bench/plan/app_registry.cpp): the options, their rules, the layout, the memory of
// each rank and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <memory>

#include "bench/pp/pipeline_parallel.h"
#include "common/errors.h"

namespace pb {

AppDefinition make_pipeline_app() {
  // The options live as long as the definition's functions that read them.
  auto pp = std::make_shared<PipelineOptions>();
  AppDefinition app;
  app.name = "pp";
  app.options.add = [pp](CLI::App& cli) { add_pipeline_options(cli, *pp); };
  app.options.model_parallel_size = [pp] { return std::max(1, pp->stages); };
  app.options.model_parallel_options = [pp] { return "--pp " + std::to_string(pp->stages); };
  app.options.validate = [pp](const Options& o) {
    validate_pipeline_options(*pp, o.model.layers, o.grad_accum, o.global_batch);
    if (pp->stages > 1 && !o.dump_gradients.empty()) throw ConfigError("--dump-gradients needs --pp 1");
    // NCCL matches point-to-point messages by order, not tag; the schedules post receives ahead of
    // sends in orders that differ between stages, which only tag-matched MPI handles.
    if (pp->stages > 1 && o.comm == "nccl") {
      throw ConfigError("--pp " + std::to_string(pp->stages) + " needs --comm mpi: the pipeline's messages are "
                        "matched by tag, which NCCL does not do");
    }
  };
  app.options.describe = [pp](nlohmann::ordered_json& config) {
    config["pp"] = pp->stages;
    config["schedule"] = pp->schedule;
    config["virtual_stages"] = pp->chunks;
  };
  app.layout = [pp](const Options& o) { return Layout{pp->stages, o.dp, 1, 1}; };
  app.predict_memory = [pp](const Options& o, const MemoryPlan& plan, int rank) {
    const Layout layout{pp->stages, o.dp, 1, 1};
    return predict_pipeline_memory(plan, *pp, layout.coord(rank).pp, o.grad_accum);
  };
  app.make_strategy = [pp](Runtime& runtime) { return std::make_unique<PipelineParallel>(runtime, *pp); };
  return app;
}

}  // namespace pb
