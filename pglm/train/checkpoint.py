"""Run directories and checkpoints.

    RUN/config.json              the full resolved configuration
    RUN/tokenizer.json           rebuilds the tokenizer with no other file
    RUN/checkpoints/step_N/      model.safetensors, state.json, optimizer.pt
    RUN/checkpoints/latest       the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place, and `latest` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint complete and named.
Weights are safetensors, state is JSON, and the optimizer state is read back with
`torch.load(weights_only=True)`: nothing a user hands us is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from pglm.errors import UserError


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); the run directory may be damaged") from None


def save_checkpoint(run_dir: Path, step: int, model, optimizer=None, state: dict | None = None, extra=None) -> Path:
    """Write checkpoints/step_{step} atomically and point `latest` at it.

    `extra` maps a name to another module saved beside the model as NAME.safetensors (PPO's value head).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a crash in the middle of an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-{name}-"))
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    for part, module in (extra or {}).items():
        save_model(module, str(tmp / f"{part}.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_json(tmp / "state.json", {"step": step, **(state or {})})
    final = ckpt_root / name
    if final.exists():  # the same step written again: set the old one aside (find_checkpoint puts it
        old = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-old-{name}-"))  # back after a crash here)
        os.replace(final, old / name)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    return final


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory or one of its checkpoints/step_N."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory written by pglm pretrain, sft or rl")
    if (path / "model.safetensors").is_file() and (path / "state.json").is_file():
        run_dir = path.parent.parent
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{path} looks like a checkpoint but {run_dir}/config.json is missing")
        return run_dir, path
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} is not a pglm run or checkpoint (no config.json); pass a directory written by "
            "pglm pretrain, sft or rl, or one of its checkpoints/step_N"
        )
    latest = path / "checkpoints" / "latest"
    if not latest.is_file():
        raise UserError(f"{path} holds no finished checkpoint yet (no checkpoints/latest); train it first")
    ckpt = path / "checkpoints" / latest.read_text().strip()
    if not ckpt.exists():  # a crash while the same step was being rewritten: the old copy is set aside
        for aside in sorted(path.glob(f"checkpoints/.tmp-old-{ckpt.name}-*/{ckpt.name}")):
            os.replace(aside, ckpt)
            break
    if not (ckpt / "model.safetensors").is_file():
        raise UserError(f"{latest} names {ckpt.name}, which is missing; pass a checkpoints/step_N that exists")
    return path, ckpt


def load_weights(model, ckpt_dir: Path, name: str = "model") -> None:
    """Load NAME.safetensors into `model`, turning damage into one clear line."""
    file = Path(ckpt_dir) / f"{name}.safetensors"
    if not file.is_file():
        raise UserError(f"{file} is missing; the checkpoint is incomplete, use an earlier checkpoints/step_N")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{file} is damaged or incomplete ({reason}); use an earlier checkpoints/step_N of the run"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{file} does not match the model in config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the run directory is inconsistent"
        )


def load_optimizer(optimizer, ckpt_dir: Path) -> None:
    file = Path(ckpt_dir) / "optimizer.pt"
    if not file.is_file():
        raise UserError(f"{file} is missing, so the run cannot resume exactly; start a new run with --init")
    try:
        optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 — any failure here means a damaged file
        raise UserError(f"{file} is damaged ({type(e).__name__}); use an earlier checkpoints/step_N") from None


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Check --out before any work starts; never destroy what the user did not ask to replace."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    is_run = (out / "config.json").is_file()
    if resume:
        if not is_run:
            raise UserError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return out
    if out.exists() and (not out.is_dir()):
        raise UserError(f"--out {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()):
        if is_run and overwrite:
            shutil.rmtree(out)
        elif is_run:
            raise UserError(
                f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another directory"
            )
        else:
            raise UserError(f"--out {out} holds files that are not a pglm run; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def opened_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False):
    """The run directory a command writes, checked before any work starts (`prepare_out_dir`).

    If setting up a new run fails (bad data, a bad flag found late, Ctrl-C), what it created is
    removed, so no half run is left to trip a later --resume, and a run it was to --overwrite is put
    back: nothing already saved is lost until the new run has started. A resumed run is never touched.
    """
    out = Path(out)
    backup = None
    if overwrite and not resume and (out / "config.json").is_file():
        backup = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
    existed = out.exists()
    try:
        out = prepare_out_dir(out, resume, overwrite)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    try:
        yield out
    except BaseException:
        if not resume:
            for child in list(out.iterdir()) if existed else [out]:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            if backup is not None:
                os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
