"""pglm's own forward pass over a Hugging Face GPT-2's weights: the same function, less overhead.

A small model spends most of a transformers forward call in Python: building the 4-D mask, cache
bookkeeping, output classes, per-layer hooks. For the 4 × 128 GPT-2 of the add2 benchmark a
transformers call costs about 5 ms where its arithmetic needs well under 1 ms, and a policy-gradient
step makes six of them (prefill, decode steps, scoring). `gpt2_hidden` computes the same function
straight from the module's own parameters (so training, checkpoints, export and LoRA-free runs are
untouched): token + learned position embeddings, n_layer × [LayerNorm → attention (Conv1D q, k, v
with bias, SDPA) → residual; LayerNorm → GELU MLP → residual] → LayerNorm, with pglm's rule for left
padding (positions slot − n_pad, pads hidden from every query) and pglm's preallocated KV cache.

`HFCausalLM` uses it only where it is exactly the model (`supports`): GPT-2 with its default attention
settings, no LoRA, no dropout in play. tests/test_hf.py checks logits against transformers' to 1e-5,
with left padding, cached and uncached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pglm.models.gpt import KVCache, padded_causal_mask

# transformers' activation names → F.gelu's `approximate` (gelu_new is the tanh approximation)
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def supports(hf_model) -> bool:
    """True where `gpt2_hidden` is exactly the transformers forward of this model."""
    c = hf_model.config
    return (
        c.model_type == "gpt2"
        and c.activation_function in _GELU
        and c.scale_attn_weights
        and not c.scale_attn_by_inverse_layer_idx
        and not c.reorder_and_upcast_attn
        and not getattr(c, "add_cross_attention", False)
    )


def gpt2_hidden(hf_model, tokens: torch.Tensor, n_pad: torch.Tensor | None, start: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
    """tokens (B, T) at slots [start, start+T) -> final hidden states (B, T, C), after ln_f."""
    tr, cfg = hf_model.transformer, hf_model.config
    B, T = tokens.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    eps, approximate = cfg.layer_norm_epsilon, _GELU[cfg.activation_function]
    if n_pad is not None:
        n_pad = n_pad.to(tokens.device)
    slots = torch.arange(start, start + T, device=tokens.device)  # (T,)
    pos = slots[None, :] if n_pad is None else (slots[None, :] - n_pad[:, None]).clamp(min=0)  # (B or 1, T)
    mask, is_causal = padded_causal_mask(start, T, n_pad, tokens.device)
    x = tr.wte(tokens) + tr.wpe(pos)  # (B, T, C)
    for i, blk in enumerate(tr.h):
        # Conv1D stores its weight as (in, out): y = b + x W, one addmm
        h = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, eps).view(B * T, C)
        qkv = torch.addmm(blk.attn.c_attn.bias, h, blk.attn.c_attn.weight)  # (B·T, 3C)
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if cache is not None:
            k, v = cache.append(i, k, v)  # (B, H, start+T, D): the sequence so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B * T, C)
        x = x + torch.addmm(blk.attn.c_proj.bias, y, blk.attn.c_proj.weight).view(B, T, C)
        h = F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias, eps).view(B * T, C)
        h = F.gelu(torch.addmm(blk.mlp.c_fc.bias, h, blk.mlp.c_fc.weight), approximate=approximate)
        x = x + torch.addmm(blk.mlp.c_proj.bias, h, blk.mlp.c_proj.weight).view(B, T, C)
    return F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias, eps)


def new_gpt2_cache(hf_model, batch_size: int, max_len: int, n_pad, device, dtype) -> KVCache:
    cfg = hf_model.config
    shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
    return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), n_pad)
