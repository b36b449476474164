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
  ConstTensorPtr unit_params(int unit) override { return state_.unit_params(unit); }
  TensorPtr unit_grads(int unit) override { return state_.unit_grads(unit); }

 private:
  ReplicatedState& state_;
};

struct Result {
  double loss;
  std::vector<float> grads;
};

constexpr int kMicroBatches = 3;

// Whole model, micro-batches one after another (with the given block parts, null: the defaults).
Result run_whole(const ModelConfig& m, int b, BlockParts parts = BlockParts{}, Backend* backend = nullptr,
                 const char* recompute = "none") {
  std::unique_ptr<Backend> own = backend ? nullptr : make_cpu_backend(1);
  Backend* be = backend ? backend : own.get();
  GptModel model(m, *be, b, recompute, ModelParallel{}, parts);
  ReplicatedState state(model, *be, 7, DType::f32);
  StateHooks hooks(state);
  SyntheticData data(7, m.vocab, m.seq);
  std::vector<int32_t> tok(b * m.seq), tgt(tok.size());
  for (int i = 0; i < kMicroBatches; ++i) {
    data.samples(i * b, b, tok.data(), tgt.data());
    model.forward_backward(tok.data(), tgt.data(), 0.01f, hooks);
  }
  Result r{model.take_loss(), std::vector<float>(state.size())};
  r.grads = download_fp32(*be, state.grads(), r.grads.size());
  return r;
}

// Two stages cut after `cut` units, all forwards first (GPipe order), backwards in reverse.
Result run_two_stages(const ModelConfig& m, int b, int cut) {
  auto be = make_cpu_backend(1);
  GptModel model(m, *be, b, "none");
  ReplicatedState state(model, *be, 7, DType::f32);
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
  r.grads = download_fp32(*be, state.grads(), r.grads.size());
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

// ---- the block's parts can be replaced (common/model.h: MlpPart, AttentionCore) -----------------------

// The dense MLP of SPEC section 2 written as a strategy would write its own part: the same tensor names
// (so the same initial values), the same backend calls. Counts its calls.
class MyDenseMlp final : public MlpPart {
 public:
  MyDenseMlp(const ModelConfig& m, Backend& be, int N) : m_(m), be_(be), N_(N) {}
  std::vector<TensorSpec> tensors() const override {
    return {{"mlp.fc1.w", m_.hidden, m_.ffn}, {"mlp.fc1.b", 1, m_.ffn}, {"mlp.fc2.w", m_.ffn, m_.hidden},
            {"mlp.fc2.b", 1, m_.hidden}};
  }
  int64_t global_parameters() const override { return 2 * int64_t{m_.hidden} * m_.ffn + m_.ffn + m_.hidden; }
  struct Saved final : PartState {
    explicit Saved(Backend& b) : be(b) {}
    ~Saved() override {
      be.free(a);
      be.free(z);
    }
    Backend& be;
    float *z = nullptr, *a = nullptr;
  };
  std::unique_ptr<PartState> forward(int layer, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) override {
    layers.push_back(layer);
    auto s = std::make_unique<Saved>(be_);
    const std::size_t n = static_cast<std::size_t>(N_) * m_.ffn;
    s->z = be_.alloc_floats(n, MemCategory::activations);
    s->a = be_.alloc_floats(n, MemCategory::activations);
    be_.matmul_forward(s->z, u, w[0], w[1], N_, m_.hidden, m_.ffn);
    be_.gelu_forward(s->a, s->z, n);
    be_.matmul_forward(out, s->a, w[2], w[3], N_, m_.ffn, m_.hidden);
    return s;
  }
  void backward(int layer, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u, ConstTensorPtr dout,
                TensorPtr du) override {
    layers.push_back(-1 - layer);
    auto& s = static_cast<Saved&>(state);
    const std::size_t n = static_cast<std::size_t>(N_) * m_.ffn;
    float* dz = be_.alloc_floats(n, MemCategory::workspace);
    be_.matmul_backward(dz, g[2], g[3], dout, s.a, w[2], N_, m_.ffn, m_.hidden);
    be_.gelu_backward(dz, s.z, dz, n);
    be_.matmul_backward(du, g[0], g[1], dz, u, w[0], N_, m_.hidden, m_.ffn);
    be_.free(dz);
  }
  std::vector<int> layers;  // forward: layer; backward: -1 - layer

 private:
  const ModelConfig& m_;
  Backend& be_;
  int N_;
};

// The backend's attention, counting its calls.
class CountingAttention final : public AttentionCore {
 public:
  explicit CountingAttention(Backend& be) : be_(be) {}
  std::size_t saved_floats(int B, int S, int heads) const override { return be_.attention_saved_floats(B, S, heads); }
  bool keeps_probabilities() const override { return be_.attention_keeps_probabilities(); }
  std::size_t scratch_floats(int B, int S, int heads) const override { return be_.attention_scratch_floats(B, S, heads); }
  void forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads, int kv_heads) override {
    ++forwards;
    be_.attention_gqa_forward(out, saved, qkv, B, S, C, heads, kv_heads);
  }
  void backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv, const float* saved,
                int B, int S, int C, int heads, int kv_heads) override {
    ++backwards;
    be_.attention_gqa_backward(dqkv, scratch, dout, out, qkv, saved, B, S, C, heads, kv_heads);
  }
  int forwards = 0, backwards = 0;

 private:
  Backend& be_;
};

