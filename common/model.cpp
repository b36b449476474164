#include "common/model.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/init.h"
#include "kernels/cpu/bf16.h"

namespace pb {
namespace {

// Tensor order inside a block unit (gpt_units lists them so).
// A block unit's tensors: these eight, then the MLP part's (w + kMlp).
enum BlockTensor { kLn1G, kLn1B, kQkvW, kQkvB, kOutW, kOutB, kLn2G, kLn2B, kMlp };
enum DenseMlpTensor { kFc1W, kFc1B, kFc2W, kFc2B };
enum SwiGluTensor { kGateW, kUpW, kDownW };
enum EmbedTensor { kTok, kPos };
enum HeadTensor { kLnfG, kLnfB, kHeadW };

}  // namespace

bool TensorInfo::partial_under_sequence_parallel() const {
  return name.find("ln1.") != std::string::npos || name.find("ln2.") != std::string::npos ||
         name.rfind("final_ln.", 0) == 0;
}

namespace {
// The global row and column of a tensor's local element [r][c].
std::pair<int64_t, int64_t> global_position(const TensorInfo& t, int64_t r, int64_t c) {
  switch (t.split) {
    case TpSplit::none: return {r, c};
    case TpSplit::columns: return {r, t.tp_rank * t.cols + c};
    case TpSplit::rows: return {t.tp_rank * t.rows + r, c};
    case TpSplit::qkv_columns: {
      // Local columns are [Q | K | V] of this rank's query and key/value heads: each block's share of
      // the global block, at tp_rank times its width.
      const int64_t kv = t.kv_cols > 0 ? t.kv_cols : t.global_cols / 3, q = t.global_cols - 2 * kv;
      const int64_t ql = q / t.tp_size, kl = kv / t.tp_size;
      if (c < ql) return {r, t.tp_rank * ql + c};
      if (c < ql + kl) return {r, q + t.tp_rank * kl + (c - ql)};
      return {r, q + kv + t.tp_rank * kl + (c - ql - kl)};
    }
  }
  return {r, c};
}
}  // namespace

bool TensorInfo::is_padding(int64_t r, int64_t c) const {
  const auto [gr, gc] = global_position(*this, r, c);
  return gr >= global_rows || gc >= global_cols;
}

uint64_t TensorInfo::global_index(int64_t r, int64_t c) const {
  const auto [gr, gc] = global_position(*this, r, c);
  return static_cast<uint64_t>(gr * global_cols + gc);
}

namespace {
// The block's own MLP: SPEC 2's GELU MLP, or SPEC 2.5's SwiGLU (gate and up column-, down row-parallel).
std::vector<TensorSpec> dense_mlp_tensors(const ModelConfig& m) {
  const int64_t h = m.hidden, f = m.ffn;
  using T = TpSplit;
  if (m.llama()) return {{"mlp.gate.w", h, f, T::columns}, {"mlp.up.w", h, f, T::columns}, {"mlp.down.w", f, h, T::rows}};
  return {{"mlp.fc1.w", h, f, T::columns}, {"mlp.fc1.b", 1, f, T::columns},
          {"mlp.fc2.w", f, h, T::rows},    {"mlp.fc2.b", 1, h, T::none}};
}
int64_t spec_parameters(const std::vector<TensorSpec>& specs) {
  int64_t n = 0;
  for (const TensorSpec& t : specs) n += t.rows * t.cols;
  return n;
}
}  // namespace

std::vector<UnitInfo> gpt_units(const ModelConfig& m, int tp, int tp_rank, const MlpPart* mlp) {
  const int64_t h = m.hidden, V = m.vocab, Vp = m.padded_vocab(tp), S = m.seq;
  std::vector<UnitInfo> units;
  std::size_t offset = 0;
  auto add_unit = [&](const std::string& name, const std::string& prefix, const std::vector<TensorSpec>& specs) {
    UnitInfo u;
    u.name = name;
    u.offset = offset;
    for (const TensorSpec& sp : specs) {
      TensorInfo t;
      t.name = prefix + sp.name;
      t.global_rows = sp.rows;
      t.global_cols = sp.cols;
      t.padded_rows = sp.padded_rows > 0 ? sp.padded_rows : sp.rows;
      t.padded_cols = sp.padded_cols > 0 ? sp.padded_cols : sp.cols;
      t.rows = sp.split == TpSplit::rows ? t.padded_rows / tp : t.padded_rows;
      t.cols = sp.split == TpSplit::columns || sp.split == TpSplit::qkv_columns ? t.padded_cols / tp : t.padded_cols;
      t.split = tp > 1 ? sp.split : TpSplit::none;
      t.tp_size = tp;
      t.tp_rank = tp_rank;
      t.expert = sp.expert;
      t.kv_cols = sp.kv_cols;
      t.is_matrix = sp.rows > 1;
      t.offset = offset;
      offset += t.numel();
      u.tensors.push_back(t);
    }
    u.numel = offset - u.offset;
    units.push_back(std::move(u));
  };
  using T = TpSplit;
  std::vector<TensorSpec> block;
  if (m.llama()) {  // SPEC 2.5: no biases, RMSNorm's gains only, [Q | K | V] with kv key/value heads
    const int64_t kv_cols = int64_t{m.kv()} * m.head_dim();
    block = {{"ln1.g", 1, h, T::none},
             {"attn.qkv.w", h, m.qkv_width(), T::qkv_columns, -1, 0, 0, kv_cols},
             {"attn.out.w", h, h, T::rows},
             {"ln2.g", 1, h, T::none}};
  } else {
    block = {{"ln1.g", 1, h, T::none},          {"ln1.b", 1, h, T::none},
             {"attn.qkv.w", h, 3 * h, T::qkv_columns}, {"attn.qkv.b", 1, 3 * h, T::qkv_columns},
             {"attn.out.w", h, h, T::rows},      {"attn.out.b", 1, h, T::none},
             {"ln2.g", 1, h, T::none},          {"ln2.b", 1, h, T::none}};
  }
  for (const TensorSpec& t : mlp ? mlp->tensors() : dense_mlp_tensors(m)) block.push_back(t);
  if (m.llama()) {  // rotary positions: no position table
    add_unit("embed", "embed.", {{"tok", V, h, T::rows, -1, Vp, 0}});
  } else {
    add_unit("embed", "embed.", {{"tok", V, h, T::rows, -1, Vp, 0}, {"pos", S, h, T::none}});
  }
  for (int l = 0; l < m.layers; ++l) add_unit("block" + std::to_string(l), "block" + std::to_string(l) + ".", block);
  if (m.llama()) {
    add_unit("head", "", {{"final_ln.g", 1, h, T::none}, {"head.w", h, V, T::columns, -1, 0, Vp}});
  } else {
    add_unit("head", "",
             {{"final_ln.g", 1, h, T::none}, {"final_ln.b", 1, h, T::none}, {"head.w", h, V, T::columns, -1, 0, Vp}});
  }
  return units;
}

std::size_t gpt_num_parameters(const ModelConfig& config, const MlpPart* mlp) {
  std::size_t n = 0;  // the spec's tensors: the vocabulary's padding is storage, not parameters
  for (const UnitInfo& u : gpt_units(config)) {
    for (const TensorInfo& t : u.tensors) n += static_cast<std::size_t>(t.global_rows * t.global_cols);
  }
  if (mlp) {  // the dense MLP's parameters replaced by the part's
    const int64_t dense = spec_parameters(dense_mlp_tensors(config));
    n += static_cast<std::size_t>(config.layers) * static_cast<std::size_t>(mlp->global_parameters() - dense);
  }
  return n;
}

// ---- tensor- and sequence-parallel plumbing of a layer (identities at tp = 1) --------------------------

// Megatron's f and g around a column-parallel / row-parallel pair, with sequence parallelism's
// all-gather and reduce-scatter in their place when it is on. N tokens of the micro-batch, `rows` of
// them in the residual stream on this rank (N / tp with sequence parallelism).
class TpLayers {
 public:
  TpLayers(Backend& backend, const TensorParallel& tp, int N, int rows, int hidden, DType dtype)
      : be_(backend), tp_(tp), N_(N), rows_(rows), h_(hidden), dtype_(dtype) {}

