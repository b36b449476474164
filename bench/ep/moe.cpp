#include "bench/ep/moe.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace pb {
namespace {
// The router, then each local expert's tensors: SPEC 9's GELU MLP (four), or under --arch llama a SwiGLU
// MLP without biases (three: SPEC 2.5).
constexpr int kRouter = 0, kFc1W = 0, kFc1B = 1, kFc2W = 2, kFc2B = 3;
constexpr int kGateW = 0, kUpW = 1, kDownW = 2;

// The router's operands in fp32: the model's own in an fp32 run, else widened copies (exact) of the
// input (N, h) and of the router's weight (h, E) in workspace, for the lifetime of the object.
struct Fp32Router {
  Fp32Router(Backend& backend, ConstTensorPtr input, ConstTensorPtr weight, int N, int h, int E) : be(backend) {
    if (input.dtype() == DType::f32) {
      u = input;
      w = weight;
      return;
    }
    u_copy = be.alloc_floats(static_cast<std::size_t>(N) * h, MemCategory::workspace);
    w_copy = be.alloc_floats(static_cast<std::size_t>(h) * E, MemCategory::workspace);
    be.convert(u_copy, input, static_cast<std::size_t>(N) * h);
    be.convert(w_copy, weight, static_cast<std::size_t>(h) * E);
    u = u_copy;
    w = w_copy;
  }
  ~Fp32Router() {
    be.free(w_copy);
    be.free(u_copy);
  }
  Fp32Router(const Fp32Router&) = delete;
  Fp32Router& operator=(const Fp32Router&) = delete;
  Backend& be;
  ConstTensorPtr u, w;
  float* u_copy = nullptr;
  float* w_copy = nullptr;
};
}  // namespace

int moe_capacity(const MoeOptions& moe, int64_t tokens) {
  if (moe.capacity_factor <= 0.0) return static_cast<int>(tokens);
  const double c = std::ceil(moe.capacity_factor * moe.top_k * static_cast<double>(tokens) / moe.experts);
  return static_cast<int>(std::min<double>(c, static_cast<double>(tokens)));
}

// What one block's MoE keeps from forward to backward (activations), freed with it.
struct MoeMlp::Saved final : PartState {
  explicit Saved(Backend& backend) : be(backend) {}
  ~Saved() override {
    for (TensorPtr p : {combined, up_out, gelu_out, fc1_out, expert_in}) be.free(p);
    for (void* p : {static_cast<void*>(counts), static_cast<void*>(slot), static_cast<void*>(expert),
                    static_cast<void*>(gate), static_cast<void*>(probs)}) {
      be.free(p);
    }
  }
  Backend& be;
  float* probs = nullptr;      // (N, E): full router softmax (auxiliary loss), fp32
  float* gate = nullptr;       // (N, k), fp32
  int32_t* expert = nullptr;   // (N, k)
  int32_t* slot = nullptr;     // (N, k): slot in the expert's buffer, −1 dropped
  int32_t* counts = nullptr;   // (2E): kept, routed
  TensorPtr expert_in;         // (E/ep, ep·C, h): the local experts' input slots (the model's dtype, as below)
  TensorPtr fc1_out;           // (E/ep, ep·C, f): fc1's output (SwiGLU: the gate's)
  TensorPtr gelu_out;          // (E/ep, ep·C, f): the activation, fc2's (down's) input
  TensorPtr up_out;            // (E/ep, ep·C, f): SwiGLU's up projection (null for GELU experts)
  TensorPtr combined;          // (E, C, h): every expert's output for this rank's slots
};

MoeMlp::MoeMlp(const ModelConfig& model, const MoeOptions& moe, Backend& backend, const ExpertParallel& ep,
               int micro_batch, int micro_batches, float loss_scale, DType dtype)
    : model_(model), moe_(moe), be_(backend), ep_(ep), loss_scale_(loss_scale), dtype_(dtype),
      micro_batches_(micro_batches) {
  N_ = micro_batch * model.seq;
  E_ = moe.experts;
  k_ = moe.top_k;
  El_ = E_ / ep.size;
  C_ = moe_capacity(moe, N_);
  h_ = model.hidden;
  f_ = model.ffn;
  gated_ = model.llama();
  per_expert_ = gated_ ? 3 : 4;
  recorded_.assign(model.layers, 0);
}

