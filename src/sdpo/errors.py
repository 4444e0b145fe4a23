"""The one exception type for mistakes a user can fix (bad files, bad options).

The CLI prints its message without a traceback and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input: the message says what, where and how to fix it."""