  // The input of a column-parallel layer: the rows of this rank (tp = 1, or tp without sequence
  // parallelism), or every rank's rows gathered into a communication buffer (sequence parallel).
  ConstTensorPtr column_input(ConstTensorPtr rows) const {
    if (!tp_.sequence_parallel) return rows;  // f: identity in forward
    TensorPtr full = be_.alloc_tensor(static_cast<std::size_t>(N_) * h_, dtype_, MemCategory::comm_buffers);
    tp_.gather_from_sp(rows, full, static_cast<std::size_t>(rows_) * h_);
    return full;
  }
  void release_column_input(ConstTensorPtr input, ConstTensorPtr rows) const {
    if (input != rows) be_.free(input);
  }
  // A row-parallel layer: out = inp · w (+ bias, added once: by tp rank 0), summed over the tp group
  // into out (N, h), or reduce-scattered into this rank's rows (sequence parallel).
  void row_parallel_forward(TensorPtr out, ConstTensorPtr inp, ConstTensorPtr w, ConstTensorPtr bias, int in_cols) const {
    const ConstTensorPtr once = tp_.rank == 0 ? bias : nullptr;  // the sum over ranks adds the bias once
    if (!tp_.sequence_parallel) {
      be_.matmul_forward(out, inp, w, once, N_, in_cols, h_);
      tp_.reduce_from_tp(out, static_cast<std::size_t>(N_) * h_);  // g
      return;
    }
    TensorPtr partial = be_.alloc_tensor(static_cast<std::size_t>(N_) * h_, dtype_, MemCategory::comm_buffers);
    be_.matmul_forward(partial, inp, w, once, N_, in_cols, h_);
    tp_.scatter_to_sp(partial, out, static_cast<std::size_t>(rows_) * h_);
    be_.free(partial);
  }
  // Backward of the pair: the output gradient of this rank's rows, made whole again (N, h).
  ConstTensorPtr row_parallel_output_grad(ConstTensorPtr drows) const {
    return column_input(drows);  // backward of reduce-scatter: all-gather (g's backward: identity)
  }
  // The input gradient of a column-parallel layer, summed over the tp group (f) into drows.
  void column_input_grad(TensorPtr dfull, TensorPtr drows) const {
    if (tp_.sequence_parallel) {
      tp_.scatter_to_sp(dfull, drows, static_cast<std::size_t>(rows_) * h_);  // backward of all-gather
    } else {
      tp_.copy_to_tp_backward(dfull, static_cast<std::size_t>(N_) * h_);  // f
    }
  }
  // Where a column-parallel layer's input gradient (N, h) goes before column_input_grad: drows itself
  // without sequence parallelism, else the backward's (N, h) scratch that the model lends for the
  // duration of its backward (lend_full_grad), or a buffer of its own (release with release_full_grad).
  TensorPtr full_grad(TensorPtr drows) const {
    if (!tp_.sequence_parallel) return drows;
    return lent_ ? lent_ : be_.alloc_tensor(static_cast<std::size_t>(N_) * h_, dtype_, MemCategory::workspace);
  }
  void release_full_grad(TensorPtr dfull, TensorPtr drows) const {
    if (dfull != drows && dfull != lent_) be_.free(dfull);
  }
  void lend_full_grad(TensorPtr scratch) { lent_ = scratch; }
  DType dtype() const { return dtype_; }

 private:
  Backend& be_;
  const TensorParallel& tp_;
  int N_, rows_, h_;
  DType dtype_;
  TensorPtr lent_;
};

namespace {

// The block's own MLP (dense_mlp_tensors), over the N tokens of a micro-batch, f/tp of its width on this
// tp rank.
class OwnMlp : public MlpPart {
 public:
  OwnMlp(const ModelConfig& m, Backend& backend, const TpLayers& tp, int N, int tp_size)
      : m_(m), be_(backend), tp_(tp), N_(N), fl_(m.ffn / tp_size) {}
  std::vector<TensorSpec> tensors() const override { return dense_mlp_tensors(m_); }
  int64_t global_parameters() const override { return spec_parameters(dense_mlp_tensors(m_)); }

 protected:
  const ModelConfig& m_;
  Backend& be_;
  const TpLayers& tp_;
  int N_, fl_;
};

// The MLP of SPEC section 2: gelu_tanh(u·fc1.w + fc1.b)·fc2.w + fc2.b, fc1 column- and fc2
// row-parallel over the tp group.
class DenseMlp final : public OwnMlp {
 public:
  using OwnMlp::OwnMlp;

  struct Saved final : PartState {
    explicit Saved(Backend& backend) : be(backend) {}
    ~Saved() override {
      be.free(gelu_out);
      be.free(fc1_out);
    }
    Backend& be;
    TensorPtr fc1_out;   // (N, f/tp), before GELU
    TensorPtr gelu_out;  // (N, f/tp)
  };

