"""Built-in reward functions, in the TRL convention (docs/design.md, "Reward functions"):

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]

`columns` are the other fields of the prompt dataset, one list per field, aligned with `prompts`.
The match rewards read the column `answer`. `completions` are the decoded texts of the responses,
cut by the caller at the first end-of-sequence (which is not part of the text).

Scales: exact_match, numeric_match and format_regex give 0.0 or 1.0; chrf and bleu are sacrebleu's
0..100 scores divided by 100, so they lie in [0, 1]; length_penalty lies in [-factor, 0];
hf_reward_model gives the model's raw score (unbounded).
"""

from __future__ import annotations

import re
from pathlib import Path

from pglm.errors import UserError

# The column that carries token counts for `length_penalty(..., tokens=True)`; the RL loop fills it.
COMPLETION_LENGTHS = "completion_lengths"

# A number as people write it: optional sign, digits with an optional fraction, optional exponent.
# No thousands separators: "1,000" reads as 1.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _answers(name: str, columns: dict, n: int) -> list[str]:
    answers = columns.get("answer")
    if answers is None:
        raise UserError(f"reward {name} needs an 'answer' column in the prompt dataset; "
                        "add \"answer\" to every JSONL row")
    if len(answers) != n:
        raise ValueError(f"{len(answers)} answers for {n} completions")
    return [str(a) for a in answers]


def exact_match(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the stripped `answer`."""
    answers = _answers("exact_match", columns, len(completions))
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answers)]


def first_number(text: str) -> float | None:
    """The first number in `text` ("x = -3.5e2, y" -> -350.0), or None when there is none."""
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def numeric_match(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the first number in the completion equals float(answer) within 1e-6 (absolute)."""
    out = []
    for c, a in zip(completions, _answers("numeric_match", columns, len(completions))):
        try:
            target = float(a)
        except ValueError:
            raise ValueError(f"answer {a!r} is not a number") from None
        x = first_number(c)
        out.append(1.0 if x is not None and abs(x - target) <= 1e-6 else 0.0)
    return out


def format_regex(pattern: str):
    """A reward that is 1.0 when the whole stripped completion matches `pattern` (re.fullmatch)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"format_regex: {pattern!r} is not a valid regular expression ({e}); fix the pattern") from None

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]

    reward.__qualname__ = reward.__name__ = f"format_regex({pattern!r})"
    return reward


def soft_overlong(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; docs/estimators.md §1, "DAPO"):
    0 up to max_len - cache_len, then linear down to -1 at max_len, -1 beyond."""
    free = max_len - cache_len
    if length <= free:
        return 0.0
    if length <= max_len:
        return (free - length) / cache_len
    return -1.0


def length_penalty(max_len: int, cache_len: int, factor: float = 1.0, tokens: bool = False):
    """A reward of factor * soft_overlong(len(completion)), to add to a task reward with `combine`.

    Lengths are characters of the completion, or with `tokens=True` the token counts the caller
    passes in the column `completion_lengths` (one int per completion, EOS not counted)."""
    if not 0 < cache_len <= max_len:
        raise UserError(f"length_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                        f"max_len={max_len}; pick a buffer inside the length limit")

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        if tokens:
            lengths = columns.get(COMPLETION_LENGTHS)
            if lengths is None:
                raise UserError(f"length_penalty(tokens=True) needs the column {COMPLETION_LENGTHS!r}; "
                                "pass token counts or use tokens=False to count characters")
        else:
            lengths = [len(c) for c in completions]
        return [factor * soft_overlong(int(n), max_len, cache_len) for n in lengths]

    reward.__qualname__ = reward.__name__ = f"length_penalty(max_len={max_len}, cache_len={cache_len})"
    return reward


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise UserError("the chrf and bleu rewards need sacrebleu; pip install sacrebleu") from None
    return sacrebleu


def _unit(score: float) -> float:
    """sacrebleu's 0..100 as 0..1, clipped: BLEU of identical texts comes out as 100.00000000000004."""
    return min(1.0, max(0.0, score / 100.0))


def chrf(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Sentence chrF (sacrebleu defaults: character 6-grams, beta 2) against `answer`, in [0, 1]."""
    sb = _sacrebleu()
    answers = _answers("chrf", columns, len(completions))
    return [_unit(sb.sentence_chrf(c, [a]).score) for c, a in zip(completions, answers)]


def bleu(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Sentence BLEU (sacrebleu defaults, exp smoothing) against `answer`, in [0, 1].

    Sentence BLEU is noisy on short texts; chrf is usually the better reward for them."""
    sb = _sacrebleu()
    answers = _answers("bleu", columns, len(completions))
    return [_unit(sb.sentence_bleu(c, [a]).score) for c, a in zip(completions, answers)]


def hf_reward_model(path, device: str = "cpu", batch_size: int = 16, max_length: int = 1024):
    """A reward that scores (prompt, completion) with a local Hugging Face sequence classifier.

    The model must have a single output (num_labels=1, as reward models trained with TRL's
    RewardTrainer do); its raw logit is the reward. Prompt and completion are given to the tokenizer
    as a text pair; chat templates are not applied. Nothing is downloaded and no remote code runs."""
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise UserError("hf_reward_model needs transformers; pip install 'pglm[hf]'") from None
    if not Path(path).is_dir():
        raise UserError(f"hf_reward_model: {path} is not a directory; pass the local directory of the model")
    import torch
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=False).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"hf_reward_model: cannot load {path} ({e}); pass a saved sequence-classification model") from None
    if model.config.num_labels != 1:
        raise UserError(f"hf_reward_model: {path} has {model.config.num_labels} outputs; "
                        "use a reward model with num_labels=1")

    @torch.no_grad()
    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        scores = []
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], completions[i : i + batch_size], truncation=True,
                      max_length=max_length, padding=True, return_tensors="pt").to(device)
            scores += model(**enc).logits[:, 0].float().tolist()  # (b,)
        return scores

    reward.__qualname__ = reward.__name__ = f"hf_reward_model({str(path)!r})"
    return reward


# The names `builtin:NAME` accepts: ready-made functions with no parameters.
BUILTINS = {"exact_match": exact_match, "numeric_match": numeric_match, "chrf": chrf, "bleu": bleu}
