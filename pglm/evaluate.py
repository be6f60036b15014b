"""Validation of a language model: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pglm.data import Batch


@torch.no_grad()
def evaluate_lm(model, batches: Iterable[Batch], device="cpu", autocast=None) -> dict:
    """Token-weighted mean negative log-likelihood over the masked targets of `batches`.

    val_loss is in nats per token, val_ppl = exp(val_loss), val_token_acc the fraction of targets
    that are the model's most likely next token. With several processes, batch i is scored on rank
    i mod W and the sums are added over ranks; every rank runs as many forwards (a rank with no batch
    left scores one with weight 0), since under FSDP2 each forward is a collective.
    """
    from pglm import dist
    from pglm.models.policy import Policy

    policy = model if isinstance(model, Policy) else Policy(model)
    was_training = policy.training
    policy.eval()
    batches = list(batches)
    W, r = dist.world_size(), dist.rank()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # Σ nll, Σ correct, Σ tokens
    for k in range(-(-len(batches) // W)):  # ⌈n / W⌉ rounds of one batch per rank
        i = k * W + r
        batch = batches[min(i, len(batches) - 1)].to(device)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            stats = policy.lm_stats(batch.x, batch.y, batch.mask)  # (3,)
        if i < len(batches):
            totals += stats
    nll, correct, count = dist.all_sum(totals).tolist()
    policy.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_token_acc": float("nan"), "val_tokens": 0}
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_token_acc": correct / count,
            "val_tokens": int(count)}


@torch.no_grad()
def evaluate_task(model, tokenizer, task, *, samples: int = 0, temperature: float = 1.0, limit: int | None = None,
                  seed: int = 0, batch_size: int = 500) -> dict:
    """Greedy accuracy on the task's held-out prompts, and pass@k from `samples` draws per prompt.

    pass@k uses the unbiased estimator of Chen et al. (2021) over the sampled completions only (the
    greedy one is not among them), for k = 1, 2, 4, ... up to `samples`.
    """
    from pglm import dist
    from pglm.sampling import complete
    from pglm.tasks.base import pass_at_k

    # Every rank evaluates every problem (the same figures everywhere); under FSDP2 the decode loops
    # must then also end at the same step on every rank.
    sync = {"all_finished": dist.all_ranks} if dist.world_size() > 1 else {}

    rows = task.heldout()[:limit]
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    greedy_correct, sample_correct = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [r["prompt"] for r in chunk]
        _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, greedy=True, **sync)
        greedy_correct += [r == 1.0 for r in task.reward(prompts, texts)]
        if samples:
            _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, temperature=temperature,
                                group_size=samples, generator=gen, **sync)
            ok = task.reward([p for p in prompts for _ in range(samples)], texts)
            sample_correct += [sum(ok[j * samples : (j + 1) * samples]) for j in range(len(chunk))]
    model.train(was_training)
    out = {"accuracy": sum(greedy_correct) / len(rows), "n_prompts": len(rows)}
    k = 1
    while samples and k <= samples:
        out[f"pass@{k}"] = sum(pass_at_k(samples, int(c), k) for c in sample_correct) / len(rows)
        k *= 2
    return out
