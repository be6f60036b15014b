"""A run directory is data: it cannot switch on remote code or lead outside itself; no run is lost to
a failed --overwrite, to a second process, or to a stop before the first checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from helpers import TINY, error_line
from hf_models import make_hf_model

from pglm.cli import main
from pglm.train.rundir import RunDir

RL = ["--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "100", "--eval-samples", "0",
      "--ckpt-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An sft run of add2 (pglm GPT) and an sft run of a tiny Hugging Face GPT-2."""
    tmp = tmp_path_factory.mktemp("safety")
    assert main(["sft", "--task", "add2", "--steps", "2", "--out", str(tmp / "add2"), *TINY]) == 0
    hf = make_hf_model("gpt2", tmp / "gpt2")
    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n" for a in range(20)))
    assert main(["sft", "--model", f"hf:{hf}", "--data", str(data), "--steps", "1", "--batch-size", "4",
                 "--out", str(tmp / "hf"), "--quiet"]) == 0
    return tmp


def fails(capsys, argv) -> str:
    """Run argv; check it fails with exit 2, no traceback, the error as its last line (after the launch
    line where set-up had got that far); return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"pglm {argv[0]}: error: "), err
    return err.splitlines()[-1]


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".pglm.lock"}


def test_a_run_directory_cannot_switch_on_remote_code(runs, tmp_path, capsys):
    """config.json says the model needs code of its own, from a directory whose code would leave a mark:
    no command runs it unless --trust-remote-code is on that command line."""
    evil = tmp_path / "evil"
    evil.mkdir()
    mark = tmp_path / "ran"
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (evil / "evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    run = tmp_path / "run"
    shutil.copytree(runs / "hf", run)
    config = json.loads((run / "config.json").read_text())
    config["model"].update(trust_remote_code=True, source=f"hf:{evil}")
    (run / "config.json").write_text(json.dumps(config))
    for argv in (["generate", "--ckpt", str(run), "--prompt", "1+"],
                 ["eval", "--ckpt", str(run), "--data", str(runs / "sft.jsonl")],
                 ["export", "--ckpt", str(run), "--out", str(tmp_path / "exported")],
                 ["sft", "--init", str(run), "--data", str(runs / "sft.jsonl"), "--steps", "1", "--out", str(tmp_path / "s")],
                 ["rl", "--init", str(run), "--prompts", str(runs / "sft.jsonl"), "--reward", "builtin:exact_match",
                  "--max-new-tokens", "2", "--out", str(tmp_path / "r"), *RL]):
        line = error_line(capsys, argv)
        assert "runs Python code of its own" in line and "--trust-remote-code" in line, argv
    assert not mark.exists()
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists() and not (tmp_path / "exported").exists()


def test_latest_cannot_lead_outside_the_run(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "add2", run)
    for target in ("../../elsewhere", str(tmp_path), "step_2/../../x"):
        (run / "checkpoints" / "latest").write_text(target + "\n")
        assert "not a checkpoint of this run" in error_line(capsys, ["eval", "--ckpt", str(run), "--task", "add2"])


def test_pickled_hf_weights_are_refused_in_one_line(tmp_path, capsys):
    d = make_hf_model("gpt2", tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # the name, not the format, is what is refused
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+", "completion": "1"}) + "\n")
    line = error_line(capsys, ["sft", "--model", f"hf:{d}", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o")])
    assert "pickle" in line and "save_pretrained" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["sft-rows", "rl-reward"])
def test_overwrite_that_fails_after_set_up_puts_the_old_run_back(runs, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(runs / "add2", run)
    before = snapshot(run)
    if case == "sft-rows":  # found after the run directory was set up: a prompt that is not a string
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": 3, "completion": "4"}) + "\n")
        argv = ["sft", "--data", str(bad), "--steps", "1", "--out", str(run), "--overwrite", *TINY]
    else:  # a reward that fails at step 1
        (tmp_path / "r.py").write_text("def boom(prompts, completions, **kw):\n    raise ValueError('no')\n")
        (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+2="}) + "\n")
        argv = ["rl", "--init", str(runs / "add2"), "--prompts", str(tmp_path / "p.jsonl"), "--reward",
                f"{tmp_path / 'r.py'}:boom", "--max-new-tokens", "2", "--out", str(run), "--overwrite", *RL]
    assert "fix the reward" in fails(capsys, argv) if case == "rl-reward" else "string fields" in fails(capsys, argv)
    assert snapshot(run) == before
    assert not list(tmp_path.glob(".run.*"))  # no backup left lying around


def test_a_new_run_that_fails_after_set_up_leaves_nothing(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+", "completion": None}) + "\n")
    out = tmp_path / "new"
    assert "string fields" in fails(capsys, ["sft", "--data", str(bad), "--steps", "1", "--out", str(out), *TINY])
    assert not out.exists()  # so a plain rerun is accepted, with no --overwrite
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+", "completion": "1"}) + "\n")
    assert main(["sft", "--data", str(good), "--steps", "1", "--out", str(out), *TINY]) == 0


def test_a_run_in_use_is_not_resumed_or_overwritten_by_another(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "add2", run)
    before = snapshot(run)
    with RunDir(run, resume=True):  # what a training process holds while it runs
        for flag in ("--resume", "--overwrite"):
            line = error_line(capsys, ["sft", "--task", "add2", "--steps", "3", "--out", str(run), flag, *TINY])
            assert f"is in use by pglm process {os.getpid()}" in line, flag
    assert snapshot(run) == before
    assert main(["sft", "--steps", "3", "--out", str(run), "--resume", "--quiet"]) == 0  # released


def test_sigterm_checkpoints_the_step_and_resume_goes_on(runs, tmp_path, capsys):
    """The first SIGTERM (a cluster about to preempt) finishes the step and checkpoints it; a second one,
    before any checkpoint, stops at once and leaves nothing, so the same command starts over."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+2="}) + "\n")
    for terms in (1, 2):  # a file each: a reward module is loaded once per process
        (tmp_path / f"r{terms}.py").write_text(
            "import os, signal\ncalls = 0\n"
            "def term(prompts, completions, **kw):\n"
            "    global calls\n    calls += 1\n"
            "    if calls == 1:\n"
            f"        for _ in range({terms}):\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return [float(len(c)) for c in completions]\n")

    def argv(terms, out):
        return ["rl", "--init", str(runs / "add2"), "--prompts", str(tmp_path / "p.jsonl"), "--reward",
                f"{tmp_path / f'r{terms}.py'}:term", "--max-new-tokens", "2", "--out", str(out), *RL]

    out = tmp_path / "run"
    try:
        assert main(argv(1, out)) == 130
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
        assert main(["rl", "--out", str(out), "--resume", "--quiet"]) == 0
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
        capsys.readouterr()
        fresh = tmp_path / "fresh"
        assert main(argv(2, fresh)) == 130
        assert not fresh.exists()
        assert "nothing was kept" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_run_killed_before_its_first_checkpoint_is_replaced_by_a_plain_rerun(runs, tmp_path, capsys):
    """kill -9 leaves no chance to clean up: the set-up files stay, with no checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(runs / "add2", out)
    shutil.rmtree(out / "checkpoints")  # what a kill -9 between set-up and the first checkpoint leaves
    assert main(["sft", "--task", "add2", "--steps", "1", "--out", str(out), *TINY]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(runs / "add2", other)  # with a checkpoint, it is a run: refused, as before
    assert "already holds a run" in error_line(capsys, ["sft", "--task", "add2", "--steps", "1", "--out", str(other), *TINY])


def test_a_reward_that_hangs_or_exits_ends_the_run_with_exit_2(runs, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+2="}) + "\n")
    (tmp_path / "r.py").write_text("import sys, time\n"
                                   "def hangs(prompts, completions, **kw):\n    time.sleep(60)\n"
                                   "def exits(prompts, completions, **kw):\n    sys.exit(3)\n")
    for fn, message in (("hangs", "did not return within 0.3 s"), ("exits", "called sys.exit(3)")):
        out = tmp_path / fn
        line = fails(capsys, ["rl", "--init", str(runs / "add2"), "--prompts", str(tmp_path / "p.jsonl"), "--reward",
                              f"{tmp_path / 'r.py'}:{fn}", "--max-new-tokens", "2", "--reward-timeout", "0.3",
                              "--out", str(out), *RL])
        assert message in line
        assert not out.exists()


def test_prompts_without_max_new_tokens_take_the_default_the_context_allows(runs, tmp_path, capsys):
    """TRL's default completion length is 256; the add2 model's context is 16, so what it leaves."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    out = tmp_path / "run"
    assert main(["rl", "--init", str(runs / "add2"), "--prompts", str(tmp_path / "p.jsonl"), "--reward",
                 "builtin:exact_match", "--out", str(out), *RL]) == 0
    assert "completions of up to 11 tokens (the default, what the context leaves" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["rl"]["max_new_tokens"] is None  # resumes the same way


