"""The opt-in sharded checkpoint format (`--ckpt-format sharded`), for a model whose full weights and
optimizer state are too large to gather on one host.

    checkpoints/step_N/sharded/   safetensors files, one or more per rank, written by every rank
    checkpoints/step_N/state.json the loop state, the world size, and the optimizer's hyper-parameters

Every rank writes its own shards through `torch.distributed.checkpoint` (DCP) with its Hugging Face
safetensors storage, so nothing is gathered and nothing is pickled: the shard layout is JSON in the
safetensors headers, where DCP's default storage would keep a pickled `.metadata` file, which pglm
never loads. On load DCP reads whatever part of each saved tensor this rank needs, so a checkpoint
written by W ranks loads at any world size, sharded (FSDP2) or whole (DDP, one process, `pglm eval`).

Tensors are stored under flat names: `weights/<name in the Policy>` (e.g. weights/model.tok_emb.weight,
weights/value_head.proj.weight) and `optim/<parameter name>/<state key>`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

DIR = "sharded"


def is_sharded(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DIR).is_dir() and not (Path(ckpt_dir) / "model.safetensors").is_file()


def _no_dist() -> bool:
    import torch.distributed as tdist

    return not tdist.is_initialized()


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes one process when there is one: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(tmp: Path, module, optimizer) -> list[dict]:
    """Write this rank's shards of the weights and optimizer state of `module` (a Policy, wrapped or not)
    under tmp/sharded; every rank calls it. Returns the optimizer's param_groups (JSON-able)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    aliases = _aliases(module)
    tensors = {f"weights/{k}": v for k, v in get_model_state_dict(module).items() if k not in aliases}
    groups = []
    if optimizer is not None:
        osd = get_optimizer_state_dict(module, optimizer)
        for fqn, state in osd["state"].items():
            tensors.update({f"optim/{fqn}/{key}": v for key, v in state.items() if isinstance(v, torch.Tensor)})
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    with _quiet():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(Path(tmp) / DIR), save_distributed=True),
                 no_dist=_no_dist())
    return groups


def load_weights(module, ckpt_dir: Path, prefix: str) -> None:
    """Load the weights stored under weights/<prefix>.<name> into a plain (unwrapped) module, whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    aliases = _aliases(module)  # filled with the weight they alias
    target = {f"weights/{prefix}.{name}": t for name, t in module.state_dict().items() if name not in aliases}
    # DCP copies into the tensors of `target`, which are the module's own parameters and buffers
    with _quiet():
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(Path(ckpt_dir) / DIR)), no_dist=_no_dist())


def _aliases(module) -> set[str]:
    """The second names of tied weights (safetensors keeps one name per storage)."""
    from pglm import dist

    module = dist.unwrap(module)
    return {n for n, _ in module.named_parameters(remove_duplicate=False)} - {n for n, _ in module.named_parameters()}


def load_optimizer(module, optimizer, ckpt_dir: Path, param_groups: list[dict]) -> None:
    """Load the optimizer state of `module` (wrapped as it trains now): each rank reads its part."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer)  # a fresh optimizer's state is made here, with its shapes
    flat = {f"optim/{fqn}/{key}": v for fqn, state in osd["state"].items() for key, v in state.items()
            if isinstance(v, torch.Tensor)}
    with _quiet():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(Path(ckpt_dir) / DIR)), no_dist=_no_dist())
    for fqn, state in osd["state"].items():
        for key in state:
            if f"optim/{fqn}/{key}" in flat:
                state[key] = flat[f"optim/{fqn}/{key}"]
    osd["param_groups"] = [{**now, **{k: v for k, v in saved.items() if k != "params"}}
                           for now, saved in zip(osd["param_groups"], param_groups)]
    set_optimizer_state_dict(module, optimizer, osd)
