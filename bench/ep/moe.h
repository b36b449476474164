// The mixture-of-experts MLP of SPEC section 9 (Switch Transformer, Fedus et al. 2021; GShard,
// Lepikhin et al. 2020), with its experts shared out over the expert-parallel group.
//
// Per block and micro-batch of N = b·S tokens (u: LayerNorm2's output, (N, h)):
//   route     logits = u·router.w (N, E); top-k experts per token, gates = softmax over the k logits
//   assign    the first C assignments of each expert in (token, choice) order are kept, the rest
//             dropped (C = ceil(capacity_factor·k·N/E), at most N; capacity factor 0: C = N)
//   dispatch  kept tokens copied into expert slots (E, C, h); all-to-all over the ep group sends
//             expert e's slots to the rank that holds it (ranks hold E/ep consecutive experts)
//   experts   each local expert's MLP over its ep·C slots (C from each rank of the group)
//   combine   all-to-all back; out[n] = Σ over kept choices of gate · expert output
// Backward runs the same way in reverse: two more all-to-alls per block and micro-batch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/memory_model.h"
#include "common/model.h"
#include "common/parallel.h"

namespace pb {

struct MoeOptions {
  int experts = 8;
  int top_k = 2;
  double capacity_factor = 1.0;  // 0: no capacity limit (dropless)
  double aux_loss = 0.0;         // Switch Transformer load-balancing coefficient; 0: none
};

// Expert slots per micro-batch: C = min(N, ceil(capacity_factor · k · N / E)); N when the factor is 0.
int moe_capacity(const MoeOptions& moe, int64_t tokens);

// What the MoE layers routed during one step, on this rank: the channel from the model's MLP part to
// the strategy, which sums it over the data-parallel group and records it.
struct MoeStepStats {
  std::vector<int64_t> kept;     // [layers, experts]: kept assignments
  std::vector<int64_t> dropped;  // [layers]: assignments dropped by capacity
  double aux_loss = 0.0;         // the auxiliary term added to the objective: (b/G) Σ_micro-batches Σ_layers aux
};

class MoeMlp final : public MlpPart {
 public:
  // loss_scale: 1 / (G·S), the weight of one token in the step's objective; micro_batches: this
  // rank's per step (gradient accumulation).
  // dtype: the model's (activations and parameters).
  MoeMlp(const ModelConfig& model, const MoeOptions& moe, Backend& backend, const ExpertParallel& ep, int micro_batch,
         int micro_batches, float loss_scale, DType dtype);
  ~MoeMlp() override;
  MoeMlp(const MoeMlp&) = delete;
  MoeMlp& operator=(const MoeMlp&) = delete;

  std::vector<TensorSpec> tensors() const override;
  int64_t global_parameters() const override;
  // SwiGLU experts (--arch llama) have three products per token where GELU experts have two.
  std::string flops_term() const override { return gated_ ? "k*3*h*f + h*E" : "k*2*h*f + h*E"; }
  double matmul_weights_per_token() const override {
    return static_cast<double>(k_) * (gated_ ? 3.0 : 2.0) * h_ * f_ + static_cast<double>(h_) * E_;
  }
  std::unique_ptr<PartState> forward(int layer, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) override;
  void backward(int layer, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u,
                ConstTensorPtr dout, TensorPtr du) override;

  int experts() const { return E_; }
  int capacity() const { return C_; }
  int local_experts() const { return El_; }
  // The statistics since the last call (recorded in backward, once per micro-batch and block, so that
  // recomputation does not count twice; kept on the device and read once per step, so that no block
  // waits for the host), and a reset.
  MoeStepStats take_step_stats();

 private:
  struct Saved;
  // Rows of the ep ranks' slots for the local experts: all-to-all output [rank][local expert][C] to
  // [local expert][rank][C] (to_experts), and back (from_experts).
  void to_experts(TensorPtr dst, ConstTensorPtr src) const;
  void from_experts(TensorPtr dst, ConstTensorPtr src) const;
  TensorPtr alloc_act(std::size_t n, MemCategory category) const { return be_.alloc_tensor(n, dtype_, category); }

  ModelConfig model_;
  MoeOptions moe_;
  Backend& be_;
  ExpertParallel ep_;
  int N_, E_, k_, El_, C_, h_, f_;
  bool gated_ = false;  // SwiGLU experts (the llama block, SPEC 2.5), else SPEC 9's GELU experts
  int per_expert_ = 4;  // tensors of one expert
  float loss_scale_;
  DType dtype_;
  int micro_batches_;
  // Made on the first backward, kept to the end: each block's routing counts (2E) per micro-batch
  // ([layer][micro][2E] int32), and Σ coef·E·Σ_e f_e·P_e of the step (one double).
  int32_t* step_counts_ = nullptr;
  double* aux_sum_ = nullptr;
  std::vector<int> recorded_;  // per layer: micro-batches recorded this step
};

// The memory model of the part (what MoeMlp allocates), completing an app's or the planner's plan:
// this rank's MLP parameters per block, its activations, backward scratch and all-to-all buffers.
// tokens = b·S of one micro-batch; ep ranks share the experts.
// micro_batches: per step of a rank (the per-step routing counts are kept for each).
void plan_moe_memory(MemoryPlan& plan, const MoeOptions& moe, int ep, int micro_batches);

}  // namespace pb