TEST(BlockParts, AStrategysOwnPartsReplaceTheDefaultsBitForBit) {
  const ModelConfig m{"custom", 3, 24, 3, 9, 29, 50};
  const int b = 2;
  for (const char* recompute : {"none", "full"}) {
    const Result dense = run_whole(m, b, BlockParts{}, nullptr, recompute);
    auto be = make_cpu_backend(1);
    MyDenseMlp mlp(m, *be, b * m.seq);
    CountingAttention attention(*be);
    const Result swapped = run_whole(m, b, BlockParts{&mlp, &attention}, be.get(), recompute);
    EXPECT_EQ(swapped.loss, dense.loss) << recompute;
    EXPECT_EQ(swapped.grads, dense.grads) << recompute;
    // Every block's MLP ran forward then backward, in reverse order, once per micro-batch (full
    // recomputation runs each forward again inside backward).
    const int forwards = std::string(recompute) == "full" ? 2 : 1;
    EXPECT_EQ(static_cast<int>(mlp.layers.size()), kMicroBatches * m.layers * (forwards + 1)) << recompute;
    EXPECT_EQ(attention.forwards, kMicroBatches * m.layers * forwards) << recompute;
    EXPECT_EQ(attention.backwards, kMicroBatches * m.layers) << recompute;
    EXPECT_EQ(be->tracker().current(MemCategory::activations), 0) << "a part leaked activations";
  }
}

TEST(BlockParts, ExpertsAreWholeTensorsOfOneOwner) {
  // A part that declares experts: the units list them under their own names with their owner, whole,
  // and initialise them from their global index like any tensor (no slice).
  class TwoExperts final : public MlpPart {
   public:
    std::vector<TensorSpec> tensors() const override {
      return {{"moe.router.w", 8, 4}, {"moe.expert2.fc1.w", 8, 16, TpSplit::none, 2},
              {"moe.expert3.fc1.w", 8, 16, TpSplit::none, 3}};
    }
    int64_t global_parameters() const override { return 0; }
    std::unique_ptr<PartState> forward(int, const TensorPtr*, ConstTensorPtr, TensorPtr) override { return nullptr; }
    void backward(int, PartState&, const TensorPtr*, const TensorPtr*, ConstTensorPtr, ConstTensorPtr, TensorPtr) override {}
  } part;
  const ModelConfig m{"custom", 2, 8, 2, 4, 11, 16};
  const std::vector<UnitInfo> units = gpt_units(m, 1, 0, &part);
  ASSERT_EQ(units.size(), 4u);
  const std::vector<TensorInfo>& block = units[1].tensors;
  ASSERT_EQ(block.size(), 8u + 3u);
  EXPECT_EQ(block[8].name, "block0.moe.router.w");
  EXPECT_EQ(block[8].expert, -1);
  EXPECT_EQ(block[9].name, "block0.moe.expert2.fc1.w");
  EXPECT_EQ(block[9].expert, 2);
  EXPECT_EQ(block[10].expert, 3);
  EXPECT_EQ(block[10].numel(), 8u * 16u);
  EXPECT_EQ(block[10].global_index(1, 2), 18u);
  EXPECT_EQ(units[1].numel, block[10].offset + block[10].numel() - units[1].offset);
}

}  // namespace
}  // namespace pb
