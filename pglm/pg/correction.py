"""The engine/trainer mismatch correction: importance weights of the trainer's policy over the engine's.

An inference engine samples with its own kernels (and often bf16), so the probability it gives a
sampled token, π_engine, is not the trainer's, π_train, for the same weights; on-policy policy
gradient computed as if the samples came from π_train is then silently off-policy (Yao, Liu et al.
2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"). The unbiased fix is
the importance ratio ρ = π_train / π_engine; capped, it trades a little bias for bounded variance:

    token_tis   w_t = min(ρ_t, C)                        per token (truncated IS; TRL "token_truncate")
    seq_mask    w_t = ρ_i if ρ_i ≤ C else 0 for all t    per sequence, ρ_i = Π_t ρ_t (masked IS; TRL's
                                                         default "sequence_mask", OpenRLHF "seq-mask-tis")
    none        w_t = 1

The weights are constants (detached) that multiply each token's policy-gradient loss; the ratio the
PPO clip sees stays π_θ / π_old with π_old the trainer's own scoring of the rollout (docs/rl.md).
With no mismatch every ρ is 1 and every mode gives the uncorrected loss.
"""

from __future__ import annotations

import torch

MODES = ("none", "token_tis", "seq_mask")


def mismatch_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                     cap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (B, N), sums (5,), maxima (2,)) from the trainer's and the engine's log-probs of the
    sampled tokens.

    train_logp, engine_logp, mask (B, N). Weights are detached and 0 where masked. sums and maxima are
    float64 totals over this batch's valid tokens that add (sums) and take the maximum (maxima) over
    ranks; `mismatch_stats` turns them into the logged figures."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if cap <= 1.0 and mode != "none":
        raise ValueError(f"the cap must be > 1, not {cap}")
    m = mask.to(train_logp.dtype)
    log_ratio = ((train_logp - engine_logp) * m).detach()  # (B, N), 0 where masked
    diff = log_ratio.abs()
    if mode == "seq_mask":  # the ratio and the cap are per sequence
        ratio = log_ratio.sum(1).exp()  # (B,)
        kept = ratio <= cap
        weights = torch.where(kept, ratio, torch.zeros_like(ratio))[:, None] * m  # (B, N)
        units = m.sum(1) > 0  # the sequences with a token
        clipped = ~kept & units
    else:
        ratio = log_ratio.exp()  # (B, N), 1 where masked
        weights = (ratio.clamp(max=cap) if mode == "token_tis" else torch.ones_like(ratio)) * m
        units = m.bool()
        clipped = (ratio > cap) & units if mode == "token_tis" else torch.zeros_like(units)
    sums = torch.stack([diff.sum(), m.sum(), ratio[units].sum(), clipped.sum(), units.sum()]).to(torch.float64)
    maxima = torch.stack([diff.max() if diff.numel() else diff.new_zeros(()),
                          ratio[units].max() if bool(units.any()) else ratio.new_zeros(())]).to(torch.float64)
    return weights, sums, maxima


def mismatch_stats(sums: torch.Tensor, maxima: torch.Tensor) -> dict:
    """The logged figures of `mismatch_weights`' totals (summed and maxed over ranks): logp_diff_mean /
    logp_diff_max of |log π_train − log π_engine| over valid tokens, is_ratio_mean / is_ratio_max of the
    ratio the mode uses (per token, or per sequence for seq_mask), and is_clip_frac, the share of those
    tokens or sequences the cap changed."""
    diff, n_tok, ratio, clipped, units = sums.tolist()
    diff_max, ratio_max = maxima.tolist()
    return {"logp_diff_mean": diff / max(n_tok, 1.0), "logp_diff_max": diff_max,
            "is_ratio_mean": ratio / units if units else 1.0, "is_ratio_max": ratio_max if units else 1.0,
            "is_clip_frac": clipped / max(units, 1.0)}


def stale_weights(engine_probe: torch.Tensor, before: torch.Tensor, after: torch.Tensor, tol: float = 0.0) -> bool:
    """Whether an engine still samples from the weights before the last update.

    engine_probe: the engine's log-probs of a fixed probe sequence just after `sync_weights`; before /
    after: the trainer's log-probs of the same tokens under the weights before and after the update.
    Stale when the engine is off the new weights by more than `tol` (the engine's own noise) and closer
    to `before` than to `after`; or off them by more than `tol` after an update too small to tell the two
    apart (then it cannot be the new weights either)."""
    moved = float((after - before).abs().mean())
    off = float((engine_probe - after).abs().mean())
    if off <= tol:
        return False
    return moved <= tol or float((engine_probe - before).abs().mean()) < off
