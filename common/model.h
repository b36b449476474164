// The reference model of SPEC section 2 (GPT, pre-LayerNorm, untied head) with explicit forward
// and backward passes over the Backend, and its parameters in flat per-unit storage.
//
// A unit is the embedding, one block, or the final LayerNorm with the head (ARCHITECTURE.md seam 2).
// All units live in one flat buffer each for parameters, gradients and AdamW's m and v, in forward
// order, so a strategy can address "the gradients of unit u" or "a bucket of the last N bytes" as a
// range. Forward saves what backward needs under `activations`; backward frees it and uses scratch
// under `workspace`. Model code never reads tensor elements on the host.
//
// A block is two parts between LayerNorms and residuals (SPEC section 2), each a forward/backward
// pair in model.cpp: attention (its projections around an AttentionCore) and the MLP (an MlpPart).
// A strategy swaps the MLP (expert parallelism: a mixture of experts) or the attention core (context
// parallelism) by handing the model its own part; nothing else in the model changes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/options.h"
#include "common/parallel.h"
#include "kernels/backend.h"

namespace pb {

// How tensor parallelism slices a tensor (ARCHITECTURE.md seam 1: a parameter is a named slice of
// a global tensor).
enum class TpSplit {
  none,         // whole on every tp rank (LayerNorms, row-parallel biases, embed.pos)
  columns,      // column-parallel: this rank's block of columns (fc1, head.w)
  rows,         // row-parallel / vocabulary-parallel: this rank's block of rows (attn.out.w, fc2.w, embed.tok)
  qkv_columns,  // this rank's heads' columns of each of the Q, K and V blocks
};

struct TensorInfo {
  std::string name;         // spec name, e.g. "block0.attn.qkv.w"
  int64_t rows = 1;         // this rank's shape [rows, cols]; a 1-D tensor of n elements is [1, n]
  int64_t cols = 1;
  int64_t global_rows = 1;  // the spec's shape
  int64_t global_cols = 1;
  // The global tensor as stored: the spec's shape, but for embed.tok's rows and head.w's columns,
  // which run over the padded vocabulary (ModelConfig::padded_vocab). A local slice is
  // padded_rows / tp (or padded_cols / tp) wide; its elements past the spec's shape are padding:
  // zero, and kept zero (they get no gradient).
  int64_t padded_rows = 1;
  int64_t padded_cols = 1;
  TpSplit split = TpSplit::none;
  int tp_size = 1, tp_rank = 0;
  // qkv_columns: the global width of K (and of V) in [Q | K | V]; a third of the columns when 0 (multi-head
  // attention), fewer with grouped-query attention (SPEC 2.5). Each tp rank holds its share of each block.
  int64_t kv_cols = 0;
  // An expert's tensor (whole, held only by the expert-parallel rank that owns expert `expert`);
  // -1 for every other tensor.
  int expert = -1;
  std::size_t offset = 0;  // in the model's (this rank's) flat buffer
  std::size_t numel() const { return static_cast<std::size_t>(rows * cols); }
  bool is_matrix = false;  // two or more dimensions: gets weight decay
  bool padded() const { return padded_rows != global_rows || padded_cols != global_cols; }
  // Whether local element [r][c] lies in the vocabulary's padding, outside the spec's shape.
  bool is_padding(int64_t r, int64_t c) const;
  // The global element index (SPEC 2.1: r·C + c of the full tensor, C the spec's columns) of local
  // element [r][c], which is not padding.
  uint64_t global_index(int64_t r, int64_t c) const;
  // Whole on every tp rank, but with sequence parallelism computed on a rank's rows only, so that its
  // gradient is a partial sum over the tp group: the LayerNorms' parameters.
  bool partial_under_sequence_parallel() const;
};

struct UnitInfo {
  std::string name;  // "embed", "block3", "head"
  std::size_t offset = 0, numel = 0;
  std::vector<TensorInfo> tensors;
};

// A tensor of a block part as the part declares it: its spec name within the block ("mlp.fc1.w"),
// its global shape, how tensor parallelism slices it, and the expert it belongs to (-1: none).
struct TensorSpec {
  std::string name;
  int64_t rows = 1, cols = 1;
  TpSplit split = TpSplit::none;
  int expert = -1;
  int64_t padded_rows = 0, padded_cols = 0;  // the stored shape when padded (0: rows, cols)
  int64_t kv_cols = 0;                       // qkv_columns with grouped-query attention (TensorInfo::kv_cols)
};

// What a part keeps from its forward for its backward (activations, freed with it).
class PartState {
 public:
  virtual ~PartState() = default;
};

// The MLP half of a block: x_out = x_mid + mlp(u), u = LayerNorm2(x_mid) on this rank's rows.
// The dense MLP of SPEC section 2 is the default (`dense_mlp`); bench/ep replaces it by a mixture of
// experts. One part serves every block; `layer` says which.
class MlpPart {
 public:
  virtual ~MlpPart() = default;
  // This rank's tensors of the part in one block, in unit order, and the parameters of the whole
  // part in one block (every rank's, for the parameter count).
  virtual std::vector<TensorSpec> tensors() const = 0;
  virtual int64_t global_parameters() const = 0;
  // The weights of matrix products one token goes through in the part's forward (2 FLOPs each), and
  // that count as a formula term, for the model FLOPs (SPEC 6): the dense MLP's 2·h·f; a mixture of
  // experts' k·2·h·f + h·E. Empty: the model's default formula applies.
  virtual std::string flops_term() const { return ""; }
  virtual double matmul_weights_per_token() const { return 0.0; }
  // out (rows, h) = mlp(u) (overwritten); w: the part's tensors of block `layer`. The returned state
  // holds what backward needs. Activations and parameters are in the model's dtype, g in the gradients'.
  virtual std::unique_ptr<PartState> forward(int layer, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) = 0;
  // du (rows, h) = ∂/∂u of the loss (overwritten) from dout (rows, h); g: the part's gradients (+=).
  virtual void backward(int layer, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u,
                        ConstTensorPtr dout, TensorPtr du) = 0;
};

// The attention core of a block: o = causal softmax(Q Kᵀ/√d) V per head, from qkv (B, S, C + 2·kv·d)
// of this rank's heads (C = their width; kv_heads key/value heads, each serving heads / kv_heads query
// heads: SPEC 2.5's grouped-query attention, and kv_heads = heads for the gpt block, qkv (B, S, 3·C)).
// The default runs the backend's attention; context parallelism replaces it by one that exchanges keys
// and values.
class AttentionCore {
 public:
  virtual ~AttentionCore() = default;
  virtual std::size_t saved_floats(int B, int S, int heads) const = 0;
  virtual bool keeps_probabilities() const = 0;
  virtual std::size_t scratch_floats(int B, int S, int heads) const = 0;
  virtual void forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads,
                       int kv_heads) = 0;
  virtual void backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                        const float* saved, int B, int S, int C, int heads, int kv_heads) = 0;
};

