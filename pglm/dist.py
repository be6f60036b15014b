"""torch.distributed in one place: start-up from torchrun's environment, rank and world, wrapping the
policy (DDP or FSDP2), the few reductions the loops need, rank-0-only writes, and full-state
checkpoints that any world size loads.

Everything here is a no-op in a world of one process: no process group, no wrapper, no collective,
so the one-process path costs what it cost before. With torchrun the backend follows the device:
gloo on CPU, NCCL on CUDA (docs/distributed.md).

The rules the loops follow, and that tests/test_dist.py checks against one process:
- a group of samples of one prompt never spans ranks; every random draw is a function of (seed,
  step, global index) (`pglm.rng`);
- every normaliser that spans an optimizer step is summed over micro-batches and ranks (`all_sum`);
- the gradient goes through the wrapper's `forward` only (under DDP a call that bypasses it skips
  the all-reduce without an error; under FSDP2 other methods must be registered, `wrap`);
- DDP and FSDP2 average gradients over ranks, so each rank's loss is scaled by the world size;
- decisions (skip, stop) and failures are agreed by every rank, so no rank waits for one that left.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from pglm.errors import UserError

DIST_MODES = ("ddp", "fsdp2")


def sharded_mode(mode: str | None) -> bool:
    """Whether --dist asks for sharded parameters (FSDP2) in a world of several processes."""
    return mode == "fsdp2" and launched()


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process in a larger world."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device_name: str, mode: str | None) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) and
    return this rank's device. A world of 1 starts nothing and returns the device asked for."""
    from pglm.train.mle import resolve_device

    if mode is not None and mode not in DIST_MODES:
        raise UserError(f"--dist must be ddp or fsdp2, not '{mode}'")
    device = resolve_device(device_name)
    if not launched():
        if mode == "fsdp2":
            raise UserError("--dist fsdp2 shards the model over several processes; launch with "
                            "torchrun --nproc-per-node N (N > 1), or drop --dist")
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A collective that waits longer than this fails instead of hanging; a rank that dies closes its
        # sockets, so its peers fail at their next collective long before that (gloo and NCCL alike).
        timeout = datetime.timedelta(seconds=float(os.environ.get("PGLM_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- reductions: one collective each, nothing at world 1 ----

def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a new tensor; `x` itself at world 1)."""
    return _all_reduce(x, "SUM")


def all_max_tensor(x: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `x` over ranks (`x` itself at world 1)."""
    return _all_reduce(x, "MAX")


def _all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def all_max(n: int) -> int:
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one: a stop asked on one rank stops all at the same step."""
    return all_max(int(bool(flag))) > 0


def all_ranks(flag: bool) -> bool:
    return not any_rank(not flag)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (a model initialised or loaded on rank 0 only,
    LoRA adapters drawn per rank). DDP does this itself; FSDP2 shards what each rank holds, so it must
    hold the same thing first."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


@contextlib.contextmanager
def agreed_errors():
    """Make a user error on any rank the error of every rank.

    The code inside runs on every rank; when it raises UserError on some, every rank raises the
    lowest such rank's message (so a reward that fails on rank 1 ends rank 0 too, with the same line,
    instead of leaving it waiting in the next collective). At world 1 errors pass through unchanged.
    """
    if world_size() == 1:
        yield
        return
    message = None
    try:
        yield
    except UserError as e:
        message = str(e)
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)  # our own processes' strings, not user data
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise SharedUserError(first)


class SharedUserError(UserError):
    """A UserError every rank raised together: only rank 0 prints it."""


# ---- the wrapped module ----

def wrap(policy: nn.Module, mode: str | None, device: torch.device, methods: tuple[str, ...] = (),
         offload: bool = False) -> nn.Module:
    """The module training calls: `policy` itself at world 1; DDP or FSDP2 of it otherwise.

    FSDP2 shards each transformer block, then the root (the FSDP2 recipe of torchtitan and of the
    PyTorch FSDP2 tutorial), and registers `methods` (generation, evaluation) so that calling them
    gathers the root's parameters as `forward` does (without it they fail on mixed Tensor/DTensor).
    `offload` (FSDP2; the frozen reference model) keeps the shards in CPU memory between uses.
    """
    if world_size() == 1:
        return policy
    broadcast_module(policy)
    if (mode or "ddp") == "ddp":
        # broadcast_buffers=False: the only buffers are constant tables (rotary angles), and a broadcast
        # at every forward would need every rank to run the same number of forwards.
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False}  # the name since torch 2.12
        return DDP(policy, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (world_size(),))
    # pinned host memory only where there is a GPU to copy to
    where = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for block in transformer_blocks(policy):
        fully_shard(block, mesh=mesh, offload_policy=where)
    fully_shard(policy, mesh=mesh, offload_policy=where)
    for name in methods:
        register_fsdp_forward_method(policy, name)
    return policy


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: pglm GPT's `Block`s, or the layers a Hugging Face model names in
    `_no_split_modules` (the classes transformers itself keeps whole when it shards). An LSTM has none."""
    from pglm.models.gpt import Block

    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if isinstance(m, Block) or type(m).__name__ in names]


def unwrap(wrapped):
    """The module inside a DDP wrapper (FSDP2 wraps in place: the module is its own wrapper)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return wrapped.module if isinstance(wrapped, DDP) else wrapped


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, enabled: bool):
    """Gradient accumulation: reduce gradients only on the last micro-batch of an optimizer step."""
    if world_size() == 1 or enabled:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (FSDP2 returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- full-state checkpoints ----

def full_model_state(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The full, FQN-keyed state dict on CPU (every rank must call it; rank 0 receives it)."""
    module = unwrap(wrapped)
    if world_size() == 1 or not _is_fsdp(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_parameters(module: nn.Module):
    """(name, whole tensor) of each parameter of `module`, one at a time, on its own device: FSDP2's
    shards are gathered (every rank must walk it to the end, in the same order), others given as
    they are. What a weight sync hands an inference engine: one full tensor alive at a time."""
    for name, p in module.named_parameters():
        t = p.detach()  # no graph, whatever the caller's grad mode (a generator cannot hold no_grad)
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t


def full_optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter names, whole (every rank calls; rank 0 receives)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    module = unwrap(wrapped)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if world_size() > 1 else None
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer_state(wrapped: nn.Module, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state on every rank (FSDP2 keeps this rank's shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module = unwrap(wrapped)
    options = StateDictOptions(full_state_dict=True) if world_size() > 1 else None
    set_optimizer_state_dict(module, optimizer, state, options=options)


def sharded(module: nn.Module) -> bool:
    """Whether `module` is sharded by FSDP2 (its every forward is then a collective)."""
    return world_size() > 1 and _is_fsdp(unwrap(module))


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
