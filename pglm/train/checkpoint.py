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

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from pglm.errors import UserError


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename). NaN and ±inf are written as null: they are
    not JSON, and a reader such as `jq` or a browser refuses the whole file for one of them."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it: mkstemp's 0600 hides the run from colleagues
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_finite(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # the file it was to replace is untouched
        raise


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and put back
    os.umask(mask)
    return mask


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); the run directory may be damaged") from None


def save_checkpoint(run_dir: Path, step: int, model, optimizer=None, state: dict | None = None, extra=None,
                    sharded: bool = False, keep: int = 0) -> Path | None:
    """Write checkpoints/step_{step} atomically and point `latest` at it.

    `model` is a bare module, or a Policy (possibly wrapped by DDP/FSDP2), whose language model goes to
    model.safetensors and whose value head, if any, to value_head.safetensors (a RewardModel: its body
    to model.safetensors, its head to score.safetensors; `checkpoint_parts` names them). `extra` maps a name to
    another module saved beside a bare model as NAME.safetensors. The files hold the full state, keyed
    by parameter name, whatever the number of processes: every rank helps gather it (FSDP2 holds a
    shard each), rank 0 writes it, so a run saved at one world size resumes at any other. state.json
    records the world size. `sharded` (a Policy only) writes the opt-in sharded format instead
    (`pglm.train.sharded`): every rank its own shards, nothing gathered. `keep` > 0 then deletes all
    but the newest `keep` checkpoints (0: keep every one). Returns the checkpoint directory on rank 0,
    None elsewhere.
    """
    from pglm import dist

    if sharded:
        return _save_sharded(run_dir, step, model, optimizer, state, keep)
    inner = dist.unwrap(model)
    named = getattr(inner, "checkpoint_parts", ())  # a Policy or a RewardModel: one file per part
    parts = {n: getattr(inner, n) for n in named} if named else {"model": inner}
    parts.update(extra or {})
    full = dist.full_model_state(model)  # collectives first, on every rank
    opt_state = dist.full_optimizer_state(model, optimizer) if optimizer is not None else None
    if not dist.is_main():
        return None
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a crash in the middle of an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-{name}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the checkpoint from colleagues
    for part, module in parts.items():
        if module is None:
            continue
        prefix = f"{part}." if named else ""
        tensors = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)} if part in (named or ("model",)) \
            else {k: v.detach().cpu() for k, v in module.state_dict().items()}
        save_file(_without_aliases(tensors, module), str(tmp / f"{part}.safetensors"), metadata={"format": "pt"})
    if opt_state is not None:
        torch.save(opt_state, tmp / "optimizer.pt")
    write_json(tmp / "state.json", {"step": step, **(state or {}), "world_size": dist.world_size()})
    return _publish(ckpt_root, name, tmp, keep)


def _save_sharded(run_dir: Path, step: int, model, optimizer, state: dict | None, keep: int) -> Path | None:
    from pglm import dist
    from pglm.train import sharded

    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step}"
    tmp = ckpt_root / f".tmp-{name}-sharded"  # one name every rank knows
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a crash in the middle of an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    groups = sharded.save(tmp, model, optimizer)  # every rank writes its shards; returns when all have
    if not dist.is_main():
        return None
    write_json(tmp / "state.json", {"step": step, **(state or {}), "world_size": dist.world_size(),
                                    "format": "sharded", "optimizer_param_groups": groups})
    return _publish(ckpt_root, name, tmp, keep)


def _publish(ckpt_root: Path, name: str, tmp: Path, keep: int = 0) -> Path:
    """Rename a finished checkpoint into place, point `latest` at it, then prune to the newest `keep`
    (rank 0). Pruning comes last, so a crash at any moment leaves `latest` naming a whole checkpoint."""
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
    if keep > 0:
        steps = sorted((int(p.name[5:]), p) for p in ckpt_root.glob("step_*") if p.name[5:].isdigit())
        for _, old in steps[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _without_aliases(tensors: dict[str, torch.Tensor], module) -> dict[str, torch.Tensor]:
    """Drop the second name of a tied weight (safetensors refuses two names for one storage; loading
    fills the alias back in, as `safetensors.torch.load_model` does), and make every tensor contiguous."""
    first = {name for name, _ in module.named_parameters()}
    aliases = {name for name, _ in module.named_parameters(remove_duplicate=False)} - first
    return {k: v.contiguous() for k, v in tensors.items() if k not in aliases}


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory or one of its checkpoints/step_N."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory written by pglm pretrain, sft or rl")
    if ((path / "model.safetensors").is_file() or (path / "sharded").is_dir()) and (path / "state.json").is_file():
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
        raise UserError(f"{path} holds no finished checkpoint yet (no checkpoints/latest); start the run again "
                        "with --overwrite, or let it run to its first checkpoint")
    name = latest.read_text(errors="replace").strip()
    if not re.fullmatch(r"step_\d+", name):  # a path here (absolute, or ../..) would lead outside the run
        raise UserError(f"{latest} names '{name[:80]}', not a checkpoint of this run (step_N); pass a "
                        "checkpoints/step_N that exists")
    ckpt = path / "checkpoints" / name
    if not ckpt.exists():  # a crash while the same step was being rewritten: the old copy is set aside
        for aside in sorted(path.glob(f"checkpoints/.tmp-old-{ckpt.name}-*/{ckpt.name}")):
            os.replace(aside, ckpt)
            break
    if not ((ckpt / "model.safetensors").is_file() or (ckpt / "sharded").is_dir()):
        raise UserError(f"{latest} names {ckpt.name}, which is missing; pass a checkpoints/step_N that exists")
    return path, ckpt