// The parts a strategy supplies (null: the default).
struct BlockParts {
  MlpPart* mlp = nullptr;
  AttentionCore* attention = nullptr;
};
// The same, owned: made by the app for the harness, which keeps them until the model and the strategy
// are gone and before the backend goes (a part may hold backend memory).
struct OwnedBlockParts {
  std::unique_ptr<MlpPart> mlp;
  std::unique_ptr<AttentionCore> attention;
  BlockParts view() const { return BlockParts{mlp.get(), attention.get()}; }
};

// The units of the model in forward order, with offsets in one flat buffer: the whole model, or
// tensor-parallel rank tp_rank's slices of it; a block's MLP tensors are `mlp`'s (null: dense).
std::vector<UnitInfo> gpt_units(const ModelConfig& config, int tp_size = 1, int tp_rank = 0,
                                const MlpPart* mlp = nullptr);
// Every parameter of the model (every rank's slices and experts).
std::size_t gpt_num_parameters(const ModelConfig& config, const MlpPart* mlp = nullptr);

// Calls every piece of the tensors that overlaps the flat range [first, first + count) of the
// model's (unpadded) flat index space: fn(position in the range, length, tensor, index in tensor).
template <typename Fn>
void for_each_tensor_piece(const std::vector<UnitInfo>& units, std::size_t first, std::size_t count, Fn&& fn) {
  const std::size_t last = first + count;
  for (const UnitInfo& u : units) {
    if (u.offset >= last || u.offset + u.numel <= first) continue;
    for (const TensorInfo& t : u.tensors) {
      const std::size_t lo = std::max(first, t.offset), hi = std::min(last, t.offset + t.numel());
      if (lo < hi) fn(lo - first, hi - lo, t, lo - t.offset);
    }
  }
}