def test_resume_honours_or_refuses_each_flag_by_name(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "add2", run)  # sft, 2 steps, finished
    before = snapshot(run)
    resume = ["sft", "--out", str(run), "--resume", "--quiet"]
    assert "is finished (step 2 of 2); pass --steps N above 2" in error_line(capsys, resume)
    assert "--steps 1: " in error_line(capsys, [*resume, "--steps", "1"]) and "already reached step 2" in \
        error_line(capsys, [*resume, "--steps", "2"])
    line = error_line(capsys, [*resume, "--steps", "4", "--lr", "0.5", "--batch-size", "3"])
    assert "--batch-size 3 (the run's: 8); --lr 0.5 (the run's: 0.001) would change what it computes" in line
    assert "--n-layer (part of the run's set-up)" in error_line(capsys, [*resume, "--steps", "4", "--n-layer", "2"])
    assert snapshot(run) == before  # nothing written by any of these
    # What a resume honours (how the run is watched and kept), and the schedule it stretches, said.
    assert main([*resume, "--steps", "4", "--eval-every", "1", "--keep-checkpoints", "1"]) == 0
    err = capsys.readouterr().err
    assert "--steps 4 (was 2): the cosine schedule now runs to step 4, so the learning rate at step 2 is" in err
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["steps"], config["eval_every"], config["lr"]) == (4, 1, 0.001)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_4"]


