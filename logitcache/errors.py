"""The one exception type for problems a user can cause and fix."""


class LogitCacheError(Exception):
    """A user-facing error: the message names the problem and the fix.

    The CLI prints it as one line (the traceback only with ``--debug``).
    """
