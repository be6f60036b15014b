"""Algorithms as named presets of four parts: advantage × ratio/clip × aggregation × KL placement.

Every algorithm pglm offers is one row of this table, not a code path of its own: the loop in
`pglm/train/rl.py` reads these fields and calls the pure functions of `pglm.pg`. `describe` prints
the resulting objective in one line, so a user sees exactly what is being optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglm.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    advantage: str  # moving | rloo | grpo | dr_grpo | gae
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


_ADV = {
    "moving": "A = R − b (b: moving mean of earlier batches)",
    "rloo": "A = R − mean of the other G−1 rewards",
    "grpo": "A = (R − mean_G R) / (std_G R + 1e-6)",
    "dr_grpo": "A = R − mean_G R",
    "gae": "A = GAE(γ, λ) from a value head, whitened",
}
_AGG = {
    "token-mean": "Σ_i Σ_t … / Σ_i |y_i|",
    "seq-mean-token-mean": "(1/B) Σ_i (1/|y_i|) Σ_t …",
    "seq-mean-token-sum": "(1/B) Σ_i Σ_t …",
    "seq-mean-token-sum-norm": "(1/(B·L_max)) Σ_i Σ_t …",
}


def describe(p: Preset, beta: float, group_size: int, max_new_tokens: int, gamma: float = 1.0, lam: float = 0.95,
             truncation: str | None = None) -> str:
    """The objective in one line, e.g. for the start of `pglm rl`; `truncation` is --truncation when set."""
    ratio = "r = exp(mean_t log π/π_old) per sequence" if p.level == "sequence" else "r_t = π/π_old per token"
    adv = _ADV[p.advantage].replace("GAE(γ, λ)", f"GAE(γ={gamma}, λ={lam})")
    kl = "no KL"
    if beta > 0:
        if p.kl_placement == "loss":
            kl = f"+ {beta}·k3(π, π_ref) per token in the loss"
        elif p.advantage == "gae":
            kl = f"r_t −= {beta}·(log π_old − log π_ref) per token (k1 in the reward)"
        else:
            kl = f"R −= {beta}·Σ_t (log π_old − log π_ref) (k1 in the reward)"
    agg = _AGG[p.agg].replace("L_max", f"L_max={max_new_tokens}")
    return (f"{p.name}: minimise −{agg} min(r·A, clip(r, {1 - p.clip_low:g}, {1 + p.clip_high:g})·A); {ratio}; "
            f"{adv}, G={group_size}; {kl}; truncated responses: {truncation or p.truncation}"
            + ("; groups with equal rewards dropped" if p.drop_zero_std_groups else "")
            + (f"  [{p.source}]" if p.source else ""))
