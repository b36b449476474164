// parabench-cp as one AppDefinition: what the harness runs (bench/cp/main.cpp) and what parabench-plan
// plans with --app cp (bench/plan/app_registry.cpp): the options, their rules, the layout, the memory of
// a rank, the attention core and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <string>

#include "bench/cp/context_attention.h"
#include "bench/cp/context_parallel.h"
#include "common/errors.h"

namespace pb {

void add_cp_options(CLI::App& cli, CpOptions& cp) {
  cli.add_option("--cp", cp.cp, "context-parallel degree: each sequence split over N consecutive ranks")
      ->capture_default_str();
  cli.add_option("--cp-algo", cp.algo_name, "ring | allgather | alltoall (DeepSpeed-Ulysses)")->capture_default_str();
  cli.add_option("--cp-layout", cp.layout_name,
                 "zigzag (rank i holds chunks i and 2N-1-i of 2N: balanced causal work) | contiguous")
      ->capture_default_str();
}

void validate_cp_options(CpOptions& s, const Options& o, int tp) {
  const int cp = s.cp;
  const std::string& layout_name = s.layout_name;
  if (cp < 1) throw ConfigError("--cp " + std::to_string(cp) + " must be at least 1");
  if (!parse_cp_algo(s.algo_name, &s.algo)) {
    throw ConfigError("--cp-algo " + s.algo_name + " must be ring, allgather or alltoall");
  }
  if (layout_name != "zigzag" && layout_name != "contiguous") {
    throw ConfigError("--cp-layout " + layout_name + " must be zigzag or contiguous");
  }
  const int chunks = layout_name == "zigzag" ? 2 * cp : cp;
  if (o.model.seq % chunks != 0) {
    throw ConfigError("--seq " + std::to_string(o.model.seq) + " is not divisible by " + std::to_string(chunks) +
                      " (--cp-layout " + layout_name + " splits each sequence into " +
                      (layout_name == "zigzag" ? "2 × --cp" : "--cp") + " chunks)");
  }
  // Every exchange of a micro-batch's keys and values (at most b·S·3h floats, all-gathered or sent to
  // one peer) must be one MPI count.
  if (static_cast<int64_t>(o.micro_batch) * o.model.seq * 3 * o.model.hidden > int64_t{INT_MAX}) {
    throw ConfigError("--micro-batch × --seq × 3 × --hidden is too large for one exchange of keys and values");
  }
  // alltoall: each rank's heads (heads / tp with tensor parallelism) shared out cp ways.
  if (s.algo == CpAlgo::alltoall && (o.model.heads / tp) % cp != 0) {
    throw ConfigError("--heads " + std::to_string(o.model.heads) + (tp > 1 ? " / --tp " + std::to_string(tp) : "") +
                      " is not divisible by --cp " + std::to_string(cp) + " (--cp-algo alltoall gives each rank " +
                      (tp > 1 ? "heads/tp/cp" : "heads/cp") + " heads)");
  }
  // and their key/value heads too (grouped-query attention, SPEC 2.5)
  if (s.algo == CpAlgo::alltoall && o.model.llama() && (o.model.kv() / tp) % cp != 0) {
    throw ConfigError("--kv-heads " + std::to_string(o.model.kv()) + (tp > 1 ? " / --tp " + std::to_string(tp) : "") +
                      " is not divisible by --cp " + std::to_string(cp) + " (--cp-algo alltoall gives each rank " +
                      (tp > 1 ? "kv-heads/tp/cp" : "kv-heads/cp") + " key/value heads)");
  }
}

std::unique_ptr<ContextAttention> make_context_attention(const CpOptions& s, const Options& o, Backend& backend,
                                                         const ModelParallel& mp) {
  if (!mp.cp.active()) return nullptr;
  // The core sees this rank's heads: hidden / tp wide, and its key/value heads (SPEC 2.5: kv / tp of them).
  const int kv_hidden = o.model.kv() / mp.tp.size * o.model.head_dim();
  return std::make_unique<ContextAttention>(backend, mp.cp, s.algo, o.model.seq, o.model.hidden / mp.tp.size,
                                            kv_hidden, precision_of(o).compute);
}

Communicator* make_data_ranks(ProcessGroups& g) {
  // Color: this rank's tp and pp position; key: its rank (dp and cp coordinates in SPEC 3's order).
  return g.adopt(g.world->split(g.coord.pp * g.layout.tp + g.coord.tp, g.layout.rank_of(g.coord)), "dp_cp");
}

AppDefinition make_cp_app() {
  // The options live as long as the definition's functions that read them.
  struct State {
    CpOptions cp;
    ContextAttention* attention = nullptr;  // owned by the harness
  };
  auto s = std::make_shared<State>();
  AppDefinition app;
  app.name = "cp";
  app.options.add = [s](CLI::App& cli) { add_cp_options(cli, s->cp); };
  app.options.model_parallel_size = [s] { return std::max(1, s->cp.cp); };
  app.options.model_parallel_options = [s] { return "--cp " + std::to_string(s->cp.cp); };
  app.options.validate = [s](const Options& o) { validate_cp_options(s->cp, o); };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["cp"] = s->cp.cp;
    config["cp_algo"] = cp_algo_name(s->cp.algo);
    config["cp_layout"] = s->cp.layout_name;
  };
  app.layout = [s](const Options& o) {
    Layout layout{1, o.dp, s->cp.cp, 1};
    layout.cp_zigzag = s->cp.layout_name == "zigzag";
    return layout;
  };
  app.predict_memory = [s](const Options&, const MemoryPlan& base, int /*rank*/) {
    MemoryPlan plan = base;
    plan_cp_memory(plan, s->cp.algo, s->cp.cp);
    return predict_memory(plan);
  };
  app.block_parts = [s](const Options& o, Backend& backend, const ModelParallel& mp) {
    OwnedBlockParts parts;
    auto core = make_context_attention(s->cp, o, backend, mp);
    s->attention = core.get();
    parts.attention = std::move(core);
    return parts;
  };
  app.make_strategy = [s](Runtime& runtime) { return std::make_unique<ContextParallelStrategy>(runtime, s->attention); };
  return app;
}

}  // namespace pb
