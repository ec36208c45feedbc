"""The weight folders each runtime loads, made once into the cache (benchmarks/.cache/).

Every runtime gets the same weights. The source is a float HF folder: the user's (`--model`) or a
synthetic random checkpoint at the chosen scale (real key names and shapes, streamed to disk).
From it: mimo-mlx's float and 4-bit folders with our converter, mlx-vlm's 4-bit folder with
mlx-vlm's converter; transformers and mlx-vlm's float run read the source itself. Both converters
stream or load lazily, so the full-size folders are made without the float model in memory.
The 4-bit folders quantize exactly what mlx-vlm quantizes (decoder, embedding, head; 4 bits,
group 64) and keep the vision tower and merger in float, so 4-bit runs compare like with like.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .synthetic import scaled_config, write_checkpoint

DONE = ".complete"  # written last: a folder without it is a leftover of an interrupted run
VARIANTS = ("float", "4bit")
STORED_DTYPE = "bfloat16"  # the published checkpoint's dtype; each runtime casts when loading


@dataclass
class Folders:
    """(runtime, variant) -> folder, and why any pair has none."""

    source: Path
    synthetic: bool
    paths: dict[tuple[str, str], Path] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)


def _complete(folder: Path) -> bool:
    return (folder / DONE).is_file()


def _make(folder: Path, build, log) -> Path:
    """Build `folder` with `build(tmp)` unless a complete one exists; tmp is renamed when done."""
    if _complete(folder):
        return folder
    log(f"preparing {folder} (once; cached)")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    (tmp / DONE).write_text("")
    tmp.rename(folder)
    return folder


def synthetic_source(cache: Path, scale: str, log=print) -> Path:
    """The bfloat16 random checkpoint for `scale`, written block by block."""
    config = scaled_config(scale)
    return _make(cache / scale / "hf-bf16", lambda tmp: write_checkpoint(tmp, config=config), log)


def _mimo_convert(source: Path, quantize: bool):
    from mimo_mlx.convert import convert

    def build(tmp: Path) -> None:
        if quantize:
            convert(
                str(source),
                tmp,
                q_bits=4,
                q_group_size=64,
                vision_bits="float",
                merger_bits="float",
                dtype=STORED_DTYPE,
            )
        else:
            convert(str(source), tmp, no_quantize=True, dtype=STORED_DTYPE)

    return build


def _mlx_vlm_convert(source: Path):
    def build(tmp: Path) -> None:
        from mlx_vlm.convert import convert

        convert(hf_path=str(source), mlx_path=str(tmp), quantize=True, q_bits=4, q_group_size=64)

    return build


def prepare(
    cache: Path,
    scale: str,
    runtimes: list[str],
    variants: list[str],
    model: Path | None = None,
    mlx_model: Path | None = None,
    log=print,
) -> Folders:
    """Make (or find) every folder the requested runtimes and variants need."""
    if model is not None:
        key = hashlib.sha1(str(model.resolve()).encode()).hexdigest()[:10]
        base = cache / f"user-{model.name}-{key}"
        source = model
    else:
        base = cache / scale
        source = (
            synthetic_source(cache, scale, log)
            if runtimes != ["mimo-mlx"] or not mlx_model
            else None
        )
    folders = Folders(source=source, synthetic=model is None)
    ours = {}
    if mlx_model is not None:
        config = json.loads((mlx_model / "config.json").read_text())
        ours["4bit" if "quantization" in config else "float"] = mlx_model
    for variant in variants:
        quantized = variant == "4bit"
        for runtime in runtimes:
            pair = (runtime, variant)
            if runtime == "mimo-mlx":
                if variant in ours:
                    folders.paths[pair] = ours[variant]
                elif source is None:
                    folders.skipped[pair] = "only --mlx-model was given, of the other variant"
                else:
                    folder = base / ("mimo-4bit" if quantized else "mimo-float")
                    folders.paths[pair] = _make(folder, _mimo_convert(source, quantized), log)
            elif source is None:
                folders.skipped[pair] = "needs the float HF folder (--model)"
            elif runtime == "torch" and quantized:
                folders.skipped[pair] = (
                    "transformers has no MLX-style 4-bit on this backend; torch runs float only"
                )
            elif runtime == "mlx-vlm" and quantized:
                folder = base / "mlx-vlm-4bit"
                folders.paths[pair] = _make(folder, _mlx_vlm_convert(source), log)
            else:
                folders.paths[pair] = source
    return folders
