"""Built-in tasks: a prompt generator, a fixed held-out set, a reward and the correct answer.

`pglm rl --task NAME` and `pglm eval --task NAME` look names up here.
"""

from pglm.errors import UserError
from pglm.tasks.add2 import Add2
from pglm.tasks.base import StringTask, Task, evaluate_completions, pass_at_k
from pglm.tasks.reverse import Reverse
from pglm.tasks.sort_digits import SortDigits

TASKS: dict[str, Task] = {t.name: t for t in (Add2(), Reverse(), SortDigits())}


def get_task(name: str) -> Task:
    """The built-in task called `name`, or a UserError that lists the names."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "StringTask", "Task", "evaluate_completions", "get_task", "pass_at_k"]
