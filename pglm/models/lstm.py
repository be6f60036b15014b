"""A multi-layer LSTM language model: the classic recipe, done right.

embedding -> dropout -> nn.LSTM (dropout between layers) -> dropout -> linear to the vocabulary, the
regularised model of Zaremba et al. 2014 ("Recurrent Neural Network Regularization") with the output
layer tied to the embedding (Press & Wolf 2017; Inan et al. 2017). It predicts at every position, so
maximum likelihood and policy-gradient scoring read the same (B, T, V) logits as for the GPT.

Left padding. An LSTM that runs over pad tokens carries them in its state, so padded rows would be
scored differently from the row alone. Instead each row is rotated so its real tokens come first (now
right-padded), run, and rotated back: outputs at real positions cannot see the trailing pads because
the LSTM reads left to right. The cached prefill packs the rotated rows (pack_padded_sequence) so that
each row's final (h, c) is taken at its own last real token.

`block_size` is only the training window: the state carries any length, so generation may go beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pglm.models.config import ModelConfig


@dataclass
class LSTMState:
    """The recurrent state after the tokens fed so far: the LSTM's whole cache."""

    h: torch.Tensor  # (n_layer, B, d_model) hidden state of each layer
    c: torch.Tensor  # (n_layer, B, d_model) cell state of each layer
    n_pad: torch.Tensor | None  # (B,) long: left padding of the prompt fed first (None: no padding)
    filled: int = 0  # tokens fed so far, pads included (the slot the next token goes to)

    @property
    def batch_size(self) -> int:
        return self.h.shape[1]

    def __len__(self) -> int:
        return self.filled

    def repeat_interleave(self, G: int) -> LSTMState:
        """A new state with each row repeated G times (rows i*G .. i*G+G-1 copy row i)."""
        n_pad = None if self.n_pad is None else self.n_pad.repeat_interleave(G)
        return LSTMState(
            self.h.repeat_interleave(G, dim=1), self.c.repeat_interleave(G, dim=1), n_pad, self.filled
        )


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of x (B, T, ...) left by shift (B,): out[b, t] = x[b, (t + shift[b]) % T]."""
    B, T = x.shape[:2]
    idx = (torch.arange(T, device=x.device)[None, :] + shift[:, None]) % T  # (B, T)
    idx = idx.view(B, T, *([1] * (x.dim() - 2))).expand_as(x)  # (B, T, ...)
    return x.gather(1, idx)


class LSTMLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        H = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, H)
        self.drop = nn.Dropout(cfg.dropout)
        # nn.LSTM applies `dropout` to the outputs of every layer but the last (Zaremba et al. 2014:
        # dropout on the non-recurrent connections only); it warns when given dropout with one layer.
        self.lstm = nn.LSTM(
            H, H, cfg.n_layer, batch_first=True, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0
        )
        self.lm_head = nn.Linear(H, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # (V, H) shared (Press & Wolf 2017; Inan et al. 2017)

        # Init of the PyTorch word_language_model example: embedding (and untied output) uniform(-0.1, 0.1),
        # output bias 0; LSTM weights keep PyTorch's uniform(±1/sqrt(H)).
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if not cfg.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(p)
                if name.startswith("bias_ih"):
                    # Forget-gate bias 1 so the cell starts by remembering (Jozefowicz et al. 2015, "An
                    # Empirical Exploration of Recurrent Network Architectures"). PyTorch's gate order is
                    # i, f, g, o and it adds bias_ih + bias_hh, so set one of them.
                    with torch.no_grad():
                        p[H : 2 * H] = 1.0

    def forward(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); position t predicts token t+1. n_pad (B,): left padding."""
        return self.lm_head(self.features(tokens, n_pad))  # (B, T, V)

    def features(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> the hidden states (B, T, H) that lm_head reads (a value head reads them too)."""
        if n_pad is None:
            out, _ = self.lstm(self.drop(self.embed(tokens)))  # (B, T, H)
        else:
            n_pad = n_pad.to(tokens.device)
            x = self.drop(self.embed(roll_rows(tokens, n_pad)))  # (B, T, H) real tokens first, pads last
            out, _ = self.lstm(x)  # (B, T, H)
            out = roll_rows(out, -n_pad)  # back to the caller's slots; pad slots hold finite garbage
        return self.drop(out)  # (B, T, H)

    def new_cache(self, batch_size: int, max_len: int, n_pad=None, device=None, dtype=None) -> LSTMState:
        """A zero state. `max_len` is accepted for the shared interface and unused: the state has no slots."""
        ref = self.embed.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        shape = (self.config.n_layer, batch_size, self.config.d_model)
        n_pad = None if n_pad is None else torch.as_tensor(n_pad, dtype=torch.long, device=device)
        return LSTMState(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            n_pad,
        )

    def forward_cached(self, tokens: torch.Tensor, cache: LSTMState) -> torch.Tensor:
        """tokens (B, T_new) -> logits (B, T_new, V), advancing the state in `cache`."""
        B, T = tokens.shape
        if cache.filled == 0 and cache.n_pad is not None:
            # Prefill of a left-padded prompt: rotate the real tokens to the front and pack, so the LSTM
            # stops at each row's last real token and the returned (h, c) are that token's state.
            n_pad = cache.n_pad
            lengths = (T - n_pad).cpu()  # (B,) pack_padded_sequence wants lengths on the CPU
            if bool((lengths < 1).any()):
                raise ValueError(
                    "the first forward_cached call must hold every row's padding and a real token"
                )
            x = self.drop(self.embed(roll_rows(tokens, n_pad)))  # (B, T, H)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, (cache.h, cache.c) = self.lstm(packed, (cache.h, cache.c))  # h, c back in batch order
            # (B, T, H), zeros after each row's real tokens
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
            out = roll_rows(out, -n_pad)
        else:
            x = self.drop(self.embed(tokens))  # (B, T, H)
            out, (cache.h, cache.c) = self.lstm(x, (cache.h, cache.c))  # (B, T, H)
        cache.filled += T
        return self.lm_head(self.drop(out))  # (B, T, V)
