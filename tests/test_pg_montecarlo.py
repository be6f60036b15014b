"""Monte-Carlo tier of the estimator tests (docs/estimators.md §3, Tier 1): through the library's own sampler.

Where tests/test_pg_exact.py checks the estimators' algebra on a tabular policy, this file runs the
whole training-time path on real (tiny, float64) models: `pglm.sampling.generate` (left padding, KV
cache / LSTM state, groups sharing a prefill, EOS in the response mask, sampler log-probs), then
`pglm.train.rl.score` (the training-time log-prob path), `pglm.pg.advantages` and
`pglm.pg.losses.policy_loss`. The mean gradient of many sampled chunks is z-tested against the exact
∇J computed by enumeration.

Toy: ids pad=0, bos=1, eos=2, a=3, b=4; the models sample over all 5 ids. At most 3 new tokens, so a
response is eos after 0, 1 or 2 free tokens (4 non-eos ids: 1 + 4 + 16 = 21) or 3 free tokens and
truncated (64): 85 responses per prompt. Two prompts of different lengths, [bos, a] and
[bos, b, a, b], so the first is left-padded by 2. Temperature τ = 0.7. The reward has levels
{0, 0.5, 1} by how often the prompt's wanted token (a for the first prompt, b for the second) occurs,
minus 0.3 when the response is truncated.

Ground truth: J = mean_x Σ_y π_θ(y|x) R(x, y), with π from the model's full forward over each of the
2·85 enumerated rows (`shifted_logprobs`: logits/τ, log_softmax, gather at the shift), masked up to
and including eos; ∇J by autograd.

Monte Carlo: K chunks of n groups (G = 4) per prompt, drawn with `generate`; one backward per chunk
gives a chunk-mean gradient. The models have a few thousand parameters, so the gradient is compared
along D = 32 fixed directions: the unit vector along ∇J (the direction a scale error shows in) and 31
seeded Gaussian unit vectors. z_d = (mean_k ĝ_k·u_d − ∇J·u_d) / (sd_k(ĝ_k·u_d)/√K); the check passes
if max_d |z_d| < 4.9. Bonferroni: with K = 40 chunks (t₃₉ tails) P(|t₃₉| > 4.9) ≈ 1.7e-5, so the
family-wise false-alarm rate over the 32 directions is about 5e-4 (under 1e-3 for K ≥ 30). Seeds are
fixed, so CI is deterministic anyway.

Mutations (each an alternative function applied to the real outputs, none edits library code) must
make the check fail: scoring off by one, log-probs without τ, EOS out of the loss mask, pad = EOS
(mask from `tokens != pad_id`), micro-batch token-mean with micro-batches of 2 sequences (compared
with the expectation of the global token-mean of RLOO: ∇J / E|y|, up to a ratio bias O(1/chunk) far
below SE), GRPO's std normalisation (compared with ∇J). pad = EOS samples with `generate(pad_id=eos)`
from the same seeds: the draws are identical, the prompt's eos padding is neutralised by n_pad, so its
figure equals that of "EOS masked out": the harm of pad = EOS is exactly losing EOS from the mask.

Figures (max|z|, default size / slow size), gpt then lstm: correct 2.67/1.67, 1.81/1.38; global
token-mean 2.58/1.70, 1.77/1.33; off by one 106/172, 58/116; no τ 66/98, 59/92; EOS masked out and
pad = EOS 65/103, 19.5/28.7; micro-batch token-mean 16.8/33.8, 14.1/21.7; GRPO std 91/154, 43/83.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from pglm.models import build_model, model_config
from pglm.pg.advantages import grpo, rloo
from pglm.pg.logprobs import shifted_logprobs, token_logprobs
from pglm.pg.losses import policy_loss
from pglm.sampling import Generation, generate
from pglm.train.rl import score

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4
V, N_NEW, TAU, G = 5, 3, 0.7, 4
PROMPTS = [[BOS, A], [BOS, B, A, B]]
WANTED = torch.tensor([A, B])  # the token each prompt rewards
FREE = [t for t in range(V) if t != EOS]  # 4 non-eos ids, pad and bos included
N_DIRS, Z_MAX = 32, 4.9
DEFAULT = dict(n_groups=200, n_chunks=40)  # per chunk and prompt: 200 groups = 800 responses
SLOW = dict(n_groups=500, n_chunks=50)
SPREAD = {"gpt": 0.15, "lstm": 0.4}  # sd of the seeded noise added to every weight


def build(arch: str) -> torch.nn.Module:
    """A tiny float64 model whose weights are spread out (seeded) so the policy is far from uniform."""
    torch.manual_seed(0)
    kw = dict(n_head=2) if arch == "gpt" else {}
    cfg = model_config(arch, "tiny", vocab_size=V, n_layer=1, d_model=16, block_size=16, **kw)
    model = build_model(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(SPREAD[arch] * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def reward(prompt_id: torch.Tensor, response: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor):
    """prompt_id (B,), response (B, N), mask (B, N) bool incl. eos, finished (B,) -> R (B,) float64."""
    hits = ((response == WANTED[prompt_id][:, None]) & mask).sum(1)
    level = torch.where(hits == 0, 0.0, torch.where(hits == 1, 0.5, 1.0)).double()
    return level - 0.3 * (~finished).double()


# ---- ground truth by enumeration ----

RESPONSES = [(*body, EOS) for n in range(N_NEW) for body in itertools.product(FREE, repeat=n)]
RESPONSES += list(itertools.product(FREE, repeat=N_NEW))  # truncated
assert len(RESPONSES) == 85


def enumeration() -> Generation:
    """Every (prompt, response) row, 2·85, left-padded like `generate` does (pad after eos)."""
    P = max(map(len, PROMPTS))
    rows, n_pad, mask = [], [], []
    for prompt in PROMPTS:
        for y in RESPONSES:
            rows.append([PAD] * (P - len(prompt)) + prompt + list(y) + [PAD] * (N_NEW - len(y)))
            n_pad.append(P - len(prompt))
            mask.append([True] * len(y) + [False] * (N_NEW - len(y)))
    mask = torch.tensor(mask)
    finished = torch.tensor([y[-1] == EOS and len(y) <= N_NEW for y in RESPONSES] * len(PROMPTS))
    return Generation(torch.tensor(rows), torch.tensor(n_pad), P, mask, torch.zeros(mask.shape, dtype=torch.float64),
                      finished)


ENUM = enumeration()
ENUM_PROMPT = torch.arange(len(PROMPTS)).repeat_interleave(len(RESPONSES))
ENUM_R = reward(ENUM_PROMPT, ENUM.response, ENUM.response_mask, ENUM.finished)  # (170,)


def enum_seq_logprobs(model) -> torch.Tensor:
    """log π(y|x) for all 2·85 rows by full recompute, (2, 85)."""
    lp = shifted_logprobs(model, ENUM.tokens, ENUM.n_pad, TAU)[:, ENUM.prompt_len - 1 :]  # (170, N)
    return (lp * ENUM.response_mask).sum(1).view(len(PROMPTS), -1)


def flat_grad(model, loss) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


@functools.cache
def truth(arch: str):
    """(model, ∇J (P,), E|y| averaged over prompts, directions (D, P)) for `arch`."""
    model = build(arch)
    seq_lp = enum_seq_logprobs(model)
    J = (seq_lp.exp() * ENUM_R.view(len(PROMPTS), -1)).sum(1).mean()
    grad_j = flat_grad(model, J)
    lengths = ENUM.response_mask.sum(1).double().view(len(PROMPTS), -1)
    mean_len = float((seq_lp.detach().exp() * lengths).sum(1).mean())
    gen = torch.Generator().manual_seed(2)
    dirs = torch.randn(N_DIRS, grad_j.numel(), generator=gen, dtype=torch.float64)
    dirs[0] = grad_j
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    return model, grad_j, mean_len, dirs


# ---- Monte Carlo through the sampler ----


@functools.cache
def draws(arch: str, n_groups: int, n_chunks: int, pad_id: int = PAD) -> list[Generation]:
    model = truth(arch)[0]
    out = []
    for k in range(n_chunks):
        gen = torch.Generator().manual_seed(1000 + k)
        out.append(generate(model, PROMPTS * n_groups, N_NEW, eos_id=EOS, pad_id=pad_id, temperature=TAU,
                            group_size=G, generator=gen))
    return out


def prompt_ids(g: Generation) -> torch.Tensor:
    return torch.arange(g.tokens.shape[0]) // G % len(PROMPTS)  # rows: p0 ×G, p1 ×G, p0 ×G, ...


def rewards_of(g: Generation) -> torch.Tensor:
    return reward(prompt_ids(g), g.response, g.response_mask, g.finished)


def rloo_token_sum(model, g, logp=None, mask=None, adv_fn=None):
    """The correct estimator: RLOO with the token-sum loss, on-policy (old = sampler log-probs)."""
    if logp is None:
        logp, _, _ = score(model, None, g.tokens, g.n_pad, g.prompt_len, TAU)
    adv = (adv_fn or (lambda r: rloo(r, G)))(rewards_of(g))
    mask = g.response_mask if mask is None else mask
    loss, _ = policy_loss(logp, g.logprobs, adv, mask, agg="seq-mean-token-sum")
    return loss


def rloo_token_mean(model, g):
    """Global token-mean (one normaliser for the whole step): E[ĝ] ≈ ∇J / E|y|."""
    logp, _, _ = score(model, None, g.tokens, g.n_pad, g.prompt_len, TAU)
    loss, _ = policy_loss(logp, g.logprobs, rloo(rewards_of(g), G), g.response_mask, agg="token-mean")
    return loss


# mutations: each takes the real outputs and gets one thing wrong


def off_by_one(model, g):
    """Logits at the response token's own position score it (the shift dropped)."""
    h = model.features(g.tokens, g.n_pad)[:, g.prompt_len :]  # should be [P-1 : -1]
    return rloo_token_sum(model, g, logp=token_logprobs(model.lm_head(h), g.response, TAU))


