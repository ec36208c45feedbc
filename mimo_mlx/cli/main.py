"""The `mimo-mlx` command line: a thin layer over the library with the same argument names.

Prompt and sampling flags are built from their single declaration (`options.py`). Nothing heavy is
imported until a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path

import click

from ..errors import MimoError
from ..options import (
    DEFAULT_GROUP_TIMEOUT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    CacheOptions,
    LookupOptions,
    PromptOptions,
    SamplingOptions,
    pop_lookup_options,
)
from .usage import bad_value, in_flag_words, one_line_warnings, print_note, usage_mistake

# Commands that live in other modules, imported only when run: name -> (module:attribute, summary).
LAZY_COMMANDS = {
    "convert": (
        "mimo_mlx.convert.cli:convert",
        "Convert a MiMo-VL (Qwen2.5-VL architecture) checkpoint into an MLX model folder.",
    ),
    "random-model": (
        "mimo_mlx.convert.random_model:random_model",
        "Write a tiny model with random weights, to try the commands.",
    ),
    "serve": (
        "mimo_mlx.cli.serve:serve",
        "An OpenAI-compatible HTTP server (needs mimo-mlx[serve]).",
    ),
}
# What MiMo recommends where the model's generation_config.json says nothing.
RECOMMENDED_SAMPLING = {"temp": 0.3, "top_p": 0.95, "top_k": 0}


class _Group(click.Group):
    """Prints a mistake as one line, with no traceback: a MimoError or a bad value (exit 1, flags
    named as typed), a flag that does not exist or is missing (exit 2, as click); warnings as one
    line each; Ctrl-C exits 130. Loads the commands in LAZY_COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY_COMMANDS:
            module, attribute = LAZY_COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):  # the same text whether a command is loaded or not
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                rows.append((name, self.commands[name].get_short_help_str(limit=80)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["typed"] = list(args)  # the command's name, then its flags as typed
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as err:  # `mimo-mlx --frob`, before any command
            _fail(usage_mistake(err, "mimo-mlx"), 2)

    def invoke(self, ctx: click.Context):
        args = ctx.meta.get("typed", [])
        try:
            with one_line_warnings():
                return super().invoke(ctx)
        except click.BadParameter as err:
            if isinstance(err, click.MissingParameter):  # a required flag or argument not given
                _fail(usage_mistake(err, " ".join(["mimo-mlx", *args[:1]])), 2)
            _fail(bad_value(err, self._command(ctx, args), args[1:]), 1)  # a value out of range
        except click.UsageError as err:  # a flag or a command that does not exist
            if args and self._command(ctx, args) is None:
                _fail(usage_mistake(err, "mimo-mlx", "commands"), 2)
            _fail(usage_mistake(err, " ".join(["mimo-mlx", *args[:1]])), 2)
        except MimoError as err:
            _fail(in_flag_words(str(err), self._command(ctx, args), args[1:]), 1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    def _command(self, ctx: click.Context, args: list[str]) -> click.Command | None:
        return self.get_command(ctx, args[0]) if args else None


def _unreadable(err: OSError | UnicodeDecodeError) -> str:
    """Why a text file could not be read, in words (not Python's '[Errno 2] ...: path')."""
    if isinstance(err, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(err, FileNotFoundError):
        return "there is no such file"
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    return err.strerror or str(err)


def _fail(message: str, status: int) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(status)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mimo-mlx")
def main() -> None:
    """Run MiMo-VL-7B on MLX: convert the weights once, then ask questions about images and video."""


def _flag(spec: Field) -> Callable:
    """A click option for one declared option, its help and range taken from the declaration."""
    cli, name = spec.metadata["cli"], spec.name
    decls = ["--" + name.replace("_", "-"), *cli.get("aliases", ()), name]
    if cli.get("is_flag"):
        return click.option(*decls, is_flag=True, help=spec.metadata["help"])
    kind = {"int": int, "float": float, "str": str}[spec.type.split(" ")[0]]
    bounds = {k: cli[k] for k in ("min", "max", "min_open") if k in cli}
    if bounds:
        kind = (click.IntRange if kind is int else click.FloatRange)(**bounds)
    if "choices" in cli:
        kind = click.Choice(cli["choices"])
    model_default = cli.get("model_default", False)
    default = None if model_default or spec.default is MISSING else spec.default
    show = default is not None and not model_default
    return click.option(
        *decls, type=kind, default=default, show_default=show, help=spec.metadata["help"]
    )


def declared_options(*declarations: type) -> Callable:
    """Decorator adding a flag for every field of the given option dataclasses."""

    def decorate(command: Callable) -> Callable:
        for declaration in reversed(declarations):
            for spec in reversed(fields(declaration)):
                command = _flag(spec)(command)
        return command

    return decorate


# --model for the commands that take it as generate does (chat, serve).
model_as_for_generate = click.option(
    "--model",
    "model_path",
    default=None,
    metavar="DIR_OR_HUB_ID",
    help=f"A model folder or a hub id, as for generate. [default: {DEFAULT_MODEL}]",
)


# --group-timeout for the commands that run under mlx.launch (generate, serve).
group_timeout_option = click.option(
    "--group-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_GROUP_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Under mlx.launch: how long a rank waits on the others with no progress (a prefill chunk "
    "or a token) before every rank stops with an error, e.g. when a host went to sleep.",
)


@main.command()
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="DIR_OR_HUB_ID",
    help="A model folder (converted or Hugging Face safetensors) or a hub id. A hub id is converted "
    f"to 4-bit MLX once, into ~/.cache/mimo-mlx (or $MIMO_MLX_HOME). [default: {DEFAULT_MODEL}]",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="PATH",
    help="An image (PNG, JPEG, WebP, GIF, ...). Repeat for several; images go first, in order.",
)
@click.option(
    "--video",
    "videos",
    multiple=True,
    metavar="PATH",
    help="A video file (needs PyAV or OpenCV) or a folder of frames. Repeat for several; videos go "
    "after the images, in order.",
)
@click.option("--prompt", "-p", help="The question or instruction. '-' reads stdin.")
@click.option(
    "--ground",
    metavar="WHAT",
    help="Ask the model to locate WHAT in the image (MiMo-VL's grounding prompt, in place of "
    "--prompt), then print the boxes it found as JSON in pixels of your image.",
)
@click.option(
    "--gui",
    is_flag=True,
    help="With --ground: MiMo-VL's GUI wording ('locate UI components that match the command'), "
    "for screenshots.",
)
@click.option(
    "--annotate",
    "annotate_path",
    metavar="OUT",
    help="Write a copy of the image with the answer's boxes, points and GUI actions drawn on it "
    "(.png, .jpg or .webp), with or without --ground. Needs exactly one image.",
)
@click.option("--hide-thinking", is_flag=True, help="Print only the answer, not the reasoning.")
@click.option(
    "--json-schema",
    "json_schema_path",
    metavar="FILE",
    help="Make the answer JSON valid against the JSON schema in FILE, enforced while decoding "
    "(the model may reason first; --no-think skips that). Needs mimo-mlx[structured].",
)
@click.option(
    "--max-tokens",
    "-m",
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Most tokens to generate, reasoning included (fewer if the model's context fills up).",
)
@group_timeout_option
@declared_options(PromptOptions, SamplingOptions, LookupOptions, CacheOptions)
def generate(
    model_path,
    images,
    videos,
    prompt,
    ground,
    gui,
    annotate_path,
    hide_thinking,
    json_schema_path,
    max_tokens,
    group_timeout,
    **options,
):
    """Answer a prompt about images or videos, streaming the answer to stdout.

    \b
    mimo-mlx generate --image photo.jpg --prompt "What is in this picture?"
    mimo-mlx generate --image a.png --image b.png -p "Compare them." --no-think
    mlx.launch --hostfile hosts.json -- mimo-mlx generate -p "Hello"

    The reasoning is shown dimmed before the answer (kept between <think> tags when stdout is not a
    terminal); a line of statistics follows on stderr. --prompt-lookup makes answers that copy text
    (OCR, documents) faster and leaves the output as it is. --json-schema makes the answer JSON
    that validates (a GUI action, a form's fields). Under mlx.launch the model is split
    across the ranks (each reads only its part of --model, which every host needs); rank 0 reads
    the images and prints, the others only compute.
    """
    from ..generation.loop import max_new_tokens  # noqa: PLC0415
    from ..options import pop_prompt_options  # noqa: PLC0415
    from .console import StreamPrinter, stats_line, stop_reason  # noqa: PLC0415  (fast --help)

    group = _start_group(group_timeout)
    if group is not None and group.rank > 0:
        return _follow(model_path, group)
    prompt = _prompt_text(prompt, ground, gui)
    lookup = pop_lookup_options(options)
    if ground is not None or annotate_path is not None:
        _check_grounding(images, videos, annotate_path)
    json_schema = _read_json_schema(json_schema_path)
    model, processor = _load(model_path, group)
    answer = _answerer(model, processor, group)  # from here on, an error releases the other ranks
    if group is not None and lookup.enabled:
        raise MimoError(
            "--prompt-lookup is not available under mlx.launch yet (the ranks would have to draft "
            "and verify in step); run without it"
        )
    if group is not None and json_schema is not None:
        raise MimoError("--json-schema is not available under mlx.launch yet; run without it")
    options = sampling_defaults(processor.tokenizer.generation_config, options)
    inputs = processor.prepare(prompt, images, videos, **pop_prompt_options(options))
    for notice in inputs.notices:  # e.g. a video shrunk to its token budget
        print_note(notice)
    context = model.config.text.max_position_embeddings
    budget = max_new_tokens(model, inputs.input_ids.shape[1], max_tokens)
    if 0 < budget < max_tokens:
        click.echo(
            f"note: the prompt takes {inputs.input_ids.shape[1]} of the model's {context} tokens "
            f"of context, so at most {budget} tokens will be generated (--max-tokens {max_tokens})",
            err=True,
        )
    printer = StreamPrinter(hide_thinking, inputs.opens_thinking)
    last, pieces = None, []
    lookup_options = vars(lookup) if group is None else {}  # refused above when asked for
    structured = {} if json_schema is None else {"json_schema": json_schema}
    for response in answer(
        prompt, inputs=inputs, max_tokens=max_tokens, **options, **lookup_options, **structured
    ):
        printer.write(response.text)
        pieces.append(response.text)
        last = response
    printer.close()
    reason = stop_reason(last.finish_reason, max_tokens, budget < max_tokens, context)
    click.echo(stats_line(last, reason, lookup.enabled), err=True)
    if ground is not None or annotate_path is not None:
        _report_grounding("".join(pieces), inputs, images[0], annotate_path)


def _read_json_schema(path: str | None) -> dict | None:
    """The schema of --json-schema, checked before the model loads."""
    if path is None:
        return None
    import json  # noqa: PLC0415

    from ..generation.constrained import json_format  # noqa: PLC0415

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise MimoError(f"cannot read the JSON schema {path}: {_unreadable(err)}") from None
    except json.JSONDecodeError as err:
        raise MimoError(f"{path} is not JSON ({err})") from None
    json_format(schema).check()
    return schema


def _answerer(model, processor, group) -> Callable:
    """`stream_generate(prompt, ...)` in this process, or across the group with rank 0 leading.

    The Leader is closed when the command ends, also after an error (a refused image): that
    releases the other ranks."""
    if group is None:
        from ..generation.loop import stream_generate  # noqa: PLC0415

        return functools.partial(stream_generate, model, processor)
    from ..distributed.lockstep import Leader  # noqa: PLC0415

    leader = Leader(model, processor, group)
    click.get_current_context().call_on_close(leader.close)
    return leader.stream_generate


def _start_group(timeout: float, handle_signals: bool = True):
    """The group mlx.launch (or mpirun) started this process in; None when run on its own.
    A server's rank 0 passes `handle_signals=False`: its event loop handles Ctrl-C and SIGTERM."""
    from ..distributed.group import launched, start_group  # noqa: PLC0415

    return start_group(timeout, handle_signals=handle_signals) if launched() else None


def _follow(model_path: str | None, group) -> None:
    """Ranks other than 0: load this rank's part, then compute what rank 0 asks, silently."""
    from ..distributed.lockstep import follow  # noqa: PLC0415

    model, processor = _load(model_path, group)
    follow(model, processor, group)


def _prompt_text(prompt: str | None, ground: str | None, gui: bool) -> str:
    """The prompt: --prompt (stdin for '-'), or MiMo-VL's grounding request for --ground."""
    if ground is not None:
        if prompt is not None:
            raise click.UsageError("--ground writes the prompt itself; give --prompt or --ground")
        from ..grounding.report import grounding_prompt  # noqa: PLC0415

        return grounding_prompt(ground, gui=gui)
    if gui:
        raise click.UsageError("--gui goes with --ground")
    if prompt is None:
        raise click.UsageError("give a --prompt (or --ground WHAT to locate something)")
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        given = "--prompt - read nothing from stdin" if prompt == "-" else "the --prompt is empty"
        raise MimoError(f"{given}: there is no question to answer")
    return text


def _check_grounding(images, videos, annotate_path) -> None:
    """Before any work: one image and no video, and somewhere the drawing can go."""
    if len(images) != 1 or videos:
        raise MimoError(
            f"--ground and --annotate need exactly one --image and no --video (got {len(images)} "
            f"image(s), {len(videos)} video(s)): an answer's coordinates do not say which image "
            "they are on"
        )
    if annotate_path is not None:
        from ..grounding.draw import check_destination  # noqa: PLC0415

        check_destination(images[0], annotate_path)


def _report_grounding(text: str, inputs, image: str, annotate_path: str | None) -> None:
    """The answer's boxes as JSON on stdout (pixels of the user's image); the drawing if asked."""
    from ..grounding.report import ground, to_json  # noqa: PLC0415

    found = ground(text, inputs)
    if not (found.boxes or found.points or found.actions):
        note = f" ({'; '.join(found.skipped)})" if found.skipped else ""
        if annotate_path is not None:  # nothing to draw: as `annotate` does, that is an error
            raise MimoError(f"no boxes or points in the answer{note}; {annotate_path} not written")
        click.echo(f"no boxes or points in the answer{note}", err=True)
        return
    click.echo(to_json(found))
    if annotate_path is not None:
        from ..grounding.draw import annotate  # noqa: PLC0415

        annotate(image, found.boxes, found.points, annotate_path, found.actions, report=_note)
        click.echo(f"wrote {annotate_path}", err=True)


@main.command()
@model_as_for_generate
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="PATH",
    help="An image for the first message (repeatable; /image adds more later).",
)
@click.option(
    "--video",
    "videos",
    multiple=True,
    metavar="PATH",
    help="A video for the first message (repeatable; /video adds more later).",
)
@click.option("--hide-thinking", is_flag=True, help="Print only the answers, not the reasoning.")
@click.option(
    "--max-tokens",
    "-m",
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Most tokens per answer, reasoning included.",
)
@click.option(
    "--max-kv-size",
    type=click.IntRange(1),
    default=None,
    help="Most tokens the conversation may hold (prompt, images and answers). [default: the "
    "model's context]",
)
@click.option(
    "--drop-old-turns",
    is_flag=True,
    help="Drop the oldest exchanges (and compute the rest again) when a message would take the "
    "conversation past --max-kv-size, instead of refusing the message.",
)
@declared_options(PromptOptions, SamplingOptions, LookupOptions, CacheOptions)
def chat(
    model_path, images, videos, hide_thinking, max_tokens, max_kv_size, drop_old_turns, **options
):
    """Chat about images and videos; nothing the model has seen is computed twice.

    \b
    mimo-mlx chat --image photo.jpg
    printf 'What is this?\\nAnd its colour?\\n' | mimo-mlx chat --image photo.jpg

    Each message reuses the earlier turns from the cache: only new tokens are computed and an
    image is encoded once. Piped input is one message (or command) per line. Type /help for the
    commands (/image, /video, /reset, /save, /load, /quit). Ctrl-C stops an answer.
    """
    from ..conversation.conversation import Conversation  # noqa: PLC0415  (fast --help)
    from ..distributed.group import launched  # noqa: PLC0415
    from ..options import pop_cache_options, pop_prompt_options  # noqa: PLC0415
    from .chat import ChatSession  # noqa: PLC0415

    if launched():
        raise MimoError(
            "chat runs in one process; under mlx.launch (or mpirun) use `mimo-mlx generate`, "
            "which splits the model across the ranks"
        )
    lookup = pop_lookup_options(options)
    cache = pop_cache_options(options)
    model, processor = _load(model_path)
    sampling = sampling_defaults(processor.tokenizer.generation_config, options)
    conversation = Conversation(
        model,
        processor,
        max_kv_size=max_kv_size,
        drop_old_turns=drop_old_turns,
        **pop_prompt_options(sampling),
        **cache,
    )
    session = ChatSession(
        conversation,
        hide_thinking=hide_thinking,
        max_tokens=max_tokens,
        sampling={**sampling, **vars(lookup)},
        images=images,
        videos=videos,
        prompt_lookup=lookup.enabled,
    )
    sys.exit(session.run())


@main.command()
@click.option("--image", required=True, metavar="PATH", help="The image the answer is about.")
@click.option(
    "--answer",
    "answer_path",
    required=True,
    metavar="FILE",
    help="The model's answer: a text file, or '-' for stdin (JSON boxes, points or GUI actions, "
    "as MiMo-VL and Qwen2.5-VL write them, with or without the reasoning).",
)
@click.option(
    "--out",
    "out_path",
    metavar="OUT",
    help="Write a copy of the image with the boxes drawn on it (.png, .jpg or .webp).",
)
@click.option(
    "--max-pixels",
    default=PromptOptions.max_pixels,
    show_default=True,
    type=click.IntRange(1),
    help="The limit the image was resized to when the model saw it (the model's coordinates are "
    "pixels of that resized image): mimo-mlx's default, or what the other runtime used.",
)
@click.option(
    "--min-pixels",
    default=None,
    type=click.IntRange(1),
    help="The lower limit the image was resized with. [default: 3136]",
)
def annotate(image, answer_path, out_path, max_pixels, min_pixels):
    """Put a grounding answer's boxes and points back on the original image.

    \b
    mimo-mlx annotate --image shot.png --answer answer.txt --out marked.png

    MiMo-VL (and Qwen2.5-VL) answer in pixels of the image as the processor resized it. This
    redoes that resize exactly, prints the boxes as JSON in pixels of your image, and draws them.
    `generate --ground/--annotate` does the same for an answer it generates.
    """
    from ..grounding.draw import annotate as draw  # noqa: PLC0415  (fast --help)
    from ..grounding.draw import check_destination  # noqa: PLC0415
    from ..grounding.parse import parse_grounding  # noqa: PLC0415
    from ..grounding.report import geometry_of, to_json, to_original  # noqa: PLC0415

    if out_path is not None:
        check_destination(image, out_path)
    try:
        text = sys.stdin.read() if answer_path == "-" else Path(answer_path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise MimoError(f"cannot read the answer from {answer_path}: {_unreadable(err)}") from None
    found = to_original(parse_grounding(text), geometry_of(image, min_pixels, max_pixels))
    if not (found.boxes or found.points or found.actions):
        note = f" ({'; '.join(found.skipped)})" if found.skipped else ""
        raise MimoError(f"no boxes or points in the answer{note}")
    click.echo(to_json(found))
    if out_path is not None:
        draw(image, found.boxes, found.points, out_path, found.actions, report=_note)
        click.echo(f"wrote {out_path}", err=True)


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def _load(model_path: str | None, group=None):
    if group is not None:
        from ..distributed.loading import load_sharded  # noqa: PLC0415

        with group.labelled():
            return load_sharded(model_path or DEFAULT_MODEL, group)
    from ..loading import load  # noqa: PLC0415

    def announce(repo_id, target):
        click.echo(
            f"{repo_id} has not been converted yet: converting it to 4-bit MLX once, into {target}",
            err=True,
        )

    loaded = load(model_path or DEFAULT_MODEL, on_convert=announce)
    _say_if_random(model_path)
    return loaded


def _say_if_random(model_path: str | None) -> None:
    """A folder of `mimo-mlx random-model` answers gibberish: say so before it does."""
    config = Path(model_path or "").expanduser() / "config.json"
    try:
        note = json.loads(config.read_text()).get("random_weights") if model_path else None
    except (OSError, ValueError, AttributeError):
        note = None  # the loader read it already: nothing to add
    if note:
        click.echo(f"note: {model_path} has {note}", err=True)


def sampling_defaults(generation_config: dict, options: dict) -> dict:
    """Unset sampling options from the model's generation_config.json, else MiMo's advice."""
    options = dict(options)
    if options.get("temp") is None:
        sample = generation_config.get("do_sample", True)
        options["temp"] = (
            generation_config.get("temperature", RECOMMENDED_SAMPLING["temp"]) if sample else 0.0
        )
    for name in ("top_p", "top_k"):
        if options.get(name) is None:
            options[name] = generation_config.get(name, RECOMMENDED_SAMPLING[name])
    return options
