"""Policy-gradient tuning: the loop behind `pglm rl`.

One step, in the order it happens (docs/design.md, code style rule 5):
  prompts → rollout (G samples per prompt, with the sampler's log-probs) → rewards → KL to the
  reference → advantages → epochs × minibatches of (score, loss, backward, clip, step) → log.

Every piece of the objective is a pure function of `pglm.pg`; which pieces, is the preset
(`pglm/pg/presets.py`). Log-probs come from `token_logprobs`, the path maximum likelihood uses too.

Decisions (docs/rl.md):
- The model is in eval mode throughout (no dropout): dropout would make the on-policy ratio differ
  from 1 and the KL noisy (docs/estimators.md §2.8).
- old log-probs are the sampler's own, which equal a rescoring of the same weights (tests/test_sampling.py),
  when the sampler is pglm's (`TorchEngine`). Another engine's differ: old log-probs then come from a
  scoring pass of the trainer, and `cfg.rollout_correction` weights each token by the capped ratio of
  the two (`pglm.pg.correction`); after each update the engine gets the new weights, and a probe says
  when it still samples from the old ones.
- With one update per rollout (and no value head, and a small enough vocabulary) the rollout keeps its
  graph and the loss differentiates the sampler's log-probs: no second forward pass (`fuses_scoring`).
- Each minibatch is one optimizer step; its loss is normalised by the count of the whole minibatch
  over every micro-batch and rank (`minibatch_counts`), never by a piece's own (docs/distributed.md).
- The prompts of a step, and the samples of each group, are functions of (seed, step, global prompt
  index) only (`pglm.engines.seed_uniforms`), so one process and N ranks, one rollout batch or many, draw the same.
- The reward of a response cut at max_new_tokens (no eos) is kept, masked out of the loss, or
  lowered by `truncation_penalty`, per preset or flag.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pglm import dist
from pglm.engines import TorchEngine
from pglm.errors import UserError, check_number
from pglm.models.policy import AdapterOff, Policy
from pglm.pg import advantages as adv_fns
from pglm.pg.correction import MODES as CORRECTION_MODES
from pglm.pg.correction import mismatch_stats, mismatch_weights, stale_weights
from pglm.pg.kl import kl_estimate
from pglm.pg.logprobs import CHUNK_ELEMENTS, head_logprobs
from pglm.pg.losses import aggregate, policy_loss, value_loss
from pglm.pg.presets import Preset, resolve
from pglm.rewards.loader import call_reward
from pglm.rng import numpy_rng, python_rng, torch_rng
from pglm.sampling import completion_text, concat_generations
from pglm.train.checkpoint import save_checkpoint, saved_figures
from pglm.train.metrics import MetricsLog
from pglm.train.mle import check_run_settings, nonfinite_message, stop_on_ctrl_c, warmup_cosine


@dataclass
class RLConfig:
    algo: str = "grpo"  # preset name (pglm.pg.presets.PRESETS)
    steps: int = 200  # optimizer-step rounds (one rollout each)
    prompts_per_step: int = 8  # distinct prompts per rollout
    group_size: int = 8  # samples per prompt (G)
    lr: float | None = None  # None → the preset's default
    warmup_steps: int = 10  # linear warm-up (a fresh Adam on a trained model needs it), then constant or decaying
    min_lr_frac: float = 1.0  # cosine decay after the warm-up to lr × min_lr_frac at the last step; 1: constant
    beta: float = 0.0  # KL coefficient to the frozen initial model; 0 → no reference is loaded
    epochs: int = 1  # passes over each rollout (PPO-style reuse)
    minibatches: int = 1  # optimizer steps per pass
    micro_batch_size: int | None = None  # sequences per forward/backward (gradient accumulation); None: a minibatch
    rollout_batch_size: int | None = None  # sequences generated at once per rank (whole groups); None: all
    temperature: float = 1.0  # sampling temperature; log-probs use the same τ
    max_new_tokens: int | None = None  # None → the task's
    truncation: str | None = None  # keep | mask | penalise; None → the preset's
    truncation_penalty: float = 1.0  # subtracted from the reward of a truncated response ("penalise")
    gamma: float = 1.0  # GAE discount (ppo)
    lam: float = 0.95  # GAE λ (ppo)
    vf_coef: float = 0.5  # value-loss weight (ppo)
    vf_clip: float = 0.2  # value clipping around the old values (ppo)
    adam_eps: float = 1e-5  # Adam ε ("37 implementation details")
    grad_clip: float = 1.0  # global gradient-norm clip
    eval_every: int = 50  # steps between held-out evaluations (tasks)
    eval_samples: int = 8  # samples per held-out prompt for pass@k (0: greedy only)
    eval_limit: int | None = None  # held-out prompts evaluated (None: all)
    ckpt_every: int = 100  # steps between checkpoints (and at the end)
    ckpt_format: str = "full"  # full (gathered, any world size) | sharded (each rank its own shards; docs/distributed.md)
    zero_std_warn_steps: int = 10  # warn when every group had equal rewards this many steps running
    first_step: int = 0  # the step this run starts after (a phase that continues another's numbering)
    seed: int = 0  # seeds prompts, sampling and minibatch order (per step: resume-exact)
    device: str = "auto"  # auto | cpu | cuda
    skip_nonfinite: bool = False  # an optimizer step whose gradient is not finite is skipped (counted), not fatal
    keep_checkpoints: int = 0  # the newest K checkpoints stay, older ones are deleted; 0 keeps every one
    reward_timeout: float = 300.0  # seconds a reward call may take (one rollout chunk's batch); 0: no limit
    reward_norm: bool = False  # rewards ↦ (r − μ)/σ, running over every reward seen (pglm.pg.advantages.RunningMoments)
    reward_clip: float = 0.0  # rewards (after normalising) clipped to [−C, C]; 0: off
    rollout_engine: str = "torch"  # what samples the rollouts: torch (pglm's sampler) | vllm (pglm.engines_vllm)
    rollout_correction: str = "token_tis"  # with an engine other than pglm's: none | token_tis | seq_mask
    rollout_correction_cap: float = 3.0  # C of min(π_train/π_engine, C) (TRL's vllm_importance_sampling_cap)


class ValueHead(torch.nn.Module):
    """V(prefix) = w·h + b on the policy's final hidden state (PPO). Zero-initialised: V starts at 0."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T)
        return self.proj(h).squeeze(-1)


