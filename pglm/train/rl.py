"""Policy-gradient tuning: the loop behind `pglm rl`.

One step, in the order it happens (STYLE.md rule 5):
  prompts → rollout (G samples per prompt, with the sampler's log-probs) → rewards → KL to the
  reference → advantages → epochs × minibatches of (score, loss, backward, clip, step) → log.

Every piece of the objective is a pure function of `pglm.pg`; which pieces, is the preset
(`pglm/pg/presets.py`). Log-probs come from `token_logprobs`, the path maximum likelihood uses too.

Decisions (docs/rl.md):
- The model is in eval mode throughout (no dropout): dropout would make the on-policy ratio differ
  from 1 and the KL noisy (estimators.md §2.8).
- old log-probs are the sampler's own, which equal a rescoring of the same weights (tests/test_sampling.py).
- With one update per rollout (and no value head, and a small enough vocabulary) the rollout keeps its
  graph and the loss differentiates the sampler's log-probs: no second forward pass (`fuses_scoring`).
- Each minibatch is one optimizer step, so its own token count is the whole-step normaliser.
- The reward of a response cut at max_new_tokens (no eos) is kept, masked out of the loss, or
  lowered by `truncation_penalty`, per preset or flag.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pglm.errors import UserError
from pglm.pg import advantages as adv_fns
from pglm.pg.kl import kl_estimate
from pglm.pg.logprobs import CHUNK_ELEMENTS, head_logprobs
from pglm.pg.losses import aggregate, head_entropy, policy_loss, value_loss
from pglm.pg.presets import Preset
from pglm.rewards.loader import call_reward
from pglm.sampling import complete
from pglm.train.checkpoint import save_checkpoint
from pglm.train.metrics import MetricsLog
from pglm.train.mle import stop_on_ctrl_c


@dataclass
class RLConfig:
    algo: str = "grpo"  # preset name (pglm.pg.presets.PRESETS)
    steps: int = 200  # optimizer-step rounds (one rollout each)
    prompts_per_step: int = 8  # distinct prompts per rollout
    group_size: int = 8  # samples per prompt (G)
    lr: float | None = None  # None → the preset's default
    warmup_steps: int = 10  # linear warm-up, then constant (a fresh Adam on a trained model needs it)
    beta: float = 0.0  # KL coefficient to the frozen initial model; 0 → no reference is loaded
    epochs: int = 1  # passes over each rollout (PPO-style reuse)
    minibatches: int = 1  # optimizer steps per pass
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
    zero_std_warn_steps: int = 10  # warn when every group had equal rewards this many steps running
    first_step: int = 0  # the step this run starts after (a phase that continues another's numbering)
    seed: int = 0  # seeds prompts, sampling and minibatch order (per step: resume-exact)
    device: str = "auto"  # auto | cpu | cuda


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
    old_logp: torch.Tensor  # (B, N) the sampler's log-probs at temperature τ (detached)
    rewards: torch.Tensor  # (B,) the reward functions' values
    finished: torch.Tensor  # (B,) bool: ended with eos (else truncated)
    prompts: list[str]  # (B) each prompt G times
    completions: list[str]  # (B)
    logp: torch.Tensor | None = None  # (B, N) the same log-probs with their graph (fused rollouts only)
    entropy: torch.Tensor | None = None  # (B, N) entropy of each sampled position's distribution (fused only)


FUSE_MAX_TOKENS = 6  # longest response a rollout keeps its graph for (measured crossover ≈ 8; see below)


def fuses_scoring(preset: Preset, cfg: RLConfig, value_head, batch_size: int, max_new_tokens: int, vocab: int) -> bool:
    """Whether the rollout may keep its graph, so its log-probs are the ones the loss differentiates.

    With one update per rollout (one epoch, one minibatch) the policy that is updated is the one that
    sampled, so re-scoring the batch would recompute exactly the sampler's log-probs (tests check the two
    agree): the gradient can flow through sampling instead, and the separate scoring forward goes. The
    minimal loop of shared/reference/trl_add2.md does the same (its log-probs and gradients matched a
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
                    generator: torch.Generator, fused: bool = False) -> Rollout:
    """Sample G responses per prompt and score them with the reward; `fused` keeps the graph of the
    sampled log-probs (see `fuses_scoring`)."""
    G = cfg.group_size
    prompts = [r["prompt"] for r in rows]
    g, completions = complete(model, tokenizer, prompts, max_new_tokens, temperature=cfg.temperature,
                              group_size=G, generator=generator, grad=fused, with_entropy=fused)
    prompts_rep = [p for p in prompts for _ in range(G)]
    keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")  # every field any row has, in order
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}
    # response length in tokens, eos not counted (builtin length_penalty(tokens=True) reads it)
    columns["completion_lengths"] = (g.response_mask.sum(1) - g.finished.long()).tolist()
    rewards = call_reward(reward_fn, prompts_rep, completions, columns)
    device = g.tokens.device
    return Rollout(g.tokens, g.n_pad, g.prompt_len, g.response_mask, g.logprobs.detach(),
                   torch.tensor(rewards, dtype=torch.float32, device=device), g.finished, prompts_rep, completions,
                   logp=g.logprobs if fused else None, entropy=g.entropy)