// SPEC 2.1 values of the flat range [first, first + count) into backend memory at dst (fp32, or rounded
// to dst's dtype).
void init_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                     TensorPtr dst, uint64_t seed, int num_layers);

// AdamW (SPEC 2.3) over the flat range [first, first + count), whose fp32 params (the master weights in
// mixed precision), grads (fp32 or bf16), m and v start at the given pointers; weight decay on matrices
// only; gradients multiplied by grad_scale first.
void adamw_flat_range(Backend& backend, const std::vector<UnitInfo>& units, std::size_t first, std::size_t count,
                      float* params, ConstTensorPtr grads, float* m, float* v, float grad_scale, int t, double lr);
// The same in two halves, so that several flat ranges of one set of buffers take one update (one launch
// on a GPU): the AdamW ranges of [first, first + count) appended at `at` (its position in the buffers),
// each tensor piece with its weight decay; then the update of all of them.
void append_adamw_ranges(std::vector<Backend::AdamwRange>& ranges, const std::vector<UnitInfo>& units,
                         std::size_t first, std::size_t count, std::size_t at);
void adamw_ranges(Backend& backend, const std::vector<Backend::AdamwRange>& ranges, float* params, ConstTensorPtr grads,
                  float* m, float* v, float grad_scale, int t, double lr);

// n elements of backend memory as fp32 values on the host (bf16 widened exactly).
std::vector<float> download_fp32(Backend& backend, ConstTensorPtr src, std::size_t n);

// The precision of a run (SPEC 2.3): parameters and activations in `compute` (fp32, or bf16 with fp32
// master weights beside the parameters), parameter gradients in `grads`; AdamW's moments are fp32.
struct Precision {
  DType compute = DType::f32;
  DType grads = DType::f32;
  bool master_weights() const { return compute != DType::f32; }
};

// Called by the model around each unit, and asked where the unit's parameters and gradient
// accumulators are: strategies keep them whole, sharded or gathered on demand.
class UnitHooks {
 public:
  virtual ~UnitHooks() = default;
  // The unit's parameters (its numel elements, in tensor order, in the model's dtype); valid from
  // before_forward to after_forward and from before_backward to after_backward.
  virtual ConstTensorPtr unit_params(int unit) = 0;
  // Where the unit's gradients accumulate (in the gradients' dtype); valid from before_backward until
  // grad_ready.
  virtual TensorPtr unit_grads(int unit) = 0;
  virtual void before_forward(int /*unit*/) {}
  virtual void after_forward(int /*unit*/) {}
  virtual void before_backward(int /*unit*/) {}
  virtual void after_backward(int /*unit*/) {}
  // The gradients of `unit` are complete for this micro-batch.
  virtual void grad_ready(int /*unit*/) {}
};

class TpLayers;

// The forward and backward passes of the model for one micro-batch. Holds no parameters: the
// hooks say where they are.
class GptModel {
 public:
  // mp: this rank's model-parallel groups (tp.size = 1: the whole model); parts: the strategy's
  // replacements for the block's MLP or attention core (not owned; null: the defaults).
  // dtype: of parameters and activations (the compute dtype of Precision).
  GptModel(const ModelConfig& config, Backend& backend, int micro_batch, const std::string& recompute,
           const ModelParallel& mp = ModelParallel{}, BlockParts parts = BlockParts{}, DType dtype = DType::f32);
  ~GptModel();
  GptModel(const GptModel&) = delete;
  GptModel& operator=(const GptModel&) = delete;

