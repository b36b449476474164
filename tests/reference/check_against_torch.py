#!/usr/bin/env python3
"""Check a C++ training dump against the independent PyTorch reference (gpt_ref.py).

    check_against_torch.py --dump FILE.h5 [--result RUN.h5] [--rtol 1e-4] [--device cpu|cuda]

FILE.h5 (written by the C++ side) holds the run's configuration as root attributes (layers, hidden,
heads, seq, vocab, ffn, micro_batch, global_batch, steps, seed, lr, clip), `losses` and `grad_norms`
[steps] (float64), and `grads/<parameter name>` (float32, the step-0 gradient before clipping).
The Llama-style block (SPEC 2.5) by the optional root attributes arch ("llama"), kv_heads and rope_theta.
The mixture-of-experts model (SPEC 9) is selected by the optional root attributes experts (> 0),
top_k, capacity_factor and aux_loss (all four then required); without them, or with experts 0, the
model is dense. `losses` is then the mean cross-entropy alone; grad_norms and grads include the
auxiliary loss's gradient.
The reference trains the same configuration on one rank (grad_accum = global_batch / micro_batch) and
every step's loss, every step's grad_norm and every step-0 gradient (relative L2 error) must agree
within rtol.

RUN.h5 (--result, the run's result file): when it has /moe, its tokens_per_expert [steps, layers,
experts] (int64, kept assignments over the global batch) and dropped [steps, layers] must equal the
reference's exactly, and aux_loss [steps] (float64, (b/G)·Σ micro-batches Σ layers aux) within rtol.
Exit 0 when all agree, 1 otherwise.
"""

import argparse
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_ref  # noqa: E402

INT_ATTRS = ["layers", "hidden", "heads", "seq", "vocab", "ffn", "micro_batch", "global_batch", "steps", "seed"]
FLOAT_ATTRS = ["lr", "clip"]
MOE_INT_ATTRS = ["experts", "top_k"]
MOE_FLOAT_ATTRS = ["capacity_factor", "aux_loss"]
MOE_DATASETS = ["tokens_per_expert", "dropped", "aux_loss"]


def rel(a, b):
    """Relative difference of a to the reference b (absolute when b is 0)."""
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


def read_dump(path):
    with h5py.File(path, "r") as f:
        missing = [k for k in INT_ATTRS + FLOAT_ATTRS if k not in f.attrs]
        if missing:
            raise ValueError(f"{path}: missing root attributes {missing}")
        conf = {k: int(f.attrs[k]) for k in INT_ATTRS}
        conf.update({k: float(f.attrs[k]) for k in FLOAT_ATTRS})
        conf["experts"] = int(f.attrs["experts"]) if "experts" in f.attrs else 0
        if conf["experts"] > 0:
            missing = [k for k in MOE_INT_ATTRS + MOE_FLOAT_ATTRS if k not in f.attrs]
            if missing:
                raise ValueError(f"{path}: experts = {conf['experts']} but missing root attributes {missing}")
            conf["top_k"] = int(f.attrs["top_k"])
            conf.update({k: float(f.attrs[k]) for k in MOE_FLOAT_ATTRS})
        # SPEC 2.5's block (optional: older dumps are of the gpt block)
        arch = f.attrs.get("arch", "gpt")
        conf["arch"] = arch.decode() if isinstance(arch, bytes) else str(arch)
        conf["kv_heads"] = int(f.attrs.get("kv_heads", conf["heads"]))
        conf["rope_theta"] = float(f.attrs.get("rope_theta", 10000.0))
        losses = np.asarray(f["losses"][...], dtype=np.float64)
        norms = np.asarray(f["grad_norms"][...], dtype=np.float64)
        grads = {name: np.asarray(ds[...], dtype=np.float32) for name, ds in f["grads"].items()}
    return conf, losses, norms, grads


def read_moe_result(path):
    """The /moe datasets of a result file: None when it has no /moe group, else a dict of arrays."""
    with h5py.File(path, "r") as f:
        if "moe" not in f:
            return None
        missing = [k for k in MOE_DATASETS if k not in f["moe"]]
        if missing:
            raise ValueError(f"{path}: /moe lacks {missing}")
        return {
            "tokens_per_expert": np.asarray(f["moe/tokens_per_expert"][...]),
            "dropped": np.asarray(f["moe/dropped"][...]),
            "aux_loss": np.asarray(f["moe/aux_loss"][...], dtype=np.float64),
        }


