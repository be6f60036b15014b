"""What each process of tests/test_dist.py runs: a few optimizer steps of maximum likelihood and of every
policy-gradient preset on a tiny float64 GPT, from the same seed, then the final weights and sampled
tokens written by rank 0. The parent runs the same in one process and compares.

Processes are started with torch.multiprocessing.spawn and join a gloo group through a file
(`init_method="file://…"`), as veRL's and torchtitan's CPU tests do.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as tdist
from helpers import CopyEngine, move_adapters

from pglm import dist
from pglm.data import Batch
from pglm.models import build_model, model_config
from pglm.models.policy import POLICY_METHODS, Policy
from pglm.pg.advantages import MovingBaseline
from pglm.pg.presets import get_preset
from pglm.tasks import get_task
from pglm.train.metrics import MetricsLog
from pglm.train.mle import TrainConfig, make_optimizer, train_mle
from pglm.train.rl import RLConfig, ValueHead, frozen_copy, make_rl_optimizer, task_rows, train_rl

TASK = get_task("add2")
PRESETS = ("reinforce", "rloo", "grpo", "dr_grpo", "dapo", "gspo", "ppo")


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = model_config("gpt", n_layer=2, d_model=16, n_head=2, block_size=16, vocab_size=TASK.tokenizer().vocab_size)
    return build_model(cfg).to(dtype)


def tiny_lora_model(dtype=torch.float64):
    """A tiny random GPT-2 behind pglm's HF interface, with LoRA adapters on its attention that already
    move the policy (lora_B ≠ 0), so the reference, the same model with its adapter off, differs from it.
    GPT-2 rather than Llama: transformers' Llama computes its RMSNorm in float32 whatever the weights'
    dtype, so a float64 Llama is exact only to ~1e-7 (and a world of 3, whose loss is scaled by 3,
    rounds differently from one process)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pglm.models.hf import add_lora, wrap_hf

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TASK.tokenizer().vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = wrap_hf(GPT2LMHeadModel(config))
    add_lora(model, 2, 4.0, ["c_attn"])
    move_adapters(model)
    return model.to(dtype)


def reward(prompts, completions, **kw):
    """Varied, so advantages are not all 0; a function of the text alone. Rarely equal within a group:
    where a group's rewards tie, a KL in the reward leaves its advantages (R − mean)/(std + ε) made of
    rounding noise alone (the policy is its own reference at the first step), which no two orders of
    summation round alike, so even float64 runs then differ by ~1e-8 (docs/distributed.md)."""
    return [float(sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997) / 996 for c in completions]


def half_reward(prompts, completions, half, **kw):
    return [1.0 if h else r for h, r in zip(half, reward(prompts, completions))]


def get_batch(rng):
    x = torch.from_numpy(rng.integers(0, 15, (4, 12)))
    y = torch.roll(x, -1, 1)
    mask = torch.from_numpy(rng.random((4, 12)) < 0.8)  # unequal token counts across micro-batches and ranks
    return Batch(x, y, mask)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dist.full_model_state(module).items()}


def run_mle(out: Path, mode: str | None, grad_accum: int, dtype=torch.float64) -> dict:
    model = tiny_model(dtype)
    wrapped = dist.wrap(Policy(model), mode, torch.device("cpu"), POLICY_METHODS)
    cfg = TrainConfig(steps=3, grad_accum=grad_accum, lr=1e-2, warmup_steps=1, eval_every=3, ckpt_every=3,
                      log_every=1)
    optimizer = make_optimizer(wrapped, cfg)
    out.mkdir(parents=True, exist_ok=True)
    final = train_mle(wrapped, optimizer, cfg, get_batch, lambda n: [get_batch(__import__("numpy").random.default_rng(9))
                                                                      for _ in range(3)],
                      out, metrics=MetricsLog(out), progress=False)
    return {"params": params(wrapped), "final": final}


