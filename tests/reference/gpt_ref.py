#!/usr/bin/env python3
"""Independent PyTorch reference of the parabench model and training step (docs/SPEC.md, 2-2.3, 9).

Written from the spec alone, on CPU in float32: the deterministic initialisation (mix / fnv1a64 / u),
the synthetic "small learnable language", the pre-LayerNorm GPT with an untied head, the mean
cross-entropy over the global batch with gradient accumulation, clip_grad_norm_ and AdamW; and the
mixture-of-experts variant (Config.experts > 0): top-k routing, per-micro-batch capacity, the
Switch-Transformer auxiliary loss and the routing statistics.
The C++ apps are checked against it (check_against_torch.py) and timed against it (bench_torch.py).

    python3 gpt_ref.py --selftest     checks the known answers of SPEC 2.1 and the MoE block
"""

import math
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MASK64 = (1 << 64) - 1

# --------------------------------------------------------------------------------------------
# Deterministic random numbers (SPEC 2.1): all arithmetic modulo 2^64.
# The scalar versions use Python ints (masked by hand); the vector versions use numpy uint64,
# whose arithmetic wraps modulo 2^64 exactly as the spec wants.
# --------------------------------------------------------------------------------------------


def mix(z):
    """splitmix64 finaliser on a Python int."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def fnv1a64(name):
    """FNV-1a 64-bit hash of the UTF-8 bytes of name."""
    h = 0xCBF29CE484222325
    for c in name.encode("utf-8"):
        h = ((h ^ c) * 0x100000001B3) & MASK64
    return h


def u(seed, name, i):
    """Uniform in [0, 1) for (seed, name, element index i); scalar, exact."""
    z = mix((mix((seed ^ fnv1a64(name)) & MASK64) + i) & MASK64)
    return (z >> 11) * 2.0 ** -53


def _mix_np(z):
    """mix() over a numpy uint64 array (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def u_np(seed, name, idx):
    """u(seed, name, i) for every i of the integer array idx; returns float64 of the same shape."""
    base = np.uint64(mix((seed ^ fnv1a64(name)) & MASK64))
    with np.errstate(over="ignore"):
        z = _mix_np(np.asarray(idx, dtype=np.uint64) + base)
    # z >> 11 has at most 53 bits, so the conversion to float64 is exact.
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def uniform_init(seed, name, shape, std):
    """A tensor of the given shape: element with flat (row-major) index i is std*sqrt(3)*(2u-1)."""
    n = int(np.prod(shape))
    vals = std * math.sqrt(3.0) * (2.0 * u_np(seed, name, np.arange(n, dtype=np.uint64)) - 1.0)
    return torch.from_numpy(vals.astype(np.float32).reshape(shape))


# --------------------------------------------------------------------------------------------
# Model configuration, presets (SPEC 4) and parameters (SPEC 2, 2.1).
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    ffn: int = 0  # 0: 4 * hidden
    seed: int = 1234
    # Mixture of experts (SPEC 9); experts == 0 is the dense model.
    experts: int = 0
    top_k: int = 1
    capacity_factor: float = 0.0  # 0: no capacity limit
    aux_loss: float = 0.0  # coefficient of the load-balancing loss; 0: none
    # The block (SPEC 2.5): "gpt" or "llama" (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases).
    arch: str = "gpt"
    kv_heads: int = 0  # 0: heads
    rope_theta: float = 10000.0

    def __post_init__(self):
        assert self.arch in ("gpt", "llama"), f"arch {self.arch!r} must be gpt or llama"
        if self.ffn == 0:
            # llama: the smallest multiple of 64 that is at least 8h/3
            self.ffn = -(-8 * self.hidden // (3 * 64)) * 64 if self.arch == "llama" else 4 * self.hidden
        if self.kv_heads == 0:
            self.kv_heads = self.heads
        assert self.hidden % self.heads == 0, "hidden must be divisible by heads"
        assert self.heads % self.kv_heads == 0, "kv_heads must divide heads"
        assert self.arch == "llama" or self.kv_heads == self.heads, "the gpt block has as many kv heads as heads"
        assert self.experts >= 0, "experts must be >= 0"
        if self.experts > 0:
            assert 1 <= self.top_k <= self.experts, "top_k must be in 1..experts"
            assert self.capacity_factor >= 0, "capacity_factor must be >= 0"
            assert self.aux_loss >= 0, "aux_loss must be >= 0"


PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=4, seq=32, vocab=256),
    "small": dict(layers=4, hidden=256, heads=8, seq=128, vocab=4096),
    "gpt2-124m": dict(layers=12, hidden=768, heads=12, seq=1024, vocab=50257),
    "gpt2-350m": dict(layers=24, hidden=1024, heads=16, seq=1024, vocab=50257),
    "block-4k": dict(layers=4, hidden=4096, heads=32, seq=2048, vocab=32000),
    "llama-tiny": dict(layers=2, hidden=64, heads=4, seq=32, vocab=256, arch="llama", kv_heads=2, ffn=192),
}


