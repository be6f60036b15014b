import json
import os
import signal

import pytest
import torch

import pglm.data
from pglm.cli import main
from pglm.data import Batch
from pglm.pg.logprobs import masked_mean_nll, token_logprobs
from pglm.train.mle import TrainConfig, lr_at, warmup_cosine

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["phase"] == "mle"]


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_interrupt_then_resume_continues_the_same_trajectory(tmp_path, monkeypatch, arch):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    flags = ["pretrain", "--data", str(data), "--model", arch, "--n-layer", "1", "--d-model", "16",
             "--block-size", "16", "--dropout", "0.1", "--batch-size", "4", "--steps", "8", "--log-every", "1",
             "--eval-every", "4", "--ckpt-every", "100", "--lr", "3e-3", "--quiet"]
    assert main([*flags, "--out", str(tmp_path / "straight")]) == 0

    # Ctrl-C arrives while step 4 (index 3) draws its batch: the step finishes, a checkpoint is written
    real = pglm.data.random_windows
    calls = {"n": 0}

    def windows(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # 1st call is the early length check in cmd_pretrain, then one per step
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(pglm.data, "random_windows", windows)
    assert main([*flags, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.undo()
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert main(["pretrain", "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0

    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [s for s, _, _ in split] == list(range(1, 9))
    assert split == straight  # bit-identical on CPU: data, dropout and optimizer state all restored


def test_micro_batch_split_gives_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7, requires_grad=True)
    y = torch.randint(0, 7, (4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)  # unequal token counts, as in SFT: 6 + 5 in one half, 2 + 1 in the other
    for row, n in enumerate([6, 5, 2, 1]):
        mask[row, :n] = True
    whole = masked_mean_nll(token_logprobs(logits, y), mask)
    (g_whole,) = torch.autograd.grad(whole, logits)
    n = int(mask.sum())
    parts = [masked_mean_nll(token_logprobs(logits[i : i + 2], y[i : i + 2]), mask[i : i + 2], n) for i in (0, 2)]
    (g_parts,) = torch.autograd.grad(sum(parts), logits)
    torch.testing.assert_close(g_parts, g_whole)
    # and the tempting per-micro-batch mean is not the same (the pitfall this guards against)
    naive = sum(masked_mean_nll(token_logprobs(logits[i : i + 2], y[i : i + 2]), mask[i : i + 2]) for i in (0, 2)) / 2
    assert not torch.allclose(naive, whole)


def test_masked_nll_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[True, False, True]])
    assert masked_mean_nll(logp, mask).item() == pytest.approx(2.0)  # (1 + 3) / 2


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine: 0.1 + 0.9 / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert TrainConfig(steps=50).warmup_steps == 5
    assert [warmup_cosine(i, 4, 2.0, 2, 1.0) for i in range(4)] == [1.0, 2.0, 2.0, 2.0]  # min_frac 1: constant


def test_batch_to_keeps_fields():
    b = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(b.to("cpu").y, b.y)