  std::unique_ptr<PartState> forward(int, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) override {
    const std::size_t Nf = static_cast<std::size_t>(N_) * fl_;
    auto s = std::make_unique<Saved>(be_);
    s->fc1_out = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::activations);
    s->gelu_out = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::activations);
    const ConstTensorPtr u_full = tp_.column_input(u);
    be_.matmul_gelu_forward(s->gelu_out, s->fc1_out, u_full, w[kFc1W], w[kFc1B], N_, m_.hidden, fl_);
    tp_.release_column_input(u_full, u);
    tp_.row_parallel_forward(out, s->gelu_out, w[kFc2W], w[kFc2B], fl_);
    return s;
  }

  void backward(int, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u, ConstTensorPtr dout,
                TensorPtr du) override {
    auto& s = static_cast<Saved&>(state);
    const std::size_t Nf = static_cast<std::size_t>(N_) * fl_;
    TensorPtr dfc = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::workspace);
    const ConstTensorPtr dy = tp_.row_parallel_output_grad(dout);
    be_.matmul_gelu_backward(dfc, g[kFc2W], g[kFc2B], dy, s.gelu_out, w[kFc2W], s.fc1_out, N_, fl_, m_.hidden);
    tp_.release_column_input(dy, dout);
    const ConstTensorPtr u_full = tp_.column_input(u);
    TensorPtr du_full = tp_.full_grad(du);
    be_.matmul_backward(du_full, g[kFc1W], g[kFc1B], dfc, u_full, w[kFc1W], N_, m_.hidden, fl_);
    tp_.release_column_input(u_full, u);
    tp_.column_input_grad(du_full, du);
    tp_.release_full_grad(du_full, du);
    be_.free(dfc);
  }
};

// The MLP of SPEC 2.5: (silu(u·gate.w) ⊙ (u·up.w))·down.w, gate and up column- and down row-parallel.
class SwiGluMlp final : public OwnMlp {
 public:
  using OwnMlp::OwnMlp;

  struct Saved final : PartState {
    explicit Saved(Backend& backend) : be(backend) {}
    ~Saved() override {
      be.free(act);
      be.free(up);
      be.free(gate);
    }
    Backend& be;
    TensorPtr gate;  // (N, f/tp): u·gate.w
    TensorPtr up;    // (N, f/tp): u·up.w
    TensorPtr act;   // (N, f/tp): silu(gate) ⊙ up, down's input
  };

  std::unique_ptr<PartState> forward(int, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) override {
    const std::size_t Nf = static_cast<std::size_t>(N_) * fl_;
    auto s = std::make_unique<Saved>(be_);
    s->gate = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::activations);
    s->up = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::activations);
    s->act = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::activations);
    const ConstTensorPtr u_full = tp_.column_input(u);
    be_.matmul_forward(s->gate, u_full, w[kGateW], nullptr, N_, m_.hidden, fl_);
    be_.matmul_forward(s->up, u_full, w[kUpW], nullptr, N_, m_.hidden, fl_);
    tp_.release_column_input(u_full, u);
    be_.swiglu_forward(s->act, s->gate, s->up, Nf);
    tp_.row_parallel_forward(out, s->act, w[kDownW], nullptr, fl_);
    return s;
  }

  // Scratch: dgate and dup (N, f/tp) each; the up branch's input gradient goes where dgate was once the
  // gate branch has used it (f/tp ≥ h), else to a buffer of its own.
  void backward(int, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u, ConstTensorPtr dout,
                TensorPtr du) override {
    auto& s = static_cast<Saved&>(state);
    const std::size_t Nf = static_cast<std::size_t>(N_) * fl_, Nh = static_cast<std::size_t>(N_) * m_.hidden;
    TensorPtr dgate = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::workspace);
    TensorPtr dup = be_.alloc_tensor(Nf, tp_.dtype(), MemCategory::workspace);
    // d(act) = dout·down.wᵀ into dup (its own place until swiglu_backward), down.w's gradient
    const ConstTensorPtr dy = tp_.row_parallel_output_grad(dout);
    be_.matmul_backward(dup, g[kDownW], nullptr, dy, s.act, w[kDownW], N_, fl_, m_.hidden);
    tp_.release_column_input(dy, dout);
    be_.swiglu_backward(dgate, dup, dup, s.gate, s.up, Nf);  // dup: d(act) in, d(up) out
    const ConstTensorPtr u_full = tp_.column_input(u);
    TensorPtr du_full = tp_.full_grad(du);
    be_.matmul_backward(du_full, g[kGateW], nullptr, dgate, u_full, w[kGateW], N_, m_.hidden, fl_);
    TensorPtr du_up = Nf >= Nh ? dgate : be_.alloc_tensor(Nh, tp_.dtype(), MemCategory::workspace);
    be_.matmul_backward(du_up, g[kUpW], nullptr, dup, u_full, w[kUpW], N_, m_.hidden, fl_);
    be_.accumulate(du_full, du_up, Nh);
    if (du_up != dgate) be_.free(du_up);
    tp_.release_column_input(u_full, u);
    tp_.column_input_grad(du_full, du);
    tp_.release_full_grad(du_full, du);
    be_.free(dup);
    be_.free(dgate);
  }
};

// The backend's fused (or plain) attention.
class BackendAttention final : public AttentionCore {
 public:
  explicit BackendAttention(Backend& backend) : be_(backend) {}
  std::size_t saved_floats(int B, int S, int heads) const override { return be_.attention_saved_floats(B, S, heads); }
  bool keeps_probabilities() const override { return be_.attention_keeps_probabilities(); }
  std::size_t scratch_floats(int B, int S, int heads) const override {
    return be_.attention_scratch_floats(B, S, heads);
  }
  void forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads,
               int kv_heads) override {
    be_.attention_gqa_forward(out, saved, qkv, B, S, C, heads, kv_heads);
  }
  void backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                const float* saved, int B, int S, int C, int heads, int kv_heads) override {
    be_.attention_gqa_backward(dqkv, scratch, dout, out, qkv, saved, B, S, C, heads, kv_heads);
  }

 private:
  Backend& be_;
};

}  // namespace

// What one block's backward needs, saved by its forward (all under `activations`).
// (Tensors in the model's dtype; statistics and the attention core's state in fp32.)
struct GptModel::BlockActs {
  float* ln1_mean = nullptr;  // (rows)
  float* ln1_rstd = nullptr;  // (rows)
  TensorPtr ln1_out;          // (rows, h)
  TensorPtr qkv;              // (N, 3h/tp)
  float* att = nullptr;       // the attention core's saved state (not kept by selective recompute)
  TensorPtr att_out;          // (N, h/tp), heads concatenated, before the output projection
  TensorPtr x_mid;            // (rows, h), residual stream after attention
  float* ln2_mean = nullptr;  // (rows)
  float* ln2_rstd = nullptr;  // (rows)
  TensorPtr ln2_out;          // (rows, h)
  std::unique_ptr<PartState> mlp;  // the MLP part's saved state
  TensorPtr x_out;            // (rows, h), the block's output = next block's input
};

