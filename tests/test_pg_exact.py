"""Exact expected gradients of pglm's estimators on an enumerable toy (docs/estimators.md §3, Tier 0).

Toy: vocabulary {a, b, EOS}, at most 3 tokens. A response stops at EOS or after 3 tokens:
1 + 2 + 4 = 7 responses end in EOS and 2³ = 8 are truncated, 15 per prompt. Two prompts; tabular
logits θ[prompt, prefix, vocab] over the 7 non-terminal prefixes, float64; temperature 0.7; a reward
with three levels that depends on the prompt, minus a truncation penalty.

Ground truth (∇J, ∇KL_seq) comes from autograd over the 15 responses. An estimator's exact E[ĝ]
comes from enumerating all 15³ = 3375 groups of G = 3 per prompt, weighting each by
P(group) = Π π(y_i) (stop-gradient) and backpropagating Σ P(group)·loss(group) through pglm's own
advantage and loss functions: no sampling, so it is compared to 1e-8 relative.

The weight is passed by scaling each row's advantage by P(group) ≥ 0: the PPO surrogate
max(−A r, −A clip(r)), its dual clip min(·, −A c) and every aggregation are positively homogeneous
of degree 1 in A, so this multiplies that row's loss by P(group) exactly.
"""

import itertools

import numpy as np
import pytest
import torch

from pglm.pg.advantages import MovingBaseline, gae, grpo, reinforce, reinforce_pp_returns, rloo
from pglm.pg.kl import kl_estimate, kl_in_reward
from pglm.pg.logprobs import token_logprobs
from pglm.pg.losses import aggregate, policy_loss

A, B_, EOS = 0, 1, 2
V, T, TAU, G, N_PROMPTS = 3, 3, 0.7, 3, 2
PREFIXES = [(), (A,), (B_,), (A, A), (A, B_), (B_, A), (B_, B_)]
PIDX = {p: i for i, p in enumerate(PREFIXES)}
SEQS = [body + ((EOS,) if n < T else ()) for n in range(T + 1) for body in itertools.product((A, B_), repeat=n)]
assert len(SEQS) == 15 and sum(s[-1] == EOS for s in SEQS) == 7


def reward(prompt, seq):
    """3 levels by how often the prompt's wanted token appears, −0.3 when truncated (no EOS)."""
    hits = sum(t == (A if prompt == 0 else B_) for t in seq)
    return {0: 0.0, 1: 0.5}.get(hits, 1.0) - 0.3 * (seq[-1] != EOS)


# Per-response constants: targets padded with EOS (masked), the prefix each position conditions on.
TARGETS = torch.tensor([list(s) + [EOS] * (T - len(s)) for s in SEQS])  # (15, T)
MASK = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in SEQS], dtype=torch.float64)  # (15, T)
PREFIX_OF = torch.tensor([[PIDX[s[:t]] if t < len(s) else 0 for t in range(T)] for s in SEQS])  # (15, T)
LEN = MASK.sum(1)  # (15,)
R = torch.tensor([[reward(p, s) for s in SEQS] for p in range(N_PROMPTS)], dtype=torch.float64)  # (2, 15)
GEN = torch.Generator().manual_seed(0)
THETA0 = torch.randn(N_PROMPTS, len(PREFIXES), V, generator=GEN, dtype=torch.float64)  # (2, 7, 3)
THETA_REF = THETA0 + 0.7 * torch.randn(N_PROMPTS, len(PREFIXES), V, generator=GEN, dtype=torch.float64)
TUPLES = torch.cartesian_prod(*[torch.arange(15)] * G)  # (3375, G)
ROWS = (torch.arange(N_PROMPTS)[:, None, None] * 15 + TUPLES).reshape(-1)  # (2·3375·G,), groups contiguous


def tok_logprobs(theta):
    """θ (2, 7, 3) -> per-token log-probs (2·15, T) through pglm's shared log-prob path, zero on padding."""
    logits = theta[:, PREFIX_OF]  # (2, 15, T, V): logits at each position are those of its prefix
    lp = token_logprobs(logits.reshape(-1, T, V), TARGETS.repeat(N_PROMPTS, 1), TAU)  # (30, T)
    return lp * MASK.repeat(N_PROMPTS, 1)


