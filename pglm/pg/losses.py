"""Policy-gradient losses: pure functions of tensors that return (loss, stats).

A loss takes per-token log-probs (B, T) from `pglm.pg.logprobs.token_logprobs`, advantages and a
mask (1 up to and including EOS), builds a per-token loss matrix and hands it to `aggregate`.
Nothing here reads trainer state (docs/design.md, code style rule 1). Formulas: docs/estimators.md §1.
"""

from __future__ import annotations

import torch

from pglm.pg.logprobs import CHUNK_ELEMENTS, chunk_positions

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: float | torch.Tensor | None = None, l_max: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar (names from verl `agg_loss`).

    - "token-mean":              Σ m L / N_tok
    - "seq-mean-token-mean":     Σ_i (Σ_t m L / |y_i|) / N_seq     (GRPO paper; length-biased, §2.1)
    - "seq-mean-token-sum":      Σ m L / N_seq                     (REINFORCE / RLOO: unbiased)
    - "seq-mean-token-sum-norm": Σ m L / (N_seq · l_max)           (Dr. GRPO, l_max a constant)

    `normalizer` is N_tok for token-mean and N_seq for the seq-mean modes. It defaults to this batch's
    count (Σ mask, resp. B); when an optimizer step is split into micro-batches, pass the count of the
    WHOLE step so that the micro-batch losses sum to the loss of the step (pitfall 3: prime-rl #583,
    verl #2776). l_max must be a fixed constant, not the padded width of this batch (verl #3741).
    """
    m = mask.to(loss_tok.dtype)
    masked = loss_tok * m  # (B, T)
    B = loss_tok.shape[0]
    if mode == "token-mean":
        n = m.sum().clamp(min=1) if normalizer is None else normalizer
        return masked.sum() / n
    n_seq = B if normalizer is None else normalizer
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B,)
        return per_seq.sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        if l_max is None:
            raise ValueError("seq-mean-token-sum-norm needs l_max, the fixed maximum response length")
        return masked.sum() / (n_seq * l_max)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                level: str = "token", agg: str = "token-mean", normalizer=None, l_max: int | None = None,
                weights: torch.Tensor | None = None):
    """PPO-clip surrogate (Schulman et al. 2017), in the pieces cleanrl names; returns (loss, stats).

    logp, old_logp, mask (B, T); advantages (B,) per sequence (broadcast over tokens) or (B, T).
      pg_loss1 = −A·r,  pg_loss2 = −A·clip(r, 1 − clip_low, 1 + clip_high),  L = max(pg_loss1, pg_loss2)
    clip_high > clip_low is DAPO's clip-higher (arXiv 2503.14476). `dual_clip` = c > 1 (verl
    `clip_ratio_c`, Ye et al. 2020): for A < 0, L = min(L, −A·c), bounding the loss of a huge ratio.

    level="token": r_t = exp(ℓ_t − ℓ_old_t).
    level="sequence" (GSPO, arXiv 2507.18071, verl `compute_policy_loss_gspo`): s_i = exp(mean_t(ℓ − ℓ_old)),
      token form log s_it = sg[log s_i] + ℓ_it − sg[ℓ_it]: the value of s_i with the gradient of each
      token. The paper's objective is agg="seq-mean-token-mean"; token sums weight sequences by length.

    `weights` (B, T), constants, multiply each token's loss before aggregation: the engine/trainer
    importance weights of `pglm.pg.correction` (None: all 1).

    At θ = θ_old, r = 1 and the gradient is that of −A·ℓ, whatever the clip. No clamp on the
    log-ratio: clamps change gradients (pitfall 11).
    stats (detached): clip_frac (tokens where the clip is active), approx_kl (k3 of old vs new:
    (r − 1) − log r on tokens, masked mean, as cleanrl), ratio_mean (masked mean of r used in the loss),
    dual_clip_frac when dual_clip is set.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (B, T)")
    m = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1): one advantage per sequence, broadcast over tokens
    old_logp = old_logp.detach()
    token_log_ratio = (logp - old_logp) * m  # (B, T)

    if level == "token":
        log_ratio = token_log_ratio
    elif level == "sequence":
        seq_log_ratio = token_log_ratio.sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B,)  log s_i
        log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()  # (B, T)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    ratio = torch.exp(log_ratio)  # (B, T)

    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)  # (B, T)
    stats = {}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        pg_loss3 = -adv * dual_clip  # for A < 0 this caps −A·r at −A·c
        dual = (adv < 0) & (pg_loss3 < pg_loss)
        pg_loss = torch.where(adv < 0, torch.minimum(pg_loss, pg_loss3), pg_loss)
        stats["dual_clip_frac"] = _masked_mean(dual.to(m.dtype), m).detach()

    if weights is not None:
        pg_loss = pg_loss * weights.detach().to(pg_loss.dtype)
    loss = aggregate(pg_loss, mask, agg, normalizer, l_max)
    with torch.no_grad():
        r_tok = torch.exp(token_log_ratio)
        stats["clip_frac"] = _masked_mean((pg_loss2 > pg_loss1).to(m.dtype), m)
        stats["approx_kl"] = _masked_mean((r_tok - 1) - token_log_ratio, m)  # k3, joschu.net/blog/kl-approx
        stats["ratio_mean"] = _masked_mean(ratio, m)
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, agg: str = "token-mean", normalizer=None, l_max: int | None = None):
    """Clipped value loss 0.5·max((V − R)², (clip(V, V_old ± ε) − R)²) ("37 details"; verl `compute_value_loss`).

    values, old_values, returns, mask (B, T) -> (loss, stats). clip=None: plain 0.5·(V − R)².
    stats: vf_clip_frac, explained_variance (1 − Var[R − V]/Var[R] over valid tokens, as cleanrl).
    """
    m = mask.to(values.dtype)
    returns = returns.detach()
    vf_loss1 = (values - returns) ** 2
    if clip is None:
        vf_loss = 0.5 * vf_loss1
        vf_loss2 = vf_loss1
    else:
        v_clipped = old_values.detach() + torch.clamp(values - old_values.detach(), -clip, clip)
        vf_loss2 = (v_clipped - returns) ** 2
        vf_loss = 0.5 * torch.maximum(vf_loss1, vf_loss2)  # (B, T)
    loss = aggregate(vf_loss, mask, agg, normalizer, l_max)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        mean_r = (returns * m).sum() / n
        var_r = (((returns - mean_r) * m) ** 2).sum() / n
        err = (returns - values) * m
        var_e = ((err - err.sum() / n) * m).pow(2).sum() / n
        stats = {"vf_clip_frac": _masked_mean((vf_loss2 > vf_loss1).to(m.dtype), m),
                 "explained_variance": 1 - var_e / var_r if var_r > 0 else torch.full_like(var_r, float("nan"))}
    return loss, stats


def entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, normalizer=None) -> torch.Tensor:
    """Masked token-mean entropy of softmax(logits / τ): H = logsumexp(z) − Σ_v softmax(z)_v z_v.

    logits (B, T, V), mask (B, T) -> scalar (differentiable). The identity avoids a full log_softmax
    copy (as verl `entropy_from_logits`); only z and softmax(z) are full-vocab. `normalizer` as in
    `aggregate` token-mean.
    """
    return aggregate(token_entropy(logits, temperature), mask, "token-mean", normalizer)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / τ) at every position: logits (B, T, V) -> (B, T)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        z = z / temperature  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # (B, T)


@torch.no_grad()
def head_entropy(h: torch.Tensor, lm_head, mask: torch.Tensor, temperature: float = 1.0, max_elements: int | None = None):
    """`entropy(lm_head(h), mask)` for logging, computed a chunk of positions at a time so that it never
    holds more full-vocabulary floats than `pglm.pg.logprobs.head_logprobs` does. h (B, T, C)."""
    B, T, _ = h.shape
    step = chunk_positions(B, lm_head.weight.shape[0], max_elements or CHUNK_ELEMENTS)
    ent = torch.cat([token_entropy(lm_head(h[:, s : s + step]), temperature) for s in range(0, T, step)], dim=1)
    return aggregate(ent, mask, "token-mean")