struct GptModel::HeadActs {
  float* lnf_mean;   // (N)
  float* lnf_rstd;   // (N)
  TensorPtr lnf_out;  // (N, h)
  TensorPtr logits;   // (N, V), overwritten by dlogits
};

// Backward scratch, shared by all blocks of one micro-batch (under `workspace`; the model's dtype).
struct GptModel::BackwardScratch {
  TensorPtr dres;      // (rows, h): gradient of the residual stream
  TensorPtr dln;       // (N, h): gradient w.r.t. a column-parallel layer's input, before the f/sp reduction
  TensorPtr dln_rows;  // (rows, h): the same reduced onto this rank's rows (dln without sequence parallelism)
  TensorPtr datt;      // (N, h/tp): gradient w.r.t. the attention output
  TensorPtr dqkv;      // (N, 3h/tp)
  float* att;          // the attention core's scratch (fp32)
};


void init_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                     TensorPtr dst, uint64_t seed, int num_layers) {
  // The values in fp32, rounded on the host when dst is bf16 (as the backend's convert rounds).
  std::vector<uint16_t> bits;
  std::vector<float> values;
  std::vector<uint64_t> indices;
  for_each_tensor_piece(units, first, count, [&](std::size_t pos, std::size_t len, const TensorInfo& t, std::size_t index) {
    values.resize(len);
    if (t.split == TpSplit::none && !t.padded()) {
      init_values(values.data(), seed, t.name, num_layers, index, len);
    } else {  // a tensor-parallel slice or a padded tensor: each element from its global index
      indices.resize(len);
      for (std::size_t k = 0; k < len; ++k) {
        const auto local = static_cast<int64_t>(index + k);
        const int64_t r = local / t.cols, c = local % t.cols;
        indices[k] = t.is_padding(r, c) ? 0 : t.global_index(r, c);
      }
      init_values_at(values.data(), seed, t.name, num_layers, indices.data(), len);
      for (std::size_t k = 0; k < len && t.padded(); ++k) {  // the vocabulary's padding: zero
        const auto local = static_cast<int64_t>(index + k);
        if (t.is_padding(local / t.cols, local % t.cols)) values[k] = 0.0f;
      }
    }
    if (dst.dtype() == DType::f32) {
      backend.upload(dst.as<float>() + pos, values.data(), len * sizeof(float));
    } else {
      bits.resize(len);
      for (std::size_t k = 0; k < len; ++k) bits[k] = cpu::float_to_bf16(values[k]);
      backend.upload((dst + static_cast<std::ptrdiff_t>(pos)).data(), bits.data(), len * sizeof(uint16_t));
    }
  });
}

void append_adamw_ranges(std::vector<Backend::AdamwRange>& ranges, const std::vector<UnitInfo>& units,
                         std::size_t first, std::size_t count, std::size_t at) {
  constexpr float kWeightDecay = 0.1f;
  for_each_tensor_piece(units, first, count, [&](std::size_t pos, std::size_t len, const TensorInfo& tensor, std::size_t) {
    ranges.push_back({at + pos, len, tensor.is_matrix ? kWeightDecay : 0.0f});
  });
}

void adamw_ranges(Backend& backend, const std::vector<Backend::AdamwRange>& ranges, float* params, ConstTensorPtr grads,
                  float* m, float* v, float grad_scale, int t, double lr) {
  constexpr float kBeta1 = 0.9f, kBeta2 = 0.95f, kEps = 1e-8f;
  backend.adamw_update(params, grads, m, v, ranges, static_cast<float>(lr), kBeta1, kBeta2, kEps, t, grad_scale);
}

void adamw_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                      float* params, ConstTensorPtr grads, float* m, float* v, float grad_scale, int t, double lr) {
  std::vector<Backend::AdamwRange> ranges;  // one update for all pieces (one launch on a GPU)
  append_adamw_ranges(ranges, units, first, count, 0);
  adamw_ranges(backend, ranges, params, grads, m, v, grad_scale, t, lr);
}

std::vector<float> download_fp32(Backend& backend, ConstTensorPtr src, std::size_t n) {
  std::vector<float> out(n);
  if (src.dtype() == DType::f32) {
    backend.download(out.data(), src.data(), n * sizeof(float));
    return out;
  }
  std::vector<uint16_t> bits(n);
  backend.download(bits.data(), src.data(), n * sizeof(uint16_t));
  for (std::size_t i = 0; i < n; ++i) out[i] = cpu::bf16_to_float(bits[i]);
  return out;
}

GptModel::GptModel(const ModelConfig& config, Backend& backend, int micro_batch, const std::string& recompute,
                   const ModelParallel& mp, BlockParts parts, DType dtype)
    : config_(config), backend_(backend), micro_batch_(micro_batch), dtype_(dtype), tp_(mp.tp), cp_(mp.cp) {
  recompute_ = recompute == "full" ? Recompute::full : recompute == "selective" ? Recompute::selective : Recompute::none;
  seq_local_ = config.seq / cp_.size;
  N_ = micro_batch * seq_local_;
  rows_ = tp_.sequence_parallel ? N_ / tp_.size : N_;
  heads_ = config.heads / tp_.size;
  hidden_local_ = config.hidden / tp_.size;
  vocab_local_ = static_cast<int>(config.padded_vocab(tp_.size) / tp_.size);
  // The columns of this rank's vocabulary block that are not padding (0 for a block wholly past V).
  vocab_valid_ = std::clamp(config.vocab - tp_.rank * vocab_local_, 0, vocab_local_);
  kv_heads_ = config.kv() / tp_.size;
  qkv_local_ = (heads_ + 2 * kv_heads_) * config.head_dim();
  tp_layers_ = std::make_unique<TpLayers>(backend_, tp_, N_, rows_, config.hidden, dtype_);
  if (parts.mlp == nullptr && config.llama()) {
    own_mlp_ = std::make_unique<SwiGluMlp>(config_, backend_, *tp_layers_, N_, tp_.size);
  } else if (parts.mlp == nullptr) {
    own_mlp_ = std::make_unique<DenseMlp>(config_, backend_, *tp_layers_, N_, tp_.size);
  }
  if (parts.attention == nullptr) own_attention_ = std::make_unique<BackendAttention>(backend_);
  mlp_ = parts.mlp ? parts.mlp : own_mlp_.get();
  attention_ = parts.attention ? parts.attention : own_attention_.get();
  units_ = gpt_units(config, tp_.size, tp_.rank, mlp_);
  num_params_ = units_.back().offset + units_.back().numel;
  loss_sum_ = static_cast<double*>(backend_.alloc(sizeof(double), MemCategory::workspace));
  backend_.zero(loss_sum_, sizeof(double));
  if (config.llama()) {  // rotary positions: where this rank's tokens sit in their sequence
    std::vector<int32_t> positions;
    for (const ContextParallel::Chunk& c : cp_.chunks(config.seq)) {
      for (int i = 0; i < c.length; ++i) positions.push_back(static_cast<int32_t>(c.first + i));
    }
    positions_ = static_cast<int32_t*>(backend_.alloc(positions.size() * sizeof(int32_t), MemCategory::workspace));
    backend_.upload(positions_, positions.data(), positions.size() * sizeof(int32_t));
  }
}

