"""Per-token KL estimators against a reference policy (Schulman, "Approximating KL divergence", 2020).

With δ_t = ℓ_t − ℓ^ref_t and ρ_t = e^{−δ_t}, tokens sampled from π:

    k1 = δ              E_π[k1] = KL(π‖ref)          unbiased in value
    k2 = δ²/2           biased in value, low variance
    k3 = ρ − 1 + δ      E_π[k3] = KL(π‖ref), ≥ 0      unbiased in value

Values are one thing, gradients another (Tang & Munos, arXiv 2506.09477; "A Comedy of Estimators",
arXiv 2512.21852; docs/estimators.md §1 table). On-policy, per token, with ∇KL_seq = E[Σ_t ∇ℓ_t Σ_{s≥t} δ_s]:

| placement                     | per-sample gradient   | expectation                                         |
|-------------------------------|-----------------------|-----------------------------------------------------|
| k1 in loss                    | ∇ℓ                    | 0: no regularisation at all                         |
| k2 in loss (= sg[ρ]·k3 form)  | δ ∇ℓ                  | per-token reverse KL, ignoring effect on the future |
| k3 in loss (GRPO, low_var_kl) | (1 − ρ) ∇ℓ            | per-token FORWARD KL(ref‖π) gradient, not ∇KL_seq   |
| k1 in reward, reward-to-go    | Σ_{s≥t} δ_s ∇ℓ_t      | ∇KL_seq, unbiased                                   |

So only the reward placement (`kl_in_reward`, then returns / RLOO's sequence sum) gives the gradient
of the sequence KL; tests/test_pg_exact.py checks every row of this table on an enumerable toy.
"""

from __future__ import annotations

import torch

KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate (B, T) -> (B, T); differentiable in logp, ref_logp is detached.

    No clamp (verl and OpenRLHF clamp k3 to ±10; clamps change gradients, docs/estimators.md §2.11).
    Mask the result before reducing it.
    """
    delta = logp - ref_logp.detach()  # (B, T)
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.exp(-delta) - 1 + delta
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def kl_in_reward(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float, mask: torch.Tensor,
                 kind: str = "k1") -> torch.Tensor:
    """Per-token rewards −β·k (default k1 = ℓ − ℓ_ref), zero on padding, detached (B, T).

    Add the task reward on the last valid token and take returns (`reinforce_pp_returns`, `gae`) or the
    sequence sum (RLOO, TRL `rloo_trainer.py`): with k1 the expected gradient is −β ∇KL_seq.
    Pass the log-probs of the policy that sampled (ℓ^old), as OpenRLHF and TRL do.
    """
    with torch.no_grad():
        return -beta * kl_estimate(logp, ref_logp, kind) * mask.to(logp.dtype)