MoeMlp::~MoeMlp() {
  be_.free(aux_sum_);
  be_.free(step_counts_);
}

std::vector<TensorSpec> MoeMlp::tensors() const {
  const int64_t h = h_, f = f_;
  std::vector<TensorSpec> t = {{"moe.router.w", h, E_, TpSplit::none, -1}};
  for (int i = 0; i < El_; ++i) {
    const int e = ep_.rank * El_ + i;  // ranks hold consecutive experts
    const std::string p = "moe.expert" + std::to_string(e) + ".";
    if (gated_) {
      t.push_back({p + "gate.w", h, f, TpSplit::none, e});
      t.push_back({p + "up.w", h, f, TpSplit::none, e});
      t.push_back({p + "down.w", f, h, TpSplit::none, e});
      continue;
    }
    t.push_back({p + "fc1.w", h, f, TpSplit::none, e});
    t.push_back({p + "fc1.b", 1, f, TpSplit::none, e});
    t.push_back({p + "fc2.w", f, h, TpSplit::none, e});
    t.push_back({p + "fc2.b", 1, h, TpSplit::none, e});
  }
  return t;
}

int64_t MoeMlp::global_parameters() const {
  const int64_t h = h_, f = f_;
  return h * E_ + E_ * (gated_ ? 3 * h * f : 2 * h * f + f + h);
}

void MoeMlp::to_experts(TensorPtr dst, ConstTensorPtr src) const {
  const std::size_t block = static_cast<std::size_t>(C_) * h_;
  for (int r = 0; r < ep_.size; ++r) {
    for (int i = 0; i < El_; ++i) {
      be_.copy((dst + (static_cast<std::size_t>(i) * ep_.size + r) * block).data(),
               (src + (static_cast<std::size_t>(r) * El_ + i) * block).data(), block * dtype_bytes(dst.dtype()));
    }
  }
}

void MoeMlp::from_experts(TensorPtr dst, ConstTensorPtr src) const {
  const std::size_t block = static_cast<std::size_t>(C_) * h_;
  for (int r = 0; r < ep_.size; ++r) {
    for (int i = 0; i < El_; ++i) {
      be_.copy((dst + (static_cast<std::size_t>(r) * El_ + i) * block).data(),
               (src + (static_cast<std::size_t>(i) * ep_.size + r) * block).data(), block * dtype_bytes(dst.dtype()));
    }
  }
}

