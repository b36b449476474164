// The Backend: every tensor operation the reference model needs, behind one interface.
//
// Model and strategy code hold tensors only as pointers returned by `alloc` and never read or write
// their elements on the host: a CUDA backend hands out device pointers and runs the same calls on a
// stream. Host data crosses the boundary only through `upload`, `download` and the scalar results of
// reductions. Conventions follow llm.c: outputs first, `d<name>` for gradients, and every backward
// *accumulates* into the gradients of parameters (dweight, dbias) but *overwrites* the gradient of
// its input unless it says otherwise. Shapes use B·S = N rows ("tokens"), C = hidden, OC = outputs.
//
// Tensors that mixed precision stores in bf16 (parameters, activations and their gradients) are passed
// as TensorPtr (kernels/dtype.h), each with its own dtype: an op reads and writes each tensor in its
// dtype and computes in fp32. What is always fp32 (LayerNorm and softmax statistics, the attention's
// saved state, routing gates and probabilities, AdamW's moments and master weights) is float*.
// A backend that cannot run an op on a combination of dtypes throws std::invalid_argument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/memory.h"
#include "kernels/dtype.h"

namespace pb {

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;         // "cpu", "cuda"
  virtual std::string device_name() const = 0;  // CPU model or GPU model
  // How the matrix products compute, for the run's /config: "fp32", or the bf16 operands' library and
  // kernel ("bf16 operands, fp32 accumulation: oneDNN 2.6.3 (brg:avx512_core_bf16)").
  virtual std::string matmul_precision() const = 0;
  // False once an op has run a non-deterministic algorithm (cuDNN's attention backward where its
  // deterministic one does not fit); every op of parabench's own is deterministic.
  virtual bool deterministic() const { return true; }

  // ---- memory: every byte goes through the tracker under a category -----------------------------
  virtual void* alloc(std::size_t bytes, MemCategory category) = 0;
  virtual void free(void* ptr) = 0;
  float* alloc_floats(std::size_t count, MemCategory category) {
    return static_cast<float*>(alloc(count * sizeof(float), category));
  }
  TensorPtr alloc_tensor(std::size_t count, DType dtype, MemCategory category) {
    return TensorPtr(alloc(count * dtype_bytes(dtype), category), dtype);
  }
  void free(const ConstTensorPtr& tensor) { free(const_cast<void*>(tensor.data())); }
  virtual MemoryTracker& tracker() = 0;
  // Peak memory of the device as its driver sees it (the tracked tensors plus caches, libraries and
  // context), for /memory/device_peak_bytes; −1 when the device is the host (the process's peak
  // resident set is used instead).
  virtual int64_t device_memory_peak_bytes() { return -1; }

  // ---- the host waiting for the device ----------------------------------------------------------------
  // Three calls make the host wait for the device's queued work: download, synchronize and sum_squares
  // (a norm is a value the host needs). No other op waits for it; upload returns once the bytes are
  // staged (a GPU stages them through a ring of pinned buffers and copies them in stream order, waiting
  // at most for a copy queued a ring's length of uploads earlier). host_waits() counts those calls since
  // the backend was made, the same way on every backend (the interface counts, not the backends), so a
  // run on the CPU counts the waits its run on a GPU makes (the result file's /summary host_waits_per_step).
  std::uint64_t host_waits() const { return host_waits_; }

  // Timing device work without waiting: begin_span and end_span bracket work queued between them (a GPU
  // records events on its stream; the CPU, whose work is done when a call returns, notes the process's
  // CPU time, so that ranks sharing cores time their own work). take_span_seconds() returns the sum of the
  // spans ended since its last call and forgets them; it is for after a wait (synchronize), when their
  // work has completed. None of the three waits. Spans do not nest.
  virtual void begin_span() = 0;
  virtual void end_span() = 0;
  virtual double take_span_seconds() = 0;

