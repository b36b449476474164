// parabench-pp: the reference model trained with pipeline parallelism (naive, GPipe, 1F1B and
// interleaved schedules), combined with data parallelism (see README.md).
#include <CLI/CLI.hpp>

#include "bench/pp/pipeline_parallel.h"
#include "common/errors.h"
#include "common/runner.h"

int main(int argc, char** argv) {
  pb::PipelineOptions pp;
  constexpr int kMaxTag = 32767;  // the smallest MPI_TAG_UB the MPI standard allows

  pb::AppDefinition app;
  app.name = "pp";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--pp", pp.stages, "pipeline stages (ranks farthest apart)")->capture_default_str();
    cli.add_option("--schedule", pp.schedule, "naive | gpipe | 1f1b | interleaved")->capture_default_str();
    cli.add_option("--virtual-stages", pp.chunks, "interleaved: model chunks per rank")->capture_default_str();
  };
  app.options.model_parallel_size = [&] { return std::max(1, pp.stages); };
  app.options.model_parallel_options = [&] { return "--pp " + std::to_string(pp.stages); };
  app.options.validate = [&](const pb::Options& o) {
    const std::string& s = pp.schedule;
    if (s != "naive" && s != "gpipe" && s != "1f1b" && s != "interleaved") {
      throw pb::ConfigError("--schedule " + s + " must be naive, gpipe, 1f1b or interleaved");
    }
    if (pp.stages < 1) throw pb::ConfigError("--pp " + std::to_string(pp.stages) + " must be at least 1");
    if (pp.chunks < 1) throw pb::ConfigError("--virtual-stages " + std::to_string(pp.chunks) + " must be at least 1");
    if (s == "interleaved" && pp.chunks < 2) {
      throw pb::ConfigError("--schedule interleaved needs --virtual-stages 2 or more (1 is the 1f1b schedule)");
    }
    if (s != "interleaved" && pp.chunks != 1) {
      throw pb::ConfigError("--virtual-stages " + std::to_string(pp.chunks) + " applies to --schedule interleaved only");
    }
    const int virtual_stages = pp.stages * pp.chunks;
    if (o.model.layers % virtual_stages != 0) {
      throw pb::ConfigError("--layers " + std::to_string(o.model.layers) + " is not divisible by --pp " +
                            std::to_string(pp.stages) + " × --virtual-stages " + std::to_string(pp.chunks));
    }
    if (s == "interleaved" && o.grad_accum % pp.stages != 0) {
      throw pb::ConfigError("--schedule interleaved needs micro-batches per step (grad accumulation " +
                            std::to_string(o.grad_accum) + ") divisible by --pp " + std::to_string(pp.stages));
    }
    if (2L * o.grad_accum * virtual_stages > kMaxTag) {
      throw pb::ConfigError("--global-batch " + std::to_string(o.global_batch) + ": too many micro-batches per step (" +
                            std::to_string(o.grad_accum) + ") for MPI message tags with " +
                            std::to_string(virtual_stages) + " virtual stages");
    }
    if (pp.stages > 1 && !o.dump_gradients.empty()) throw pb::ConfigError("--dump-gradients needs --pp 1");
    // NCCL matches point-to-point messages by order, not tag; the schedules post receives ahead of
    // sends in orders that differ between stages, which only tag-matched MPI handles.
    if (pp.stages > 1 && o.comm == "nccl") {
      throw pb::ConfigError("--pp " + std::to_string(pp.stages) + " needs --comm mpi: the pipeline's messages are "
                            "matched by tag, which NCCL does not do");
    }
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["pp"] = pp.stages;
    config["schedule"] = pp.schedule;
    config["virtual_stages"] = pp.chunks;
  };
  app.layout = [&](const pb::Options& o) { return pb::Layout{pp.stages, o.dp, 1, 1}; };
  app.predict_memory = [&](const pb::Options& o, const pb::MemoryPlan& plan, int rank) {
    const pb::Layout layout{pp.stages, o.dp, 1, 1};
    return pb::predict_pipeline_memory(plan, pp, layout.coord(rank).pp, o.grad_accum);
  };
  app.make_strategy = [&](pb::Runtime& runtime) { return std::make_unique<pb::PipelineParallel>(runtime, pp); };
  return pb::run_app(argc, argv, app);
}