def llama_param_specs(cfg):
    """SPEC 2.5's parameters: no biases, RMSNorm gains, [Q | K | V] with kv_heads key/value heads."""
    h, f, V, L = cfg.hidden, cfg.ffn, cfg.vocab, cfg.layers
    d = h // cfg.heads
    std, std_out = 0.02, 0.02 / math.sqrt(2 * L)
    specs = [("embed.tok", (V, h), ("uniform", std))]
    for l in range(L):
        p = f"block{l}."
        specs += [
            (p + "ln1.g", (h,), ("ones",)),
            (p + "attn.qkv.w", (h, (cfg.heads + 2 * cfg.kv_heads) * d), ("uniform", std)),
            (p + "attn.out.w", (h, h), ("uniform", std_out)),
            (p + "ln2.g", (h,), ("ones",)),
        ]
        if cfg.experts == 0:
            specs += [
                (p + "mlp.gate.w", (h, f), ("uniform", std)),
                (p + "mlp.up.w", (h, f), ("uniform", std)),
                (p + "mlp.down.w", (f, h), ("uniform", std_out)),
            ]
        else:  # SwiGLU experts, no biases
            specs.append((p + "moe.router.w", (h, cfg.experts), ("uniform", std)))
            for e in range(cfg.experts):
                q = f"{p}moe.expert{e}."
                specs += [(q + "gate.w", (h, f), ("uniform", std)), (q + "up.w", (h, f), ("uniform", std)),
                          (q + "down.w", (f, h), ("uniform", std_out))]
    specs += [("final_ln.g", (h,), ("ones",)), ("head.w", (h, V), ("uniform", std))]
    return specs


def param_specs(cfg):
    """Ordered list of (name, shape, init) where init is ('uniform', std), ('zeros',) or ('ones',)."""
    if cfg.arch == "llama":
        return llama_param_specs(cfg)
    h, f, V, S, L = cfg.hidden, cfg.ffn, cfg.vocab, cfg.seq, cfg.layers
    std, std_out = 0.02, 0.02 / math.sqrt(2 * L)
    specs = [("embed.tok", (V, h), ("uniform", std)), ("embed.pos", (S, h), ("uniform", std))]
    for l in range(L):
        p = f"block{l}."
        specs += [
            (p + "ln1.g", (h,), ("ones",)),
            (p + "ln1.b", (h,), ("zeros",)),
            (p + "attn.qkv.w", (h, 3 * h), ("uniform", std)),
            (p + "attn.qkv.b", (3 * h,), ("zeros",)),
            (p + "attn.out.w", (h, h), ("uniform", std_out)),
            (p + "attn.out.b", (h,), ("zeros",)),
            (p + "ln2.g", (h,), ("ones",)),
            (p + "ln2.b", (h,), ("zeros",)),
        ]
        if cfg.experts == 0:
            specs += [
                (p + "mlp.fc1.w", (h, f), ("uniform", std)),
                (p + "mlp.fc1.b", (f,), ("zeros",)),
                (p + "mlp.fc2.w", (f, h), ("uniform", std_out)),
                (p + "mlp.fc2.b", (h,), ("zeros",)),
            ]
        else:
            specs.append((p + "moe.router.w", (h, cfg.experts), ("uniform", std)))
            for e in range(cfg.experts):
                q = f"{p}moe.expert{e}."
                specs += [
                    (q + "fc1.w", (h, f), ("uniform", std)),
                    (q + "fc1.b", (f,), ("zeros",)),
                    (q + "fc2.w", (f, h), ("uniform", std_out)),
                    (q + "fc2.b", (h,), ("zeros",)),
                ]
    specs += [
        ("final_ln.g", (h,), ("ones",)),
        ("final_ln.b", (h,), ("zeros",)),
        ("head.w", (h, V), ("uniform", std)),
    ]
    return specs


# --------------------------------------------------------------------------------------------
# Mixture of experts (SPEC 9). Routing decisions are made in plain Python on the float32 logits
# (discrete, no gradient); the arithmetic is plain torch with autograd.
# --------------------------------------------------------------------------------------------


def mlp(u2d, fc1_w, fc1_b, fc2_w, fc2_b):
    """The model's MLP: gelu_tanh(u·fc1.w + fc1.b)·fc2.w + fc2.b."""
    return F.gelu(u2d @ fc1_w + fc1_b, approximate="tanh") @ fc2_w + fc2_b


def topk_experts(logit_rows, k):
    """For each row (a list of E floats): the k expert indices with the largest logits, largest first;
    equal logits: the lower index first."""
    return [sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in logit_rows]


def moe_capacity(capacity_factor, k, N, E):
    """Assignments one expert keeps per micro-batch of N tokens: ceil(capacity_factor·k·N/E),
    evaluated left to right in double; capacity_factor 0 means no limit (N)."""
    if capacity_factor == 0:
        return N
    return int(math.ceil(float(capacity_factor) * k * N / E))


def assign_capacity(choice, E, C):
    """Walk the assignments (token n, then choice j) in order; expert e keeps its first C.
    Returns keep (list of lists of bool, like choice), kept[E] and routed[E] (kept + dropped)."""
    kept, routed, keep = [0] * E, [0] * E, []
    for row in choice:
        keep_row = []
        for e in row:
            routed[e] += 1
            if kept[e] < C:
                kept[e] += 1
                keep_row.append(True)
            else:
                keep_row.append(False)
        keep.append(keep_row)
    return keep, kept, routed


