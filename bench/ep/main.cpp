// parabench-ep: the mixture-of-experts model trained with expert parallelism, combined with data
// parallelism (see README.md).
#include <CLI/CLI.hpp>

#include <memory>

#include "bench/ep/expert_parallel.h"
#include "bench/ep/moe.h"
#include "common/errors.h"
#include "common/runner.h"

int main(int argc, char** argv) {
  int ep = 1;
  pb::MoeOptions moe;
  pb::MoeMlp* mlp = nullptr;  // owned by the harness

  pb::AppDefinition app;
  app.name = "ep";
  app.options.add = [&](CLI::App& cli) {
    cli.add_option("--ep", ep, "expert-parallel degree: groups of N consecutive data-parallel ranks share the experts")
        ->capture_default_str();
    cli.add_option("--experts", moe.experts, "experts per MoE layer (E)")->capture_default_str();
    cli.add_option("--top-k", moe.top_k, "experts per token (k)")->capture_default_str();
    cli.add_option("--capacity-factor", moe.capacity_factor,
                   "expert capacity C = ceil(factor·k·b·S/E) per micro-batch; 0: no limit (dropless)")
        ->capture_default_str();
    cli.add_option("--aux-loss", moe.aux_loss, "Switch Transformer load-balancing loss coefficient (0: none)")
        ->capture_default_str();
  };
  app.options.validate = [&](const pb::Options& o) {
    const std::string E = std::to_string(moe.experts);
    if (moe.experts < 1) throw pb::ConfigError("--experts " + E + " must be at least 1");
    if (moe.top_k < 1 || moe.top_k > moe.experts) {
      throw pb::ConfigError("--top-k " + std::to_string(moe.top_k) + " must be between 1 and --experts " + E);
    }
    if (!(moe.capacity_factor >= 0.0) || moe.capacity_factor > 1e6) {
      throw pb::ConfigError("--capacity-factor " + std::to_string(moe.capacity_factor) +
                            " must be 0 (no limit) or positive (at most 1e6)");
    }
    if (!(moe.aux_loss >= 0.0) || moe.aux_loss > 1e6) {
      throw pb::ConfigError("--aux-loss " + std::to_string(moe.aux_loss) + " must be 0 (none) or positive (at most 1e6)");
    }
    if (ep < 1) throw pb::ConfigError("--ep " + std::to_string(ep) + " must be at least 1");
    if (moe.experts % ep != 0) {
      throw pb::ConfigError("--experts " + E + " is not divisible by --ep " + std::to_string(ep) +
                            " (each rank of an ep group holds E/ep whole experts)");
    }
    if (o.dp % ep != 0) {
      throw pb::ConfigError("--ep " + std::to_string(ep) + " does not divide the data-parallel degree " +
                            std::to_string(o.dp) + " (ep groups are consecutive dp ranks)");
    }
    // The dispatch buffers: E·C slots of h values in one all-to-all (an int count).
    const int64_t slots = int64_t{moe.experts} * pb::moe_capacity(moe, int64_t{o.micro_batch} * o.model.seq);
    if (slots * o.model.hidden > (int64_t{1} << 31) - 1 || slots * o.model.ffn > (int64_t{1} << 31) - 1) {
      throw pb::ConfigError("--experts " + E + " × capacity × --hidden/--ffn is too large for one all-to-all");
    }
    if (ep > 1 && !o.dump_gradients.empty()) throw pb::ConfigError("--dump-gradients needs --ep 1");
  };
  app.options.describe = [&](nlohmann::ordered_json& config) {
    config["ep"] = ep;
    config["experts"] = moe.experts;
    config["top_k"] = moe.top_k;
    config["capacity_factor"] = moe.capacity_factor;
    config["aux_loss"] = moe.aux_loss;
  };
  app.layout = [&](const pb::Options& o) {
    pb::Layout layout{1, o.dp, 1, 1};
    layout.ep = ep;
    return layout;
  };
  app.predict_memory = [&](const pb::Options& o, const pb::MemoryPlan& base, int /*rank*/) {
    pb::MemoryPlan plan = base;
    pb::plan_moe_memory(plan, moe, ep, o.grad_accum);
    return pb::predict_memory(plan);
  };
  app.block_parts = [&](const pb::Options& o, pb::Backend& backend, const pb::ModelParallel& mp) {
    const float loss_scale = 1.0f / (static_cast<float>(o.global_batch) * o.model.seq);
    pb::OwnedBlockParts parts;
    auto part = std::make_unique<pb::MoeMlp>(o.model, moe, backend, mp.ep, o.micro_batch, o.grad_accum, loss_scale,
                                             pb::precision_of(o).compute);
    mlp = part.get();
    parts.mlp = std::move(part);
    return parts;
  };
  app.make_strategy = [&](pb::Runtime& runtime) {
    return std::make_unique<pb::ExpertParallelStrategy>(runtime, *mlp);
  };
  return pb::run_app(argc, argv, app);
}
