// The model run as pipeline stages (GptModel::forward / backward over unit ranges, ARCHITECTURE
// seam 6) gives the losses and gradients of the whole model run at once, for any cut and any order
// of the micro-batches' forwards and backwards.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/data.h"
#include "common/model.h"
#include "kernels/cpu/cpu_backend.h"

namespace pb {
namespace {

class StateHooks final : public UnitHooks {
 public:
  explicit StateHooks(ReplicatedState& state) : state_(state) {}
  const float* unit_params(int unit) override { return state_.unit_params(unit); }
  float* unit_grads(int unit) override { return state_.unit_grads(unit); }

 private:
  ReplicatedState& state_;
};

struct Result {
  double loss;
  std::vector<float> grads;
};

constexpr int kMicroBatches = 3;

// Whole model, micro-batches one after another.
Result run_whole(const ModelConfig& m, int b) {
  auto be = make_cpu_backend(1);
  GptModel model(m, *be, b, "none");
  ReplicatedState state(model, *be, 7);
  StateHooks hooks(state);
  SyntheticData data(7, m.vocab, m.seq);
  std::vector<int32_t> tok(b * m.seq), tgt(tok.size());
  for (int i = 0; i < kMicroBatches; ++i) {
    data.samples(i * b, b, tok.data(), tgt.data());
    model.forward_backward(tok.data(), tgt.data(), 0.01f, hooks);
  }
  Result r{model.take_loss(), std::vector<float>(state.size())};
  be->download(r.grads.data(), state.grads(), r.grads.size() * sizeof(float));
  return r;
}

// Two stages cut after `cut` units, all forwards first (GPipe order), backwards in reverse.
Result run_two_stages(const ModelConfig& m, int b, int cut) {
  auto be = make_cpu_backend(1);
  GptModel model(m, *be, b, "none");
  ReplicatedState state(model, *be, 7);
  StateHooks hooks(state);
  SyntheticData data(7, m.vocab, m.seq);
  const GptModel::Stage first{0, cut - 1}, second{cut, -1};
  std::vector<std::vector<int32_t>> tok(kMicroBatches, std::vector<int32_t>(b * m.seq)), tgt = tok;
  std::vector<std::unique_ptr<GptModel::MicroBatch>> a(kMicroBatches), z(kMicroBatches);
  for (int i = 0; i < kMicroBatches; ++i) {
    data.samples(i * b, b, tok[i].data(), tgt[i].data());
    a[i] = model.forward(first, tok[i].data(), tgt[i].data(), nullptr, 0.01f, hooks);
    z[i] = model.forward(second, tok[i].data(), tgt[i].data(), a[i]->output(), 0.01f, hooks);
  }
  float* dboundary = be->alloc_floats(model.boundary_elements(), MemCategory::comm_buffers);
  for (int i = kMicroBatches - 1; i >= 0; --i) {
    model.backward(*z[i], nullptr, dboundary, hooks);
    model.backward(*a[i], dboundary, nullptr, hooks);
  }
  be->free(dboundary);
  Result r{model.take_loss(), std::vector<float>(state.size())};
  be->download(r.grads.data(), state.grads(), r.grads.size() * sizeof(float));
  EXPECT_EQ(be->tracker().current(MemCategory::activations), 0) << "a stage leaked activations";
  return r;
}

TEST(ModelStages, AnyCutGivesTheWholeModelsLossAndGradients) {
  const ModelConfig m{"custom", 3, 24, 3, 9, 29, 50};
  const Result whole = run_whole(m, 2);
  ASSERT_GT(whole.loss, 0.0);
  for (int cut = 1; cut <= m.layers + 1; ++cut) {  // after the embedding, after each block
    const Result staged = run_two_stages(m, 2, cut);
    EXPECT_NEAR(staged.loss, whole.loss, 1e-6 * whole.loss) << "cut " << cut;
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < whole.grads.size(); ++i) {
      diff += std::pow(staged.grads[i] - whole.grads[i], 2);
      norm += std::pow(whole.grads[i], 2);
    }
    ASSERT_GT(norm, 0.0);
    EXPECT_LE(std::sqrt(diff / norm), 1e-6) << "cut " << cut;
  }
}

}  // namespace
}  // namespace pb
