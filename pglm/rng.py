"""Every random draw of a run, as a pure function of (seed, step, stream, index).

A draw never depends on the rank that makes it, on how many ranks there are, or on how a batch is
split into rollout chunks or micro-batches: the index is global (a micro-batch of the optimizer step,
a prompt of the step). So N processes draw exactly what one process draws, and a run saved at one
world size resumes at another on the same trajectory (docs/distributed.md).

The four numbers go through numpy's SeedSequence, which hashes them into independent streams.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# index: the global micro-batch (data, dropout), the global prompt (sample), the epoch (minibatch), the
# held-out prompt (eval)
STREAMS = {"data": None, "dropout": 1, "prompts": 2, "sample": 3, "minibatch": 4, "eval": 5}


def seed_sequence(seed: int, step: int, stream: str, index: int = 0) -> np.random.SeedSequence:
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {', '.join(STREAMS)}")
    # "data" keeps the three words it was drawn from before streams had names, so the batches of
    # runs made before are drawn as they were.
    words = [seed, step, index] if STREAMS[stream] is None else [seed, step, index, STREAMS[stream]]
    return np.random.SeedSequence(words)


def seed_of(seed: int, step: int, stream: str, index: int = 0) -> int:
    """A 63-bit integer seed (for torch.manual_seed and random.Random)."""
    return int(seed_sequence(seed, step, stream, index).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, step: int, stream: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, step, stream, index))


def python_rng(seed: int, step: int, stream: str, index: int = 0) -> random.Random:
    return random.Random(seed_of(seed, step, stream, index))


def torch_rng(seed: int, step: int, stream: str, index: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_of(seed, step, stream, index))