def seq_logprobs(theta):
    return tok_logprobs(theta).sum(1).view(N_PROMPTS, 15)  # (2, 15)


def grad(fn):
    theta = THETA0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


def J(theta):
    return (seq_logprobs(theta).exp() * R).sum(1).mean()


def kl_seq(theta):
    return (seq_logprobs(theta).exp() * (seq_logprobs(theta) - seq_logprobs(THETA_REF))).sum(1).mean()


GRAD_J = grad(J)


def rel_err(g, target):
    return float((g - target).norm() / target.norm())


def cosine(g, target):
    return float((g * target).sum() / (g.norm() * target.norm()))


def assert_close(g, target, tol=1e-8):
    assert rel_err(g, target) < tol, f"relative error {rel_err(g, target):.3g}"


def group_grad(adv_fn, **loss_kw):
    """Exact E[−∇loss] of the group estimator (advantages from adv_fn(R_rows)) -> (2, 7, 3)."""
    loss_kw = {"agg": "seq-mean-token-sum", **loss_kw}

    def loss(theta):
        lp = tok_logprobs(theta)[ROWS]  # (N, T), N = 2·3375·G
        mask = MASK.repeat(N_PROMPTS, 1)[ROWS]  # (N, T)
        p_group = seq_logprobs(theta).detach().exp().reshape(-1)[ROWS].view(-1, G).prod(1)  # (2·3375,)
        adv = adv_fn(R.reshape(-1)[ROWS]) * p_group.repeat_interleave(G)  # (N,)
        # one "step" = one group per prompt: 2·G sequences
        out, _ = policy_loss(lp, lp.detach(), adv, mask, normalizer=N_PROMPTS * G, **loss_kw)
        return out

    return -grad(loss)


def expected_by_formula(adv_np, per_token_mean):
    """Independent E[ĝ] = mean_x Σ_y π(y) ā(y) w(y) ∇log π(y), ā(y) = E[A_1 | y_1 = y], w = 1 or 1/|y|.

    adv_np(rewards (n, G) numpy) -> advantages (n, G): a separate numpy implementation.
    By exchangeability of the group, E[(1/G) Σ_i A_i w(y_i) ∇log π(y_i)] = E[A_1 w(y_1) ∇log π(y_1)].
    """
    pi = seq_logprobs(THETA0).exp().numpy()  # (2, 15)
    idx = TUPLES.numpy()
    a_bar = np.stack([
        np.bincount(idx[:, 0], weights=np.prod(pi[p][idx[:, 1:]], axis=1) * adv_np(R[p].numpy()[idx])[:, 0],
                    minlength=15)
        for p in range(N_PROMPTS)])  # (2, 15)
    w = (1.0 / LEN).numpy() if per_token_mean else np.ones(15)
    coef = torch.tensor(pi * a_bar * w)  # (2, 15), constant
    return grad(lambda th: (coef * seq_logprobs(th)).sum(1).mean())


def grpo_np(r, eps=1e-6):
    return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)


def dr_grpo_np(r):
    return r - r.mean(1, keepdims=True)