def moe_block(P, prefix, u2d, cfg):
    """The MoE block of one layer on the N tokens u2d (N, h) of one micro-batch.
    Returns (out (N, h), aux, kept[E], dropped): aux is the layer's auxiliary loss
    cfg.aux_loss·E·Σ_e f_e·P_e (a scalar tensor) or None when cfg.aux_loss is 0."""
    N, E, k = u2d.shape[0], cfg.experts, cfg.top_k
    logits = u2d @ P[prefix + "moe.router.w"]  # (N, E), no bias
    choice = topk_experts(logits.detach().cpu().tolist(), k)
    idx = torch.tensor(choice, dtype=torch.int64, device=u2d.device).reshape(N, k)
    gates = torch.softmax(logits.gather(1, idx), dim=1)  # (N, k), softmax over the chosen logits only
    keep, kept, routed = assign_capacity(choice, E, moe_capacity(cfg.capacity_factor, k, N, E))
    keep_t = torch.tensor(keep, dtype=u2d.dtype, device=u2d.device).reshape(N, k)
    # weight[n, e] = gate of token n's assignment to e when that assignment is kept, else 0
    # (no renormalisation after drops).
    weight = torch.zeros(N, E, dtype=u2d.dtype, device=u2d.device)
    for j in range(k):
        weight = weight + F.one_hot(idx[:, j], E).to(u2d.dtype) * (gates[:, j] * keep_t[:, j])[:, None]
    out = torch.zeros_like(u2d)
    for e in range(E):
        q = f"{prefix}moe.expert{e}."
        if cfg.arch == "llama":  # SwiGLU experts (SPEC 2.5)
            y = (F.silu(u2d @ P[q + "gate.w"]) * (u2d @ P[q + "up.w"])) @ P[q + "down.w"]
        else:
            y = mlp(u2d, P[q + "fc1.w"], P[q + "fc1.b"], P[q + "fc2.w"], P[q + "fc2.b"])
        out = out + weight[:, e : e + 1] * y
    aux = None
    if cfg.aux_loss > 0:
        f = torch.tensor(routed, dtype=u2d.dtype, device=u2d.device) / (N * k)  # a constant
        p_mean = torch.softmax(logits, dim=1).mean(dim=0)  # P_e over all E
        aux = cfg.aux_loss * E * (f * p_mean).sum()
    return out, aux, kept, N * k - sum(kept)