  const ModelConfig& config() const { return config_; }
  DType dtype() const { return dtype_; }
  const std::vector<UnitInfo>& units() const { return units_; }
  std::size_t num_parameters() const { return num_params_; }
  int num_units() const { return static_cast<int>(units_.size()); }

  // One micro-batch: forward, loss and backward. tokens and targets are host arrays (B·S/cp: with
  // context parallelism, each sequence's tokens at this rank's positions, in the order of
  // ContextParallel::positions); the
  // micro-batch adds scale · Σ cross-entropy to the loss accumulator and accumulates that loss's
  // gradient into the hooks' unit_grads.
  void forward_backward(const int32_t* tokens, const int32_t* targets, float scale, UnitHooks& hooks);

  // The same in two halves over a contiguous range of units (a pipeline stage), so that a schedule
  // can run the forwards and backwards of several micro-batches in any order (ARCHITECTURE seam 6).
  // A stage without the embedding takes its input (rows, h) from `input`; one without the head
  // leaves its output (rows, h) at `output()` of the returned state, valid until its backward.
  struct Stage {
    int first_unit = 0;
    int last_unit = -1;  // inclusive; -1: the last unit of the model
  };
  // What a micro-batch keeps on a stage between its forward and its backward (opaque).
  class MicroBatch {
   public:
    virtual ~MicroBatch() = default;
    ConstTensorPtr output() const { return output_; }  // stages without the head: (rows, h)

   protected:
    ConstTensorPtr output_;
  };
  std::unique_ptr<MicroBatch> forward(const Stage& stage, const int32_t* tokens, const int32_t* targets,
                                      ConstTensorPtr input, float scale, UnitHooks& hooks);
  // Backward of a micro-batch's forward: doutput is the gradient of its output (null on the last
  // stage); the gradient of its input is written to dinput (rows, h) unless the stage has the
  // embedding. Frees the micro-batch's activations.
  void backward(MicroBatch& micro_batch, ConstTensorPtr doutput, TensorPtr dinput, UnitHooks& hooks);
  // Tokens of one sequence on this rank (S / cp).
  int seq_local() const { return seq_local_; }
  // Elements of a stage's input or output (rows of this rank × h).
  std::size_t boundary_elements() const { return static_cast<std::size_t>(rows_) * config_.hidden; }

  // The step's loss so far (scale · Σ CE over its micro-batches), and a reset for the next step.
  double take_loss();