def test_toy_is_a_distribution_and_log_probs_follow_the_prefix():
    pi = seq_logprobs(THETA0).exp()
    assert torch.allclose(pi.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    # 'ab<EOS>' under prompt 1 by hand from the table: π(a|()) π(b|a) π(EOS|ab), logits / τ
    p = torch.softmax(THETA0[1] / TAU, -1)  # (7, 3)
    want = p[PIDX[()], A] * p[PIDX[(A,)], B_] * p[PIDX[(A, B_)], EOS]
    assert torch.isclose(pi[1, SEQS.index((A, B_, EOS))], want, rtol=1e-12)
    assert len(set(R.reshape(-1).tolist())) >= 5  # levels {0, .5, 1} minus the truncation penalty


def test_reinforce_token_sum_is_unbiased():
    assert_close(group_grad(reinforce), GRAD_J)


def test_rloo_is_unbiased():
    assert_close(group_grad(lambda r: rloo(r, G)), GRAD_J)


def test_moving_baseline_from_earlier_batches_is_unbiased():
    # each group is one batch, and every batch finds the same b = 0.37 left by earlier batches (fixed b);
    # folding the batch in first would give (1 − (1−α)/G)·∇J instead
    mb, start = MovingBaseline(alpha=0.9), {"alpha": 0.9, "b": 0.37}

    def adv(r):  # r (N,) -> (N,), one call per group of G
        out = []
        for batch in r.view(-1, G):
            mb.load_state_dict(start)
            out.append(mb.advantages(batch))
        return torch.cat(out)

    assert_close(group_grad(adv), GRAD_J)


def test_mean_centred_token_sum_is_scaled_by_g_minus_1_over_g():
    assert_close(group_grad(lambda r: grpo(r, G, scale="none")), (G - 1) / G * GRAD_J)


def test_dr_grpo_constant_l_max():
    g = group_grad(lambda r: grpo(r, G, scale="none"), agg="seq-mean-token-sum-norm", l_max=T)
    assert_close(g, (G - 1) / (G * T) * GRAD_J)


@pytest.mark.parametrize("agg", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_grpo_with_std_matches_its_own_expectation_not_grad_j(agg):
    g = group_grad(lambda r: grpo(r, G), agg=agg)
    assert_close(g, expected_by_formula(grpo_np, per_token_mean=agg == "seq-mean-token-mean"))
    # difficulty bias (and length bias for token-mean): neither ∇J nor a multiple of it
    assert cosine(g, GRAD_J) < 0.999, cosine(g, GRAD_J)
    assert rel_err(g, GRAD_J) > 0.05


def test_dr_grpo_seq_mean_token_mean_has_length_bias():
    g = group_grad(lambda r: grpo(r, G, scale="none"), agg="seq-mean-token-mean")
    assert_close(g, expected_by_formula(dr_grpo_np, per_token_mean=True))
    assert cosine(g, GRAD_J) < 0.999, cosine(g, GRAD_J)


def test_gspo_on_policy_equals_seq_mean_token_mean():
    g = group_grad(lambda r: grpo(r, G), level="sequence", agg="seq-mean-token-mean",
                   clip_low=3e-4, clip_high=4e-4)
    assert_close(g, expected_by_formula(grpo_np, per_token_mean=True))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ppo_clip_at_theta_old_equals_unclipped(level):
    kw = {"agg": "seq-mean-token-mean", "level": level}
    clipped = group_grad(lambda r: grpo(r, G), clip_low=0.2, clip_high=0.28, dual_clip=3.0, **kw)
    unclipped = group_grad(lambda r: grpo(r, G), clip_low=1e9, clip_high=1e9, **kw)
    assert_close(clipped, unclipped)
    assert_close(clipped, expected_by_formula(grpo_np, per_token_mean=True))


def exact_values(theta):
    """V(x, prefix) = E[R | x, prefix] by enumeration -> per-token values (30, T), detached."""
    pi = seq_logprobs(theta).detach().exp()  # (2, 15)
    v_tab = torch.zeros(N_PROMPTS, len(PREFIXES), dtype=torch.float64)
    for s, k in PIDX.items():
        ext = torch.tensor([y[:len(s)] == s for y in SEQS])  # responses extending prefix s
        v_tab[:, k] = (pi[:, ext] * R[:, ext]).sum(1) / pi[:, ext].sum(1)
    return v_tab[:, PREFIX_OF].reshape(-1, T) * MASK.repeat(N_PROMPTS, 1)  # (30, T)


def single_grad(adv_tok_fn):
    """Exact E[−∇loss] for one response per prompt with per-token advantages (30, T)."""
    mask = MASK.repeat(N_PROMPTS, 1)  # (30, T)

    def loss(theta):
        lp = tok_logprobs(theta)  # (30, T)
        pi = seq_logprobs(theta).detach().exp().reshape(-1, 1)  # (30, 1)
        out, _ = policy_loss(lp, lp.detach(), adv_tok_fn(theta) * pi, mask,
                             agg="seq-mean-token-sum", normalizer=N_PROMPTS)
        return out

    return -grad(loss)


def last_token_reward():
    r = torch.zeros(N_PROMPTS * 15, T, dtype=torch.float64)
    r[torch.arange(N_PROMPTS * 15), LEN.long().repeat(N_PROMPTS) - 1] = R.reshape(-1)
    return r  # (30, T)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_gae_with_exact_values_is_unbiased_for_any_lambda(lam):
    mask = MASK.repeat(N_PROMPTS, 1)
    g = single_grad(lambda th: gae(last_token_reward(), exact_values(th), mask, 1.0, lam)[0])
    assert_close(g, GRAD_J)
    if lam < 1:  # with V = 0 and λ < 1 the bootstrapped values are wrong: biased
        g0 = single_grad(lambda th: gae(last_token_reward(), torch.zeros_like(mask), mask, 1.0, lam)[0])
        assert rel_err(g0, GRAD_J) > 0.01


def test_kl_values_k1_and_k3_sum_to_sequence_kl():
    lp, ref = tok_logprobs(THETA0), tok_logprobs(THETA_REF)  # (30, T)
    mask = MASK.repeat(N_PROMPTS, 1)
    pi = seq_logprobs(THETA0).exp().reshape(-1)  # (30,)
    target = kl_seq(THETA0)
    for kind in ("k1", "k3"):
        value = (pi * (kl_estimate(lp, ref, kind) * mask).sum(1)).sum() / N_PROMPTS
        assert abs(float(value - target)) < 1e-12 * float(target), kind
    k2 = (pi * (kl_estimate(lp, ref, "k2") * mask).sum(1)).sum() / N_PROMPTS
    assert abs(float(k2 - target)) > 1e-3  # k2 is biased in value


GRAD_KL = grad(kl_seq)


def test_k1_in_reward_gives_grad_kl_seq():
    mask = MASK.repeat(N_PROMPTS, 1)

    def adv(theta):  # reward-to-go of −β·k1 with β = 1; the −∇loss of that is −∇KL_seq
        return reinforce_pp_returns(kl_in_reward(tok_logprobs(theta), tok_logprobs(THETA_REF), 1.0, mask),
                                    mask, gamma=1.0)

    assert_close(-single_grad(adv), GRAD_KL)


def prefix_visits(theta):
    """d(x, s): probability that the policy reaches prefix s (stop-gradient), (2, 7)."""
    p = torch.softmax(theta.detach() / TAU, -1)  # (2, 7, 3)
    d = torch.ones(N_PROMPTS, len(PREFIXES), dtype=torch.float64)
    for s, k in PIDX.items():
        for t in range(len(s)):
            d[:, k] = d[:, k] * p[:, PIDX[s[:t]], s[t]]
    return d


def kl_in_loss_grad(kind):
    """∇ of Σ_y sg[π(y)] Σ_t k_t through kl_estimate + aggregate, per prompt averaged."""
    mask = MASK.repeat(N_PROMPTS, 1)

    def loss(theta):
        lp = tok_logprobs(theta)
        pi = seq_logprobs(theta).detach().exp().reshape(-1, 1)  # (30, 1)
        return aggregate(kl_estimate(lp, tok_logprobs(THETA_REF), kind) * pi, mask, "seq-mean-token-sum",
                         normalizer=N_PROMPTS)

    return grad(loss)


def test_k3_in_loss_gives_per_token_forward_kl_gradient_not_grad_kl_seq():
    # independent: Σ_s d(s) ∇KL(ref(·|s) ‖ π(·|s)), straight from the tables (no sequences, no log-prob path)
    def forward_kl(theta):
        logp, logr = torch.log_softmax(theta / TAU, -1), torch.log_softmax(THETA_REF / TAU, -1)  # (2, 7, 3)
        return (prefix_visits(theta) * (logr.exp() * (logr - logp)).sum(-1)).sum(1).mean()

    g = kl_in_loss_grad("k3")
    assert_close(g, grad(forward_kl))
    assert rel_err(g, GRAD_KL) > 0.05


def test_k2_in_loss_gives_partial_reverse_kl_and_k1_in_loss_gives_nothing():
    def partial(theta):  # Σ_s d(s) Σ_v sg[π(v|s) δ(v|s)] log π(v|s)
        logp, logr = torch.log_softmax(theta / TAU, -1), torch.log_softmax(THETA_REF / TAU, -1)
        coef = (logp.exp() * (logp - logr)).detach()
        return (prefix_visits(theta)[..., None] * coef * logp).sum((1, 2)).mean()

    assert_close(kl_in_loss_grad("k2"), grad(partial))
    assert rel_err(kl_in_loss_grad("k2"), GRAD_KL) > 0.05
    assert float(kl_in_loss_grad("k1").abs().max()) < 1e-12  # E[∇ℓ] = 0
