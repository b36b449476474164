#include "bench/cp/context_attention.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/timer.h"

namespace pb {

bool parse_cp_algo(const std::string& name, CpAlgo* out) {
  if (name == "ring") *out = CpAlgo::ring;
  else if (name == "allgather") *out = CpAlgo::allgather;
  else if (name == "alltoall") *out = CpAlgo::alltoall;
  else return false;
  return true;
}

const char* cp_algo_name(CpAlgo algo) {
  switch (algo) {
    case CpAlgo::ring: return "ring";
    case CpAlgo::allgather: return "allgather";
    case CpAlgo::alltoall: return "alltoall";
  }
  return "unknown";
}

namespace {
// The time of the attention arithmetic in a scope, added to the backend's running span sum
// (Backend::begin_span): on a GPU the device's time between two events, read after the step's wait, so
// timing it costs no host wait; on the CPU the process's CPU time, so that ranks sharing cores
// (oversubscribed, as on a small test machine) measure their own work rather than their share of the cores.
class Stopwatch {
 public:
  explicit Stopwatch(Backend& backend) : be_(backend) { be_.begin_span(); }
  ~Stopwatch() { be_.end_span(); }
  Stopwatch(const Stopwatch&) = delete;
  Stopwatch& operator=(const Stopwatch&) = delete;

 private:
  Backend& be_;
};
}  // namespace

ContextAttention::ContextAttention(Backend& backend, const ContextParallel& cp, CpAlgo algo, int seq, int hidden,
                                   int kv_hidden, DType dtype)
    : be_(backend), cp_(cp), algo_(algo), seq_(seq), hidden_(hidden), kv_hidden_(kv_hidden), dtype_(dtype) {}

ContextAttention::~ContextAttention() { be_.free(positions_); }

double ContextAttention::take_time_s() { return be_.take_span_seconds(); }

// ---- what the model allocates for the core ----------------------------------------------------------
// ring, allgather: the forward keeps the log-sum-exp (B, heads, S/cp) beside the output; backward's
// scratch is delta, the same shape. alltoall keeps, for whole sequences of its heads/cp heads, Q|K|V,
// the output and the backend attention's saved state; its scratch is their gradients and the backend
// attention's scratch.

std::size_t ContextAttention::saved_floats(int B, int S, int heads) const {
  if (algo_ != CpAlgo::alltoall) return static_cast<std::size_t>(B) * heads * S;
  return floats_of(static_cast<std::size_t>(B) * seq_ * full_width()) +
         be_.attention_saved_floats(B, seq_, heads / cp_.size);
}

bool ContextAttention::keeps_probabilities() const {
  return algo_ == CpAlgo::alltoall && be_.attention_keeps_probabilities();
}

std::size_t ContextAttention::scratch_floats(int B, int S, int heads) const {
  if (algo_ != CpAlgo::alltoall) return static_cast<std::size_t>(B) * heads * S;
  return floats_of(static_cast<std::size_t>(B) * seq_ * full_width()) +
         be_.attention_scratch_floats(B, seq_, heads / cp_.size);
}

const int32_t* ContextAttention::positions_of(int rank) {
  const std::size_t S = seq_ / cp_.size;
  if (positions_ == nullptr) {
    std::vector<int32_t> all;
    for (int r = 0; r < cp_.size; ++r) {
      const std::vector<int32_t> p = cp_.positions(seq_, r);
      all.insert(all.end(), p.begin(), p.end());
    }
    positions_ = static_cast<int32_t*>(be_.alloc(all.size() * sizeof(int32_t), MemCategory::workspace));
    be_.upload(positions_, all.data(), all.size() * sizeof(int32_t));
  }
  return positions_ + static_cast<std::size_t>(rank) * S;
}

void ContextAttention::check_heads(int C, int heads, int kv_heads) const {
  if (C != hidden_ || kv_heads < 1 || heads % kv_heads != 0 || C / heads * kv_heads != kv_hidden_) {
    throw std::invalid_argument("ContextAttention: " + std::to_string(heads) + " heads and " + std::to_string(kv_heads) +
                                " key/value heads of width " + std::to_string(C) + " do not match the core's " +
                                std::to_string(hidden_) + " and " + std::to_string(kv_hidden_));
  }
}

void ContextAttention::forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C, int heads,
                               int kv_heads) {
  check_heads(C, heads, kv_heads);
  switch (algo_) {
    case CpAlgo::ring: ring_forward(out, saved, qkv, B, S, C, heads, kv_heads); break;
    case CpAlgo::allgather: allgather_forward(out, saved, qkv, B, S, C, heads, kv_heads); break;
    case CpAlgo::alltoall: alltoall_forward(out, saved, qkv, B, S, C, heads, kv_heads); break;
  }
}

