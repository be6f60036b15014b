"""The model interface, checked the same way for both architectures.

Tiny models (vocabulary 11, width 32, 2 layers) in float64, so "the same logits" can be checked to 1e-10:
the cache against a full recompute, left-padded rows against the row alone, shared prompts against
separate runs, and gradients through the cache against gradients of the full forward.
"""

import pytest
import torch

from pglm.errors import UserError
from pglm.models import SIZES, ModelConfig, build_model, count_params, model_config

V = 11
ARCHS = ["gpt", "lstm"]
ATOL = 1e-10


def tiny(arch, **overrides):
    torch.manual_seed(0)
    if arch == "gpt":
        overrides.setdefault("n_head", 4)
    cfg = model_config(arch, "tiny", vocab_size=V, n_layer=2, d_model=32, block_size=32, **overrides)
    return build_model(cfg).double().eval()


def left_pad(rows, width, generator=None):
    """Left-pad token rows to `width` with random junk (not a pad id: masks must come from n_pad alone)."""
    tokens = torch.randint(0, V, (len(rows), width), generator=generator)
    n_pad = torch.tensor([width - len(r) for r in rows])
    for b, r in enumerate(rows):
        tokens[b, width - len(r) :] = r
    return tokens, n_pad


def alone(model, row):
    """Logits of one unpadded row, (T, V)."""
    return model(row[None])[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_shape(arch):
    model = tiny(arch)
    logits = model(torch.randint(0, V, (3, 7)))
    assert logits.shape == (3, 7, V)
    assert logits.dtype == torch.float64
    assert model.config.arch == arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [3, 4, 2, 3], [12]])
def test_cached_chunks_equal_full_forward(arch, chunks):
    model = tiny(arch)
    tokens = torch.randint(0, V, (3, sum(chunks)))
    full = model(tokens)  # (3, 12, V)
    cache = model.new_cache(3, sum(chunks))
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model.forward_cached(tokens[:, start : start + n], cache))
        start += n
    assert len(cache) == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_matches_each_row_alone(arch):
    model = tiny(arch)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (12, 9, 2)]
    tokens, n_pad = left_pad(rows, 12, g)
    assert n_pad.tolist() == [0, 3, 10]  # one unpadded row, one with most of the row padding
    logits = model(tokens, n_pad=n_pad)  # (3, 12, V)
    assert torch.isfinite(logits).all()  # pad outputs are garbage, but never NaN
    for b, row in enumerate(rows):
        torch.testing.assert_close(logits[b, n_pad[b] :], alone(model, row), atol=ATOL, rtol=0)