def no_temperature(model, g):
    _, h, _ = score(model, None, g.tokens, g.n_pad, g.prompt_len, TAU)
    return rloo_token_sum(model, g, logp=token_logprobs(model.lm_head(h), g.response))  # τ left out


def eos_masked_out(model, g):
    return rloo_token_sum(model, g, mask=g.response_mask & (g.response != EOS))


def pad_is_eos(model, g):
    """`g` sampled with pad_id = eos_id; the loss mask then derived as tokens != pad_id."""
    return rloo_token_sum(model, g, mask=g.response != EOS)


MICRO = 2  # sequences per micro-batch (half a group)


def micro_batch_token_mean(model, g):
    """Each micro-batch divided by its own token count, the step loss their mean (grad accumulation).

    Vectorised: row i's advantage is divided by its micro-batch's token count n_mb(i) ≥ 1 and the token
    sums averaged over micro-batches. The loss is positively homogeneous of degree 1 in A, so this is
    exactly mean_mb policy_loss(micro-batch, agg="token-mean").
    """
    logp, _, _ = score(model, None, g.tokens, g.n_pad, g.prompt_len, TAU)
    n_tok = g.response_mask.sum(1).double().view(-1, MICRO).sum(1)  # (B / MICRO,)
    adv = rloo(rewards_of(g), G) / n_tok.repeat_interleave(MICRO)
    loss, _ = policy_loss(logp, g.logprobs, adv, g.response_mask, agg="seq-mean-token-sum",
                          normalizer=logp.shape[0] // MICRO)
    return loss


def grpo_std(model, g):
    return rloo_token_sum(model, g, adv_fn=lambda r: grpo(r, G))


ESTIMATORS = {
    "correct": (rloo_token_sum, "grad_j", PAD),
    "token_mean": (rloo_token_mean, "grad_j/len", PAD),
    "off_by_one": (off_by_one, "grad_j", PAD),
    "no_temperature": (no_temperature, "grad_j", PAD),
    "eos_masked_out": (eos_masked_out, "grad_j", PAD),
    "pad_is_eos": (pad_is_eos, "grad_j", EOS),
    "micro_batch_token_mean": (micro_batch_token_mean, "grad_j/len", PAD),
    "grpo_std": (grpo_std, "grad_j", PAD),
}
PASSING = ("correct", "token_mean")


@functools.cache
def max_abs_z(arch: str, name: str, n_groups: int, n_chunks: int) -> float:
    model, grad_j, mean_len, dirs = truth(arch)
    fn, target, pad_id = ESTIMATORS[name]
    mu = dirs @ (grad_j / mean_len if target == "grad_j/len" else grad_j)  # (D,)
    proj = torch.stack([dirs @ -flat_grad(model, fn(model, g))
                        for g in draws(arch, n_groups, n_chunks, pad_id)])  # (K, D) chunk-mean gradients
    z = (proj.mean(0) - mu) / (proj.std(0) / n_chunks**0.5)
    return float(z.abs().max())


# ---- tests ----


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny float64 ops: a second intra-op thread only adds overhead, and 20-50x slowdowns when the two
    cores are shared with another process. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_enumeration_is_a_distribution_and_matches_the_sampler(arch):
    model = truth(arch)[0]
    with torch.no_grad():
        pi = enum_seq_logprobs(model).exp()  # (2, 85)
    torch.testing.assert_close(pi.sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(pi.min()) > 1e-7 and float(pi.max()) < 0.5  # every response reachable, none dominant
    assert len(set(ENUM_R.tolist())) >= 5  # 3 levels, and the truncation penalty
    g = draws(arch, **DEFAULT)[0]
    with torch.no_grad():
        logp, _, _ = score(model, None, g.tokens, g.n_pad, g.prompt_len, TAU)
    torch.testing.assert_close(logp * g.response_mask, g.logprobs, rtol=0, atol=1e-10)  # on-policy: ratio 1
    # the sampled frequency of each length is near its enumerated probability
    lengths = ENUM.response_mask.sum(1).view(2, -1)
    for p in range(2):
        rows = prompt_ids(g) == p
        for n in range(1, N_NEW + 1):
            want = float(pi[p][lengths[p] == n].sum())
            got = float((g.response_mask[rows].sum(1) == n).double().mean())
            assert abs(got - want) < 5 * (want * (1 - want) / int(rows.sum())) ** 0.5 + 1e-9


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("name", PASSING)
def test_unbiased_estimators_pass(arch, name):
    z = max_abs_z(arch, name, **DEFAULT)
    assert z < Z_MAX, f"{arch} {name}: max|z| = {z:.2f}"


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n not in PASSING])
def test_mutations_fail(arch, name):
    z = max_abs_z(arch, name, **DEFAULT)
    assert z > Z_MAX, f"{arch} {name}: max|z| = {z:.2f} — the check does not catch this bug"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_larger_n(arch, name):
    z = max_abs_z(arch, name, **SLOW)
    assert (z < Z_MAX) == (name in PASSING), f"{arch} {name}: max|z| = {z:.2f}"
