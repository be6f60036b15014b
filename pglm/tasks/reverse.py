"""`reverse`: write a string backwards. Prompt "abc>" -> completion "cba" (then EOS).

Strings of 1-6 letters over "abcdef"; held-out set and training split as in `StringTask`.
"""

from __future__ import annotations

from pglm.tasks.base import StringTask


class Reverse(StringTask):
    name = "reverse"
    symbols = "abcdef"
    sep = ">"
    heldout_seed = 1235

    def transform(self, s: str) -> str:
        return s[::-1]
