"""A Llama-style decoder-only transformer with a preallocated KV cache.

token embedding -> n_layer x [RMSNorm -> causal self-attention with rotary positions -> residual;
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head. No biases.
Read top to bottom like nanoGPT's model.py; the cache follows gpt-fast (preallocated, filled in place).

Left padding. A batch of prompts of different lengths is left-padded; `n_pad` (B,) counts the pad slots
at the start of each row. Pads are removed from attention (no query looks at a pad key) and rotary
positions restart at 0 at each row's first real token, so a padded row gives the same logits as the
row alone. Rotary scores depend only on position differences, so the restart changes real-token logits
by rounding alone; it matters because it keeps a padded row within the block_size positions the model
was trained on, and it is the rule that models with absolute positions need: Hugging Face TRL scores
left-padded GPT-2 rows with positions arange(T) while `generate` sampled them with cumsum(mask) - 1,
and the two policies differ (docs/design.md, "What went wrong in TRL", item 1). Here
there is one position rule, in `_plan`, for forward and for the cache alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pglm.errors import UserError
from pglm.models.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of every layer; slots [0, filled) hold the sequence so far.

    Inference writes into preallocated buffers, in place (gpt-fast). Under autograd (a rollout whose
    log-probs the loss differentiates) each layer's keys and values grow by concatenation instead: the
    backward of a slice of a preallocated buffer allocates and zero-fills the whole buffer, for every
    layer at every step, and an in-place write would invalidate what autograd saved; the backward of a
    concatenation is a view.
    """

    k: torch.Tensor  # (n_layer, B, n_head, max_len, head_dim) rotated keys
    v: torch.Tensor  # (n_layer, B, n_head, max_len, head_dim) values
    n_pad: torch.Tensor | None  # (B,) long: pad slots at the start of each row (None: no padding)
    filled: int = 0  # slots written so far; the next token goes to slot `filled`
    grown: list | None = None  # under autograd: per layer (k, v), each (B, n_head, filled, head_dim)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def __len__(self) -> int:
        return self.filled

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v (B, H, T, D) at slots [filled, filled+T) of `layer`; return all its (B, H, filled+T, D)."""
        start, T = self.filled, k.shape[2]
        if torch.is_grad_enabled():
            if self.grown is None:
                self.grown = [(self.k[i, :, :, :start], self.v[i, :, :, :start]) for i in range(self.k.shape[0])]
            k_old, v_old = self.grown[layer]
            self.grown[layer] = (torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)) if start else (k, v)
            return self.grown[layer]
        self.k[layer, :, :, start : start + T] = k
        self.v[layer, :, :, start : start + T] = v
        return self.k[layer, :, :, : start + T], self.v[layer, :, :, : start + T]

    def repeat_interleave(self, G: int) -> KVCache:
        """A new cache with each row repeated G times (rows i*G .. i*G+G-1 copy row i): one prefilled
        prompt shared by the G samples of its group."""
        n_pad = None if self.n_pad is None else self.n_pad.repeat_interleave(G)
        grown = None if self.grown is None else [(k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)) for k, v in self.grown]
        return KVCache(self.k.repeat_interleave(G, dim=1), self.v.repeat_interleave(G, dim=1), n_pad, self.filled, grown)


def padded_causal_mask(start: int, T: int, n_pad: torch.Tensor | None, device):
    """(attn_mask, is_causal) for SDPA: query slots [start, start+T) over key slots [0, start+T).

    Without padding: SDPA's causal fast path at the start, no mask for one new token, else (T, S).
    With left padding n_pad (B,): (B, 1, T, S), where no query looks at a pad key. A pad query comes
    before every real key, so it would see no key at all: softmax over an empty set is NaN, which leaks
    into gradients (pytorch/pytorch#103749; PyTorch 2.5 made SDPA return 0 there, pytorch/pytorch#133882,
    but pyproject allows 2.4 and not every kernel follows). Letting each query see its own slot keeps
    pad outputs finite everywhere; real queries never look at pad keys.
    """
    q_slot = torch.arange(start, start + T, device=device)  # (T,)
    k_slot = torch.arange(start + T, device=device)  # (S,)
    if n_pad is None:
        if start == 0:
            return None, True
        return (None, False) if T == 1 else (k_slot[None, :] <= q_slot[:, None], False)
    causal = k_slot[None, None, :] <= q_slot[None, :, None]  # (1, T, S)
    real_key = k_slot[None, None, :] >= n_pad[:, None, None]  # (B, 1, S)
    own = k_slot[None, None, :] == q_slot[None, :, None]  # (1, T, S)
    return ((causal & real_key) | own).unsqueeze(1), False  # (B, 1, T, S)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (..., D) by the angles cos/sin, which broadcast to (..., D).

    The "rotate half" pairing of Hugging Face Llama (not the interleaved pairs of the RoFormer paper), so
    that weights export to a Llama checkpoint without permuting q and k. Written as HF Llama writes it,
    x·cos + rotate_half(x)·sin with cos/sin tables of full width D: five elementwise ops instead of the
    seven of rotating each half separately, and a small model's speed on CPU is bound by op count.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (..., D): pair (i, i + D/2) -> (-x_{i+D/2}, x_i)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, H, D)
        # q and k rotated in one call: half the small elementwise ops, which bound a small model's speed on CPU
        q, k = apply_rotary(qkv[:, :, :2], cos, sin).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, start+T, D): the sequence so far
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), Shazeer 2020 "GLU Variants Improve Transformer", as in Llama."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C)
        return self.drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):  # (B, T, C)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # (V, C) shared (Press & Wolf 2017)

        # Rotary tables for positions 0 .. block_size-1 (Su et al. 2021). Not saved in checkpoints: they
        # are a function of the config.
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
        )
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), inv_freq)  # (block_size, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (block_size, D): channels i and i + D/2 share an angle
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual branches add up over 2·n_layer sublayers; scale their output projections so the
                # residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2 / nanoGPT

    # ---- positions and masks: the one place that knows about left padding ----

    def _check_context(self, length: int, n_pad: torch.Tensor | None) -> None:
        """Raise if slots [0, length) of some row need a rotary position >= block_size."""
        if length <= self.config.block_size:
            return  # positions are at most length - 1; no need to look at n_pad (a device sync)
        need = length - (0 if n_pad is None else int(n_pad.min()))
        if need > self.config.block_size:
            raise UserError(
                f"a sequence of {need} tokens is longer than the model's context of {self.config.block_size} "
                f"tokens; use a shorter prompt or fewer new tokens, or train a model with a larger block_size"
            )

    def _plan(self, start: int, T: int, n_pad: torch.Tensor | None, device):
        """cos, sin, attention mask and is_causal for query slots [start, start+T), key slots [0, start+T).

        cos and sin broadcast over q and k stacked as (B, T, 2, H, D)."""
        mask, is_causal = padded_causal_mask(start, T, n_pad, device)
        if n_pad is None:
            # Slices of the tables, not gathers: a decode step with no padding builds nothing.
            cos = self.rope_cos[start : start + T, None, None]  # (T, 1, 1, D) view
            sin = self.rope_sin[start : start + T, None, None]  # (T, 1, 1, D) view
            return cos, sin, mask, is_causal
        # Per-row positions: slot - n_pad, so the first real token is position 0 in every row, exactly as
        # without padding. Pad slots get position 0 (clamped); their outputs are never used.
        pos = (torch.arange(start, start + T, device=device)[None, :] - n_pad[:, None]).clamp(min=0)  # (B, T)
        cos, sin = self.rope_cos[pos, None, None], self.rope_sin[pos, None, None]  # (B, T, 1, 1, D)
        return cos, sin, mask, is_causal

    def _run(self, tokens, n_pad, start=0, cache: KVCache | None = None):
        B, T = tokens.shape
        if n_pad is not None:
            n_pad = n_pad.to(tokens.device)
        cos, sin, mask, is_causal = self._plan(start, T, n_pad, tokens.device)
        x = self.drop(self.tok_emb(tokens))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, is_causal, cache, i)
        return self.norm_f(x)  # (B, T, C)

    # ---- the model interface shared with LSTMLM ----

    def forward(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); position t predicts token t+1. n_pad (B,): left padding."""
        return self.lm_head(self.features(tokens, n_pad))  # (B, T, V)

    def features(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> the final hidden states (B, T, C) that lm_head reads (a value head reads them too)."""
        self._check_context(tokens.shape[1], n_pad)
        return self._run(tokens, n_pad)

    def new_cache(self, batch_size: int, max_len: int, n_pad=None, device=None, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots (prompt + new tokens); n_pad (B,): the prompt's left padding."""
        cfg, ref = self.config, self.tok_emb.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        n_pad = None if n_pad is None else torch.as_tensor(n_pad, dtype=torch.long, device=device)
        if n_pad is not None and not bool(n_pad.any()):
            n_pad = None  # no row is padded: every step then takes the mask-free path (one sync, here)
        self._check_context(max_len, n_pad)  # once here, so decode steps need no check (and no sync)
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            n_pad,
        )

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, T_new) -> logits (B, T_new, V), appending the new keys/values to `cache`."""
        T = tokens.shape[1]
        if cache.filled + T > cache.max_len:
            raise ValueError(
                f"KV cache of {cache.max_len} slots is full ({cache.filled} filled, {T} more asked)"
            )
        logits = self.lm_head(self._run(tokens, cache.n_pad, cache.filled, cache))  # (B, T_new, V)
        cache.filled += T
        return logits