def rms_norm(x, g):
    """SPEC 2.5: x / sqrt(mean(x²) + 1e-5) · g over the last dimension."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5) * g


def rope(x, theta):
    """SPEC 2.5's rotary positions on x [B, heads, S, d]: the pairs (i, i + d/2) of each head rotated by
    position · theta^(−2i/d), the angle's cos and sin computed in float64 and rounded to x's dtype."""
    S, d = x.shape[-2], x.shape[-1]
    half = d // 2
    angle = np.arange(S, dtype=np.float64)[:, None] * (float(theta) ** (-2.0 * np.arange(half) / d))[None, :]
    cos = torch.from_numpy(np.cos(angle)).to(x.dtype).to(x.device)
    sin = torch.from_numpy(np.sin(angle)).to(x.dtype).to(x.device)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class GPT:
    """The reference GPT. Parameters live in an OrderedDict keyed by the spec's names (which contain
    dots, so they cannot be nn.Module attributes); weights are [in, out] and y = x @ W + b."""

    def __init__(self, cfg, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.params = OrderedDict()
        for name, shape, init in param_specs(cfg):
            if init[0] == "uniform":
                t = uniform_init(cfg.seed, name, shape, init[1])
            elif init[0] == "ones":
                t = torch.ones(shape, dtype=torch.float32)
            else:
                t = torch.zeros(shape, dtype=torch.float32)
            self.params[name] = t.to(self.device).requires_grad_(True)

    def forward(self, tokens, moe_records=None):
        """tokens: int64 [B, S'] with S' <= seq. Returns logits [B, S', V]. For the MoE model, the
        B·S' tokens form one micro-batch (capacity, aux loss) and, when moe_records is a list, one
        (aux, kept[E], dropped) per layer is appended to it (see moe_block)."""
        cfg, P = self.cfg, self.params
        if cfg.arch == "llama":
            return self.llama_forward(tokens, moe_records)
        B, S = tokens.shape
        h, a = cfg.hidden, cfg.heads
        d = h // a
        x = P["embed.tok"][tokens] + P["embed.pos"][:S]
        causal = torch.ones(S, S, dtype=torch.bool, device=tokens.device).triu(1)  # True above the diagonal: masked out
        for l in range(cfg.layers):
            p = f"block{l}."
            # Attention: qkv columns are [Q | K | V]; head j owns columns j*d..j*d+d-1 of each block.
            u_ = F.layer_norm(x, (h,), P[p + "ln1.g"], P[p + "ln1.b"], eps=1e-5)
            qkv = u_ @ P[p + "attn.qkv.w"] + P[p + "attn.qkv.b"]
            q, k, v = (t.reshape(B, S, a, d).transpose(1, 2) for t in qkv.split(h, dim=-1))
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # [B, a, S, S]
            att = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
            o = (att @ v).transpose(1, 2).reshape(B, S, h)  # heads concatenated
            x = x + o @ P[p + "attn.out.w"] + P[p + "attn.out.b"]
            # MLP with tanh-approximated GELU, or the mixture of such MLPs.
            u_ = F.layer_norm(x, (h,), P[p + "ln2.g"], P[p + "ln2.b"], eps=1e-5)
            if cfg.experts == 0:
                hid = F.gelu(u_ @ P[p + "mlp.fc1.w"] + P[p + "mlp.fc1.b"], approximate="tanh")
                x = x + hid @ P[p + "mlp.fc2.w"] + P[p + "mlp.fc2.b"]
            else:
                out, aux, kept, dropped = moe_block(P, p, u_.reshape(B * S, h), cfg)
                x = x + out.reshape(B, S, h)
                if moe_records is not None:
                    moe_records.append((aux, kept, dropped))
        x = F.layer_norm(x, (h,), P["final_ln.g"], P["final_ln.b"], eps=1e-5)
        return x @ P["head.w"]  # no bias

    def llama_forward(self, tokens, moe_records=None):
        """SPEC 2.5's block, written from its formula: logits [B, S', V]; with experts, SwiGLU experts
        (moe_block) in place of the MLP."""
        cfg, P = self.cfg, self.params
        B, S = tokens.shape
        h, a, kv = cfg.hidden, cfg.heads, cfg.kv_heads
        d = h // a
        x = P["embed.tok"][tokens]  # no position table
        causal = torch.ones(S, S, dtype=torch.bool, device=tokens.device).triu(1)
        for l in range(cfg.layers):
            p = f"block{l}."
            qkv = rms_norm(x, P[p + "ln1.g"]) @ P[p + "attn.qkv.w"]  # [Q | K | V]: a, kv and kv heads of d
            q, k, v = qkv.split([a * d, kv * d, kv * d], dim=-1)
            q = rope(q.reshape(B, S, a, d).transpose(1, 2), cfg.rope_theta)
            k = rope(k.reshape(B, S, kv, d).transpose(1, 2), cfg.rope_theta)
            v = v.reshape(B, S, kv, d).transpose(1, 2)
            # query head j attends with key/value head j // (a / kv)
            k, v = k.repeat_interleave(a // kv, dim=1), v.repeat_interleave(a // kv, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            att = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
            x = x + (att @ v).transpose(1, 2).reshape(B, S, h) @ P[p + "attn.out.w"]
            u_ = rms_norm(x, P[p + "ln2.g"])
            if cfg.experts == 0:
                x = x + (F.silu(u_ @ P[p + "mlp.gate.w"]) * (u_ @ P[p + "mlp.up.w"])) @ P[p + "mlp.down.w"]
            else:
                out, aux, kept, dropped = moe_block(P, p, u_.reshape(B * S, h), cfg)
                x = x + out.reshape(B, S, h)
                if moe_records is not None:
                    moe_records.append((aux, kept, dropped))
        return rms_norm(x, P["final_ln.g"]) @ P["head.w"]

    def loss_sum(self, inputs, targets):
        """Sum (not mean) of the cross-entropy over every token of the micro-batch."""
        return self.loss_terms(inputs, targets)[0]

    def loss_terms(self, inputs, targets):
        """(ce_sum, aux_sum, kept, dropped) of one micro-batch: the summed cross-entropy; the sum over
        layers of the auxiliary losses (a scalar tensor, None for the dense model or aux_loss 0);
        kept int64 [layers, E] and dropped int64 [layers] (None for the dense model)."""
        records = []
        logits = self.forward(inputs, records)
        ce_sum = F.cross_entropy(logits.reshape(-1, self.cfg.vocab), targets.reshape(-1), reduction="sum")
        if self.cfg.experts == 0:
            return ce_sum, None, None, None
        auxes = [a for a, _, _ in records if a is not None]
        aux_sum = None
        for a in auxes:
            aux_sum = a if aux_sum is None else aux_sum + a
        kept = np.array([kp for _, kp, _ in records], dtype=np.int64).reshape(self.cfg.layers, self.cfg.experts)
        dropped = np.array([d for _, _, d in records], dtype=np.int64)
        return ce_sum, aux_sum, kept, dropped


# --------------------------------------------------------------------------------------------
# Synthetic data (SPEC 2.2).
# --------------------------------------------------------------------------------------------


class SyntheticData:
    """Sample n of the run is S+1 tokens: a random start, then succ[] with 10% random noise."""

    def __init__(self, seed, vocab, seq):
        self.seed, self.V, self.S = seed, vocab, seq
        self.succ = np.floor(u_np(seed, "data.succ", np.arange(vocab)) * vocab).astype(np.int64)

    def samples(self, ns):
        """int64 tensor [len(ns), S+1] with the tokens of samples ns (global sample indices)."""
        seed, V, S = self.seed, self.V, self.S
        ns = np.asarray(ns, dtype=np.uint64)
        t = np.empty((len(ns), S + 1), dtype=np.int64)
        t[:, 0] = np.floor(u_np(seed, "data.start", ns) * V)
        # Index n*(S+1)+p decides token p+1.
        idx = ns[:, None] * np.uint64(S + 1) + np.arange(S, dtype=np.uint64)[None, :]
        keep = u_np(seed, "data.noise", idx) >= 0.1
        rand = np.floor(u_np(seed, "data.rand", idx) * V).astype(np.int64)
        for p in range(S):
            t[:, p + 1] = np.where(keep[:, p], self.succ[t[:, p]], rand[:, p])
        return torch.from_numpy(t)


# --------------------------------------------------------------------------------------------
# Training step (SPEC 2.3): grad accumulation, clip_grad_norm_, AdamW.
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over the global batch, before the update (no aux term)
    grad_norm: float  # L2 norm of the objective's gradient, before clipping
    grads: object  # OrderedDict name -> step gradient (unclipped) when captured, else None
    aux_loss: float  # (b/G)·Σ_micro-batches Σ_layers aux; 0 for the dense model or aux_loss 0
    tokens_per_expert: object  # int64 [layers, E]: kept assignments over the global batch (None: dense)
    dropped: object  # int64 [layers]: dropped assignments over the global batch (None: dense)


class Trainer:
    """Single-rank training: global batch G = micro_batch * grad_accum; sample k of step s is
    sample s*G + k of the run and belongs to micro-step k // micro_batch."""

    def __init__(self, cfg, micro_batch, grad_accum=1, lr=3e-4, clip=1.0, device="cpu"):
        self.cfg, self.micro_batch, self.grad_accum, self.clip = cfg, micro_batch, grad_accum, clip
        self.model = GPT(cfg, device)
        self.data = SyntheticData(cfg.seed, cfg.vocab, cfg.seq)
        params = self.model.params.values()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95), eps=1e-8,
        )

    @property
    def global_batch(self):
        return self.micro_batch * self.grad_accum

    def step(self, step, capture_grads=False):
        """One training step. Returns (loss, grad_norm, grads): the global mean loss before the
        update, the gradient L2 norm before clipping (both float64), and, if capture_grads, a dict
        name -> copy of the unclipped gradient (else None). train_step() returns the MoE terms too."""
        r = self.train_step(step, capture_grads)
        return r.loss, r.grad_norm, r.grads

    def train_step(self, step, capture_grads=False):
        """One training step; returns a StepResult. The objective is the mean cross-entropy over the
        global batch plus, for the MoE model with aux_loss > 0, (b/G)·Σ_micro-batches Σ_layers aux; the
        reported loss is the mean cross-entropy alone, the gradient (and its norm) that of the objective."""
        G, b, S = self.global_batch, self.micro_batch, self.cfg.seq
        params = list(self.model.params.values())
        self.opt.zero_grad(set_to_none=True)
        loss, aux_loss = 0.0, 0.0
        moe = self.cfg.experts > 0
        tokens_per_expert = np.zeros((self.cfg.layers, self.cfg.experts), dtype=np.int64) if moe else None
        dropped = np.zeros(self.cfg.layers, dtype=np.int64) if moe else None
        for m in range(self.grad_accum):
            toks = self.data.samples(step * G + m * b + np.arange(b)).to(self.model.device)
            ce_sum, aux_sum, kept, drop = self.model.loss_terms(toks[:, :-1], toks[:, 1:])
            part = ce_sum / (G * S)
            objective = part
            if aux_sum is not None:
                aux_part = aux_sum * (b / G)
                objective = objective + aux_part
                aux_loss += aux_part.item()
            if moe:
                tokens_per_expert += kept
                dropped += drop
            objective.backward()
            loss += part.item()
        # Reported norm in float64; clip_grad_norm_ recomputes it (float32) exactly as torch does.
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        grads = None
        if capture_grads:
            grads = OrderedDict((n, p.grad.detach().cpu().clone()) for n, p in self.model.params.items())
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=self.clip)
        self.opt.step()
        return StepResult(loss, grad_norm, grads, aux_loss, tokens_per_expert, dropped)


