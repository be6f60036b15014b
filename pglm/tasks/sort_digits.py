"""`sort_digits`: sort a string of digits. Prompt "3141:" -> completion "1134" (then EOS).

Strings of 1-6 digits; held-out set and training split as in `StringTask`.
"""

from __future__ import annotations

from pglm.tasks.base import StringTask


class SortDigits(StringTask):
    name = "sort_digits"
    symbols = "0123456789"
    sep = ":"
    heldout_seed = 1236

    def transform(self, s: str) -> str:
        return "".join(sorted(s))
