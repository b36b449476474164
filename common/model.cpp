#include "common/model.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/init.h"

namespace pb {
namespace {

// Tensor order inside a block unit (gpt_units lists them so).
enum BlockTensor {
  kLn1G, kLn1B, kQkvW, kQkvB, kOutW, kOutB, kLn2G, kLn2B, kFc1W, kFc1B, kFc2W, kFc2B, kNumBlockTensors
};
enum EmbedTensor { kTok, kPos };
enum HeadTensor { kLnfG, kLnfB, kHeadW };

}  // namespace

std::vector<UnitInfo> gpt_units(const ModelConfig& m) {
  const int64_t h = m.hidden, f = m.ffn, V = m.vocab, S = m.seq;
  std::vector<UnitInfo> units;
  std::size_t offset = 0;
  auto add_unit = [&](const std::string& name, const std::string& prefix,
                      std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> shapes) {
    UnitInfo u;
    u.name = name;
    u.offset = offset;
    for (auto& [tname, shape] : shapes) {
      TensorInfo t;
      t.name = prefix + tname;
      t.rows = shape.first;
      t.cols = shape.second;
      t.is_matrix = shape.first > 1;
      t.offset = offset;
      offset += t.numel();
      u.tensors.push_back(t);
    }
    u.numel = offset - u.offset;
    units.push_back(std::move(u));
  };
  add_unit("embed", "embed.", {{"tok", {V, h}}, {"pos", {S, h}}});
  for (int l = 0; l < m.layers; ++l) {
    add_unit("block" + std::to_string(l), "block" + std::to_string(l) + ".",
             {{"ln1.g", {1, h}},     {"ln1.b", {1, h}},     {"attn.qkv.w", {h, 3 * h}}, {"attn.qkv.b", {1, 3 * h}},
              {"attn.out.w", {h, h}}, {"attn.out.b", {1, h}}, {"ln2.g", {1, h}},          {"ln2.b", {1, h}},
              {"mlp.fc1.w", {h, f}},  {"mlp.fc1.b", {1, f}},  {"mlp.fc2.w", {f, h}},      {"mlp.fc2.b", {1, h}}});
  }
  add_unit("head", "", {{"final_ln.g", {1, h}}, {"final_ln.b", {1, h}}, {"head.w", {h, V}}});
  return units;
}

std::size_t gpt_num_parameters(const ModelConfig& config) {
  const auto units = gpt_units(config);
  return units.back().offset + units.back().numel;
}

// What one block's backward needs, saved by its forward (all under `activations`).
struct GptModel::BlockActs {
  float* ln1_mean = nullptr;  // (N)
  float* ln1_rstd = nullptr;  // (N)
  float* ln1_out = nullptr;   // (N, h)
  float* qkv = nullptr;       // (N, 3h)
  float* att = nullptr;       // backend-specific: attention_saved_floats (not kept by selective recompute)
  float* att_out = nullptr;   // (N, h), heads concatenated, before the output projection
  float* x_mid = nullptr;     // (N, h), residual stream after attention
  float* ln2_mean = nullptr;  // (N)
  float* ln2_rstd = nullptr;  // (N)
  float* ln2_out = nullptr;   // (N, h)
  float* fc1_out = nullptr;   // (N, f), before GELU
  float* gelu_out = nullptr;  // (N, f)
  float* x_out = nullptr;     // (N, h), the block's output = next block's input
};

struct GptModel::HeadActs {
  float* lnf_mean;  // (N)
  float* lnf_rstd;  // (N)
  float* lnf_out;   // (N, h)
  float* logits;    // (N, V), overwritten by dlogits
};

// Backward scratch, shared by all blocks of one micro-batch (under `workspace`).
struct BackwardScratch {
  float* dres;    // (N, h): gradient of the residual stream
  float* dln;     // (N, h): gradient w.r.t. a LayerNorm output
  float* datt;    // (N, h): gradient w.r.t. the attention output
  float* dqkv;    // (N, 3h)
  float* dfc;     // (N, f)
  float* att;     // attention_scratch_floats
};

void init_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                     float* dst, uint64_t seed, int num_layers) {
  std::vector<float> values;
  for_each_tensor_piece(units, first, count, [&](std::size_t pos, std::size_t len, const TensorInfo& t, std::size_t index) {
    values.resize(len);
    init_values(values.data(), seed, t.name, num_layers, index, len);
    backend.upload(dst + pos, values.data(), len * sizeof(float));
  });
}