# --------------------------------------------------------------------------------------------
# Known answers (SPEC 2.1).
# --------------------------------------------------------------------------------------------


def selftest():
    assert fnv1a64("embed.tok") == 0x1B80F1FEC2406726, hex(fnv1a64("embed.tok"))
    known = [
        ("embed.tok", 0, 0.38244705155401815),
        ("embed.tok", 1, 0.40739868542495206),
        ("block0.attn.qkv.w", 12345, 0.8237545596542627),
    ]
    for name, i, want in known:
        got = u(1234, name, i)
        assert got == want, (name, i, got, want)
        got_np = float(u_np(1234, name, np.array([i]))[0])
        assert got_np == want, ("numpy", name, i, got_np, want)
    # The vectorised path agrees with the scalar one over a range, including large indices.
    idx = [0, 1, 2, 1000, 2**40 + 7, 2**64 - 1]
    vec = u_np(1234, "embed.pos", np.array(idx, dtype=np.uint64))
    assert all(float(vec[j]) == u(1234, "embed.pos", i) for j, i in enumerate(idx))
    toks = SyntheticData(1234, 256, 32).samples([0, 1])
    assert toks.shape == (2, 33)
    assert toks[0, :8].tolist() == [182, 52, 25, 15, 57, 255, 217, 99], toks[0, :8].tolist()
    assert toks[1, :8].tolist() == [170, 184, 213, 40, 235, 125, 4, 142], toks[1, :8].tolist()
    # Init values: element [r][c] of a [R, C] tensor has index r*C + c.
    cfg = Config(**PRESETS["small"])
    w = GPT(cfg).params["block0.attn.qkv.w"]
    r, c = divmod(12345, 3 * cfg.hidden)
    want = 0.02 * math.sqrt(3) * (2 * 0.8237545596542627 - 1)
    assert abs(float(w[r, c]) - want) <= 1e-7 * abs(want), (float(w[r, c]), want)
    print("gpt_ref selftest: OK")