GptModel::~GptModel() {
  backend_.free(positions_);
  backend_.free(loss_sum_);
}

std::vector<TensorPtr> GptModel::unit_tensors(ConstTensorPtr base, int unit) const {
  const TensorPtr first(const_cast<void*>(base.data()), base.dtype());
  std::vector<TensorPtr> out;
  for (const TensorInfo& t : units_[unit].tensors) {
    out.push_back(first + static_cast<std::ptrdiff_t>(t.offset - units_[unit].offset));
  }
  if (!config_.llama()) return out;
  // The llama units in the gpt order: null where the gpt block has a bias, a LayerNorm bias or embed.pos.
  const int L = config_.layers;
  if (unit == 0) return {out[0], nullptr};                      // tok, (pos)
  if (unit == L + 1) return {out[0], nullptr, out[1]};          // final_ln.g, (.b), head.w
  std::vector<TensorPtr> block = {out[0], nullptr, out[1], nullptr, out[2], nullptr, out[3], nullptr};
  block.insert(block.end(), out.begin() + 4, out.end());        // the MLP part's
  return block;
}

void GptModel::norm_forward(TensorPtr out, float* mean, float* rstd, ConstTensorPtr x, ConstTensorPtr weight,
                            ConstTensorPtr bias, int rows) {
  if (config_.llama()) {
    backend_.rmsnorm_forward(out, rstd, x, weight, rows, config_.hidden);
  } else {
    backend_.layernorm_forward(out, mean, rstd, x, weight, bias, rows, config_.hidden);
  }
}

void GptModel::residual_norm_forward(TensorPtr out, TensorPtr norm_out, float* mean, float* rstd, ConstTensorPtr a,
                                     ConstTensorPtr b, ConstTensorPtr weight, ConstTensorPtr bias, int rows) {
  if (config_.llama()) {
    backend_.residual_rmsnorm_forward(out, norm_out, rstd, a, b, weight, rows, config_.hidden);
  } else {
    backend_.residual_layernorm_forward(out, norm_out, mean, rstd, a, b, weight, bias, rows, config_.hidden);
  }
}

void GptModel::norm_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr x,
                             ConstTensorPtr weight, const float* mean, const float* rstd, int rows) {
  if (config_.llama()) {
    backend_.rmsnorm_backward(dinp, dweight, dout, x, weight, rstd, rows, config_.hidden);
  } else {
    backend_.layernorm_backward(dinp, dweight, dbias, dout, x, weight, mean, rstd, rows, config_.hidden);
  }
}

TensorPtr GptModel::alloc_act(std::size_t count, MemCategory category) const {
  return backend_.alloc_tensor(count, dtype_, category);
}

double GptModel::take_loss() {
  double loss = 0.0;
  backend_.download(&loss, loss_sum_, sizeof(double));
  backend_.zero(loss_sum_, sizeof(double));
  return loss;
}

void GptModel::head_loss(TensorPtr logits, const int32_t* targets, float scale) {
  // loss += scale · Σ CE; logits become dlogits = scale · (softmax − onehot)
  if (!tp_.active()) {
    backend_.cross_entropy_forward_backward(logits, loss_sum_, targets, N_, vocab_valid_, vocab_local_, scale);
    return;
  }
  // Vocabulary-parallel: the softmax's max and sums are reduced over the group; the logits are never
  // gathered (Megatron's vocab_parallel_cross_entropy).
  float* stats = backend_.alloc_floats(3 * static_cast<std::size_t>(N_), MemCategory::workspace);
  float* row_max = stats;     // (N)
  float* sums = stats + N_;   // (2N): Σ exp, target term
  backend_.cross_entropy_row_max(row_max, logits, N_, vocab_valid_, vocab_local_);
  tp_.comm->all_reduce_max(row_max, N_);
  backend_.cross_entropy_partials(sums, logits, targets, row_max, N_, vocab_valid_, vocab_local_);
  tp_.comm->all_reduce(sums, 2 * static_cast<std::size_t>(N_));
  backend_.cross_entropy_finish(logits, loss_sum_, targets, row_max, sums, N_, vocab_valid_, vocab_local_, scale);
  backend_.free(stats);
}

// ---- blocks ------------------------------------------------------------------------------------------

void GptModel::attention_forward(const TensorPtr* w, ConstTensorPtr u, BlockActs& a, TensorPtr out) {
  const int B = micro_batch_, S = seq_local_, h = config_.hidden, hl = hidden_local_, N = N_;
  Backend& be = backend_;
  // qkv = u·Wqkv + b, column-parallel: this rank's heads                                        (N, 3h/tp)
  const ConstTensorPtr u_full = tp_layers_->column_input(u);
  be.matmul_forward(a.qkv, u_full, w[kQkvW], w[kQkvB], N, h, qkv_local_);
  tp_layers_->release_column_input(u_full, u);
  if (config_.llama()) {  // rotary positions on Q's and K's heads, in place (SPEC 2.5)
    const int d = config_.head_dim();
    be.rope_forward(a.qkv, qkv_local_, positions_, B, S, heads_, d, config_.rope_theta);
    be.rope_forward(a.qkv + hl, qkv_local_, positions_, B, S, kv_heads_, d, config_.rope_theta);
  }
  // o = causal softmax(Q Kᵀ/√d) V for this rank's heads                                        (N, h/tp)
  attention_->forward(a.att_out, a.att, a.qkv, B, S, hl, heads_, kv_heads_);
  // out = o·Wout + b: row-parallel, summed over the group
  tp_layers_->row_parallel_forward(out, a.att_out, w[kOutW], w[kOutB], hl);
}

