"""The vocabulary padded in storage (SPEC 2, Megatron-LM's --make-vocab-size-divisible-by): embed.tok and
head.w hold Vp = a multiple of 128 · tp rows and columns, the padding zero and masked out of the loss, so
that a padded run trains exactly the model of an unpadded one and only its memory differs, by the
padding's bytes. (test_tp covers tp ranks whose block is partly or wholly padding; the PyTorch
reference checks, with vocabulary 67, the gradients of a padded run with the padding left out.)"""

import numpy as np

from conftest import padded_vocab

TINY = ["--model", "tiny", "--vocab", "100", "--steps", "4", "--warmup", "1", "--global-batch", "2"]
H = 64  # tiny's hidden size
RTOL = 1e-6


def test_padding_changes_memory_not_the_model(cached_run):
    padded = cached_run("dp", 1, TINY)
    unpadded = cached_run("dp", 1, [*TINY, "--make-vocab-size-divisible-by", "1"])
    for run in (padded, unpadded):
        assert run["status"] == "complete", run["command"]
    assert int(padded["config"]["padded_vocab"]) == 128
    assert int(padded["config"]["make_vocab_size_divisible_by"]) == 128
    assert int(unpadded["config"]["padded_vocab"]) == 100
    for key in ("loss", "grad_norm"):
        rel = np.abs(padded[key] - unpadded[key]) / np.abs(unpadded[key])
        assert rel.max() <= RTOL, (key, padded[key], unpadded[key])
    assert abs(padded["param_norm"] - unpadded["param_norm"]) <= RTOL * unpadded["param_norm"]
    # embed.tok's 28 padding rows and head.w's 28 padding columns, fp32, in parameters and gradients, and
    # twice that in AdamW's m and v
    padding = 2 * (padded_vocab(100) - 100) * H * 4
    for category, copies in (("parameters", 1), ("gradients", 1), ("optimizer_states", 2)):
        for kind in ("measured", "predicted"):
            extra = padded[kind][category] - unpadded[kind][category]
            assert extra.tolist() == [copies * padding], (kind, category, extra)


def test_header_names_the_padded_vocabulary(run_app, tmp_path):
    code, out, err = run_app("dp", 1, [*TINY, "--out", tmp_path / "r.h5"])
    assert code == 0, err
    assert "vocab 100 (stored padded to 128)" in out, out