 private:
  struct BlockActs;
  struct HeadActs;
  struct MicroBatchState;
  struct BackwardScratch;
  // One block, as SPEC section 2 writes it: x_mid = x + attention(LayerNorm1(x)), x_out = x_mid +
  // mlp(LayerNorm2(x_mid)). The forward saves into `a`; the backward takes dres = ∂x_out and leaves
  // ∂x_in in it.
  void block_forward(int layer, const TensorPtr* w, ConstTensorPtr x_in, BlockActs& a);
  void block_backward(int layer, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr x_in, BlockActs& a,
                      BackwardScratch& sc);
  // The attention part: out (rows, h) = o·Wout + b with o the core's output on u's projections.
  void attention_forward(const TensorPtr* w, ConstTensorPtr u, BlockActs& a, TensorPtr out);
  // du (rows, h) overwritten from dout (rows, h); gradients accumulated.
  void attention_backward(const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u, BlockActs& a, ConstTensorPtr dout,
                          TensorPtr du, BackwardScratch& sc);
  void free_block(BlockActs& a);
  // LayerNorm (gpt) or RMSNorm (llama: no bias, no mean: `mean` and `bias` null) over `rows` rows of h.
  void norm_forward(TensorPtr out, float* mean, float* rstd, ConstTensorPtr x, ConstTensorPtr weight,
                    ConstTensorPtr bias, int rows);
  void residual_norm_forward(TensorPtr out, TensorPtr norm_out, float* mean, float* rstd, ConstTensorPtr a,
                             ConstTensorPtr b, ConstTensorPtr weight, ConstTensorPtr bias, int rows);
  void norm_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout, ConstTensorPtr x,
                     ConstTensorPtr weight, const float* mean, const float* rstd, int rows);
  void head_loss(TensorPtr logits, const int32_t* targets, float scale);
  // Pointers to the tensors of a unit whose parameters (or gradients) start at base, in the gpt block's
  // order (the Block-, Embed- and HeadTensor indices of model.cpp): the llama block's missing biases, bias
  // gains and position table are null.
  std::vector<TensorPtr> unit_tensors(ConstTensorPtr base, int unit) const;
  // Activations in the model's dtype, and fp32 statistics (LayerNorm's mean and rstd).
  TensorPtr alloc_act(std::size_t count, MemCategory category = MemCategory::activations) const;

  ModelConfig config_;
  Backend& backend_;
  int micro_batch_;
  DType dtype_;
  TensorParallel tp_;
  ContextParallel cp_;
  std::unique_ptr<TpLayers> tp_layers_;  // the tensor- and sequence-parallel plumbing of a layer
  std::unique_ptr<MlpPart> own_mlp_;
  std::unique_ptr<AttentionCore> own_attention_;
  MlpPart* mlp_;
  AttentionCore* attention_;
  // Local sizes: N tokens of the micro-batch, rows_ of them in the residual stream on this rank
  // (N / tp with sequence parallelism), and this rank's heads, their width and its vocabulary block.
  // vocab_local_ counts the block's padding, vocab_valid_ does not.
  int seq_local_, N_, rows_, heads_, hidden_local_, vocab_local_, vocab_valid_;
  // This rank's key/value heads and the width of its [Q | K | V] (3·hidden_local_ for the gpt block).
  int kv_heads_, qkv_local_;
  int32_t* positions_ = nullptr;  // llama: the positions of this rank's tokens of a sequence (seq_local_)
  enum class Recompute { none, selective, full } recompute_;
  std::vector<UnitInfo> units_;
  std::size_t num_params_ = 0;
  double* loss_sum_ = nullptr;  // backend scalar
};

// The model state of the units this rank holds, whole (data and tensor parallelism, NO_SHARD: every
// unit; a pipeline stage: its units): parameters, gradients and AdamW states in flat buffers.
class ReplicatedState {
 public:
  // Parameters in the model's dtype, with fp32 master weights beside them when that is bf16 (the
  // optimizer updates the master weights and rounds them into the parameters); gradients in grad_dtype;
  // AdamW's m and v in fp32. units: the units held, in increasing order (empty: all of them).
  ReplicatedState(const GptModel& model, Backend& backend, uint64_t seed, DType grad_dtype, std::vector<int> units = {});
  ~ReplicatedState();
  ReplicatedState(const ReplicatedState&) = delete;
  ReplicatedState& operator=(const ReplicatedState&) = delete;

  TensorPtr params() { return params_; }
  TensorPtr grads() { return grads_; }
  // The fp32 parameters the optimizer updates: the master weights, or the parameters themselves.
  const float* master() const { return master_ ? master_ : params_.as<float>(); }
  std::size_t size() const { return n_; }
  ConstTensorPtr unit_params(int unit) const { return params_ + local_offset_[unit]; }
  TensorPtr unit_grads(int unit) { return grads_ + local_offset_[unit]; }
  // Held tensors, with their offset in this state's buffers (for per-tensor reductions).
  template <typename Fn>
  void for_each_tensor(Fn&& fn) const {
    for (int u : held_) {
      for (const TensorInfo& t : units_[u].tensors) fn(t, local_offset_[u] + (t.offset - units_[u].offset));
    }
  }
  void zero_grads();
  void adamw(float grad_scale, int t, double lr);

 private:
  Backend& backend_;
  const std::vector<UnitInfo>& units_;
  std::vector<int> held_;
  std::vector<std::size_t> local_offset_;  // per unit of the model (unused for units not held)
  std::size_t n_ = 0;
  TensorPtr params_, grads_;
  float* master_ = nullptr;  // null when the parameters are fp32
  float *m_ = nullptr, *v_ = nullptr;
};

}  // namespace pb
