"""A learned reward: `pglm rl --reward rm:DIR`, a reward model's score of each (prompt, completion).

DIR is a run of `pglm reward` (or one of its checkpoints) or a local Hugging Face sequence
classifier with one output (`AutoModelForSequenceClassification`, num_labels 1: what TRL's
RewardTrainer writes and what `pglm export` makes of a reward run). The reward model has its own
tokenizer, which may differ from the policy's: it reads the decoded texts, as people's raters do.

What it reads is the sequence it was trained on:
- a pglm reward run: bos + prompt + completion + eos (`pglm.models.reward.pair_ids`), where the
  special tokens a policy generated, which its completion text spells out, are those tokens again;
- a Hugging Face classifier: the text prompt + completion + the tokenizer's eos token, encoded with
  the tokenizer's special tokens, as TRL's RewardTrainer prepares its pairs.
Scoring runs in batches on the given device, with no gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pglm.errors import UserError


def reward_model(path: str, device="cpu", batch_size: int = 64, trust_remote_code: bool = False):
    """The reward function of a reward model at `path` (a pglm reward run or a one-output HF classifier).

    The function has two attributes besides: `context`, the longest sequence the model reads (None
    for an LSTM), and `encode(prompt, completion)`, the token ids it would score."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"--reward rm:{path}: no such directory; pass a run of pglm reward or a local Hugging Face "
                        "sequence-classification directory")
    config = _read_config(root)
    if config is None:
        raise UserError(f"--reward rm:{path}: no config.json; pass a run of pglm reward (or its checkpoints/step_N) "
                        "or a Hugging Face sequence classifier with one output")
    if "pglm_version" in config or (root / "state.json").is_file():
        return _pglm_reward_model(path, device, batch_size, trust_remote_code)
    return _hf_reward_model(path, config, device, batch_size, trust_remote_code)


def _read_config(root: Path) -> dict | None:
    for candidate in (root / "config.json", root.parent.parent / "config.json"):  # a run, or its checkpoints/step_N
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{candidate} cannot be read as JSON ({e})") from None
    return None


def _pglm_reward_model(path, device, batch_size, trust_remote_code):
    from pglm.models.policy import max_context
    from pglm.models.reward import pair_ids
    from pglm.runs import load_reward_model

    run = load_reward_model(path, device, trust_remote_code)
    tok, rm = run.tokenizer, run.model
    context = max_context(rm.model)

    def encode(prompt: str, completion: str) -> list[int]:
        try:
            return pair_ids(tok, prompt, completion)
        except UserError as e:
            raise UserError(f"the reward model rm:{path} cannot read the text {completion[:40]!r} ({e}); use a reward "
                            "model whose tokenizer covers the policy's text (one trained from the policy's run)") from None

    return _scorer(f"rm:{path}", rm, encode, tok.pad_id, context, device, batch_size)


def _hf_reward_model(path, config, device, batch_size, trust_remote_code):
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise UserError("--reward rm: with a Hugging Face model needs transformers; pip install 'pglm[hf]'") from None
    archs = config.get("architectures") or []
    labels = config.get("num_labels", len(config.get("id2label", {})) or None)
    if not any(a.endswith("ForSequenceClassification") for a in archs) or labels not in (None, 1):
        what = f"a {', '.join(archs)} with {labels} outputs" if archs else "not a sequence classifier"
        raise UserError(f"--reward rm:{path} is neither a pglm reward run nor a one-output classifier ({what}); "
                        "train one with pglm reward, or pass an AutoModelForSequenceClassification with num_labels=1")
    if not any(Path(path).glob("*.safetensors")):
        raise UserError(f"--reward rm:{path} holds no safetensors weights; pglm does not read pickled weights "
                        "(convert them with safetensors)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        rm = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"--reward rm:{path}: cannot load it ({str(e).splitlines()[0][:200]}); pass a saved "
                        "sequence-classification model") from None
    if rm.config.num_labels != 1:
        raise UserError(f"--reward rm:{path} is neither a pglm reward run nor a one-output classifier "
                        f"({rm.config.num_labels} outputs); use a reward model with num_labels=1")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (rm.config.pad_token_id or tok.eos_token_id or 0)
    rm.config.pad_token_id = pad  # what the classifier looks for to find each row's last token
    context = getattr(rm.config, "max_position_embeddings", None) or getattr(rm.config, "n_positions", None)
    eos = tok.eos_token or ""

    def encode(prompt: str, completion: str) -> list[int]:
        return tok(prompt + completion + eos)["input_ids"]

    def model(tokens, mask):  # (B, T), (B, T) -> (B,)
        return rm(input_ids=tokens, attention_mask=mask.long()).logits[:, 0].float()

    return _scorer(f"rm:{path}", model, encode, pad, context, device, batch_size)


def _scorer(name: str, model, encode, pad_id: int, context: int | None, device, batch_size: int):
    from pglm.models.reward import padded

    @torch.no_grad()
    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        seqs = [encode(p, c) for p, c in zip(prompts, completions)]
        longest = max((len(s) for s in seqs), default=0)
        if context is not None and longest > context:
            raise UserError(f"the reward model {name} reads at most {context} tokens, but a prompt and its "
                            f"completion take {longest} of its tokens; lower --max-new-tokens, shorten the prompts, "
                            "or use a reward model with a longer context")
        scores: list[float] = []
        for i in range(0, len(seqs), batch_size):
            tokens, mask = padded(seqs[i : i + batch_size], pad_id)
            scores += model(tokens.to(device), mask.to(device)).tolist()
        return scores

    reward.__qualname__ = reward.__name__ = name
    reward.context, reward.encode = context, encode
    return reward
