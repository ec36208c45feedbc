"""How the command line words its mistakes and warnings: one line each, naming flags as typed.

Click's own report of a bad value is a usage block of four lines (exit status 2); the library's
messages name options as the API does (`max_pixels`). Both become one line that names the flag.
Imports nothing heavy: `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import click


def bad_value(err: click.BadParameter, command: click.Command | None, args: list[str]) -> str:
    """A value click refused, as one line: the flag as the user typed it, what it must be, and
    the value given (`-m (--max-tokens) must be at least 1, got 0`)."""
    param = err.param
    if not isinstance(param, click.Option):
        return f"{err.param_hint or 'a value'}: {err.message.rstrip('.')}"
    flag, value = typed(param, args)
    if flag != longest(param):
        flag = f"{flag} ({longest(param)})" if not flag.startswith("--") else flag
    kind = param.type
    if isinstance(kind, click.IntRange | click.FloatRange):
        limits = range_words(kind)
        value = value if value is not None else err.message.split(" is not ")[0]
        if "is not in the range" in err.message:
            return f"{flag} must be {limits}, got {value}"
        what = "an integer" if isinstance(kind, click.IntRange) else "a number"
        return f"{flag} must be {what}{', ' + limits if limits else ''}, got {value}"
    return f"{flag}: {err.message.rstrip('.')}"


def usage_mistake(err: click.UsageError, command_path: str, listed: str = "options") -> str:
    """Any other mistake in how a command was called (an unknown flag or command, a missing
    one), and where the `listed` options (or commands) are."""
    message = err.format_message()
    return f"{message[:1].lower()}{message[1:]} ('{command_path} --help' lists the {listed})"


def range_words(kind: click.IntRange | click.FloatRange) -> str:
    """`at least 1`, `above 0`, `between 0 and 1`, ..."""
    low, high = kind.min, kind.max
    lower = None if low is None else ("above " if kind.min_open else "at least ") + f"{low:g}"
    upper = None if high is None else ("below " if kind.max_open else "at most ") + f"{high:g}"
    if lower and upper and not (kind.min_open or kind.max_open):
        return f"between {low:g} and {high:g}"
    return " and ".join(part for part in (lower, upper) if part)


def typed(param: click.Option, args: list[str]) -> tuple[str, str | None]:
    """The flag of `param` as it appears in `args` (the last one, which click keeps) and the
    value given with it; (its longest name, None) when it is not there (an environment value)."""
    found: tuple[str, str | None] = (longest(param), None)
    for i, arg in enumerate(args):
        for flag in (*param.opts, *param.secondary_opts):
            if arg == flag:
                found = flag, args[i + 1] if i + 1 < len(args) else None
            elif flag.startswith("--") and arg.startswith(flag + "="):
                found = flag, arg[len(flag) + 1 :]
            elif len(flag) == 2 and not arg.startswith("--") and arg.startswith(flag):
                found = flag, arg[2:]
    return found


def longest(param: click.Option) -> str:
    """The flag named like the option (`--temp` for temp), else its longest name."""
    named = [flag for flag in param.opts if flag[2:].replace("-", "_") == param.name]
    return named[0] if named else max(param.opts, key=len)


def in_flag_words(message: str, command: click.Command | None, args: list[str]) -> str:
    """A library message for the command line: option names (`max_pixels`) become the flags
    the command takes, as typed in `args` (`--max-pixels`; `--temperature` if that was typed).
    Names with an underscore are unmistakable; a one-word name is replaced only where it is the
    subject of 'must' (`temp must be ...`)."""
    if command is None:
        return message
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if not longest(param)[2:].replace("-", "_") == param.name:
            continue  # a flag named unlike its option: the library never names it
        flag = typed(param, args)[0]
        if param.is_flag:  # `prompt_lookup=True` is the flag itself
            message = message.replace(f"{param.name}=True", flag)
        after = r"(?![\w./-])" if "_" in param.name else r"(?= must\b)"
        message = re.sub(rf"(?<![\w./-]){re.escape(param.name)}{after}", flag, message)
    return message


def as_typed(message: str) -> str:
    """A library message in the running command's flags, as typed (see `in_flag_words`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    typed_args = ctx.find_root().meta.get("typed", [])[1:]
    return in_flag_words(message, ctx.command, typed_args)


def print_note(message: str) -> None:
    """A library notice (a video fitted to its token budget) as `note: ...` on stderr, options
    named as the running command's flags."""
    click.echo(f"note: {as_typed(message)}", err=True)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the command line: `warning: ...`, one line, no source."""
    text = " ".join(str(message).split())
    click.secho(f"warning: {text}", fg="yellow", err=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within it, warnings print as one `warning:` line each (restored afterwards)."""
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        yield
