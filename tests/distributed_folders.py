"""Tiny model folders for the distributed tests, and a stand-in group for loading one rank in-process.

- `write_split_folder(folder, ranks=2)`: the tiny random model (4 query heads, 2 key/value heads, 2
  vision heads) for 2 ranks, or one whose every head count and width divides by 3 (6 query heads,
  3 key/value heads, 3 vision heads) for 3; with tokenizer and preprocessor config.
- `write_quantized_folder(folder, group_size)`: the wide tiny model in bfloat16, converted to 4-bit
  by `mimo-mlx convert` (every Linear but the patch embedding quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from convert_helpers import PREPROCESSOR, make_source
from tiny_models import save_checkpoint, tiny_hf_model
from tiny_tokenizer import build_tiny_tokenizer

from mimo_mlx.convert import convert

THREE_WAY = dict(
    text=dict(hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=3),
    vision=dict(hidden_size=48, intermediate_size=48, num_heads=3, out_hidden_size=96),
)


def write_split_folder(
    folder: Path,
    ranks: int = 2,
    seed: int = 21,
    dtype: str = "float32",
    sizes: dict | None = None,
    **layouts,
) -> Path:
    """`layouts`: save_checkpoint's config_layout and key_layout; `sizes`: tiny_hf_model's
    overrides (default: the 2-rank model, or THREE_WAY for 3)."""
    sizes = sizes if sizes is not None else THREE_WAY if ranks == 3 else {}
    model = tiny_hf_model(seed=seed, **sizes)
    save_checkpoint(model.to(getattr(torch, dtype)), folder, **layouts)
    build_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


def write_quantized_folder(folder: Path, group_size: int = 32) -> Path:
    source = make_source(folder.with_name(folder.name + "-source"), dtype="bfloat16")
    convert(str(source), folder, q_bits=4, q_group_size=group_size)
    return folder


class _MxGroup:
    """What MLX's sharding helpers ask of a group: its rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class FakeGroup:
    """One rank of a group that is not there: enough to load that rank's part in this process
    (its layers cannot run: there is no one to sum with)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.mx_group = _MxGroup(rank, size)
        self.label = f"rank {rank} of {size}"

    def barrier(self, what: str) -> None:
        pass

    def progress(self) -> None:
        pass
