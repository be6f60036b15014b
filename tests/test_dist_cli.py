"""The `pglm` command under torchrun (gloo on CPU): the same run as one process, resume at another world
size, a failure on one rank, a two-"node" rendezvous, and the bad-input lines.

Each launch starts Python processes, so most of these are `slow`; one 2-rank run stays in the
default suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, error_line
from safetensors.torch import load_file

from pglm.cli import main

RL = ["--task", "add2", "--prompts-per-step", "6", "--group-size", "2", "--eval-every", "100", "--eval-samples", "0",
      "--eval-limit", "6", "--lr", "1e-3", "--device", "cpu", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str], timeout: float = 240, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *extra, "-m", "pglm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def weights(run) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def max_rel_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def rl_rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"phase": "rl"' in x]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distcli")
    assert main(["sft", "--task", "add2", "--steps", "30", "--lr", "3e-3", "--out", str(tmp / "sft"), *TINY]) == 0
    return tmp / "sft"


def test_torchrun_two_ranks_rl_is_the_one_process_run(init, tmp_path):
    """float32: the weights after 3 steps agree to a measured tolerance (docs/distributed.md), the sampled
    completions, and hence the rewards, are the same."""
    flags = ["rl", "--init", str(init), "--algo", "grpo", "--beta", "0.05", "--steps", "3", "--micro-batch-size", "2",
             "--minibatches", "2", *RL]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    r = torchrun(2, [*flags, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes (ddp)" in r.stderr
    assert max_rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5
    one, two = rl_rows(tmp_path / "one"), rl_rows(tmp_path / "two")
    assert [row["reward_mean"] for row in two] == [row["reward_mean"] for row in one]
    assert [row["step"] for row in two] == [1, 2, 3]  # one line per step: only rank 0 wrote


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_pretrain_and_sft_equal_one_process(tmp_path, mode):
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    flags = ["pretrain", "--data", str(data), "--steps", "4", "--eval-every", "2", "--lr", "3e-3", "--device", "cpu",
             *TINY]
    assert main([*flags, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    r = torchrun(2, [*flags, "--dist", mode, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5
    sft = ["sft", "--task", "add2", "--steps", "3", "--device", "cpu", *TINY]
    assert main([*sft, "--grad-accum", "2", "--out", str(tmp_path / "sft1")]) == 0
    r = torchrun(2, [*sft, "--dist", mode, "--out", str(tmp_path / "sft2")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_rel_diff(weights(tmp_path / "sft2"), weights(tmp_path / "sft1")) < 1e-5


@pytest.mark.slow
def test_a_reward_that_fails_on_rank_one_ends_both_ranks_with_one_line(init, tmp_path):
    reward = tmp_path / "r.py"
    reward.write_text("import torch.distributed as d\n"
                      "def bad(prompts, completions, **kw):\n"
                      "    if d.get_rank() == 1:\n"
                      "        raise ValueError('rank one says no')\n"
                      "    return [0.0] * len(completions)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(10)))
    args = ["rl", "--init", str(init), "--prompts", str(prompts), "--reward", f"{reward}:bad", "--max-new-tokens", "3",
            "--prompts-per-step", "2", "--group-size", "2", "--steps", "3", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "run")]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pglm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    t0 = time.time()
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.time() - t0 < 60
    assert [p.returncode for p in procs] == [2, 2]
    err0 = outs[0][1].strip().splitlines()
    assert err0[-1].startswith("pglm rl: error: reward ") and "bad" in err0[-1] and "rank one says no" in err0[-1]
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert outs[1][1].strip() == ""  # rank 1 leaves the line to rank 0


@pytest.mark.slow
def test_two_node_rendezvous_on_one_machine(init, tmp_path):
    port = free_port()
    flags = ["rl", "--init", str(init), "--algo", "rloo", "--steps", "2", *RL, "--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pglm-test"]
    nodes = [subprocess.Popen([*cmd, "--node-rank", str(n), "-m", "pglm", *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for n in (0, 1)]
    outs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [row["step"] for row in rl_rows(tmp_path / "run")] == [1, 2]


def test_bad_dist_input_is_one_line(init, tmp_path, capsys):
    base = ["rl", "--init", str(init), "--steps", "1", *RL]
    assert "--dist must be ddp or fsdp2" in error_line(capsys, [*base, "--dist", "zero3", "--out", str(tmp_path / "a")])
    assert "torchrun" in error_line(capsys, [*base, "--dist", "fsdp2", "--out", str(tmp_path / "b")])
    line = error_line(capsys, [*base, "--micro-batch-size", "5", "--out", str(tmp_path / "c")])
    assert "--micro-batch-size 5 does not divide a minibatch of 12" in line and "1, 2, 3, 4, 6, 12" in line
    assert "--rollout-batch-size 3 must be a multiple" in error_line(
        capsys, [*base, "--rollout-batch-size", "3", "--out", str(tmp_path / "d")])
    assert "--ref-offload keeps the sharded reference model of --dist fsdp2" in error_line(
        capsys, [*base, "--beta", "0.1", "--ref-offload", "--out", str(tmp_path / "e")])
    assert not any((tmp_path / x).exists() for x in "abcde")  # nothing written


@pytest.mark.slow
def test_prompts_that_do_not_split_over_the_ranks_are_one_line(init, tmp_path):
    r = torchrun(2, ["rl", "--init", str(init), "--steps", "1", *RL, "--prompts-per-step", "3",
                     "--out", str(tmp_path / "a")])
    assert r.returncode != 0
    assert "--prompts-per-step 3 does not split over 2 processes" in r.stderr and "2, 4, 6" in r.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_and_leaves_the_last_checkpoint(init, tmp_path):
    reward = tmp_path / "r.py"
    reward.write_text("import os, signal, torch.distributed as d\n"
                      "calls = 0\n"
                      "def dies(prompts, completions, **kw):\n"
                      "    global calls\n"
                      "    calls += 1\n"
                      "    if d.is_initialized() and d.get_rank() == 1 and calls == 3:\n"
                      "        os.kill(os.getpid(), signal.SIGKILL)\n"
                      "    return [float(len(c)) for c in completions]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(10)))
    out = tmp_path / "run"
    t0 = time.time()
    r = torchrun(2, ["rl", "--init", str(init), "--prompts", str(prompts), "--reward", f"{reward}:dies",
                     "--max-new-tokens", "3", "--prompts-per-step", "2", "--group-size", "2", "--steps", "5",
                     "--ckpt-every", "1", "--device", "cpu", "--quiet", "--out", str(out)], timeout=120)
    assert time.time() - t0 < 60 + 15  # torchrun's own start-up on top of the bound
    assert r.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert main(["rl", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0  # and it resumes


def test_a_checkpoint_written_before_world_sizes_still_resumes(tmp_path):
    """Checkpoints of the earlier format (optimizer state keyed by position, no world size in
    state.json) resume on the same trajectory."""
    from pglm.cli.train import train_config_of
    from pglm.models.policy import Policy
    from pglm.runs import load_run
    from pglm.train.checkpoint import load_optimizer
    from pglm.train.mle import make_optimizer

    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    flags = ["pretrain", "--data", str(data), "--eval-every", "4", "--ckpt-every", "4", "--lr", "3e-3", "--log-every",
             "1", "--warmup-steps", "1", "--min-lr-frac", "1", *TINY]  # a schedule that does not depend on --steps
    assert main([*flags, "--steps", "8", "--out", str(tmp_path / "straight")]) == 0
    assert main([*flags, "--steps", "4", "--out", str(tmp_path / "old")]) == 0
    ckpt = tmp_path / "old" / "checkpoints" / "step_4"
    run = load_run(tmp_path / "old")
    policy = Policy(run.model)
    optimizer = make_optimizer(policy, train_config_of(run.config))
    load_optimizer(optimizer, ckpt, policy)
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")  # what checkpoints held before: positions
    state = json.loads((ckpt / "state.json").read_text())
    del state["world_size"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert isinstance(torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"][0]["params"][0], int)
    assert main(["pretrain", "--out", str(tmp_path / "old"), "--resume", "--steps", "8", "--quiet"]) == 0

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["phase"] == "mle"]

    assert losses(tmp_path / "old") == losses(tmp_path / "straight")


@pytest.mark.parametrize("verb", ["pretrain", "rl"])
def test_a_resume_whose_checkpoint_is_of_another_model_is_one_line(init, tmp_path, capsys, verb):
    import shutil

    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    if verb == "pretrain":
        for name, width in (("a", "16"), ("b", "32")):
            assert main(["pretrain", "--data", str(data), "--steps", "2", "--out", str(tmp_path / name),
                         *TINY[:2], "--d-model", width, *TINY[4:]]) == 0
    else:
        for name, algo in (("a", "grpo"), ("b", "ppo")):  # ppo's optimizer also holds a value head
            assert main(["rl", "--init", str(init), "--algo", algo, "--steps", "1", *RL, "--out", str(tmp_path / name)]) == 0
    ckpt_a, ckpt_b = (tmp_path / n / "checkpoints" / "latest" for n in "ab")
    step = ckpt_a.read_text().strip()
    target = tmp_path / "a" / "checkpoints" / step
    for f in ("model.safetensors", "optimizer.pt"):  # a's checkpoint now holds b's files
        shutil.copy(tmp_path / "b" / "checkpoints" / ckpt_b.read_text().strip() / f, target / f)
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    capsys.readouterr()  # what the runs above printed
    line = error_line(capsys, [verb, "--out", str(tmp_path / "a"), "--resume", "--steps", "4", "--quiet"])
    assert ("does not match the model" in line or "belongs to another model" in line), line
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before  # nothing written


def state_of(run) -> dict[str, torch.Tensor]:
    """The model weights of a run's latest checkpoint, whichever its format."""
    from pglm.runs import load_run

    return {k: v.detach().clone() for k, v in load_run(run).model.state_dict().items()}


