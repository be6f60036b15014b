"""A reward model: a language model's body with a scalar head on the hidden state of the last real token.

    r(x) = w · h_last(x)        h_last: the final hidden state at the last non-pad token of x

as in InstructGPT (Ouyang et al. 2022, §3.5) and Hugging Face's `*ForSequenceClassification` with
one label, whose head is also a linear map without bias: so a pglm GPT reward model exports as
`LlamaForSequenceClassification` and gives the same scores (pglm/export.py). The body is any pglm
language model (GPT, LSTM, Hugging Face causal LM, LoRA included); its `lm_head` is not used.

The sequence a reward model reads is bos + prompt + completion + eos (`pair_ids`), the same tokens
whether it is trained on preference pairs (`pglm reward`) or scores a policy's completions
(`pglm rl --reward rm:RUN`).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn


class RewardModel(nn.Module):
    """The one module `pglm reward` trains (and DDP or FSDP2 wraps): body and head."""

    checkpoint_parts = ("model", "score")  # model.safetensors (the body, loadable as a language model), score.safetensors

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.score = nn.Linear(model.config.d_model, 1, bias=False)
        # The output matrix gets no gradient here, unless it is the (tied) input embedding: frozen, so that
        # DDP does not wait for gradients that never come. It stays in the checkpoint as it was.
        seen = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for p in model.lm_head.parameters():
            if seen[id(p)] == 1:
                p.requires_grad_(False)
        # small, so that the first scores are near 0 and the first loss near log 2 (HF's initializer_range)
        nn.init.normal_(self.score.weight, std=0.02)

    @property
    def config(self):
        return self.model.config

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), mask (B, T) True on real tokens -> scores (B,), read at each row's last real token.

        Padding may be on the left, on the right, or both: left padding goes to the model as n_pad, so
        that positions start at 0 on every row; right padding cannot reach earlier positions through
        causal attention (or an LSTM's recurrence), so it needs nothing."""
        n_pad = (mask.long().cumsum(1) == 0).sum(1)  # (B,) pads before the first real token
        h = self.model.features(tokens, n_pad if bool(n_pad.any()) else None)  # (B, T, C)
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # (B,) index of the last real token
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        return self.score(h_last).squeeze(-1).float()  # (B,)


def pair_ids(tokenizer, prompt: str, completion: str) -> list[int]:
    """bos + prompt + completion + eos: what a reward model reads (the tokens a policy's sample has).

    Where the tokenizer's pad is its eos (GPT-2's, or Llama's without a pad), the eos is left off: a
    Hugging Face classifier skips every pad id when it looks for the last token, so that is the token
    it would read (and what TRL's reward models, trained with eos appended, read too)."""
    return tokenizer.prompt_ids(prompt) + encode_text(tokenizer, completion) + end_ids(tokenizer)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a completion's text, in which the special tokens a policy generated are written out
    ("<pad>", pglm.sampling.completion_text): those spellings become those tokens again, so a reward
    model reads the tokens the policy sampled, and a preference file may hold such completions."""
    specials = {tokenizer.decode([i], skip_special=False): i
                for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) if i is not None}
    specials.pop("", None)
    if not specials or not any(t in text for t in specials):
        return tokenizer.encode(text)
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
    return [i for piece in split.split(text) if piece
            for i in ([specials[piece]] if piece in specials else tokenizer.encode(piece))]


def end_ids(tokenizer) -> list[int]:
    """What follows a completion: [eos], or nothing where the pad is the eos (`pair_ids`)."""
    return [tokenizer.eos_id] if tokenizer.eos_id != tokenizer.pad_id else []


def padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (tokens (B, T), mask (B, T)) of token lists."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return tokens, mask
