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
  // seq, hidden: the model's S and h (the core's C is h: context parallelism runs without tp).
  ContextAttention(Backend& backend, const ContextParallel& cp, CpAlgo algo, int seq, int hidden);
  ~ContextAttention() override;

  std::size_t saved_floats(int B, int S, int heads) const override;
  bool keeps_probabilities() const override;
  std::size_t scratch_floats(int B, int S, int heads) const override;
  void forward(float* out, float* saved, const float* qkv, int B, int S, int C, int heads) override;
  void backward(float* dqkv, float* scratch, const float* dout, const float* out, const float* qkv,
                const float* saved, int B, int S, int C, int heads) override;

  // Time of the core's attention arithmetic (block attention, merges and their backward; not its
  // communication, packing or waiting) since the last call: the measure of the causal load balance
  // between the ranks. GPU: wall time, the backend synchronised around it; CPU: process CPU time.
  double take_time_s();

 private:
  void ring_forward(float* out, float* lse, const float* qkv, int B, int S, int C, int heads);
  void ring_backward(float* dqkv, float* delta, const float* dout, const float* out, const float* qkv,
                     const float* lse, int B, int S, int C, int heads);
  void allgather_forward(float* out, float* lse, const float* qkv, int B, int S, int C, int heads);
  void allgather_backward(float* dqkv, float* delta, const float* dout, const float* out, const float* qkv,
                          const float* lse, int B, int S, int C, int heads);
  void alltoall_forward(float* out, float* saved, const float* qkv, int B, int S, int C, int heads);
  void alltoall_backward(float* dqkv, float* scratch, const float* dout, const float* saved, int B, int S, int C,
                         int heads);
  // Every rank's positions (cp · S/cp int32, rank-major) in backend memory, made on first use.
  const int32_t* positions_of(int rank);
  // The block of rank `origin`'s keys and values (packed (B, S, 2C)) against this rank's queries,
  // merged into (out, lse); the first block is written, not merged.
  void attend_block(float* out, float* lse, bool first, const float* q, const float* kv, int origin, int B, int S,
                    int C, int heads);
  // Ulysses: rows of this rank's tokens of all heads <-> rows of every rank's tokens of its heads, whole
  // sequences in position order. width: floats per head group and row (Cl, or 3·Cl for Q|K|V).
  void sequence_to_heads(float* full, const float* recv, int B, int S, int width) const;
  void heads_to_sequence(float* send, const float* full, int B, int S, int width) const;

  Backend& be_;
  ContextParallel cp_;
  CpAlgo algo_;
  int seq_, hidden_;  // the model's S (global) and h
  int32_t* positions_ = nullptr;
  double time_s_ = 0.0;
};

// The memory terms of the core for a plan (MemoryPlan's attention_* and cp), as ContextAttention
// allocates them: for the app's /memory/predicted and parabench-plan --app cp.
void plan_cp_memory(MemoryPlan& plan, CpAlgo algo, int cp);

}  // namespace pb