  // host_src may be reused as soon as upload returns.
  virtual void upload(void* dst, const void* host_src, std::size_t bytes) = 0;
  void download(void* host_dst, const void* src, std::size_t bytes) {
    ++host_waits_;
    do_download(host_dst, src, bytes);
  }
  virtual void copy(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void zero(void* dst, std::size_t bytes) = 0;
  void synchronize() {  // wait for queued work (no-op on the CPU)
    ++host_waits_;
    do_synchronize();
  }

  // ---- layers (N = B·S rows) ---------------------------------------------------------------------
  // out (N, OC) = inp (N, C) · weight (C, OC) + bias (OC); bias may be null.
  virtual void matmul_forward(TensorPtr out, ConstTensorPtr inp, ConstTensorPtr weight, ConstTensorPtr bias, int N,
                              int C, int OC) = 0;
  // dinp (N, C) = dout · weightᵀ (overwritten); dweight (C, OC) += inpᵀ · dout; dbias (OC) += Σ dout.
  // dinp or dbias may be null when not needed.
  virtual void matmul_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout,
                               ConstTensorPtr inp, ConstTensorPtr weight, int N, int C, int OC) = 0;

  // out (N, C) = (inp − mean) · rstd · weight + bias, biased variance, eps 1e-5; saves mean, rstd (N).
  virtual void layernorm_forward(TensorPtr out, float* mean, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight,
                                 ConstTensorPtr bias, int N, int C) = 0;
  // The residual add and the LayerNorm that reads its sum, in one pass over the rows: out (N, C) = a + b
  // (rounded once into out's dtype; out may alias a or b), then ln_out, mean, rstd as
  // layernorm_forward(ln_out, mean, rstd, out, weight, bias, N, C) computes them from the stored out.
  virtual void residual_layernorm_forward(TensorPtr out, TensorPtr ln_out, float* mean, float* rstd, ConstTensorPtr a,
                                          ConstTensorPtr b, ConstTensorPtr weight, ConstTensorPtr bias, int N,
                                          int C) = 0;
  // dinp (N, C) += ...; dweight, dbias (C) += ... (all accumulate, so the residual stream can be
  // passed as dinp).
  virtual void layernorm_backward(TensorPtr dinp, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout,
                                  ConstTensorPtr inp, ConstTensorPtr weight, const float* mean, const float* rstd,
                                  int N, int C) = 0;

