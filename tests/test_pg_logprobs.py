"""Chunked log-probs (`head_logprobs`) and entropy (`head_entropy`) equal the unchunked computation."""

import torch

from pglm.pg.logprobs import head_logprobs, token_logprobs
from pglm.pg.losses import entropy, head_entropy


def _case(B=3, T=10, C=8, V=50):
    torch.manual_seed(0)
    head = torch.nn.Linear(C, V, bias=False).double()
    h = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    return head, h, targets


def test_chunked_logprobs_and_gradients_equal_the_full_ones():
    head, h, targets = _case()
    full = token_logprobs(head(h), targets, temperature=0.7)
    w = torch.randn_like(full)  # a loss that weights every position differently
    g_h, g_w = torch.autograd.grad((w * full).sum(), (h, head.weight))
    for max_elements in (3 * 50, 3 * 50 * 4, 10**9):  # one position per chunk, chunks of 4 (uneven), none
        chunked = head_logprobs(h, head, targets, temperature=0.7, max_elements=max_elements)
        c_h, c_w = torch.autograd.grad((w * chunked).sum(), (h, head.weight))
        assert torch.allclose(chunked, full, atol=1e-12)
        assert torch.allclose(c_h, g_h, atol=1e-12) and torch.allclose(c_w, g_w, atol=1e-12)


def test_chunked_entropy_equals_the_full_one():
    head, h, _ = _case()
    mask = torch.rand(3, 10) > 0.3
    want = entropy(head(h), mask, temperature=1.3)
    got = head_entropy(h, head, mask, temperature=1.3, max_elements=3 * 50 * 3)
    assert torch.allclose(got, want, atol=1e-12)


def test_chunks_hold_no_full_vocabulary_logits_for_backward():
    head, h, targets = _case(B=2, T=64, C=8, V=1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        head_logprobs(h, head, targets, max_elements=2 * 1000 * 8)
    # kept for backward: the chunks' inputs, not even one chunk's (2, 8, 1000) logits (recomputed instead)
    assert max(saved) < 2 * 8 * 1000 and sum(saved) < 2 * 64 * 1000 / 10
