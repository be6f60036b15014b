"""N processes ≡ 1 process, by test: gloo on CPU, DDP and FSDP2, float64.

After a few optimizer steps the weights of a world of W processes equal those of one process with
the same global batch (to 1e-10 relative), and the sampled tokens are identical, for maximum
likelihood and for every policy-gradient preset (KL in the reward and in the loss, epochs ×
minibatches × micro-batches that differ from each other, rollouts generated in chunks). The
mutations at the end put back the bugs these tests exist for, and check that the tests then fail.
"""

from __future__ import annotations

import dist_worker as w
import pytest
from dist_worker import close, run_world

RL_JOBS = [
    {"kind": "rl", "name": f"{algo}-{beta}", "algo": algo, "beta": beta, "micro": 2, "rollout": 4}
    for algo in w.PRESETS for beta in (0.0, 0.1)
] + [{"kind": "rl", "name": "grpo-kl-loss", "algo": "reinforce", "beta": 0.1, "micro": 2, "ref_in_loss": True}]
LORA_JOB = {"kind": "rl", "name": "grpo-lora-kl", "algo": "grpo", "beta": 0.1, "micro": 2, "lora": True}
# rollouts from another engine: its skew corrected, its figures those of the whole step
ENGINE_JOB = {"kind": "rl", "name": "grpo-engine", "algo": "grpo", "beta": 0.0, "micro": 2, "skewed_engine": True}
MISMATCH = ("logp_diff_mean", "logp_diff_max", "is_ratio_mean", "is_ratio_max", "is_clip_frac")


def one_process(job: dict, tmp_path, world: int):
    """The same job in this process, with the global batch of a world of `world` processes."""
    job = dict(job)
    kind, name = job.pop("kind"), job.pop("name")
    if kind == "eval":
        return w.run_eval(None, **job)
    if kind == "mle":
        job["grad_accum"] *= world
        return w.run_mle(tmp_path / f"one-{name}", None, **job)
    job.pop("rollout", None)  # one process samples each step in one batch: the chunks must not matter
    return w.run_rl(tmp_path / f"one-{name}", mode=None, **job)


# The default suite's share: one job per kind of statistic (moving baseline, group advantages with the
# KL in the loss, GAE with whitening and a value head, the DAPO filter with a rank whose rows are all
# masked). Every preset with and without KL runs in the slow tests below.
EVAL_JOB = {"kind": "eval", "name": "eval", "limit": 10, "samples": 4}
FAST_JOBS = [
    {"kind": "mle", "name": "mle", "grad_accum": 2},
    {"kind": "rl", "name": "reinforce", "algo": "reinforce", "beta": 0.0, "micro": 2, "rollout": 4},
    {"kind": "rl", "name": "grpo-kl-loss", "algo": "grpo", "beta": 0.1, "micro": 3},
    {"kind": "rl", "name": "ppo-kl-reward", "algo": "ppo", "beta": 0.1, "micro": 2, "rollout": 4},
    {"kind": "rl", "name": "dapo-rank-1-masked", "algo": "dapo", "beta": 0.0, "micro": 2, "masked_half": True},
]


def test_two_ranks_ddp_equal_one_process(tmp_path):
    check_equal(tmp_path, 2, "ddp", FAST_JOBS)


@pytest.mark.slow
@pytest.mark.parametrize("world,mode", [(2, "ddp"), (3, "ddp"), (2, "fsdp2"), (3, "fsdp2")])
def test_every_preset_at_every_world_size(tmp_path, world, mode):
    """Worlds of 2 and 3 (6 prompts split 3 + 3 and 2 + 2 + 2; minibatches then split unevenly over the
    ranks), DDP and FSDP2, every preset with β = 0 and 0.1."""
    check_equal(tmp_path, world, mode,
                [{"kind": "mle", "name": "mle", "grad_accum": 1}, EVAL_JOB, LORA_JOB, ENGINE_JOB] + RL_JOBS)