def test_sharded_checkpoints_resume_on_the_same_trajectory(init, tmp_path):
    """--ckpt-format sharded in one process: every rank's shards through torch.distributed.checkpoint,
    no pickle; a resume continues exactly, and the run loads like any other."""
    flags = ["rl", "--init", str(init), "--algo", "ppo", "--minibatches", "2", "--ckpt-every", "2", *RL]
    assert main([*flags, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*flags, "--steps", "2", "--ckpt-format", "sharded", "--out", str(tmp_path / "s")]) == 0
    step2 = tmp_path / "s" / "checkpoints" / "step_2"
    assert (step2 / "sharded").is_dir() and not (step2 / "model.safetensors").exists()
    assert all(f.suffix in (".safetensors", ".json") for f in (step2 / "sharded").iterdir())  # nothing pickled
    assert main(["rl", "--out", str(tmp_path / "s"), "--resume", "--steps", "4", "--quiet"]) == 0
    assert [r["reward_mean"] for r in rl_rows(tmp_path / "s")] == [r["reward_mean"] for r in rl_rows(tmp_path / "straight")]
    assert max_rel_diff(state_of(tmp_path / "s"), state_of(tmp_path / "straight")) < 1e-6
    assert main(["eval", "--ckpt", str(tmp_path / "s"), "--task", "add2", "--samples", "0", "--json"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode,fmt", [("ddp", "full"), ("fsdp2", "sharded")])
def test_save_at_two_ranks_resume_at_one_and_three(init, tmp_path, mode, fmt):
    """A run saved by 2 ranks (DDP and full checkpoints, or FSDP2 and sharded ones) resumes on 1 process
    and on 3 ranks, and ends where the uninterrupted one-process run ends."""
    # No KL here: at step 1 the policy is its reference, so k1 is float32 rounding noise, and with no
    # reward signal PPO's whitening makes that noise the update (docs/distributed.md): a sum in another
    # order then moves the weights by 7e-3. tests/test_dist.py covers FSDP2 with KL, in float64.
    flags = ["rl", "--init", str(init), "--algo", "ppo", "--minibatches", "2", *RL]
    assert main([*flags, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    for world in (1, 3):
        out = tmp_path / f"w{world}"
        r = torchrun(2, [*flags, "--steps", "2", "--dist", mode, "--ckpt-format", fmt, "--out", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        step2 = out / "checkpoints" / "step_2"
        assert json.loads((step2 / "state.json").read_text())["world_size"] == 2
        if fmt == "sharded":
            assert len(list((step2 / "sharded").glob("*.safetensors"))) >= 2  # a shard per rank
        resume = ["rl", "--out", str(out), "--resume", "--steps", "4", "--quiet"]
        if world == 1:
            assert main(resume) == 0
        else:
            r = torchrun(3, [*resume, "--dist", mode])
            assert r.returncode == 0, r.stderr[-3000:]
        assert [row["reward_mean"] for row in rl_rows(out)] == [row["reward_mean"] for row in rl_rows(tmp_path / "straight")]
        assert max_rel_diff(state_of(out), state_of(tmp_path / "straight")) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_reward_model_equals_one_process(init, tmp_path, mode):
    """pglm reward at 2 ranks trains what one process with twice the accumulation trains: body and head."""
    import random

    rng = random.Random(0)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 9)}=",
                                         "chosen": "7" * rng.randint(1, 3), "rejected": str(rng.randint(0, 6))}) + "\n"
                             for _ in range(40)))
    flags = ["reward", "--init", str(init), "--data", str(prefs), "--steps", "3", "--eval-every", "3", "--lr", "3e-3",
             "--batch-size", "4", "--device", "cpu", "--quiet"]
    assert main([*flags, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    r = torchrun(2, [*flags, "--dist", mode, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5

    def head(run):
        return load_file(str(run / "checkpoints" / "step_3" / "score.safetensors"))

    assert max_rel_diff(head(tmp_path / "two"), head(tmp_path / "one")) < 1e-5
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["val_pairs"] == one["val_pairs"] == 4
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"]) and two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
