#!/usr/bin/env python3
"""Independent PyTorch reference of the parabench model and training step (docs/SPEC.md, 2-2.3).

Written from the spec alone, on CPU in float32: the deterministic initialisation (mix / fnv1a64 / u),
the synthetic "small learnable language", the pre-LayerNorm GPT with an untied head, the mean
cross-entropy over the global batch with gradient accumulation, clip_grad_norm_ and AdamW.
The C++ apps are checked against it (check_against_torch.py) and timed against it (bench_torch.py).

    python3 gpt_ref.py --selftest     checks the known answers of SPEC 2.1
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

    def __post_init__(self):
        if self.ffn == 0:
            self.ffn = 4 * self.hidden
        assert self.hidden % self.heads == 0, "hidden must be divisible by heads"


PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=4, seq=32, vocab=256),
    "small": dict(layers=4, hidden=256, heads=8, seq=128, vocab=4096),
    "gpt2-124m": dict(layers=12, hidden=768, heads=12, seq=1024, vocab=50257),
    "gpt2-350m": dict(layers=24, hidden=1024, heads=16, seq=1024, vocab=50257),
    "block-4k": dict(layers=4, hidden=4096, heads=32, seq=2048, vocab=32000),
}


def param_specs(cfg):
    """Ordered list of (name, shape, init) where init is ('uniform', std), ('zeros',) or ('ones',)."""
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
            (p + "mlp.fc1.w", (h, f), ("uniform", std)),
            (p + "mlp.fc1.b", (f,), ("zeros",)),
            (p + "mlp.fc2.w", (f, h), ("uniform", std_out)),
            (p + "mlp.fc2.b", (h,), ("zeros",)),
        ]
    specs += [
        ("final_ln.g", (h,), ("ones",)),
        ("final_ln.b", (h,), ("zeros",)),
        ("head.w", (h, V), ("uniform", std)),
    ]
    return specs


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

    def forward(self, tokens):
        """tokens: int64 [B, S'] with S' <= seq. Returns logits [B, S', V]."""
        cfg, P = self.cfg, self.params
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
            # MLP with tanh-approximated GELU.
            u_ = F.layer_norm(x, (h,), P[p + "ln2.g"], P[p + "ln2.b"], eps=1e-5)
            hid = F.gelu(u_ @ P[p + "mlp.fc1.w"] + P[p + "mlp.fc1.b"], approximate="tanh")
            x = x + hid @ P[p + "mlp.fc2.w"] + P[p + "mlp.fc2.b"]
        x = F.layer_norm(x, (h,), P["final_ln.g"], P["final_ln.b"], eps=1e-5)
        return x @ P["head.w"]  # no bias

    def loss_sum(self, inputs, targets):
        """Sum (not mean) of the cross-entropy over every token of the micro-batch."""
        logits = self.forward(inputs)
        return F.cross_entropy(logits.reshape(-1, self.cfg.vocab), targets.reshape(-1), reduction="sum")


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
        name -> copy of the unclipped gradient (else None)."""
        G, b, S = self.global_batch, self.micro_batch, self.cfg.seq
        params = list(self.model.params.values())
        self.opt.zero_grad(set_to_none=True)
        loss = 0.0
        for m in range(self.grad_accum):
            toks = self.data.samples(step * G + m * b + np.arange(b)).to(self.model.device)
            part = self.model.loss_sum(toks[:, :-1], toks[:, 1:]) / (G * S)
            part.backward()
            loss += part.item()
        # Reported norm in float64; clip_grad_norm_ recomputes it (float32) exactly as torch does.
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        grads = None
        if capture_grads:
            grads = OrderedDict((n, p.grad.detach().cpu().clone()) for n, p in self.model.params.items())
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=self.clip)
        self.opt.step()
        return loss, grad_norm, grads


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


if __name__ == "__main__":
    if "--selftest" in sys.argv[1:]:
        selftest()
    else:
        print(__doc__.strip())
