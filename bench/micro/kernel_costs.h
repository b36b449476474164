// The work of one call of each Backend kernel, in the terms parabench-micro reports it and the planner
// times it (bench/plan/step_time.cpp): FLOPs for the attention, as SPEC 6 counts model FLOPs (the full
// T×T products), bytes read plus written for the memory-bound kernels, each tensor once, at its dtype's
// size e (statistics: fp32). One source for both, so that a call at a benchmarked shape costs exactly
// what the benchmark measured. B micro-batch, T sequence, C width, N = B·T rows, n elements, P parameters.
#pragma once

namespace pb::kernel_cost {

// Q·Kᵀ and P·V: 2·T²·d each per sample and head.
inline double attention_forward_flop(double B, double T, double C) { return 4 * B * T * T * C; }
// dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q: twice the forward.
inline double attention_backward_flop(double B, double T, double C) { return 8 * B * T * T * C; }
// inp read, out written, weight and bias read, mean and rstd written.
inline double layernorm_forward_bytes(double N, double C, double e) { return (2 * N * C + 2 * C) * e + 2 * N * 4; }
// The residual add fused with the LayerNorm after it: a and b read, out and ln_out written, weight and
// bias read, mean and rstd written (the LayerNorm's reads of out hit the cache: the row was just written).
inline double residual_layernorm_forward_bytes(double N, double C, double e) {
  return (4 * N * C + 2 * C) * e + 2 * N * 4;
}
// dout and inp read, dinp read and written (accumulated), weight read, dweight and dbias read and
// written, mean and rstd read.
inline double layernorm_backward_bytes(double N, double C, double e) { return (4 * N * C + 5 * C) * e + 2 * N * 4; }
// inp read, out written.
inline double gelu_forward_bytes(double n, double e) { return 2 * n * e; }
// inp and dout read, dinp written.
inline double gelu_backward_bytes(double n, double e) { return 3 * n * e; }
// The residual, out = a + b in place.
inline double add_bytes(double n, double e) { return 3 * n * e; }
// One token row read per token, the position table (positions rows; 0 without one) read, out written,
// the int32 tokens read.
inline double embedding_forward_bytes(double N, double positions, double C, double e) {
  return (2 * N * C + positions * C) * e + 4 * N;
}
// dout read, one dtok row read and written per token, dpos read and written, the tokens read.
inline double embedding_backward_bytes(double N, double positions, double C, double e) {
  return (3 * N * C + 2 * positions * C) * e + 4 * N;
}
// The Llama-style block (SPEC 2.5). RMSNorm: inp read, out written, weight read, rstd written.
inline double rmsnorm_forward_bytes(double N, double C, double e) { return (2 * N * C + C) * e + N * 4; }
// The residual add fused with RMSNorm: a and b read, out and norm_out written, weight read, rstd written.
inline double residual_rmsnorm_forward_bytes(double N, double C, double e) { return (4 * N * C + C) * e + N * 4; }
// dout and inp read, dinp read and written (accumulated), weight read, dweight read and written, rstd read.
inline double rmsnorm_backward_bytes(double N, double C, double e) { return (4 * N * C + 3 * C) * e + N * 4; }
// Rotary positions in place: `columns` values of each of N tokens read and written (the Q and K heads),
// the int32 positions (T) read; cos and sin are computed, not read.
inline double rope_bytes(double N, double T, double columns, double e) { return 2 * N * columns * e + 4 * T; }
// SwiGLU: gate and up read, out written; its backward reads dout, gate and up and writes dgate and dup.
inline double swiglu_forward_bytes(double n, double e) { return 3 * n * e; }
inline double swiglu_backward_bytes(double n, double e) { return 5 * n * e; }
// The fused softmax cross-entropy, forward and backward in one call: the logits read and overwritten by
// dlogits, the int32 targets read (the 8-byte loss left out).
inline double cross_entropy_bytes(double N, double V, double e) { return 2 * N * V * e + 4 * N; }
// The gradient norm: the gradients read.
inline double sum_squares_bytes(double P, double e) { return P * e; }
// The gradients zeroed at the start of a step.
inline double zero_bytes(double P, double e) { return P * e; }
// y += x over a gradient buffer (fsdp adds each reduce-scattered block into its shard): y read and
// written, x read.
inline double accumulate_bytes(double n, double e) { return 3 * n * e; }
// adamw_update: fp32 parameters (or master weights), m and v read and written, the gradients read.
inline double adamw_bytes(double P, double grad_e) { return (24 + grad_e) * P; }
// Mixed precision: the fp32 master weights read, rounded into the e-byte parameters.
inline double convert_bytes(double P, double e) { return (4 + e) * P; }

}  // namespace pb::kernel_cost
