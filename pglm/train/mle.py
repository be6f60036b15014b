"""Maximum-likelihood training: the loop behind `pglm pretrain` and `pglm sft`.

Maximum likelihood is the policy gradient of Σ log π(y|x) with reward 1 on the data; it reads its
log-probs from the same `token_logprobs` every policy-gradient loss uses. The loop is plain code in
the order things happen: learning rate, batch, forward, loss, backward, clip, step, log, evaluate,
checkpoint.

Resuming at step k continues the same trajectory: the batch and the dropout noise of step s are
drawn from generators seeded by (seed, s), not from a stream that would have to be replayed, and
the optimizer state is restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pglm import dist
from pglm.data import Batch
from pglm.errors import UserError
from pglm.evaluate import evaluate_lm
from pglm.models.policy import Policy
from pglm.pg.logprobs import masked_mean_nll
from pglm.rng import numpy_rng, seed_of
from pglm.train.checkpoint import save_checkpoint, saved_figures
from pglm.train.metrics import MetricsLog


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in all (a resumed run continues to this number)
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_frac: float = 0.1  # the cosine schedule ends at lr × min_lr_frac
    warmup_steps: int | None = None  # linear warm-up; None → min(100, steps // 10)
    weight_decay: float = 0.1  # AdamW decay, on weight matrices only (not norms, biases)
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2 (0.95 as in GPT-3 / nanoGPT for small batches)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    eval_every: int = 200  # steps between validations (and at the end)
    eval_tokens: int = 32768  # validation tokens per periodic evaluation; the final one uses all
    ckpt_every: int = 500  # steps between checkpoints (and at the end)
    ckpt_format: str = "full"  # full (gathered, any world size) | sharded (each rank its own shards; docs/distributed.md)
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0  # seeds data order, initialisation and dropout
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard
    skip_nonfinite: bool = False  # a step whose gradient is not finite is skipped (counted) instead of stopping
    keep_checkpoints: int = 0  # the newest K checkpoints stay, older ones are deleted; 0 keeps every one

    def __post_init__(self):
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.steps // 10)


MAX_SEED = 2**32 - 1  # what numpy and torch both take as a seed
MAX_BATCH = 65536  # sequences per micro-batch: beyond this no device holds the activations


def check_config(cfg: TrainConfig) -> None:
    """Refuse, before any work, numbers that cannot train (the CLI and a Python caller alike)."""
    from pglm.errors import check_number

    check_number("--steps", cfg.steps, 1, integer=True, example="1000")
    check_number("--batch-size", cfg.batch_size, 1, MAX_BATCH, integer=True, example="32 (and --grad-accum for more)")
    for name in ("grad_accum", "eval_every", "eval_tokens", "ckpt_every", "log_every"):
        check_number(f"--{name.replace('_', '-')}", getattr(cfg, name), 1, integer=True)
    check_number("--lr", cfg.lr, 0, 1, low_open=True, example="3e-4")
    check_number("--min-lr-frac", cfg.min_lr_frac, 0, 1, example="0.1")
    check_number("--warmup-steps", cfg.warmup_steps, 0, integer=True, example="100")
    check_number("--weight-decay", cfg.weight_decay, 0, example="0.1")
    check_number("--beta1", cfg.beta1, 0, 1)
    check_number("--beta2", cfg.beta2, 0, 1)
    check_number("--grad-clip", cfg.grad_clip, 0, example="1.0 (0: off)")
    check_run_settings(cfg)


def check_run_settings(cfg) -> None:
    """What TrainConfig and RLConfig share: seed, checkpoints kept and their format, device."""
    from pglm.errors import check_number

    check_number("--seed", cfg.seed, 0, MAX_SEED, integer=True)
    check_number("--keep-checkpoints", cfg.keep_checkpoints, 0, integer=True, example="3 (0: keep all)")
    if cfg.ckpt_format not in ("full", "sharded"):
        raise UserError(f"--ckpt-format must be full or sharded, not '{cfg.ckpt_format}'")
    resolve_device(cfg.device)


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N, as one line when this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: pglm runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has no such CUDA device "
                        f"({torch.cuda.device_count()} found); use --device cpu or auto")
    return device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def warmup_cosine(i: int, total: int, lr: float, warmup: int, min_frac: float) -> float:
    """The rate of step i of `total`: linear warm-up to lr over `warmup` steps, then cosine decay to
    lr × min_frac at step `total` (min_frac 1: constant after the warm-up)."""
    if i < warmup:
        return lr * (i + 1) / warmup
    progress = (i - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_frac + (1 - min_frac) * cosine)


def stretched_schedule(steps: int, was: int, at: int, before: float, after: float) -> str:
    """What a resume that changes --steps does to a decaying rate, in one line."""
    return (f"--steps {steps} (was {was}): the cosine schedule now runs to step {steps}, so the learning rate at "
            f"step {at} is {after:.3g} (it was {before:.3g})")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr × min_lr_frac at cfg.steps."""
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_frac)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT `configure_optimizers`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one call: the per-parameter loop of the default AdamW was
    # ~2.6 ms of a ~45 ms step for the 4×128 model on a 2-core CPU, fused ~0.8 ms (docs/benchmarks.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def step_rng(seed: int, step: int, micro: int = 0) -> np.random.Generator:
    """The data generator of one micro-batch: a pure function of (seed, step, global micro-batch index)."""
    return numpy_rng(seed, step, "data", micro)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Turn the first Ctrl-C or SIGTERM (what a cluster sends before it preempts a job) into a flag the
    loop reads between steps, so the checkpoint it then writes is of a whole step; a second one
    interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, frame):
        flag.set()
        signal.signal(signum, previous[signum])
        if dist.is_main():  # said at once: the step may take a while (a slow reward, a long evaluation)
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n{name}: stopping after this step and its checkpoint; {name} again stops at once",
                  file=sys.stderr, flush=True)

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig in signals:
            signal.signal(sig, previous[sig])


