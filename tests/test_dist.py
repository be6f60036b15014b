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


def one_process(job: dict, tmp_path, world: int):
    """The same job in this process, with the global batch of a world of `world` processes."""
    job = dict(job)
    kind, name = job.pop("kind"), job.pop("name")
    if kind == "mle":
        job["grad_accum"] *= world
        return w.run_mle(tmp_path / f"one-{name}", None, **job)
    job.pop("rollout", None)  # one process samples each step in one batch: the chunks must not matter
    return w.run_rl(tmp_path / f"one-{name}", mode=None, **job)


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory):
    jobs = [{"kind": "mle", "name": "mle", "grad_accum": 2}] + RL_JOBS
    return jobs, run_world(tmp_path_factory.mktemp("ddp2"), 2, "ddp", jobs)


def test_two_ranks_ddp_equal_one_process(ddp2, tmp_path):
    jobs, results = ddp2
    for job, got in zip(jobs, results):
        want = one_process(job, tmp_path, 2)
        assert close(got["params"], want["params"]), job["name"]
        a, b = got["fingerprints"]
        assert len(a) >= 3 and a == pytest.approx(b, rel=1e-12), job["name"]  # every rank holds the same gradient
        if job["kind"] == "rl":
            assert got["samples"] == want["samples"], job["name"]  # the same tokens drawn
            for a, b in zip(got["metrics"], want["metrics"]):  # global statistics, logged alike
                for k in ("reward_mean", "loss", "kl", "entropy", "clip_frac", "grad_norm"):
                    if a.get(k) is not None:
                        assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-10), (job["name"], k)


def test_two_ranks_fsdp2_equal_one_process(tmp_path):
    jobs = [{"kind": "mle", "name": "mle", "grad_accum": 1},
            {"kind": "rl", "name": "ppo", "algo": "ppo", "beta": 0.1, "micro": 2, "rollout": 4},
            {"kind": "rl", "name": "grpo", "algo": "grpo", "beta": 0.1, "micro": 3}]
    for job, got in zip(jobs, run_world(tmp_path, 2, "fsdp2", jobs)):
        want = one_process(job, tmp_path, 2)
        assert close(got["params"], want["params"]), job["name"]
        if job["kind"] == "rl":
            assert got["samples"] == want["samples"], job["name"]


MUTATIONS = [
    # the per-rank normaliser put back (maximum likelihood and policy gradient)
    ({"kind": "mle", "name": "mle", "grad_accum": 2, "mutation": "local_normaliser"}, "params"),
    ({"kind": "rl", "name": "rloo", "algo": "rloo", "beta": 0.0, "micro": 2, "mutation": "local_normaliser"}, "params"),
    ({"kind": "rl", "name": "ppo", "algo": "ppo", "beta": 0.0, "micro": 2, "mutation": "local_normaliser"}, "params"),
    # a call that bypasses the wrapper: gradients are not all-reduced (and nothing says so)
    ({"kind": "rl", "name": "grpo", "algo": "grpo", "beta": 0.0, "micro": 2, "mutation": "bypass_wrapper"}, "fingerprints"),
    # sampling seeded by rank-local prompt numbers
    ({"kind": "rl", "name": "dr_grpo", "algo": "dr_grpo", "beta": 0.0, "mutation": "rank_seeds"}, "samples"),
]


def test_the_equivalence_tests_fail_on_the_bugs_they_exist_for(tmp_path):
    jobs = [job for job, _ in MUTATIONS]
    for (job, what), got in zip(MUTATIONS, run_world(tmp_path, 2, "ddp", jobs)):
        clean = {k: v for k, v in job.items() if k != "mutation"}
        want = one_process(clean, tmp_path, 2)
        assert not close(got["params"], want["params"]), job  # the weights no longer match one process
        if what == "fingerprints":
            a, b = got["fingerprints"]
            assert a != pytest.approx(b, rel=1e-6)  # the ranks' gradients differ after backward
        if what == "samples":
            assert got["samples"] != want["samples"]