def run_rl(out: Path, algo: str, mode: str | None, beta: float, dtype=torch.float64, micro: int | None = None,
           rollout: int | None = None, ref_in_loss: bool = False, masked_half: bool = False, lora: bool = False,
           ref_offload: bool = False, skewed_engine: bool = False) -> dict:
    """`masked_half`: the second half of each step's prompts get one constant reward, so that with DAPO's
    filter every row of the last rank(s) is masked out of the loss. `lora`: a GPT-2 with LoRA adapters,
    its own reference; `ref_offload`: under FSDP2 the reference's shards live in CPU memory.
    `skewed_engine`: rollouts from an engine of its own weights (synced after each step) whose log-probs
    are 0.6 · (token mod 3) below the trainer's, so that some tokens' ratios e^1.2 pass the cap of 3."""
    preset = get_preset(algo)
    if ref_in_loss and preset.kl_placement != "loss":
        from dataclasses import replace

        preset = replace(preset, kl_placement="loss")
    model = tiny_lora_model(dtype) if lora else tiny_model(dtype)
    ref = frozen_copy(model) if beta > 0 and not lora else None
    value_head = ValueHead(16).to(dtype) if preset.estimator.values else None
    # epochs × minibatches × micro-batches, all different: 2 × 2 × (rows / 2 per micro-batch)
    cfg = RLConfig(algo=algo, steps=2, prompts_per_step=6, group_size=2, warmup_steps=1, beta=beta, epochs=2,
                   minibatches=2, micro_batch_size=micro, rollout_batch_size=rollout, eval_every=100, ckpt_every=100,
                   lr=1e-2)
    engine = None
    if skewed_engine:  # a copy of the whole model, before FSDP2 shards it
        engine = CopyEngine(model, TASK.tokenizer(), skew=lambda g: 0.6 * (g.tokens[:, g.prompt_len:] % 3))
    wrapped = dist.wrap(Policy(model, value_head), mode, torch.device("cpu"), POLICY_METHODS)
    if ref is not None and dist.sharded(wrapped):
        ref = dist.wrap(Policy(ref), mode, torch.device("cpu"), offload=ref_offload)
        from torch.distributed.fsdp import CPUOffloadPolicy

        offloaded = [isinstance(m._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
                     for m in [ref, *dist.transformer_blocks(ref)]]
        assert offloaded == [ref_offload] * len(offloaded)  # every group of the reference, or none
    optimizer = make_rl_optimizer(wrapped, None, cfg.lr, cfg)
    out.mkdir(parents=True, exist_ok=True)
    samples = []

    real = __import__("pglm.train.rl", fromlist=["collect_rollout"]).collect_rollout

    def recording(*a, **k):  # every completion this rank sampled, in global order once gathered
        ro = real(*a, **k)
        samples.append(ro.completions)
        return ro

    import pglm.train.rl as rl

    rl.collect_rollout = recording
    try:
        draw = task_rows(TASK, 0, cfg.prompts_per_step)
        if masked_half:
            P = cfg.prompts_per_step
            rows = draw
            draw = lambda step: [{**r, "half": i >= P // 2} for i, r in enumerate(rows(step))]  # noqa: E731
        train_rl(wrapped, TASK.tokenizer(), preset, cfg, draw, half_reward if masked_half else reward, None, 4,
                 out, optimizer, ref_model=ref, baseline=MovingBaseline() if preset.estimator.state else None,
                 metrics=MetricsLog(out), progress=False, engine=engine)
    finally:
        rl.collect_rollout = real
    gathered = [None] * dist.world_size()
    if dist.world_size() > 1:
        tdist.all_gather_object(gathered, samples)
    else:
        gathered = [samples]
    per_step = [sum((g[s] for g in gathered), []) for s in range(len(samples))]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if dist.is_main() else []
    return {"params": params(wrapped), "samples": per_step, "metrics": metrics}


class EvenLengthTask:
    """add2's held-out prompts, with a reward the untrained tiny model earns about half the time: an
    answer of even length. Accuracy and pass@k then lie strictly between 0 and 1."""

    name, max_new_tokens = "even", 4

    def heldout(self):
        return TASK.heldout()

    def reward(self, prompts, completions, **kw):
        return [float(len(c) % 2 == 0) for c in completions]


def run_eval(mode: str | None, limit: int, samples: int) -> dict:
    """Held-out accuracy and pass@k of the tiny model, the prompts shared out over the ranks."""
    from pglm.evaluate import evaluate_task

    wrapped = dist.wrap(Policy(tiny_model()), mode, torch.device("cpu"), POLICY_METHODS)
    evaluated = dist.unwrap(wrapped) if dist.world_size() > 1 else dist.unwrap(wrapped).model
    return {"figures": evaluate_task(evaluated, TASK.tokenizer(), EvenLengthTask(), samples=samples, limit=limit,
                                     batch_size=3)}


def worker(rank: int, world: int, init_file: str, result_file: str, mode: str, jobs: list[dict]):
    os.environ["WORLD_SIZE"] = str(world)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = [run_job(job, mode, Path(result_file).parent / f"r{rank}") for job in jobs]
        if rank == 0:
            torch.save(results, result_file)
    finally:
        tdist.destroy_process_group()


def run_job(job: dict, mode: str | None, root: Path) -> dict:
    job = dict(job)
    kind = job.pop("kind")
    name = job.pop("name")
    with mutated(job.pop("mutation", None)), fingerprints() as prints:
        if kind == "eval":
            result = run_eval(mode, **job)
        else:
            result = run_mle(root / name, mode, **job) if kind == "mle" else run_rl(root / name, mode=mode, **job)
    if dist.world_size() > 1:
        every = [None] * dist.world_size()
        tdist.all_gather_object(every, prints)
        result["fingerprints"] = every
    return result


@contextlib.contextmanager
def fingerprints():
    """Record, before every optimizer step (at the gradient clip), a fingerprint of this rank's
    gradients: a fixed random projection of each. Under DDP every rank must then hold the same."""
    prints: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        params = list(params)
        total = 0.0
        for i, p in enumerate(params):
            if p.grad is not None and not hasattr(p.grad, "full_tensor"):  # FSDP2 holds shards: not compared
                g = torch.Generator().manual_seed(i)
                total += float((p.grad.double() * torch.randn(p.grad.shape, generator=g, dtype=torch.float64)).sum())
        prints.append(total)
        return real_clip(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield prints
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip


@contextlib.contextmanager
def mutated(name: str | None):
    """Put back one of the bugs the equivalence tests exist for."""
    import pglm.train.mle as mle
    import pglm.train.rl as rl

    saved = {}

    def patch(module, attr, value):
        saved[(module, attr)] = getattr(module, attr)
        setattr(module, attr, value)

    if name == "local_normaliser":  # each rank normalises by its own token count
        def local_counts(loss_mask, mbs, size):
            return (torch.stack([loss_mask[mb].sum() for mb in mbs]).to(torch.float64),
                    torch.tensor([float(len(mb)) for mb in mbs], dtype=torch.float64),
                    dist.all_max_tensor(torch.tensor([-(-len(mb) // size) for mb in mbs])))

        patch(rl, "minibatch_counts", local_counts)
        patch(mle, "dist", _LocalSums())
    elif name == "bypass_wrapper":  # score through the module inside DDP, not through DDP's forward
        real = rl._scored
        patch(rl, "_scored", lambda scorer, *a, **k: real(dist.unwrap(scorer), *a, **k))
    elif name == "rank_seeds":  # every rank seeds its groups from its own, local prompt numbers
        from pglm import engines

        real_u = engines.seed_uniforms
        patch(engines, "seed_uniforms", lambda seeds, G, N: real_u([(s, t, i - seeds[0][2]) for s, t, i in seeds], G, N))
    elif name == "local_mismatch":  # the engine/trainer mismatch figures of each rank's own rows
        patch(rl, "step_mismatch", rl.mismatch_stats)
    elif name is not None:
        raise ValueError(name)
    try:
        yield
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)


class _LocalSums:
    """pglm.dist as the maximum-likelihood step sees it, with sums that stay on this rank."""

    def __getattr__(self, name):
        return (lambda x: x) if name == "all_sum" else getattr(dist, name)


def run_world(tmp, world: int, mode: str, jobs: list[dict]) -> list[dict]:
    """Run `jobs` in a world of `world` spawned processes; rank 0's results."""
    import torch.multiprocessing as mp

    tmp = Path(tmp)
    result = tmp / "result.pt"
    mp.spawn(worker, args=(world, str(tmp / "init"), str(result), mode, jobs), nprocs=world, join=True)
    return torch.load(result, weights_only=True)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-10) -> bool:
    """Every tensor of `a` equals that of `b` to `rel` relative to the tensor's scale."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return all(((a[k] - b[k]).abs().max() <= rel * max(1.0, float(b[k].abs().max()))) for k in a)
