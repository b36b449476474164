#include "common/memory_model.h"

#include "common/model.h"

namespace pb {

MemoryEstimate predict_replicated_model_memory(const Options& o, const AttentionFootprint& attention) {
  const ModelConfig& m = o.model;
  const int64_t P = static_cast<int64_t>(gpt_num_parameters(m));
  const int64_t N = static_cast<int64_t>(o.micro_batch) * m.seq;  // tokens of one micro-batch
  const int64_t h = m.hidden, f = m.ffn, V = m.vocab, L = m.layers;
  const int64_t att_saved = static_cast<int64_t>(attention.saved_floats);
  const int64_t att_scratch = static_cast<int64_t>(attention.scratch_floats);
  constexpr int64_t kFloat = 4, kInt32 = 4, kDouble = 8;

  MemoryEstimate e;
  e[MemCategory::parameters] = P * kFloat;
  e[MemCategory::gradients] = P * kFloat;
  e[MemCategory::optimizer_states] = 2 * P * kFloat;  // AdamW m and v
  // Activations at the end of forward, as GptModel::forward_backward allocates them:
  //   tokens and targets (2N int32), embedding output (N·h),
  //   per block: LayerNorm statistics 4N, ln1 out, qkv (3), attention out, x_mid, ln2 out and
  //   x_out (8 N·h), fc1 and GELU outputs (2 N·f), and the attention's saved floats;
  //   head: LayerNorm statistics 2N, its output N·h and the logits N·V.
  const int64_t per_block = 4 * N + 8 * N * h + 2 * N * f + att_saved;
  e[MemCategory::activations] = 2 * N * kInt32 + kFloat * (N * h + L * per_block + 2 * N + N * h + N * V);
  // Backward scratch: residual gradient, LayerNorm-output gradient, attention-output gradient (N·h
  // each), dqkv (3 N·h), dfc (N·f), attention scratch; plus the loss accumulator (one double).
  const int64_t backward_scratch = kFloat * (6 * N * h + N * f + att_scratch);
  e[MemCategory::workspace] = kDouble + backward_scratch;
  e[MemCategory::comm_buffers] = 0;
  // Peak: the model state, with every activation of the micro-batch held when backward's scratch
  // is allocated.
  e.peak_total = e[MemCategory::parameters] + e[MemCategory::gradients] + e[MemCategory::optimizer_states] +
                 e[MemCategory::activations] + e[MemCategory::workspace];
  return e;
}

}  // namespace pb