void GptModel::attention_backward(const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u, BlockActs& a,
                                  ConstTensorPtr dout, TensorPtr du, BackwardScratch& sc) {
  const int B = micro_batch_, S = seq_local_, h = config_.hidden, hl = hidden_local_, N = N_;
  Backend& be = backend_;
  const ConstTensorPtr dy = tp_layers_->row_parallel_output_grad(dout);
  be.matmul_backward(sc.datt, g[kOutW], g[kOutB], dy, a.att_out, w[kOutW], N, hl, h);
  tp_layers_->release_column_input(dy, dout);
  attention_->backward(sc.dqkv, sc.att, sc.datt, a.att_out, a.qkv, a.att, B, S, hl, heads_, kv_heads_);
  if (config_.llama()) {  // the rotations' backward: dQ and dK rotated back
    const int d = config_.head_dim();
    be.rope_backward(sc.dqkv, qkv_local_, positions_, B, S, heads_, d, config_.rope_theta);
    be.rope_backward(sc.dqkv + hl, qkv_local_, positions_, B, S, kv_heads_, d, config_.rope_theta);
  }
  const ConstTensorPtr u_full = tp_layers_->column_input(u);
  be.matmul_backward(sc.dln, g[kQkvW], g[kQkvB], sc.dqkv, u_full, w[kQkvW], N, h, qkv_local_);
  tp_layers_->release_column_input(u_full, u);
  tp_layers_->column_input_grad(sc.dln, du);
}

void GptModel::block_forward(int layer, const TensorPtr* w, ConstTensorPtr x_in, BlockActs& a) {
  const std::size_t N = N_, R = rows_, h = config_.hidden, hl = hidden_local_;
  Backend& be = backend_;
  auto act = [&](std::size_t count) { return alloc_act(count); };
  auto stat = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::activations); };
  const bool mean = !config_.llama();  // RMSNorm keeps no mean
  a.ln1_mean = mean ? stat(R) : nullptr;
  a.ln1_rstd = stat(R);
  a.ln1_out = act(R * h);
  a.qkv = act(N * qkv_local_);
  a.att = stat(attention_->saved_floats(micro_batch_, seq_local_, heads_));
  a.att_out = act(N * hl);
  a.x_mid = act(R * h);
  a.ln2_mean = mean ? stat(R) : nullptr;
  a.ln2_rstd = stat(R);
  a.ln2_out = act(R * h);
  a.x_out = act(R * h);
  // x_mid = x + attention(Norm1(x))
  norm_forward(a.ln1_out, a.ln1_mean, a.ln1_rstd, x_in, w[kLn1G], w[kLn1B], rows_);
  attention_forward(w, a.ln1_out, a, a.x_mid);
  // x_out = x_mid + mlp(Norm2(x_mid)); the residual add and norm 2 in one pass
  residual_norm_forward(a.x_mid, a.ln2_out, a.ln2_mean, a.ln2_rstd, a.x_mid, x_in, w[kLn2G], w[kLn2B], rows_);
  a.mlp = mlp_->forward(layer, w + kMlp, a.ln2_out, a.x_out);
  be.add(a.x_out, a.x_out, a.x_mid, R * h);
}

void GptModel::block_backward(int layer, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr x_in, BlockActs& a,
                              BackwardScratch& sc) {
  const int R = rows_;
  // dres = ∂x_out. MLP branch, then norm 2's backward accumulates into dres: dres = ∂x_mid.
  mlp_->backward(layer, *a.mlp, w + kMlp, g + kMlp, a.ln2_out, sc.dres, sc.dln_rows);
  norm_backward(sc.dres, g[kLn2G], g[kLn2B], sc.dln_rows, a.x_mid, w[kLn2G], a.ln2_mean, a.ln2_rstd, R);
  // Attention branch, then norm 1's backward: dres = ∂x_in.
  attention_backward(w, g, a.ln1_out, a, sc.dres, sc.dln_rows, sc);
  norm_backward(sc.dres, g[kLn1G], g[kLn1B], sc.dln_rows, x_in, w[kLn1G], a.ln1_mean, a.ln1_rstd, R);
}

void GptModel::free_block(BlockActs& a) {
  a.mlp.reset();
  for (TensorPtr p : {a.x_out, a.ln2_out, a.x_mid, a.att_out, a.qkv, a.ln1_out}) backend_.free(p);
  for (float* p : {a.ln2_rstd, a.ln2_mean, a.att, a.ln1_rstd, a.ln1_mean}) backend_.free(p);
  a = BlockActs{};
}


// What one micro-batch keeps on a stage between its forward and its backward.
struct GptModel::MicroBatchState final : GptModel::MicroBatch {
  void set_output(ConstTensorPtr out) { output_ = out; }
  Stage stage;
  int32_t* tokens = nullptr;     // (2N): this rank's tokens, then targets (vocabulary-relative)
  TensorPtr x0;                  // (rows, h): the stage's input (embedding output, or a copy of input)
  std::vector<BlockActs> blocks; // this stage's blocks
  HeadActs head{};
  bool has_head = false;
};

void GptModel::forward_backward(const int32_t* tokens_host, const int32_t* targets_host, float scale,
                                UnitHooks& hooks) {
  std::unique_ptr<MicroBatch> mb = forward(Stage{}, tokens_host, targets_host, nullptr, scale, hooks);
  backward(*mb, nullptr, nullptr, hooks);
}