void adamw_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                      float* params, const float* grads, float* m, float* v, float grad_scale, int t, double lr) {
  constexpr float kBeta1 = 0.9f, kBeta2 = 0.95f, kEps = 1e-8f, kWeightDecay = 0.1f;
  for_each_tensor_piece(units, first, count, [&](std::size_t pos, std::size_t len, const TensorInfo& tensor, std::size_t) {
    backend.adamw_update(params + pos, grads + pos, m + pos, v + pos, len, static_cast<float>(lr), kBeta1, kBeta2,
                         kEps, tensor.is_matrix ? kWeightDecay : 0.0f, t, grad_scale);
  });
}

GptModel::GptModel(const ModelConfig& config, Backend& backend, int micro_batch, const std::string& recompute)
    : config_(config), backend_(backend), micro_batch_(micro_batch), units_(gpt_units(config)) {
  recompute_ = recompute == "full" ? Recompute::full : recompute == "selective" ? Recompute::selective : Recompute::none;
  num_params_ = units_.back().offset + units_.back().numel;
  loss_sum_ = static_cast<double*>(backend_.alloc(sizeof(double), MemCategory::workspace));
  backend_.zero(loss_sum_, sizeof(double));
}

GptModel::~GptModel() { backend_.free(loss_sum_); }

std::vector<float*> GptModel::unit_tensors(const float* base, int unit) const {
  std::vector<float*> out;
  for (const TensorInfo& t : units_[unit].tensors) out.push_back(const_cast<float*>(base) + (t.offset - units_[unit].offset));
  return out;
}

double GptModel::take_loss() {
  double loss = 0.0;
  backend_.download(&loss, loss_sum_, sizeof(double));
  backend_.zero(loss_sum_, sizeof(double));
  return loss;
}

void GptModel::alloc_block(BlockActs& a, bool with_attention) {
  const std::size_t N = static_cast<std::size_t>(micro_batch_) * config_.seq, h = config_.hidden, f = config_.ffn;
  auto act = [&](std::size_t count) { return backend_.alloc_floats(count, MemCategory::activations); };
  a.ln1_mean = act(N);
  a.ln1_rstd = act(N);
  a.ln1_out = act(N * h);
  a.qkv = act(3 * N * h);
  a.att = with_attention ? act(backend_.attention_saved_floats(micro_batch_, config_.seq, config_.heads)) : nullptr;
  a.att_out = act(N * h);
  a.x_mid = act(N * h);
  a.ln2_mean = act(N);
  a.ln2_rstd = act(N);
  a.ln2_out = act(N * h);
  a.fc1_out = act(N * f);
  a.gelu_out = act(N * f);
  a.x_out = act(N * h);
}

void GptModel::free_block(BlockActs& a) {
  for (float* p : {a.x_out, a.gelu_out, a.fc1_out, a.ln2_out, a.ln2_rstd, a.ln2_mean, a.x_mid, a.att_out, a.att,
                   a.qkv, a.ln1_out, a.ln1_rstd, a.ln1_mean}) {
    backend_.free(p);
  }
  a = BlockActs{};
}

void GptModel::block_forward(const float* const* w, const float* x_in, BlockActs& a) {
  const int B = micro_batch_, S = config_.seq, h = config_.hidden, f = config_.ffn, N = B * S;
  Backend& be = backend_;
  // u = LayerNorm(x); qkv = u·Wqkv + b                                  (N, 3h)
  be.layernorm_forward(a.ln1_out, a.ln1_mean, a.ln1_rstd, x_in, w[kLn1G], w[kLn1B], N, h);
  be.matmul_forward(a.qkv, a.ln1_out, w[kQkvW], w[kQkvB], N, h, 3 * h);
  // o = causal softmax(Q Kᵀ/√d) V per head                             (N, h)
  be.attention_forward(a.att_out, a.att, a.qkv, B, S, h, config_.heads);
  // x_mid = x + o·Wout + b  (the projection goes to x_mid, then the residual is added)
  be.matmul_forward(a.x_mid, a.att_out, w[kOutW], w[kOutB], N, h, h);
  be.add(a.x_mid, a.x_mid, x_in, static_cast<std::size_t>(N) * h);
  // x_out = x_mid + gelu(LayerNorm(x_mid)·W1 + b1)·W2 + b2
  be.layernorm_forward(a.ln2_out, a.ln2_mean, a.ln2_rstd, a.x_mid, w[kLn2G], w[kLn2B], N, h);
  be.matmul_forward(a.fc1_out, a.ln2_out, w[kFc1W], w[kFc1B], N, h, f);
  be.gelu_forward(a.gelu_out, a.fc1_out, static_cast<std::size_t>(N) * f);
  be.matmul_forward(a.x_out, a.gelu_out, w[kFc2W], w[kFc2B], N, f, h);
  be.add(a.x_out, a.x_out, a.x_mid, static_cast<std::size_t>(N) * h);
}