void ContextAttention::backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, ConstTensorPtr out,
                                ConstTensorPtr qkv, const float* saved, int B, int S, int C, int heads,
                                int kv_heads) {
  check_heads(C, heads, kv_heads);
  switch (algo_) {
    case CpAlgo::ring: ring_backward(dqkv, scratch, dout, out, qkv, saved, B, S, C, heads, kv_heads); break;
    case CpAlgo::allgather: allgather_backward(dqkv, scratch, dout, out, qkv, saved, B, S, C, heads, kv_heads); break;
    case CpAlgo::alltoall: alltoall_backward(dqkv, scratch, dout, saved, B, S, C, heads, kv_heads); break;
  }
}

// ---- ring and allgather: blocks of keys, merged by log-sum-exp ------------------------------------------

void ContextAttention::attend_block(TensorPtr out, float* lse, bool first, ConstTensorPtr q, ConstTensorPtr kv,
                                    int origin, int B, int S, int C, int heads, int kv_heads) {
  const int32_t* pos_q = positions_of(cp_.rank);
  const int32_t* pos_k = positions_of(origin);
  const int Ckv = kv_hidden_, W = C + 2 * Ckv;
  if (first) {
    Stopwatch watch(be_);
    be_.attention_block_forward(out, lse, q, kv, kv + Ckv, W, 2 * Ckv, pos_q, pos_k, B, S, S, C, heads, kv_heads);
    return;
  }
  const std::size_t rows = static_cast<std::size_t>(B) * S;
  TensorPtr out_b = alloc_act(rows * C, MemCategory::workspace);
  float* lse_b = be_.alloc_floats(rows * heads, MemCategory::workspace);
  {
    Stopwatch watch(be_);
    be_.attention_block_forward(out_b, lse_b, q, kv, kv + Ckv, W, 2 * Ckv, pos_q, pos_k, B, S, S, C, heads, kv_heads);
    be_.attention_merge(out, lse, out_b, lse_b, B, S, C, heads);
  }
  be_.free(lse_b);
  be_.free(out_b);
}

void ContextAttention::ring_forward(TensorPtr out, float* lse, ConstTensorPtr qkv, int B, int S, int C, int heads,
                                    int kv_heads) {
  const int n = cp_.size, next = (cp_.rank + 1) % n, prev = (cp_.rank + n - 1) % n;
  const std::size_t KV = 2 * static_cast<std::size_t>(kv_hidden_), W = C + KV;  // K|V and Q|K|V widths
  const std::size_t rows = static_cast<std::size_t>(B) * S, block = rows * KV;
  TensorPtr cur = alloc_act(block, MemCategory::comm_buffers);  // K|V of the block in hand
  TensorPtr nxt = alloc_act(block, MemCategory::comm_buffers);  // the one arriving
  be_.copy_2d(cur, KV, qkv + C, W, rows, KV);
  for (int s = 0; s < n; ++s) {
    Request hop;
    if (s + 1 < n) hop = cp_.comm->send_recv_async(cur, next, nxt, prev, block, s);  // pass it on meanwhile
    attend_block(out, lse, s == 0, qkv, cur, (cp_.rank + n - s) % n, B, S, C, heads, kv_heads);
    if (s + 1 < n) {
      hop->wait();
      std::swap(cur, nxt);
    }
  }
  be_.free(nxt);
  be_.free(cur);
}