def _moe_params(h, f, E, gen, prefix="t."):
    """Random float32 parameters of one MoE layer (biases non-zero, so that they are tested too)."""
    P = {prefix + "moe.router.w": torch.randn(h, E, generator=gen) * 0.5}
    for e in range(E):
        q = f"{prefix}moe.expert{e}."
        P[q + "fc1.w"] = torch.randn(h, f, generator=gen) * 0.3
        P[q + "fc1.b"] = torch.randn(f, generator=gen) * 0.1
        P[q + "fc2.w"] = torch.randn(f, h, generator=gen) * 0.3
        P[q + "fc2.b"] = torch.randn(h, generator=gen) * 0.1
    return P


def _moe_loop(P, prefix, u2d, E, k, capacity_factor):
    """A second, per-token formulation of the MoE output, written independently of moe_block:
    numpy ranking, an explicit capacity counter, one expert call per kept assignment."""
    N = u2d.shape[0]
    logits = (u2d @ P[prefix + "moe.router.w"])
    lg = logits.detach().cpu().numpy()
    order = np.argsort(-lg, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower index first
    C = N if capacity_factor == 0 else math.ceil(capacity_factor * k * N / E)
    used = np.zeros(E, dtype=np.int64)
    rows = []
    for n in range(N):
        chosen = logits[n, order[n]]
        g = torch.exp(chosen - chosen.max())
        g = g / g.sum()
        acc = torch.zeros_like(u2d[n])
        for j in range(k):
            e = int(order[n, j])
            if used[e] < C:
                used[e] += 1
                q = f"{prefix}moe.expert{e}."
                hid = F.gelu(u2d[n] @ P[q + "fc1.w"] + P[q + "fc1.b"], approximate="tanh")
                acc = acc + g[j] * (hid @ P[q + "fc2.w"] + P[q + "fc2.b"])
        rows.append(acc)
    return torch.stack(rows), used


def _close(a, b, rtol, what):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (what, tuple(a.shape), tuple(b.shape))
    err = float((a - b).norm()) / max(float(b.norm()), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:g}"


def selftest_moe():
    gen = torch.Generator().manual_seed(7)

    # Names, shapes and initial values of the MoE parameters (SPEC 2, 2.1): mlp.* replaced by the
    # router and E experts; element [r][c] of a [R, C] tensor is u(seed, name, r·C + c).
    cfg = Config(layers=2, hidden=16, heads=2, seq=8, vocab=32, experts=3, top_k=2)
    specs = {name: (shape, init) for name, shape, init in param_specs(cfg)}
    assert not any("mlp." in n for n in specs)
    std, std_out = 0.02, 0.02 / math.sqrt(2 * 2)
    want = {"block1.moe.router.w": ((16, 3), ("uniform", std))}
    for e in range(3):
        q = f"block1.moe.expert{e}."
        want.update({q + "fc1.w": ((16, 64), ("uniform", std)), q + "fc1.b": ((64,), ("zeros",)),
                     q + "fc2.w": ((64, 16), ("uniform", std_out)), q + "fc2.b": ((16,), ("zeros",))})
    got = {n: v for n, v in specs.items() if n.startswith("block1.moe.")}
    assert got == want, (got, want)
    assert len(specs) == 2 + 2 * (8 + 1 + 4 * 3) + 3, len(specs)
    params = GPT(cfg).params
    for name, r, c, sd in [("block1.moe.router.w", 5, 2, std), ("block0.moe.expert2.fc2.w", 40, 7, std_out),
                           ("block1.moe.expert1.fc1.w", 15, 63, std)]:
        C = params[name].shape[1]
        v = sd * math.sqrt(3) * (2 * u(cfg.seed, name, r * C + c) - 1)
        assert abs(float(params[name][r, c]) - v) <= 1e-7 * abs(v), (name, float(params[name][r, c]), v)
    assert float(params["block0.moe.expert1.fc2.b"].abs().max()) == 0.0

    # Top-k: largest first, ties to the lower expert index (-0.0 equals 0.0).
    assert topk_experts([[1.0, 3.0, 3.0, 0.0, 3.0]], 2) == [[1, 2]]
    assert topk_experts([[1.0, 3.0, 3.0, 0.0, 3.0]], 4) == [[1, 2, 4, 0]]
    assert topk_experts([[2.0, 2.0, 2.0, 2.0]], 3) == [[0, 1, 2]]
    assert topk_experts([[-0.0, 0.0, -1.0], [0.0, -0.0, 5.0]], 2) == [[0, 1], [2, 0]]
    assert topk_experts([[0.1, 0.5, -2.0, 0.4]], 1) == [[1]]
    # ...and inside the block: identical router columns give bitwise equal logits.
    E, h, f, N = 4, 8, 16, 6
    cfg = Config(layers=1, hidden=h, heads=1, seq=N, vocab=8, experts=E, top_k=1)
    P = _moe_params(h, f, E, gen)
    P["t.moe.router.w"] = torch.tensor([0.5, 1.0, 1.0, 0.25]).repeat(h, 1)
    _, _, kept, dropped = moe_block(P, "t.", torch.ones(N, h), cfg)
    assert kept == [0, N, 0, 0] and dropped == 0, (kept, dropped)

    # Capacity: ceil(cf·k·N/E) in double, left to right; 0 = no limit.
    assert moe_capacity(0, 2, 10, 4) == 10
    assert moe_capacity(1.0, 1, 8, 4) == 2
    assert moe_capacity(1.25, 2, 6, 4) == 4  # 3.75
    assert moe_capacity(1.1, 1, 100, 1) == 111  # 1.1·100 = 110.00000000000001 in double
    keep, kept, routed = assign_capacity([[0, 1], [0, 2], [1, 0], [0, 1]], 3, 2)
    assert keep == [[True, True], [True, True], [True, False], [False, False]], keep
    assert kept == [2, 2, 1] and routed == [4, 3, 1], (kept, routed)

    # A hand-made routing through the block: token types A (logits 3 2 1 -> experts 0, 1) and
    # B (1 3 2 -> experts 1, 2); tokens A B A A, k = 2, C = ceil(0.75·2·4/3) = 2.
    E, h, N = 3, 4, 4
    cfg = Config(layers=1, hidden=h, heads=1, seq=N, vocab=8, experts=E, top_k=2, capacity_factor=0.75)
    P = _moe_params(h, f, E, gen)
    P["t.moe.router.w"] = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    u2d = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    out, aux, kept, dropped = moe_block(P, "t.", u2d, cfg)
    assert aux is None and kept == [2, 2, 1] and dropped == 3, (aux, kept, dropped)

    def ex(e, x):
        q = f"t.moe.expert{e}."
        return mlp(x[None], P[q + "fc1.w"], P[q + "fc1.b"], P[q + "fc2.w"], P[q + "fc2.b"])[0]

    g_hi, g_lo = math.exp(1) / (1 + math.exp(1)), 1 / (1 + math.exp(1))  # softmax(3, 2), either type
    want = torch.stack([
        g_hi * ex(0, u2d[0]) + g_lo * ex(1, u2d[0]),
        g_hi * ex(1, u2d[1]) + g_lo * ex(2, u2d[1]),
        g_hi * ex(0, u2d[2]),  # expert 1 full: dropped, and the gate is not renormalised
        torch.zeros(h),  # experts 0 and 1 both full
    ])
    _close(out, want, 1e-6, "hand-made routing")
    assert float(out[3].abs().max()) == 0.0

    # The block against the per-token formulation, output and gradients, with capacity dropping.
    E, k, h, f, N = 5, 2, 8, 12, 40
    cfg = Config(layers=1, hidden=h, heads=1, seq=N, vocab=8, experts=E, top_k=k, capacity_factor=0.6)
    P = {n: t.requires_grad_(True) for n, t in _moe_params(h, f, E, gen).items()}
    u2d = torch.randn(N, h, generator=gen).requires_grad_(True)
    out, _, kept, dropped = moe_block(P, "t.", u2d, cfg)
    ref, used = _moe_loop(P, "t.", u2d, E, k, 0.6)
    assert kept == used.tolist() and dropped == N * k - int(used.sum()) and dropped > 0, (kept, used, dropped)
    _close(out, ref, 1e-5, "moe_block vs per-token loop")
    dout = torch.randn(N, h, generator=gen)
    names = ["t.moe.router.w", "t.moe.expert0.fc1.w", "t.moe.expert3.fc2.b"]
    g1 = torch.autograd.grad((out * dout).sum(), [u2d] + [P[n] for n in names])
    g2 = torch.autograd.grad((ref * dout).sum(), [u2d] + [P[n] for n in names])
    for n, a, b in zip(["u"] + names, g1, g2):
        _close(a, b, 1e-5, f"gradient of {n}")

    # The auxiliary loss and its gradient against a closed form in float64:
    # aux = coef·E·Σ_e f_e·P_e, f_e = routed_e/(N·k) constant, P_e = mean_n softmax(logits_n)_e;
    # ∂aux/∂logits[n, i] = p[n, i]·(c_i − Σ_e c_e·p[n, e]), c_e = coef·E·f_e/N.
    coef = 0.03
    cfg = Config(layers=1, hidden=h, heads=1, seq=N, vocab=8, experts=E, top_k=k, capacity_factor=0.6,
                 aux_loss=coef)
    for t in list(P.values()) + [u2d]:
        t.grad = None
    _, aux, _, _ = moe_block(P, "t.", u2d, cfg)
    aux.backward()
    U, W = u2d.detach().double(), P["t.moe.router.w"].detach().double()
    lg = U @ W
    order = np.argsort(-lg.numpy(), axis=1, kind="stable")[:, :k]
    fe = torch.from_numpy(np.bincount(order.ravel(), minlength=E).astype(np.float64)) / (N * k)
    p = torch.exp(lg - lg.max(dim=1, keepdim=True).values)
    p = p / p.sum(dim=1, keepdim=True)
    _close(aux.detach(), coef * E * (fe * p.mean(dim=0)).sum(), 1e-6, "aux value")
    c = coef * E * fe / N
    dlg = p * (c[None, :] - (p @ c)[:, None])
    _close(P["t.moe.router.w"].grad, U.T @ dlg, 1e-5, "aux gradient of router.w (closed form)")
    _close(u2d.grad, dlg @ W.T, 1e-5, "aux gradient of u (closed form)")
    # ...and against autograd of the direct formula, written out with exp, in float64.
    W64 = W.clone().requires_grad_(True)
    L64 = U @ W64
    ex64 = torch.exp(L64)
    (coef * E * (fe * (ex64 / ex64.sum(dim=1, keepdim=True)).mean(dim=0)).sum()).backward()
    _close(P["t.moe.router.w"].grad, W64.grad, 1e-5, "aux gradient of router.w (autograd, direct)")
    for e in range(E):  # the aux loss reaches the router only
        assert P[f"t.moe.expert{e}.fc1.w"].grad is None or float(P[f"t.moe.expert{e}.fc1.w"].grad.abs().max()) == 0

    # E = 1, k = 1, no capacity limit: the dense model with the same weights, for two training
    # steps (losses, norms, every gradient); the router gets no gradient, the aux term (coef 0.5)
    # is coef·L exactly and has no gradient either (the softmax over one expert is 1).
    base = dict(layers=2, hidden=32, heads=4, seq=16, vocab=64, seed=99)
    dense = Trainer(Config(**base), micro_batch=2, grad_accum=2)
    one = Trainer(Config(**base, experts=1, top_k=1, capacity_factor=0.0, aux_loss=0.5), micro_batch=2,
                  grad_accum=2)
    with torch.no_grad():
        for name, t in dense.model.params.items():
            one.model.params[name.replace("mlp.", "moe.expert0.")].copy_(t)
    names = {name.replace("mlp.", "moe.expert0."): name for name in dense.model.params}
    assert set(one.model.params) == set(names) | {f"block{l}.moe.router.w" for l in range(2)}
    for s in range(2):
        rd, r1 = dense.train_step(s, capture_grads=True), one.train_step(s, capture_grads=True)
        assert abs(rd.loss - r1.loss) <= 1e-6 * rd.loss, (s, rd.loss, r1.loss)
        assert abs(rd.grad_norm - r1.grad_norm) <= 1e-6 * rd.grad_norm, (s, rd.grad_norm, r1.grad_norm)
        for n1, nd in names.items():
            _close(r1.grads[n1], rd.grads[nd], 1e-6, f"E=1 step {s} gradient of {n1}")
        for l in range(2):
            assert float(r1.grads[f"block{l}.moe.router.w"].abs().max()) == 0.0
        assert r1.aux_loss == 0.5 * 2, r1.aux_loss
        assert r1.tokens_per_expert.tolist() == [[4 * 16], [4 * 16]] and r1.dropped.tolist() == [0, 0]
        assert rd.aux_loss == 0.0 and rd.tokens_per_expert is None

    # The MoE trainer: the reported loss excludes the aux term, the gradient includes it; the
    # statistics add up (kept + dropped = G·S·k per layer, kept ≤ C per micro-batch and expert).
    moe = dict(base, experts=4, top_k=2, capacity_factor=1.0)
    t_aux = Trainer(Config(**moe, aux_loss=0.01), micro_batch=2, grad_accum=2)
    t_no = Trainer(Config(**moe, aux_loss=0.0), micro_batch=2, grad_accum=2)
    ra, rn = t_aux.train_step(0, capture_grads=True), t_no.train_step(0, capture_grads=True)
    assert ra.loss == rn.loss and math.isfinite(ra.loss), (ra.loss, rn.loss)
    assert ra.tokens_per_expert.tolist() == rn.tokens_per_expert.tolist()
    assert rn.aux_loss == 0.0 and abs(ra.aux_loss - 0.01 * 2) < 0.01 * 2 * 0.05, ra.aux_loss  # ≈ coef·L near init
    diff = float((ra.grads["block0.moe.router.w"] - rn.grads["block0.moe.router.w"]).norm())
    assert diff > 1e-6 * float(rn.grads["block0.moe.router.w"].norm()), diff
    C = moe_capacity(1.0, 2, 2 * 16, 4)
    assert (ra.tokens_per_expert.sum(axis=1) + ra.dropped == 4 * 16 * 2).all(), (ra.tokens_per_expert, ra.dropped)
    assert (ra.tokens_per_expert <= 2 * C).all()
    ru = Trainer(Config(**dict(moe, capacity_factor=0.0)), micro_batch=2, grad_accum=2).train_step(0)
    assert ru.dropped.tolist() == [0, 0] and (ru.tokens_per_expert.sum(axis=1) == 4 * 16 * 2).all()
    # The objective's gradient is that of mean CE + (b/G)·Σ aux: recompute it in one piece.
    m = GPT(Config(**moe, aux_loss=0.01))
    total = 0.0
    for mb in range(2):
        toks = t_aux.data.samples(mb * 2 + np.arange(2))
        ce, aux_sum, _, _ = m.loss_terms(toks[:, :-1], toks[:, 1:])
        total = total + ce / (4 * 16) + aux_sum * (2 / 4)
    gr = torch.autograd.grad(total, list(m.params.values()))
    for (n, _), g in zip(m.params.items(), gr):
        _close(ra.grads[n], g, 1e-6, f"objective gradient of {n}")
    print("gpt_ref selftest (MoE): OK")


if __name__ == "__main__":
    if "--selftest" in sys.argv[1:]:
        selftest()
        selftest_moe()
    else:
        print(__doc__.strip())