def check_equal(tmp_path, world: int, mode: str, jobs: list[dict]):
    results = run_world(tmp_path, world, mode, jobs)
    for job, got in zip(jobs, results):
        want = one_process(job, tmp_path, world)
        if job["kind"] == "eval":  # the prompts shared out over the ranks (unevenly: 10 over 3 is 4 + 4 + 2)
            assert got["figures"] == pytest.approx(want["figures"], rel=1e-12), (got, want)
            assert 0 < want["figures"]["pass@1"] < 1  # a figure that could differ
            continue
        assert close(got["params"], want["params"]), job["name"]
        if mode == "ddp":  # every rank holds the same gradient after backward (FSDP2 holds shards)
            prints = got["fingerprints"]
            assert len(prints[0]) >= 3 and all(p == pytest.approx(prints[0], rel=1e-12) for p in prints), job["name"]
        if job["kind"] == "rl":
            assert got["samples"] == want["samples"], job["name"]  # the same tokens drawn
            for a, b in zip(got["metrics"], want["metrics"]):  # global statistics, logged alike
                for k in ("reward_mean", "loss", "kl", "entropy", "grad_norm", *MISMATCH):
                    if a.get(k) is not None:
                        assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-10), (job["name"], k)
                # An indicator: a token whose advantage is 0 up to rounding may count as clipped in one run
                # and not in the other, with no effect on the gradient.
                assert a["clip_frac"] == pytest.approx(b["clip_frac"], abs=0.02), job["name"]


def test_two_ranks_fsdp2_equal_one_process(tmp_path):
    """With the reference sharded and offloaded to CPU memory, LoRA (whose reference is the policy
    with its adapter off: the call must still go through FSDP2's forward), and another engine's rollouts
    (its weight syncs gather the shards)."""
    offloaded = {**FAST_JOBS[3], "name": "ppo-kl-reward-ref-offload", "ref_offload": True}
    check_equal(tmp_path, 2, "fsdp2", [FAST_JOBS[0], offloaded, LORA_JOB, EVAL_JOB, ENGINE_JOB])


MUTATIONS = [
    # the per-rank normaliser put back (maximum likelihood and policy gradient)
    ({"kind": "mle", "name": "mle", "grad_accum": 2, "mutation": "local_normaliser"}, "params"),
    ({"kind": "rl", "name": "rloo", "algo": "rloo", "beta": 0.0, "micro": 2, "mutation": "local_normaliser"}, "params"),
    ({"kind": "rl", "name": "ppo", "algo": "ppo", "beta": 0.0, "micro": 2, "mutation": "local_normaliser"}, "params"),
    # a call that bypasses the wrapper: gradients are not all-reduced (and nothing says so)
    ({"kind": "rl", "name": "grpo", "algo": "grpo", "beta": 0.0, "micro": 2, "mutation": "bypass_wrapper"}, "fingerprints"),
    # sampling seeded by rank-local prompt numbers
    ({"kind": "rl", "name": "dr_grpo", "algo": "dr_grpo", "beta": 0.0, "mutation": "rank_seeds"}, "samples"),
    # the engine/trainer mismatch logged from rank 0's rows alone (the weights are right, the figures not)
    ({**ENGINE_JOB, "mutation": "local_mismatch"}, "mismatch"),
]


def test_the_equivalence_tests_fail_on_the_bugs_they_exist_for(tmp_path):
    jobs = [job for job, _ in MUTATIONS]
    for (job, what), got in zip(MUTATIONS, run_world(tmp_path, 2, "ddp", jobs)):
        clean = {k: v for k, v in job.items() if k != "mutation"}
        want = one_process(clean, tmp_path, 2)
        if what == "mismatch":
            assert close(got["params"], want["params"])
            assert any(a[k] != pytest.approx(b[k], rel=1e-8) for a, b in zip(got["metrics"], want["metrics"])
                       for k in MISMATCH if k in b)
            continue
        assert not close(got["params"], want["params"]), job  # the weights no longer match one process
        if what == "fingerprints":
            a, b = got["fingerprints"]
            assert a != pytest.approx(b, rel=1e-6)  # the ranks' gradients differ after backward
        if what == "samples":
            assert got["samples"] != want["samples"]

