"""`convert`: checkpoint in, complete MLX model folder out, one block of weights in memory at a time.

Every check that can fail on bad input runs before the first weight is read. The output is built in a
hidden folder beside the target and renamed into place only when complete. A run that fails, or is
stopped by Ctrl-C, SIGTERM or SIGHUP, removes what it wrote; what a run killed outright left behind is
removed by the next conversion to the same place.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import click

from mimo_mlx.model.weights import to_mlx_layout

from . import hub, output
from .plan import Options, TensorPlan, build_plan, make_options, quantization_config
from .quantize import cast_block, quantize_block
from .reader import open_source, read_rows
from .report import ConversionReport, sized_model_card
from .signals import TerminationGuard
from .source import Checkpoint, open_checkpoint, read_source_config
from .writer import DEFAULT_SHARD_BYTES, ShardedWriter

# Rows are read, converted and written in blocks of about this many float32 bytes.
BLOCK_BYTES = 64 << 20


def convert(
    hf_path: str,
    mlx_path: str | Path,
    revision: str | None = None,
    q_bits: int = 4,
    q_group_size: int = 64,
    no_quantize: bool = False,
    dtype: str | None = None,
    vision_bits: int | str | None = None,
    merger_bits: int | str | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ConversionReport:
    """Convert a Qwen2.5-VL-architecture checkpoint (MiMo-VL) into an MLX model folder.

    hf_path: a local folder or a Hugging Face repo id; revision pins a hub branch, tag or commit.
    q_bits / q_group_size: affine quantization of every Linear and Embedding whose input width
    divides by the group size; vision_bits / merger_bits override the bits for the vision blocks and
    the merger (an int, or "float" to keep them unquantized); no_quantize keeps everything in float.
    dtype: the float type of everything not quantized, and of the quantization scales and biases;
    by default the checkpoint's own (config.json's torch_dtype, bfloat16 for MiMo-VL).
    force: replace mlx_path if an earlier conversion wrote it; nothing else is ever replaced.
    Progress goes to stderr; the report says what was written. SIGTERM or SIGHUP while writing (in
    the main thread) removes the partial output, then raises `signals.Terminated`, a SystemExit
    with status 128 + the signal number.
    """
    options = make_options(q_bits, q_group_size, no_quantize, dtype, vision_bits, merger_bits)
    target = output.target_path(mlx_path)
    output.refuse_protected(target)
    output.remove_debris(target)

    def check_before_weights(folder: Path):  # runs before any weights are downloaded or read
        output.refuse_source(target, folder.resolve())
        output.check_existing(target, force)
        return read_source_config(folder)

    source = hub.resolve(hf_path, revision, check_config=check_before_weights)
    checkpoint = open_checkpoint(source.folder)
    dtype_origin = "--dtype"
    if options.dtype is None:
        options = replace(options, dtype=checkpoint.dtype)
        dtype_origin = checkpoint.dtype_origin
    plans = build_plan(
        checkpoint.model_config, checkpoint.tensors, checkpoint.layout, options, source.folder
    )
    report = ConversionReport(target, source.name, source.revision, options, dtype_origin)
    _write_output(plans, checkpoint, target, force, max_shard_bytes, report)
    return report


def _write_output(
    plans: list[TensorPlan],
    checkpoint: Checkpoint,
    target: Path,
    force: bool,
    max_shard_bytes: int,
    report: ConversionReport,
) -> None:
    """Build the folder hidden beside `target`, then rename it into place. Whatever stops it, an
    error, Ctrl-C, SIGTERM or SIGHUP, the hidden folder and the parents made for it are removed."""
    need = sum(t.nbytes for plan in plans for t in plan.outputs)
    with output.filesystem_errors(target, need), TerminationGuard() as guard:
        created, work = [], None
        try:
            with guard.held():  # nothing may be created without being recorded for the cleanup
                created = output.make_parents(target)
                work = output.new_hidden_folder(target, "partial")
            _write_weights(plans, checkpoint, work, max_shard_bytes, report)
            _write_folder(checkpoint, plans, report.options, work, report)
            with guard.held():  # the old output must not be left aside half-way
                output.move_into_place(work, target, force)
        except BaseException:
            with guard.held():
                if work is not None:
                    shutil.rmtree(work, ignore_errors=True)
                output.remove_empty(created)
            raise


def _write_weights(
    plans: list[TensorPlan],
    checkpoint: Checkpoint,
    folder: Path,
    max_shard_bytes: int,
    report: ConversionReport,
) -> None:
    """Every planned tensor, streamed from the checkpoint into sharded safetensors with an index."""
    writer = ShardedWriter(folder, [p.outputs for p in plans], max_shard_bytes)
    bar = click.progressbar(
        length=sum(p.source.nbytes for p in plans),
        label="Converting",
        file=sys.stderr,
        item_show_func=lambda name: name,
    )
    handle: BinaryIO | None = None
    try:
        with bar:
            for plan in plans:
                # Plans come in file order: each source shard is opened once, read front to back.
                if handle is None or handle.name != str(plan.source.file):
                    if handle is not None:
                        handle.close()
                    handle = open_source(plan.source.file)
                for done in _convert_tensor(plan, handle, checkpoint.layout, writer, report):
                    bar.update(done, plan.name)
        index = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if handle is not None:
            handle.close()
    report.shards = len(writer.names)
    report.weight_bytes = index["metadata"]["total_size"]
    report.parameters = sum(math.prod(p.shape) for p in plans)
    report.quantized_modules = sum(p.quant is not None for p in plans)
    report.float_modules = [
        p.name.removesuffix(".weight") for p in plans if p.quantizable and p.quant is None
    ]


def _convert_tensor(
    plan: TensorPlan, handle: BinaryIO, layout: str, writer: ShardedWriter, report: ConversionReport
) -> Iterator[int]:
    """Convert `plan` a block of rows at a time; yields the source bytes done after each block."""
    source = plan.source
    row_bytes = source.nbytes // source.rows
    per_block = max(1, BLOCK_BYTES // (4 * source.row_elements))
    dtype = plan.outputs[-1].dtype  # the float weight, or the scales and biases
    for first in range(0, source.rows, per_block):
        count = min(per_block, source.rows - first)
        block = to_mlx_layout(plan.name, read_rows(source, handle, first, count), layout)
        if plan.quant is not None:
            arrays = quantize_block(plan.name, block, plan.quant, dtype, report.errors[plan.part])
        else:
            arrays = cast_block(plan.name, block, dtype)
        for tensor, data in zip(plan.outputs, arrays, strict=True):
            writer.write(tensor.name, data)
        yield count * row_bytes


def _write_folder(
    checkpoint: Checkpoint,
    plans: list[TensorPlan],
    options: Options,
    folder: Path,
    report: ConversionReport,
) -> None:
    """config.json with the quantization record, the side files, and the model card."""
    config = dict(checkpoint.config)
    quantization = quantization_config(plans, options)
    if quantization is not None:
        config["quantization"] = quantization
    for name in hub.SIDE_FILES:
        if (checkpoint.folder / name).is_file():  # follows hub cache symlinks, as open() does
            with open_source(checkpoint.folder / name) as src, open(folder / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    config["mimo_mlx"] = report.config_section()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The card states the folder's final size, itself included: computed, then measured.
    (folder / "README.md").write_bytes(sized_model_card(report, _folder_bytes(folder)))
    report.folder_bytes = _folder_bytes(folder)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())
