"""Rebuilding what a run directory holds: its configuration, tokenizer and model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pglm.errors import UserError
from pglm.models import build_model, config_from_dict
from pglm.tokenizers import Tokenizer, load_tokenizer
from pglm.train.checkpoint import find_checkpoint, load_weights, read_json


@dataclass
class LoadedRun:
    run_dir: Path | None  # None for an hf: model
    ckpt_dir: Path | str  # the checkpoint directory, or "hf:PATH"
    config: dict  # RUN/config.json
    tokenizer: Tokenizer
    model: torch.nn.Module


def load_run(path: str | Path, device="cpu", trust_remote_code: bool = False, block_size: int | None = None) -> LoadedRun:
    """The model of a run directory (its latest checkpoint), of one checkpoints/step_N, or of `hf:PATH`
    (a Hugging Face model directory or hub id, with its own tokenizer). `trust_remote_code` is the
    user's flag on this command; what the run directory records never enables remote code."""
    if str(path).startswith("hf:"):
        from dataclasses import asdict

        from pglm.models.hf import load_hf
        from pglm.tokenizers import auto_tokenizer

        model = load_hf(str(path), trust_remote_code, block_size)  # first: "not a model" before "no tokenizer"
        tokenizer = auto_tokenizer(str(path)[3:], trust_remote_code)
        model.to(device).eval()
        return LoadedRun(None, str(path), {"model": asdict(model.config)}, tokenizer, model)
    run_dir, ckpt_dir = find_checkpoint(path)
    config = read_json(run_dir / "config.json")
    if "model" not in config:
        raise UserError(f"{run_dir}/config.json has no 'model' section; it was not written by pglm")
    tok_file = run_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{tok_file} is missing; the run directory is incomplete")
    tokenizer = load_tokenizer(tok_file)
    model = build_model(config_from_dict(config["model"]), trust_remote_code)
    load_weights(model, ckpt_dir)
    model.to(device).eval()
    return LoadedRun(run_dir, ckpt_dir, config, tokenizer, model)


def load_reward_model(path: str | Path, device="cpu", trust_remote_code: bool = False) -> LoadedRun:
    """The reward model of a `pglm reward` run (or of one of its checkpoints): its language model with
    the scalar head of score.safetensors (`pglm.models.reward.RewardModel`), in eval mode."""
    from pglm.models.reward import RewardModel

    run = load_run(path, "cpu", trust_remote_code)
    if run.config.get("command") != "reward":
        raise UserError(f"{run.run_dir} is a '{run.config.get('command')}' run, not a reward model; train one with "
                        "pglm reward --init RUN --data PREFS.jsonl")
    rm = RewardModel(run.model)
    load_weights(rm.score, run.ckpt_dir, "score")
    rm.to(device).eval()
    return LoadedRun(run.run_dir, run.ckpt_dir, run.config, run.tokenizer, rm)
