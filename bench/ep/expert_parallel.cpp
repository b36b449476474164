#include "bench/ep/expert_parallel.h"

#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

namespace pb {

ExpertParallelStrategy::ExpertParallelStrategy(Runtime& runtime, MoeMlp& moe, std::vector<int> held)
    : rt_(runtime), moe_(moe),
      state_(runtime.model, runtime.backend, runtime.options.seed, runtime.precision.grads, std::move(held)) {
  ProcessGroups& g = runtime.groups;
  stats_group_ = g.layout.tp * g.layout.pp == 1 ? g.dp.get()
                                                 : g.adopt(g.world->split(g.coord.tp, g.layout.rank_of(g.coord)), "moe_stats");
  // The flat buffer alternates replicated tensors and experts (each block: LayerNorms, attention and
  // router, then its experts): one reduction per run of the same kind.
  state_.for_each_tensor([&](const TensorInfo& t, std::size_t at) {
    const bool experts = t.expert >= 0;
    if (!runs_.empty() && runs_.back().experts == experts && runs_.back().first + runs_.back().count == at) {
      runs_.back().count += t.numel();
    } else {
      runs_.push_back(Run{at, t.numel(), experts});
    }
  });
}

void ExpertParallelStrategy::finish_gradients() {
  // Replicated tensors: every dp rank computed them from its own samples. Experts: each holder's
  // gradient covers its ep group's tokens; the holders of the same experts (dp / ep) sum them.
  Communicator* dp = rt_.groups.dp.get();
  Communicator* expert_dp = rt_.mp.ep.active() ? rt_.mp.ep.expert_dp : dp;
  for (const Run& r : runs_) {
    Communicator* group = r.experts ? expert_dp : dp;
    if (group->size() > 1) group->all_reduce(state_.grads() + r.first, r.count);
  }
  // The step's routing statistics over the global batch (control values, not accounted in /comm).
  pending_ = moe_.take_step_stats();
  std::vector<double> v(pending_.kept.begin(), pending_.kept.end());
  v.insert(v.end(), pending_.dropped.begin(), pending_.dropped.end());
  v.push_back(pending_.aux_loss);
  stats_group_->all_reduce_host(v.data(), static_cast<int>(v.size()), HostReduce::sum);
  const std::size_t nk = pending_.kept.size(), nd = pending_.dropped.size();
  for (std::size_t i = 0; i < nk; ++i) pending_.kept[i] = static_cast<int64_t>(v[i]);
  for (std::size_t i = 0; i < nd; ++i) pending_.dropped[i] = static_cast<int64_t>(v[nk + i]);
  pending_.aux_loss = v.back();
}

void ExpertParallelStrategy::optimizer_step(float grad_scale, int t) {
  state_.adamw(grad_scale, t, rt_.options.lr);
  // The step is done: its statistics join the record.
  kept_.insert(kept_.end(), pending_.kept.begin(), pending_.kept.end());
  dropped_.insert(dropped_.end(), pending_.dropped.begin(), pending_.dropped.end());
  aux_loss_.push_back(pending_.aux_loss);
}

double ExpertParallelStrategy::sum_squares(ConstTensorPtr base) {
  // Experts are whole on every tp rank (each computes the same tokens' experts); attention and the
  // embeddings may be tensor-parallel slices.
  enum { kExperts, kSliced, kReplicated };
  std::vector<Backend::SquaresPiece> pieces;
  state_.for_each_tensor([&](const TensorInfo& t, std::size_t at) {
    const int bin = t.expert >= 0 ? kExperts : t.split != TpSplit::none ? kSliced : kReplicated;
    pieces.push_back({base + at, t.numel(), bin});
  });
  double sums[3];
  rt_.backend.sum_squares(sums, 3, pieces);
  if (rt_.mp.ep.active()) rt_.mp.ep.comm->all_reduce_host(&sums[kExperts], 1, HostReduce::sum);
  if (rt_.mp.tp.active()) rt_.mp.tp.comm->all_reduce_host(&sums[kSliced], 1, HostReduce::sum);
  return sums[kExperts] + sums[kSliced] + sums[kReplicated];
}

double ExpertParallelStrategy::global_grad_sum_squares() { return sum_squares(state_.grads()); }

double ExpertParallelStrategy::global_param_sum_squares() { return sum_squares(state_.master()); }

std::vector<float> ExpertParallelStrategy::gather_full_gradients() {
  if (rt_.mp.ep.active()) throw std::logic_error("--dump-gradients needs --ep 1");  // rejected by validation
  return download_fp32(rt_.backend, state_.grads(), state_.size());
}

double ExpertParallelStrategy::imbalance() const {
  const int L = rt_.options.model.layers;
  const std::size_t E = moe_.experts();
  double worst = 0.0;
  for (int l = 0; l < L && E > 0; ++l) {
    std::vector<int64_t> total(E, 0);
    for (std::size_t s = 0; s < aux_loss_.size(); ++s) {
      for (std::size_t e = 0; e < E; ++e) total[e] += kept_[(s * L + l) * E + e];
    }
    int64_t sum = 0, max = 0;
    for (int64_t t : total) {
      sum += t;
      max = std::max(max, t);
    }
    if (sum > 0) worst = std::max(worst, static_cast<double>(max) * static_cast<double>(E) / static_cast<double>(sum));
  }
  return worst;
}

void ExpertParallelStrategy::write_results(Communicator&, ResultWriter* writer) {
  if (writer == nullptr) return;
  const int64_t steps = static_cast<int64_t>(aux_loss_.size()), L = rt_.options.model.layers;
  const int64_t E = moe_.experts();
  writer->write_i64("/moe/tokens_per_expert", kept_, "tokens", {steps, L, E});
  writer->set_dataset_attribute("/moe/tokens_per_expert", "imbalance", imbalance());
  writer->write_i64("/moe/dropped", dropped_, "assignments", {steps, L});
  writer->write_f64("/moe/aux_loss", aux_loss_, "1", {steps});
}

void ExpertParallelStrategy::summary_attributes(nlohmann::ordered_json& summary) {
  summary["moe_imbalance"] = imbalance();
  int64_t dropped = 0, routed = 0;
  for (int64_t d : dropped_) dropped += d;
  for (int64_t k : kept_) routed += k;
  routed += dropped;
  summary["moe_dropped_fraction"] = routed > 0 ? static_cast<double>(dropped) / static_cast<double>(routed) : 0.0;
}

}  // namespace pb
