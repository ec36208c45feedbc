"""The one exception type for mistakes a user can make (bad files, bad input, bad options).

May import: nothing of the package.
"""


class MimoError(Exception):
    """A problem the user can fix; the message says what to do. The CLI prints it without a traceback."""


class ContextFull(MimoError):
    """A prompt that does not fit the context: `tokens` of it, `limit` at most."""

    def __init__(self, message: str, tokens: int, limit: int) -> None:
        super().__init__(message)
        self.tokens, self.limit = tokens, limit
