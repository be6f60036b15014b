"""Rewards: built-in reward functions and the loader for user ones ("module:function", "file.py:function").

Every reward follows the TRL convention `reward(prompts, completions, **columns) -> list[float]`
(docs/design.md); pglm calls them only through `call_reward`, which turns any fault into a UserError.
"""

from pglm.rewards.builtin import (
    BUILTINS,
    COMPLETION_LENGTHS,
    bleu,
    chrf,
    exact_match,
    format_regex,
    hf_reward_model,
    length_penalty,
    numeric_match,
    soft_overlong,
)
from pglm.rewards.loader import call_reward, combine, load_reward, load_rewards, reward_name

__all__ = [
    "BUILTINS", "COMPLETION_LENGTHS", "bleu", "call_reward", "chrf", "combine", "exact_match", "format_regex",
    "hf_reward_model", "length_penalty", "load_reward", "load_rewards", "numeric_match", "reward_name",
    "soft_overlong",
]