std::unique_ptr<GptModel::MicroBatch> GptModel::forward(const Stage& stage_in, const int32_t* tokens_host,
                                                        const int32_t* targets_host, ConstTensorPtr input, float scale,
                                                        UnitHooks& hooks) {
  Backend& be = backend_;
  const MemoryMarkScope phase(be.tracker(), MemoryMark::forward_begin, MemoryMark::forward_end);
  const int L = config_.layers, B = micro_batch_, S = seq_local_, h = config_.hidden, Vl = vocab_local_, N = N_,
            R = rows_;
  const std::size_t Rh = static_cast<std::size_t>(R) * h, Nh = static_cast<std::size_t>(N) * h;
  const int head_unit = L + 1;
  const std::size_t elem = dtype_bytes(dtype_);
  auto act = [&](std::size_t count) { return alloc_act(count); };
  auto stat = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::activations); };

  auto mb = std::make_unique<MicroBatchState>();
  mb->stage = stage_in;
  if (mb->stage.last_unit < 0) mb->stage.last_unit = head_unit;
  const Stage& stage = mb->stage;
  const bool has_embedding = stage.first_unit == 0;
  mb->has_head = stage.last_unit == head_unit;

  // Tokens relative to this rank's vocabulary block (−1: another rank's), for the embedding and the loss.
  if (has_embedding || mb->has_head) {
    std::vector<int32_t> local(2 * static_cast<std::size_t>(N));
    const int32_t vocab_first = tp_.rank * Vl;
    for (int i = 0; i < N; ++i) {
      const int32_t t = tokens_host[i] - vocab_first, y = targets_host[i] - vocab_first;
      local[i] = t >= 0 && t < Vl ? t : -1;
      local[N + i] = y >= 0 && y < Vl ? y : -1;
    }
    mb->tokens = static_cast<int32_t*>(be.alloc(2 * N * sizeof(int32_t), MemCategory::activations));
    be.upload(mb->tokens, local.data(), local.size() * sizeof(int32_t));
  }

  mb->x0 = act(Rh);  // (rows, h)
  if (has_embedding) {
    hooks.before_forward(0);
    // Vocabulary-parallel embedding: each rank looks up its block (the position table is added once,
    // by rank 0), then the parts are summed (g) or reduce-scattered onto the sequence shards.
    const std::vector<TensorPtr> emb = unit_tensors(hooks.unit_params(0), 0);
    // Context parallelism: the rows of this rank's positions, chunk by chunk.
    TensorPtr pos_rows =
        cp_.active() && emb[kPos] ? alloc_act(static_cast<std::size_t>(S) * h, MemCategory::workspace) : nullptr;
    if (pos_rows) {
      std::size_t at = 0;
      for (const ContextParallel::Chunk& c : cp_.chunks(config_.seq)) {
        be.copy((pos_rows + at).data(), (emb[kPos] + static_cast<std::ptrdiff_t>(c.first) * h).data(),
                elem * c.length * h);
        at += static_cast<std::size_t>(c.length) * h;
      }
    }
    const ConstTensorPtr pos = tp_.rank != 0 ? nullptr : pos_rows ? pos_rows : emb[kPos];
    if (tp_.sequence_parallel) {
      TensorPtr partial = alloc_act(Nh, MemCategory::comm_buffers);
      be.embedding_forward(partial, mb->tokens, emb[kTok], pos, B, S, h);
      tp_.scatter_to_sp(partial, mb->x0, Rh);
      be.free(partial);
    } else {
      be.embedding_forward(mb->x0, mb->tokens, emb[kTok], pos, B, S, h);
      tp_.reduce_from_tp(mb->x0, Nh);
    }
    be.free(pos_rows);
    hooks.after_forward(0);
  } else {
    be.copy(mb->x0.data(), input.data(), Rh * elem);  // the stage's input, kept for its first block's backward
  }

  // Each block keeps what its backward needs: everything (none), everything but the attention
  // probabilities (selective), or only its output, the next block's input (full).
  const int first_block = std::max(stage.first_unit, 1) - 1, end_block = std::min(stage.last_unit, L);
  mb->blocks.resize(std::max(0, end_block - first_block));
  ConstTensorPtr x = mb->x0;
  for (int l = first_block; l < end_block; ++l) {
    hooks.before_forward(1 + l);
    const std::vector<TensorPtr> w = unit_tensors(hooks.unit_params(1 + l), 1 + l);
    BlockActs& ba = mb->blocks[l - first_block];
    block_forward(l, w.data(), x, ba);
    if (recompute_ == Recompute::selective && attention_->keeps_probabilities()) {
      // A fused attention keeps only per-row statistics: nothing worth recomputing (as Megatron-LM
      // with flash attention), so selective recomputation drops the probabilities only.
      be.free(ba.att);
      ba.att = nullptr;
    } else if (recompute_ == Recompute::full) {
      TensorPtr out = ba.x_out;
      ba.x_out = nullptr;
      free_block(ba);
      ba.x_out = out;
    }
    x = ba.x_out;
    hooks.after_forward(1 + l);
  }

  if (!mb->has_head) {
    mb->set_output(x);  // the last block's output, kept until backward
    return mb;
  }
  hooks.before_forward(head_unit);
  const std::vector<TensorPtr> hw = unit_tensors(hooks.unit_params(head_unit), head_unit);
  HeadActs& ha = mb->head;
  ha.lnf_mean = config_.llama() ? nullptr : stat(R);
  ha.lnf_rstd = stat(R);
  ha.lnf_out = act(Rh);
  ha.logits = act(static_cast<std::size_t>(N) * Vl);
  norm_forward(ha.lnf_out, ha.lnf_mean, ha.lnf_rstd, x, hw[kLnfG], hw[kLnfB], R);
  {
    const ConstTensorPtr u = tp_layers_->column_input(ha.lnf_out);
    be.matmul_forward(ha.logits, u, hw[kHeadW], nullptr, N, h, Vl);  // (N, V/tp), column-parallel, no bias
    tp_layers_->release_column_input(u, ha.lnf_out);
  }
  head_loss(ha.logits, mb->tokens + N, scale);
  hooks.after_forward(head_unit);
  return mb;
}

