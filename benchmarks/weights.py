"""The weights each runtime loads: one float folder, and the 4-bit variants made from it in memory.

Every runtime gets the same weights. The source is a float HF folder: the user's (`--model`) or a
synthetic random checkpoint at the chosen scale (real key names and shapes, drawn with MLX on the
device and written once to the cache, benchmarks/.cache/SCALE/hf-bf16). transformers, mlx-vlm and
mimo-mlx read it as it is for the float runs. The 4-bit runs quantize it as they load, with each
converter's own default recipe (`recipes.py`): nothing is converted to disk, so a full-size run
needs one 16.6 GB write, not three. The 4-bit variants quantize exactly what mlx-vlm quantizes
(decoder, embedding, head; 4 bits, group 64) and keep the vision tower and merger in float, so
4-bit runs compare like with like.

Only the several-ranks scenario needs mimo-mlx's 4-bit folder on disk (each rank reads its part
of the files): `on_disk` converts it once into the cache with `mimo-mlx convert`'s own code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .recipes import MIMO_4BIT, MLX_VLM_4BIT
from .synthetic import scaled_config, write_checkpoint

DONE = ".complete"  # written last: a folder without it is a leftover of an interrupted run
VARIANTS = ("float", "4bit")


@dataclass(frozen=True)
class Weights:
    """What one runtime loads for one variant: `folder`, quantized in memory by `recipe` as it
    loads (`recipes.py`), or as it is (None)."""

    folder: Path
    recipe: str | None = None

    def spec(self) -> dict:
        return {"folder": str(self.folder), "recipe": self.recipe}


@dataclass
class Folders:
    """(runtime, variant) -> its Weights, and why any pair has none."""

    source: Path | None
    synthetic: bool
    paths: dict[tuple[str, str], Weights] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)


def complete(folder: Path) -> bool:
    return (folder / DONE).is_file()


def make_folder(folder: Path, build, log) -> Path:
    """Build `folder` with `build(tmp)` unless a complete one exists; tmp is renamed when done."""
    if complete(folder):
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


def synthetic_folder(cache: Path, scale: str) -> Path:
    """Where the random checkpoint for `scale` lives (`make_synthetic` writes it)."""
    return cache / scale / "hf-bf16"


def make_synthetic(cache: Path, scale: str, log=print) -> Path:
    """The bfloat16 random checkpoint for `scale`, drawn on the default device, written once."""
    config = scaled_config(scale)
    return make_folder(
        synthetic_folder(cache, scale), lambda tmp: write_checkpoint(tmp, config=config), log
    )


def plan(
    cache: Path,
    scale: str,
    runtimes: list[str],
    variants: list[str],
    model: Path | None = None,
    mlx_model: Path | None = None,
) -> Folders:
    """What every requested runtime and variant loads; the synthetic source may not exist yet
    (`make_synthetic` writes it)."""
    if model is not None:
        source = model
    elif runtimes != ["mimo-mlx"] or not mlx_model:
        source = synthetic_folder(cache, scale)
    else:
        source = None
    folders = Folders(source=source, synthetic=model is None)
    ours = {}
    if mlx_model is not None:
        config = json.loads((mlx_model / "config.json").read_text())
        ours["4bit" if "quantization" in config else "float"] = mlx_model
    for variant in variants:
        quantized = variant == "4bit"
        for runtime in runtimes:
            pair = (runtime, variant)
            if runtime == "mimo-mlx" and variant in ours:
                folders.paths[pair] = Weights(ours[variant])
            elif source is None:
                folders.skipped[pair] = (
                    "only --mlx-model was given, of the other variant"
                    if runtime == "mimo-mlx"
                    else "needs the float HF folder (--model)"
                )
            elif runtime == "torch" and quantized:
                folders.skipped[pair] = (
                    "transformers has no MLX-style 4-bit on this backend; torch runs float only"
                )
            elif quantized:
                folders.paths[pair] = Weights(
                    source, MIMO_4BIT if runtime == "mimo-mlx" else MLX_VLM_4BIT
                )
            else:
                folders.paths[pair] = Weights(source)
    return folders


def prepare(
    cache: Path,
    scale: str,
    runtimes: list[str],
    variants: list[str],
    model: Path | None = None,
    mlx_model: Path | None = None,
    log=print,
) -> Folders:
    """`plan`, with the synthetic source written here if it is needed and missing."""
    folders = plan(cache, scale, runtimes, variants, model, mlx_model)
    if folders.synthetic and folders.source is not None:
        make_synthetic(cache, scale, log)
    return folders


def on_disk(weights: Weights, cache: Path, log=print) -> Path:
    """A folder holding `weights` (mimo-mlx's 4-bit recipe converted once into the cache by
    `mimo-mlx convert`, same plan and quantizing function; a float folder as it is)."""
    if weights.recipe is None:
        return weights.folder
    if weights.recipe != MIMO_4BIT:
        raise ValueError(f"only mimo-mlx's folders are written to disk, not {weights.recipe}")
    key = hashlib.sha1(str(weights.folder.resolve()).encode()).hexdigest()[:10]
    target = cache / f"mimo-4bit-{weights.folder.name}-{key}"

    def build(tmp: Path) -> None:
        from mimo_mlx.convert import convert

        convert(
            str(weights.folder),
            tmp,
            q_bits=4,
            q_group_size=64,
            vision_bits="float",
            merger_bits="float",
        )

    return make_folder(target, build, log)
