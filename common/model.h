// The reference model of SPEC section 2 (GPT, pre-LayerNorm, untied head) with explicit forward
// and backward passes over the Backend, and its parameters in flat per-unit storage.
//
// A unit is the embedding, one block, or the final LayerNorm with the head (ARCHITECTURE.md seam 2).
// All units live in one flat buffer each for parameters, gradients and AdamW's m and v, in forward
// order, so a strategy can address "the gradients of unit u" or "a bucket of the last N bytes" as a
// range. Forward saves what backward needs under `activations`; backward frees it and uses scratch
// under `workspace`. Model code never reads tensor elements on the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/options.h"
#include "kernels/backend.h"

namespace pb {

struct TensorInfo {
  std::string name;     // spec name, e.g. "block0.attn.qkv.w"
  int64_t rows = 1;     // global shape [rows, cols]; a 1-D tensor of n elements is [1, n]
  int64_t cols = 1;
  std::size_t offset = 0;  // in the model's flat buffer
  std::size_t numel() const { return static_cast<std::size_t>(rows * cols); }
  bool is_matrix = false;  // two or more dimensions: gets weight decay
};

struct UnitInfo {
  std::string name;  // "embed", "block3", "head"
  std::size_t offset = 0, numel = 0;
  std::vector<TensorInfo> tensors;
};

// The units of the model in forward order, with offsets in one flat buffer.
std::vector<UnitInfo> gpt_units(const ModelConfig& config);
std::size_t gpt_num_parameters(const ModelConfig& config);

// Called by the model around each unit; strategies hook gradient sync (and later sharding) here.
class UnitHooks {
 public:
  virtual ~UnitHooks() = default;
  virtual void before_forward(int /*unit*/) {}
  virtual void after_forward(int /*unit*/) {}
  virtual void before_backward(int /*unit*/) {}
  virtual void after_backward(int /*unit*/) {}
  // The gradients of `unit` are complete for this micro-batch.
  virtual void grad_ready(int /*unit*/) {}
};

class GptModel {
 public:
  GptModel(const ModelConfig& config, Backend& backend, uint64_t seed, int micro_batch);
  ~GptModel();
  GptModel(const GptModel&) = delete;
  GptModel& operator=(const GptModel&) = delete;

  const ModelConfig& config() const { return config_; }
  const std::vector<UnitInfo>& units() const { return units_; }
  std::size_t num_parameters() const { return num_params_; }
  int num_units() const { return static_cast<int>(units_.size()); }

  float* params() { return params_; }
  float* grads() { return grads_; }

  // Sets the gradients to zero (start of a step).
  void zero_grads();

  // One micro-batch: forward, loss and backward. tokens and targets are host arrays (B·S); the
  // micro-batch adds scale · Σ cross-entropy to the device loss accumulator and accumulates that
  // loss's gradient into grads().
  void forward_backward(const int32_t* tokens, const int32_t* targets, float scale, UnitHooks& hooks);

  // The step's loss so far (scale · Σ CE over its micro-batches) and a reset for the next step.
  double take_loss();

  // AdamW over the flat range [first, first + count) of params, grads, m, v, tensor by tensor
  // (weight decay on matrices only), with the gradient multiplied by grad_scale (clipping).
  void adamw_step(std::size_t first, std::size_t count, float grad_scale, int t, double lr);

  // Σ p² over all parameters (for the final parameter norm).
  double param_sum_squares();

 private:
  struct BlockActs;
  struct HeadActs;
  void block_forward(int layer, const float* x_in, BlockActs& a);
  // Pointers to the tensors of a unit, in the order gpt_units lists them.
  std::vector<float*> unit_tensors(float* base, int unit) const;

  ModelConfig config_;
  Backend& backend_;
  int micro_batch_;
  std::vector<UnitInfo> units_;
  std::size_t num_params_ = 0;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  float* adam_m_ = nullptr;
  float* adam_v_ = nullptr;
  double* loss_sum_ = nullptr;  // device scalar
};

}  // namespace pb
