"""`add2`: two-digit addition, the built-in and benchmark task (docs/design.md, "Built-in task add2").

Prompt f"{a}+{b}=" with a, b in 0..99; the correct completion is str(a+b), then EOS. Reward 1.0 when
the completion (decoded text cut at the first EOS) stripped equals str(a+b), else 0.0; so " 12 " is
right and "012" is wrong. The 500 held-out pairs are exactly
    random.Random(1234).sample([(a, b) for a in range(100) for b in range(100)], 500)
in that order, and training draws uniformly from the other 9,500 pairs only, the split the peer
figures in docs/design.md ("The add2 reference measurements") use.
"""

from __future__ import annotations

import random
import re

from pglm.tasks.base import Task

ALL_PAIRS = [(a, b) for a in range(100) for b in range(100)]
HELDOUT_PAIRS = random.Random(1234).sample(ALL_PAIRS, 500)
_HELDOUT_SET = set(HELDOUT_PAIRS)
TRAIN_PAIRS = [p for p in ALL_PAIRS if p not in _HELDOUT_SET]  # 9,500, in (a, b) order

_PROMPT = re.compile(r"(\d+)\+(\d+)=")


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"{prompt!r} is not an add2 prompt (write it as 'A+B=')")
    return int(m.group(1)), int(m.group(2))


def has_carry(a: int, b: int) -> bool:
    """Whether the units digits carry (7+5 does, 12+34 does not): the harder half of the problem."""
    return (a % 10 + b % 10) >= 10


class Add2(Task):
    name = "add2"
    alphabet = "0123456789+="
    max_new_tokens = 4  # at most 3 digits (99+99=198), then EOS

    def answer(self, prompt: str) -> str:
        a, b = parse_prompt(prompt)
        return str(a + b)

    def train_prompts(self, rng: random.Random, n: int) -> list[dict]:
        return [self.row(prompt_of(*rng.choice(TRAIN_PAIRS))) for _ in range(n)]

    def heldout(self) -> list[dict]:
        return [self.row(prompt_of(a, b)) for a, b in HELDOUT_PAIRS]
