"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into a single line on stderr and exit code 2 (docs/design.md, "Command line
contract"). Everything else is an internal error: a traceback and exit code 1.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, in one line."""


def check_number(flag: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, integer: bool = False, example: str = "") -> None:
    """Refuse a value that is not a finite number in [low, high] (low excluded with `low_open`), in
    one line that names the flag and the range. NaN and ±inf fail every comparison, so they are
    refused explicitly (a NaN learning rate trained, silently, to NaN weights)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else (f"> {low:g}" if low_open else f"≥ {low:g}")
        hi = "" if high is None else f"≤ {high:g}"
        bound = " and ".join(b for b in (lo, hi) if b)
        kind = "a whole number" if integer else "a finite number"
        raise UserError(f"{flag} must be {kind}{' ' + bound if bound else ''}, not {value!r}"
                        + (f"; e.g. {flag} {example}" if example else ""))
