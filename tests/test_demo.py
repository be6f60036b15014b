"""pglm demo: the run-directory contract, the policy-gradient gain on carry problems, seeds, Ctrl-C."""

import json
import os
import signal

import pytest

import pglm.demo
import pglm.train.rl
from pglm.cli import main
from pglm.demo import DemoConfig, run_demo, teacher_answer
from pglm.runs import load_run


def test_quick_demo_contract_and_gain(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "after policy gradient, grpo (phase 2)" in printed and "maximum likelihood only (phase 3)" in printed
    for f in ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "checkpoints/latest",
              "plots/demo.png", "plots/rl.png", "plots/loss.png", "mle_only/metrics.jsonl"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"mle", "rl", "eval"}
    s = json.loads((out / "summary.json").read_text())
    # the policy-gradient phase raised the reward on carry problems, and undid the teacher's mistake there
    assert s["after_rl"]["accuracy_carry"] > s["after_mle"]["accuracy_carry"] + 0.1
    assert s["after_rl"]["teacher_mistake_on_carry"] < s["after_mle"]["teacher_mistake_on_carry"]
    assert load_run(out).ckpt_dir.name == f"step_{s['mle_steps'] + s['rl_steps']}"
    assert load_run(out / "mle_only").model is not None


def tiny(**kw):
    return DemoConfig(mle_max_steps=40, signal_every=20, signal_threshold=2.0, rl_steps=4, eval_every=2,
                      prompts_per_step=2, group_size=4, mle_only_steps_per_rl_step=2, passk_samples=2, **kw)


def test_same_seed_same_metrics(tmp_path):
    def figures(out):
        run_demo(tiny(seed=3), out, progress=False)
        volatile = {"time", "tokens_per_s", "samples_per_s", "rollout_s"}
        rows = [{k: v for k, v in json.loads(x).items() if k not in volatile}
                for x in (out / "metrics.jsonl").read_text().splitlines()]
        s = json.loads((out / "summary.json").read_text())
        s.pop("wall_time_s")
        return rows, s

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert figures(tmp_path / "a") == figures(tmp_path / "b")


def test_teacher_drops_the_carry_at_the_flaw_rate():
    carry = [(a, b) for a in range(100) for b in range(100) if (a % 10 + b % 10) >= 10]
    wrong = sum(teacher_answer(a, b, 0.7, 0) == str(a + b - 10) for a, b in carry) / len(carry)
    assert 0.67 < wrong < 0.73
    assert all(teacher_answer(a, b, 0.7, 0) == str(a + b) for a in range(10) for b in range(10 - a))  # no carry
    assert teacher_answer(37, 45, 1.0, 0) == "72" and teacher_answer(37, 45, 0.0, 0) == "82"


def test_ctrl_c_leaves_a_loadable_checkpoint_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pglm.demo, "DemoConfig", lambda **kw: tiny(**{k: v for k, v in kw.items() if k != "quick"}))
    real = pglm.train.rl.collect_rollout
    calls = {"n": 0}

    def rollout(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(pglm.train.rl, "collect_rollout", rollout)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted:" in err and "loads" in err and "pglm rl --init" in err and "Traceback" not in err
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert str(latest) in err
    assert load_run(latest).model is not None


def test_bad_flags(tmp_path, capsys):
    assert main(["demo", "--algo", "a2c", "--out", str(tmp_path / "o")]) == 2
    assert "unknown algorithm" in capsys.readouterr().err
    assert main(["demo", "--flaw-rate", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_full_demo_reaches_its_targets(tmp_path):
    s = run_demo(DemoConfig(), tmp_path, progress=False)
    assert s["after_rl"]["accuracy"] >= 0.90
    assert s["after_rl"]["accuracy"] >= s["after_mle"]["accuracy"] + 0.20
    assert s["after_rl"]["accuracy"] >= s["mle_only"]["accuracy"] + 0.20


@pytest.mark.slow  # 10-20 s: the demos' phases, cut short, around a critic
def test_the_demo_runs_ppo_with_its_value_head(tmp_path):
    """--algo ppo needs a critic beside the policy (it raised a TypeError before the demo made one)."""
    s = run_demo(tiny(algo="ppo"), tmp_path, progress=False)
    assert s["algo"] == "ppo" and s["rl_steps"] == 4
