"""Token log-probabilities: the one path shared by maximum likelihood and policy gradient.

Maximum likelihood minimises −Σ log π(y_t | y_<t); every policy-gradient loss weights the same
log π(y_t | y_<t) by an advantage. Both read it from `token_logprobs`, so the two cannot drift apart
(docs/design.md, code style rule 6).

Two details that the peers' users lose days to (docs/estimators.md §2):
- the shift: logits at position t score the token at position t + 1 (pitfall 6);
- the temperature: logits are divided by the sampling temperature τ for the policy, the old policy
  and the reference alike (pitfall 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / τ) gathered at `targets`.

    logits (B, T, V), targets (B, T) -> (B, T) in float32 (or float64 when the logits are).
    Uses `cross_entropy(reduction="none")` (as nanochat does): one fused call instead of a
    `log_softmax` the caller would hold plus a `gather`. Under autograd it still saves its own
    (B, T, V) log-softmax for backward; `head_logprobs` chunks over T to bound that.
    """
    B, T, V = logits.shape
    if targets.shape != (B, T):
        # torch.gather would silently truncate a mismatched length (LightRFT PR #53); refuse instead.
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), reduction="none")
    return -nll.view(B, T)


# Full-vocabulary floats one chunk of `head_logprobs` may hold: 2^25 floats = 128 MiB in float32. A 32k
# vocabulary then scores 1,024 positions at a time; a small vocabulary is never chunked at all. Smaller
# chunks cost speed: at 2^23 the 8 × 256 × 8,192 logits of benchmarks/mle_vs_hf.py size (b) were split
# and recomputed in backward, ≈ 8 % of the step (docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 25


def chunk_positions(B: int, V: int, max_elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk when B rows of V-wide logits may hold at most `max_elements` floats (at least 1).

    The one rule behind every chunked lm_head: scoring (`head_logprobs`), logged entropy and evaluation."""
    return max(1, max_elements // (B * V))


def head_logprobs(
    h: torch.Tensor, lm_head, targets: torch.Tensor, temperature: float = 1.0, max_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """`token_logprobs(lm_head(h), targets)` without holding (B, T, V) logits for the whole batch.

    h (B, T, C) final hidden states, targets (B, T) -> (B, T). When B·T·V exceeds `max_elements` the
    positions are scored in chunks of T; under autograd each chunk is recomputed in backward
    (activation checkpointing, as Liger-Kernel's fused linear cross-entropy and torchtune's chunked
    loss do), so the peak is one chunk's logits, not the batch's. The values are those of the
    unchunked call.
    """
    B, T, _ = h.shape
    V = lm_head.weight.shape[0]
    if B * T * V <= max_elements:
        return token_logprobs(lm_head(h), targets, temperature)
    step = chunk_positions(B, V, max_elements)

    def piece(h_c, t_c):
        return token_logprobs(lm_head(h_c), t_c, temperature)

    out = []
    for s in range(0, T, step):
        h_c, t_c = h[:, s : s + step], targets[:, s : s + step]
        if torch.is_grad_enabled() and h_c.requires_grad:
            out.append(checkpoint(piece, h_c, t_c, use_reentrant=False))
        else:
            out.append(piece(h_c, t_c))
    return torch.cat(out, dim=1)  # (B, T)


def shifted_logprobs(
    model, tokens: torch.Tensor, n_pad: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of every token after the first under `model`.

    tokens (B, T), optionally left-padded by n_pad (B,) -> (B, T - 1), where column t is
    log π(tokens[:, t + 1] | tokens[:, :t + 1]). Callers mask what they do not want counted.
    """
    h = model.features(tokens, n_pad)[:, :-1]  # (B, T-1, C)
    return head_logprobs(h, model.lm_head, tokens[:, 1:], temperature)  # (B, T-1)


def masked_mean_nll(logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: int | float | None = None):
    """Maximum-likelihood loss: −Σ mask·log p / n_tokens.

    logprobs, mask (B, T). `n_tokens` is the normaliser; pass the token count of the whole optimizer
    step when a step is split into micro-batches, so that the sum over micro-batches equals the loss
    of the whole batch (the token-mean pitfall, docs/estimators.md §2.3). Default: this batch's count.
    """
    mask = mask.to(logprobs.dtype)
    if n_tokens is None:
        n_tokens = mask.sum().clamp(min=1)
    return -(logprobs * mask).sum() / n_tokens