void ContextAttention::ring_backward(TensorPtr dqkv, float* delta, ConstTensorPtr dout, ConstTensorPtr out,
                                     ConstTensorPtr qkv, const float* lse, int B, int S, int C, int heads,
                                     int kv_heads) {
  const int n = cp_.size, next = (cp_.rank + 1) % n, prev = (cp_.rank + n - 1) % n;
  const std::size_t Ckv = kv_hidden_, KV = 2 * Ckv, W = C + KV;
  const std::size_t rows = static_cast<std::size_t>(B) * S, block = rows * KV, elem = dtype_bytes(dtype_);
  const int32_t* pos_q = positions_of(cp_.rank);
  be_.zero(dqkv.data(), rows * W * elem);
  be_.attention_block_delta(delta, dout, out, B, S, C, heads);
  TensorPtr cur = alloc_act(block, MemCategory::comm_buffers);   // K|V of the block in hand
  TensorPtr nxt = alloc_act(block, MemCategory::comm_buffers);
  TensorPtr dcur = alloc_act(block, MemCategory::comm_buffers);  // its dK|dV, accumulating on the way
  TensorPtr dnxt = alloc_act(block, MemCategory::comm_buffers);
  be_.copy_2d(cur, KV, qkv + C, W, rows, KV);
  be_.zero(dcur.data(), block * elem);
  for (int s = 0; s < n; ++s) {
    const int origin = (cp_.rank + n - s) % n;
    Request kv_hop;  // the next block's K|V travels while this one is differentiated
    if (s + 1 < n) kv_hop = cp_.comm->send_recv_async(cur, next, nxt, prev, block, 2 * s);
    const int32_t* pos_k = positions_of(origin);
    {
      Stopwatch watch(be_);
      be_.attention_block_backward(dqkv, dcur, dcur + Ckv, dout, lse, delta, qkv, cur, cur + Ckv, W, KV, pos_q,
                                   pos_k, B, S, S, C, heads, kv_heads);
    }
    // The block's gradient goes on with it (after the last block: home to its owner, the next rank).
    cp_.comm->send_recv_async(dcur, next, dnxt, prev, block, 2 * s + 1)->wait();
    std::swap(dcur, dnxt);
    if (s + 1 < n) {
      kv_hop->wait();
      std::swap(cur, nxt);
    }
  }
  // dcur is this rank's own dK|dV now, complete.
  be_.copy_2d(dqkv + C, W, dcur, KV, rows, KV);
  for (TensorPtr p : {dnxt, dcur, nxt, cur}) be_.free(p);
}

void ContextAttention::allgather_forward(TensorPtr out, float* lse, ConstTensorPtr qkv, int B, int S, int C,
                                         int heads, int kv_heads) {
  const int n = cp_.size;
  const std::size_t KV = 2 * static_cast<std::size_t>(kv_hidden_), W = C + KV;
  const std::size_t rows = static_cast<std::size_t>(B) * S, block = rows * KV;
  TensorPtr mine = alloc_act(block, MemCategory::comm_buffers);
  TensorPtr all = alloc_act(block * n, MemCategory::comm_buffers);  // every rank's K|V, rank-major
  be_.copy_2d(mine, KV, qkv + C, W, rows, KV);
  cp_.comm->all_gather(mine, all, block);
  be_.free(mine);
  for (int r = 0; r < n; ++r) attend_block(out, lse, r == 0, qkv, all + r * block, r, B, S, C, heads, kv_heads);
  be_.free(all);
}

