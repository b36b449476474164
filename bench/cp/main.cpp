// parabench-cp: the reference model trained with context parallelism (each sequence split over the cp
// ranks), combined with data parallelism (see README.md).
#include <CLI/CLI.hpp>

#include <climits>
#include <cstdint>
#include <memory>

#include "bench/cp/context_attention.h"
#include "bench/cp/context_parallel.h"
#include "common/errors.h"
#include "common/runner.h"

int main(int argc, char** argv) {
  int cp = 1;
  std::string algo_name = "ring", layout_name = "zigzag";
  pb::CpAlgo algo = pb::CpAlgo::ring;
  pb::ContextAttention* attention = nullptr;  // owned by the harness

  pb::AppDefinition app;
  app.name = "cp";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--cp", cp, "context-parallel degree: each sequence split over N consecutive ranks")
        ->capture_default_str();
    cli.add_option("--cp-algo", algo_name, "ring | allgather | alltoall (DeepSpeed-Ulysses)")->capture_default_str();
    cli.add_option("--cp-layout", layout_name,
                   "zigzag (rank i holds chunks i and 2N-1-i of 2N: balanced causal work) | contiguous")
        ->capture_default_str();
  };
  app.options.model_parallel_size = [&] { return std::max(1, cp); };
  app.options.model_parallel_options = [&] { return "--cp " + std::to_string(cp); };
  app.options.validate = [&](const pb::Options& o) {
    if (cp < 1) throw pb::ConfigError("--cp " + std::to_string(cp) + " must be at least 1");
    if (!pb::parse_cp_algo(algo_name, &algo)) {
      throw pb::ConfigError("--cp-algo " + algo_name + " must be ring, allgather or alltoall");
    }
    if (layout_name != "zigzag" && layout_name != "contiguous") {
      throw pb::ConfigError("--cp-layout " + layout_name + " must be zigzag or contiguous");
    }
    const int chunks = layout_name == "zigzag" ? 2 * cp : cp;
    if (o.model.seq % chunks != 0) {
      throw pb::ConfigError("--seq " + std::to_string(o.model.seq) + " is not divisible by " + std::to_string(chunks) +
                            " (--cp-layout " + layout_name + " splits each sequence into " +
                            (layout_name == "zigzag" ? "2 × --cp" : "--cp") + " chunks)");
    }
    // Every exchange of a micro-batch's keys and values (at most b·S·3h floats, all-gathered or sent to
    // one peer) must be one MPI count.
    if (static_cast<int64_t>(o.micro_batch) * o.model.seq * 3 * o.model.hidden > int64_t{INT_MAX}) {
      throw pb::ConfigError("--micro-batch × --seq × 3 × --hidden is too large for one exchange of keys and values");
    }
    if (algo == pb::CpAlgo::alltoall && o.model.heads % cp != 0) {
      throw pb::ConfigError("--heads " + std::to_string(o.model.heads) + " is not divisible by --cp " +
                            std::to_string(cp) + " (--cp-algo alltoall gives each rank heads/cp heads)");
    }
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["cp"] = cp;
    config["cp_algo"] = pb::cp_algo_name(algo);
    config["cp_layout"] = layout_name;
  };
  app.layout = [&](const pb::Options& o) {
    pb::Layout layout{1, o.dp, cp, 1};
    layout.cp_zigzag = layout_name == "zigzag";
    return layout;
  };
  app.predict_memory = [&](const pb::Options&, const pb::MemoryPlan& base, int /*rank*/) {
    pb::MemoryPlan plan = base;
    pb::plan_cp_memory(plan, algo, cp);
    return pb::predict_memory(plan);
  };
  app.block_parts = [&](const pb::Options& o, pb::Backend& backend, const pb::ModelParallel& mp) {
    pb::OwnedBlockParts parts;
    if (mp.cp.active()) {
      auto core = std::make_unique<pb::ContextAttention>(backend, mp.cp, algo, o.model.seq, o.model.hidden,
                                                        pb::precision_of(o).compute);
      attention = core.get();
      parts.attention = std::move(core);
    }
    return parts;
  };
  app.make_strategy = [&](pb::Runtime& runtime) {
    return std::make_unique<pb::ContextParallelStrategy>(runtime, attention);
  };
  return pb::run_app(argc, argv, app);
}