void GptModel::backward(MicroBatch& micro_batch, ConstTensorPtr doutput, TensorPtr dinput, UnitHooks& hooks) {
  auto& mb = static_cast<MicroBatchState&>(micro_batch);
  Backend& be = backend_;
  const MemoryMarkScope phase(be.tracker(), MemoryMark::backward_begin, MemoryMark::backward_end);
  const int L = config_.layers, B = micro_batch_, S = seq_local_, h = config_.hidden, hl = hidden_local_,
            Vl = vocab_local_, N = N_, R = rows_;
  const std::size_t Rh = static_cast<std::size_t>(R) * h, Nh = static_cast<std::size_t>(N) * h;
  const std::size_t Nhl = static_cast<std::size_t>(N) * hl;
  const TpLayers& tpl = *tp_layers_;
  const int head_unit = L + 1;
  const std::size_t elem = dtype_bytes(dtype_);
  auto act = [&](std::size_t count) { return alloc_act(count); };
  auto scratch = [&](std::size_t count) { return alloc_act(count, MemCategory::workspace); };
  const Stage& stage = mb.stage;
  const int first_block = std::max(stage.first_unit, 1) - 1;

  BackwardScratch sc;
  sc.dres = scratch(Rh);  // gradient of the residual stream on this rank's rows
  sc.dln = scratch(Nh);   // gradient w.r.t. a column-parallel layer's input, before the f/sp reduction
  sc.dln_rows = tp_.sequence_parallel ? scratch(Rh) : sc.dln;
  tp_layers_->lend_full_grad(sc.dln);  // free while a part's backward runs: its input gradient's place
  TensorPtr dln_rows = sc.dln_rows;
  sc.datt = scratch(Nhl);
  sc.dqkv = scratch(static_cast<std::size_t>(N) * qkv_local_);
  sc.att = be.alloc_floats(attention_->scratch_floats(B, S, heads_), MemCategory::workspace);
  TensorPtr dres = sc.dres;
  ConstTensorPtr x = mb.blocks.empty() ? mb.x0 : mb.blocks.back().x_out;  // the head's input

  if (mb.has_head) {
    hooks.before_backward(head_unit);
    HeadActs& ha = mb.head;
    const std::vector<TensorPtr> w = unit_tensors(hooks.unit_params(head_unit), head_unit);
    const std::vector<TensorPtr> g = unit_tensors(hooks.unit_grads(head_unit), head_unit);
    const ConstTensorPtr u = tpl.column_input(ha.lnf_out);
    be.matmul_backward(sc.dln, g[kHeadW], nullptr, ha.logits, u, w[kHeadW], N, h, Vl);
    tpl.release_column_input(u, ha.lnf_out);
    tpl.column_input_grad(sc.dln, dln_rows);
    be.zero(dres.data(), Rh * elem);
    norm_backward(dres, g[kLnfG], g[kLnfB], dln_rows, x, w[kLnfG], ha.lnf_mean, ha.lnf_rstd, R);
    for (TensorPtr p : {ha.logits, ha.lnf_out}) be.free(p);
    for (float* p : {ha.lnf_rstd, ha.lnf_mean}) be.free(p);
    hooks.after_backward(head_unit);
    hooks.grad_ready(head_unit);
  } else {
    be.copy(dres.data(), doutput.data(), Rh * elem);
  }

  for (int i = static_cast<int>(mb.blocks.size()) - 1; i >= 0; --i) {
    const int l = first_block + i, unit = 1 + l;
    hooks.before_backward(unit);
    ConstTensorPtr x_in = i > 0 ? mb.blocks[i - 1].x_out : mb.x0;
    const std::vector<TensorPtr> w = unit_tensors(hooks.unit_params(unit), unit);
    const std::vector<TensorPtr> g = unit_tensors(hooks.unit_grads(unit), unit);
    BlockActs& ba = mb.blocks[i];
    TensorPtr recomputed_out;  // selective recompute's copy of the attention output
    if (recompute_ == Recompute::full) {
      // Run the block's forward again from its input; its saved output is no longer needed.
      be.free(ba.x_out);
      ba.x_out = nullptr;
      block_forward(l, w.data(), x_in, ba);
    } else if (recompute_ == Recompute::selective && ba.att == nullptr) {
      // Recompute only the attention scores and softmax (Korthikanti et al. 2022).
      ba.att = be.alloc_floats(attention_->saved_floats(B, S, heads_), MemCategory::activations);
      recomputed_out = act(Nhl);
      attention_->forward(recomputed_out, ba.att, ba.qkv, B, S, hl, heads_, kv_heads_);
    }
    block_backward(l, w.data(), g.data(), x_in, ba, sc);
    be.free(recomputed_out);
    free_block(ba);
    hooks.after_backward(unit);
    hooks.grad_ready(unit);
  }

  if (stage.first_unit == 0) {
    hooks.before_backward(0);
    // Every rank gets the whole position-table gradient (it holds the whole table) and its block of
    // the token table's.
    const std::vector<TensorPtr> eg = unit_tensors(hooks.unit_grads(0), 0);
    const ConstTensorPtr dx0 = tpl.row_parallel_output_grad(dres);
    if (cp_.active() && eg[kPos]) {  // the gradient of this rank's positions' rows (fp32), added to theirs and rounded once
      float* dpos = be.alloc_floats(static_cast<std::size_t>(S) * h, MemCategory::workspace);
      be.zero(dpos, sizeof(float) * S * h);
      be.embedding_backward(eg[kTok], dpos, dx0, mb.tokens, B, S, h);
      std::size_t at = 0;
      for (const ContextParallel::Chunk& c : cp_.chunks(config_.seq)) {
        be.accumulate(eg[kPos] + static_cast<std::size_t>(c.first) * h, dpos + at, static_cast<std::size_t>(c.length) * h);
        at += static_cast<std::size_t>(c.length) * h;
      }
      be.free(dpos);
    } else {
      be.embedding_backward(eg[kTok], eg[kPos], dx0, mb.tokens, B, S, h);
    }
    tpl.release_column_input(dx0, dres);
  } else {
    be.copy(dinput.data(), dres.data(), Rh * elem);
  }
  be.free(mb.x0);
  be.free(mb.tokens);
  mb.x0 = nullptr;
  mb.tokens = nullptr;
  if (stage.first_unit == 0) {
    hooks.after_backward(0);
    hooks.grad_ready(0);
  }

  if (dln_rows != sc.dln) be.free(dln_rows);
  tp_layers_->lend_full_grad(nullptr);
  for (TensorPtr p : {sc.dqkv, sc.datt, sc.dln, sc.dres}) be.free(p);
  be.free(sc.att);
}

ReplicatedState::ReplicatedState(const GptModel& model, Backend& backend, uint64_t seed, DType grad_dtype,
                                 std::vector<int> units)
    : backend_(backend), units_(model.units()), held_(std::move(units)), local_offset_(model.units().size(), 0) {
  if (held_.empty()) {
    for (int u = 0; u < model.num_units(); ++u) held_.push_back(u);
  }
  for (int u : held_) {
    local_offset_[u] = n_;
    n_ += units_[u].numel;
  }
  params_ = backend_.alloc_tensor(n_, model.dtype(), MemCategory::parameters);
  if (model.dtype() != DType::f32) master_ = backend_.alloc_floats(n_, MemCategory::master_parameters);
  grads_ = backend_.alloc_tensor(n_, grad_dtype, MemCategory::gradients);
  m_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  v_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  // SPEC 2.1's values into the fp32 parameters the optimizer updates, then rounded into the parameters
  float* fp32_params = master_ ? master_ : params_.as<float>();
  for (int u : held_) {
    init_flat_range(backend_, units_, units_[u].offset, units_[u].numel, fp32_params + local_offset_[u], seed,
                    model.config().layers);
  }
  if (master_) backend_.convert(params_, master_, n_);
  zero_grads();
  for (float* p : {m_, v_}) backend_.zero(p, n_ * sizeof(float));
}

ReplicatedState::~ReplicatedState() {
  for (float* p : {v_, m_, master_}) backend_.free(p);
  for (TensorPtr p : {grads_, params_}) backend_.free(p);
}

void ReplicatedState::zero_grads() { backend_.zero(grads_.data(), n_ * dtype_bytes(grads_.dtype())); }

void ReplicatedState::adamw(float grad_scale, int t, double lr) {
  float* fp32_params = master_ ? master_ : params_.as<float>();
  std::vector<Backend::AdamwRange> ranges;  // every held unit's pieces: one update (one launch on a GPU)
  for (int u : held_) append_adamw_ranges(ranges, units_, units_[u].offset, units_[u].numel, local_offset_[u]);
  adamw_ranges(backend_, ranges, fp32_params, grads_, m_, v_, grad_scale, t, lr);
  if (master_) backend_.convert(params_, master_, n_);  // the bf16 copy the next forward uses
}

}  // namespace pb
