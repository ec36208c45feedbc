"""The one exception type for mistakes a user can make (bad files, bad input, bad options)."""


class MimoError(Exception):
    """A problem the user can fix; the message says what to do. The CLI prints it without a traceback."""