def saved_figures(run_dir) -> dict:
    """The last evaluation the latest checkpoint of a run recorded (its state.json, less the state):
    what a loop resumed with no step left returns (a run stopped after its last checkpoint)."""
    state = read_json(find_checkpoint(Path(run_dir))[1] / "state.json")
    skip = {"step", "elapsed", "world_size", "baseline", "reward_stats", "format", "optimizer_param_groups"}
    return {k: v for k, v in state.items() if k not in skip}


def weights_fingerprint(ckpt_dir) -> str:
    """sha256 of a checkpoint's (or an hf:PATH directory's) weight files, names and bytes: what pins
    the reference model of an RL run's KL."""
    import hashlib

    root = Path(str(ckpt_dir).removeprefix("hf:"))
    files = sorted(p for pattern in ("model.safetensors", "*.safetensors", "sharded/**/*.safetensors")
                   for p in root.glob(pattern))
    h = hashlib.sha256()
    for f in dict.fromkeys(files):  # each once, in order
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def load_weights(model, ckpt_dir: Path, name: str = "model") -> None:
    """Load NAME.safetensors (or NAME's weights of a sharded checkpoint) into `model`, turning damage
    into one clear line."""
    from pglm.train import sharded

    if sharded.is_sharded(ckpt_dir):
        try:
            sharded.load_weights(model, ckpt_dir, name)
        except Exception as e:  # noqa: BLE001 — any failure here means damaged or foreign shards
            raise UserError(f"{Path(ckpt_dir) / sharded.DIR} does not hold {name} weights of this model "
                            f"({type(e).__name__}); use an earlier checkpoints/step_N of the run") from None
        return
    file = Path(ckpt_dir) / f"{name}.safetensors"
    if not file.is_file():
        raise UserError(f"{file} is missing; the checkpoint is incomplete, use an earlier checkpoints/step_N")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise UserError(f"{file} is damaged or incomplete ({_first_line(e)}); use an earlier "
                            "checkpoints/step_N of the run") from None
        mismatch = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise UserError(f"{file} does not match the model in config.json ({mismatch[:200]}); the run directory "
                        "is inconsistent") from None
    except (SafetensorError, OSError, ValueError) as e:
        reason = _first_line(e)
        raise UserError(
            f"{file} is damaged or incomplete ({reason}); use an earlier checkpoints/step_N of the run"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{file} does not match the model in config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the run directory is inconsistent"
        )


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_optimizer(optimizer, ckpt_dir: Path, model=None) -> None:
    """Restore the optimizer of `model` (the module it was saved with: a Policy or its wrapper, or a bare
    model) at any world size. Reads the sharded format (`pglm.train.sharded`), optimizer.pt keyed by
    parameter names (written since checkpoints became independent of the world size), and the
    position-keyed optimizer.pt of older checkpoints."""
    from pglm import dist
    from pglm.train import sharded

    if sharded.is_sharded(ckpt_dir):
        groups = read_json(Path(ckpt_dir) / "state.json").get("optimizer_param_groups")
        try:
            sharded.load_optimizer(model, optimizer, ckpt_dir, groups)
        except Exception as e:  # noqa: BLE001 — any failure here means damaged shards or another model
            raise UserError(f"{Path(ckpt_dir) / sharded.DIR} does not hold this model's optimizer state "
                            f"({type(e).__name__}); use an earlier checkpoints/step_N, or start a new run with --init") from None
        return
    file = Path(ckpt_dir) / "optimizer.pt"
    if not file.is_file():
        raise UserError(f"{file} is missing, so the run cannot resume exactly; start a new run with --init")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if model is None or (_by_position(saved) and dist.world_size() == 1):
            optimizer.load_state_dict(saved)  # positions: the optimizer is built in the same order as before
            return
        names = _names(optimizer, dist.unwrap(model))
        if _by_position(saved):
            saved = _by_name(saved, names)
        if sorted(n for g in saved["param_groups"] for n in g["params"]) != sorted(names):
            raise ValueError("the saved state is of other parameters")
        dist.load_optimizer_state(model, optimizer, saved)
    except Exception as e:  # noqa: BLE001 — any failure here means a damaged file or another model
        raise UserError(f"{file} is damaged or belongs to another model ({type(e).__name__}); use an earlier "
                        "checkpoints/step_N, or start a new run with --init") from None


def _by_position(saved: dict) -> bool:
    groups = saved.get("param_groups") or [{}]
    return bool(groups[0].get("params")) and isinstance(groups[0]["params"][0], int)


def _names(optimizer, module) -> list[str]:
    """The name of each of the optimizer's parameters, in its order."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _by_name(saved: dict, names: list[str]) -> dict:
    """An older, position-keyed optimizer state keyed by parameter names instead."""
    return {"state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}


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
    if out.exists() and any(p.name != ".pglm.lock" for p in out.iterdir()):  # the lock of pglm.train.rundir
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
