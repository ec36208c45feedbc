"""What the commands print: the streamed answer with its reasoning apart, and the statistics line."""

from __future__ import annotations

import sys

import click

from ..inputs.template import ThinkingSplitter


class StreamPrinter:
    """Writes streamed text: the reasoning dimmed on a terminal, between <think> tags when piped,
    or dropped (`hide_thinking`); the answer plainly. Every think block is shown as reasoning."""

    def __init__(self, hide_thinking: bool, opened: bool) -> None:
        self.splitter = ThinkingSplitter(prompt_opened_thinking=opened)
        self.hide = hide_thinking
        self.tty = sys.stdout.isatty()
        self.kind: str | None = None
        self.answer_started = False

    def write(self, piece: str) -> None:
        for kind, text in self.splitter.feed(piece):
            self._emit(kind, text)

    def close(self) -> None:
        for kind, text in self.splitter.finalize():
            self._emit(kind, text)
        self._end_thinking()
        click.echo()

    def _emit(self, kind: str, text: str) -> None:
        if kind == "thinking":
            if self.hide:
                return
            if self.kind != "thinking":
                if self.kind == "answer":
                    click.echo()
                if not self.tty:
                    click.echo("<think>", nl=False)
                self.kind = "thinking"
            click.echo(click.style(text, dim=True) if self.tty else text, nl=False)
            return
        self._end_thinking()
        if not self.answer_started:
            text = text.lstrip("\n")  # the blank line after </think>
            self.answer_started = bool(text)
        if text:
            self.kind = "answer"
            click.echo(text, nl=False)

    def _end_thinking(self) -> None:
        if self.kind == "thinking":
            click.echo("\n" if self.tty else "</think>", nl=False)
            self.kind = None


def stop_reason(
    finish_reason: str | None, max_tokens: int, context_full: bool, context: int
) -> str:
    """Why generation ended, in words for the statistics line."""
    if finish_reason == "stop":
        return "end of answer"
    if context_full:
        return f"context full ({context} tokens)"
    return f"max tokens ({max_tokens})"


def stats_line(response, reason: str, prompt_lookup: bool = False) -> str:
    """The one line of statistics printed to stderr after an answer (with prompt lookup, how
    many drafted tokens the model accepted)."""
    reused = f" ({response.cached_tokens} reused)" if response.cached_tokens else ""
    lookup = ""
    if prompt_lookup:
        drafted, accepted = response.drafted_tokens, response.accepted_tokens
        lookup = (
            f" | prompt lookup: {accepted} of {drafted} drafted tokens accepted"
            if drafted
            else " | prompt lookup: nothing drafted"
        )
    return (
        f"prompt: {response.prompt_tokens} tokens{reused}, {response.prompt_tps:.1f} tok/s | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s"
        f"{lookup} | time to first token: {response.time_to_first_token:.2f} s | "
        f"peak memory: {response.peak_memory:.2f} GB | stopped: {reason}"
    )