std::unique_ptr<PartState> MoeMlp::forward(int, const TensorPtr* w, ConstTensorPtr u, TensorPtr out) {
  const std::size_t N = N_, E = E_, k = k_, slots = static_cast<std::size_t>(E_) * C_;  // slots of all experts
  const int rows = ep_.size * C_;  // a local expert's input rows
  auto s = std::make_unique<Saved>(be_);
  auto act = [&](std::size_t n) { return alloc_act(n, MemCategory::activations); };
  auto stat = [&](std::size_t n) { return be_.alloc_floats(n, MemCategory::activations); };
  auto ints = [&](std::size_t n) { return static_cast<int32_t*>(be_.alloc(n * sizeof(int32_t), MemCategory::activations)); };
  s->probs = stat(N * E);
  s->gate = stat(N * k);
  s->expert = ints(N * k);
  s->slot = ints(N * k);
  s->counts = ints(2 * E);
  s->expert_in = act(slots * h_);
  s->fc1_out = act(slots * f_);
  s->gelu_out = act(slots * f_);
  if (gated_) s->up_out = act(slots * f_);
  s->combined = act(slots * h_);

  // Route: logits (fp32, as Megatron's router: a bf16 logit would turn near-ties into ties) → top-k,
  // gates, full softmax; then the capacity decides each slot.
  float* logits = be_.alloc_floats(N * E, MemCategory::workspace);
  {
    const Fp32Router router(be_, u, w[kRouter], N_, h_, E_);
    be_.matmul_forward(logits, router.u, router.w, nullptr, N_, h_, E_);
  }
  be_.moe_router_forward(s->expert, s->gate, s->probs, logits, N_, E_, k_);
  be_.free(logits);
  be_.moe_assign(s->slot, s->counts, s->expert, N_, E_, k_, C_);

  // Dispatch to the experts' ranks.
  if (ep_.active()) {
    TensorPtr send = alloc_act(slots * h_, MemCategory::comm_buffers);
    be_.moe_dispatch(send, u, s->expert, s->slot, N_, E_, k_, C_, h_);
    TensorPtr recv = alloc_act(slots * h_, MemCategory::comm_buffers);
    ep_.comm->all_to_all(send, recv, static_cast<std::size_t>(El_) * C_ * h_);
    be_.free(send);
    to_experts(s->expert_in, recv);
    be_.free(recv);
  } else {
    be_.moe_dispatch(s->expert_in, u, s->expert, s->slot, N_, E_, k_, C_, h_);
  }

  // The local experts, each the model's MLP over its slots (empty slots hold zeros; their outputs are
  // never combined and their gradients are zero). With ep > 1 their outputs are scratch that the combine
  // reorders into its send buffer (as the backward's dexpert_in).
  TensorPtr expert_out = ep_.active() ? alloc_act(slots * h_, MemCategory::workspace) : s->combined;
  for (int i = 0; i < El_; ++i) {
    const TensorPtr* we = w + 1 + per_expert_ * i;
    const std::size_t in = static_cast<std::size_t>(i) * rows * h_, mid = static_cast<std::size_t>(i) * rows * f_;
    const std::size_t n = static_cast<std::size_t>(rows) * f_;
    if (gated_) {  // silu(x·gate.w) ⊙ (x·up.w), then down.w
      be_.matmul_forward(s->fc1_out + mid, s->expert_in + in, we[kGateW], nullptr, rows, h_, f_);
      be_.matmul_forward(s->up_out + mid, s->expert_in + in, we[kUpW], nullptr, rows, h_, f_);
      be_.swiglu_forward(s->gelu_out + mid, s->fc1_out + mid, s->up_out + mid, n);
      be_.matmul_forward(expert_out + in, s->gelu_out + mid, we[kDownW], nullptr, rows, f_, h_);
      continue;
    }
    be_.matmul_gelu_forward(s->gelu_out + mid, s->fc1_out + mid, s->expert_in + in, we[kFc1W], we[kFc1B], rows, h_, f_);
    be_.matmul_forward(expert_out + in, s->gelu_out + mid, we[kFc2W], we[kFc2B], rows, f_, h_);
  }

  // Combine: the outputs go back to the tokens' ranks, weighted by the gates.
  if (ep_.active()) {
    TensorPtr send = alloc_act(slots * h_, MemCategory::comm_buffers);
    from_experts(send, expert_out);
    be_.free(expert_out);
    ep_.comm->all_to_all(send, s->combined, static_cast<std::size_t>(El_) * C_ * h_);
    be_.free(send);
  }
  be_.moe_combine(out, s->combined, s->gate, s->expert, s->slot, N_, E_, k_, C_, h_);
  return s;
}

