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

uint64_t TensorInfo::global_index(int64_t r, int64_t c) const {
  int64_t gr = r, gc = c;
  switch (split) {
    case TpSplit::none: break;
    case TpSplit::columns: gc = tp_rank * cols + c; break;
    case TpSplit::rows: gr = tp_rank * rows + r; break;
    case TpSplit::qkv_columns: {
      // Local columns are [Q | K | V] of this rank's heads: block b of width h/tp maps to columns
      // b·h + tp_rank·h/tp + j of the global [Q | K | V].
      const int64_t width = cols / 3, block = c / width, j = c % width;
      gc = block * (global_cols / 3) + tp_rank * width + j;
      break;
    }
  }
  return static_cast<uint64_t>(gr * global_cols + gc);
}

std::vector<UnitInfo> gpt_units(const ModelConfig& m, int tp, int tp_rank) {
  const int64_t h = m.hidden, f = m.ffn, V = m.vocab, S = m.seq;
  struct Spec {
    const char* name;
    int64_t rows, cols;
    TpSplit split;
  };
  std::vector<UnitInfo> units;
  std::size_t offset = 0;
  auto add_unit = [&](const std::string& name, const std::string& prefix, std::vector<Spec> specs) {
    UnitInfo u;
    u.name = name;
    u.offset = offset;
    for (const Spec& sp : specs) {
      TensorInfo t;
      t.name = prefix + sp.name;
      t.global_rows = sp.rows;
      t.global_cols = sp.cols;
      t.rows = sp.split == TpSplit::rows ? sp.rows / tp : sp.rows;
      t.cols = sp.split == TpSplit::columns || sp.split == TpSplit::qkv_columns ? sp.cols / tp : sp.cols;
      t.split = tp > 1 ? sp.split : TpSplit::none;
      t.tp_size = tp;
      t.tp_rank = tp_rank;
      t.is_matrix = sp.rows > 1;
      t.offset = offset;
      offset += t.numel();
      u.tensors.push_back(t);
    }
    u.numel = offset - u.offset;
    units.push_back(std::move(u));
  };
  using T = TpSplit;
  add_unit("embed", "embed.", {{"tok", V, h, T::rows}, {"pos", S, h, T::none}});
  for (int l = 0; l < m.layers; ++l) {
    add_unit("block" + std::to_string(l), "block" + std::to_string(l) + ".",
             {{"ln1.g", 1, h, T::none},          {"ln1.b", 1, h, T::none},
              {"attn.qkv.w", h, 3 * h, T::qkv_columns}, {"attn.qkv.b", 1, 3 * h, T::qkv_columns},
              {"attn.out.w", h, h, T::rows},      {"attn.out.b", 1, h, T::none},
              {"ln2.g", 1, h, T::none},          {"ln2.b", 1, h, T::none},
              {"mlp.fc1.w", h, f, T::columns},    {"mlp.fc1.b", 1, f, T::columns},
              {"mlp.fc2.w", f, h, T::rows},       {"mlp.fc2.b", 1, h, T::none}});
  }
  add_unit("head", "", {{"final_ln.g", 1, h, T::none}, {"final_ln.b", 1, h, T::none}, {"head.w", h, V, T::columns}});
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
  std::vector<uint64_t> indices;
  for_each_tensor_piece(units, first, count, [&](std::size_t pos, std::size_t len, const TensorInfo& t, std::size_t index) {
    values.resize(len);
    if (t.split == TpSplit::none) {
      init_values(values.data(), seed, t.name, num_layers, index, len);
    } else {  // a tensor-parallel slice: each local element from its global index
      indices.resize(len);
      for (std::size_t k = 0; k < len; ++k) {
        const auto local = static_cast<int64_t>(index + k);
        indices[k] = t.global_index(local / t.cols, local % t.cols);
      }
      init_values_at(values.data(), seed, t.name, num_layers, indices.data(), len);
    }
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

GptModel::GptModel(const ModelConfig& config, Backend& backend, int micro_batch, const std::string& recompute,
                   const TensorParallel& tp)
    : config_(config), backend_(backend), micro_batch_(micro_batch), tp_(tp),
      units_(gpt_units(config, tp.size, tp.rank)) {
  recompute_ = recompute == "full" ? Recompute::full : recompute == "selective" ? Recompute::selective : Recompute::none;
  num_params_ = units_.back().offset + units_.back().numel;
  N_ = micro_batch * config.seq;
  rows_ = tp_.sequence_parallel ? N_ / tp_.size : N_;
  heads_ = config.heads / tp_.size;
  hidden_local_ = config.hidden / tp_.size;
  ffn_local_ = config.ffn / tp_.size;
  vocab_local_ = config.vocab / tp_.size;
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

// ---- tensor- and sequence-parallel plumbing (identities at tp = 1) ----------------------------------

const float* GptModel::column_input(const float* rows) {
  if (!tp_.sequence_parallel) return rows;  // f: identity in forward
  float* full = backend_.alloc_floats(static_cast<std::size_t>(N_) * config_.hidden, MemCategory::comm_buffers);
  tp_.gather_from_sp(rows, full, static_cast<std::size_t>(rows_) * config_.hidden);
  return full;
}

void GptModel::release_column_input(const float* input, const float* rows) {
  if (input != rows) backend_.free(const_cast<float*>(input));
}

void GptModel::row_parallel_forward(float* out, const float* inp, const float* w, const float* bias, int in_cols) {
  const int h = config_.hidden;
  const float* once = tp_.rank == 0 ? bias : nullptr;  // the sum over ranks adds the bias once
  if (!tp_.sequence_parallel) {
    backend_.matmul_forward(out, inp, w, once, N_, in_cols, h);
    tp_.reduce_from_tp(out, static_cast<std::size_t>(N_) * h);  // g
    return;
  }
  float* partial = backend_.alloc_floats(static_cast<std::size_t>(N_) * h, MemCategory::comm_buffers);
  backend_.matmul_forward(partial, inp, w, once, N_, in_cols, h);
  tp_.scatter_to_sp(partial, out, static_cast<std::size_t>(rows_) * h);
  backend_.free(partial);
}

const float* GptModel::row_parallel_output_grad(const float* drows) {
  return column_input(drows);  // backward of reduce-scatter: all-gather (g's backward: identity)
}

void GptModel::column_input_grad(float* dfull, float* drows) {
  const std::size_t h = config_.hidden;
  if (tp_.sequence_parallel) {
    tp_.scatter_to_sp(dfull, drows, static_cast<std::size_t>(rows_) * h);  // backward of all-gather
  } else {
    tp_.copy_to_tp_backward(dfull, static_cast<std::size_t>(N_) * h);  // f
  }
}

void GptModel::head_loss(float* logits, const int32_t* targets, float scale) {
  // loss += scale · Σ CE; logits become dlogits = scale · (softmax − onehot)
  if (!tp_.active()) {
    backend_.cross_entropy_forward_backward(logits, loss_sum_, targets, N_, vocab_local_, scale);
    return;
  }
  // Vocabulary-parallel: the softmax's max and sums are reduced over the group; the logits are never
  // gathered (Megatron's vocab_parallel_cross_entropy).
  float* stats = backend_.alloc_floats(3 * static_cast<std::size_t>(N_), MemCategory::workspace);
  float* row_max = stats;     // (N)
  float* sums = stats + N_;   // (2N): Σ exp, target term
  backend_.cross_entropy_row_max(row_max, logits, N_, vocab_local_);
  tp_.comm->all_reduce_max(row_max, N_);
  backend_.cross_entropy_partials(sums, logits, targets, row_max, N_, vocab_local_);
  tp_.comm->all_reduce(sums, 2 * static_cast<std::size_t>(N_));
  backend_.cross_entropy_finish(logits, loss_sum_, targets, row_max, sums, N_, vocab_local_, scale);
  backend_.free(stats);
}

// ---- blocks ------------------------------------------------------------------------------------------

void GptModel::alloc_block(BlockActs& a, bool with_attention) {
  const std::size_t N = N_, R = rows_, h = config_.hidden, hl = hidden_local_, fl = ffn_local_;
  auto act = [&](std::size_t count) { return backend_.alloc_floats(count, MemCategory::activations); };
  a.ln1_mean = act(R);
  a.ln1_rstd = act(R);
  a.ln1_out = act(R * h);
  a.qkv = act(3 * N * hl);
  a.att = with_attention ? act(backend_.attention_saved_floats(micro_batch_, config_.seq, heads_)) : nullptr;
  a.att_out = act(N * hl);
  a.x_mid = act(R * h);
  a.ln2_mean = act(R);
  a.ln2_rstd = act(R);
  a.ln2_out = act(R * h);
  a.fc1_out = act(N * fl);
  a.gelu_out = act(N * fl);
  a.x_out = act(R * h);
}

void GptModel::free_block(BlockActs& a) {
  for (float* p : {a.x_out, a.gelu_out, a.fc1_out, a.ln2_out, a.ln2_rstd, a.ln2_mean, a.x_mid, a.att_out, a.att,
                   a.qkv, a.ln1_out, a.ln1_rstd, a.ln1_mean}) {
    backend_.free(p);
  }
  a = BlockActs{};
}

void GptModel::block_forward(const float* const* w, const float* x_in, BlockActs& a) {
  const int B = micro_batch_, S = config_.seq, h = config_.hidden, hl = hidden_local_, fl = ffn_local_, N = N_,
            R = rows_;
  Backend& be = backend_;
  // u = LayerNorm(x) on this rank's rows; qkv = u·Wqkv + b, column-parallel: this rank's heads  (N, 3h/tp)
  be.layernorm_forward(a.ln1_out, a.ln1_mean, a.ln1_rstd, x_in, w[kLn1G], w[kLn1B], R, h);
  const float* u1 = column_input(a.ln1_out);
  be.matmul_forward(a.qkv, u1, w[kQkvW], w[kQkvB], N, h, 3 * hl);
  release_column_input(u1, a.ln1_out);
  // o = causal softmax(Q Kᵀ/√d) V for this rank's heads                                        (N, h/tp)
  be.attention_forward(a.att_out, a.att, a.qkv, B, S, hl, heads_);
  // x_mid = x + o·Wout + b: row-parallel, summed over the group
  row_parallel_forward(a.x_mid, a.att_out, w[kOutW], w[kOutB], hl);
  be.add(a.x_mid, a.x_mid, x_in, static_cast<std::size_t>(R) * h);
  // x_out = x_mid + gelu(LayerNorm(x_mid)·W1 + b1)·W2 + b2: fc1 column-, fc2 row-parallel
  be.layernorm_forward(a.ln2_out, a.ln2_mean, a.ln2_rstd, a.x_mid, w[kLn2G], w[kLn2B], R, h);
  const float* u2 = column_input(a.ln2_out);
  be.matmul_forward(a.fc1_out, u2, w[kFc1W], w[kFc1B], N, h, fl);
  release_column_input(u2, a.ln2_out);
  be.gelu_forward(a.gelu_out, a.fc1_out, static_cast<std::size_t>(N) * fl);
  row_parallel_forward(a.x_out, a.gelu_out, w[kFc2W], w[kFc2B], fl);
  be.add(a.x_out, a.x_out, a.x_mid, static_cast<std::size_t>(R) * h);
}

// What one micro-batch keeps on a stage between its forward and its backward.
struct GptModel::MicroBatchState final : GptModel::MicroBatch {
  void set_output(const float* out) { output_ = out; }
  Stage stage;
  int32_t* tokens = nullptr;     // (2N): this rank's tokens, then targets (vocabulary-relative)
  float* x0 = nullptr;           // (rows, h): the stage's input (embedding output, or a copy of input)
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
                                                        const int32_t* targets_host, const float* input, float scale,
                                                        UnitHooks& hooks) {
  Backend& be = backend_;
  const int L = config_.layers, B = micro_batch_, S = config_.seq, h = config_.hidden, Vl = vocab_local_, N = N_,
            R = rows_;
  const std::size_t Rh = static_cast<std::size_t>(R) * h, Nh = static_cast<std::size_t>(N) * h;
  const int head_unit = L + 1;
  auto act = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::activations); };

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
    const std::vector<float*> emb = unit_tensors(hooks.unit_params(0), 0);
    const float* pos = tp_.rank == 0 ? emb[kPos] : nullptr;
    if (tp_.sequence_parallel) {
      float* partial = be.alloc_floats(Nh, MemCategory::comm_buffers);
      be.embedding_forward(partial, mb->tokens, emb[kTok], pos, B, S, h);
      tp_.scatter_to_sp(partial, mb->x0, Rh);
      be.free(partial);
    } else {
      be.embedding_forward(mb->x0, mb->tokens, emb[kTok], pos, B, S, h);
      tp_.reduce_from_tp(mb->x0, Nh);
    }
    hooks.after_forward(0);
  } else {
    be.copy(mb->x0, input, Rh * sizeof(float));  // the stage's input, kept for its first block's backward
  }

  // Each block keeps what its backward needs: everything (none), everything but the attention
  // probabilities (selective), or only its output, the next block's input (full).
  const int first_block = std::max(stage.first_unit, 1) - 1, end_block = std::min(stage.last_unit, L);
  mb->blocks.resize(std::max(0, end_block - first_block));
  const float* x = mb->x0;
  for (int l = first_block; l < end_block; ++l) {
    hooks.before_forward(1 + l);
    const std::vector<float*> w = unit_tensors(hooks.unit_params(1 + l), 1 + l);
    BlockActs& ba = mb->blocks[l - first_block];
    alloc_block(ba, /*with_attention=*/true);
    block_forward(w.data(), x, ba);
    if (recompute_ == Recompute::selective && be.attention_keeps_probabilities()) {
      // A fused attention keeps only per-row statistics: nothing worth recomputing (as Megatron-LM
      // with flash attention), so selective recomputation drops the probabilities only.
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

  if (!mb->has_head) {
    mb->set_output(x);  // the last block's output, kept until backward
    return mb;
  }
  hooks.before_forward(head_unit);
  const std::vector<float*> hw = unit_tensors(hooks.unit_params(head_unit), head_unit);
  HeadActs& ha = mb->head;
  ha.lnf_mean = act(R);
  ha.lnf_rstd = act(R);
  ha.lnf_out = act(Rh);
  ha.logits = act(static_cast<std::size_t>(N) * Vl);
  be.layernorm_forward(ha.lnf_out, ha.lnf_mean, ha.lnf_rstd, x, hw[kLnfG], hw[kLnfB], R, h);
  {
    const float* u = column_input(ha.lnf_out);
    be.matmul_forward(ha.logits, u, hw[kHeadW], nullptr, N, h, Vl);  // (N, V/tp), column-parallel, no bias
    release_column_input(u, ha.lnf_out);
  }
  head_loss(ha.logits, mb->tokens + N, scale);
  hooks.after_forward(head_unit);
  return mb;
}

void GptModel::backward(MicroBatch& micro_batch, const float* doutput, float* dinput, UnitHooks& hooks) {
  auto& mb = static_cast<MicroBatchState&>(micro_batch);
  Backend& be = backend_;
  const int L = config_.layers, B = micro_batch_, S = config_.seq, h = config_.hidden, hl = hidden_local_,
            fl = ffn_local_, Vl = vocab_local_, N = N_, R = rows_;
  const std::size_t Rh = static_cast<std::size_t>(R) * h, Nh = static_cast<std::size_t>(N) * h;
  const std::size_t Nhl = static_cast<std::size_t>(N) * hl, Nfl = static_cast<std::size_t>(N) * fl;
  const int head_unit = L + 1;
  auto act = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::activations); };
  auto scratch = [&](std::size_t count) { return be.alloc_floats(count, MemCategory::workspace); };
  const Stage& stage = mb.stage;
  const int first_block = std::max(stage.first_unit, 1) - 1;

  BackwardScratch sc;
  sc.dres = scratch(Rh);  // gradient of the residual stream on this rank's rows
  sc.dln = scratch(Nh);   // gradient w.r.t. a column-parallel layer's input, before the f/sp reduction
  float* dln_rows = tp_.sequence_parallel ? scratch(Rh) : sc.dln;
  sc.datt = scratch(Nhl);
  sc.dqkv = scratch(3 * Nhl);
  sc.dfc = scratch(Nfl);
  sc.att = scratch(be.attention_scratch_floats(B, S, heads_));
  float* dres = sc.dres;
  const float* x = mb.blocks.empty() ? mb.x0 : mb.blocks.back().x_out;  // the head's input

  if (mb.has_head) {
    hooks.before_backward(head_unit);
    HeadActs& ha = mb.head;
    const std::vector<float*> w = unit_tensors(hooks.unit_params(head_unit), head_unit);
    const std::vector<float*> g = unit_tensors(hooks.unit_grads(head_unit), head_unit);
    const float* u = column_input(ha.lnf_out);
    be.matmul_backward(sc.dln, g[kHeadW], nullptr, ha.logits, u, w[kHeadW], N, h, Vl);
    release_column_input(u, ha.lnf_out);
    column_input_grad(sc.dln, dln_rows);
    be.zero(dres, Rh * sizeof(float));
    be.layernorm_backward(dres, g[kLnfG], g[kLnfB], dln_rows, x, w[kLnfG], ha.lnf_mean, ha.lnf_rstd, R, h);
    for (float* p : {ha.logits, ha.lnf_out, ha.lnf_rstd, ha.lnf_mean}) be.free(p);
    hooks.after_backward(head_unit);
    hooks.grad_ready(head_unit);
  } else {
    be.copy(dres, doutput, Rh * sizeof(float));
  }

  for (int i = static_cast<int>(mb.blocks.size()) - 1; i >= 0; --i) {
    const int l = first_block + i, unit = 1 + l;
    hooks.before_backward(unit);
    const float* x_in = i > 0 ? mb.blocks[i - 1].x_out : mb.x0;
    const std::vector<float*> w = unit_tensors(hooks.unit_params(unit), unit);
    const std::vector<float*> g = unit_tensors(hooks.unit_grads(unit), unit);
    BlockActs& ba = mb.blocks[i];
    float* recomputed_out = nullptr;  // selective recompute's copy of the attention output
    if (recompute_ == Recompute::full) {
      // Run the block's forward again from its input; its saved output is no longer needed.
      be.free(ba.x_out);
      alloc_block(ba, /*with_attention=*/true);
      block_forward(w.data(), x_in, ba);
    } else if (recompute_ == Recompute::selective && ba.att == nullptr) {
      // Recompute only the attention scores and softmax (Korthikanti et al. 2022).
      ba.att = act(be.attention_saved_floats(B, S, heads_));
      recomputed_out = act(Nhl);
      be.attention_forward(recomputed_out, ba.att, ba.qkv, B, S, hl, heads_);
    }
    // dres = d x_out. MLP branch: x_out = x_mid + gelu(ln2(x_mid)·W1 + b1)·W2 + b2
    const float* dy2 = row_parallel_output_grad(dres);
    be.matmul_backward(sc.dfc, g[kFc2W], g[kFc2B], dy2, ba.gelu_out, w[kFc2W], N, fl, h);
    release_column_input(dy2, dres);
    be.gelu_backward(sc.dfc, ba.fc1_out, sc.dfc, Nfl);
    const float* u2 = column_input(ba.ln2_out);
    be.matmul_backward(sc.dln, g[kFc1W], g[kFc1B], sc.dfc, u2, w[kFc1W], N, h, fl);
    release_column_input(u2, ba.ln2_out);
    column_input_grad(sc.dln, dln_rows);
    // LayerNorm backward accumulates into dres: dres = d x_mid (residual + MLP branch)
    be.layernorm_backward(dres, g[kLn2G], g[kLn2B], dln_rows, ba.x_mid, w[kLn2G], ba.ln2_mean, ba.ln2_rstd, R, h);
    // Attention branch: x_mid = x_in + attn(ln1(x_in))·Wout + bout
    const float* dy1 = row_parallel_output_grad(dres);
    be.matmul_backward(sc.datt, g[kOutW], g[kOutB], dy1, ba.att_out, w[kOutW], N, hl, h);
    release_column_input(dy1, dres);
    be.attention_backward(sc.dqkv, sc.att, sc.datt, ba.att_out, ba.qkv, ba.att, B, S, hl, heads_);
    const float* u1 = column_input(ba.ln1_out);
    be.matmul_backward(sc.dln, g[kQkvW], g[kQkvB], sc.dqkv, u1, w[kQkvW], N, h, 3 * hl);
    release_column_input(u1, ba.ln1_out);
    column_input_grad(sc.dln, dln_rows);
    // dres = d x_in
    be.layernorm_backward(dres, g[kLn1G], g[kLn1B], dln_rows, x_in, w[kLn1G], ba.ln1_mean, ba.ln1_rstd, R, h);
    be.free(recomputed_out);
    free_block(ba);
    hooks.after_backward(unit);
    hooks.grad_ready(unit);
  }

  if (stage.first_unit == 0) {
    hooks.before_backward(0);
    // Every rank gets the whole position-table gradient (it holds the whole table) and its block of
    // the token table's.
    const std::vector<float*> eg = unit_tensors(hooks.unit_grads(0), 0);
    const float* dx0 = row_parallel_output_grad(dres);
    be.embedding_backward(eg[kTok], eg[kPos], dx0, mb.tokens, B, S, h);
    release_column_input(dx0, dres);
  } else {
    be.copy(dinput, dres, Rh * sizeof(float));
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
  for (float* p : {sc.att, sc.dfc, sc.dqkv, sc.datt, sc.dln, sc.dres}) be.free(p);
}

ReplicatedState::ReplicatedState(const GptModel& model, Backend& backend, uint64_t seed, std::vector<int> units)
    : backend_(backend), units_(model.units()), held_(std::move(units)), local_offset_(model.units().size(), 0) {
  if (held_.empty()) {
    for (int u = 0; u < model.num_units(); ++u) held_.push_back(u);
  }
  for (int u : held_) {
    local_offset_[u] = n_;
    n_ += units_[u].numel;
  }
  params_ = backend_.alloc_floats(n_, MemCategory::parameters);
  grads_ = backend_.alloc_floats(n_, MemCategory::gradients);
  m_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  v_ = backend_.alloc_floats(n_, MemCategory::optimizer_states);
  for (int u : held_) {
    init_flat_range(backend_, units_, units_[u].offset, units_[u].numel, params_ + local_offset_[u], seed,
                    model.config().layers);
  }
  for (float* p : {grads_, m_, v_}) backend_.zero(p, n_ * sizeof(float));
}

ReplicatedState::~ReplicatedState() {
  for (float* p : {v_, m_, grads_, params_}) backend_.free(p);
}

void ReplicatedState::zero_grads() { backend_.zero(grads_, n_ * sizeof(float)); }

void ReplicatedState::adamw(float grad_scale, int t, double lr) {
  for (int u : held_) {
    const std::size_t at = local_offset_[u];
    adamw_flat_range(backend_, units_, units_[u].offset, units_[u].numel, params_ + at, grads_ + at, m_ + at, v_ + at,
                     grad_scale, t, lr);
  }
}

}  // namespace pb