void GptModel::forward_backward(const int32_t* tokens_host, const int32_t* targets_host, float scale,
                                UnitHooks& hooks) {
  Backend& be = backend_;
  const int L = config_.layers, B = micro_batch_, S = config_.seq, h = config_.hidden, f = config_.ffn,
            V = config_.vocab, a = config_.heads;
  const int N = B * S;
  const std::size_t Nh = static_cast<std::size_t>(N) * h, Nf = static_cast<std::size_t>(N) * f;
  const int head_unit = L + 1;
  auto act = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::activations); };
  auto scratch = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::workspace); };

  // ---- forward -----------------------------------------------------------------------------------
  auto* tokens = static_cast<int32_t*>(be.alloc(N * sizeof(int32_t), MemCategory::activations));
  auto* targets = static_cast<int32_t*>(be.alloc(N * sizeof(int32_t), MemCategory::activations));
  be.upload(tokens, tokens_host, N * sizeof(int32_t));
  be.upload(targets, targets_host, N * sizeof(int32_t));

  hooks.before_forward(0);
  const std::vector<float*> emb = unit_tensors(hooks.unit_params(0), 0);
  float* x0 = act(Nh);  // (N, h)
  be.embedding_forward(x0, tokens, emb[kTok], emb[kPos], B, S, h);
  hooks.after_forward(0);

  // Each block keeps what its backward needs: everything (none), everything but the attention
  // probabilities (selective), or only its output, the next block's input (full).
  std::vector<BlockActs> blocks(L);
  const float* x = x0;
  for (int l = 0; l < L; ++l) {
    hooks.before_forward(1 + l);
    const std::vector<float*> w = unit_tensors(hooks.unit_params(1 + l), 1 + l);
    BlockActs& ba = blocks[l];
    alloc_block(ba, /*with_attention=*/true);
    block_forward(w.data(), x, ba);
    if (recompute_ == Recompute::selective) {
      be.free(ba.att);
      ba.att = nullptr;
    } else if (recompute_ == Recompute::full) {
      float* out = ba.x_out;
      ba.x_out = nullptr;
      free_block(ba);
      ba.x_out = out;
    }
    x = ba.x_out;
    hooks.after_forward(1 + l);
  }

  hooks.before_forward(head_unit);
  const std::vector<float*> hw = unit_tensors(hooks.unit_params(head_unit), head_unit);
  HeadActs ha;
  ha.lnf_mean = act(N);
  ha.lnf_rstd = act(N);
  ha.lnf_out = act(Nh);
  ha.logits = act(static_cast<std::size_t>(N) * V);
  be.layernorm_forward(ha.lnf_out, ha.lnf_mean, ha.lnf_rstd, x, hw[kLnfG], hw[kLnfB], N, h);
  be.matmul_forward(ha.logits, ha.lnf_out, hw[kHeadW], nullptr, N, h, V);  // (N, V), no bias
  // loss += scale · Σ CE; logits become dlogits = scale · (softmax − onehot)
  be.cross_entropy_forward_backward(ha.logits, loss_sum_, targets, N, V, scale);
  hooks.after_forward(head_unit);

  // ---- backward ----------------------------------------------------------------------------------
  BackwardScratch sc;
  sc.dres = scratch(Nh);
  sc.dln = scratch(Nh);
  sc.datt = scratch(Nh);
  sc.dqkv = scratch(3 * Nh);
  sc.dfc = scratch(Nf);
  sc.att = scratch(be.attention_scratch_floats(B, S, a));
  float* dres = sc.dres;

  hooks.before_backward(head_unit);
  {
    const std::vector<float*> w = unit_tensors(hooks.unit_params(head_unit), head_unit);
    const std::vector<float*> g = unit_tensors(hooks.unit_grads(head_unit), head_unit);
    be.matmul_backward(sc.dln, g[kHeadW], nullptr, ha.logits, ha.lnf_out, w[kHeadW], N, h, V);
    be.zero(dres, Nh * sizeof(float));
    be.layernorm_backward(dres, g[kLnfG], g[kLnfB], sc.dln, x, w[kLnfG], ha.lnf_mean, ha.lnf_rstd, N, h);
  }
  for (float* p : {ha.logits, ha.lnf_out, ha.lnf_rstd, ha.lnf_mean}) be.free(p);
  hooks.after_backward(head_unit);
  hooks.grad_ready(head_unit);

  for (int l = L - 1; l >= 0; --l) {
    const int unit = 1 + l;
    hooks.before_backward(unit);
    const float* x_in = l > 0 ? blocks[l - 1].x_out : x0;
    const std::vector<float*> w = unit_tensors(hooks.unit_params(unit), unit);
    const std::vector<float*> g = unit_tensors(hooks.unit_grads(unit), unit);
    BlockActs& ba = blocks[l];
    float* recomputed_out = nullptr;  // selective recompute's copy of the attention output
    if (recompute_ == Recompute::full) {
      // Run the block's forward again from its input; its saved output is no longer needed.
      be.free(ba.x_out);
      alloc_block(ba, /*with_attention=*/true);
      block_forward(w.data(), x_in, ba);
    } else if (recompute_ == Recompute::selective) {
      // Recompute only the attention scores and softmax (Korthikanti et al. 2022).
      ba.att = act(be.attention_saved_floats(B, S, a));
      recomputed_out = act(Nh);
      be.attention_forward(recomputed_out, ba.att, ba.qkv, B, S, h, a);
    }
    // dres = d x_out. MLP branch: x_out = x_mid + gelu(ln2(x_mid)·W1 + b1)·W2 + b2
    be.matmul_backward(sc.dfc, g[kFc2W], g[kFc2B], dres, ba.gelu_out, w[kFc2W], N, f, h);
    be.gelu_backward(sc.dfc, ba.fc1_out, sc.dfc, Nf);
    be.matmul_backward(sc.dln, g[kFc1W], g[kFc1B], sc.dfc, ba.ln2_out, w[kFc1W], N, h, f);
    // LayerNorm backward accumulates into dres: dres = d x_mid (residual + MLP branch)
    be.layernorm_backward(dres, g[kLn2G], g[kLn2B], sc.dln, ba.x_mid, w[kLn2G], ba.ln2_mean, ba.ln2_rstd, N, h);
    // Attention branch: x_mid = x_in + attn(ln1(x_in))·Wout + bout
    be.matmul_backward(sc.datt, g[kOutW], g[kOutB], dres, ba.att_out, w[kOutW], N, h, h);
    be.attention_backward(sc.dqkv, sc.att, sc.datt, ba.qkv, ba.att, B, S, h, a);
    be.matmul_backward(sc.dln, g[kQkvW], g[kQkvB], sc.dqkv, ba.ln1_out, w[kQkvW], N, h, 3 * h);
    // dres = d x_in
    be.layernorm_backward(dres, g[kLn1G], g[kLn1B], sc.dln, x_in, w[kLn1G], ba.ln1_mean, ba.ln1_rstd, N, h);
    be.free(recomputed_out);
    free_block(ba);
    hooks.after_backward(unit);
    hooks.grad_ready(unit);
  }

  hooks.before_backward(0);
  const std::vector<float*> eg = unit_tensors(hooks.unit_grads(0), 0);
  be.embedding_backward(eg[kTok], eg[kPos], dres, tokens, B, S, h);
  be.free(x0);
  be.free(targets);
  be.free(tokens);
  hooks.after_backward(0);
  hooks.grad_ready(0);

  for (float* p : {sc.att, sc.dfc, sc.dqkv, sc.datt, sc.dln, sc.dres}) be.free(p);
}

ReplicatedState::ReplicatedState(const GptModel& model, Backend& backend, uint64_t seed)
    : backend_(backend), units_(model.units()), n_(model.num_parameters()) {
  params_ = backend_.alloc_floats(n_, MemCategory::parameters);
  grads_ = backend_.alloc_floats(n_, MemCategory::gradients);
  m_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  v_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  init_flat_range(backend_, units_, 0, n_, params_, seed, model.config().layers);
  for (float* p : {grads_, m_, v_}) backend_.zero(p, n_ * sizeof(float));
}

ReplicatedState::~ReplicatedState() {
  for (float* p : {v_, m_, grads_, params_}) backend_.free(p);
}

void ReplicatedState::zero_grads() { backend_.zero(grads_, n_ * sizeof(float)); }

void ReplicatedState::adamw(float grad_scale, int t, double lr) {
  adamw_flat_range(backend_, units_, 0, n_, params_, grads_, m_, v_, grad_scale, t, lr);
}

}  // namespace pb
