import pytest
import torch

from pglm.errors import UserError
from pglm.models import build_model, model_config
from pglm.pg.logprobs import shifted_logprobs, token_logprobs
from pglm.sampling import filter_logits, generate

V, EOS, PAD = 12, 2, 0


def tiny(arch):
    torch.manual_seed(1)
    return build_model(model_config(arch, "tiny", vocab_size=V, n_layer=2, d_model=16, n_head=2, block_size=32)).double().eval()


PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 4], [1, 9, 9, 3]]  # different lengths → left padding


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_cached_sampling_equals_full_recompute(arch, group_size):
    model = tiny(arch)
    kw = dict(eos_id=EOS, pad_id=PAD, temperature=0.7, group_size=group_size)
    a = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-10)
    assert a.tokens.shape[0] == len(PROMPTS) * group_size


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_sampler_logprobs_equal_rescoring_of_left_padded_rows(arch):
    """The scores a policy-gradient loss will compute equal the sampler's, padding and temperature included."""
    model = tiny(arch)
    tau = 0.7
    g = generate(model, PROMPTS, 8, eos_id=EOS, pad_id=PAD, temperature=tau, group_size=2,
                 generator=torch.Generator().manual_seed(3))
    scored = shifted_logprobs(model, g.tokens, n_pad=g.n_pad, temperature=tau)[:, g.prompt_len - 1 :]  # (B, N)
    torch.testing.assert_close(scored[g.response_mask], g.logprobs[g.response_mask], rtol=0, atol=1e-10)
    # and each row scored alone, without any padding, agrees too
    for i in range(g.tokens.size(0)):
        row = g.tokens[i, int(g.n_pad[i]) :][None]
        alone = shifted_logprobs(model, row, temperature=tau)[0, -g.response_mask.size(1) :]
        torch.testing.assert_close(alone[g.response_mask[i]], g.logprobs[i][g.response_mask[i]], rtol=0, atol=1e-10)


def test_mask_includes_eos_and_nothing_after():
    model = tiny("gpt")
    g = generate(model, PROMPTS, 12, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0), group_size=4)
    assert g.finished.any() and not g.finished.all(), "the seed must give both ended and truncated rows"
    for i in range(g.tokens.size(0)):
        resp = g.response[i].tolist()
        n = int(g.response_mask[i].sum())
        assert g.response_mask[i, :n].all() and not g.response_mask[i, n:].any()
        if g.finished[i]:
            assert resp[n - 1] == EOS and EOS not in resp[: n - 1]
        else:
            assert EOS not in resp[:n] and n == g.response_mask.size(1)
        assert (g.logprobs[i, n:] == 0).all()
        assert g.all_response_ids()[i] == resp[:n] == g.response_ids(i)  # the batched and per-row readings agree


def test_greedy_is_argmax_and_stop_ends_rows():
    model = tiny("lstm")
    g = generate(model, [[1, 4]], 6, eos_id=EOS, pad_id=PAD, greedy=True)
    ids = [1, 4]
    for t in range(g.response.size(1)):
        nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
        assert g.response[0, t].item() == nxt
        ids.append(nxt)
    stopped = generate(model, [[1, 4]], 6, eos_id=EOS, pad_id=PAD, greedy=True, stop=lambda ids: len(ids) >= 2)
    assert stopped.response.size(1) == 2 and bool(stopped.finished[0])


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 then 0.3 reach 0.8 ≥ 0.7, so the last two go
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    lp = token_logprobs(logits, torch.tensor([[1, 1]]), temperature=2.0)
    # τ = 2: position 0 is uniform → log 1/2; position 1 has logits (1, 0) → log(1/(1+e))
    torch.testing.assert_close(lp, torch.tensor([[-0.6931471805599453, -1.3132616875182228]], dtype=torch.float64))
    with pytest.raises(ValueError):
        token_logprobs(logits, torch.tensor([[1, 1, 1]]))


def test_prompt_longer_than_context():
    model = tiny("gpt")
    with pytest.raises(UserError, match="context is 32"):
        generate(model, [[1] * 40], 4, eos_id=EOS, pad_id=PAD)


def test_inverse_cdf_draws_by_the_uniform_and_never_a_zero_probability_token():
    from pglm.sampling import draw_from

    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 5)  # unnormalised is fine too: × 4 below
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1 - 1e-12], dtype=torch.float64)
    assert draw_from(probs, u).tolist() == [1, 1, 3, 3, 3]
    assert draw_from(4 * probs, u).tolist() == [1, 1, 3, 3, 3]
    # float32 rounding of u·total must not reach the zero-probability tail
    assert draw_from(torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float32), torch.tensor([1 - 1e-9])).tolist() == [1]
    # the frequencies are the probabilities (10,000 uniforms, 4 standard deviations)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.6, 0.3])
    draws = draw_from(p.expand(10_000, 3), torch.rand(10_000, generator=g, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=3).double() / 10_000
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / 10_000).sqrt()).all(), freq