void ContextAttention::allgather_backward(TensorPtr dqkv, float* delta, ConstTensorPtr dout, ConstTensorPtr out,
                                          ConstTensorPtr qkv, const float* lse, int B, int S, int C, int heads,
                                          int kv_heads) {
  const int n = cp_.size;
  const std::size_t Ckv = kv_hidden_, KV = 2 * Ckv, W = C + KV;
  const std::size_t rows = static_cast<std::size_t>(B) * S, block = rows * KV, elem = dtype_bytes(dtype_);
  const int32_t* pos_q = positions_of(cp_.rank);
  be_.zero(dqkv.data(), rows * W * elem);
  be_.attention_block_delta(delta, dout, out, B, S, C, heads);
  // The keys and values are gathered again rather than kept from the forward.
  TensorPtr mine = alloc_act(block, MemCategory::comm_buffers);
  TensorPtr all = alloc_act(block * n, MemCategory::comm_buffers);
  be_.copy_2d(mine, KV, qkv + C, W, rows, KV);
  cp_.comm->all_gather(mine, all, block);
  be_.free(mine);
  TensorPtr dall = alloc_act(block * n, MemCategory::comm_buffers);  // dK|dV of every rank's block
  be_.zero(dall.data(), block * n * elem);
  for (int r = 0; r < n; ++r) {
    const ConstTensorPtr kv = all + r * block;
    const TensorPtr dkv = dall + r * block;
    const int32_t* pos_k = positions_of(r);
    Stopwatch watch(be_);
    be_.attention_block_backward(dqkv, dkv, dkv + Ckv, dout, lse, delta, qkv, kv, kv + Ckv, W, KV, pos_q, pos_k,
                                 B, S, S, C, heads, kv_heads);
  }
  be_.free(all);
  TensorPtr dmine = alloc_act(block, MemCategory::comm_buffers);
  cp_.comm->reduce_scatter(dall, dmine, block);  // each block's gradient, summed over the ranks' queries
  be_.free(dall);
  be_.copy_2d(dqkv + C, W, dmine, KV, rows, KV);
  be_.free(dmine);
}

// ---- alltoall (Ulysses) ----------------------------------------------------------------------------------
// Buffers exchanged by all-to-all are rank-major: block r holds (B, S/cp) rows of rank r's tokens
// (received) or of rank r's heads (sent). `width` floats per row: Cl = C/cp for outputs, 3·Cl for Q|K|V.

void ContextAttention::sequence_to_heads(TensorPtr full, ConstTensorPtr recv, int B, int S, int width) const {
  // recv: [rank][b][its positions][width] → full: [b][global position][width]
  for (int r = 0; r < cp_.size; ++r) {
    std::size_t at = 0;  // the position's index among rank r's
    for (const ContextParallel::Chunk& c : cp_.chunks(seq_, r)) {
      for (int b = 0; b < B; ++b) {
        be_.copy((full + (static_cast<std::size_t>(b) * seq_ + c.first) * width).data(),
                 (recv + ((static_cast<std::size_t>(r) * B + b) * S + at) * width).data(),
                 static_cast<std::size_t>(c.length) * width * dtype_bytes(dtype_));
      }
      at += c.length;
    }
  }
}

void ContextAttention::heads_to_sequence(TensorPtr send, ConstTensorPtr full, int B, int S, int width) const {
  for (int r = 0; r < cp_.size; ++r) {
    std::size_t at = 0;
    for (const ContextParallel::Chunk& c : cp_.chunks(seq_, r)) {
      for (int b = 0; b < B; ++b) {
        be_.copy((send + ((static_cast<std::size_t>(r) * B + b) * S + at) * width).data(),
                 (full + (static_cast<std::size_t>(b) * seq_ + c.first) * width).data(),
                 static_cast<std::size_t>(c.length) * width * dtype_bytes(dtype_));
      }
      at += c.length;
    }
  }
}

