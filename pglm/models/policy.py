"""The policy: the one module training reaches the model through, and the one DDP and FSDP2 wrap.

`forward` returns what every loss needs, the log-probs of target tokens (and, for PPO, the values of
the value head that lives inside it), so maximum likelihood and policy gradient share one scoring
path and no training code reaches past the wrapper: under DDP a gradient that does not come from the
wrapper's `forward` is silently not all-reduced, and under FSDP2 a method other than `forward` sees
sharded parameters. `generate` and `lm_stats` (no gradient) are the two other entry points; under
FSDP2 they are registered as forward methods (`pglm.dist.wrap`).

The model contract every architecture (GPT, LSTM, Hugging Face) follows is `LanguageModel` below.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from pglm.pg.logprobs import chunk_positions, head_logprobs, token_logprobs
from pglm.pg.losses import token_entropy

POLICY_METHODS = ("generate", "lm_stats")  # what pglm.dist.wrap registers with FSDP2 besides forward


class LanguageModel(Protocol):
    """What pglm needs of a model: GPT, LSTMLM and HFCausalLM all provide it."""

    config: Any  # .arch, .vocab_size, .d_model, .block_size (0 or the context; an LSTM has none)
    lm_head: nn.Module  # (C) -> (V)

    def features(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor: ...  # (B, T, C)
    def new_cache(self, batch_size: int, max_len: int, n_pad=None, device=None, dtype=None): ...
    def forward_cached(self, tokens: torch.Tensor, cache) -> torch.Tensor: ...  # (B, T_new, V)


def max_context(model) -> int | None:
    """The longest sequence the model can read, or None when it has no limit (an LSTM)."""
    return None if model.config.arch == "lstm" else model.config.block_size


class Policy(nn.Module):
    """The language model and, with PPO, its value head."""

    checkpoint_parts = ("model", "value_head")  # model.safetensors, value_head.safetensors (pglm.train.checkpoint)

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.value_head = value_head

    @property
    def config(self):
        return self.model.config

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, n_pad: torch.Tensor | None = None,
                start: int = 0, temperature: float = 1.0, with_entropy: bool = False, adapter: bool = True):
        """Score `targets` (B, N) where position start + t of `tokens` (B, T) predicts targets[:, t].

        Returns (logp (B, N), values (B, N) or None, entropy (B, N) or None). Only the N positions that
        predict a target go through lm_head, and those in chunks (`head_logprobs`); the value head reads
        the same hidden states (V_t is the value of the prefix that predicts token t). Entropy, asked for
        logging, is of the policy before the step and carries no gradient. `adapter=False` scores a
        LoRA model with its adapter switched off: the base model, the reference of its KL.
        """
        N = targets.shape[1]
        with contextlib.nullcontext() if adapter else self.model.adapter_off():
            h = self.model.features(tokens, n_pad)[:, start : start + N]  # (B, N, C)
            logp = head_logprobs(h, self.model.lm_head, targets, temperature)  # (B, N)
        if not adapter:
            return logp, None, None
        # (B, N); a copy, not the squeezed view of (B, N, 1), which FSDP2 warns about in an output
        values = self.value_head(h).clone() if self.value_head is not None else None
        entropy = None
        if with_entropy:
            with torch.no_grad():
                step = chunk_positions(h.shape[0], self.model.lm_head.weight.shape[0])
                entropy = torch.cat([token_entropy(self.model.lm_head(h[:, s : s + step].detach()), temperature)
                                     for s in range(0, N, step)], dim=1)  # (B, N)
        return logp, values, entropy

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **kwargs):
        from pglm.sampling import generate

        return generate(self.model, prompts, max_new_tokens, **kwargs)

    @torch.no_grad()
    def lm_stats(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(Σ −log p, Σ correct next token, Σ tokens) over the masked targets, as one float64 tensor (3,)."""
        h = self.model.features(x)  # (B, T, C)
        step = chunk_positions(h.shape[0], self.model.lm_head.weight.shape[0])
        out = torch.zeros(3, dtype=torch.float64, device=h.device)
        for s in range(0, h.shape[1], step):
            logits = self.model.lm_head(h[:, s : s + step])  # (B, chunk, V): never the whole batch's logits
            yc, mc = y[:, s : s + step], mask[:, s : s + step]
            out[0] -= token_logprobs(logits, yc)[mc].double().sum()
            out[1] += (logits.argmax(-1) == yc)[mc].sum()
        out[2] = mask.sum()
        return out


class AdapterOff:
    """The reference policy of a LoRA run: the same policy (wrapped or not) scored with its adapter
    switched off. No second copy of the weights, and under DDP or FSDP2 the call still goes through
    the wrapper's forward, which gathers what FSDP2 sharded."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        return self.policy(*args, adapter=False, **kwargs)
