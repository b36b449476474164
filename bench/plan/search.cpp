#include "bench/plan/search.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>

#include "bench/hybrid/hybrid.h"
#include "bench/plan/app_registry.h"
#include "common/errors.h"

namespace pb::plan {
namespace {

bool divides(int64_t d, int64_t n) { return d > 0 && n % d == 0; }

// The plan of one layout: the base's model, ranks and hardware; the hybrid's own definition holding the
// layout; its memory plan completed as parabench-hybrid's predict_hybrid_memory completes it (for the time
// model). Throws ConfigError where the hybrid app would refuse the layout.
PlanConfig layout_plan(const PlanConfig& base, const HybridOptions& h, int micro_batch, const std::string& recompute) {
  PlanConfig c = base;
  const int model_parallel = h.tp.tp * h.pp.stages * h.cp.cp;
  c.dp = c.ranks / model_parallel;
  c.memory.micro_batch = micro_batch;
  c.memory.recompute = recompute;
  c.grad_accum = c.global_batch / (static_cast<int64_t>(micro_batch) * c.dp);
  c.pp = h.pp;
  auto definition = std::make_shared<AppDefinition>(make_hybrid_app(h));
  c.app_options = app_options_of(c);
  definition->options.validate(c.app_options);  // resolves the names (shard, cp algorithm) in its own state
  c.definition = definition;
  plan_tp_slices(c.memory, h.tp.tp, h.tp.sequence_parallel);
  c.cp = h.cp.cp;
  c.cp_algo = h.cp.algo;
  c.cp_zigzag = h.cp.layout_name == "zigzag";
  plan_cp_memory(c.memory, c.cp_algo, c.cp);
  FsdpOptions fsdp = h.shard.fsdp;
  if (!parse_shard_strategy(h.shard.shard_name, &fsdp.shard)) throw ConfigError("--shard " + h.shard.shard_name);
  plan_fsdp_sharding(c.memory, fsdp, c.dp * c.cp);
  c.overlap = true;
  return c;
}

}  // namespace

SearchResult search_layouts(const PlanConfig& base) {
  const auto start = std::chrono::steady_clock::now();
  SearchResult out;
  const ArchSpec& a = base.memory.arch;
  const int ranks = base.ranks, L = static_cast<int>(a.layers);
  for (int tp = 1; tp <= base.gpus_per_node; tp *= 2) {
    if (!divides(tp, a.heads) || !divides(tp, a.kv_heads) || !divides(tp, a.ffn)) continue;
    for (int cp = 1; cp <= (base.calibration ? 1 : 32); cp *= 2) {  // a calibration times cp 1 only
      if (!divides(2 * cp, a.seq) || !divides(static_cast<int64_t>(tp) * cp, ranks)) continue;
      for (int pp = 1; pp <= L; ++pp) {
        const int64_t model_parallel = static_cast<int64_t>(tp) * cp * pp;
        if (!divides(model_parallel, ranks)) continue;
        const int64_t dp = ranks / model_parallel;
        for (int micro : {1, 2, 4, 8}) {
          if (!divides(micro * dp, base.global_batch)) continue;
          const int64_t m = base.global_batch / (micro * dp);
          std::vector<std::pair<std::string, int>> schedules = {{"1f1b", 1}};
          for (int v : {2, 4}) {
            if (pp > 1 && m % pp == 0 && L >= v * pp) schedules.emplace_back("interleaved", v);
          }
          for (const auto& [schedule, chunks] : schedules) {
            // HYBRID_SHARD over the data ranks of a node: consecutive ones are tp ranks apart (cp innermost).
            const int node_group = base.gpus_per_node / tp;
            std::vector<std::pair<std::string, int>> shards = {
                {"NO_SHARD", 0}, {"ZERO1", 0}, {"SHARD_GRAD_OP", 0}, {"FULL_SHARD", 0}};
            if (node_group > 1 && node_group < dp * cp && divides(node_group, dp * cp)) {
              shards.emplace_back("HYBRID_SHARD", node_group);
            }
            for (const auto& [shard, group] : shards) {
              for (const char* recompute : {"none", "selective", "full"}) {
                ++out.candidates;
                HybridOptions h;
                h.tp.tp = tp;
                h.tp.sequence_parallel = tp > 1;
                h.pp.stages = pp;
                h.pp.schedule = schedule;
                h.pp.chunks = chunks;
                h.cp.cp = cp;
                h.shard.shard_name = shard;
                h.shard.fsdp.shard_group = group;
                h.shard.shard_group_given = group > 0;
                PlanConfig c;
                try {
                  c = layout_plan(base, h, micro, recompute);
                } catch (const ConfigError&) {
                  continue;  // the hybrid app refuses it
                }
                ++out.accepted;
                PlanResult r;
                try {
                  r = evaluate(c);
                } catch (const ConfigError& e) {  // a calibration that lacks a kernel or collective it needs
                  if (out.unplanned++ == 0) out.unplanned_reason = e.what();
                  continue;
                }
                if (!r.fit_checked || r.fits) out.ranked.push_back(std::move(r));
              }
            }
          }
        }
      }
    }
  }
  std::stable_sort(out.ranked.begin(), out.ranked.end(),
                   [](const PlanResult& x, const PlanResult& y) { return x.step_s < y.step_s; });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace pb::plan