def compute_advantages(p: Preset, rewards, G: int, baseline: adv_fns.MovingBaseline | None):
    """Sequence-level advantages (B,) for every preset but ppo."""
    if p.advantage == "moving":
        return baseline.advantages(rewards)
    if p.advantage == "rloo":
        return adv_fns.rloo(rewards, G)
    if p.advantage in ("grpo", "dr_grpo"):
        return adv_fns.grpo(rewards, G, scale="group" if p.advantage == "grpo" else "none")
    raise ValueError(f"no sequence-level advantage for {p.advantage!r}")


def check_shapes(p: Preset, cfg: RLConfig) -> None:
    """Explain, before any work starts, the batch shapes that cannot work."""
    B = cfg.prompts_per_step * cfg.group_size
    if cfg.prompts_per_step < 1 or cfg.group_size < 1 or cfg.steps < 1:
        raise UserError("--steps, --prompts-per-step and --group-size must be positive")
    if p.advantage in ("rloo", "grpo", "dr_grpo") and cfg.group_size < 2:
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
    if cfg.truncation not in (None, "keep", "mask", "penalise"):
        raise UserError(f"--truncation must be keep, mask or penalise, not '{cfg.truncation}'")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0")
    for name in ("eval_every", "ckpt_every", "warmup_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if cfg.eval_samples < 0 or (cfg.eval_limit is not None and cfg.eval_limit < 1):
        raise UserError("--eval-samples must be 0 or more, and --eval-limit at least 1")
    if cfg.grad_clip <= 0 or cfg.beta < 0 or (cfg.lr is not None and cfg.lr <= 0):
        raise UserError("--lr and the gradient clip must be positive, and --beta 0 or more")


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
) -> dict:
    """Tune `model` from `start_step` to `cfg.steps`; returns the last evaluation, or {} without one.

    draw_rows(step) gives the prompt rows of a step; evaluator(model) the held-out figures (e.g.
    `evaluate_task`), asked at step 0 of a new run, every cfg.eval_every steps and at the end.
    Ctrl-C finishes the step, checkpoints and raises.
    """
    if cfg.beta > 0 and ref_model is None:
        raise ValueError("beta > 0 needs ref_model, the frozen model the KL is measured against")
    device = next(model.parameters()).device
    metrics = metrics or MetricsLog(run_dir)
    G, N = cfg.group_size, max_new_tokens
    # Only group-relative advantages are all zero when a group's rewards are equal.
    group_relative = preset.advantage in ("rloo", "grpo", "dr_grpo") and G > 1
    truncation = cfg.truncation or preset.truncation
    lr = cfg.lr if cfg.lr is not None else preset.lr
    fused = fuses_scoring(preset, cfg, value_head, cfg.prompts_per_step * G, N, model.lm_head.weight.shape[0])
    model.eval()  # no dropout anywhere in RL (module docstring)
    params = list(optimizer.param_groups[0]["params"])  # what the gradient-norm clip covers
    last_eval: dict = {}
    zero_std_streak = 0

    def checkpoint(at: int):
        state = {"elapsed": metrics.elapsed(), **last_eval}
        if baseline is not None:
            state["baseline"] = baseline.state_dict()
        save_checkpoint(run_dir, at, model, optimizer, state, extra={"value_head": value_head} if value_head else None)

    def evaluate(at: int):
        nonlocal last_eval
        if evaluator is None:
            return
        last_eval = evaluator(model)
        metrics.log(at, "eval", **last_eval)
        bar.write(f"step {at}: " + "  ".join(f"{k} {v:.3f}" for k, v in last_eval.items() if k != "n_prompts"))

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, desc=preset.name, unit="step")
    if start_step == cfg.first_step:
        evaluate(start_step)
    step = start_step
    with stop_on_ctrl_c() as stop_requested:
        while step < cfg.steps:
            t0 = time.perf_counter()
            # 1. Rollout: G samples per prompt, with the sampler's log-probs.
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
            ro = collect_rollout(model, tokenizer, draw_rows(step), reward_fn, cfg, N, gen, fused)
            B = ro.tokens.size(0)
            rewards = ro.rewards.clone()  # (B,)
            truncated = ~ro.finished
            loss_mask = ro.mask.clone()  # (B, N)
            if truncation == "penalise":
                rewards = rewards - cfg.truncation_penalty * truncated.float()
            elif truncation == "mask":
                loss_mask &= ro.finished[:, None]  # overlong filtering (DAPO; TRL mask_truncated_completions)
            zero_std = rewards.view(-1, G).std(dim=1) == 0 if G > 1 else torch.zeros(B // G, dtype=torch.bool)  # (B/G,)
            if preset.drop_zero_std_groups:  # DAPO dynamic sampling, as a filter of this batch
                loss_mask &= ~zero_std.repeat_interleave(G)[:, None]

            # 2. KL to the reference, in the reward (k1 of the sampler's log-probs) or later in the loss.
            with torch.no_grad():
                ref_logp = None
                kl_tok = torch.zeros_like(ro.old_logp)
                if ref_model is not None:
                    ref_logp, _, _ = score(ref_model, None, ro.tokens, ro.n_pad, ro.prompt_len, cfg.temperature)
                    kl_tok = kl_estimate(ro.old_logp, ref_logp, "k1") * ro.mask  # k1 per token (B, N)
                kl_in_reward = cfg.beta > 0 and preset.kl_placement == "reward"

                # 3. Advantages.
                if preset.advantage == "gae":
                    h = model.features(ro.tokens, ro.n_pad)[:, ro.prompt_len - 1 : -1]  # (B, N, C), as in score
                    old_values = value_head(h)  # (B, N); no logits needed here
                    last = ro.mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last valid token
                    tok_rewards = -cfg.beta * kl_tok if kl_in_reward else torch.zeros_like(kl_tok)
                    tok_rewards[torch.arange(B, device=device), last] += rewards  # reward on the last token (§2.13)
                    advantages, returns = adv_fns.gae(tok_rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
                    if preset.whiten:
                        advantages = adv_fns.whiten(advantages, loss_mask if loss_mask.any() else ro.mask)
                else:
                    seq_rewards = rewards - cfg.beta * kl_tok.sum(1) if kl_in_reward else rewards
                    advantages = compute_advantages(preset, seq_rewards, G, baseline)  # (B,)

            # 4. Epochs × minibatches of score, loss, backward, clip, step.
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step - cfg.first_step + 1) / max(1, cfg.warmup_steps))
            order_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            stats_sum: dict[str, float] = {}
            n_updates = 0
            for _ in range(cfg.epochs):
                order = torch.randperm(B, generator=order_gen) if cfg.minibatches > 1 else torch.arange(B)
                for idx in order.to(device).chunk(cfg.minibatches):
                    m = loss_mask[idx]
                    if not m.any():
                        continue  # nothing to learn from (all masked): Adam must not move on zero gradients
                    if fused:  # the sampler's own log-probs, graph and all (one update: idx is every row)
                        logp, h, values = ro.logp, None, None
                    else:
                        logp, h, values = score(model, value_head, ro.tokens[idx], ro.n_pad[idx], ro.prompt_len,
                                                cfg.temperature)
                    loss, stats = policy_loss(logp, ro.old_logp[idx], advantages[idx], m,
                                              clip_low=preset.clip_low, clip_high=preset.clip_high,
                                              level=preset.level, agg=preset.agg, l_max=N)
                    if cfg.beta > 0 and preset.kl_placement == "loss":
                        kl_loss = aggregate(kl_estimate(logp, ref_logp[idx], "k3"), m, preset.agg, l_max=N)
                        loss = loss + cfg.beta * kl_loss
                    if value_head is not None:
                        vl, vstats = value_loss(values, old_values[idx], returns[idx], m, clip=cfg.vf_clip)
                        loss = loss + cfg.vf_coef * vl
                        stats.update(vstats, value_loss=vl.detach())
                    # entropy of the policy being updated (before the step changes lm_head)
                    stats["entropy"] = aggregate(ro.entropy, m, "token-mean") if h is None else \
                        head_entropy(h.detach(), model.lm_head, m, cfg.temperature)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    stats.update(loss=loss.detach(), grad_norm=grad_norm)
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                    n_updates += 1
            step += 1

            # 5. Log.
            frac_zero = float(zero_std.float().mean())
            # A step with nothing to learn from (every token masked) logs its loss statistics as null.
            row = dict.fromkeys(("loss", "grad_norm", "entropy", "clip_frac", "approx_kl"), float("nan"))
            row.update({k: v / n_updates for k, v in stats_sum.items()})
            row.update(
                reward_mean=float(ro.rewards.mean()), reward_std=float(ro.rewards.std()) if B > 1 else 0.0,
                response_len=float(ro.mask.float().sum(1).mean()), frac_zero_std_groups=frac_zero,
                frac_truncated=float(truncated.float().mean()), samples_per_s=B / (time.perf_counter() - t0),
                lr=optimizer.param_groups[0]["lr"], updates=n_updates,
            )
            if ref_model is not None:
                row["kl"] = float(kl_tok.sum(1).mean())  # E[Σ_t k1] = KL(π‖ref) per sequence
            metrics.log(step, "rl", **row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", samples_s=f"{row['samples_per_s']:.0f}")
            bar.update(1)
            zero_std_streak = zero_std_streak + 1 if group_relative and frac_zero == 1.0 else 0
            if zero_std_streak == cfg.zero_std_warn_steps:
                bar.write(
                    f"warning: for {zero_std_streak} steps every group of {G} samples got equal rewards, so every "
                    "advantage is 0 and the policy does not move (the 'loss is 0' of trl#2703). Raise --group-size "
                    "or --temperature, or check that the reward can tell the samples apart."
                )

            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_requested.is_set():
                checkpoint(step)
            if stop_requested.is_set() and step < cfg.steps:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    return last_eval


def make_rl_optimizer(model, value_head, lr: float, cfg: RLConfig) -> torch.optim.Adam:
    """Adam without weight decay (decay would pull a trained model back toward 0 for no reason), ε 1e-5."""
    params, seen = [], set()
    for q in list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else []):
        if q.requires_grad and id(q) not in seen:  # with LoRA only the adapter trains
            seen.add(id(q))
            params.append(q)
    # fused: one kernel for every tensor (the per-parameter loop cost ~6 ms of a ~40 ms add2 step on CPU)
    return torch.optim.Adam(params, lr=lr, eps=cfg.adam_eps, fused=all(q.device.type in ("cpu", "cuda") for q in params))


def reference_model(model):
    """The frozen initial policy the KL is measured against: with LoRA, the same model with its adapter
    switched off (no second copy in memory); otherwise a copy of the weights as they are now."""
    if getattr(model, "is_lora", False):
        return model.reference()
    return frozen_copy(model)


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for q in ref.parameters():
        q.requires_grad_(False)
    return ref


def task_rows(task, seed: int, prompts_per_step: int) -> Callable[[int], list[dict]]:
    """The prompts of step s: a pure function of (seed, s), so a resumed run draws the same ones."""
    return lambda step: task.train_prompts(random.Random(seed * 1_000_003 + step), prompts_per_step)


def file_rows(rows: list[dict], seed: int, prompts_per_step: int) -> Callable[[int], list[dict]]:
    def draw(step: int) -> list[dict]:
        rng = np.random.default_rng([seed, step])
        return [rows[i] for i in rng.integers(0, len(rows), prompts_per_step)]

    return draw