@contextlib.contextmanager
def stop_signals_raise():
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt (outside a loop's `stop_on_ctrl_c`), so that a
    command stopped during set-up or evaluation still runs its clean-up (`pglm.train.rundir`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def nonfinite_message(step: int, grad_norm: float, run_dir) -> str:
    from pathlib import Path

    latest = Path(run_dir) / "checkpoints" / "latest"
    kept = f"{latest.read_text().strip()} is the last checkpoint" if latest.is_file() else "no checkpoint was written yet"
    return (f"step {step}: the loss or gradient is not finite (gradient norm {grad_norm}), so the step was not "
            f"applied and the run stops; {kept}. Lower --lr or check the data, or pass --skip-nonfinite to skip "
            "such steps")


def mle_step(model, optimizer, micro: list[Batch], grad_clip: float, autocast=contextlib.nullcontext,
             dropout_seeds: list[int] | None = None):
    """One optimizer step over this rank's micro-batches `micro`: forward, loss, backward, clip, step.

    `model` is a Policy, the DDP/FSDP2 wrapper of one (`pglm.dist.wrap`), or a bare language model.
    Returns (loss, grad_norm) as 0-d tensors, unsynced, so a loop that logs every k steps does not
    wait for the device at every step; the loss is this rank's share (sum it over ranks). The
    benchmarks (benchmarks/mle_vs_hf.py) time this function.
    """
    scorer = model if isinstance(dist.unwrap(model), Policy) else Policy(model)
    # One optimizer step may be several micro-batches on several ranks. The loss is normalised by the
    # token count of the whole step, so accumulation and ranks give the gradient of the whole batch.
    # DDP and FSDP2 average the ranks' gradients, hence the factor W on each rank's loss.
    n_tokens = dist.all_sum(sum(b.mask.sum() for b in micro)).clamp(min=1)  # a tensor: no host sync at world 1
    W = dist.world_size()
    losses = []
    for i, b in enumerate(micro):
        if dropout_seeds is not None:
            torch.manual_seed(dropout_seeds[i])
        with dist.grad_sync(scorer, i == len(micro) - 1):
            with autocast():
                logp, _, _ = scorer(b.x, b.y)  # (B, T), chunked over the vocabulary for large ones
            loss = masked_mean_nll(logp, b.mask, n_tokens)
            (loss * W if W > 1 else loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum(), clip_and_step(scorer, optimizer, grad_clip)


def clip_and_step(model, optimizer, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm, step unless it is not finite, clear the gradients; the norm (0-d)."""
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    # A step whose gradient is not finite must not reach the weights (nor Adam's moments). The check
    # is one host sync per step; the norm is global, so every rank decides alike.
    if bool(torch.isfinite(grad_norm)):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_mle(
    model,
    optimizer,
    cfg: TrainConfig,
    get_batch: Callable[[np.random.Generator], Batch],
    val_batches: Callable[[int | None], Iterable[Batch]],
    run_dir,
    start_step: int = 0,
    metrics: MetricsLog | None = None,
    progress: bool = True,
    evaluator: Callable[[torch.nn.Module], dict] | None = None,
    stop_when: Callable[[int, dict], bool] | None = None,
    step_fn: Callable = mle_step,
    validate: Callable = evaluate_lm,
) -> dict:
    """Train from `start_step` to `cfg.steps`; returns the final validation figures.

    get_batch(rng) gives one micro-batch; val_batches(max_tokens) the validation batches (None: all).
    evaluator(model) adds figures to each evaluation (e.g. task accuracy); stop_when(step, figures),
    asked after each evaluation, ends training there (a checkpoint follows, as at the last step).
    Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt. A step whose
    gradient is not finite is not applied: the run stops there (UserError naming the step; the last
    checkpoint stays), or with cfg.skip_nonfinite goes on, counting such steps in metrics.

    `step_fn` and `validate` are the step and the validation (`mle_step`, `evaluate_lm`); a reward
    model trains by maximum likelihood of preference labels in this same loop, with its own
    (`pglm.train.reward`).

    `model` is a bare language model, a Policy, or (several processes) the wrapper of one made by
    `pglm.dist.wrap` before the optimizer. Each rank takes cfg.grad_accum micro-batches of the step,
    rank r the global ones r·grad_accum … (r + 1)·grad_accum − 1, so a world of W ranks trains on
    what one process with W·grad_accum micro-batches trains on. Only rank 0 writes.
    """
    check_config(cfg)
    if start_step >= cfg.steps:  # resumed with no step left: stopped after its last checkpoint
        return saved_figures(run_dir)
    if hasattr(dist.unwrap(model), "lm_head"):  # a bare language model: scored through its Policy
        model = Policy(model)
    policy = dist.unwrap(model)
    device = next(model.parameters()).device
    autocast = autocast_for(device)
    metrics = metrics or MetricsLog(run_dir)
    model.train()
    step = start_step
    last_eval: dict = {}
    first_micro = dist.rank() * cfg.grad_accum  # this rank's first global micro-batch of a step

    def checkpoint(at: int):
        save_checkpoint(run_dir, at, model, optimizer, {"elapsed": metrics.elapsed(), **last_eval},
                        sharded=cfg.ckpt_format == "sharded", keep=cfg.keep_checkpoints)

    total = cfg.steps  # the last step; stop_when may bring it forward
    bar = tqdm(total=total, initial=start_step, disable=not progress or not dist.is_main(), desc="train", unit="step")
    t_log, tokens_since_log = time.perf_counter(), 0
    skipped = 0  # steps not applied: their gradient was not finite (cfg.skip_nonfinite)
    with stop_on_ctrl_c() as stop_requested:
        while step < total:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = range(first_micro, first_micro + cfg.grad_accum)  # global micro-batch indices
            micro = [get_batch(step_rng(cfg.seed, step, j)).to(device) for j in ids]
            # dropout noise of each micro-batch: reproducible on resume, and the same at any world size
            dropout_seeds = [seed_of(cfg.seed, step, "dropout", j) for j in ids]
            loss, grad_norm = step_fn(model, optimizer, micro, cfg.grad_clip, autocast, dropout_seeds)
            step += 1
            if not bool(torch.isfinite(grad_norm)):  # the step was not applied (mle_step)
                skipped += 1
                if not cfg.skip_nonfinite:
                    raise UserError(nonfinite_message(step, float(grad_norm), run_dir))
            tokens_since_log += sum(b.x.numel() for b in micro) * dist.world_size()

            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                tok_s = tokens_since_log / max(now - t_log, 1e-9)
                # The only host syncs of the loop: between log lines loss and grad_norm stay tensors.
                loss, grad_norm = dist.all_sum(loss).item(), grad_norm.item()
                metrics.log(step, "mle", loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tok_s,
                            **({"skipped_steps": skipped} if skipped else {}))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                t_log, tokens_since_log = now, 0
            bar.update(1)

            if step % cfg.eval_every == 0 or step == total:
                last_eval = validate(policy, val_batches(None if step == total else cfg.eval_tokens), device, autocast)
                if evaluator is not None:
                    last_eval.update(evaluator(policy.model if dist.world_size() == 1 else policy))
                metrics.log(step, "eval", **last_eval)
                if dist.is_main():
                    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in last_eval.items() if isinstance(v, float)))
                model.train()
                t_log = time.perf_counter()  # evaluation time is not training throughput
                if stop_when is not None and dist.any_rank(stop_when(step, last_eval)):  # the same step on every rank
                    total = step  # stop early: this step is now the last one
            stopping = dist.any_rank(stop_requested.is_set())  # every rank stops at the same step
            if step % cfg.ckpt_every == 0 or step == total or stopping:
                checkpoint(step)
            if stopping and step < total:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    return last_eval
