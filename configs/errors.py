"""The one exception type for problems a user can fix (bad flags, missing files, stages out of order).

Entry points catch it and print a single line with a non-zero exit; every other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and, where possible, what to do instead."""
