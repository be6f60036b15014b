"""pglm rl end to end on tiny models: the run-directory contract, resume, pre-launch checks, bad input."""

import json
import os
import signal

import pytest
import torch
from helpers import error_line, tiny_sft_runs

import pglm.train.rl
from pglm.cli import main
from pglm.errors import UserError
from pglm.pg.presets import PRESETS
from pglm.runs import load_run

RL = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "4", "--eval-every", "3", "--eval-limit", "8",
      "--eval-samples", "2", "--quiet"]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_sft_runs(tmp_path_factory.mktemp("rl"))


def rows(run, phase):
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


@pytest.mark.parametrize("algo", sorted(PRESETS))
def test_every_preset_runs_and_logs_the_contract(init, tmp_path, algo):
    out = tmp_path / algo
    assert main(["rl", "--init", str(init / "gpt"), "--task", "add2", "--algo", algo, "--beta", "0.05",
                 "--out", str(out), *RL]) == 0
    rl = rows(out, "rl")
    assert [r["step"] for r in rl] == [1, 2, 3]
    keys = {"reward_mean", "reward_std", "kl", "entropy", "clip_frac", "approx_kl", "response_len",
            "frac_zero_std_groups", "samples_per_s", "rollout_s"}
    assert all(keys <= r.keys() for r in rl), keys - rl[0].keys()
    assert all(r["updates"] == 0 or r["entropy"] > 0 for r in rl)
    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [0, 3] and all({"accuracy", "pass@1", "pass@2"} <= r.keys() for r in evals)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert load_run(out).model.config.arch == "gpt"  # the tuned model loads like any run
    if algo == "ppo":
        assert (out / "checkpoints" / "step_3" / "value_head.safetensors").is_file()


