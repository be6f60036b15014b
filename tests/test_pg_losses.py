"""Hand-worked unit tests for pglm.pg advantages, losses and KL estimators (numbers in comments)."""

import json
import math

import pytest
import torch

from pglm.pg.advantages import MovingBaseline, gae, grpo, reinforce, reinforce_pp_returns, rloo, whiten
from pglm.pg.kl import kl_estimate, kl_in_reward
from pglm.pg.losses import aggregate, entropy, policy_loss, value_loss

D = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=D).detach().clone()


def close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=D), t(b), atol=tol, rtol=0), (a, b)


def one_token_rows(ratios, advs, **kw):
    """B sequences of one token each, old log-prob 0, so r = exp(logp)."""
    logp = t([[math.log(r)] for r in ratios]).requires_grad_(True)  # (B, 1)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), t(advs), torch.ones_like(logp),
                              agg="token-mean", normalizer=1, **kw)  # normalizer 1: loss = Σ rows
    (g,) = torch.autograd.grad(loss, logp)
    return loss, g.view(-1), stats


def test_clip_zeroes_the_gradient_only_outside_the_trust_region():
    # row: (r, A)   pg_loss1 = −A r, pg_loss2 = −A clip(r, 0.8, 1.2), L = max     dL/dlogp
    # 0: (1.5, +1)  −1.5, −1.2 -> −1.2 (clipped, constant)                         0
    # 1: (0.5, −1)  +0.5, +0.8 -> +0.8 (clipped, constant)                         0
    # 2: (0.5, +1)  −0.5, −0.8 -> −0.5                                              −A r = −0.5
    # 3: (1.5, −1)  +1.5, +1.2 -> +1.5                                              −A r = +1.5
    loss, g, stats = one_token_rows([1.5, 0.5, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0])
    close(loss, -1.2 + 0.8 - 0.5 + 1.5)  # 0.6
    close(g, [0.0, 0.0, -0.5, 1.5])
    close(stats["clip_frac"], 0.5)  # rows 0 and 1
    close(stats["ratio_mean"], 1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    # k3 of old vs new: (r − 1) − log r = 0.5 − 0.405465 = 0.094535 (r = 1.5); −0.5 + 0.693147 = 0.193147
    close(stats["approx_kl"], (2 * 0.094535 + 2 * 0.193147) / 4)  # 0.143841


def test_clip_higher_is_asymmetric():
    # ε_low 0.2, ε_high 0.28 (DAPO): r = 1.25 with A > 0 is inside [0.8, 1.28], so it still has gradient −1.25
    _, g, _ = one_token_rows([1.25, 1.25], [1.0, -1.0], clip_low=0.2, clip_high=0.28)
    close(g, [-1.25, 1.25])
    _, g, _ = one_token_rows([1.25], [1.0])  # symmetric 0.2: clipped, no gradient
    close(g, [0.0])


def test_dual_clip_caps_negative_advantages():
    # c = 3. row: (r, A)  max(−A r, −A clip(r))  then for A < 0: min(·, −A c)   dL/dlogp
    # 0: (4.0, −1)  max(4, 1.2) = 4 -> min(4, 3) = 3 (constant)                      0
    # 1: (2.0, −1)  max(2, 1.2) = 2 -> min(2, 3) = 2                                 −A r = 2
    # 2: (4.0, +1)  max(−4, −1.2) = −1.2 (clipped; dual clip not for A > 0)           0
    # 3: (0.5, +2)  max(−1, −1.6) = −1                                               −A r = −1
    loss, g, stats = one_token_rows([4.0, 2.0, 4.0, 0.5], [-1.0, -1.0, 1.0, 2.0], dual_clip=3.0)
    close(loss, 3 + 2 - 1.2 - 1)  # 2.8
    close(g, [0.0, 2.0, 0.0, -1.0])
    close(stats["dual_clip_frac"], 0.25)
    _, g, _ = one_token_rows([4.0], [-1.0])  # without the dual clip row 0 keeps gradient 4
    close(g, [4.0])
    with pytest.raises(ValueError):
        one_token_rows([1.0], [1.0], dual_clip=1.0)


def test_gspo_sequence_ratio():
    # one sequence of 2 tokens, ℓ − ℓ_old = [0.2, 0.4]: s = exp(0.3) = 1.349859 > 1.2 with A = 1: clipped, no gradient
    # a second with ℓ − ℓ_old = [−0.1, 0.1]: s = 1; seq-mean-token-mean gives −A·s·(1/2) per token = −0.5
    logp = t([[0.2, 0.4], [-0.1, 0.1]]).requires_grad_(True)
    loss, stats = policy_loss(logp, torch.zeros(2, 2, dtype=D), t([1.0, 1.0]), torch.ones(2, 2),
                              level="sequence", agg="seq-mean-token-mean")
    (g,) = torch.autograd.grad(loss, logp)
    close(loss, (-1.2 - 1.0) / 2)
    close(g, [[0.0, 0.0], [-0.25, -0.25]])  # −0.5 per token, / 2 sequences
    close(stats["ratio_mean"], (2 * math.exp(0.3) + 2 * 1.0) / 4)

    # GSPO-token form log s_it = sg[log s_i] + ℓ_it − sg[ℓ_it]: each token keeps its own advantage.
    # ℓ − ℓ_old = [−0.1, 0.1] (s = 1), A = [1, 3]: loss (−1 − 3)/2 = −2, dL/dℓ = [−1/2, −3/2]
    # (the plain sequence ratio would give both tokens −(1 + 3)/2 · 1/2 = −1)
    logp = t([[-0.1, 0.1]]).requires_grad_(True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=D), t([[1.0, 3.0]]), torch.ones(1, 2),
                          level="sequence", agg="seq-mean-token-mean")
    close(loss, -2.0)
    close(torch.autograd.grad(loss, logp)[0], [[-0.5, -1.5]])


