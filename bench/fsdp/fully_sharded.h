// Sharded data parallelism: ZeRO stages 1-3 (Rajbhandari et al., SC 2020) as PyTorch FSDP names them
// (Zhao et al., VLDB 2023), with FSDP's hybrid sharding.
//
// The sharding unit is one unit of the model (embedding, a block, final LayerNorm + head). A unit of
// n elements is split over the shard group's G ranks as G shards of ceil(n / G) elements, the last
// padded with zeros; padding is allocated and counted like everything else.
//
//   NO_SHARD       everything whole on every rank; gradients all-reduced per unit (DDP)
//   ZERO1          optimizer states sharded; gradients reduce-scattered, parameters all-gathered
//                  after the step
//   SHARD_GRAD_OP  ZeRO-2: gradients sharded too; each unit's gradient exists whole only during its
//                  backward, then is reduce-scattered into the shard
//   FULL_SHARD     ZeRO-3: parameters sharded too; a unit is all-gathered before its forward and again
//                  before its backward, freed after each, and the next unit's gather is prefetched
//   HYBRID_SHARD   FULL_SHARD within groups of --shard-group ranks, the shards all-reduced across
//                  groups
// Every rank steps AdamW on its shard only; clipping uses the norm over all shards.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "common/memory_model.h"
#include "common/runner.h"

namespace CLI {
class App;
}

namespace pb {

struct FsdpOptions {
  ShardStrategy shard = ShardStrategy::full_shard;
  int shard_group = 0;  // HYBRID_SHARD: ranks per shard group
  bool prefetch = true;
};

class FullyShardedDataParallel final : public Strategy {
 public:
  // held: the units this rank holds (a pipeline stage's; empty: all of them); data_group: the ranks that
  // hold the same parameters, which a unit is sharded over (null: the dp group; dp × cp with context
  // parallelism, as Megatron's distributed optimizer). With tensor parallelism each tp rank shards its
  // own slices; the norms sum the slices over the tp group (and cover the held units only: a pipeline sums
  // them over its stages).
  FullyShardedDataParallel(Runtime& runtime, const FsdpOptions& options, std::vector<int> held = {},
                           Communicator* data_group = nullptr);
  ~FullyShardedDataParallel() override;

  ConstTensorPtr unit_params(int unit) override;
  TensorPtr unit_grads(int unit) override;
  void before_forward(int unit) override;
  void after_forward(int unit) override;
  void before_backward(int unit) override;
  void after_backward(int unit) override;
  void grad_ready(int unit) override;

  void zero_grads() override;
  void begin_micro_batch(int /*micro*/, bool last) override { last_micro_batch_ = last; }
  void finish_gradients() override;
  double global_grad_sum_squares() override;
  void optimizer_step(float grad_scale, int t) override;
  double global_param_sum_squares() override;
  std::vector<float> gather_full_gradients() override;

 private:
  // Where unit u lives: whole (padded) at full_[u], this rank's shard at shard_[u], s_[u] elements
  // per shard, of which valid_[u] hold real parameters (the rest is padding).
  struct UnitLayout {
    std::size_t numel, shard, valid, full_offset, shard_offset;
  };
  struct GatherIssue {  // a gather for the trace: when it was issued, and in which hook
    double issued_s = 0;
    std::string hook;
  };
  bool params_sharded() const;
  bool grads_sharded() const;
  TensorPtr shard_params(int u);  // this rank's shard of the unit's parameters
  TensorPtr shard_grads(int u);   // this rank's shard of the unit's gradients
  float* shard_fp32_params(int u);  // this rank's shard of what the optimizer updates (master or parameters)
  void gather(int u, bool async);
  // The trace's span of a gather that completed now ("all_gather unit u": unit, prefetch, issued_in).
  void trace_gather(int u, const GatherIssue& issue, bool prefetch);
  void wait_gathered(int u);
  void release(int u);
  void reduce_scatter_into_shard(int u, ConstTensorPtr whole);
  // ZERO1, SHARD_GRAD_OP: every rank's (updated) parameter shard to every rank's whole parameters.
  void all_gather_params(int u);
  // Σ x² over this rank's shards of the held units (base: a shard accessor), tensor-parallel slices
  // summed over the tp group, then over the shard group.
  template <typename ShardOf>
  double sum_squares(ShardOf shard_of);
  // fn(unit, position in the shard, length, tensor) for each piece of a tensor in this rank's shards of the
  // held units (the real elements, not the padding).
  template <typename Fn>
  void for_each_shard_piece(Fn&& fn) const;

  Runtime& rt_;
  Backend& be_;
  FsdpOptions options_;
  Communicator& data_group_;                 // the ranks that hold the same parameters (dp, or dp × cp)
  Communicator* shard_group_;                // the ranks a unit is sharded over: the data group, or a hybrid group
  Communicator* replicate_group_ = nullptr;  // HYBRID_SHARD: the ranks holding the same shard
  int shard_rank_, shard_size_;
  std::vector<UnitLayout> layout_;  // per unit of the model; units not held have no elements
  std::vector<bool> held_;
  int first_held_ = 0, last_held_ = 0;
  std::size_t full_total_ = 0, shard_total_ = 0;

  TensorPtr params_;          // whole (padded) or this rank's shards, by strategy; the model's dtype
  TensorPtr grads_;           // whole (padded) or this rank's shards, by strategy; the gradients' dtype
  float* master_ = nullptr;   // bf16 parameters: their fp32 master weights, this rank's shards (NO_SHARD: whole)
  float* adam_m_ = nullptr;   // this rank's shards (NO_SHARD: whole)
  float* adam_v_ = nullptr;
  std::vector<TensorPtr> gathered_;   // FULL_SHARD: whole parameters of units in use
  std::vector<Request> gathering_;    // FULL_SHARD: gathers in flight
  std::vector<GatherIssue> gather_issued_;  // FULL_SHARD: when and where each gather in flight was issued
  std::string hook_;  // the hook running: "before_forward 3", "before_backward 2"
  std::vector<TensorPtr> unit_grad_;  // SHARD_GRAD_OP, FULL_SHARD: whole gradient during backward
  bool last_micro_batch_ = true;
};

// The sharding of a plan under these options over `dp` ranks (what predict_memory and the planner's
// collectives read): the strategy, the ranks a unit is sharded over (HYBRID_SHARD: its group; NO_SHARD:
// 1; otherwise dp) and whether gathers are prefetched.
void plan_fsdp_sharding(MemoryPlan& plan, const FsdpOptions& fsdp, int dp);

// parabench-fsdp's options as typed, which parabench-hybrid takes too.
struct FsdpCli {
  FsdpOptions fsdp;
  std::string shard_name = "FULL_SHARD";
  bool no_prefetch = false;
  bool shard_group_given = false;  // --shard-group on the command line (or set by a caller without one)
};
// --shard, --shard-group and --no-prefetch (default shard: default_shard).
void add_fsdp_options(CLI::App& cli, FsdpCli& fsdp, const std::string& default_shard = "FULL_SHARD");
// Their rules (throws ConfigError naming the option): a known strategy, --shard-group with HYBRID_SHARD only
// and dividing the data ranks (data_ranks: dp, or dp × cp, named data_ranks_name in the message),
// --no-prefetch with gathering strategies only. Resolves fsdp.fsdp.
void validate_fsdp_options(FsdpCli& fsdp, int data_ranks, const std::string& data_ranks_name = "dp");

// parabench-fsdp: its options (kept by the definition), their rules, its layout, a rank's memory and the
// strategy; main.cpp runs it, parabench-plan plans from it.
AppDefinition make_fsdp_app();

}  // namespace pb
