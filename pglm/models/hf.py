"""A Hugging Face causal LM behind pglm's model interface (`--model hf:PATH`, `--init hf:PATH`).

`load_hf("hf:PATH")` loads `AutoModelForCausalLM` from a local directory (or, where the machine has
network, a hub id) with `trust_remote_code` off unless the user asks, and wraps it in `HFCausalLM`,
which speaks the interface of GPT and LSTMLM (models/__init__.py): logits and final hidden states for
left-padded batches described by `n_pad`, a cache for sampling, and `lm_head`.

Positions. A left-padded row gets position_ids = slot − n_pad (0 on the pads) and an attention mask
that hides its pads, in scoring (`features`) and in sampling (`forward_cached`) alike, so the policy
that is scored is the policy that sampled. TRL's scoring pass gives GPT-2 positions arange(T) while
`generate` used cumsum(mask) − 1 (docs/design.md, "What went wrong in TRL", 1); any
model with absolute positions is exposed to that, and tests/test_hf.py checks both kinds here.

LoRA (`add_lora`) goes through peft; the reference policy of the KL is then this very model with its
adapter disabled (`reference`), not a second copy in memory.

Run directories hold the whole model: config.json keeps the transformers config (`hf_config`), and
every checkpoint's model.safetensors all weights (LoRA ones included), so a run rebuilds with no other
file. Adapter-only checkpoints for models too large to copy are not done yet.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from pglm.errors import UserError
from pglm.models import hf_fast
from pglm.models.gpt import KVCache


@dataclass
class HFConfig:
    """What a run directory records of a Hugging Face model (config.json "model")."""

    arch: str = "hf"
    source: str = ""  # hf:PATH it was first loaded from (for the record; the checkpoints hold the weights)
    hf_config: dict = field(default_factory=dict)  # transformers' config.to_dict(): rebuilds the model
    trust_remote_code: bool = False
    lora_r: int = 0  # LoRA rank; 0 = no adapter, every weight trains
    lora_alpha: float = 16.0  # LoRA scale α (the update is α/r · B A)
    lora_targets: list[str] | None = None  # module names peft adapts; None = peft's default for the model type
    # Read from hf_config, kept here for the messages and the checks the other models share:
    vocab_size: int = 0
    d_model: int = 0  # hidden size (the value head reads it)
    n_layer: int = 0
    block_size: int = 0  # the longest sequence: max_position_embeddings, or less where the user asks


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need transformers; pip install 'pglm[hf]'") from None
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would bury pglm's one-line messages
    return transformers


def _summary(hf_config, block_size: int | None) -> dict:
    """The fields of HFConfig every transformers config can answer."""
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None) or 2048
    return dict(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layer=hf_config.num_hidden_layers,
                block_size=min(max_pos, block_size) if block_size else max_pos)


def load_hf(spec: str, trust_remote_code: bool = False, block_size: int | None = None) -> HFCausalLM:
    """`hf:PATH` (a directory written by save_pretrained, or a hub id) → HFCausalLM in float32."""
    transformers = _transformers()
    path = spec[3:] if spec.startswith("hf:") else spec
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"hf:{path} is not a model directory (no config.json); pass a directory written by "
                            "save_pretrained (config.json and weights) or a hub id")
        try:
            raw = json.loads((local / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"hf:{path}/config.json cannot be read ({e}); re-save the model") from None
        pickles = [f for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in local.glob(pat)]
        if pickles and not any(local.glob("*.safetensors")):
            raise UserError(f"hf:{path} holds its weights as a pickle (pytorch_model.bin), which pglm does not load; "
                            "convert them once where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
                            ".save_pretrained(DIR) writes model.safetensors")
        known = raw.get("model_type") in transformers.CONFIG_MAPPING
        if "auto_map" in raw and not known and not trust_remote_code:
            # Checked here rather than left to transformers, which may stop to ask on a terminal.
            raise UserError(f"hf:{path} needs code of its own (auto_map in config.json); pass --trust-remote-code "
                            "if you trust that code")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(  # safetensors only: no pickle is read
            path, trust_remote_code=trust_remote_code, dtype=torch.float32, use_safetensors=True
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"hf:{path} needs code of its own; pass --trust-remote-code if you trust that code") from None
        raise UserError(f"hf:{path} cannot be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    except OSError as e:
        hint = "" if local.exists() else " (not a local directory; a hub id needs network)"
        raise UserError(f"hf:{path} cannot be loaded{hint}: {str(e).splitlines()[0]}") from None
    return wrap_hf(model, f"hf:{path}", trust_remote_code, block_size)


def wrap_hf(model, source: str = "", trust_remote_code: bool = False, block_size: int | None = None) -> HFCausalLM:
    """A transformers causal LM already in memory, behind pglm's model interface."""
    cfg = HFConfig(source=source, hf_config=model.config.to_dict(), trust_remote_code=trust_remote_code,
                   **_summary(model.config, block_size))
    return HFCausalLM(model, cfg)


