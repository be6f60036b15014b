"""Validation of a language model: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pglm.data import Batch
from pglm.pg.logprobs import token_logprobs


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
            logits = model(batch.x)  # (B, T, V)
        logp = token_logprobs(logits, batch.y)  # (B, T)
        nll -= logp[batch.mask].double().sum().item()
        correct += (logits.argmax(-1) == batch.y)[batch.mask].sum().item()
        count += int(batch.mask.sum())
    model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_token_acc": float("nan"), "val_tokens": 0}
    loss = nll / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_token_acc": correct / count, "val_tokens": count}
