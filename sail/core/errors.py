"""The one exception type for mistakes a user can make.

A `SailError` carries a single line that says what was wrong and what to do. The CLI prints it
without a traceback and exits 2; library users can catch it.
"""


class SailError(Exception):
    """A user-facing error: one clear line, no traceback needed."""