void MoeMlp::backward(int layer, PartState& state, const TensorPtr* w, const TensorPtr* g, ConstTensorPtr u,
                      ConstTensorPtr dout, TensorPtr du) {
  auto& s = static_cast<Saved&>(state);
  const std::size_t N = N_, E = E_, k = k_, slots = static_cast<std::size_t>(E_) * C_;
  const int rows = ep_.size * C_;
  auto scratch = [&](std::size_t n) { return alloc_act(n, MemCategory::workspace); };

  // Routing statistics, once per micro-batch and block, kept on the device until the step ends.
  if (step_counts_ == nullptr) {
    const std::size_t n = static_cast<std::size_t>(model_.layers) * micro_batches_ * 2 * E;
    step_counts_ = static_cast<int32_t*>(be_.alloc(n * sizeof(int32_t), MemCategory::workspace));
    aux_sum_ = static_cast<double*>(be_.alloc(sizeof(double), MemCategory::workspace));
    be_.zero(aux_sum_, sizeof(double));
  }
  if (recorded_[layer] >= micro_batches_) throw std::logic_error("MoeMlp: more micro-batches than a step has");
  be_.copy(step_counts_ + (static_cast<std::size_t>(layer) * micro_batches_ + recorded_[layer]++) * 2 * E, s.counts,
           2 * E * sizeof(int32_t));

  // Combine's backward: the gates' gradient, and each slot's output gradient.
  float* dgate = be_.alloc_floats(N * k, MemCategory::workspace);  // fp32, as the gates
  TensorPtr dcombined = scratch(slots * h_);
  be_.moe_combine_backward(dcombined, dgate, dout, s.combined, s.gate, s.expert, s.slot, N_, E_, k_, C_, h_);
  TensorPtr dexpert_out = dcombined;  // (E/ep, ep·C, h)
  if (ep_.active()) {
    TensorPtr recv = alloc_act(slots * h_, MemCategory::comm_buffers);
    ep_.comm->all_to_all(dcombined, recv, static_cast<std::size_t>(El_) * C_ * h_);
    be_.free(dcombined);
    dexpert_out = scratch(slots * h_);
    to_experts(dexpert_out, recv);
    be_.free(recv);
  }

  // The local experts' backward. Scratch: one expert's dfc1 (SwiGLU: its dgate and dup, and where f < h
  // a buffer for the up branch's input gradient, which otherwise goes where dgate was).
  const std::size_t n = static_cast<std::size_t>(rows) * f_, nh = static_cast<std::size_t>(rows) * h_;
  TensorPtr dfc = scratch(n);
  TensorPtr dup = gated_ ? scratch(n) : nullptr;
  TensorPtr dx_up = gated_ ? (n >= nh ? dfc : scratch(nh)) : nullptr;
  TensorPtr dexpert_in = scratch(slots * h_);
  for (int i = 0; i < El_; ++i) {
    const TensorPtr* we = w + 1 + per_expert_ * i;
    const TensorPtr* ge = g + 1 + per_expert_ * i;
    const std::size_t in = static_cast<std::size_t>(i) * rows * h_, mid = static_cast<std::size_t>(i) * rows * f_;
    if (gated_) {
      be_.matmul_backward(dup, ge[kDownW], nullptr, dexpert_out + in, s.gelu_out + mid, we[kDownW], rows, f_, h_);
      be_.swiglu_backward(dfc, dup, dup, s.fc1_out + mid, s.up_out + mid, n);  // dfc: dgate
      be_.matmul_backward(dexpert_in + in, ge[kGateW], nullptr, dfc, s.expert_in + in, we[kGateW], rows, h_, f_);
      be_.matmul_backward(dx_up, ge[kUpW], nullptr, dup, s.expert_in + in, we[kUpW], rows, h_, f_);
      be_.accumulate(dexpert_in + in, dx_up, nh);
      continue;
    }
    be_.matmul_gelu_backward(dfc, ge[kFc2W], ge[kFc2B], dexpert_out + in, s.gelu_out + mid, we[kFc2W], s.fc1_out + mid,
                             rows, f_, h_);
    be_.matmul_backward(dexpert_in + in, ge[kFc1W], ge[kFc1B], dfc, s.expert_in + in, we[kFc1W], rows, h_, f_);
  }
  if (dx_up != dfc) be_.free(dx_up);
  be_.free(dup);
  be_.free(dfc);
  be_.free(dexpert_out);

  // Back to the tokens' ranks: the dispatch's backward sums each token's kept choices.
  if (ep_.active()) {
    TensorPtr send = alloc_act(slots * h_, MemCategory::comm_buffers);
    from_experts(send, dexpert_in);
    be_.free(dexpert_in);
    TensorPtr ddispatch = alloc_act(slots * h_, MemCategory::comm_buffers);
    ep_.comm->all_to_all(send, ddispatch, static_cast<std::size_t>(El_) * C_ * h_);
    be_.free(send);
    be_.moe_dispatch_backward(du, ddispatch, s.expert, s.slot, N_, E_, k_, C_, h_);
    be_.free(ddispatch);
  } else {
    be_.moe_dispatch_backward(du, dexpert_in, s.expert, s.slot, N_, E_, k_, C_, h_);
    be_.free(dexpert_in);
  }

  // The router: the gates' softmax, the auxiliary loss, and the router's input gradient added to du.
  float* dlogits = be_.alloc_floats(N * E, MemCategory::workspace);  // fp32, as the logits
  be_.moe_router_backward(dlogits, dgate, s.gate, s.expert, N_, E_, k_);
  if (moe_.aux_loss > 0.0) {  // this micro-batch's share of the objective: b/G = loss_scale · N
    be_.moe_aux_loss(dlogits, aux_sum_, s.probs, s.counts, N_, E_, k_, static_cast<float>(moe_.aux_loss),
                     loss_scale_ * static_cast<float>(N_));
  }
  float* du_router = be_.alloc_floats(N * h_, MemCategory::workspace);
  {
    const Fp32Router router(be_, u, w[kRouter], N_, h_, E_);
    be_.matmul_backward(du_router, g[kRouter], nullptr, dlogits, router.u, router.w, N_, h_, E_);
  }
  be_.accumulate(du, du_router, N * h_);  // the router's share of du, added in fp32 and rounded
  be_.free(du_router);
  be_.free(dlogits);
  be_.free(dgate);
}

