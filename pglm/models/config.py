"""Model configuration: one dataclass for both architectures, named sizes, and one validated constructor.

`model_config("gpt", "small", vocab_size=...)` is how the CLI and the tests build a config; a config
read back from a run's config.json goes through `ModelConfig(**d)`, which validates the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from pglm.errors import UserError

ARCHS = ("gpt", "lstm")


@dataclass
class ModelConfig:
    arch: str = "gpt"  # "gpt" (Llama-style decoder) or "lstm" (multi-layer LSTM language model)
    vocab_size: int = 256  # number of token ids the embedding and the output layer cover
    n_layer: int = 2  # transformer blocks, or stacked LSTM layers
    d_model: int = 128  # embedding width; also the LSTM hidden size
    n_head: int = 4  # attention heads (gpt only); head_dim = d_model / n_head
    block_size: int = 128  # training context; for gpt also the hard maximum position (rotary tables)
    dropout: float = 0.0  # dropout probability on embeddings, residual branches and between LSTM layers
    tie_embeddings: bool = True  # output layer shares the token embedding matrix (Press & Wolf 2017)
    mlp_hidden: int | None = None  # gpt SwiGLU hidden width; None -> ~8/3 d_model, set in __post_init__
    rope_theta: float = 10000.0  # rotary base frequency (Su et al. 2021, RoFormer)
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"unknown model '{self.arch}'; choose gpt or lstm")
        positive = ["vocab_size", "n_layer", "d_model", "block_size"]
        if self.arch == "gpt":
            positive.append("n_head")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model setting {name}={value!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model setting dropout={self.dropout!r} must be in [0, 1); 0 turns dropout off")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError("model settings norm_eps and rope_theta must be positive")
        if self.arch == "gpt":
            if self.d_model % self.n_head != 0:
                raise UserError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    f"pick a d_model that is a multiple of n_head"
                )
            if (self.d_model // self.n_head) % 2 != 0:
                raise UserError(
                    f"head size d_model/n_head = {self.d_model // self.n_head} is odd; rotary positions "
                    f"rotate pairs of channels, so pick d_model and n_head with an even head size"
                )
            if self.mlp_hidden is None:
                # The one place the derived width is computed. SwiGLU has three matrices instead of two,
                # so 2/3 of the usual 4·d keeps the parameter count (Shazeer 2020, "GLU Variants Improve
                # Transformer"; Llama uses the same 8/3·d), rounded up to a multiple of 64 for fast matmuls.
                self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
            elif (
                isinstance(self.mlp_hidden, bool)
                or not isinstance(self.mlp_hidden, int)
                or self.mlp_hidden < 1
            ):
                raise UserError(
                    f"model setting mlp_hidden={self.mlp_hidden!r} must be a positive integer or None"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# Named sizes: field overrides on top of the ModelConfig defaults.
SIZES: dict[str, dict[str, dict]] = {
    "gpt": {
        "tiny": dict(n_layer=2, n_head=4, d_model=128, block_size=128),  # ~0.4M params + embeddings
        "small": dict(n_layer=4, n_head=4, d_model=256, block_size=256),  # ~3.2M + embeddings
        "medium": dict(
            n_layer=6, n_head=6, d_model=384, block_size=256
        ),  # ~10.6M + embeddings (nanoGPT's shakespeare_char shape)
    },
    "lstm": {
        # Dropout only between layers and around the LSTM, as in Zaremba et al. 2014 ("Recurrent Neural
        # Network Regularization"): their medium/large models used 0.5/0.65 on word-level PTB; smaller
        # values here because the defaults target short character-level runs.
        "tiny": dict(n_layer=1, d_model=256, block_size=128),  # ~0.5M params + embeddings
        "small": dict(n_layer=2, d_model=512, block_size=128, dropout=0.1),  # ~4.2M + embeddings
        "medium": dict(n_layer=3, d_model=768, block_size=256, dropout=0.2),  # ~14.2M + embeddings
    },
}


def model_config(arch: str, size: str = "tiny", vocab_size: int = 256, **overrides) -> ModelConfig:
    """The config for `arch` at a named `size`, with `overrides` (None values are ignored) applied on top."""
    if arch not in SIZES:
        raise UserError(f"unknown model '{arch}'; choose gpt or lstm")
    if size not in SIZES[arch]:
        raise UserError(f"unknown {arch} size '{size}'; choose one of {', '.join(SIZES[arch])}")
    known = {f.name for f in fields(ModelConfig)} - {"arch", "vocab_size"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name in overrides:
        if name not in known:
            raise UserError(f"unknown model setting '{name}'; known settings: {', '.join(sorted(known))}")
    return ModelConfig(arch=arch, vocab_size=vocab_size, **{**SIZES[arch][size], **overrides})
