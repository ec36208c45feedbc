"""The `mimo-mlx` command line: a thin layer over the library with the same argument names."""

from __future__ import annotations

import sys

import click

from .errors import MimoError
from .generate import DEFAULT_MAX_TOKENS
from .processing import DEFAULT_MAX_PIXELS
from .video import DEFAULT_VIDEO_FPS, DEFAULT_VIDEO_MAX_FRAMES


class _Group(click.Group):
    """Prints a MimoError as one line and exits 1, with no traceback; Ctrl-C exits 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MimoError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mimo-mlx")
def main() -> None:
    """Run MiMo-VL-7B on MLX: convert the weights once, then ask questions about images and video."""


@main.command()
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="DIR_OR_HUB_ID",
    help="A model folder (converted or Hugging Face safetensors) or a hub id. A hub id is converted "
    "to 4-bit MLX once, into ~/.cache/mimo-mlx (or $MIMO_MLX_HOME). [default: "
    "XiaomiMiMo/MiMo-VL-7B-RL-2508]",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="PATH",
    help="An image (PNG, JPEG, WebP, "
    "GIF, ...). Repeat for several; they go before the text, in order.",
)
@click.option(
    "--video", metavar="PATH", help="A video file (needs PyAV or OpenCV) or a folder of " "frames."
)
@click.option("--prompt", "-p", required=True, help="The question or instruction. '-' reads stdin.")
@click.option("--system", default=None, help="Replace the default system prompt.")
@click.option(
    "--no-think",
    is_flag=True,
    help="Ask the model not to reason first (MiMo-VL 2508 "
    "models: appends /no_think to the prompt).",
)
@click.option("--hide-thinking", is_flag=True, help="Print only the answer, not the reasoning.")
@click.option(
    "--max-tokens",
    "-m",
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Most tokens to generate, reasoning included.",
)
@click.option(
    "--temperature",
    "--temp",
    default=None,
    type=click.FloatRange(0),
    help="Sampling temperature; 0 is greedy. [default: the model's generation_config, "
    "else 0.3 as MiMo recommends]",
)
@click.option(
    "--top-p",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="Nucleus sampling mass. [default: generation_config, else 0.95]",
)
@click.option(
    "--top-k",
    default=None,
    type=click.IntRange(0),
    help="Keep the k most likely " "tokens; 0 disables. [default: generation_config, else 0]",
)
@click.option(
    "--min-p",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Drop tokens less likely than min-p times the most likely one.",
)
@click.option(
    "--repetition-penalty",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Penalize tokens already in the prompt or output (>1 discourages repeats).",
)
@click.option("--seed", default=None, type=int, help="Random seed, for repeatable sampling.")
@click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(1),
    help="Largest area an image is resized to (the default, 1024 vision tokens, keeps a "
    "16 GB MacBook responsive; the checkpoint allows 12845056).",
)
@click.option(
    "--min-pixels",
    default=None,
    type=click.IntRange(1),
    help="Smallest area an image is resized to. [default: the model's, 3136]",
)
@click.option(
    "--fps",
    default=DEFAULT_VIDEO_FPS,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Video frames sampled per second.",
)
@click.option(
    "--max-frames",
    default=DEFAULT_VIDEO_MAX_FRAMES,
    show_default=True,
    type=click.IntRange(1),
    help="Most video frames to sample.",
)
def generate(
    model_path, images, video, prompt, hide_thinking, temperature, top_p, top_k, **options
):
    """Answer a prompt about images or a video, streaming the answer to stdout.

    \b
    mimo-mlx generate --image photo.jpg --prompt "What is in this picture?"
    mimo-mlx generate --model ./mimo-vl-7b-rl-4bit --image a.png --image b.png -p "Compare them"

    The reasoning is shown dimmed before the answer (kept between <think> tags when stdout is not a
    terminal); a line of statistics follows on stderr.
    """
    from .generate import stream_generate  # noqa: PLC0415  (keeps --help fast)
    from .loading import DEFAULT_MODEL, load  # noqa: PLC0415

    if prompt == "-":
        prompt = sys.stdin.read()

    def announce(repo_id, target):
        click.echo(
            f"{repo_id} has not been converted yet: converting it to 4-bit MLX once, into "
            f"{target}",
            err=True,
        )

    model, processor = load(model_path or DEFAULT_MODEL, on_convert=announce)
    sampling = _sampling_defaults(processor, temperature, top_p, top_k)
    inputs = processor.prepare(
        prompt,
        images,
        video,
        system=options.pop("system"),
        no_think=options.pop("no_think"),
        min_pixels=options.pop("min_pixels"),
        max_pixels=options.pop("max_pixels"),
        fps=options.pop("fps"),
        max_frames=options.pop("max_frames"),
    )
    printer = _StreamPrinter(hide_thinking, inputs.opens_thinking)
    last = None
    for response in stream_generate(model, processor, prompt, inputs=inputs, **sampling, **options):
        printer.write(response.text)
        last = response
    printer.close()
    click.echo(
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"time to first token: {last.time_to_first_token:.2f} s | "
        f"peak memory: {last.peak_memory_gb:.2f} GB",
        err=True,
    )


def _sampling_defaults(processor, temperature, top_p, top_k) -> dict:
    """Unset options come from the model's generation_config.json, else MiMo's recommendation."""
    config = processor.tokenizer.generation_config
    if temperature is None:
        temperature = config.get("temperature", 0.3) if config.get("do_sample", True) else 0.0
    return {
        "temperature": temperature,
        "top_p": top_p if top_p is not None else config.get("top_p", 0.95),
        "top_k": top_k if top_k is not None else config.get("top_k", 0),
    }


class _StreamPrinter:
    """Writes streamed text, the reasoning dimmed on a terminal (or dropped), the answer plainly."""

    def __init__(self, hide_thinking: bool, opened: bool):
        from .chat import ThinkingSplitter  # noqa: PLC0415

        self.splitter = ThinkingSplitter(prompt_opened_thinking=opened)
        self.hide = hide_thinking
        self.tty = sys.stdout.isatty()
        self.kind = None
        self.answer_started = False

    def write(self, piece: str) -> None:
        for kind, text in self.splitter.feed(piece):
            self._emit(kind, text)

    def close(self) -> None:
        for kind, text in self.splitter.finalize():
            self._emit(kind, text)
        if self.kind == "thinking" and not self.tty and not self.hide:
            click.echo("</think>", nl=False)
        click.echo()

    def _emit(self, kind: str, text: str) -> None:
        if kind == "thinking":
            if self.hide:
                return
            if self.kind is None and not self.tty:
                click.echo("<think>", nl=False)
            self.kind = "thinking"
            click.echo(click.style(text, dim=True) if self.tty else text, nl=False)
            return
        if self.kind == "thinking":
            click.echo("\n" if self.tty else "</think>", nl=False)
        if not self.answer_started:
            text = text.lstrip("\n")  # the blank line after </think>
            self.answer_started = bool(text)
        self.kind = "answer"
        click.echo(text, nl=False)


def _register() -> None:
    from .convert.cli import convert  # noqa: PLC0415  (the converter lives in its own package)

    main.add_command(convert)


_register()
