"""Numbers the user gives are checked before any work; a step whose gradient is not finite never reaches
the weights; what pglm writes is valid JSON, readable by colleagues, and pruned when asked."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from helpers import error_line
from safetensors.torch import load_file

from pglm.cli import main
from pglm.train.checkpoint import write_json

TINY = ["--model", "gpt", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-every", "100", "--log-every", "1", "--quiet"]


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("hello world, hello pglm. " * 40)
    return f


BAD_TRAIN = [
    (["--lr", "inf"], "--lr must be a finite number > 0 and ≤ 1, not inf"),
    (["--lr", "1e30"], "--lr must be a finite number > 0 and ≤ 1, not 1e+30"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--min-lr-frac", "nan"], "--min-lr-frac must be"),
    (["--min-lr-frac", "-5"], "--min-lr-frac must be a finite number ≥ 0 and ≤ 1, not -5.0"),
    (["--weight-decay", "nan"], "--weight-decay must be"),
    (["--warmup-steps", "-1"], "--warmup-steps must be a whole number ≥ 0"),
    (["--seed", "-1"], "--seed must be a whole number ≥ 0 and ≤ 4.29497e+09, not -1"),
    (["--seed", str(2**32)], "--seed must be a whole number"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--batch-size", "100000000"], "--batch-size must be a whole number ≥ 1 and ≤ 65536"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints must be"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN, ids=[" ".join(f) for f, _ in BAD_TRAIN])
def test_bad_numbers_are_one_line_before_any_work(data, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    line = error_line(capsys, ["pretrain", "--data", str(data), "--steps", "2", "--out", str(out), *TINY, *flags])
    assert message in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(data, tmp_path, capsys):
    line = error_line(capsys, ["pretrain", "--data", str(data), "--steps", "2", "--out", str(tmp_path / "r"), *TINY,
                               "--device", "cuda"])
    assert "no such CUDA device (0 found); use --device cpu or auto" in line


@pytest.fixture(scope="module")
def add2(tmp_path_factory):
    out = tmp_path_factory.mktemp("n") / "add2"
    assert main(["sft", "--task", "add2", "--steps", "2", "--out", str(out), "--n-layer", "1", "--d-model", "16",
                 "--n-head", "2", "--block-size", "16", "--batch-size", "8", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("flags,message", [(["--temperature", "nan"], "--temperature must be a finite number > 0"),
                                           (["--beta", "nan"], "--beta must be a finite number ≥ 0"),
                                           (["--lr", "inf"], "--lr must be a finite number > 0 and ≤ 1")])
def test_bad_rl_numbers_are_one_line(add2, tmp_path, capsys, flags, message):
    out = tmp_path / "rl"
    line = error_line(capsys, ["rl", "--init", str(add2), "--task", "add2", "--steps", "2", "--out", str(out), *flags])
    assert message in line
    assert not out.exists()


def poisoned(real, at: int):
    """`real` with its result made NaN at call number `at` (1-based): a loss that goes non-finite."""
    calls = [0]

    def f(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        if calls[0] != at:
            return out
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")

    return f


def finite_weights(ckpt) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "model.safetensors")).values())


def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    import pglm.train.mle as mle

    monkeypatch.setattr(mle, "masked_mean_nll", poisoned(mle.masked_mean_nll, at=3))
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(data), "--steps", "5", "--ckpt-every", "1", "--out", str(out), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("pglm pretrain: error: step 3: the loss or gradient is not finite")
    assert "step_2 is the last checkpoint" in err[-1] and "--skip-nonfinite" in err[-1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert finite_weights(out / "checkpoints" / "step_2") and not (out / "checkpoints" / "step_3").exists()


def test_skip_nonfinite_goes_on_and_counts(data, tmp_path, monkeypatch):
    import pglm.train.mle as mle

    monkeypatch.setattr(mle, "masked_mean_nll", poisoned(mle.masked_mean_nll, at=3))
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--steps", "5", "--out", str(out), "--skip-nonfinite", *TINY]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mle_rows = [r for r in rows if r["phase"] == "mle"]
    assert [r.get("skipped_steps", 0) for r in mle_rows] == [0, 0, 1, 1, 1]
    assert mle_rows[2]["loss"] is None  # the NaN is logged as null, and the weights stay finite
    assert finite_weights(out / "checkpoints" / "step_5")


def test_a_nonfinite_rl_update_stops_or_is_skipped(add2, tmp_path, capsys, monkeypatch):
    import pglm.train.rl as rl

    base = ["rl", "--init", str(add2), "--task", "add2", "--steps", "3", "--prompts-per-step", "2", "--group-size", "2",
            "--eval-every", "100", "--eval-samples", "0", "--ckpt-every", "1", "--quiet"]
    real = rl.policy_loss
    monkeypatch.setattr(rl, "policy_loss", poisoned(real, at=2))  # one update per step: step 2's
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "step 2: the loss or gradient is not finite" in capsys.readouterr().err
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step_1"
    monkeypatch.setattr(rl, "policy_loss", poisoned(real, at=2))
    assert main([*base, "--out", str(tmp_path / "b"), "--skip-nonfinite"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"rl"' in x]
    assert [r.get("skipped_updates", 0) for r in rows] == [0, 1, 0] and rows[1]["updates"] == 0
    assert finite_weights(tmp_path / "b" / "checkpoints" / "step_3")


def test_json_never_holds_nan(tmp_path):
    write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}, "e": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}


def test_run_files_follow_the_umask_and_old_checkpoints_are_pruned(data, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["pretrain", "--data", str(data), "--steps", "6", "--ckpt-every", "1", "--keep-checkpoints", "2",
                     "--out", str(out), *TINY]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_5", "step_6"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "checkpoints" / "step_6").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "checkpoints" / "step_6" / "state.json").stat().st_mode) == 0o644


def test_eval_out_that_cannot_be_written_is_one_line_before_the_work(add2, tmp_path, capsys):
    for out, message in ((tmp_path / "missing" / "e.json", "does not exist"), (tmp_path, "is a directory")):
        line = error_line(capsys, ["eval", "--ckpt", str(add2), "--task", "add2", "--samples", "0", "--out", str(out)])
        assert message in line
    assert not (tmp_path / "missing").exists()
