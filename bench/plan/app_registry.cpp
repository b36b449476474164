#include "bench/plan/app_registry.h"

#include "bench/cp/context_parallel.h"
#include "bench/dp/data_parallel.h"
#include "bench/ep/expert_parallel.h"
#include "bench/fsdp/fully_sharded.h"
#include "bench/hybrid/hybrid.h"
#include "bench/pp/pipeline_parallel.h"
#include "bench/tp/tensor_parallel.h"

namespace pb::plan {

const std::vector<RegisteredApp>& registered_apps() {
  static const std::vector<RegisteredApp> apps = {
      {"dp", nullptr, "", make_dp_app, {"--no-overlap"}},
      {"fsdp", nullptr, "", make_fsdp_app},
      {"tp", "--tp", "tensor parallelism", make_tp_app},
      {"pp", "--pp", "pipeline parallelism", make_pipeline_app},
      {"ep", "--ep", "expert parallelism", make_ep_app},
      {"cp", "--cp", "context parallelism", make_cp_app},
      {"hybrid", nullptr, "", [] { return make_hybrid_app(); }, {}, true},
  };
  return apps;
}

const RegisteredApp* find_registered_app(const std::string& name) {
  for (const RegisteredApp& app : registered_apps()) {
    if (name == app.name) return &app;
  }
  return nullptr;
}

Options app_options_of(const PlanConfig& c) {
  const ArchSpec& a = c.memory.arch;
  Options o;
  o.app = c.app;
  o.model.name = c.model;
  o.model.layers = static_cast<int>(a.layers);
  o.model.hidden = static_cast<int>(a.hidden);
  o.model.heads = static_cast<int>(a.heads);
  o.model.seq = static_cast<int>(a.seq);
  o.model.vocab = static_cast<int>(a.vocab);
  o.model.vocab_divisor = static_cast<int>(a.vocab_divisor);
  o.model.ffn = static_cast<int>(a.ffn);
  o.micro_batch = c.memory.micro_batch;
  o.global_batch = static_cast<int>(c.global_batch);
  o.grad_accum = static_cast<int>(c.grad_accum);
  o.dp = c.dp;
  o.world_size = c.ranks;
  o.backend = c.backend;
  o.comm = "mpi";
  o.dtype = c.dtype;
  o.grad_dtype = c.grad_dtype;
  o.recompute = c.memory.recompute;
  return o;
}

std::vector<MemoryEstimate> distinct_rank_memory(const AppDefinition& app, const Options& o, const MemoryPlan& plan) {
  const Layout layout = app.layout(o);
  std::vector<MemoryEstimate> out;
  for (int pp = 0; pp < layout.pp; ++pp) {
    for (int cp = 0; cp < layout.cp; ++cp) {
      for (int tp = 0; tp < layout.tp; ++tp) out.push_back(app.predict_memory(o, plan, layout.rank_of({pp, 0, cp, tp})));
    }
  }
  return out;
}

}  // namespace pb::plan
