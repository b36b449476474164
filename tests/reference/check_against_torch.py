#!/usr/bin/env python3
"""Check a C++ training dump against the independent PyTorch reference (gpt_ref.py).

    check_against_torch.py --dump FILE.h5 [--rtol 1e-4] [--device cpu|cuda]

FILE.h5 (written by the C++ side) holds the run's configuration as root attributes (layers, hidden,
heads, seq, vocab, ffn, micro_batch, global_batch, steps, seed, lr, clip), `losses` and `grad_norms`
[steps] (float64), and `grads/<parameter name>` (float32, the step-0 gradient before clipping).
The reference trains the same configuration on one rank (grad_accum = global_batch / micro_batch) and
every step's loss, every step's grad_norm and every step-0 gradient (relative L2 error) must agree
within rtol. Exit 0 when all agree, 1 otherwise.
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
        losses = np.asarray(f["losses"][...], dtype=np.float64)
        norms = np.asarray(f["grad_norms"][...], dtype=np.float64)
        grads = {name: np.asarray(ds[...], dtype=np.float32) for name, ds in f["grads"].items()}
    return conf, losses, norms, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--dump", required=True, help="HDF5 dump written by the C++ side")
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
    cfg = gpt_ref.Config(layers=conf["layers"], hidden=conf["hidden"], heads=conf["heads"],
                         seq=conf["seq"], vocab=conf["vocab"], ffn=conf["ffn"], seed=conf["seed"])
    print(f"config: L{cfg.layers} h{cfg.hidden} a{cfg.heads} S{cfg.seq} V{cfg.vocab} f{cfg.ffn} "
          f"b{b} G{G} steps{steps} seed{cfg.seed} lr{conf['lr']} clip{conf['clip']}  rtol {args.rtol:g}")

    ok = True
    if losses.shape != (steps,) or norms.shape != (steps,):
        print(f"FAIL: losses {losses.shape} / grad_norms {norms.shape} should both be ({steps},)")
        return 1

    # Run the reference.
    trainer = gpt_ref.Trainer(cfg, micro_batch=b, grad_accum=G // b, lr=conf["lr"], clip=conf["clip"],
                              device=args.device)
    ref_losses, ref_norms, ref_grads = [], [], None
    for s in range(steps):
        loss, norm, grads = trainer.step(s, capture_grads=(s == 0))
        ref_losses.append(loss)
        ref_norms.append(norm)
        if s == 0:
            ref_grads = grads

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
    print(f"{'parameter':<24} {'shape':>12} {'|g torch|':>12} {'rel err':>9}")
    for name, g_ref in ref_grads.items():
        if name not in grads_cpp:
            continue
        g_ref = g_ref.double()
        g_cpp = torch.from_numpy(grads_cpp[name]).double()
        shape = "x".join(map(str, g_ref.shape))
        if tuple(g_cpp.shape) != tuple(g_ref.shape):
            ok = False
            print(f"{name:<24} {shape:>12}  FAIL: dump has shape {tuple(g_cpp.shape)}")
            continue
        ref_norm = float(g_ref.norm())
        if ref_norm == 0.0:  # a zero reference gradient would make the check trivial
            ok = False
            print(f"{name:<24} {shape:>12} {ref_norm:>12.4e}  FAIL: reference gradient is all zero")
            continue
        err = float((g_cpp - g_ref).norm()) / ref_norm
        bad = not err <= args.rtol
        ok &= not bad
        print(f"{name:<24} {shape:>12} {ref_norm:>12.4e} {err:>9.2e}{'  FAIL' if bad else ''}")

    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