def test_gpt_padding_mask_gives_every_query_a_key():
    """A fully masked attention row is NaN on torch < 2.5 (pytorch/pytorch#103749), so none may exist."""
    model = tiny("gpt")
    n_pad = torch.tensor([0, 3, 6])
    for start, T in [(0, 6), (6, 1), (6, 3)]:  # prefill of pads only for row 2, a decode step, a chunk
        _, _, mask, _ = model._plan(start, T, n_pad, "cpu")  # (B, 1, T, start+T)
        assert mask.shape == (3, 1, T, start + T)
        assert mask.any(dim=-1).all()
        real_query = torch.arange(start, start + T)[None, :] >= n_pad[:, None]  # (B, T)
        pad_key = torch.arange(start + T)[None, :] < n_pad[:, None]  # (B, S)
        assert not (mask[:, 0] & real_query[:, :, None] & pad_key[:, None, :]).any()  # real never sees pad


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_prefill_then_decode_matches_each_row_alone(arch):
    model = tiny(arch)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (8, 5, 1)]
    tokens, n_pad = left_pad(prompts, 8, g)
    new = torch.randint(0, V, (3, 4), generator=g)  # the "sampled" continuation of each row
    cache = model.new_cache(3, 8 + 4, n_pad=n_pad)
    steps = [model.forward_cached(tokens, cache)] + [
        model.forward_cached(new[:, t : t + 1], cache) for t in range(4)
    ]
    logits = torch.cat(steps, dim=1)  # (3, 12, V)
    for b, p in enumerate(prompts):
        expected = alone(model, torch.cat([p, new[b]]))
        torch.testing.assert_close(logits[b, n_pad[b] :], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_repeat_interleave_of_prefilled_cache(arch):
    model = tiny(arch)
    g = torch.Generator().manual_seed(3)
    G = 3
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (6, 3)]
    tokens, n_pad = left_pad(prompts, 6, g)
    cache = model.new_cache(2, 6 + 3, n_pad=n_pad)
    prefill = model.forward_cached(tokens, cache)  # (2, 6, V)
    shared = cache.repeat_interleave(G)
    assert shared.batch_size == 2 * G and len(shared) == 6
    new = torch.randint(0, V, (2 * G, 3), generator=g)  # each of the G samples continues differently
    steps = [model.forward_cached(new[:, t : t + 1], shared) for t in range(3)]
    decoded = torch.cat(steps, dim=1)  # (6, 3, V)
    for r in range(2 * G):
        i = r // G  # rows i*G .. i*G+G-1 share prompt i
        expected = alone(model, torch.cat([prompts[i], new[r]]))  # (len_i + 3, V)
        torch.testing.assert_close(decoded[r], expected[-3:], atol=ATOL, rtol=0)
        torch.testing.assert_close(prefill[i, n_pad[i] :], expected[: len(prompts[i])], atol=ATOL, rtol=0)
    assert len(cache) == 6  # the original cache is untouched by decoding the copy


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    model = tiny(arch)
    tokens = torch.randint(0, V, (2, 10))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-6  # every later position does see the change


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_through_cache_equals_full_forward(arch):
    """Sampling with the graph kept (no second scoring pass) must give the scoring pass's gradients."""
    model = tiny(arch)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (5, 2)]
    tokens, n_pad = left_pad(prompts, 5, g)
    seq = torch.cat([tokens, torch.randint(0, V, (2, 3), generator=g)], dim=1)  # (2, 8)

    def objective(logits):  # sum of log p(next token) over the real positions
        logp = logits[:, :-1].log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]  # (2, 7)
        real = torch.arange(7)[None, :] >= n_pad[:, None]
        return (logp * real).sum()

    objective(model(seq, n_pad=n_pad)).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cache = model.new_cache(2, 8, n_pad=n_pad)
    steps = [model.forward_cached(seq[:, :5], cache)] + [
        model.forward_cached(seq[:, t : t + 1], cache) for t in (5, 6, 7)
    ]
    objective(torch.cat(steps, dim=1)).backward()
    for a, b in zip(full, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_only_in_train_mode(arch):
    model = tiny(arch, dropout=0.5)
    tokens = torch.randint(0, V, (2, 10))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_lstm_dropout_between_layers():
    model = tiny("lstm", dropout=0.5)
    assert model.lstm.dropout == 0.5
    model.drop.p = 0.0  # leave only nn.LSTM's own dropout between layer 1 and layer 2
    tokens = torch.randint(0, V, (2, 10))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_gpt_position_beyond_context_raises():
    model = tiny("gpt")  # block_size 32
    model(torch.randint(0, V, (1, 32)))  # the full context is fine
    with pytest.raises(UserError, match="longer than the model's context of 32 tokens"):
        model(torch.randint(0, V, (1, 33)))
    with pytest.raises(UserError, match="context of 32"):
        model.new_cache(1, 33)
    # Positions count real tokens: a row padded beyond the context is fine if its real part fits ...
    model(torch.randint(0, V, (2, 40)), n_pad=torch.tensor([8, 20]))
    model.new_cache(2, 40, n_pad=torch.tensor([8, 20]))
    # ... and not when one row's real part does not.
    with pytest.raises(UserError, match="a sequence of 33 tokens"):
        model(torch.randint(0, V, (2, 40)), n_pad=torch.tensor([7, 20]))


def test_gpt_cache_overflow_raises():
    model = tiny("gpt")
    cache = model.new_cache(1, 4)
    model.forward_cached(torch.randint(0, V, (1, 4)), cache)
    with pytest.raises(ValueError, match="full"):
        model.forward_cached(torch.randint(0, V, (1, 1)), cache)


def test_lstm_runs_beyond_block_size():
    model = tiny("lstm")  # block_size 32 is only the training window
    assert model(torch.randint(0, V, (1, 40))).shape == (1, 40, V)
    cache = model.new_cache(1, 40)
    assert model.forward_cached(torch.randint(0, V, (1, 40)), cache).shape == (1, 40, V)


def test_lstm_prefill_must_hold_a_real_token():
    model = tiny("lstm")
    cache = model.new_cache(2, 6, n_pad=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="real token"):
        model.forward_cached(torch.randint(0, V, (2, 4)), cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embeddings(arch):
    tied, untied = tiny(arch), tiny(arch, tie_embeddings=False)
    emb = {"gpt": lambda m: m.tok_emb.weight, "lstm": lambda m: m.embed.weight}[arch]
    assert tied.lm_head.weight.data_ptr() == emb(tied).data_ptr()
    assert untied.lm_head.weight.data_ptr() != emb(untied).data_ptr()
    assert count_params(untied) - count_params(tied) == V * 32  # the shared matrix counts once


def test_init():
    lstm = tiny("lstm")
    H = 32
    for layer in range(2):
        bias = getattr(lstm.lstm, f"bias_ih_l{layer}") + getattr(lstm.lstm, f"bias_hh_l{layer}")  # (4H,)
        i, f, g, o = bias.split(H)  # PyTorch gate order
        assert (f == 1).all() and not torch.cat([i, g, o]).any()  # forget-gate bias 1
    gpt = tiny("gpt")  # 2 layers: residual projections get std 0.02 / sqrt(4) = 0.01
    block = gpt.blocks[0]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.o_proj.weight.std().item() - 0.01) < 0.002
    assert abs(block.mlp.down_proj.weight.std().item() - 0.01) < 0.002


def test_sizes_exist_and_build_configs():
    for arch in ARCHS:
        assert set(SIZES[arch]) == {"tiny", "small", "medium"}
        for size in SIZES[arch]:
            cfg = model_config(arch, size, vocab_size=50)
            assert cfg.arch == arch and cfg.vocab_size == 50
            assert cfg.d_model == SIZES[arch][size]["d_model"]
    small = model_config("gpt", "small")
    assert (small.n_layer, small.n_head, small.d_model, small.block_size) == (4, 4, 256, 256)


def test_model_config_overrides():
    cfg = model_config("gpt", "tiny", vocab_size=15, n_layer=3, dropout=0.1, n_head=None)
    assert (cfg.n_layer, cfg.dropout, cfg.vocab_size) == (3, 0.1, 15)
    assert cfg.n_head == SIZES["gpt"]["tiny"]["n_head"]  # None means "not given"


def test_mlp_hidden_derived_once():
    # 8/3 * 128 = 341.3 -> next multiple of 64 is 384; 8/3 * 384 = 1024 exactly.
    assert model_config("gpt", "tiny", d_model=128).mlp_hidden == 384
    assert model_config("gpt", "medium").mlp_hidden == 1024
    assert model_config("gpt", "tiny", mlp_hidden=100).mlp_hidden == 100
    assert build_model(model_config("gpt", "tiny", vocab_size=V)).blocks[0].mlp.up_proj.out_features == 384


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: model_config("rnn"), "unknown model 'rnn'; choose gpt or lstm"),
        (lambda: model_config("gpt", "huge"), "unknown gpt size 'huge'"),
        (lambda: model_config("lstm", "tiny", n_heads=2), "unknown model setting 'n_heads'"),
        (lambda: model_config("gpt", "tiny", d_model=100, n_head=3), "not divisible by n_head"),
        (lambda: model_config("gpt", "tiny", d_model=12, n_head=4), "head size .* is odd"),
        (lambda: model_config("gpt", "tiny", n_layer=0), "n_layer=0 must be a positive integer"),
        (lambda: model_config("lstm", "tiny", dropout=1.0), "dropout"),
        (lambda: ModelConfig(arch="rnn"), "unknown model 'rnn'"),
        (lambda: build_model(ModelConfig(vocab_size=-1)), "vocab_size=-1"),
    ],
)
def test_bad_config_is_a_user_error(call, message):
    with pytest.raises(UserError, match=message):
        call()
