"""Finding a user's reward function, and calling any reward so that a fault becomes one clear line.

A reward SPEC (`pglm rl --reward SPEC`) is one of
    module:function            an importable module (on sys.path / PYTHONPATH)
    path/to/file.py:function   a Python file, imported by path
    builtin:NAME               one of pglm.rewards.builtin.BUILTINS
    rm:DIR                     a reward model's score (pglm.rewards.learned): a pglm reward run or a
                               one-output Hugging Face sequence classifier
The function part may be dotted (`module:Class.method`).

`call_reward` is the only way the rest of pglm calls a reward: it checks what comes back and turns
every failure into a `UserError` that names the function and the first offending sample
(docs/design.md, "Reward functions": a reward that raises, returns the wrong length, or returns NaN
stops the run with a clear error naming the function and the offending sample).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import numbers
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from pglm.errors import UserError
from pglm.rewards.builtin import BUILTINS

RewardFn = Callable[..., list[float]]
_FILE_PREFIX = "pglm_reward_"  # module names of reward files imported by path


def load_reward(spec: str, device="cpu", trust_remote_code: bool = False) -> RewardFn:
    """The callable named by `spec` ("module:function", "path/to/file.py:function", "builtin:NAME"), or
    the score of the reward model at DIR ("rm:DIR", pglm.rewards.learned), run on `device`."""
    if spec.startswith("rm:"):
        from pglm.rewards.learned import reward_model

        return reward_model(spec[3:], device, trust_remote_code=trust_remote_code)
    where, sep, attr = spec.rpartition(":")  # the last colon, so "C:\\dir\\r.py:f" works on Windows
    if not sep or not where:
        raise UserError(f"reward {spec!r} has no ':'; write module:function, path/to/file.py:function "
                        "or builtin:NAME")
    if not attr:
        raise UserError(f"reward {spec!r} names no function after the ':'; write {where}:FUNCTION")
    if where == "builtin":
        if attr not in BUILTINS:
            raise UserError(f"reward {spec!r}: no built-in reward {attr!r}; choose one of {', '.join(BUILTINS)}")
        return BUILTINS[attr]
    module = _import_file(spec, where) if _is_path(where) else _import_module(spec, where)

    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward {spec!r}: {where} has no attribute {attr!r}; check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward {spec!r}: {attr} is a {type(obj).__name__}, not a function; "
                        "name a function (prompts, completions, **columns) -> list[float]")
    return obj


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"reward {spec!r}: cannot import module {name!r} ({e}); put it on PYTHONPATH "
                        "or pass path/to/file.py:function") from None
    except Exception as e:
        raise UserError(f"reward {spec!r}: importing {name!r} raised {type(e).__name__}: {e}; "
                        "fix the module") from None


def _import_file(spec: str, where: str):
    path = Path(where)
    if not path.is_file():
        raise UserError(f"reward {spec!r}: file {where} does not exist; check the path")
    # A name unique to the file, registered in sys.modules so that pickling its functions works.
    resolved = str(path.resolve())
    name = f"{_FILE_PREFIX}{path.stem}_{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"reward {spec!r}: {where} is not a Python file; pass a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"reward {spec!r}: importing {where} raised {type(e).__name__}: {e}{_at(e)}; "
                        "fix the file") from None
    return module


def load_rewards(specs: list[str], weights: list[float] | None = None, device="cpu",
                 trust_remote_code: bool = False) -> RewardFn:
    """One reward from several specs: their weighted sum (weights default to 1 each).

    A single spec with no weights comes back unwrapped, so its errors name it directly."""
    if not specs:
        raise UserError("no reward given; pass --reward SPEC (or use --task NAME)")
    if weights is not None and len(weights) != len(specs):
        raise UserError(f"{len(specs)} rewards but {len(weights)} weights; give one weight per reward")
    fns = [load_reward(s, device, trust_remote_code) for s in specs]
    if len(fns) == 1 and weights is None:
        return fns[0]
    return combine(list(zip(fns, weights if weights is not None else [1.0] * len(fns))))


def combine(rewards: list[tuple[RewardFn, float]]) -> RewardFn:
    """One reward: Σ_j w_j · r_j(prompts, completions, **columns), each r_j checked by call_reward."""
    if not rewards:
        raise ValueError("combine needs at least one (reward, weight) pair")
    rewards = [(fn, float(w)) for fn, w in rewards]

    def combined(prompts: list[str], completions: list[str], **columns) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in rewards:
            for i, r in enumerate(call_reward(fn, prompts, completions, columns)):
                total[i] += w * r
        return total

    combined.parts = [fn for fn, _ in rewards]  # what `pglm rl` checks before it starts (a reward model's context)
    combined.__qualname__ = combined.__name__ = "combine(" + " + ".join(
        f"{w:g}*{reward_name(fn)}" for fn, w in rewards) + ")"
    return combined


def reward_name(fn) -> str:
    """"module:qualname" of a reward, as errors and logs show it."""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__  # a callable object
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if module.startswith(_FILE_PREFIX) and hasattr(sys.modules.get(module), "__file__"):
        module = sys.modules[module].__file__  # loaded by path: show the path the user gave
    return f"{module}:{qualname}"


def _short(text, n: int = 60) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _sample(prompts, completions, i: int) -> str:
    return f"sample {i} (prompt {_short(prompts[i])}, completion {_short(completions[i])})"


def _at(e: BaseException) -> str:
    """" at file.py:LINE" of the innermost frame of a traceback, to point at the user's code."""
    frames = traceback.extract_tb(e.__traceback__)
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def _columns_of(columns: dict, i: int, n: int) -> dict:
    return {k: (v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in columns.items()}


MAX_REWARD = 1e9  # beyond it the squares of group statistics overflow float32


class _TimedOut(BaseException):
    """Raised into a reward that ran past its time (BaseException: a reward's own `except Exception`
    must not swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Interrupt the code inside after `seconds` (SIGALRM; the main thread of a Unix process only)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise _TimedOut()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict | None = None,
                timeout: float | None = None) -> list[float]:
    """fn(prompts, completions, **columns) as a list of finite floats, or a UserError saying why not.

    When the call raises (or exits: sys.exit in a reward is an error, not the run's exit code), fn is
    called again on one sample at a time to find the first sample that raises (a reward with side
    effects sees those samples twice; only on the way to an error). A call that takes longer than
    `timeout` seconds is stopped, with one line that says so."""
    columns = columns or {}
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    name = reward_name(fn)
    try:
        with _time_limit(timeout):
            out = fn(prompts, completions, **columns)
    except _TimedOut:
        raise UserError(f"reward {name} did not return within {timeout:g} s on a batch of {n} samples (the first: "
                        f"{_sample(prompts, completions, 0)}); make it faster, or raise --reward-timeout") from None
    except UserError:
        raise  # already says what to do
    except (Exception, SystemExit) as e:
        raise _locate_raise(fn, name, prompts, completions, columns, e) from None

    if hasattr(out, "tolist"):  # a tensor or an array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward {name} returned a {type(out).__name__}, not a list; "
                        "return one float per completion")
    if len(out) != n:
        raise UserError(f"reward {name} returned {len(out)} values for {n} completions; "
                        "return one float per completion")
    rewards = []
    for i, r in enumerate(out):
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise UserError(f"reward {name} returned {_short(repr(r))} ({type(r).__name__}) for "
                            f"{_sample(prompts, completions, i)}; return a float for every completion")
        r = float(r)
        if not math.isfinite(r):
            raise UserError(f"reward {name} returned {r} for {_sample(prompts, completions, i)}; "
                            "return a finite float for every completion")
        if abs(r) > MAX_REWARD:
            raise UserError(f"reward {name} returned {r:g} for {_sample(prompts, completions, i)}; rewards beyond "
                            f"±{MAX_REWARD:g} overflow the advantage arithmetic: scale the reward down")
        rewards.append(r)
    return rewards


def _locate_raise(fn, name, prompts, completions, columns, e: Exception) -> UserError:
    n = len(prompts)
    for i in range(n):
        try:
            fn(prompts[i : i + 1], completions[i : i + 1], **_columns_of(columns, i, n))
        except (Exception, SystemExit) as one:
            what = f"called sys.exit({one.code!r})" if isinstance(one, SystemExit) else f"raised {type(one).__name__}"
            return UserError(f"reward {name} {what} on {_sample(prompts, completions, i)}"
                             f"{_at(one)}: {one}; fix the reward function (a reward returns its values)")
    what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"raised {type(e).__name__}"
    return UserError(f"reward {name} {what} on a batch of {n} samples "
                     f"(no single sample raises){_at(e)}: {e}; fix the reward function")
