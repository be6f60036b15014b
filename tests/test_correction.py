"""The engine/trainer mismatch correction (pglm/pg/correction.py): weights and statistics by hand, the
mutation the hand-worked case catches, no skew no change, and the stale-weights alarm."""

import math

import pytest
import torch

from pglm.pg.correction import mismatch_stats, mismatch_weights, stale_weights
from pglm.pg.losses import policy_loss

# log π_train − log π_engine per token: row 0 ratios 2, 0.5, 4; row 1 ratios 1.5, 1.6 and a pad
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [1.5, 1.6, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])
ENGINE = torch.full((2, 3), -1.0, dtype=torch.float64)
TRAIN = ENGINE + RATIOS.log()


def weights_and_stats(*args, **kwargs):
    weights, sums, maxima = mismatch_weights(*args, **kwargs)
    return weights, mismatch_stats(sums, maxima)


def test_token_tis_weights_are_the_ratio_capped_at_c():
    w, stats = weights_and_stats(TRAIN, ENGINE, MASK, "token_tis", cap=3.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 3.0], [1.5, 1.6, 0.0]], dtype=torch.float64))
    assert stats["is_clip_frac"] == pytest.approx(1 / 5)  # only the 4 is over the cap
    assert stats["is_ratio_mean"] == pytest.approx((2 + 0.5 + 4 + 1.5 + 1.6) / 5)
    assert stats["is_ratio_max"] == pytest.approx(4.0)
    diffs = [math.log(2), math.log(2), math.log(4), math.log(1.5), math.log(1.6)]
    assert stats["logp_diff_mean"] == pytest.approx(sum(diffs) / 5)
    assert stats["logp_diff_max"] == pytest.approx(math.log(4))


def test_seq_mask_drops_exactly_the_sequences_over_the_cap():
    w, stats = weights_and_stats(TRAIN, ENGINE, MASK, "seq_mask", cap=3.0)
    # row 0: ρ = 2 · 0.5 · 4 = 4 > 3, dropped; row 1: ρ = 1.5 · 1.6 = 2.4, kept with weight 2.4 on its tokens
    assert torch.allclose(w, torch.tensor([[0.0, 0.0, 0.0], [2.4, 2.4, 0.0]], dtype=torch.float64))
    assert stats["is_clip_frac"] == pytest.approx(0.5)
    assert stats["is_ratio_mean"] == pytest.approx((4 + 2.4) / 2)
    assert stats["is_ratio_max"] == pytest.approx(4.0)


def test_the_hand_worked_case_tells_a_geometric_mean_from_the_sequence_ratio():
    """The mutation: a per-token geometric mean (exp of the mean log-ratio) in place of Π_t ρ_t keeps row 0
    (4^(1/3) ≈ 1.59 ≤ 3), so the weights above are not what it gives."""
    log_ratio = (TRAIN - ENGINE) * MASK
    geo = (log_ratio.sum(1) / MASK.sum(1)).exp()
    mutated = torch.where(geo <= 3.0, geo, torch.zeros_like(geo))[:, None] * MASK
    w, _ = weights_and_stats(TRAIN, ENGINE, MASK, "seq_mask", cap=3.0)
    assert not torch.allclose(mutated, w)


@pytest.mark.parametrize("mode", ["none", "token_tis", "seq_mask"])
def test_without_skew_the_corrected_gradient_is_the_uncorrected_one(mode):
    torch.manual_seed(0)
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    w, stats = weights_and_stats(logp.detach(), logp.detach(), MASK, mode, cap=3.0)
    assert stats["logp_diff_max"] == 0.0 and stats["is_clip_frac"] == 0.0

    def grad(weights):
        (g,) = torch.autograd.grad(policy_loss(logp, logp.detach(), adv, MASK, weights=weights)[0], logp)
        return g

    assert torch.equal(grad(w), grad(None))


def test_weights_scale_each_token_s_gradient():
    """At θ = θ_old the token-mean loss is −Σ A·w_t·ℓ_t / n: each token's gradient is −A·w_t / n."""
    logp = TRAIN.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w, _ = weights_and_stats(TRAIN, ENGINE, MASK, "token_tis", cap=3.0)
    loss, _ = policy_loss(logp, TRAIN, adv, MASK, weights=w)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -adv[:, None] * w / 5)


@pytest.mark.parametrize("mode", ["none", "token_tis", "seq_mask"])
def test_the_figures_of_two_ranks_combined_are_those_of_the_whole_batch(mode):
    """Rank 0 holds row 0 (3 tokens), rank 1 row 1 (2 tokens): their totals, summed and maxed as the
    collectives do, give the figures of both rows in one process."""
    _, whole = weights_and_stats(TRAIN, ENGINE, MASK, mode, cap=3.0)
    parts = [mismatch_weights(TRAIN[i : i + 1], ENGINE[i : i + 1], MASK[i : i + 1], mode, cap=3.0) for i in (0, 1)]
    combined = mismatch_stats(parts[0][1] + parts[1][1], torch.maximum(parts[0][2], parts[1][2]))
    assert combined == pytest.approx(whole)
    # the mutation: the mean of the two ranks' means weighs 2 tokens as much as 3, and is not the whole's
    means = [mismatch_stats(sums, maxima)["logp_diff_mean"] for _, sums, maxima in parts]
    assert sum(means) / 2 != pytest.approx(whole["logp_diff_mean"])


def test_bad_mode_or_cap():
    with pytest.raises(ValueError, match="mode"):
        mismatch_weights(TRAIN, ENGINE, MASK, "icepop", cap=3.0)
    with pytest.raises(ValueError, match="cap"):
        mismatch_weights(TRAIN, ENGINE, MASK, "token_tis", cap=1.0)


def test_the_stale_weights_alarm():
    before = torch.tensor([-1.0, -2.0, -0.5])
    after = torch.tensor([-1.3, -1.6, -0.9])
    assert stale_weights(before + 0.01, before, after)  # the engine still has the old weights
    assert not stale_weights(after - 0.01, before, after)  # synced: at the new weights, up to kernel noise
    assert not stale_weights(before, before, before + 1e-4, tol=1e-3)  # an update too small to tell
    assert stale_weights(before + 0.5, before, before + 1e-4, tol=1e-3)  # ... from an engine far from both
    # within the engine's noise of the new weights, even if nearer the old: synced
    assert not stale_weights(after + 5e-7, after + 3e-7, after, tol=1e-6)