@dataclass
class Rollout:
    """One batch of B = prompts × G responses. P = padded prompt width, N = response width."""

    tokens: torch.Tensor  # (B, P + N) left-padded prompt, then response
    n_pad: torch.Tensor  # (B,)
    prompt_len: int  # P
    mask: torch.Tensor  # (B, N) bool: response tokens up to and including eos
    old_logp: torch.Tensor  # (B, N) the trainer's log-probs at temperature τ (detached): the sampler's, or a scoring pass
    rewards: torch.Tensor  # (B,) the reward functions' values
    finished: torch.Tensor  # (B,) bool: ended with eos (else truncated)
    prompts: list[str]  # (B) each prompt G times
    completions: list[str]  # (B)
    logp: torch.Tensor | None = None  # (B, N) the same log-probs with their graph (fused rollouts only)
    entropy: torch.Tensor | None = None  # (B, N) entropy of each sampled position's distribution (fused only)
    engine_logp: torch.Tensor | None = None  # (B, N) an inexact engine's own log-probs of its samples


FUSE_MAX_TOKENS = 6  # longest response a rollout keeps its graph for (measured crossover ≈ 8; see below)


def fuses_scoring(preset: Preset, cfg: RLConfig, value_head, batch_size: int, max_new_tokens: int, vocab: int) -> bool:
    """Whether the rollout may keep its graph, so its log-probs are the ones the loss differentiates.

    With one update per rollout (one epoch, one minibatch) the policy that is updated is the one that
    sampled, so re-scoring the batch would recompute exactly the sampler's log-probs (tests check the two
    agree): the gradient can flow through sampling instead, and the separate scoring forward goes. The
    minimal add2 loop measured in docs/design.md does the same (its log-probs and gradients matched a
    scoring pass to 3e-6). Not with a value head (PPO needs the hidden states of a scoring pass), nor where
    the kept graph would hold more full-vocabulary logits than `head_logprobs` allows (large vocabularies),
    nor for long responses: backward through N one-token decode steps is many small ops, and past a few
    tokens one scoring pass over the whole batch is cheaper. Measured on the 2-core CPU, GPT-2 4×128,
    64 completions: 40 vs 55 ms per step fused vs scored at 4 new tokens, 86 vs 82 at 8, 149 vs 101 at 16.
    """
    return (cfg.epochs == 1 and cfg.minibatches == 1 and value_head is None and max_new_tokens <= FUSE_MAX_TOKENS
            and batch_size * max_new_tokens * vocab <= CHUNK_ELEMENTS)


def score(model, value_head, tokens, n_pad, prompt_len: int, temperature: float):
    """(log-probs (B, N), final hidden states (B, N, C), values (B, N) or None) of the response tokens.

    Only the N positions that predict response tokens go through lm_head, and those in chunks
    (`head_logprobs`): no full-vocabulary logits for the prompt, and a bounded amount for the response.
    Position P − 1 + t predicts response token t; its hidden state is also the state the value head
    reads for V_t.
    """
    h = model.features(tokens, n_pad)[:, prompt_len - 1 : -1]  # (B, N, C)
    logp = head_logprobs(h, model.lm_head, tokens[:, prompt_len:], temperature)  # (B, N)
    values = value_head(h) if value_head is not None else None
    return logp, h, values


def collect_rollout(model, tokenizer, rows: list[dict], reward_fn, cfg: RLConfig, max_new_tokens: int,
                    step: int, first_prompt: int = 0, fused: bool = False, all_finished=None, engine=None) -> Rollout:
    """Sample G responses per prompt with `engine` (None: pglm's sampler on `model`) and score them with the reward.

    `rows` are this rank's prompts of the step, the first being the step's prompt number `first_prompt`;
    they are sampled cfg.rollout_batch_size sequences (whole groups) at a time. `fused` keeps the graph
    of the sampled log-probs (see `fuses_scoring`). A reward that fails on any rank fails on all. With
    an engine that is not exact, old_logp is left for the caller's scoring pass (`engine_logp` holds
    the engine's).
    """
    engine = engine or TorchEngine(model, tokenizer.eos_id, tokenizer.pad_id, all_finished)
    G = cfg.group_size
    per_chunk = len(rows) if cfg.rollout_batch_size is None else max(1, cfg.rollout_batch_size // G)  # prompts
    gens, completions = [], []
    for c in range(0, len(rows), per_chunk):
        chunk = [tokenizer.prompt_ids(r["prompt"]) for r in rows[c : c + per_chunk]]
        seeds = [(cfg.seed, step, first_prompt + c + i) for i in range(len(chunk))]
        g = engine.generate(chunk, G, max_new_tokens, cfg.temperature, seeds,
                            **(dict(grad=fused, with_entropy=fused) if engine.exact else {}))
        gens.append(g)
        completions += [completion_text(tokenizer, response) for response in g.all_response_ids()]
    g = concat_generations(gens, tokenizer.pad_id)
    prompts_rep = [r["prompt"] for r in rows for _ in range(G)]
    keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")  # every field any row has, in order
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}
    # response length in tokens, eos not counted (builtin length_penalty(tokens=True) reads it)
    columns["completion_lengths"] = (g.response_mask.sum(1) - g.finished.long()).tolist()
    rewards = None
    with dist.agreed_errors():
        rewards = call_reward(reward_fn, prompts_rep, completions, columns, timeout=cfg.reward_timeout)
    device = g.tokens.device
    return Rollout(g.tokens, g.n_pad, g.prompt_len, g.response_mask, g.logprobs.detach(),
                   torch.tensor(rewards, dtype=torch.float64, device=device).to(g.logprobs.dtype), g.finished,
                   prompts_rep, completions, logp=g.logprobs if fused else None, entropy=g.entropy,
                   engine_logp=None if engine.exact else g.logprobs.detach())


