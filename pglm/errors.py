"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into a single line on stderr and exit code 2 (docs/design.md, "Command line
contract"). Everything else is an internal error: a traceback and exit code 1.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, in one line."""