def test_an_rl_resume_refuses_a_reference_model_that_changed(runs, tmp_path, capsys):
    init = tmp_path / "init"
    shutil.copytree(runs / "add2", init)
    out = tmp_path / "rl"
    assert main(["rl", "--init", str(init), "--task", "add2", "--beta", "0.1", "--out", str(out),
                 *RL[:1], "1", *RL[2:]]) == 0
    capsys.readouterr()
    assert main(["sft", "--task", "add2", "--steps", "2", "--seed", "7", "--out", str(init), "--overwrite", *TINY]) == 0
    capsys.readouterr()  # the --init run retrained: other weights under the same name
    line = error_line(capsys, ["rl", "--out", str(out), "--resume", "--steps", "2", "--quiet"])
    assert "has changed since the run started" in line


def test_a_one_row_sft_file_trains_without_nan_figures(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "1+", "completion": "1"}) + "\n")
    out = tmp_path / "run"
    assert main(["sft", "--data", str(data), "--steps", "2", "--out", str(out), *TINY]) == 0
    assert "has one row, all of it for training, so there is no validation" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_tokens"] == 0 and "val_loss" not in summary


def test_a_run_stopped_while_finishing_resumes_to_its_summary(runs, tmp_path):
    """Stopped after its last checkpoint but before summary.json: --resume has no step left to train,
    and writes the summary from the figures the last checkpoint holds."""
    run = tmp_path / "run"
    shutil.copytree(runs / "add2", run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert main(["sft", "--out", str(run), "--resume", "--quiet"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["val_loss"] == summary["val_loss"] and again["task_accuracy"] == summary["task_accuracy"]
