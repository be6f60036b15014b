"""What a built-in task is, and how its completions are scored (accuracy, pass@k).

A task is a prompt generator, a fixed held-out set, a reward and a correct answer. Every built-in
task here has an answer that is a function of the prompt alone (`answer(prompt)`), so the reward
recomputes it from the prompt and never trusts a column; rows still carry "answer" so that a JSONL
export works with `builtin:exact_match` and for SFT data.

Completions given to `reward` are decoded response texts cut at the first end-of-sequence (the EOS
itself is not in the text). A completion is correct when, stripped of surrounding whitespace, it
equals the answer exactly: " 12 " counts, "012", "12x" and "12 12" do not.
No model code lives here: sampling is `pglm.sampling`.
"""

from __future__ import annotations

import math
import random

from pglm.errors import UserError
from pglm.rewards.loader import call_reward
from pglm.tokenizers import Tokenizer, char_tokenizer


class Task:
    """A built-in task. Subclasses set the class attributes and define `answer`, `train_prompts`, `heldout`."""

    name: str
    alphabet: str  # every character of prompts and answers, for char_tokenizer (pad, bos, eos added there)
    max_new_tokens: int  # the longest correct answer in tokens, plus one for EOS

    def answer(self, prompt: str) -> str:
        """The correct completion text of `prompt` (no EOS); ValueError for a prompt the task cannot make."""
        raise NotImplementedError

    def train_prompts(self, rng: random.Random, n: int) -> list[dict]:
        """n training rows {"prompt", "answer"}, drawn with `rng`; never a held-out prompt."""
        raise NotImplementedError

    def heldout(self) -> list[dict]:
        """The fixed evaluation rows {"prompt", "answer"}, the same on every call and machine."""
        raise NotImplementedError

    def row(self, prompt: str) -> dict:
        return {"prompt": prompt, "answer": self.answer(prompt)}

    def solution(self, row: dict) -> str:
        """The correct completion of a row (the caller appends EOS), e.g. for SFT data."""
        return self.answer(row["prompt"])

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        """1.0 when the stripped completion equals the prompt's answer exactly, else 0.0."""
        return [1.0 if c.strip() == self.answer(p) else 0.0 for p, c in zip(prompts, completions)]

    def tokenizer(self) -> Tokenizer:
        return char_tokenizer(self.alphabet)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class StringTask(Task):
    """Prompts `s + sep` for random strings s over `symbols`; the answer is `transform(s)`.

    Lengths are uniform in 1..max_len, then characters uniform. The held-out set holds `n_heldout`
    distinct strings drawn the same way by Random(heldout_seed), but only of lengths >= heldout_min_len:
    the shorter lengths have too few strings (a 6-letter alphabet has 6 of length 1) to hold some out
    without removing the whole length from training. Training rejects held-out strings."""

    symbols: str
    sep: str
    max_len: int = 6
    heldout_min_len: int = 4
    heldout_seed: int
    n_heldout: int = 500

    def __init__(self):
        self.alphabet = self.symbols + self.sep
        self.max_new_tokens = self.max_len + 1
        self._heldout_strings = self._draw_heldout()
        self._heldout_set = set(self._heldout_strings)

    def transform(self, s: str) -> str:
        raise NotImplementedError

    def _random_string(self, rng: random.Random, min_len: int) -> str:
        length = rng.randint(min_len, self.max_len)
        return "".join(rng.choice(self.symbols) for _ in range(length))

    def _draw_heldout(self) -> list[str]:
        rng, seen = random.Random(self.heldout_seed), {}
        while len(seen) < self.n_heldout:
            seen.setdefault(self._random_string(rng, self.heldout_min_len), None)
        return list(seen)  # in drawing order

    def answer(self, prompt: str) -> str:
        s = prompt[: -len(self.sep)]
        if not prompt.endswith(self.sep) or not s or any(ch not in self.symbols for ch in s):
            raise ValueError(f"{prompt!r} is not a {self.name} prompt (characters of {self.symbols!r}, then {self.sep!r})")
        return self.transform(s)

    def train_prompts(self, rng: random.Random, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            s = self._random_string(rng, 1)
            if s not in self._heldout_set:
                rows.append(self.row(s + self.sep))
        return rows

    def heldout(self) -> list[dict]:
        return [self.row(s + self.sep) for s in self._heldout_strings]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, arXiv 2107.03374, eq. 1). Exact integer binomials; C(n-c, k) = 0 when k > n-c."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_completions(task: Task, rows: list[dict], completions_per_row: list[list[str]],
                         k_values=(1,)) -> dict:
    """Score completions of task rows: {"accuracy", "pass@k" for each k, "n_prompts", "n_samples"}.

    `accuracy` is the fraction of rows whose first completion (by convention the greedy one) is
    correct. `pass@k` averages the unbiased estimator over rows, counting all n completions of a
    row; for it to be unbiased those n must be independent samples, so a caller that puts a greedy
    completion first should pass it separately. Correct means reward 1.0."""
    if len(rows) != len(completions_per_row):
        raise ValueError(f"{len(rows)} rows but {len(completions_per_row)} lists of completions")
    if not rows:
        raise UserError("no rows to evaluate; give the evaluation at least one prompt")
    n_min = min(len(cs) for cs in completions_per_row)
    if n_min == 0:
        raise ValueError("a row has no completions")
    too_big = [k for k in k_values if k > n_min]
    if too_big:
        raise UserError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per prompt, got {n_min}; "
                        "sample more per prompt or use smaller k")

    correct = []  # per row: list of bools
    for row, cs in zip(rows, completions_per_row):
        rewards = call_reward(task.reward, [row["prompt"]] * len(cs), cs)
        correct.append([r == 1.0 for r in rewards])
    out = {"accuracy": sum(c[0] for c in correct) / len(rows)}
    for k in k_values:
        out[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(rows)
    out["n_prompts"] = len(rows)
    out["n_samples"] = sum(len(c) for c in correct)
    return out
