// parabench-ep as one AppDefinition: what the harness runs (bench/ep/main.cpp) and what parabench-plan
// plans with --app ep (bench/plan/app_registry.cpp): the options, their rules, the layout, the memory of
// a rank, the MoE block part and the strategy, all from this one definition.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>

#include "bench/ep/expert_parallel.h"
#include "bench/ep/moe.h"
#include "common/errors.h"

namespace pb {
namespace {
std::string number(double v) {  // as typed: -0.5, not -0.500000
  char text[32];
  std::snprintf(text, sizeof(text), "%g", v);
  return text;
}
}  // namespace

void add_ep_options(CLI::App& cli, EpOptions& s) {
  cli.add_option("--ep", s.ep, "expert-parallel degree: groups of N consecutive data-parallel ranks share the experts")
      ->capture_default_str();
  cli.add_option("--experts", s.moe.experts, "experts per MoE layer (E)")->capture_default_str();
  cli.add_option("--top-k", s.moe.top_k, "experts per token (k)")->capture_default_str();
  cli.add_option("--capacity-factor", s.moe.capacity_factor,
                 "expert capacity C = ceil(factor·k·b·S/E) per micro-batch; 0: no limit (dropless)")
      ->capture_default_str();
  cli.add_option("--aux-loss", s.moe.aux_loss, "Switch Transformer load-balancing loss coefficient (0: none)")
      ->capture_default_str();
}

void validate_ep_options(const EpOptions& s, const Options& o) {
  const MoeOptions& moe = s.moe;
  const int ep = s.ep;
  const std::string E = std::to_string(moe.experts);
  if (moe.experts < 1) throw ConfigError("--experts " + E + " must be at least 1");
  if (moe.top_k < 1 || moe.top_k > moe.experts) {
    throw ConfigError("--top-k " + std::to_string(moe.top_k) + " must be between 1 and --experts " + E);
  }
  if (!(moe.capacity_factor >= 0.0) || moe.capacity_factor > 1e6) {
    throw ConfigError("--capacity-factor " + number(moe.capacity_factor) +
                      " must be 0 (no limit) or positive (at most 1e6)");
  }
  if (!(moe.aux_loss >= 0.0) || moe.aux_loss > 1e6) {
    throw ConfigError("--aux-loss " + number(moe.aux_loss) + " must be 0 (none) or positive (at most 1e6)");
  }
  if (ep < 1) throw ConfigError("--ep " + std::to_string(ep) + " must be at least 1");
  if (moe.experts % ep != 0) {
    throw ConfigError("--experts " + E + " is not divisible by --ep " + std::to_string(ep) +
                      " (each rank of an ep group holds E/ep whole experts)");
  }
  if (o.dp % ep != 0) {
    throw ConfigError("--ep " + std::to_string(ep) + " does not divide the data-parallel degree " +
                      std::to_string(o.dp) + " (ep groups are consecutive dp ranks)");
  }
  // The dispatch buffers: E·C slots of h values in one all-to-all (an int count).
  const int64_t slots = int64_t{moe.experts} * moe_capacity(moe, int64_t{o.micro_batch} * o.model.seq);
  if (slots * o.model.hidden > (int64_t{1} << 31) - 1 || slots * o.model.ffn > (int64_t{1} << 31) - 1) {
    throw ConfigError("--experts " + E + " × capacity × --hidden/--ffn is too large for one all-to-all");
  }
  if (ep > 1 && !o.dump_gradients.empty()) throw ConfigError("--dump-gradients needs --ep 1");
}

std::unique_ptr<MoeMlp> make_moe_mlp(const EpOptions& s, const Options& o, Backend& backend, const ModelParallel& mp) {
  const float loss_scale = 1.0f / (static_cast<float>(o.global_batch) * o.model.seq);
  return std::make_unique<MoeMlp>(o.model, s.moe, backend, mp.ep, o.micro_batch, o.grad_accum, loss_scale,
                                  precision_of(o).compute);
}

AppDefinition make_ep_app() {
  // The options live as long as the definition's functions that read them.
  struct State : EpOptions {
    MoeMlp* mlp = nullptr;  // owned by the harness
  };
  auto s = std::make_shared<State>();
  AppDefinition app;
  app.name = "ep";
  app.options.add = [s](CLI::App& cli) { add_ep_options(cli, *s); };
  app.options.validate = [s](const Options& o) { validate_ep_options(*s, o); };
  app.options.describe = [s](nlohmann::ordered_json& config) {
    config["ep"] = s->ep;
    config["experts"] = s->moe.experts;
    config["top_k"] = s->moe.top_k;
    config["capacity_factor"] = s->moe.capacity_factor;
    config["aux_loss"] = s->moe.aux_loss;
  };
  app.layout = [s](const Options& o) {
    Layout layout{1, o.dp, 1, 1};
    layout.ep = s->ep;
    return layout;
  };
  app.predict_memory = [s](const Options& o, const MemoryPlan& base, int /*rank*/) {
    MemoryPlan plan = base;
    plan_moe_memory(plan, s->moe, s->ep, o.grad_accum);
    return predict_memory(plan);
  };
  app.block_parts = [s](const Options& o, Backend& backend, const ModelParallel& mp) {
    OwnedBlockParts parts;
    auto part = make_moe_mlp(*s, o, backend, mp);
    s->mlp = part.get();
    parts.mlp = std::move(part);
    return parts;
  };
  app.make_strategy = [s](Runtime& runtime) { return std::make_unique<ExpertParallelStrategy>(runtime, *s->mlp); };
  return app;
}

}  // namespace pb
