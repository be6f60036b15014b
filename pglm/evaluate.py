"""Validation of a language model: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
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
    if count == 0:  # nothing to validate on (a one-row SFT file): no figures, rather than NaN ones
        return {"val_tokens": 0}
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_token_acc": correct / count,
            "val_tokens": int(count)}


@torch.no_grad()
def evaluate_task(model, tokenizer, task, *, samples: int = 0, temperature: float = 1.0, limit: int | None = None,
                  seed: int = 0, batch_size: int = 500) -> dict:
    """Greedy accuracy on the task's held-out prompts, and pass@k from `samples` draws per prompt.

    pass@k uses the unbiased estimator of Chen et al. (2021) over the sampled completions only (the
    greedy one is not among them), for k = 1, 2, 4, ... up to `samples`. The samples of held-out
    prompt i are drawn with uniforms from a generator of its own (seed, i), so the figures are the same
    however the prompts are shared out: with several processes rank r evaluates the r-th block of
    prompts and the counts are summed over ranks (a rank with a shorter block repeats its last prompt
    with weight 0, so that every rank runs as many batches; under FSDP2 each decode step is a collective
    and ends on every rank together).
    """
    from pglm import dist
    from pglm.rng import numpy_rng
    from pglm.sampling import complete
    from pglm.tasks.base import pass_at_k

    rows = task.heldout()[:limit]
    W, r = dist.world_size(), dist.rank()
    per = -(-len(rows) // W)  # prompts per rank
    mine = [min(i, len(rows) - 1) for i in range(r * per, (r + 1) * per)]  # global indices, padded
    weight = torch.tensor([float(r * per + k < len(rows)) for k in range(per)], dtype=torch.float64)
    sync = {"all_finished": dist.all_ranks} if dist.sharded(model) else {}
    was_training = model.training
    model.eval()
    ks = [2**j for j in range(samples.bit_length())] if samples else []  # 1, 2, 4, … ≤ samples
    greedy_correct, passes = [], []  # per local prompt
    for b in range(0, len(mine), batch_size):
        idx = mine[b : b + batch_size]
        prompts = [rows[i]["prompt"] for i in idx]
        _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, greedy=True, **sync)
        greedy_correct += [float(x == 1.0) for x in task.reward(prompts, texts)]
        if samples:
            u = torch.from_numpy(np.concatenate([numpy_rng(seed, 0, "eval", i).random((samples, task.max_new_tokens))
                                                 for i in idx]))
            _, texts = complete(model, tokenizer, prompts, task.max_new_tokens, temperature=temperature,
                                group_size=samples, uniforms=u, **sync)
            ok = task.reward([p for p in prompts for _ in range(samples)], texts)
            for j in range(len(idx)):
                c = int(sum(ok[j * samples : (j + 1) * samples]))
                passes.append([pass_at_k(samples, c, k) for k in ks])
    model.train(was_training)
    local = torch.cat([(weight * torch.tensor(greedy_correct, dtype=torch.float64)).sum()[None],
                       (weight[:, None] * torch.tensor(passes, dtype=torch.float64).reshape(len(mine), len(ks))).sum(0)])
    totals = dist.all_sum(local.to(_device_of(model))).tolist()
    out = {"accuracy": totals[0] / len(rows), "n_prompts": len(rows)}
    out.update({f"pass@{k}": t / len(rows) for k, t in zip(ks, totals[1:])})
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
