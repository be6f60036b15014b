"""Rebuilding what a run directory holds: its configuration, tokenizer and model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pglm.errors import UserError
from pglm.models import ModelConfig, build_model
from pglm.tokenizers import Tokenizer, load_tokenizer
from pglm.train.checkpoint import find_checkpoint, load_weights, read_json


@dataclass
class LoadedRun:
    run_dir: Path
    ckpt_dir: Path
    config: dict  # RUN/config.json
    tokenizer: Tokenizer
    model: torch.nn.Module


def load_run(path: str | Path, device="cpu") -> LoadedRun:
    """The model of a run directory (its latest checkpoint) or of one checkpoints/step_N."""
    run_dir, ckpt_dir = find_checkpoint(path)
    config = read_json(run_dir / "config.json")
    if "model" not in config:
        raise UserError(f"{run_dir}/config.json has no 'model' section; it was not written by pglm")
    tok_file = run_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{tok_file} is missing; the run directory is incomplete")
    tokenizer = load_tokenizer(tok_file)
    model = build_model(ModelConfig(**config["model"]))
    load_weights(model, ckpt_dir)
    model.to(device).eval()
    return LoadedRun(run_dir, ckpt_dir, config, tokenizer, model)