  // ---- the Llama-style block (SPEC 2.5) ---------------------------------------------------------
  // RMSNorm: out (N, C) = inp · rstd · weight with rstd = 1 / sqrt(mean(inp²) + 1e-5), saved (N).
  virtual void rmsnorm_forward(TensorPtr out, float* rstd, ConstTensorPtr inp, ConstTensorPtr weight, int N,
                               int C) = 0;
  // The residual add and the RMSNorm that reads its sum (as residual_layernorm_forward): out (N, C) = a + b,
  // rounded once into out's dtype (out may alias a or b), then norm_out and rstd from the stored out.
  virtual void residual_rmsnorm_forward(TensorPtr out, TensorPtr norm_out, float* rstd, ConstTensorPtr a,
                                        ConstTensorPtr b, ConstTensorPtr weight, int N, int C) = 0;
  // dinp (N, C) += ..., dweight (C) += ... (both accumulate, as layernorm_backward).
  virtual void rmsnorm_backward(TensorPtr dinp, TensorPtr dweight, ConstTensorPtr dout, ConstTensorPtr inp,
                                ConstTensorPtr weight, const float* rstd, int N, int C) = 0;
  // Rotary positions, in place: `heads` heads of d columns each from x, in rows of (B, S) tokens
  // `row_stride` elements apart (row i of sample b at x + (b·S + i)·row_stride); in each head the pairs
  // (j, j + d/2) are rotated by φ = pos[i] · theta^(−2j/d): y_j = x_j·cos φ − x_{j+d/2}·sin φ,
  // y_{j+d/2} = x_{j+d/2}·cos φ + x_j·sin φ, with cos φ and sin φ computed in double and rounded to
  // fp32. pos (S, int32, backend memory) holds the tokens' positions in their sequence. rope_backward
  // rotates by −φ: the gradient through a rotation is the rotation back. An odd d: std::invalid_argument.
  virtual void rope_forward(TensorPtr x, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                            double theta) = 0;
  virtual void rope_backward(TensorPtr dx, std::size_t row_stride, const int32_t* pos, int B, int S, int heads, int d,
                             double theta) = 0;
  // SwiGLU's gate, elementwise over n: out = silu(gate) · up, silu(z) = z / (1 + e^−z).
  virtual void swiglu_forward(TensorPtr out, ConstTensorPtr gate, ConstTensorPtr up, std::size_t n) = 0;
  // dgate = dout · up · silu'(gate), dup = dout · silu(gate) (both overwritten; dup may alias dout).
  virtual void swiglu_backward(TensorPtr dgate, TensorPtr dup, ConstTensorPtr dout, ConstTensorPtr gate,
                               ConstTensorPtr up, std::size_t n) = 0;
  // Grouped-query attention: qkv (B, S, C + 2·kv_heads·d), d = C / num_heads, holds [Q | K | V] with
  // Q of num_heads heads and K and V of kv_heads heads (kv_heads divides num_heads, else
  // std::invalid_argument); query head j attends with key/value head j / (num_heads / kv_heads). out
  // (B, S, C). `saved` and `scratch` are sized as for attention_forward's num_heads heads. With kv_heads =
  // num_heads it is attention_forward (and attention_backward).
  virtual void attention_gqa_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C,
                                     int num_heads, int kv_heads) = 0;
  // dqkv (B, S, C + 2·kv_heads·d) overwritten; a key/value head's gradient sums its query heads'.
  virtual void attention_gqa_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out,
                                      ConstTensorPtr qkv, const float* saved, int B, int S, int C, int num_heads,
                                      int kv_heads) = 0;

  // Causal multi-head attention. qkv (B, S, 3C) holds [Q | K | V]; head j owns columns j·d..j·d+d−1
  // of each block. out (B, S, C). `saved` keeps what backward needs; its size is backend-specific
  // (`attention_saved_floats`): the CPU keeps the probabilities, a fused kernel only the softmax
  // statistics.
  virtual std::size_t attention_saved_floats(int B, int S, int num_heads) const = 0;
  // True when `saved` holds the probabilities (B·heads·S² floats) rather than softmax statistics.
  virtual bool attention_keeps_probabilities() const = 0;
  virtual void attention_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C,
                                 int num_heads) = 0;
  // dqkv (B, S, 3C) overwritten. `scratch` holds attention_scratch_floats(B, S, num_heads) floats;
  // `out` is the forward's output (a fused kernel needs Σ dout·out per row).
  virtual std::size_t attention_scratch_floats(int B, int S, int num_heads) const = 0;
  virtual void attention_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out,
                                  ConstTensorPtr qkv, const float* saved, int B, int S, int C, int num_heads) = 0;

  // gelu_tanh, elementwise over n.
  virtual void gelu_forward(TensorPtr out, ConstTensorPtr inp, std::size_t n) = 0;
  // A product and its activation (the MLP's fc1): pre (N, OC) = inp · weight + bias, act = gelu_tanh(pre),
  // both kept for backward. A backend may fuse them (cuBLASLt's GELU_AUX_BIAS epilogue, which applies
  // GELU to the fp32 sum before rounding); by default, the two ops.
  virtual void matmul_gelu_forward(TensorPtr act, TensorPtr pre, ConstTensorPtr inp, ConstTensorPtr weight,
                                   ConstTensorPtr bias, int N, int C, int OC) {
    matmul_forward(pre, inp, weight, bias, N, C, OC);
    gelu_forward(act, pre, static_cast<std::size_t>(N) * OC);
  }
  // dinp = dout · gelu'(inp) (overwritten; dinp may alias dout).
  virtual void gelu_backward(TensorPtr dinp, ConstTensorPtr inp, ConstTensorPtr dout, std::size_t n) = 0;
  // The backward of the MLP's fc2 and of fc1's activation together: fc2's parameter gradients as
  // matmul_backward's (inp: fc2's input, the activation), and dpre (N, C) = (dout · weightᵀ) ⊙ gelu_tanh'(pre),
  // the gradient at fc1's output. A backend may fuse the activation's gradient into the product (cuBLASLt's
  // DGELU epilogue, which scales the fp32 sum before rounding); by default, the two ops.
  virtual void matmul_gelu_backward(TensorPtr dpre, TensorPtr dweight, TensorPtr dbias, ConstTensorPtr dout,
                                    ConstTensorPtr inp, ConstTensorPtr weight, ConstTensorPtr pre, int N, int C,
                                    int OC) {
    matmul_backward(dpre, dweight, dbias, dout, inp, weight, N, C, OC);
    gelu_backward(dpre, pre, dpre, static_cast<std::size_t>(N) * C);
  }

  // out = a + b, elementwise (out may alias a or b).
  virtual void add(TensorPtr out, ConstTensorPtr a, ConstTensorPtr b, std::size_t n) = 0;
  // y += x
  virtual void accumulate(TensorPtr y, ConstTensorPtr x, std::size_t n) = 0;
  // dst = src converted to dst's dtype (rounded to nearest even into bf16; a plain copy when the dtypes
  // agree); the regions do not overlap.
  virtual void convert(TensorPtr dst, ConstTensorPtr src, std::size_t n) = 0;

  // out (B, S, C) = tok[tokens[b, s]] + pos[s]. A negative token (outside this rank's block of a
  // vocabulary-parallel table) contributes zeros; pos may be null (not added).
  virtual void embedding_forward(TensorPtr out, const int32_t* tokens, ConstTensorPtr tok, ConstTensorPtr pos, int B,
                                 int S, int C) = 0;
  // dtok (V, C) += scattered dout rows (negative tokens skipped), dpos (S, C) += Σ_b dout (dpos may
  // be null); deterministic order.
  virtual void embedding_backward(TensorPtr dtok, TensorPtr dpos, ConstTensorPtr dout, const int32_t* tokens, int B,
                                  int S, int C) = 0;

  // Softmax cross-entropy, fused so that only one copy of the logits exists. Logits are rows of Vp
  // values of which the first V are the vocabulary and the rest its padding (ModelConfig::
  // padded_vocab), masked out: for each row, loss_sum[0] += scale · CE(logits_row[0..V), target)
  // (accumulated in double), and the logits are overwritten in place by dlogits = scale · (softmax −
  // onehot(target)) in the first V columns and 0 in the padding. loss_sum points to one double of
  // backend memory.
  virtual void cross_entropy_forward_backward(TensorPtr logits_to_dlogits, double* loss_sum, const int32_t* targets,
                                              int N, int V, int Vp, float scale) = 0;

  // Vocabulary-parallel cross-entropy (Megatron): each rank holds logits (N, Vp) of its vocabulary
  // block, V ≤ Vp of them not padding (V may be 0: a block wholly in the padding), and targets
  // relative to it (negative when the target is another rank's). Three steps, with reductions over
  // the tp group between them:
  //   row_max (N)                                      → all-reduce max (−∞ for V = 0)
  //   sums (2N) = [Σ_i exp(z − max) | z_target − max]  → all-reduce sum
  //   finish: loss_sum += scale · Σ_rows (log sums − target term); logits become
  //           dlogits = scale · (softmax − onehot), 0 in the padding.
  virtual void cross_entropy_row_max(float* row_max, ConstTensorPtr logits, int N, int V, int Vp) = 0;
  virtual void cross_entropy_partials(float* sums, ConstTensorPtr logits, const int32_t* targets,
                                      const float* row_max, int N, int V, int Vp) = 0;
  virtual void cross_entropy_finish(TensorPtr logits_to_dlogits, double* loss_sum, const int32_t* targets,
                                    const float* row_max, const float* sums, int N, int V, int Vp, float scale) = 0;

  // ---- context parallelism: attention split by position over blocks of keys ----------------------
  // Queries are rows of (B, Sq) tokens and keys and values rows of (B, Sk) tokens; head j owns columns
  // j·d..j·d+d−1 (d = C / heads) of a row. Row i of sample b starts at q + (b·Sq + i)·q_stride (keys and
  // values alike with kv_stride), so q, k and v can point into a (B, S, 3C) qkv buffer (stride 3C) or a
  // packed (B, S, 2C) key-value buffer (stride 2C, v = k + C). pos_q (Sq) and pos_k (Sk) are the tokens'
  // global positions (int32, backend memory, the same for every sample): key j is visible to query i
  // when pos_k[j] ≤ pos_q[i] (the causal mask of SPEC section 2 by position).
  //
  // out (B, Sq, C) = per head, softmax over the visible keys of q·kᵀ/√d, times v (overwritten; 0 for a
  // query that sees no key); lse (B, heads, Sq) = log Σ_visible exp(q·kᵀ/√d) (−inf when none).
  // kv_heads (grouped-query attention, SPEC 2.5; 0: heads): k and v hold kv_heads heads of d columns, and
  // query head j reads key/value head j / (heads / kv_heads).
  virtual void attention_block_forward(TensorPtr out, float* lse, ConstTensorPtr q, ConstTensorPtr k,
                                       ConstTensorPtr v, int q_stride, int kv_stride, const int32_t* pos_q,
                                       const int32_t* pos_k, int B, int Sq, int Sk, int C, int heads,
                                       int kv_heads = 0) = 0;
  // Merges a block's partial result (out_b, lse_b) into the running one (out, lse), per row and head:
  // with m = max(lse, lse_b), w = e^(lse − m), w_b = e^(lse_b − m): out = (w·out + w_b·out_b) / (w + w_b),
  // lse = m + log(w + w_b). A side at −inf contributes nothing; both at −inf leave out and lse unchanged.
  virtual void attention_merge(TensorPtr out, float* lse, ConstTensorPtr out_b, const float* lse_b, int B, int Sq,
                               int C, int heads) = 0;
  // delta (B, heads, Sq) = Σ over the head's d columns of dout·out, per row (overwritten; dout and out
  // are (B, Sq, C), like the forward's out): the term
  // the softmax's backward needs, from the final (merged) output.
  virtual void attention_block_delta(float* delta, ConstTensorPtr dout, ConstTensorPtr out, int B, int Sq, int C,
                                     int heads) = 0;
  // Backward of the whole attention one key block at a time (FlashAttention's), from the final lse and
  // delta: with P = exp(q·kᵀ/√d − lse) over the visible keys (0 elsewhere) and dP = dout·vᵀ,
  //   dq += (P ∘ (dP − delta))·k / √d,   dk += (P ∘ (dP − delta))ᵀ·q / √d,   dv += Pᵀ·dout
  // (all accumulate; dq rows q_stride apart as q, dk and dv kv_stride apart as k and v). The merge's
  // backward is in it: each block's share of the final softmax is P.
  // With kv_heads < heads a key/value head's dk and dv add up its query heads' (as the forward).
  virtual void attention_block_backward(TensorPtr dq, TensorPtr dk, TensorPtr dv, ConstTensorPtr dout,
                                        const float* lse, const float* delta, ConstTensorPtr q, ConstTensorPtr k,
                                        ConstTensorPtr v, int q_stride, int kv_stride, const int32_t* pos_q,
                                        const int32_t* pos_k, int B, int Sq, int Sk, int C, int heads,
                                        int kv_heads = 0) = 0;
  // A 2-D copy: `rows` rows of `cols` elements from src (rows src_stride elements apart) to dst (dst_stride
  // apart), both of one dtype; both strides at least cols, and the regions do not overlap.
  virtual void copy_2d(TensorPtr dst, std::size_t dst_stride, ConstTensorPtr src, std::size_t src_stride,
                       std::size_t rows, std::size_t cols) = 0;

  // ---- mixture of experts (SPEC section 9): N tokens, E experts, k chosen per token ------------------
  // An assignment (n, j) is token n's j-th chosen expert (1 ≤ k ≤ E). Dispatch and combine buffers
  // are (E, C, h): expert e's C slots of h values, slot s of expert e at row e·C + s, with the
  // capacity of moe_assign at most C. Integer outputs (int32) are overwritten; a slot of −1 marks a
  // dropped assignment. Callers order the accumulating calls: moe_router_backward overwrites dlogits
  // before moe_aux_loss adds to them.
  //
  // Router, from logits (N, E): probs (N, E) = softmax over all E (the auxiliary loss uses it);
  // expert (N, k) = the indices of the k largest logits, largest first (ties: the lower index first);
  // gate (N, k) = softmax over those k logits, in the same order.
  virtual void moe_router_forward(int32_t* expert, float* gate, float* probs, ConstTensorPtr logits, int N, int E,
                                  int k) = 0;
  // Its backward: dlogits (N, E) overwritten with the gradient of the gates' softmax,
  // dlogits[n, expert[n, j]] = gate[n, j] · (dgate[n, j] − Σ_i gate[n, i] · dgate[n, i]), zero elsewhere.
  virtual void moe_router_backward(TensorPtr dlogits, const float* dgate, const float* gate, const int32_t* expert,
                                   int N, int E, int k) = 0;
  // Capacity: walking the assignments in (n, j) order, slot[n, j] = the number of assignments expert
  // expert[n, j] has kept so far if that is below `capacity`, else −1 (dropped). counts (2E) =
  // [kept per expert | routed per expert (kept + dropped)].
  virtual void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k,
                          int capacity) = 0;
  // Switch Transformer load-balancing loss with f_e = routed[e] / (N·k) (routed = counts + E, held
  // constant) and P_e = (1/N) Σ_n probs[n, e]: aux_sum[0] += coef · E · Σ_e f_e · P_e (in double), and
  // dlogits (N, E) += grad_scale · ∂(coef · E · Σ_e f_e · P_e)/∂logits through the softmax, i.e. with
  // c_e = grad_scale · coef · E · f_e / N: dlogits[n, i] += probs[n, i] · (c_i − Σ_e c_e · probs[n, e]).
  virtual void moe_aux_loss(TensorPtr dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N,
                            int E, int k, float coef, float grad_scale) = 0;
  // Dispatch: buf (E, C, h) = zero, then buf[expert[n, j], slot[n, j]] = inp[n] (h values) for every
  // kept assignment.
  virtual void moe_dispatch(TensorPtr buf, ConstTensorPtr inp, const int32_t* expert, const int32_t* slot, int N,
                            int E, int k, int C, int h) = 0;
  // Its backward: dinp (N, h) overwritten, dinp[n] = Σ_j over kept assignments, in j order, of
  // dbuf[expert[n, j], slot[n, j]].
  virtual void moe_dispatch_backward(TensorPtr dinp, ConstTensorPtr dbuf, const int32_t* expert, const int32_t* slot,
                                     int N, int E, int k, int C, int h) = 0;
  // Combine: out (N, h) overwritten, out[n] = Σ_j over kept assignments, in j order, of
  // gate[n, j] · buf[expert[n, j], slot[n, j]] (zero when all of token n's are dropped).
  virtual void moe_combine(TensorPtr out, ConstTensorPtr buf, const float* gate, const int32_t* expert,
                           const int32_t* slot, int N, int E, int k, int C, int h) = 0;
  // Its backward, both overwritten: dbuf (E, C, h) = zero, then dbuf[expert[n, j], slot[n, j]] =
  // gate[n, j] · dout[n] for kept assignments; dgate (N, k) = dout[n] · buf[expert[n, j], slot[n, j]]
  // (a dot product over h, accumulated in double), 0 for dropped ones.
  virtual void moe_combine_backward(TensorPtr dbuf, float* dgate, ConstTensorPtr dout, ConstTensorPtr buf,
                                    const float* gate, const int32_t* expert, const int32_t* slot, int N, int E,
                                    int k, int C, int h) = 0;

  // ---- optimizer ---------------------------------------------------------------------------------
  // Norms over many tensors at once: sums[b] (host memory, b < bins) = Σ over the pieces of bin b, in
  // their order, of Σ x² over the piece's n elements (each piece accumulated in double in fixed chunks);
  // one host wait however many pieces, so a norm over a model's tensors costs one wait, not one per tensor.
  struct SquaresPiece {
    ConstTensorPtr x;
    std::size_t n;
    int bin;  // 0 ≤ bin < bins
  };
  void sum_squares(double* sums, int bins, const std::vector<SquaresPiece>& pieces) {
    for (const SquaresPiece& p : pieces) {
      if (p.bin < 0 || p.bin >= bins) throw std::invalid_argument("sum_squares: a piece's bin outside [0, bins)");
    }
    ++host_waits_;
    do_sum_squares(sums, bins, pieces);
  }
  // Σ x² over n elements, accumulated in double, returned to the host (one piece, one wait).
  double sum_squares(ConstTensorPtr x, std::size_t n) {
    double sum = 0.0;
    sum_squares(&sum, 1, {SquaresPiece{x, n, 0}});
    return sum;
  }
  // y *= alpha
  virtual void scale(TensorPtr y, float alpha, std::size_t n) = 0;
  // AdamW as torch.optim.AdamW, step t ≥ 1, on fp32 parameters (the master weights in mixed precision);
  // the gradient (fp32 or bf16) is multiplied by grad_scale first (clipping).
  virtual void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v, std::size_t n, float lr,
                            float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale) = 0;
  // The same over several ranges of the same flat buffers, each with its weight decay (a model's
  // matrices decay, its biases and LayerNorm parameters do not): element i of a range is element
  // begin + i of params, grads, m and v. The ranges do not overlap. A GPU updates them all in one launch.
  struct AdamwRange {
    std::size_t begin;
    std::size_t n;
    float weight_decay;
  };
  virtual void adamw_update(float* params, ConstTensorPtr grads, float* m, float* v,
                            const std::vector<AdamwRange>& ranges, float lr, float beta1, float beta2, float eps,
                            int t, float grad_scale) = 0;

 protected:
  virtual void do_download(void* host_dst, const void* src, std::size_t bytes) = 0;
  virtual void do_synchronize() = 0;
  virtual void do_sum_squares(double* sums, int bins, const std::vector<SquaresPiece>& pieces) = 0;

 private:
  std::uint64_t host_waits_ = 0;
};

}  // namespace pb
