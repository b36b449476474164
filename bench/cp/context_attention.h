// The attention core of context parallelism (bench/cp/README.md): each rank holds S/cp tokens of every
// sequence (contiguous or zigzag chunks, common/parallel.h ContextParallel) and their Q, K and V; the
// core lets every query see the keys and values of the earlier positions on the other ranks.
//
//   ring       K/V blocks travel around the cp ring by send/recv, overlapped with the attention of the
//              block in hand; partial outputs merged by their log-sum-exp (Liu et al. 2023, ring
//              attention; Megatron-LM's context parallelism). Backward: K/V travel again, with their
//              gradients accumulating on the way, then the gradients travel home.
//   allgather  K/V all-gathered once per layer (again in backward); dK/dV reduce-scattered (Llama 3's
//              long-context training).
//   alltoall   DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-all from sequence- to head-split, the
//              backend's attention over whole sequences for heads/cp heads, all-to-all back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/memory_model.h"
#include "common/model.h"
#include "common/parallel.h"

namespace pb {

enum class CpAlgo { ring, allgather, alltoall };
bool parse_cp_algo(const std::string& name, CpAlgo* out);
const char* cp_algo_name(CpAlgo algo);

class ContextAttention final : public AttentionCore {
 public:
  // seq, hidden: the model's S and this rank's width of Q (h, or h/tp: the core's C); kv_hidden: the width
  // of K and of V (hidden, or kv heads × d with the grouped-query attention of SPEC 2.5, which is what
  // the exchanges move); dtype: the model's (of Q, K, V, the output and everything exchanged).
  ContextAttention(Backend& backend, const ContextParallel& cp, CpAlgo algo, int seq, int hidden, int kv_hidden,
                   DType dtype);
  ~ContextAttention() override;

  std::size_t saved_floats(int B, int S, int heads) const override;
  bool keeps_probabilities() const override;
  std::size_t scratch_floats(int B, int S, int heads) const override;
  // kv_heads · C / heads must be the constructor's kv_hidden.
  void forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads, int kv_heads) override;
  void backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                const float* saved, int B, int S, int C, int heads, int kv_heads) override;

  // Time of the core's attention arithmetic (block attention, merges and their backward; not its
  // communication, packing or waiting) since the last call: the measure of the causal load balance
  // between the ranks (Backend spans: GPU time between events, no host wait; CPU: process CPU time).
  // For after a wait for the device (the step's end).
  double take_time_s();

 private:
  void ring_forward(TensorPtr out, float* lse, ConstTensorPtr qkv, int B, int S, int C, int heads, int kv_heads);
  void ring_backward(TensorPtr dqkv, float* delta, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                     const float* lse, int B, int S, int C, int heads, int kv_heads);
  void allgather_forward(TensorPtr out, float* lse, ConstTensorPtr qkv, int B, int S, int C, int heads, int kv_heads);
  void allgather_backward(TensorPtr dqkv, float* delta, ConstTensorPtr dout, ConstTensorPtr out, ConstTensorPtr qkv,
                          const float* lse, int B, int S, int C, int heads, int kv_heads);
  void alltoall_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads, int kv_heads);
  void alltoall_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, const float* saved, int B, int S, int C,
                         int heads, int kv_heads);
  // forward's and backward's check of the model's heads against the core's widths (std::invalid_argument).
  void check_heads(int C, int heads, int kv_heads) const;
  // alltoall: elements per row of a whole sequence kept in the saved (and scratch) area: this rank's head
  // group's Q|K|V and its output (dQ|dK|dV and dout): 2·C/cp + 2·kv_hidden/cp.
  std::size_t full_width() const { return 2 * static_cast<std::size_t>(hidden_ + kv_hidden_) / cp_.size; }
  // Tensors in the model's dtype, and the floats that `count` of them take in the core's fp32 saved
  // and scratch areas (alltoall keeps Q|K|V and the output there, before the backend attention's state).
  TensorPtr alloc_act(std::size_t count, MemCategory category) const { return be_.alloc_tensor(count, dtype_, category); }
  std::size_t floats_of(std::size_t count) const { return count * dtype_bytes(dtype_) / sizeof(float); }
  TensorPtr in_floats(float* area) const { return TensorPtr(area, dtype_); }
  // Every rank's positions (cp · S/cp int32, rank-major) in backend memory, made on first use.
  const int32_t* positions_of(int rank);
  // The block of rank `origin`'s keys and values (packed (B, S, 2·kv_hidden)) against this rank's queries
  // (rows of qkv, C + 2·kv_hidden apart), merged into (out, lse); the first block is written, not merged.
  void attend_block(TensorPtr out, float* lse, bool first, ConstTensorPtr q, ConstTensorPtr kv, int origin, int B,
                    int S, int C, int heads, int kv_heads);
  // Ulysses: rows of this rank's tokens of all heads <-> rows of every rank's tokens of its heads, whole
  // sequences in position order. width: elements per head group and row (Cl, or Cl + 2·kv_hidden/cp for
  // Q|K|V).
  void sequence_to_heads(TensorPtr full, ConstTensorPtr recv, int B, int S, int width) const;
  void heads_to_sequence(TensorPtr send, ConstTensorPtr full, int B, int S, int width) const;

  Backend& be_;
  ContextParallel cp_;
  CpAlgo algo_;
  int seq_, hidden_, kv_hidden_;  // the model's S (global), the widths of Q and of K (= V) on this rank
  DType dtype_;
  int32_t* positions_ = nullptr;
};

// The memory terms of the core for a plan (MemoryPlan's attention_* and cp), as ContextAttention
// allocates them: for the app's /memory/predicted and parabench-plan --app cp; for the heads of a
// tensor-parallel rank when the plan's tp is set first.
void plan_cp_memory(MemoryPlan& plan, CpAlgo algo, int cp);

}  // namespace pb