LOSS = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])  # (2, 3); 9s are padding
MASK = t([[1, 1, 1], [1, 0, 0]])


def test_aggregation_modes_by_hand():
    close(aggregate(LOSS, MASK, "token-mean"), (1 + 2 + 3 + 4) / 4)  # 2.5
    close(aggregate(LOSS, MASK, "seq-mean-token-mean"), (6 / 3 + 4 / 1) / 2)  # 3.0
    close(aggregate(LOSS, MASK, "seq-mean-token-sum"), (6 + 4) / 2)  # 5.0
    close(aggregate(LOSS, MASK, "seq-mean-token-sum-norm", l_max=4), 10 / (2 * 4))  # 1.25
    with pytest.raises(ValueError, match="l_max"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(LOSS, MASK, "mean")


def test_token_mean_with_global_normaliser_is_independent_of_micro_batching():
    # whole step: (1 + 2 + 3 + 4) / 4 = 2.5. Two micro-batches with the step's count 4: 6/4 + 4/4 = 2.5.
    whole = aggregate(LOSS, MASK, "token-mean")
    split = aggregate(LOSS[:1], MASK[:1], "token-mean", normalizer=4) + aggregate(LOSS[1:], MASK[1:], "token-mean",
                                                                                  normalizer=4)
    close(split, whole)
    # the naive per-micro-batch mean, averaged over 2 accumulation steps: (6/3 + 4/1) / 2 = 3.0 ≠ 2.5
    naive = (aggregate(LOSS[:1], MASK[:1], "token-mean") + aggregate(LOSS[1:], MASK[1:], "token-mean")) / 2
    close(naive, 3.0)
    assert abs(float(naive - whole)) > 0.4

    # the same for gradients through policy_loss: accumulated micro-batch gradients = the whole-batch gradient
    logp = t([[-0.1, -0.2, -0.3], [-0.4, -5.0, -5.0]]).requires_grad_(True)
    adv = t([1.0, -2.0])
    loss, _ = policy_loss(logp, logp.detach(), adv, MASK)
    (g_whole,) = torch.autograd.grad(loss, logp)
    # on-policy: dL/dℓ = −A / 4 on valid tokens = [−0.25 ×3, 0.5]
    close(g_whole, [[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]])
    g_split = torch.zeros_like(logp)
    for rows in (slice(0, 1), slice(1, 2)):
        part, _ = policy_loss(logp[rows], logp[rows].detach(), adv[rows], MASK[rows], normalizer=4)
        g_split += torch.autograd.grad(part, logp)[0]
    close(g_split, g_whole)


def test_whiten_ignores_padding():
    # valid {1, 2, 3, 5}: mean 2.75, deviations −1.75 −0.75 0.25 2.25, Σ² = 8.75
    # population var 8.75/4 = 2.1875, sd 1.479020 -> −1.183216 −0.507093 0.169031 1.521278
    values = t([[1.0, 2.0, 3.0], [5.0, 100.0, -7.0]])
    w = whiten(values, MASK)
    close(w, [[-1.183216, -0.507093, 0.169031], [1.521278, 0.0, 0.0]])
    garbage = values.clone()
    garbage[1, 1:] = torch.tensor([float("nan"), 1e6])
    close(whiten(garbage, MASK), w)  # what the padding holds does not matter
    # Bessel (verl masked_whiten): var 8.75/3 = 2.916667, sd 1.707825: −1.75/1.707825 = −1.024695
    close(whiten(values, MASK, unbiased=True)[0, 0], -1.024695)
    with pytest.raises(ValueError):
        whiten(values, t([[1, 0, 0], [0, 0, 0]]), unbiased=True)  # one valid token: Bessel undefined


def test_gae_three_tokens_by_hand():
    # γ 0.9, λ 0.8 (γλ = 0.72). Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.8]
    #   δ2 = 1 + 0.9·0 − 0.8 = 0.2                  A2 = 0.2
    #   δ1 = 0 + 0.9·0.8 − 0.6 = 0.12               A1 = 0.12 + 0.72·0.2 = 0.264
    #   δ0 = 0 + 0.9·0.6 − 0.5 = 0.04               A0 = 0.04 + 0.72·0.264 = 0.23008
    # Row 1: two valid tokens, r = [0, 2, (99)], V = [0.3, 0.4, (99)]: nothing leaks from the padding
    #   δ1 = 2 + 0 − 0.4 = 1.6                      A1 = 1.6
    #   δ0 = 0 + 0.9·0.4 − 0.3 = 0.06               A0 = 0.06 + 0.72·1.6 = 1.212
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t([[0.5, 0.6, 0.8], [0.3, 0.4, 99.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.23008, 0.264, 0.2], [1.212, 1.6, 0.0]])
    close(ret, [[0.73008, 0.864, 1.0], [1.512, 2.0, 0.0]])  # A + V


def test_reinforce_pp_returns_reset_after_eos():
    # γ 0.5. Row 0: r = [0.1, 0.2, 1.0]: G2 = 1, G1 = 0.2 + 0.5 = 0.7, G0 = 0.1 + 0.35 = 0.45
    # Row 1: one valid token r = [0.5, (7), (7)]: G0 = 0.5, padding 0
    rewards = t([[0.1, 0.2, 1.0], [0.5, 7.0, 7.0]])
    close(reinforce_pp_returns(rewards, MASK, gamma=0.5), [[0.45, 0.7, 1.0], [0.5, 0.0, 0.0]])


def test_rloo_and_grpo_on_a_group_of_four():
    r = t([1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    # RLOO: R_i − mean of the other three. Group 0 (mean 1): 1 − 3/3 = 0, 0 − 4/3, 2 − 2/3, 1 − 3/3 = 0
    #       = 4/3·(R − 1) = [0, −4/3, 4/3, 0]. Group 1 all equal: 0.
    close(rloo(r, 4), [0, -4 / 3, 4 / 3, 0, 0, 0, 0, 0])
    # GRPO: Bessel sd of group 0 = sqrt((0 + 1 + 1 + 0)/3) = 0.816497; 1/(0.816497 + 1e-6) = 1.224743
    close(grpo(r, 4), [0, -1.224743, 1.224743, 0, 0, 0, 0, 0])  # tied group: 0, not NaN
    close(grpo(r, 4, scale="none"), [0, -1, 1, 0, 0, 0, 0, 0])  # Dr. GRPO
    # batch sd: mean 0.75, Σ dev² = .0625 + .5625 + 1.5625 + .0625 + 4·.0625 = 2.5, /7 -> sd 0.597614;
    # group 0 centred on its own mean (1): ±1/(0.597614 + 1e-6) = ±1.673317
    close(grpo(r, 4, scale="batch"), [0, -1.673317, 1.673317, 0, 0, 0, 0, 0])
    close(grpo(r, 1), [0.0] * 8)  # a group of one has no baseline: advantage 0
    close(reinforce(r), r)
    with pytest.raises(ValueError):
        rloo(r, 1)
    with pytest.raises(ValueError):
        grpo(r, 3)  # 8 rewards do not split into groups of 3


def test_moving_baseline_uses_earlier_batches_then_updates():
    mb = MovingBaseline(alpha=0.5)  # b = 0 on the first call
    close(mb.advantages(t([1.0, 3.0])), [1.0, 3.0])  # R − 0; then b = 0.5·0 + 0.5·2 = 1
    assert mb.b == 1.0
    close(mb.advantages(t([0.0, 4.0])), [-1.0, 3.0])  # R − 1; then b = 0.5·1 + 0.5·2 = 1.5
    state = json.loads(json.dumps(mb.state_dict()))
    other = MovingBaseline()
    other.load_state_dict(state)
    assert (other.alpha, other.b) == (0.5, 1.5)


def test_value_loss_clipped_by_hand():
    # row 0: V 1.5, V_old 1.0, R 2: (V − R)² = 0.25; clip(V) = 1.2, (1.2 − 2)² = 0.64 -> 0.5·0.64 = 0.32, grad 0
    # row 1: V 1.1, V_old 1.0, R 2: both 0.81 -> 0.405, grad (V − R) = −0.9
    values = t([[1.5], [1.1]]).requires_grad_(True)
    loss, stats = value_loss(values, t([[1.0], [1.0]]), t([[2.0], [2.0]]), torch.ones(2, 1), clip=0.2)
    (g,) = torch.autograd.grad(loss, values)
    close(loss, (0.32 + 0.405) / 2)
    close(g, [[0.0], [-0.9 / 2]])
    close(stats["vf_clip_frac"], 0.5)


def test_entropy_with_temperature_and_mask():
    # τ = 1: logits [0, ln 3] -> p = [.25, .75], H = .25·1.386294 + .75·0.287682 = 0.562335
    # τ = 0.5: logits / τ = [0, 2 ln 3] -> p = [.1, .9], H = .1·2.302585 + .9·0.105361 = 0.325083
    logits = t([[[0.0, math.log(3)], [5.0, -5.0]]])  # (1, 2, 2); position 1 is padding
    mask = t([[1, 0]])
    close(entropy(logits, mask), 0.562335)
    close(entropy(logits, mask, temperature=0.5), 0.325083)


def test_kl_estimators_by_hand():
    # ℓ = ln 0.5, ℓ_ref = ln 0.25: δ = ln 2 = 0.693147; k2 = δ²/2 = 0.240227; k3 = 0.5 − 1 + 0.693147 = 0.193147
    logp, ref = t([[math.log(0.5), 0.0]]), t([[math.log(0.25), 0.0]])
    close(kl_estimate(logp, ref, "k1")[0, 0], 0.693147)
    close(kl_estimate(logp, ref, "k2")[0, 0], 0.240227)
    close(kl_estimate(logp, ref, "k3")[0, 0], 0.193147)
    # reward placement, β = 0.1: −0.0693147 on the valid token, 0 on padding; detached
    r = kl_in_reward(logp.requires_grad_(True), ref, 0.1, t([[1, 0]]))
    close(r, [[-0.0693147, 0.0]])
    assert not r.requires_grad
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")
