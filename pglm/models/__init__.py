"""Language models behind one interface.

Every model takes tokens (B, T) and an optional left padding n_pad (B,) and returns logits (B, T, V),
where position t predicts token t+1:

    logits = model(tokens, n_pad=None)
    cache = model.new_cache(batch_size, max_len, n_pad=None, device=None, dtype=None)
    logits = model.forward_cached(tokens, cache)   # appends to the cache: prefill, then decode
    cache = cache.repeat_interleave(G)             # share a prefilled prompt among G samples

gpt.py holds a Llama-style decoder (KVCache), lstm.py an LSTM language model (LSTMState), hf.py an
adapter that gives a Hugging Face causal LM the same interface (`--model hf:PATH`).
"""

from __future__ import annotations

import torch.nn as nn

from pglm.errors import UserError
from pglm.models.config import SIZES, ModelConfig, model_config
from pglm.models.gpt import GPT, KVCache
from pglm.models.lstm import LSTMLM, LSTMState

__all__ = [
    "GPT",
    "LSTMLM",
    "SIZES",
    "KVCache",
    "LSTMState",
    "ModelConfig",
    "build_model",
    "config_from_dict",
    "count_params",
    "model_config",
]


def config_from_dict(d: dict):
    """A model config read back from a run's config.json: ModelConfig, or HFConfig for hf: models."""
    if d.get("arch") == "hf":
        from pglm.models.hf import HFConfig

        return HFConfig(**d)
    return ModelConfig(**d)


def build_model(cfg, trust_remote_code: bool = False) -> nn.Module:
    """The model that `cfg.arch` names, freshly initialised (an hf: model from its recorded config; one
    with code of its own only when the user passed `trust_remote_code` on this command)."""
    if cfg.arch == "hf":
        from pglm.models.hf import build_hf

        return build_hf(cfg, trust_remote_code)
    if cfg.arch == "gpt":
        return GPT(cfg)
    if cfg.arch == "lstm":
        return LSTMLM(cfg)
    raise UserError(f"unknown model '{cfg.arch}'; choose gpt or lstm")


def count_params(model: nn.Module) -> int:
    """Number of parameters; a tied embedding/output matrix counts once (parameters() skips duplicates)."""
    return sum(p.numel() for p in model.parameters())