def test_lstm_policy_and_prompt_file_with_user_reward(init, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10)))
    reward = tmp_path / "r.py"
    reward.write_text("def len_reward(prompts, completions, answer, **kw):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "run"
    assert main(["rl", "--init", str(init / "lstm"), "--prompts", str(prompts), "--reward", f"{reward}:len_reward",
                 "--reward", "builtin:exact_match", "--reward-weight", "0.5", "--reward-weight", "1",
                 "--max-new-tokens", "3", "--algo", "rloo", "--out", str(out), *RL]) == 0
    assert all(r["reward_mean"] > 0 for r in rows(out, "rl"))  # 0.5 × length: the user's reward arrived


@pytest.mark.parametrize("scaling", [[], ["--reward-norm", "--reward-clip", "1.5"]], ids=["raw", "normalised"])
def test_interrupt_then_resume_continues_the_same_trajectory(init, tmp_path, monkeypatch, scaling):
    flags = ["rl", "--init", str(init / "gpt"), "--task", "add2", "--algo", "ppo", "--steps", "4",
             "--prompts-per-step", "2", "--group-size", "4", "--eval-every", "100", "--eval-samples", "0",
             "--eval-limit", "4", "--minibatches", "2", "--epochs", "2", "--quiet", *scaling]
    assert main([*flags, "--out", str(tmp_path / "straight")]) == 0
    real = pglm.train.rl.collect_rollout
    calls = {"n": 0}

    def rollout(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2: it finishes, then a checkpoint
        return real(*a, **k)

    monkeypatch.setattr(pglm.train.rl, "collect_rollout", rollout)
    assert main([*flags, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.undo()
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert main(["rl", "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0

    def trajectory(run):
        return [(r["step"], r["reward_mean"], r["loss"], r["grad_norm"], r.get("reward_norm_std")) for r in rows(run, "rl")]

    assert trajectory(tmp_path / "split") == trajectory(tmp_path / "straight")
    if scaling:  # logged, and the moments went on from where the checkpoint left them
        last = rows(tmp_path / "split", "rl")[-1]
        assert {"reward_norm_mean", "reward_norm_std", "reward_clip_frac"} <= last.keys()


def test_running_moments_and_clipping_by_hand():
    from pglm.pg.advantages import RunningMoments
    from pglm.train.rl import scale_rewards

    stats = RunningMoments()
    first, n = scale_rewards(torch.tensor([1.0, 2.0, 3.0]), stats, 0.0)  # this batch included: mean 2, std 1
    assert first.tolist() == pytest.approx([-1.0, 0.0, 1.0]) and int(n) == 0
    second, _ = scale_rewards(torch.tensor([4.0, 5.0]), stats, 0.0)  # 1..5: mean 3, sample std √2.5
    assert (stats.mean, stats.std, stats.count) == pytest.approx((3.0, 2.5 ** 0.5, 5))
    assert second.tolist() == pytest.approx([1 / 2.5 ** 0.5, 2 / 2.5 ** 0.5])
    clipped, n = scale_rewards(torch.tensor([-3.0, 0.5, 2.0]), None, 1.0)
    assert clipped.tolist() == [-1.0, 0.5, 1.0] and int(n) == 2
    again = RunningMoments()
    again.load_state_dict(stats.state_dict())
    assert again.normalize(torch.tensor([3.0])).item() == 0.0


def test_zero_variance_warning(init, tmp_path, capsys):
    reward = tmp_path / "const.py"
    reward.write_text("def const(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    assert main(["rl", "--init", str(init / "gpt"), "--prompts", str(prompts), "--reward", f"{reward}:const",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "run"), *RL[:-1], "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "every group of 4 samples got equal rewards" in out and "trl#2703" in out


def test_pre_launch_checks(init, tmp_path, capsys):
    base = ["rl", "--init", str(init / "gpt"), "--task", "add2", "--out", str(tmp_path / "o")]
    assert "unknown algorithm 'a2c'" in error_line(capsys, [*base, "--algo", "a2c"])
    assert "unknown task 'add3'" in error_line(capsys, ["rl", "--init", str(init / "gpt"), "--task", "add3", "--out", str(tmp_path / "o")])
    line = error_line(capsys, [*base, "--prompts-per-step", "3", "--group-size", "4", "--minibatches", "5"])
    assert "12 completions do not split into 5" in line and "--minibatches 1, 2, 3, 4, 6, 12" in line
    assert "--group-size 2 or more" in error_line(capsys, [*base, "--algo", "rloo", "--group-size", "1"])
    assert "exceed the model's context" in error_line(capsys, [*base, "--max-new-tokens", "40"])
    assert not (tmp_path / "o").exists()


def test_reward_spec_that_does_not_import(init, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    line = error_line(capsys, ["rl", "--init", str(init / "gpt"), "--prompts", str(prompts), "--reward",
                               "no_such_module_xyz:f", "--max-new-tokens", "2", "--out", str(tmp_path / "o")])
    assert "no_such_module_xyz" in line


def test_prompt_file_without_a_prompt_field(init, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{"question": "2+2="}\n')
    line = error_line(capsys, ["rl", "--init", str(init / "gpt"), "--prompts", str(prompts), "--reward",
                               "builtin:exact_match", "--max-new-tokens", "2", "--out", str(tmp_path / "o")])
    assert "p.jsonl:2: no string 'prompt'" in line


@pytest.mark.parametrize("body, expected", [
    ("    if calls.append(1) or len(calls) > 2:\n        raise ValueError('boom')\n    return [0.5] * len(completions)",
     "raised ValueError on sample 0"),
    ("    return [float('nan') if len(calls.append(1) or calls) > 2 else 0.5] * len(completions)", "returned nan for sample 0"),
    ("    return [0.5] * (len(completions) - (1 if len(calls.append(1) or calls) > 2 else 0))", "returned 7 values for 8"),
])
def test_a_failing_reward_stops_with_one_line_and_keeps_the_checkpoints(init, tmp_path, capsys, body, expected):
    reward = tmp_path / "bad.py"
    reward.write_text(f"calls = []\ndef bad(prompts, completions, **kw):\n{body}\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    out = tmp_path / "run"
    rc = main(["rl", "--init", str(init / "gpt"), "--prompts", str(prompts), "--reward", f"{reward}:bad",
               "--max-new-tokens", "2", "--steps", "5", "--ckpt-every", "1", "--prompts-per-step", "2",
               "--group-size", "4", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    line = err.splitlines()[-1]  # after the objective printed at launch: exactly one error line
    assert line.startswith("pglm rl: error: reward ") and f"{reward}:bad" in line and expected in line, line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"  # the reward failed in step 3
    assert load_run(out).ckpt_dir.name == "step_2"


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("algo", ["grpo", "rloo", "gspo"])
def test_a_fused_rollout_updates_the_model_exactly_as_a_separate_scoring_pass(init, tmp_path, monkeypatch, arch, algo):
    """With one update per rollout the loss may differentiate the sampler's own log-probs (fuses_scoring);
    the step must then move the weights exactly as scoring the batch again would, KL term included."""
    import torch

    from pglm.pg.presets import get_preset
    from pglm.tasks import get_task
    from pglm.train.metrics import MetricsLog
    from pglm.train.rl import RLConfig, frozen_copy, make_rl_optimizer, task_rows, train_rl

    task = get_task("add2")

    def one_step(fused: bool, out):
        out.mkdir()
        monkeypatch.setattr(pglm.train.rl, "fuses_scoring", lambda *a: fused)
        run = load_run(init / arch)
        model = run.model.double()
        cfg = RLConfig(algo=algo, steps=2, prompts_per_step=4, group_size=4, warmup_steps=1, beta=0.1,
                       eval_every=100, ckpt_every=100)
        opt = make_rl_optimizer(model, None, 1e-2, cfg)
        def reward(prompts, completions, **kw):  # varied, so that advantages are not all 0
            return [float(sum(map(ord, c)) % 7) for c in completions]

        train_rl(model, run.tokenizer, get_preset(algo), cfg, task_rows(task, 0, 4), reward, None, 4, out, opt,
                 ref_model=frozen_copy(model), progress=False, metrics=MetricsLog(out))
        return [p.detach().clone() for p in model.parameters()], (out / "metrics.jsonl").read_text().splitlines()

    fused, rows_f = one_step(True, tmp_path / "f")
    scored, rows_s = one_step(False, tmp_path / "s")
    moved = max((a - b).abs().max() for a, b in zip(fused, [p.double() for p in load_run(init / arch).model.parameters()]))
    assert moved > 1e-5  # the steps did something
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(fused, scored))
    for f, s in zip(rows_f, rows_s):  # the same entropy and losses, logged the same way
        f, s = json.loads(f), json.loads(s)
        for k in ("loss", "entropy", "kl", "grad_norm"):
            assert f[k] == pytest.approx(s[k], rel=1e-6, abs=1e-9), k


def test_describe_announces_the_truncation_the_flag_set():
    from pglm.pg.presets import describe, get_preset, resolve

    assert describe(get_preset("grpo"), 0.0, 8, 4).endswith("truncated responses: keep  [DeepSeekMath, arXiv 2402.03300]")
    assert "truncated responses: mask" in describe(resolve(get_preset("grpo"), truncation="mask"), 0.0, 8, 4)


def test_the_effective_recipe_applies_the_flags_once():
    from pglm.pg.presets import get_preset, resolve

    r = resolve(get_preset("dapo"), truncation=None, lr=None)
    assert (r.truncation, r.lr) == ("mask", get_preset("dapo").lr)  # the preset's own when no flag is set
    r = resolve(get_preset("dapo"), truncation="penalise", lr=3e-4)
    assert (r.truncation, r.lr, r.clip_high) == ("penalise", 3e-4, 0.28)  # the rest stays the preset's
    with pytest.raises(UserError, match="--truncation must be"):
        resolve(get_preset("grpo"), truncation="drop")


@pytest.mark.parametrize("name", ["moving", "rloo", "grpo", "dr_grpo"])
def test_the_estimator_registry_says_which_advantages_vanish_on_equal_rewards(name):
    """`groups` is what the zero-variance warning and the G ≥ 2 check read: it must be true exactly of
    the estimators whose advantages are all 0 when a group's rewards agree."""
    from pglm.pg.advantages import MovingBaseline
    from pglm.pg.presets import ESTIMATORS, Preset
    from pglm.train.rl import compute_advantages

    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # two groups of 3, equal within each
    a = compute_advantages(Preset(name, name, "token-mean"), rewards, 3, MovingBaseline(b=0.5))
    assert bool((a == 0).all()) == ESTIMATORS[name].groups


def test_collapse_is_announced_once_and_not_for_a_healthy_run():
    from pglm.train.rl import CollapseWatch

    healthy = CollapseWatch(window=3)
    assert [healthy.update(0.3 + 0.01 * s, 4.0) for s in range(20)] == [[]] * 20
    w = CollapseWatch(window=3)
    said = [w.update(r, n) for r, n in [(0.06, 4.0)] * 3 + [(0.04, 3.0), (0.02, 1.0), (0.01, 0.2), (0.01, 0.1)]]
    assert [len(x) for x in said] == [0, 0, 0, 0, 0, 2, 0]  # at the first full latest window, then never again
    assert "fell from 4.0 to 1.4 tokens" in said[5][0] and "fell from 0.06" in said[5][1]
    negative = CollapseWatch(window=2)  # a reward that starts at or below 0 has no "half of where it started"
    assert all(not negative.update(r, 4.0) for r in (-0.5, -0.4, -2.0, -3.0, -4.0))


def test_the_rate_warms_up_then_decays_by_cosine_when_asked(init, tmp_path, capsys):
    out = tmp_path / "decay"
    assert main(["rl", "--init", str(init / "gpt"), "--task", "add2", "--lr", "1e-3", "--warmup-steps", "2",
                 "--min-lr-frac", "0.5", "--out", str(out), *RL[:1], "5", *RL[2:]]) == 0
    # steps 0..4 of 5: warm-up 1/2, 2/2; then the cosine over the 3 steps left, 0.5 + 0.5·(1 + cos(π·k/3))/2 for k = 0, 1, 2
    assert [r["lr"] for r in rows(out, "rl")] == pytest.approx([5e-4, 1e-3, 1e-3, 8.75e-4, 6.25e-4])
    capsys.readouterr()
    assert main(["rl", "--out", str(out), "--resume", "--steps", "7", "--quiet"]) == 0  # train for longer
    # the cosine now spans the 5 steps after the warm-up: at step 5, 0.5 + 0.5·(1 + cos(3π/5))/2 = 0.6727
    assert "the cosine schedule now runs to step 7, so the learning rate at step 5 is 0.000673 (it was 0.0005)" \
        in capsys.readouterr().err
    constant = tmp_path / "constant"  # the default: constant after the warm-up
    assert main(["rl", "--init", str(init / "gpt"), "--task", "add2", "--lr", "1e-3", "--warmup-steps", "2",
                 "--out", str(constant), *RL]) == 0
    assert [r["lr"] for r in rows(constant, "rl")] == pytest.approx([5e-4, 1e-3, 1e-3])
    capsys.readouterr()
    assert error_line(capsys, ["rl", "--init", str(init / "gpt"), "--task", "add2", "--min-lr-frac", "2",
                                       "--out", str(tmp_path / "bad"), *RL]).startswith("pglm rl: error: --min-lr-frac must be")
