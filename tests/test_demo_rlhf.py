"""pglm demo --rlhf: the rater, the run directories the chain leaves, what each phase measures, bad flags."""

import json
import random

import pytest
import torch

from pglm.cli import main
from pglm.demo_rlhf import RLHFConfig, better_answer, run_rlhf_demo, sample_pairs
from pglm.models import build_model, model_config
from pglm.runs import load_reward_model, load_run
from pglm.tasks import get_task
from pglm.tasks.add2 import parse_prompt


def test_the_rater_prefers_the_answer_closer_to_the_sum():
    assert better_answer(37, 45, "82", "72") == 1  # right over the teacher's mistake
    assert better_answer(37, 45, "72", "82") == -1
    assert better_answer(37, 45, "81", "92") == 1  # off by 1 over off by 10
    assert better_answer(37, 45, "81", "83") == 0  # equally far: a tie, no pair
    assert better_answer(37, 45, "1", "8x") == 1  # any number over a text that is not one
    assert better_answer(37, 45, "", "8x") == 0


@pytest.mark.parametrize("accuracy", [1.0, 0.7])
def test_sampled_pairs_are_labelled_by_a_rater_right_at_its_rate(accuracy):
    tok = get_task("add2").tokenizer()
    torch.manual_seed(0)
    model = build_model(model_config("gpt", "tiny", vocab_size=tok.vocab_size, block_size=16, n_layer=1, d_model=32, n_head=2))
    prompts = [f"{a}+{b}=" for a, b in random.Random(0).sample([(a, b) for a in range(100) for b in range(100)], 1000)]
    rows = sample_pairs(model, tok, prompts, 4, accuracy, seed=0)
    assert len(rows) > 300  # an untrained model's answers mostly differ (two texts that are not numbers tie)
    for r in rows:
        assert r["chosen"] != r["rejected"]
        better = better_answer(*parse_prompt(r["prompt"]), r["chosen"], r["rejected"])
        assert better == (1 if r["rater_right"] else -1)  # rater_right says whether it chose the better one
    right = sum(r["rater_right"] for r in rows) / len(rows)
    assert abs(right - accuracy) < 0.05, right


def test_quick_rlhf_demo_leaves_runs_the_other_verbs_take(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--rlhf", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "against the truth" in printed and "RLHF, rloo, KL β = 0.5" in printed and "RLHF, rloo, no KL" in printed
    for f in ("summary.json", "prefs/train.jsonl", "prefs/val.jsonl", "plots/rlhf.png", "reward/summary.json",
              "rl-kl/metrics.jsonl", "rl-no-kl/checkpoints/latest"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "prefs" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == s["pairs"]["train_pairs"] == s["reward_model"]["train_pairs"]
    assert abs(s["pairs"]["rater_right"] - 0.8) < 0.03

    # the reward run is a reward run: pglm eval gives the pairwise accuracy the demo reported
    assert main(["eval", "--ckpt", str(out / "reward"), "--data", str(out / "prefs" / "val.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_accuracy"] == pytest.approx(s["reward_model"]["val_accuracy"], abs=1e-6)
    assert load_reward_model(out / "reward").model is not None

    # both policy-gradient runs start from the SFT model's figures; without KL the proxy rose
    kl, no_kl = s["rl"]["rl-kl"], s["rl"]["rl-no-kl"]
    assert kl["curve"][0] == no_kl["curve"][0]
    assert kl["curve"][0]["accuracy"] == pytest.approx(s["after_sft"]["accuracy"])
    assert no_kl["final"]["proxy"] > no_kl["curve"][0]["proxy"]
    assert [e["step"] for e in no_kl["curve"]] == list(range(0, s["rl_steps"] + 1, 10))
    assert load_run(out / "rl-kl").ckpt_dir.name == f"step_{s['rl_steps']}"
    assert {"sft", "rl-kl", "rl-no-kl"} <= set(s["examples"][0])

    # the chain is made of the verbs: pglm rl on the task with the reward run as its reward is the demo's run
    cfg = RLHFConfig(quick=True)
    cli = out / "rl-cli"
    assert main(["rl", "--init", str(out), "--task", "add2", "--reward", f"rm:{out / 'reward'}", "--algo", "rloo",
                 "--beta", str(cfg.beta), "--lr", str(cfg.rl_lr), "--warmup-steps", str(cfg.rl_warmup),
                 "--min-lr-frac", str(cfg.rl_min_lr_frac), "--steps", str(cfg.rl_steps), "--prompts-per-step",
                 str(cfg.prompts_per_step), "--group-size", str(cfg.group_size), "--eval-every", "10",
                 "--eval-samples", "0", "--out", str(cli), "--quiet"]) == 0
    a, b = (load_run(run).model.state_dict() for run in (out / "rl-kl", cli))
    assert all(torch.equal(a[k], b[k]) for k in a)
    accuracy = {e["step"]: e["accuracy"] for e in kl["curve"]}
    cli_evals = [json.loads(line) for line in (cli / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in cli_evals if r["phase"] == "eval"] == \
        [(k, accuracy[k]) for k in range(0, cfg.rl_steps + 1, 10)]


def test_bad_rlhf_flags(tmp_path, capsys):
    assert main(["demo", "--rlhf", "--rater-accuracy", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "--rater-accuracy must be between 0.5" in capsys.readouterr().err
    assert main(["demo", "--rater-accuracy", "0.9", "--out", str(tmp_path / "o")]) == 2
    assert "add --rlhf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_full_rlhf_demo_shows_the_gain_and_the_over_optimisation(tmp_path):
    s = run_rlhf_demo(RLHFConfig(), tmp_path, progress=False)
    sft, kl, no_kl = s["after_sft"]["accuracy"], s["rl"]["rl-kl"], s["rl"]["rl-no-kl"]
    assert s["reward_model"]["val_accuracy_vs_truth"] >= 0.7
    assert kl["final"]["accuracy"] >= sft + 0.05  # RLHF with KL gains on the truth (seed 0: +6 points; docs/rlhf.md)
    assert no_kl["final"]["accuracy"] < sft - 0.3  # without KL the policy games the proxy ...
    assert no_kl["final"]["proxy"] > kl["final"]["proxy"]  # ... which scores it higher than ever


@pytest.mark.slow  # 10-20 s: the demos' phases, cut short, around a critic
def test_the_rlhf_demo_runs_ppo_with_its_value_head(tmp_path):
    cfg = RLHFConfig(sft_min_steps=0, sft_max_steps=20, signal_every=10, signal_threshold=2.0, pair_problems=200,
                     rm_steps=5, rl_steps=3, eval_every=3, prompts_per_step=2, group_size=4, algo="ppo")
    s = run_rlhf_demo(cfg, tmp_path, progress=False)
    assert [e["step"] for e in s["rl"]["rl-kl"]["curve"]] == [0, 3]