void ContextAttention::alltoall_forward(TensorPtr out, float* saved, ConstTensorPtr qkv, int B, int S, int C,
                                        int heads, int kv_heads) {
  const int n = cp_.size, Cl = C / n, Hl = heads / n, Kl = kv_hidden_ / n, KVl = kv_heads / n;
  const std::size_t W = C + 2 * static_cast<std::size_t>(kv_hidden_), Wl = Cl + 2 * static_cast<std::size_t>(Kl);
  const std::size_t rows = static_cast<std::size_t>(B) * S, full_rows = static_cast<std::size_t>(B) * seq_;
  const TensorPtr qkv_full = in_floats(saved);                // (B, S_full, Wl): this rank's heads' Q|K|V
  const TensorPtr out_full = qkv_full + full_rows * Wl;       // (B, S_full, Cl)
  float* att = saved + floats_of(full_rows * full_width());   // the backend attention's saved state (fp32)
  // Q|K|V of this rank's tokens: head group r's query columns and key/value columns to rank r.
  TensorPtr send = alloc_act(rows * W, MemCategory::comm_buffers);
  for (int r = 0; r < n; ++r) {
    const TensorPtr dst = send + r * rows * Wl;
    be_.copy_2d(dst, Wl, qkv + r * Cl, W, rows, Cl);                                  // Q
    be_.copy_2d(dst + Cl, Wl, qkv + C + r * Kl, W, rows, Kl);                         // K
    be_.copy_2d(dst + Cl + Kl, Wl, qkv + C + kv_hidden_ + r * Kl, W, rows, Kl);       // V
  }
  TensorPtr recv = alloc_act(rows * W, MemCategory::comm_buffers);
  cp_.comm->all_to_all(send, recv, rows * Wl);
  be_.free(send);
  sequence_to_heads(qkv_full, recv, B, S, static_cast<int>(Wl));
  be_.free(recv);
  {
    Stopwatch watch(be_);
    be_.attention_gqa_forward(out_full, att, qkv_full, B, seq_, Cl, Hl, KVl);
  }
  // The outputs back to the tokens' ranks, every head group's columns side by side.
  TensorPtr send_out = alloc_act(rows * C, MemCategory::comm_buffers);
  heads_to_sequence(send_out, out_full, B, S, Cl);
  TensorPtr recv_out = alloc_act(rows * C, MemCategory::comm_buffers);
  cp_.comm->all_to_all(send_out, recv_out, rows * Cl);
  be_.free(send_out);
  for (int r = 0; r < n; ++r) be_.copy_2d(out + r * Cl, C, recv_out + r * rows * Cl, Cl, rows, Cl);
  be_.free(recv_out);
}

void ContextAttention::alltoall_backward(TensorPtr dqkv, float* scratch, ConstTensorPtr dout, const float* saved,
                                         int B, int S, int C, int heads, int kv_heads) {
  const int n = cp_.size, Cl = C / n, Hl = heads / n, Kl = kv_hidden_ / n, KVl = kv_heads / n;
  const std::size_t W = C + 2 * static_cast<std::size_t>(kv_hidden_), Wl = Cl + 2 * static_cast<std::size_t>(Kl);
  const std::size_t rows = static_cast<std::size_t>(B) * S, full_rows = static_cast<std::size_t>(B) * seq_;
  const ConstTensorPtr qkv_full = in_floats(const_cast<float*>(saved));
  const ConstTensorPtr out_full = qkv_full + full_rows * Wl;
  const float* att = saved + floats_of(full_rows * full_width());
  const TensorPtr dout_full = in_floats(scratch);                 // (B, S_full, Cl)
  const TensorPtr dqkv_full = dout_full + full_rows * Cl;          // (B, S_full, Wl)
  float* att_scratch = scratch + floats_of(full_rows * full_width());
  TensorPtr send = alloc_act(rows * C, MemCategory::comm_buffers);
  for (int r = 0; r < n; ++r) be_.copy_2d(send + r * rows * Cl, Cl, dout + r * Cl, C, rows, Cl);
  TensorPtr recv = alloc_act(rows * C, MemCategory::comm_buffers);
  cp_.comm->all_to_all(send, recv, rows * Cl);
  be_.free(send);
  sequence_to_heads(dout_full, recv, B, S, Cl);
  be_.free(recv);
  {
    Stopwatch watch(be_);
    be_.attention_gqa_backward(dqkv_full, att_scratch, dout_full, out_full, qkv_full, att, B, seq_, Cl, Hl, KVl);
  }
  TensorPtr send_d = alloc_act(rows * W, MemCategory::comm_buffers);
  heads_to_sequence(send_d, dqkv_full, B, S, static_cast<int>(Wl));
  TensorPtr recv_d = alloc_act(rows * W, MemCategory::comm_buffers);
  cp_.comm->all_to_all(send_d, recv_d, rows * Wl);
  be_.free(send_d);
  for (int r = 0; r < n; ++r) {
    const ConstTensorPtr src = recv_d + r * rows * Wl;
    be_.copy_2d(dqkv + r * Cl, W, src, Wl, rows, Cl);
    be_.copy_2d(dqkv + C + r * Kl, W, src + Cl, Wl, rows, Kl);
    be_.copy_2d(dqkv + C + kv_hidden_ + r * Kl, W, src + Cl + Kl, Wl, rows, Kl);
  }
  be_.free(recv_d);
}

