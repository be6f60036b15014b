"""Validation of a language model: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pglm.data import Batch
from pglm.pg.logprobs import chunk_positions, token_logprobs


@torch.no_grad()
def evaluate_lm(model, batches: Iterable[Batch], device="cpu", autocast=None) -> dict:
    """Token-weighted mean negative log-likelihood over the masked targets of `batches`.

    val_loss is in nats per token, val_ppl = exp(val_loss), val_token_acc the fraction of targets
    that are the model's most likely next token.
    """
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            h = model.features(batch.x)  # (B, T, C)
            # lm_head a chunk of positions at a time, as in training (head_logprobs): a large vocabulary
            # never puts the whole batch's (B, T, V) logits in memory at once
            step = chunk_positions(h.shape[0], model.lm_head.weight.shape[0])
            for s in range(0, h.shape[1], step):
                logits = model.lm_head(h[:, s : s + step])  # (B, chunk, V)
                y, m = batch.y[:, s : s + step], batch.mask[:, s : s + step]
                nll -= token_logprobs(logits, y)[m].double().sum().item()
                correct += (logits.argmax(-1) == y)[m].sum().item()
        count += int(batch.mask.sum())
    model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_token_acc": float("nan"), "val_tokens": 0}
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_token_acc": correct / count, "val_tokens": count}


@torch.no_grad()
def evaluate_task(model, tokenizer, task, *, samples: int = 0, temperature: float = 1.0, limit: int | None = None,
                  seed: int = 0, batch_size: int = 500) -> dict:
    """Greedy accuracy on the task's held-out prompts, and pass@k from `samples` draws per prompt.

    pass@k uses the unbiased estimator of Chen et al. (2021) over the sampled completions only (the
    greedy one is not among them), for k = 1, 2, 4, ... up to `samples`.
    """
    from pglm.sampling import complete
    from pglm.tasks.base import pass_at_k

    rows = task.heldout()[:limit]
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    greedy_correct, sample_correct = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [r["prompt"] for r in chunk]
        _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, greedy=True)
        greedy_correct += [r == 1.0 for r in task.reward(prompts, texts)]
        if samples:
            _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, temperature=temperature,
                                group_size=samples, generator=gen)
            ok = task.reward([p for p in prompts for _ in range(samples)], texts)
            sample_correct += [sum(ok[j * samples : (j + 1) * samples]) for j in range(len(chunk))]
    model.train(was_training)
    out = {"accuracy": sum(greedy_correct) / len(rows), "n_prompts": len(rows)}
    k = 1
    while samples and k <= samples:
        out[f"pass@{k}"] = sum(pass_at_k(samples, int(c), k) for c in sample_correct) / len(rows)
        k *= 2
    return out
