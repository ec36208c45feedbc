"""The one exception type for mistakes a user can make (bad files, bad input, bad options), and
what its messages say about a path that cannot be used.

May import: nothing of the package.
"""

from __future__ import annotations

from pathlib import Path


class MimoError(Exception):
    """A problem the user can fix; the message says what to do. The CLI prints it without a traceback."""


class ContextFull(MimoError):
    """A prompt that does not fit the context: `tokens` of it, `limit` at most."""

    def __init__(self, message: str, tokens: int, limit: int) -> None:
        super().__init__(message)
        self.tokens, self.limit = tokens, limit


def file_in_the_way(folder: Path) -> Path | None:
    """The part of `folder` (itself, or a folder above it) that is a file, if one is: what keeps
    the folder from being there, for a message that names it. A dangling link counts as a file."""
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None