def scale_rewards(rewards: torch.Tensor, stats: adv_fns.RunningMoments | None, clip: float):
    """(rewards (B,) normalised by the running moments, when given, then clipped to [−clip, clip] when
    clip > 0; how many were clipped, a 0-d tensor). The moments take in the whole step's rewards, all
    ranks, before they normalise them, as OpenRLHF's `normalize_reward` does."""
    if stats is not None:
        stats.update(rewards, reduce=dist.all_sum)
        rewards = stats.normalize(rewards)
    n_clipped = torch.zeros((), device=rewards.device)
    if clip > 0:
        n_clipped = (rewards.abs() > clip).sum()
        rewards = rewards.clamp(-clip, clip)
    return rewards, n_clipped


def shape_rewards(rewards: torch.Tensor, finished: torch.Tensor, mask: torch.Tensor, G: int, truncation: str,
                  penalty: float, drop_zero_std: bool):
    """Rewards and loss mask after the treatment of truncated responses and equal-reward groups.

    rewards (B,), finished (B,) bool, mask (B, N) bool -> (rewards (B,), loss_mask (B, N), zero_std (B/G,)).
    "penalise" lowers a truncated response's reward by `penalty`; "mask" keeps it out of the loss
    (DAPO's overlong filtering, TRL's mask_truncated_completions); `drop_zero_std` keeps the groups whose
    rewards are all equal out of the loss (DAPO's dynamic sampling, as a filter of this batch).
    """
    B = rewards.shape[0]
    loss_mask = mask.clone()
    if truncation == "penalise":
        rewards = rewards - penalty * (~finished).to(rewards.dtype)
    elif truncation == "mask":
        loss_mask &= finished[:, None]
    zero_std = rewards.view(-1, G).std(dim=1) == 0 if G > 1 else torch.zeros(B // G, dtype=torch.bool,
                                                                            device=rewards.device)
    if drop_zero_std:
        loss_mask &= ~zero_std.repeat_interleave(G)[:, None]
    return rewards, loss_mask, zero_std


def micro_batches(n_rows: int, size: int | None) -> list[torch.Tensor]:
    """Row indices 0 … n_rows − 1 in consecutive pieces of at most `size` (None: one piece)."""
    size = n_rows if size is None else size
    return list(torch.arange(n_rows).split(max(1, size))) if n_rows else []


@torch.no_grad()
def score_rows(scorer, ro: Rollout, cfg: RLConfig, with_values: bool = False) -> torch.Tensor:
    """Log-probs (or values) of every response of `ro` under `scorer`, without gradient, in micro-batches.

    `scorer` is a Policy (possibly wrapped), or `AdapterOff` of one (LoRA's reference)."""
    out = []
    for idx in micro_batches(ro.tokens.size(0), cfg.micro_batch_size):
        idx = idx.to(ro.tokens.device)
        logp, values, _ = _scored(scorer, ro, idx, cfg.temperature)
        out.append(values if with_values else logp)
    return torch.cat(out)


def _scored(scorer, ro: Rollout, idx: torch.Tensor, temperature: float, with_entropy: bool = False):
    """(logp, values, entropy) of rows `idx` of a rollout, through the wrapper's forward."""
    tokens, P = ro.tokens[idx], ro.prompt_len
    return scorer(tokens, tokens[:, P:], ro.n_pad[idx], start=P - 1, temperature=temperature,
                  with_entropy=with_entropy)


def compute_advantages(p: Preset, rewards, G: int, baseline: adv_fns.MovingBaseline | None):
    """Sequence-level advantages (B,) for every estimator but GAE."""
    if p.estimator.state:  # the moving baseline moves by the mean reward of the whole step, all ranks
        total = dist.all_sum(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), dtype=rewards.dtype,
                                                                         device=rewards.device)]))
        return baseline.advantages(rewards, batch_mean=float(total[0] / total[1]))
    if p.estimator.fn is None:
        raise ValueError(f"no sequence-level advantage for {p.advantage!r}")
    return p.estimator.fn(rewards, G)


