"""`mimo-mlx convert`: a thin click layer over `mimo_mlx.convert.convert`, same argument names.

Values are checked by the library, not by click choices, so a bad value gets the same one-line
error from the command line as from Python.
"""

from __future__ import annotations

import click

from .pipeline import convert as convert_checkpoint
from .plan import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .signals import Terminated

_BITS = ", ".join(map(str, SUPPORTED_BITS))
_GROUPS = ", ".join(map(str, SUPPORTED_GROUP_SIZES))


@click.command("convert")
@click.option(
    "--hf-path",
    required=True,
    help="Hugging Face repo id (e.g. XiaomiMiMo/MiMo-VL-7B-RL) or a local checkpoint folder.",
)
@click.option(
    "--mlx-path",
    required=True,
    type=click.Path(),
    help="Folder to create. It must not exist, unless --force is given and an earlier conversion "
    "wrote it.",
)
@click.option(
    "--revision",
    default=None,
    help="Hub branch, tag or commit to convert (default: main). The resolved commit is recorded "
    "in the output's config.json.",
)
@click.option(
    "--q-bits",
    type=int,
    default=4,
    show_default=True,
    help=f"Bits per quantized weight: {_BITS}.",
)
@click.option(
    "--q-group-size",
    type=int,
    default=64,
    show_default=True,
    help=f"Weights sharing one scale and bias: {_GROUPS}. A layer whose input width does not "
    "divide by it stays in float.",
)
@click.option(
    "--no-quantize",
    is_flag=True,
    help="Keep every weight in floating point (--dtype).",
)
@click.option(
    "--dtype",
    default=None,
    show_default="the checkpoint's own, bfloat16 for MiMo-VL",
    help="Float type of everything not quantized (norms, biases, patch embedding) and of the "
    "quantization scales: float16, bfloat16 or float32. bfloat16 is safer than float16, whose "
    "range ends at 65504: a real model's activations can overflow it.",
)
@click.option(
    "--vision-bits",
    default=None,
    help=f"Bits for the vision blocks ({_BITS}), or 'float' to keep them unquantized. "
    "Default: --q-bits.",
)
@click.option(
    "--merger-bits",
    default=None,
    help=f"Bits for the vision-to-text merger ({_BITS}), or 'float'. Default: --q-bits.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace --mlx-path if an earlier conversion wrote it. A folder holding anything else, the "
    "current or home folder, a filesystem root and the checkpoint are never replaced.",
)
def convert(**options) -> None:
    """Convert a MiMo-VL (Qwen2.5-VL architecture) checkpoint into an MLX model folder.

    By default the decoder, vision blocks and merger are quantized to 4 bits (group 64), and norms,
    biases and the patch embedding keep the checkpoint's float type (bfloat16 for MiMo-VL). Only
    safetensors are read; pickled checkpoints are refused. Progress goes to stderr, the summary to
    stdout.

    \b
    mimo-mlx convert --hf-path XiaomiMiMo/MiMo-VL-7B-RL --mlx-path ./mimo-vl-4bit
    """
    try:
        report = convert_checkpoint(**options)
    except Terminated as stop:  # the output is already cleaned up; say why the run ended
        _echo_if_possible(f"\nterminated by {stop.name}")
        raise
    for line in report.lines():
        click.echo(line)


def _echo_if_possible(message: str) -> None:
    try:
        click.echo(message, err=True)
    except OSError:  # after SIGHUP the terminal may be gone; the exit status still tells
        pass
