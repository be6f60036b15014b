"""Algorithms as named presets of four parts: advantage × ratio/clip × aggregation × KL placement.

Every algorithm pglm offers is one row of this table, not a code path of its own: the loop in
`pglm/train/rl.py` reads these fields and calls the pure functions of `pglm.pg`. `describe` prints
the resulting objective in one line, so a user sees exactly what is being optimised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from pglm.errors import UserError
from pglm.pg import advantages as adv


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and what the loop needs to know of it (docs/estimators.md §1)."""

    formula: str  # as `describe` writes it
    groups: bool = False  # compares the G samples of a prompt: needs G ≥ 2, and is all 0 when their rewards agree
    values: bool = False  # per token, from a value head (GAE): the policy carries one
    state: bool = False  # a baseline carried from step to step (and checkpointed)
    fn: Callable | None = None  # (rewards (B,), G) -> advantages (B,): the stateless sequence-level ones


ESTIMATORS: dict[str, Estimator] = {
    "moving": Estimator("A = R − b (b: moving mean of earlier batches)", state=True),
    "rloo": Estimator("A = R − mean of the other G−1 rewards", groups=True, fn=adv.rloo),
    "grpo": Estimator("A = (R − mean_G R) / (std_G R + 1e-6)", groups=True, fn=partial(adv.grpo, scale="group")),
    "dr_grpo": Estimator("A = R − mean_G R", groups=True, fn=partial(adv.grpo, scale="none")),
    "gae": Estimator("A = GAE(γ, λ) from a value head, whitened", values=True),
}


@dataclass(frozen=True)
class Preset:
    name: str
    advantage: str  # a key of ESTIMATORS
    agg: str  # aggregation of the per-token loss (pglm.pg.losses.AGG_MODES)
    level: str = "token"  # importance ratio per token, or per sequence (GSPO)
    clip_low: float = 0.2  # ratio clip 1 − ε_low
    clip_high: float = 0.2  # ratio clip 1 + ε_high (DAPO's clip-higher: ε_high > ε_low)
    kl_placement: str = "reward"  # where β·KL goes: "reward" (k1, unbiased ∇KL_seq) or "loss" (k3, GRPO)
    truncation: str = "keep"  # responses cut at max_new_tokens: keep | mask | penalise
    drop_zero_std_groups: bool = False  # DAPO dynamic sampling: groups with equal rewards leave the loss
    lr: float = 5e-5  # default learning rate, safe on add2 (docs/rl.md)
    whiten: bool = False  # whiten the GAE advantages over the batch's valid tokens (ppo)
    source: str = ""  # where the recipe comes from

    @property
    def estimator(self) -> Estimator:
        return ESTIMATORS[self.advantage]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("reinforce", "moving", "seq-mean-token-sum", source="Williams 1992, moving-average baseline from earlier batches"),
        Preset("rloo", "rloo", "seq-mean-token-sum", source="Ahmadian et al. 2024, arXiv 2402.14740"),
        Preset("grpo", "grpo", "seq-mean-token-mean", kl_placement="loss", source="DeepSeekMath, arXiv 2402.03300"),
        Preset("dr_grpo", "dr_grpo", "seq-mean-token-sum-norm", source="Liu et al., arXiv 2503.20783"),
        Preset("dapo", "grpo", "token-mean", clip_high=0.28, truncation="mask", drop_zero_std_groups=True,
               source="DAPO, arXiv 2503.14476"),
        Preset("gspo", "grpo", "seq-mean-token-mean", level="sequence", clip_low=3e-4, clip_high=4e-4,
               source="GSPO, arXiv 2507.18071"),
        Preset("ppo", "gae", "token-mean", whiten=True, source="Schulman et al. 2017; Huang et al., arXiv 2403.17031"),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown algorithm '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve(p: Preset, truncation: str | None = None, lr: float | None = None) -> Preset:
    """The effective recipe: the preset with the flags that override it (--truncation, --lr) applied,
    resolved once, so that the loop, `describe` and the CLI read the same thing."""
    if truncation not in (None, "keep", "mask", "penalise"):
        raise UserError(f"--truncation must be keep, mask or penalise, not '{truncation}'")
    return replace(p, truncation=truncation or p.truncation, lr=p.lr if lr is None else lr)

_AGG = {
    "token-mean": "Σ_i Σ_t … / Σ_i |y_i|",
    "seq-mean-token-mean": "(1/B) Σ_i (1/|y_i|) Σ_t …",
    "seq-mean-token-sum": "(1/B) Σ_i Σ_t …",
    "seq-mean-token-sum-norm": "(1/(B·L_max)) Σ_i Σ_t …",
}


def describe(p: Preset, beta: float, group_size: int, max_new_tokens: int, gamma: float = 1.0, lam: float = 0.95) -> str:
    """The objective of recipe `p` (see `resolve`) in one line, e.g. for the start of `pglm rl`."""
    ratio = "r = exp(mean_t log π/π_old) per sequence" if p.level == "sequence" else "r_t = π/π_old per token"
    advantage = p.estimator.formula.replace("GAE(γ, λ)", f"GAE(γ={gamma}, λ={lam})")
    kl = "no KL"
    if beta > 0:
        if p.kl_placement == "loss":
            kl = f"+ {beta}·k3(π, π_ref) per token in the loss"
        elif p.estimator.values:
            kl = f"r_t −= {beta}·(log π_old − log π_ref) per token (k1 in the reward)"
        else:
            kl = f"R −= {beta}·Σ_t (log π_old − log π_ref) (k1 in the reward)"
    agg = _AGG[p.agg].replace("L_max", f"L_max={max_new_tokens}")
    return (f"{p.name}: minimise −{agg} min(r·A, clip(r, {1 - p.clip_low:g}, {1 + p.clip_high:g})·A); {ratio}; "
            f"{advantage}, G={group_size}; {kl}; truncated responses: {p.truncation}"
            + ("; groups with equal rewards dropped" if p.drop_zero_std_groups else "")
            + (f"  [{p.source}]" if p.source else ""))
