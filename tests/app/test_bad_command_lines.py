"""Wrong command lines (SPEC sections 3 to 5): on 2 ranks each must exit 2 promptly (a hang is a
failure), name the offending option on stderr, print that message once (rank 0 only), and leave no
result file behind. --help and --version exit 0."""

import pytest

from conftest import check_rejected

RANKS = 2
TIMEOUT = 20

# (id, arguments after `--model tiny` (unless they choose a model), the option the message must name)
BAD = [
    ("unknown-option", ["--bogus-option"], "--bogus-option"),
    ("positional-argument", ["extra"], "extra"),
    ("tp-option-of-tp-app", ["--tp", "2"], "--tp"),
    ("shard-option-of-fsdp-app", ["--shard", "FULL_SHARD"], "--shard"),
    ("steps-not-a-number", ["--steps", "abc"], "--steps"),
    ("lr-not-a-number", ["--lr", "fast"], "--lr"),
    ("micro-batch-not-an-integer", ["--micro-batch", "1.5"], "--micro-batch"),
    ("steps-overflow", ["--steps", "99999999999"], "--steps"),
    ("micro-batch-zero", ["--micro-batch", "0"], "--micro-batch"),
    ("micro-batch-negative", ["--micro-batch", "-2"], "--micro-batch"),
    ("steps-zero", ["--steps", "0"], "--steps"),
    ("warmup-negative", ["--warmup", "-1"], "--warmup"),
    ("threads-negative", ["--threads", "-1"], "--threads"),
    ("warmup-not-below-steps", ["--steps", "5", "--warmup", "5"], "--warmup"),
    ("seq-negative", ["--seq", "-1"], "--seq"),
    ("hidden-not-divisible-by-heads", ["--hidden", "30", "--heads", "4"], "--heads"),
    ("unknown-model", ["--model", "gpt5"], "--model"),
    ("global-batch-not-a-multiple", ["--global-batch", "3"], "--global-batch"),
    ("global-batch-equals-form", ["--micro-batch=2", "--global-batch=6"], "--global-batch"),
    ("global-batch-negative", ["--global-batch", "-2"], "--global-batch"),
    ("dp-does-not-match-world", ["--dp", "3"], "--dp"),
    ("backend-cuda-not-built", ["--backend", "cuda"], "--backend"),
    ("backend-unknown", ["--backend", "foo"], "--backend"),
    ("comm-nccl-on-cpu", ["--comm", "nccl"], "--comm"),
    ("comm-unknown", ["--comm", "gloo"], "--comm"),
    ("attention-cudnn-on-cpu", ["--attention", "cudnn"], "--attention"),
    ("attention-unknown", ["--attention", "flash"], "--attention"),
    ("cpu-gemm-unknown", ["--cpu-gemm", "mkl"], "--cpu-gemm"),
    ("cpu-gemm-empty", ["--cpu-gemm", ""], "--cpu-gemm"),
    ("distributed-timeout-zero", ["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes"),
    ("distributed-timeout-negative", ["--distributed-timeout-minutes", "-1"], "--distributed-timeout-minutes"),
    ("dtype-unknown", ["--dtype", "fp16"], "--dtype"),
    ("dtype-upper-case", ["--dtype", "BF16"], "--dtype"),
    ("recompute-unknown", ["--recompute", "bogus"], "--recompute"),
    ("bucket-mb-zero", ["--bucket-mb", "0"], "--bucket-mb"),
    ("bucket-mb-negative", ["--bucket-mb", "-1"], "--bucket-mb"),
    ("lr-negative", ["--lr", "-1"], "--lr"),
    ("lr-zero", ["--lr", "0"], "--lr"),
    ("lr-nan", ["--lr", "nan"], "--lr"),
    ("clip-negative", ["--clip", "-1"], "--clip"),
    ("peak-tflops-negative", ["--peak-tflops", "-2"], "--peak-tflops"),
    ("out-empty", ["--out", ""], "--out"),
    ("missing-value-at-end", ["--steps"], "--steps"),
    ("missing-value-equals-form", ["--steps="], "--steps"),
]

# An explicit value that is out of range must be rejected too, even where the app uses that value
# internally to mean "not given" (0 for the shape, --global-batch, --dp, --threads; -1 for
# --peak-tflops). Today these are silently replaced by the preset or derived value.
BAD_SENTINELS = [
    ("layers-zero", ["--layers", "0"], "--layers"),
    ("hidden-zero", ["--hidden", "0"], "--hidden"),
    ("heads-zero", ["--heads", "0"], "--heads"),
    ("seq-zero", ["--seq", "0"], "--seq"),
    ("vocab-zero", ["--vocab", "0"], "--vocab"),
    ("vocab-divisor-zero", ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by"),
    ("vocab-divisor-too-large", ["--make-vocab-size-divisible-by", "2000000000"], "--make-vocab-size-divisible-by"),
    ("ffn-zero", ["--ffn", "0"], "--ffn"),
    ("global-batch-zero", ["--global-batch", "0"], "--global-batch"),
    ("dp-zero", ["--dp", "0"], "--dp"),
    ("threads-zero", ["--threads", "0"], "--threads"),
    ("peak-tflops-minus-one", ["--peak-tflops", "-1"], "--peak-tflops"),
]


def command_line(args):
    # `--model tiny` first, so that a wrongly accepted line trains the tiny model only (and the
    # missing-value cases stay last); rows that test --model choose their own.
    return args if "--model" in args else ["--model", "tiny", *args]


@pytest.mark.parametrize("args, option", [pytest.param(a, o, id=i) for i, a, o in BAD])
def test_rejected(args, option, run_app, tmp_path):
    check_rejected(run_app, tmp_path, "dp", RANKS, command_line(args), option, timeout=TIMEOUT)


@pytest.mark.parametrize("args, option", [pytest.param(a, o, id=i) for i, a, o in BAD_SENTINELS])
def test_explicit_out_of_range_value_is_rejected(args, option, run_app, tmp_path):
    check_rejected(run_app, tmp_path, "dp", RANKS, command_line(args), option, timeout=TIMEOUT)


def test_slurm_ntasks_with_one_rank(run_app, tmp_path):
    """SLURM_NTASKS > 1 but a one-rank MPI world: built or launched without the cluster's MPI."""
    check_rejected(run_app, tmp_path, "dp", 1, ["--model", "tiny"], "SLURM_NTASKS", env={"SLURM_NTASKS": "4"},
                   timeout=TIMEOUT)


def test_slurm_ntasks_matching_the_world_is_fine(run_app, tmp_path):
    rc, out, err = run_app("dp", RANKS, ["--model", "tiny", "--dry-run"], timeout=TIMEOUT, cwd=tmp_path,
                           env={"SLURM_NTASKS": str(RANKS)})
    assert rc == 0, err


@pytest.mark.parametrize("flag, expected", [("--help", "--bucket-mb"), ("--version", "parabench ")])
def test_help_and_version(flag, expected, run_app, tmp_path):
    rc, out, err = run_app("dp", RANKS, [flag], timeout=TIMEOUT, cwd=tmp_path)
    assert rc == 0, err
    assert expected in out
    if flag == "--help":
        assert out.count("Usage:") == 1, "help must be printed once"
        for option in ("--no-overlap", "--model", "--global-batch", "--dry-run", "--json-log"):
            assert option in out
        assert "--tp" not in out.split() and "--shard" not in out.split()
    else:
        assert out.count("parabench ") == 1, out
    assert list(tmp_path.iterdir()) == []