def check_shapes(p: Preset, cfg: RLConfig) -> None:
    """Explain, before any work starts, the batch shapes that cannot work."""
    B = cfg.prompts_per_step * cfg.group_size
    if cfg.prompts_per_step < 1 or cfg.group_size < 1 or cfg.steps < 1:
        raise UserError("--steps, --prompts-per-step and --group-size must be positive")
    if p.estimator.groups and cfg.group_size < 2:
        raise UserError(f"{p.name} compares the samples of a prompt with each other, so it needs --group-size 2 or more")
    if cfg.epochs < 1 or cfg.minibatches < 1:
        raise UserError("--epochs and --minibatches must be at least 1")
    if B % cfg.minibatches:
        fits = [m for m in range(1, B + 1) if B % m == 0 and m <= 16]
        raise UserError(
            f"{cfg.prompts_per_step} prompts × {cfg.group_size} samples = {B} completions do not split into "
            f"{cfg.minibatches} equal minibatches; use --minibatches {', '.join(map(str, fits))}, or change "
            "--prompts-per-step or --group-size"
        )
    W = dist.world_size()
    if cfg.prompts_per_step % W:
        fits = [p for p in range(W, 4 * W + 1, W)]
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} does not split over {W} processes (a group of "
                        f"samples never spans processes); use a multiple of {W}, e.g. {', '.join(map(str, fits))}")
    if cfg.micro_batch_size is not None and (cfg.micro_batch_size < 1 or (B // cfg.minibatches) % cfg.micro_batch_size):
        mb = B // cfg.minibatches
        fits = [m for m in range(1, mb + 1) if mb % m == 0]
        raise UserError(f"--micro-batch-size {cfg.micro_batch_size} does not divide a minibatch of {mb} completions; "
                        f"use one of {', '.join(map(str, fits[:12]))}")
    if cfg.rollout_batch_size is not None and (cfg.rollout_batch_size < cfg.group_size
                                               or cfg.rollout_batch_size % cfg.group_size):
        raise UserError(f"--rollout-batch-size {cfg.rollout_batch_size} must be a multiple of --group-size "
                        f"{cfg.group_size}: a group is generated together")
    resolve(p, cfg.truncation, cfg.lr)  # the flags that override the preset are valid
    if cfg.rollout_engine not in ("torch", "vllm"):
        raise UserError(f"--rollout-engine must be torch or vllm, not '{cfg.rollout_engine}'")
    if cfg.rollout_correction not in CORRECTION_MODES:
        raise UserError(f"--rollout-correction must be {', '.join(CORRECTION_MODES)}, not '{cfg.rollout_correction}'")
    check_number("--rollout-correction-cap", cfg.rollout_correction_cap, 1, low_open=True, example="3")
    check_number("--temperature", cfg.temperature, 0, 100, low_open=True, example="1.0")
    for name in ("eval_every", "ckpt_every", "warmup_steps"):
        check_number(f"--{name.replace('_', '-')}", getattr(cfg, name), 1, integer=True)
    if cfg.max_new_tokens is not None:
        check_number("--max-new-tokens", cfg.max_new_tokens, 1, integer=True, example="256")
    check_number("--eval-samples", cfg.eval_samples, 0, integer=True)
    if cfg.eval_limit is not None:
        check_number("--eval-limit", cfg.eval_limit, 1, integer=True)
    if cfg.lr is not None:
        check_number("--lr", cfg.lr, 0, 1, low_open=True, example="1e-5")
    check_number("--min-lr-frac", cfg.min_lr_frac, 0, 1, example="0.1 (1: constant)")
    check_number("--reward-clip", cfg.reward_clip, 0, example="5 (0: off)")
    check_number("--beta", cfg.beta, 0, example="0.04 (0: no KL)")
    check_number("the gradient clip", cfg.grad_clip, 0, low_open=True)
    check_number("--truncation-penalty", cfg.truncation_penalty)
    for name, value in (("gamma", cfg.gamma), ("lam", cfg.lam)):
        check_number(f"--{name}", value, 0, 1)
    check_number("--vf-coef", cfg.vf_coef, 0)
    check_number("--vf-clip", cfg.vf_clip, 0, low_open=True)
    check_number("adam_eps", cfg.adam_eps, 0, low_open=True)
    check_number("--reward-timeout", cfg.reward_timeout, 0, example="300 (0: no limit)")
    check_run_settings(cfg)


def train_rl(
    model,
    tokenizer,
    preset: Preset,
    cfg: RLConfig,
    draw_rows: Callable[[int], list[dict]],
    reward_fn,
    evaluator: Callable[[torch.nn.Module], dict] | None,
    max_new_tokens: int,
    run_dir,
    optimizer,
    value_head=None,
    ref_model=None,
    baseline: adv_fns.MovingBaseline | None = None,
    start_step: int = 0,
    metrics: MetricsLog | None = None,
    progress: bool = True,
    reward_stats: adv_fns.RunningMoments | None = None,
    engine=None,
) -> dict:
    """Tune `model` from `start_step` to `cfg.steps`; returns the last evaluation, or {} without one.

    `model` is a bare language model (with `value_head` beside it for PPO), or, with several processes,
    the Policy holding both as `pglm.dist.wrap` wrapped it (the optimizer made after). draw_rows(step)
    gives every prompt row of a step (the same on every rank; rank r takes its slice); evaluator(model)
    the held-out figures (e.g. `evaluate_task`), asked at step 0 of a new run, every cfg.eval_every
    steps and at the end. Ctrl-C finishes the step, checkpoints and raises. `ref_model` is the frozen
    model of the KL (a copy of the initial one; under FSDP2 a Policy of it, wrapped); a LoRA model
    needs none: its reference is itself with the adapter switched off. `reward_stats` are the running
    moments of `cfg.reward_norm` (a resumed run's; new ones otherwise). `engine` samples the rollouts
    (`pglm.engines`; None: pglm's own sampler on the model).
    """
    check_shapes(preset, cfg)
    if start_step >= cfg.steps:  # resumed with no step left: stopped after its last checkpoint
        return saved_figures(run_dir)
    recipe = resolve(preset, cfg.truncation, cfg.lr)  # the effective recipe: the preset as the flags change it
    wrapped = model if isinstance(dist.unwrap(model), Policy) else Policy(model, value_head)
    policy = dist.unwrap(wrapped)
    if ref_model is None and cfg.beta > 0:  # LoRA's reference is this policy with its adapter off
        if not getattr(policy.model, "is_lora", False):
            raise ValueError("beta > 0 needs ref_model, the frozen model the KL is measured against")
        ref_model = AdapterOff(wrapped)
    elif ref_model is not None and not isinstance(dist.unwrap(ref_model), Policy):
        ref_model = Policy(ref_model)  # scored by the same forward as the policy
    value_head = policy.value_head
    if cfg.reward_norm and reward_stats is None:
        reward_stats = adv_fns.RunningMoments()
    device = next(policy.parameters()).device
    metrics = metrics or MetricsLog(run_dir)
    W, G, N = dist.world_size(), cfg.group_size, max_new_tokens
    P_local = cfg.prompts_per_step // W  # prompts of this rank; a group never spans ranks
    B, B_local = cfg.prompts_per_step * G, P_local * G  # completions of the step, of this rank
    first_row = dist.rank() * B_local  # this rank's first row in the step's global order
    # Only group-relative advantages are all zero when a group's rewards are equal.
    group_relative = recipe.estimator.groups and G > 1
    all_finished = dist.all_ranks if dist.sharded(wrapped) else None  # FSDP2: decode in step on every rank
    evaluated = policy.model if W == 1 else policy  # under FSDP2 generation goes through the Policy
    engine = engine or TorchEngine(evaluated, tokenizer.eos_id, tokenizer.pad_id, all_finished)
    if not engine.exact:  # it starts from the weights trained (rank 0's after the wrap, a resume's checkpoint)
        engine.sync_weights(dist.full_parameters(policy.model))
    fused = engine.exact and W == 1 and cfg.rollout_batch_size in (None, B) and cfg.micro_batch_size in (None, B) \
        and fuses_scoring(recipe, cfg, value_head, B, N, policy.model.lm_head.weight.shape[0])
    wrapped.eval()  # no dropout anywhere in RL (module docstring)
    params = [q for g in optimizer.param_groups for q in g["params"]]  # what the gradient-norm clip covers
    last_eval: dict = {}
    zero_std_streak = 0
    collapse = CollapseWatch()
    stale_said = False
    say = (lambda text: bar.write(text)) if dist.is_main() else (lambda text: None)

    def checkpoint(at: int):
        state = {"elapsed": metrics.elapsed(), **last_eval}
        if baseline is not None:
            state["baseline"] = baseline.state_dict()
        if cfg.reward_norm:
            state["reward_stats"] = reward_stats.state_dict()
        save_checkpoint(run_dir, at, wrapped, optimizer, state, sharded=cfg.ckpt_format == "sharded",
                        keep=cfg.keep_checkpoints)

    def evaluate(at: int):
        nonlocal last_eval
        if evaluator is None:
            return
        last_eval = evaluator(evaluated)
        metrics.log(at, "eval", **last_eval)
        say(f"step {at}: " + "  ".join(f"{k} {v:.3f}" for k, v in last_eval.items() if k != "n_prompts"))

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress or not dist.is_main(), desc=recipe.name,
               unit="step")
    if start_step == cfg.first_step:
        evaluate(start_step)
    step = start_step
    with stop_on_ctrl_c() as stop_requested:
        while step < cfg.steps:
            t0 = time.perf_counter()
            # 1. Rollout: G samples for each of this rank's prompts, with the sampler's log-probs.
            rows = draw_rows(step)[dist.rank() * P_local : (dist.rank() + 1) * P_local]
            ro = collect_rollout(evaluated, tokenizer, rows, reward_fn, cfg, N, step,
                                 first_prompt=dist.rank() * P_local, fused=fused, all_finished=all_finished,
                                 engine=engine)
            rollout_s = time.perf_counter() - t0
            engine.sleep()  # an engine with memory of its own frees it for training, until the sync wakes it
            is_weights, mismatch = None, {}
            if ro.engine_logp is not None:  # another engine sampled: the trainer scores, the ratio corrects
                ro.old_logp = score_rows(wrapped, ro, cfg)
                is_weights, mm_sums, mm_max = mismatch_weights(ro.old_logp, ro.engine_logp, ro.mask,
                                                               cfg.rollout_correction, cfg.rollout_correction_cap)
                mismatch = step_mismatch(mm_sums, mm_max)
            scaled, n_clipped = scale_rewards(ro.rewards, reward_stats if cfg.reward_norm else None, cfg.reward_clip)
            rewards, loss_mask, zero_std = shape_rewards(scaled, ro.finished, ro.mask, G, recipe.truncation,
                                                         cfg.truncation_penalty, recipe.drop_zero_std_groups)

            # 2. KL to the reference, in the reward (k1 of the sampler's log-probs) or later in the loss.
            ref_logp = None
            kl_tok = torch.zeros_like(ro.old_logp)
            if ref_model is not None:
                ref_logp = score_rows(ref_model, ro, cfg)
                kl_tok = kl_estimate(ro.old_logp, ref_logp, "k1") * ro.mask  # k1 per token (B, N)
            kl_in_reward = cfg.beta > 0 and recipe.kl_placement == "reward"

            # 3. Advantages; every statistic over the batch is over the whole step, all ranks.
            old_values = returns = None
            with torch.no_grad():
                if recipe.estimator.values:
                    old_values = score_rows(wrapped, ro, cfg, with_values=True)  # (B, N)
                    last = ro.mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last valid token
                    tok_rewards = -cfg.beta * kl_tok if kl_in_reward else torch.zeros_like(kl_tok)
                    tok_rewards[torch.arange(B_local, device=device), last] += rewards  # reward on the last token (§2.13)
                    advantages, returns = adv_fns.gae(tok_rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
                    if recipe.whiten:
                        any_kept = dist.all_sum(loss_mask.sum()) > 0
                        advantages = adv_fns.whiten(advantages, loss_mask if any_kept else ro.mask, reduce=dist.all_sum)
                else:
                    seq_rewards = rewards - cfg.beta * kl_tok.sum(1) if kl_in_reward else rewards
                    advantages = compute_advantages(recipe, seq_rewards, G, baseline)  # (B,)

            # 4. Epochs × minibatches (one optimizer step each) × micro-batches (one backward each).
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step - cfg.first_step, cfg.steps - cfg.first_step, recipe.lr,
                                            cfg.warmup_steps, cfg.min_lr_frac)
            probe_before = None if engine.exact else probe_logp(wrapped, ro)  # the stale-weights probe, before
            try:
                sums = update(wrapped, optimizer, params, ro, advantages, loss_mask, ref_logp, old_values, returns,
                              recipe, cfg, step, N, B, first_row, fused, is_weights)
            except NonFiniteGradient as e:
                raise UserError(nonfinite_message(step + 1, e.grad_norm, run_dir)) from None
            step += 1
            if not engine.exact:  # the new weights into the engine, and a probe that they arrived
                t_sync = time.perf_counter()
                mismatch["stale_weights"] = dist.any_rank(sync_and_probe(engine, wrapped, ro, probe_before))
                mismatch["sync_s"] = time.perf_counter() - t_sync
                if mismatch["stale_weights"] and not stale_said:
                    stale_said = True
                    say(f"warning: after the weight sync of step {step} the engine's log-probs are not those of the "
                        "updated weights (nearer the weights before the update): it is sampling from stale weights "
                        "(trl#5312). Check that the engine's weight loading reached every layer (and reset its "
                        "prefix cache).")

            # 5. Log: every figure is over the whole step (all ranks), summed in one collective.
            local = torch.stack([
                ro.rewards.sum(), (ro.rewards ** 2).sum(), ro.mask.sum(), zero_std.sum(), (~ro.finished).sum(),
                kl_tok.sum(), n_clipped,
            ]).to(torch.float64)
            totals = dist.all_sum(torch.cat([local, sums]))
            (r_sum, r_sq, n_tok, n_zero, n_trunc, kl_sum, n_clip), sums = totals[: len(local)].tolist(), totals[len(local) :]
            n_updates = round(float(sums[UPDATES]) / W)
            # A step with nothing to learn from (every token masked) logs its loss statistics as null.
            row = dict.fromkeys(("loss", "grad_norm", "entropy", "clip_frac", "approx_kl"), float("nan"))
            if n_updates:
                tokens = max(float(sums[TOKENS]), 1.0)
                row.update(loss=float(sums[LOSS]) / n_updates, grad_norm=float(sums[GRAD_NORM]) / n_updates / W,
                           **{k: float(sums[i]) / tokens for i, k in enumerate(TOKEN_STATS) if value_head or k in PG_STATS})
            mean = r_sum / B
            row.update(
                reward_mean=mean, reward_std=((r_sq - B * mean**2) / (B - 1)) ** 0.5 if B > 1 and r_sq > B * mean**2 else 0.0,
                response_len=n_tok / B, frac_zero_std_groups=n_zero / (B // G), frac_truncated=n_trunc / B,
                samples_per_s=B / (time.perf_counter() - t0), rollout_s=rollout_s, lr=optimizer.param_groups[0]["lr"],
                updates=n_updates,
            )
            if cfg.reward_norm:  # reward_mean stays the reward's own; these are what it was scaled by
                row.update(reward_norm_mean=reward_stats.mean, reward_norm_std=reward_stats.std)
            if cfg.reward_clip > 0:
                row["reward_clip_frac"] = n_clip / B
            if sums[SKIPPED] > 0:
                row["skipped_updates"] = round(float(sums[SKIPPED]) / W)
            if value_head is not None:
                row["explained_variance"] = explained_variance(old_values, returns, ro.mask)
            row.update(mismatch)
            if ref_model is not None:
                row["kl"] = kl_sum / B  # E[Σ_t k1] = KL(π‖ref) per sequence
            metrics.log(step, "rl", **row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", samples_s=f"{row['samples_per_s']:.0f}")
            bar.update(1)
            frac_zero = n_zero / (B // G)
            zero_std_streak = zero_std_streak + 1 if group_relative and frac_zero == 1.0 else 0
            for warning in collapse.update(row["reward_mean"], row["response_len"]):
                say(warning)
            if zero_std_streak == cfg.zero_std_warn_steps:
                say(f"warning: for {zero_std_streak} steps every group of {G} samples got equal rewards, so every "
                    "advantage is 0 and the policy does not move (the 'loss is 0' of trl#2703). Raise --group-size "
                    "or --temperature, or check that the reward can tell the samples apart.")

            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step)
            stopping = dist.any_rank(stop_requested.is_set())  # every rank stops at the same step
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                checkpoint(step)
            if stopping and step < cfg.steps:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    return last_eval


class CollapseWatch:
    """Says, once each, when the policy collapses: the mean response length falls to almost nothing
    (every answer an immediate end-of-sequence), or the mean reward falls to under half of where the
    run started. Means over windows of `window` steps: the first of this run against the latest."""

    def __init__(self, window: int = 10):
        self.window = window
        self.first: list[tuple[float, float]] = []
        self.latest: list[tuple[float, float]] = []
        self.said: set[str] = set()

    def update(self, reward_mean: float, response_len: float) -> list[str]:
        (self.first if len(self.first) < self.window else self.latest).append((reward_mean, response_len))
        self.latest = self.latest[-self.window :]
        if len(self.latest) < self.window:
            return []
        r0, n0 = (sum(x) / self.window for x in zip(*self.first))
        r1, n1 = (sum(x) / self.window for x in zip(*self.latest))
        out = []
        if "length" not in self.said and n1 < 2 and n1 < n0 / 2:
            self.said.add("length")
            out.append(f"warning: the mean response length fell from {n0:.1f} to {n1:.1f} tokens: the policy is "
                       "collapsing to (almost) empty answers. Lower --lr (÷4), add --beta 0.04 to hold it near its "
                       "start, or start from a model that earns more reward")
        if "reward" not in self.said and r0 > 0 and r1 < r0 / 2:
            self.said.add("reward")
            out.append(f"warning: the mean reward fell from {r0:.3g} (first {self.window} steps) to {r1:.3g} (last "
                       f"{self.window}): the updates make the policy worse. Lower --lr (÷4), add --beta 0.04, or "
                       "check that the reward scores what you mean")
        return out


# The sums `update` returns, in this order: token-weighted statistics, then the rest.
PG_STATS = ("entropy", "clip_frac", "approx_kl", "ratio_mean")
TOKEN_STATS = (*PG_STATS, "value_loss", "vf_clip_frac")
TOKENS, LOSS, GRAD_NORM, UPDATES, SKIPPED = range(len(TOKEN_STATS), len(TOKEN_STATS) + 5)


def update(wrapped, optimizer, params, ro: Rollout, advantages, loss_mask, ref_logp, old_values, returns,
           preset: Preset, cfg: RLConfig, step: int, N: int, B: int, first_row: int, fused: bool,
           is_weights: torch.Tensor | None = None) -> torch.Tensor:
    """cfg.epochs passes over the step's B completions, each split into cfg.minibatches optimizer steps.

    A minibatch is a set of the step's global rows (a permutation drawn from (seed, step, epoch)); this
    rank scores its own rows of it, cfg.micro_batch_size at a time, and every loss is normalised by the
    count of the WHOLE minibatch over all ranks (tokens for token-mean, sequences otherwise), so the
    gradient is that of one process holding the whole minibatch. Every rank runs as many micro-batches
    (a rank with fewer rows runs empty ones, weight 0: under FSDP2 every forward is a collective, and
    under DDP every rank must join the all-reduce), and a minibatch with no token to learn from is
    skipped on every rank, as is (with cfg.skip_nonfinite; else NonFiniteGradient) one whose gradient is
    not finite. Returns this rank's sums (TOKEN_STATS …, TOKENS, LOSS, GRAD_NORM, UPDATES, SKIPPED),
    to be summed over ranks. `is_weights` (B_local, N) multiply each token's policy loss (the engine
    correction; None: 1).
    """
    W = dist.world_size()
    B_local = ro.tokens.size(0)
    device = ro.tokens.device
    sums = torch.zeros(SKIPPED + 1, dtype=torch.float64, device=device)
    for epoch in range(cfg.epochs):
        order = torch.randperm(B, generator=torch_rng(cfg.seed, step, "minibatch", epoch)) if cfg.minibatches > 1 \
            else torch.arange(B)
        mbs = [mb[(mb >= first_row) & (mb < first_row + B_local)] - first_row for mb in order.chunk(cfg.minibatches)]
        mbs = [mb.to(device) for mb in mbs]  # this rank's rows of each minibatch
        size = cfg.micro_batch_size or B
        n_tokens, n_seqs, n_micro = minibatch_counts(loss_mask, mbs, size)
        for mb, n_tok, n_seq, n_mi in zip(mbs, n_tokens.tolist(), n_seqs.tolist(), n_micro.tolist()):
            if n_tok == 0:
                continue  # nothing to learn from (all masked) on any rank: Adam must not move on zero gradients
            normalizer = n_tok if preset.agg == "token-mean" else n_seq
            optimizer.zero_grad(set_to_none=True)
            piece = torch.zeros_like(sums)  # this minibatch's sums, kept only if its step is applied
            for i in range(n_mi):
                idx = mb[i * size : (i + 1) * size]
                weight = 1.0 if len(idx) else 0.0
                if not len(idx):  # an empty micro-batch: any row, weight 0, so that the collectives match
                    idx = torch.zeros(1, dtype=torch.long, device=device)
                m = loss_mask[idx]
                with dist.grad_sync(wrapped, i == n_mi - 1):
                    if fused:  # the sampler's own log-probs, graph and all (one update: idx is every row)
                        logp, values, entropy = ro.logp, None, ro.entropy
                    else:
                        logp, values, entropy = _scored(wrapped, ro, idx, cfg.temperature, with_entropy=True)
                    loss, stats = policy_loss(logp, ro.old_logp[idx], advantages[idx], m,
                                              clip_low=preset.clip_low, clip_high=preset.clip_high,
                                              level=preset.level, agg=preset.agg, normalizer=normalizer, l_max=N,
                                              weights=None if is_weights is None else is_weights[idx])
                    if cfg.beta > 0 and preset.kl_placement == "loss":
                        kl_loss = aggregate(kl_estimate(logp, ref_logp[idx], "k3"), m, preset.agg, normalizer, l_max=N)
                        loss = loss + cfg.beta * kl_loss
                    if values is not None:
                        vl, vstats = value_loss(values, old_values[idx], returns[idx], m, clip=cfg.vf_clip,
                                                normalizer=n_tok)
                        loss = loss + cfg.vf_coef * vl
                        stats.update(vstats, value_loss=vl.detach() * n_tok / m.sum().clamp(min=1))  # this piece's mean
                    # DDP and FSDP2 average gradients over ranks: W × this rank's share gives the sum.
                    (loss * (weight * W) if W > 1 or weight != 1.0 else loss).backward()
                stats["entropy"] = aggregate(entropy, m, "token-mean")  # of the policy before the step
                k = weight * float(m.sum())
                for j, name in enumerate(TOKEN_STATS):
                    if name in stats:
                        piece[j] += float(stats[name]) * k
                piece[TOKENS] += k
                piece[LOSS] += weight * float(loss.detach())
            grad_norm = float(dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            if not math.isfinite(grad_norm):  # the same on every rank: every rank skips, or stops, alike
                optimizer.zero_grad(set_to_none=True)  # this minibatch reaches neither the weights nor Adam
                if not cfg.skip_nonfinite:
                    raise NonFiniteGradient(grad_norm)
                sums[SKIPPED] += 1
                continue
            optimizer.step()
            sums += piece
            sums[GRAD_NORM] += grad_norm  # the same on every rank: summed over W, divided by W when logged
            sums[UPDATES] += 1  # summed over ranks: W per update
    return sums


def step_mismatch(sums: torch.Tensor, maxima: torch.Tensor) -> dict:
    """The engine/trainer mismatch figures of the whole step: every rank's totals summed, maxima maxed."""
    return mismatch_stats(dist.all_sum(sums), dist.all_max_tensor(maxima))


def probe_logp(wrapped, ro: Rollout) -> torch.Tensor:
    """The trainer's log-probs of the rollout's first response at temperature 1 (its valid tokens): the
    stale-weights probe. At τ = 1, because an engine's log-probs of given tokens (vLLM's prompt
    log-probs) are of the untempered distribution."""
    idx = torch.zeros(1, dtype=torch.long, device=ro.tokens.device)
    with torch.no_grad():
        return _scored(wrapped, ro, idx, 1.0)[0][ro.mask[:1]]


def sync_and_probe(engine, wrapped, ro: Rollout, before: torch.Tensor) -> bool:
    """Give the engine the updated weights; True when a probe says it still has the old ones.

    The probe is the rollout's first response: the trainer scored it before the update (`before`,
    `probe_logp`), scores it again after, and the engine scores it after the sync
    (`pglm.pg.correction.stale_weights`)."""
    policy = dist.unwrap(wrapped)
    engine.wake()
    engine.sync_weights(dist.full_parameters(policy.model))  # FSDP2: gathered one at a time
    m = ro.mask[:1]
    after = probe_logp(wrapped, ro)
    probe = engine.logprobs(ro.tokens[:1], ro.n_pad[:1], ro.prompt_len, 1.0)[m]
    # below the engine's own noise nothing can be told apart: twice the mismatch of this very response,
    # and at least float32's (a synced vLLM on the CPU: 5e-7 to 1e-6, docs/vllm.md)
    noise = float((ro.old_logp[:1] - ro.engine_logp[:1])[m].abs().mean())
    return stale_weights(probe, before, after, tol=max(2 * noise, 1e-5))


class NonFiniteGradient(Exception):
    """An optimizer step not applied because its gradient was not finite (train_rl says so to the user)."""

    def __init__(self, grad_norm: float):
        super().__init__(grad_norm)
        self.grad_norm = grad_norm


def minibatch_counts(loss_mask: torch.Tensor, mbs: list[torch.Tensor], size: int):
    """(tokens to learn from (M,), sequences (M,), micro-batches every rank runs (M,)) of each
    minibatch, over all ranks.

    Tokens and sequences are the loss normalisers (token-mean, resp. the seq-mean aggregations), the
    tokens also the "skip" decision; the micro-batches are the most that any rank needs for its rows
    of the minibatch, `size` rows each, so that every rank runs as many."""
    local = [loss_mask[mb].sum().double() for mb in mbs] + [torch.tensor(float(len(mb)), dtype=torch.float64,
                                                                          device=loss_mask.device) for mb in mbs]
    n_tokens, n_seqs = dist.all_sum(torch.stack(local)).chunk(2)
    n_micro = dist.all_max_tensor(torch.tensor([-(-len(mb) // size) for mb in mbs], device=loss_mask.device))
    return n_tokens, n_seqs, n_micro


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the valid tokens of the whole step (all ranks), the value head's
    fit before the update (cleanrl logs the same of its rollout values)."""
    m = mask.to(torch.float64)
    r, e = returns.double() * m, (returns - values).double() * m
    n, sr, sr2, se, se2 = dist.all_sum(torch.stack([m.sum(), r.sum(), (r**2).sum(), e.sum(), (e**2).sum()])).tolist()
    if n == 0:
        return float("nan")
    var_r, var_e = sr2 / n - (sr / n) ** 2, se2 / n - (se / n) ** 2
    return 1 - var_e / var_r if var_r > 0 else float("nan")


def make_rl_optimizer(model, value_head, lr: float, cfg: RLConfig) -> torch.optim.Adam:
    """Adam without weight decay (decay would pull a trained model back toward 0 for no reason), ε 1e-5."""
    params, seen = [], set()  # model: a language model (value_head beside it) or a Policy holding both
    for q in list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else []):
        if q.requires_grad and id(q) not in seen:  # with LoRA only the adapter trains
            seen.add(id(q))
            params.append(q)
    # fused: one kernel for every tensor (the per-parameter loop cost ~6 ms of a ~40 ms add2 step on CPU)
    return torch.optim.Adam(params, lr=lr, eps=cfg.adam_eps, fused=all(q.device.type in ("cpu", "cuda") for q in params))


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for q in ref.parameters():
        q.requires_grad_(False)
    return ref


def task_rows(task, seed: int, prompts_per_step: int) -> Callable[[int], list[dict]]:
    """The prompts of step s: a pure function of (seed, s), so a resumed run draws the same ones."""
    return lambda step: task.train_prompts(python_rng(seed, step, "prompts"), prompts_per_step)


def file_rows(rows: list[dict], seed: int, prompts_per_step: int) -> Callable[[int], list[dict]]:
    def draw(step: int) -> list[dict]:
        rng = numpy_rng(seed, step, "prompts")
        return [rows[i] for i in rng.integers(0, len(rows), prompts_per_step)]

    return draw