def check_moe(res, ref_tpe, ref_dropped, ref_aux, steps, layers, experts, rtol):
    """Compare the result file's /moe with the reference's statistics; prints a table, returns ok."""
    want = {"tokens_per_expert": (steps, layers, experts), "dropped": (steps, layers), "aux_loss": (steps,)}
    bad_shapes = [f"{k} {res[k].shape} should be {v}" for k, v in want.items() if res[k].shape != v]
    if bad_shapes:
        print("FAIL: /moe shapes: " + "; ".join(bad_shapes))
        return False
    for k in ["tokens_per_expert", "dropped"]:
        if not np.issubdtype(res[k].dtype, np.integer):
            print(f"FAIL: /moe/{k} has dtype {res[k].dtype}, should be int64")
            return False
    ok = True
    print("routing statistics (exact): kept assignments per expert and dropped assignments, global batch")
    width = max(len(" ".join(map(str, ref_tpe[s][l]))) for s in range(steps) for l in range(layers))
    width = max(width, len("tokens/expert torch"))
    print(f"{'step':>4} {'layer':>5}  {'tokens/expert c++':<{width}}  {'tokens/expert torch':<{width}} "
          f"{'drop c++':>8} {'drop torch':>10}")
    for s in range(steps):
        for l in range(layers):
            got_t, ref_t = [int(v) for v in res["tokens_per_expert"][s, l]], [int(v) for v in ref_tpe[s][l]]
            got_d, ref_d = int(res["dropped"][s, l]), int(ref_dropped[s][l])
            bad = got_t != ref_t or got_d != ref_d
            ok &= not bad
            print(f"{s:>4} {l:>5}  {' '.join(map(str, got_t)):<{width}}  {' '.join(map(str, ref_t)):<{width}} "
                  f"{got_d:>8} {ref_d:>10}{'  FAIL' if bad else ''}")
    print(f"{'step':>4} {'aux c++':>14} {'aux torch':>14} {'rel':>9}")
    for s in range(steps):
        ra = rel(float(res["aux_loss"][s]), ref_aux[s])
        bad = not ra <= rtol  # NaN fails too
        ok &= not bad
        print(f"{s:>4} {float(res['aux_loss'][s]):>14.8f} {ref_aux[s]:>14.8f} {ra:>9.2e}{'  FAIL' if bad else ''}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--dump", required=True, help="HDF5 dump written by the C++ side")
    ap.add_argument("--result", help="the run's result file (RUN.h5): its /moe statistics are checked when present")
    ap.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    ap.add_argument("--device", default="cpu", help="where the reference runs: cpu (default) or cuda (fp32, TF32 off)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"FAIL: --device {args.device}: torch sees no GPU")
            return 1
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    try:
        conf, losses, norms, grads_cpp = read_dump(args.dump)
    except (OSError, KeyError, ValueError) as e:
        print(f"FAIL: cannot read dump {args.dump}: {e}")
        return 1
    b, G, steps = conf["micro_batch"], conf["global_batch"], conf["steps"]
    if b <= 0 or G % b != 0:
        print(f"FAIL: global_batch {G} is not a multiple of micro_batch {b}")
        return 1
    moe = conf["experts"] > 0
    moe_kw = {}
    if moe:
        moe_kw = dict(experts=conf["experts"], top_k=conf["top_k"], capacity_factor=conf["capacity_factor"],
                      aux_loss=conf["aux_loss"])
        if not (1 <= conf["top_k"] <= conf["experts"] and conf["capacity_factor"] >= 0 and conf["aux_loss"] >= 0):
            print(f"FAIL: bad MoE configuration in the dump: {moe_kw}")
            return 1
    cfg = gpt_ref.Config(layers=conf["layers"], hidden=conf["hidden"], heads=conf["heads"],
                         seq=conf["seq"], vocab=conf["vocab"], ffn=conf["ffn"], seed=conf["seed"], arch=conf["arch"],
                         kv_heads=conf["kv_heads"], rope_theta=conf["rope_theta"], **moe_kw)
    moe_text = (f" E{cfg.experts} k{cfg.top_k} cf{cfg.capacity_factor:g} aux{cfg.aux_loss:g}" if moe else "")
    arch_text = f" llama kv{cfg.kv_heads} theta{cfg.rope_theta:g}" if cfg.arch == "llama" else ""
    print(f"config: L{cfg.layers} h{cfg.hidden} a{cfg.heads} S{cfg.seq} V{cfg.vocab} f{cfg.ffn}{moe_text}{arch_text} "
          f"b{b} G{G} steps{steps} seed{cfg.seed} lr{conf['lr']} clip{conf['clip']}  rtol {args.rtol:g}")

    moe_res = None
    if args.result:
        try:
            moe_res = read_moe_result(args.result)
        except (OSError, KeyError, ValueError) as e:
            print(f"FAIL: cannot read result file {args.result}: {e}")
            return 1
        if moe_res is not None and not moe:
            print(f"FAIL: {args.result} has /moe but the dump describes a dense model (no experts)")
            return 1

    ok = True
    if losses.shape != (steps,) or norms.shape != (steps,):
        print(f"FAIL: losses {losses.shape} / grad_norms {norms.shape} should both be ({steps},)")
        return 1

    # Run the reference.
    trainer = gpt_ref.Trainer(cfg, micro_batch=b, grad_accum=G // b, lr=conf["lr"], clip=conf["clip"],
                              device=args.device)
    ref_losses, ref_norms, ref_grads = [], [], None
    ref_tpe, ref_dropped, ref_aux = [], [], []
    for s in range(steps):
        r = trainer.train_step(s, capture_grads=(s == 0))
        ref_losses.append(r.loss)
        ref_norms.append(r.grad_norm)
        ref_aux.append(r.aux_loss)
        ref_tpe.append(r.tokens_per_expert)
        ref_dropped.append(r.dropped)
        if s == 0:
            ref_grads = r.grads

    # Per-step loss and grad norm.
    print(f"{'step':>4} {'loss c++':>14} {'loss torch':>14} {'rel':>9} {'norm c++':>14} {'norm torch':>14} {'rel':>9}")
    for s in range(steps):
        rl, rn = rel(losses[s], ref_losses[s]), rel(norms[s], ref_norms[s])
        bad = not (rl <= args.rtol and rn <= args.rtol)  # NaN fails too
        ok &= not bad
        print(f"{s:>4} {losses[s]:>14.8f} {ref_losses[s]:>14.8f} {rl:>9.2e} "
              f"{norms[s]:>14.8f} {ref_norms[s]:>14.8f} {rn:>9.2e}{'  FAIL' if bad else ''}")

    # Step-0 gradients: same names, same shapes, relative L2 error.
    names_cpp, names_ref = set(grads_cpp), set(ref_grads)
    if names_cpp != names_ref:
        ok = False
        print(f"FAIL: gradient names differ; only in dump: {sorted(names_cpp - names_ref)}, "
              f"only in reference: {sorted(names_ref - names_cpp)}")
    nw = max([24] + [len(n) for n in ref_grads])
    print(f"{'parameter':<{nw}} {'shape':>12} {'|g torch|':>12} {'rel err':>9}")
    for name, g_ref in ref_grads.items():
        if name not in grads_cpp:
            continue
        g_ref = g_ref.double()
        g_cpp = torch.from_numpy(grads_cpp[name]).double()
        shape = "x".join(map(str, g_ref.shape))
        if tuple(g_cpp.shape) != tuple(g_ref.shape):
            ok = False
            print(f"{name:<{nw}} {shape:>12}  FAIL: dump has shape {tuple(g_cpp.shape)}")
            continue
        ref_norm = float(g_ref.norm())
        if ref_norm == 0.0 and moe and ".moe." in name:
            # Legitimately zero: an expert that kept no token in step 0, or the router when E = 1
            # (the softmax over one chosen expert is constant). The dump must have exactly zero too.
            cpp_norm = float(g_cpp.norm())
            bad = cpp_norm != 0.0
            ok &= not bad
            print(f"{name:<{nw}} {shape:>12} {ref_norm:>12.4e} {'zero':>9}"
                  f"{f'  FAIL: dump has norm {cpp_norm:.4e}' if bad else ''}")
            continue
        if ref_norm == 0.0:  # a zero reference gradient would make the check trivial
            ok = False
            print(f"{name:<{nw}} {shape:>12} {ref_norm:>12.4e}  FAIL: reference gradient is all zero")
            continue
        err = float((g_cpp - g_ref).norm()) / ref_norm
        bad = not err <= args.rtol
        ok &= not bad
        print(f"{name:<{nw}} {shape:>12} {ref_norm:>12.4e} {err:>9.2e}{'  FAIL' if bad else ''}")

    # MoE routing statistics and the aux term from the result file.
    if moe_res is not None:
        ok &= check_moe(moe_res, ref_tpe, ref_dropped, ref_aux, steps, cfg.layers, cfg.experts, args.rtol)
    elif moe:
        why = f"{args.result} has no /moe" if args.result else "no --result given"
        print(f"note: routing statistics and aux loss not checked ({why})")

    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
