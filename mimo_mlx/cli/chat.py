"""`mimo-mlx chat`: a conversation in the terminal, or scripted through a pipe (a message a line).

Line editing and history (arrow keys) come from Python's readline module (GNU readline or
libedit) when the input is a terminal. Ctrl-C during an answer stops that answer and keeps the
conversation; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..conversation.conversation import Conversation
from ..errors import MimoError
from .console import StreamPrinter, stats_line, stop_reason
from .usage import as_typed, print_note

HELP = """\
Type a message and press Enter. Commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file or a folder of frames to your next message
  /reset        forget the conversation and start over
  /save FILE    write the conversation, its cache included, to FILE
  /load FILE    continue a conversation saved with /save
  /help         show this help
  /quit         leave (Ctrl-D does too)
Ctrl-C stops an answer (or a command); the conversation keeps what was said."""


class ChatSession:
    """Reads messages and commands, streams answers, keeps the conversation."""

    def __init__(
        self,
        chat: Conversation,
        *,
        hide_thinking: bool,
        max_tokens: int,
        sampling: dict,
        images: tuple = (),
        videos: tuple = (),
        prompt_lookup: bool = False,
    ) -> None:
        self.chat = chat
        self.prompt_lookup = prompt_lookup  # for the stats line (the options are in `sampling`)
        self.hide_thinking = hide_thinking
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.images, self.videos = list(images), list(videos)
        self.interactive = sys.stdin.isatty()
        self.failed = False  # a piped script exits non-zero if any line failed
        self.commands: dict[str, Callable[[str], bool]] = {
            "/image": self._attach_image,
            "/video": self._attach_video,
            "/reset": self._reset,
            "/save": self._save,
            "/load": self._load,
            "/help": self._help,
            "/quit": self._quit,
            "/exit": self._quit,
        }

    def run(self) -> int:
        """The read-answer loop; returns the exit status."""
        if self.interactive:
            import readline  # noqa: F401, PLC0415  (arrow keys and history for input())

            click.echo("Chatting with MiMo-VL. /help lists the commands, /quit leaves.", err=True)
        while True:
            line = self._read()
            if line is None:
                return 1 if self.failed else 0
            line = line.strip()
            if not line:
                continue
            try:
                keep_going = self._command(line) if line.startswith("/") else self._answer(line)
            except MimoError as err:  # options are named as typed: --max-pixels, not max_pixels
                click.secho(f"error: {as_typed(str(err))}", fg="red", err=True)
                self.failed = True
                keep_going = True
            except KeyboardInterrupt:  # Ctrl-C during a command (/save, /load): it did nothing
                click.echo("[stopped]", err=True)
                keep_going = True
            if not keep_going:
                return 1 if self.failed else 0

    def _read(self) -> str | None:
        """The next line; None at the end of the input. Ctrl-C here only says how to leave."""
        attached = len(self.images) + len(self.videos)
        prompt = f"[{attached} attached] > " if attached else "> "
        while True:
            try:
                if not self.interactive:
                    return sys.stdin.readline() or None
                return input(prompt)
            except EOFError:
                click.echo()
                return None
            except KeyboardInterrupt:
                click.echo("\n(/quit or Ctrl-D leaves)", err=True)

    def _answer(self, text: str) -> bool:
        images, videos = self.images, self.videos
        self.images, self.videos = [], []
        stream = self.chat.stream(text, images, videos, max_tokens=self.max_tokens, **self.sampling)
        printer, last = None, None
        try:
            for response in stream:
                last = response
                if printer is None:  # the template's choice to open <think> is known by now
                    for notice in self.chat.notices:  # e.g. a video shrunk to its budget
                        print_note(notice)
                    printer = StreamPrinter(self.hide_thinking, self.chat.opens_thinking)
                printer.write(response.text)
        except KeyboardInterrupt:
            stream.close()  # the answer so far stays in the conversation
            if printer is not None:
                printer.close()
            if last is None:  # no token yet: the conversation is as if the message was not sent
                what = (
                    "the message and its attachments were"
                    if images or videos
                    else "the message was"
                )
                click.echo(f"[stopped before the answer began: {what} not kept]", err=True)
            else:
                click.echo("[stopped]", err=True)
            return True
        if printer is not None:
            printer.close()
        if last is not None:
            context = self.chat.max_kv_size
            capped = last.prompt_tokens + self.max_tokens > context
            reason = stop_reason(last.finish_reason, self.max_tokens, capped, context)
            click.echo(stats_line(last, reason, self.prompt_lookup), err=True)
        return True

    def _command(self, line: str) -> bool:
        name, _, argument = line.partition(" ")
        handler = self.commands.get(name)
        if handler is None:
            raise MimoError(f"unknown command {name}; /help lists the commands")
        return handler(argument.strip())

    def _path(self, argument: str, what: str) -> Path:
        if not argument:
            raise MimoError(f"{what} needs a path")
        path = Path(argument).expanduser()
        if not path.exists():
            raise MimoError(f"not found: {path}")
        return path

    def _attach_image(self, argument: str) -> bool:
        self.images.append(self._path(argument, "/image"))
        return True

    def _attach_video(self, argument: str) -> bool:
        self.videos.append(self._path(argument, "/video"))
        return True

    def _reset(self, _: str) -> bool:
        self.chat.reset()
        self.images, self.videos = [], []
        click.echo("(conversation reset)", err=True)
        return True

    def _save(self, argument: str) -> bool:
        if not argument:
            raise MimoError("/save needs a file name")
        path = Path(argument).expanduser()
        if path.exists():
            raise MimoError(f"{path} exists; /save to a new file name")
        self.chat.save(path)
        click.echo(f"(saved to {path})", err=True)
        return True

    def _load(self, argument: str) -> bool:
        path = self._path(argument, "/load")
        # The file's cache must be stored as this chat's is (--kv-bits ...): it is refused
        # otherwise, rather than continued in another precision.
        cache = vars(self.chat.cache_options)
        self.chat = Conversation.load(path, self.chat.model, self.chat.processor, **cache)
        turns = sum(m["role"] == "user" for m in self.chat.messages)
        tokens = self.chat.cached_tokens  # more than the turns hold after an interrupted prefill
        click.echo(f"(loaded {path}: {turns} turn(s) answered, {tokens} tokens cached)", err=True)
        return True

    def _help(self, _: str) -> bool:
        click.echo(HELP, err=True)
        return True

    def _quit(self, _: str) -> bool:
        return False