def build_hf(cfg: HFConfig, trust_remote_code: bool = False) -> HFCausalLM:
    """The model a run's config.json describes, with fresh weights (the checkpoint's are loaded after).

    A run directory is data, possibly someone else's: what it records (`cfg.trust_remote_code`) never
    switches remote code on. Only the caller's `trust_remote_code` (the user's --trust-remote-code on
    this command) does."""
    transformers = _transformers()
    d = dict(cfg.hf_config)
    if cfg.trust_remote_code and not trust_remote_code:
        raise UserError(f"this run's model runs Python code of its own (from {cfg.source or 'its source'}); pass "
                        "--trust-remote-code if you trust that code")
    if cfg.trust_remote_code:
        hf_config = transformers.AutoConfig.from_pretrained(cfg.source[3:], trust_remote_code=True)
    else:
        hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.trust_remote_code,
                                                           dtype=torch.float32)
    wrapped = HFCausalLM(model, cfg)
    if cfg.lora_r:
        add_lora(wrapped, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    return wrapped


@dataclass
class HFCache:
    """transformers' DynamicCache plus the left padding of each row and the slots filled so far."""

    kv: object  # transformers.DynamicCache
    n_pad: torch.Tensor  # (B,)
    max_len: int
    filled: int = 0

    def repeat_interleave(self, G: int) -> HFCache:
        """Each row repeated G times (one prefilled prompt shared by its group). Reuses the storage."""
        self.kv.batch_repeat_interleave(G)
        return HFCache(self.kv, self.n_pad.repeat_interleave(G), self.max_len, self.filled)


class HFCausalLM(nn.Module):
    """pglm's model interface over a transformers causal LM (or a peft model wrapping one)."""

    def __init__(self, model, cfg: HFConfig):
        super().__init__()
        self.net = model  # what holds the weights: the transformers model, or the PeftModel around it
        self.config = cfg
        self._cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    @property
    def inner(self):
        """The transformers model (LoRA layers, when added, live inside it)."""
        return self.net.get_base_model() if self.is_lora else self.net

    @property
    def is_lora(self) -> bool:
        return hasattr(self.net, "peft_config")

    @property
    def lm_head(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    @property
    def _fast(self) -> bool:
        """Whether pglm's own GPT-2 forward (hf_fast.py) computes exactly what transformers would."""
        c = self.inner.config
        no_dropout = not self.training or all(getattr(c, k, 0.0) == 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        return not self.is_lora and no_dropout and hf_fast.supports(self.inner)

    def _body(self):
        inner = self.inner
        return getattr(inner, inner.base_model_prefix)  # GPT2Model, LlamaModel, Qwen2Model, ...

    def _inputs(self, start: int, T: int, n_pad: torch.Tensor | None, device) -> dict:
        """attention_mask (B, start+T) and position_ids (B, T) for slots [start, start+T) of left-padded rows."""
        if n_pad is None:
            return {"position_ids": torch.arange(start, start + T, device=device)[None]}
        n_pad = n_pad.to(device)
        slots = torch.arange(start + T, device=device)  # (S,)
        mask = (slots[None, :] >= n_pad[:, None]).long()  # (B, S): 0 on the pads
        pos = (slots[None, start:] - n_pad[:, None]).clamp(min=0)  # (B, T): the first real token is 0
        return {"attention_mask": mask, "position_ids": pos}

    def _check_context(self, length: int, n_pad: torch.Tensor | None) -> None:
        need = length - (0 if n_pad is None or length <= self.config.block_size else int(n_pad.min()))
        if need > self.config.block_size:
            raise UserError(f"a sequence of {need} tokens is longer than the model's context of "
                            f"{self.config.block_size} tokens; use a shorter prompt or fewer new tokens")

    def features(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> final hidden states (B, T, C), after the last norm: what lm_head reads."""
        self._check_context(tokens.shape[1], n_pad)
        if self._fast:
            return hf_fast.gpt2_hidden(self.inner, tokens, n_pad)
        out = self._body()(input_ids=tokens, use_cache=False, **self._inputs(0, tokens.shape[1], n_pad, tokens.device))
        return out.last_hidden_state

    def forward(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); position t predicts token t+1."""
        return self.lm_head(self.features(tokens, n_pad))

    def new_cache(self, batch_size: int, max_len: int, n_pad=None, device=None, dtype=None) -> HFCache | KVCache:
        transformers = _transformers()
        weight = next(self.parameters())
        device, dtype = device or weight.device, dtype or weight.dtype
        n_pad = torch.zeros(batch_size, dtype=torch.long, device=device) if n_pad is None else \
            torch.as_tensor(n_pad, dtype=torch.long, device=device)
        self._check_context(max_len, n_pad)
        if self._fast:
            return hf_fast.new_gpt2_cache(self.inner, batch_size, max_len, n_pad, device, dtype)
        return HFCache(transformers.DynamicCache(config=self.inner.config), n_pad, max_len)

    def forward_cached(self, tokens: torch.Tensor, cache: HFCache | KVCache) -> torch.Tensor:
        """tokens (B, T_new) -> logits (B, T_new, V), appending their keys and values to `cache`."""
        T = tokens.shape[1]
        if cache.filled + T > cache.max_len:
            raise ValueError(f"cache of {cache.max_len} slots is full ({cache.filled} filled, {T} more asked)")
        if isinstance(cache, KVCache):  # made by new_cache for the fast GPT-2 path
            h = hf_fast.gpt2_hidden(self.inner, tokens, cache.n_pad, cache.filled, cache)
            cache.filled += T
            return self.lm_head(h)
        inputs = self._inputs(cache.filled, T, cache.n_pad, tokens.device)
        out = self.inner(input_ids=tokens, use_cache=True, **{self._cache_kw: cache.kv}, **inputs)
        cache.filled += T
        return out.logits

    def adapter_off(self):
        """A context in which a LoRA model computes as its base model (peft's disable_adapter)."""
        if not self.is_lora:
            raise ValueError("adapter_off() is for LoRA models")
        return self.net.disable_adapter()


def add_lora(model: HFCausalLM, r: int, alpha: float, targets: list[str] | None) -> None:
    """Wrap the model's weights with LoRA adapters (Hu et al. 2021) through peft; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-r needs peft; pip install 'pglm[hf]'") from None
    if r < 1 or alpha <= 0:
        raise UserError("--lora-r must be at least 1 and --lora-alpha positive")
    if model.is_lora:
        raise UserError("this model already has a LoRA adapter, which goes on training; drop --lora-r, or "
                        "pglm export --merge-lora it and start from the exported directory")
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.inner.named_modules()
                    if n and not list(m.children()) and hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2})
    if targets:
        missing = [t for t in targets if t not in names]
        if missing:
            raise UserError(f"--lora-targets {','.join(missing)}: no such module in this model; "
                            f"its weight matrices are named {', '.join(names)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or None, task_type="CAUSAL_LM")
    try:
        model.net = get_peft_model(model.net, config)
    except ValueError as e:
        raise UserError(f"LoRA cannot be added ({str(e).splitlines()[0]}); name the modules with --lora-targets, "
                        f"e.g. --lora-targets {','.join(names[:2])}") from None
    model.config.lora_r, model.config.lora_alpha, model.config.lora_targets = r, alpha, targets

