"""Advantages: what each policy-gradient estimator multiplies ∇log π by.

Pure functions of tensors (docs/design.md, code style rule 1). Sequence-level estimators take
rewards (B,) and return advantages (B,); groups are contiguous: rows i*G .. i*G+G-1 are the G
responses to one prompt.
Token-level estimators take (B, T) tensors and a mask that is 1 up to and including EOS.
Formulas and sources: docs/estimators.md §1; the pitfalls they avoid: §2.

Advantages are constants of the loss: every function here returns a detached tensor.
"""

from __future__ import annotations

import torch


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (B,) -> (B / G, G), refusing a batch that does not split into whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards does not split into groups of {group_size}")
    return rewards.detach().view(-1, group_size)


def reinforce(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = R_i (Williams 1992). Unbiased with a token-sum loss: E[ĝ] = ∇J.

    rewards (B,) -> (B,)
    """
    return rewards.detach().clone()


class MovingBaseline:
    """REINFORCE with a moving-average baseline: A_i = R_i − b_{k−1}, then b_k = α b_{k−1} + (1−α) mean(R).

    The baseline comes from EARLIER batches only. Folding the current batch in first makes A_i depend
    on R_i and shrinks the expected gradient by (1 − (1−α)/B) (docs/estimators.md §1). Ahmadian et al.
    (2024, arXiv 2402.14740) use it as a comparison point. b = 0 on the first call unless given.
    """

    def __init__(self, alpha: float = 0.9, b: float = 0.0):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.b = float(b)

    def advantages(self, rewards: torch.Tensor, batch_mean: float | None = None) -> torch.Tensor:
        """rewards (B,) -> (B,): R − b with the old b; then b is updated with this batch's mean, or with
        `batch_mean` when the batch is larger than these rewards (the whole step over several ranks)."""
        rewards = rewards.detach()
        adv = rewards - self.b  # baseline from earlier batches: independent of these rewards
        mean = float(rewards.float().mean()) if batch_mean is None else float(batch_mean)
        self.b = self.alpha * self.b + (1.0 - self.alpha) * mean
        return adv

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "b": self.b}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        self.b = float(state["b"])


class RunningMoments:
    """Running mean and standard deviation of every reward seen, for `--reward-norm`.

    r ↦ (r − μ) / σ with μ, σ over all batches so far, this one included (Chan et al.'s parallel
    update of the moments; OpenRLHF's `RunningMoments` and its `normalize_reward`). A learned reward's
    scale is arbitrary (its offset is free, its spread depends on training); normalising makes the
    step size of a policy-gradient update independent of both. σ = 1 until two rewards are seen."""

    def __init__(self, mean: float = 0.0, m2: float = 0.0, count: int = 0):
        self.mean, self.m2, self.count = float(mean), float(m2), int(count)

    def update(self, rewards: torch.Tensor, reduce=None) -> None:
        """Fold a batch in; `reduce` sums a tensor over ranks (the whole step's batch)."""
        x = rewards.detach().double()
        sums = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        sums = reduce(sums) if reduce is not None else sums
        n, mean_b = int(sums[0]), float(sums[1] / sums[0])
        sq = ((x - mean_b) ** 2).sum()  # the batch's own sum of squares about its mean
        m2_b = float(reduce(sq) if reduce is not None else sq)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def normalize(self, rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (rewards - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = R_i − (1/(G−1)) Σ_{j≠i} R_j = G/(G−1)·(R_i − R̄) (Ahmadian et al. 2024, arXiv 2402.14740).

    The leave-one-out mean is independent of y_i, so E[ĝ] = ∇J exactly with a token-sum loss.
    verl `compute_rloo_outcome_advantage` computes the same A. rewards (B,) -> (B,); G = 1 is refused:
    there is no one left out.
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (each response's baseline is the mean of the others)")
    r = _groups(rewards, group_size)  # (B/G, G)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (B/G, G)
    return (r - others).reshape(-1)


def grpo(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO: Â_i = (R_i − mean_group R) / (std R + eps) (DeepSeekMath, arXiv 2402.03300 §4.1).

    rewards (B,) -> (B,). `scale`:
    - "group": std over the group, Bessel-corrected (torch.std), as verl and TRL compute it; eps = 1e-6
      as verl (TRL uses 1e-4, OpenRLHF 1e-9, understand-r1-zero 1e-8: copy theirs for parity).
    - "batch": the Bessel std of all rewards in the batch (TRL `scale_rewards="batch"`).
    - "none": Dr. GRPO (Liu et al., arXiv 2503.20783), Â_i = R_i − mean: E[ĝ] = (G−1)/G·∇J with token-sum.
    Std scaling re-weights prompts by 1/std (difficulty bias, docs/estimators.md §2.2): not ∇J.

    G = 1 gives advantage 0: a group of one has no baseline but itself. (verl falls back to mean 0,
    std 1 there, i.e. A = R: plain REINFORCE; use `reinforce` for that.)
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = _groups(rewards, group_size)  # (B/G, G)
    if group_size == 1:
        return torch.zeros_like(r).reshape(-1)
    centred = r - r.mean(dim=1, keepdim=True)  # (B/G, G)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = r.std(dim=1, keepdim=True)  # Bessel, as torch.std in verl / nanstd in TRL
    else:
        std = r.reshape(-1).std() if r.numel() > 1 else r.new_zeros(())
    return (centred / (std + eps)).reshape(-1)


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ returns G_t = Σ_{s≥t} γ^{s−t} r_s over valid tokens, reset after EOS (arXiv 2501.03262).

    token_rewards, mask (B, T) -> (B, T), zero on padding. The per-token reward is usually
    −β·KL_t + 1[t = last valid]·R (OpenRLHF `experience_maker.py`); whiten the result with `whiten`.
    Padding rewards are ignored, so nothing leaks across the end of a response (pitfall 5).
    """
    m = mask.to(token_rewards.dtype)
    r = token_rewards.detach() * m  # (B, T)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,)
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * m[:, t]  # a padded position resets the sum
        out[:, t] = running
    return out


def whiten(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False, eps: float = 1e-8,
           reduce=None) -> torch.Tensor:
    """(v − mean) / sqrt(var + eps) with mean and variance over valid tokens only; padding -> 0.

    values, mask (B, T) -> (B, T). `unbiased=False` is OpenRLHF's population variance; `unbiased=True`
    is verl `masked_whiten` (Bessel). Bessel with a single valid token is undefined (ROLL #475): refused.
    `reduce(t)` sums a tensor over the pieces of a batch split across processes (pglm.dist.all_sum), so
    the statistics are those of the whole batch; by default this tensor is the whole batch.
    """
    reduce = reduce or (lambda t: t)
    m = mask.to(values.dtype)
    v = torch.where(m.bool(), values.detach(), torch.zeros_like(values))  # padding may hold anything
    n, total = reduce(torch.stack([m.sum(), v.sum()]))
    if n < 1 or (unbiased and n < 2):
        raise ValueError(f"cannot whiten over {int(n)} valid token(s) (unbiased={unbiased})")
    mean = total / n
    var = reduce((((v - mean) * m) ** 2).sum()) / (n - 1 if unbiased else n)  # two passes, as before
    return (v - mean) * torch.rsqrt(var + eps) * m


def gae(rewards_tok: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), masked; returns (advantages, returns).

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V  (verl `compute_gae_advantage_return`).
    rewards_tok, values, mask (B, T) -> two (B, T), zero on padding. V_{t+1} is 0 past the last valid
    token, so the episode ends there; put the sequence reward on the last valid token (pitfall 13).
    With the exact V, E[A_t | y_≤t] = Q − V for every λ, so E[ĝ] = ∇J.
    """
    m = mask.to(values.dtype)
    valid = m.bool()
    r = torch.where(valid, rewards_tok.detach(), torch.zeros_like(m))  # (B, T)
    v = torch.where(valid, values.detach(), torch.zeros_like(m))  # (B, T); padding may hold anything
    B, T = v.shape
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 after EOS: v is masked
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]  # reset on padding
        adv[:, t] = last
    return adv, (adv + v) * m