void plan_moe_memory(MemoryPlan& plan, const MoeOptions& moe, int ep, int micro_batches) {
  const ArchSpec& a = plan.arch;
  const int64_t N = static_cast<int64_t>(plan.micro_batch) * a.seq, E = moe.experts, k = moe.top_k;
  const int64_t h = a.hidden, f = a.ffn, C = moe_capacity(moe, N), slots = E * C;
  const int64_t bias = a.biases ? 1 : 0, e = plan.precision.act_bytes;
  constexpr int64_t kIndex = 4, kStat = 4;  // int32 expert indices, slots and counts; fp32 probabilities, gates
  // The router, and E/ep experts, each the model's MLP.
  plan.mlp_parameters = h * E + E / ep * (a.mlp_in_width() * h + bias * a.mlp_in_width() + f * h + bias * h);
  // Kept per block: full softmax (N, E), gates (N, k), expert indices and slots (N, k), counts (2E),
  // the local experts' input slots, fc1 output and activation (ep·C rows each of E/ep experts: E·C),
  // and the combined expert outputs (E, C, h).
  // SwiGLU experts (gated) keep the gate's and the up projection's outputs and their product.
  plan.mlp_activation_bytes =
      kStat * (N * E + N * k) + e * (2 * slots * h + slots * (a.mlp_in_width() + f)) + kIndex * (2 * N * k + 2 * E);
  // Backward: the gates' gradient, then the larger of (the experts' output and input gradients and one
  // expert's dfc1) and (the router logits' gradient and its input gradient).
  // Held to the end: the step's routing counts (2E int32 per block and micro-batch) and the auxiliary
  // loss's sum (a double).
  // The router computes in fp32 (its logits, their gradient and its input gradient), on widened copies of
  // its input and weight when the model is bf16.
  const int64_t widened = e == kStat ? 0 : kStat * (N * h + h * E);
  // One expert's scratch: dfc1 (SwiGLU: dgate and dup, and its up branch's input gradient where f < h).
  const int64_t expert_scratch = ep * C * (a.mlp_in_width() + (a.gated_mlp && f < h ? h : 0));
  plan.mlp_workspace_bytes = kStat * N * k +
                             std::max(e * (2 * slots * h + expert_scratch), kStat * (N * E + N * h) + widened) +
                             a.layers * micro_batches * 2 * E * kIndex + 8;
  // ep > 1: two (E, C, h) buffers around each all-to-all.
  plan.mlp_comm_bytes = ep > 1 ? 2 * slots * h * e : 0;
}

MoeStepStats MoeMlp::take_step_stats() {
  const std::size_t L = model_.layers, E = E_;
  MoeStepStats st;
  st.kept.assign(L * E, 0);
  st.dropped.assign(L, 0);
  if (step_counts_ == nullptr) return st;
  std::vector<int32_t> counts(L * micro_batches_ * 2 * E);
  be_.download(counts.data(), step_counts_, counts.size() * sizeof(int32_t));
  for (std::size_t l = 0; l < L; ++l) {
    for (int m = 0; m < recorded_[l]; ++m) {
      const int32_t* c = counts.data() + (l * micro_batches_ + m) * 2 * E;
      for (std::size_t e = 0; e < E; ++e) {
        st.kept[l * E + e] += c[e];
        st.dropped[l] += c[E + e] - c[e];
      }
    }
    recorded_[l] = 0;
  }
  double aux = 0.0;
  be_.download(&aux, aux_sum_, sizeof(double));
  be_.zero(aux_sum_, sizeof(double));
  st.aux_loss = aux * static_cast<double>(loss_scale_) * N_;  // (b/G) Σ aux
  return st;
}

}  // namespace pb