// ---- the memory model --------------------------------------------------------------------------------------

void plan_cp_memory(MemoryPlan& plan, CpAlgo algo, int cp) {
  const ArchSpec& a = plan.arch;
  // This rank's heads (tensor parallelism, plan.tp, splits them first) and their width.
  const int64_t e = plan.precision.act_bytes, S = a.seq / cp, B = plan.micro_batch, C = a.hidden / plan.tp,
                H = a.heads / plan.tp;
  const int64_t Ckv = a.kv_heads / plan.tp * a.head_dim();  // the width of K and of V (C: multi-head)
  const int64_t rows = B * S;
  constexpr int64_t kStat = 4;
  plan.cp = cp;
  if (cp == 1) return;  // the backend's attention
  if (algo == CpAlgo::alltoall) {
    const int64_t Hl = H / cp, full = B * a.seq, width = 2 * (C + Ckv) / cp;  // Q|K|V and out of a head group
    // the backend attention's probabilities or statistics: fp32 in every precision
    const int64_t backend = plan.attention_keeps_probabilities ? B * Hl * a.seq * a.seq * kStat : B * Hl * a.seq * kStat;
    plan.attention_saved_bytes = full * width * e + backend;
    plan.attention_scratch_bytes = full * width * e + backend;
    // Two (S/cp, C + 2·Ckv) buffers around the Q|K|V and dQ|dK|dV exchanges.
    plan.attention_comm_bytes = 2 * rows * (C + 2 * Ckv) * e;
    plan.attention_forward_comm_bytes = plan.attention_comm_bytes;
    return;
  }
  plan.attention_keeps_probabilities = false;  // the log-sum-exp only: nothing for selective recomputation
  plan.attention_saved_bytes = B * H * S * kStat;    // lse
  plan.attention_scratch_bytes = B * H * S * kStat;  // delta
  plan.attention_persistent_bytes = a.seq * 4;       // every rank's positions, int32
  plan.attention_forward_bytes = rows * C * e + B * H * S * kStat;  // a block's output and lse before the merge
  // ring: backward's K|V and dK|dV, the block in hand and the one arriving (4 · (S/cp, 2·Ckv));
  // allgather: every rank's K|V and their gradients (2 · (S, 2·Ckv)). Grouped-query attention moves a/kv
  // times fewer bytes than multi-head.
  plan.attention_comm_bytes = algo == CpAlgo::ring ? 4 * rows * 2 * Ckv * e : 2 * cp * rows * 2 * Ckv * e;
  // Forward: ring's block in hand and the one arriving; allgather's own K|V beside every rank's.
  plan.attention_forward_comm_bytes = algo == CpAlgo::ring ? 2 * rows * 2 * Ckv * e : (1 + cp) * rows * 2 * Ckv * e;
}

}  // namespace pb
