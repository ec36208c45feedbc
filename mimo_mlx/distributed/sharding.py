"""How the model splits across the ranks of a group: tensor parallelism as mlx-lm does it.

Every attention block and MLP, in the decoder and in the vision tower, is a pair of projections.
The first ones (q/k/v, gate/up, the tower's fused qkv, the merger's first Linear) are
all-to-sharded: each rank holds whole heads or a slice of the hidden units and computes them from
the full input. The last one (o, down, the tower's proj, the merger's second Linear) is
sharded-to-all: each rank multiplies its slice and one `all_sum` adds the parts, so every rank has
the full result again. One all-reduce per pair. The embedding, the lm_head, the norms and the patch
embedding are on every rank. MLX's own layers (`mlx.nn.layers.distributed`) do the work; this
module says which module splits how, checks that a group size fits, and cuts parameters along the
axes `shard_linear` uses, so a loader can read only a rank's slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten

from ..errors import MimoError
from ..model.config import ModelConfig
from ..model.mimo_vl import Model

ALL_TO_SHARDED, SHARDED_TO_ALL = "all-to-sharded", "sharded-to-all"
LARGEST_SUGGESTED = 16  # group sizes listed as alternatives in a refusal


@dataclass(frozen=True)
class Split:
    """How one Linear splits. `segments`: parts fused in one weight (the tower's q, k and v), each
    split on its own so every rank gets matching heads of all three."""

    kind: str
    segments: int = 1


# Anchored patterns over module paths, in the checkpoint's names.
PLAN = (
    (re.compile(r"^model\.layers\.\d+\.self_attn\.[qkv]_proj$"), Split(ALL_TO_SHARDED)),
    (re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj$"), Split(SHARDED_TO_ALL)),
    (re.compile(r"^model\.layers\.\d+\.mlp\.(gate|up)_proj$"), Split(ALL_TO_SHARDED)),
    (re.compile(r"^model\.layers\.\d+\.mlp\.down_proj$"), Split(SHARDED_TO_ALL)),
    (re.compile(r"^visual\.blocks\.\d+\.attn\.qkv$"), Split(ALL_TO_SHARDED, segments=3)),
    (re.compile(r"^visual\.blocks\.\d+\.attn\.proj$"), Split(SHARDED_TO_ALL)),
    (re.compile(r"^visual\.blocks\.\d+\.mlp\.(gate|up)_proj$"), Split(ALL_TO_SHARDED)),
    (re.compile(r"^visual\.blocks\.\d+\.mlp\.down_proj$"), Split(SHARDED_TO_ALL)),
    (re.compile(r"^visual\.merger\.mlp\.0$"), Split(ALL_TO_SHARDED)),
    (re.compile(r"^visual\.merger\.mlp\.2$"), Split(SHARDED_TO_ALL)),
)


class ShardedModel(Model):
    """The model with its layers split across `group` (a `distributed.Group`).

    The math is `Model`'s; MLX's sharded layers do the collectives. Each forward call counts as
    progress for the group's watchdog (one per prefill chunk and per decoded token).
    """

    def __init__(self, config: ModelConfig, group) -> None:
        super().__init__(config)
        self.group = group

    def __call__(self, *args, **kwargs) -> mx.array:
        self.group.progress()
        return super().__call__(*args, **kwargs)


def split_of(path: str) -> Split | None:
    """How the module at `path` splits; None if every rank holds all of it."""
    for pattern, split in PLAN:
        if pattern.match(path):
            return split
    return None


def param_axis(split: Split, name: str) -> int | None:
    """The axis a parameter of a split Linear is cut along, as MLX's `shard_linear` cuts it: every
    parameter of an all-to-sharded layer by its outputs (axis 0; quantized weights, scales and
    biases too); a sharded-to-all layer's weight, scales and biases by their last axis, its bias
    not at all (it is added once, after the sum)."""
    if split.kind == ALL_TO_SHARDED:
        return 0
    return None if name == "bias" else -1


def part_ranges(length: int, rank: int, size: int, segments: int = 1) -> list[tuple[int, int]]:
    """[start, end) ranges along an axis of `length` that `rank` of `size` holds, one per segment."""
    segment = length // segments
    piece = segment // size
    return [(s * segment + rank * piece, s * segment + (rank + 1) * piece) for s in range(segments)]


def split_modules(model: nn.Module) -> dict[str, Split]:
    """Module path -> split, for every module the plan names (Linears, or their sharded form)."""
    return {path: split for path, _ in model.named_modules() if (split := split_of(path))}


def check_heads(config: ModelConfig, size: int) -> None:
    """Refuse a group size that does not divide every head count, before anything is loaded."""
    problems = _head_problems(config, size)
    if problems:
        raise MimoError(_refusal(size, problems, _fitting(lambda n: not _head_problems(config, n))))


def check_shardable(model: Model, size: int) -> None:
    """Refuse a group size that leaves some rank a partial head, a partial quantization group or a
    fractional slice of any split layer (checked on the unsplit model, before weights are read)."""
    problems = _head_problems(model.config, size) + _layer_problems(model, size)
    if problems:
        fits = _fitting(
            lambda n: not (_head_problems(model.config, n) or _layer_problems(model, n))
        )
        raise MimoError(_refusal(size, problems, fits))


def shard_model(model: Model, group: mx.distributed.Group) -> dict[str, Split]:
    """Replace the planned Linears by MLX's sharded layers on `group` (their parameters stay lazy
    until loaded) and give each attention its rank's head counts; returns the plan applied."""
    size = group.size()
    check_shardable(model, size)
    plan = split_modules(model)
    for path, split in plan.items():
        replace_module(
            model,
            path,
            shard_linear(module_at(model, path), split.kind, segments=split.segments, group=group),
        )
    for layer in model.model.layers:
        layer.self_attn.num_heads //= size
        layer.self_attn.num_kv_heads //= size
    for block in model.visual.blocks:
        block.attn.num_heads //= size
    return plan


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of this rank's parameters: in split layers, and held whole (as on every rank)."""
    plan = split_modules(model)
    counts = {"split": 0, "whole": 0}
    for key, value in tree_flatten(model.parameters()):
        module, name = key.rsplit(".", 1)
        split = plan.get(module)
        counts["whole" if split is None or param_axis(split, name) is None else "split"] += (
            value.nbytes
        )
    return counts


def _head_problems(config: ModelConfig, size: int) -> list[str]:
    counts = (
        ("the decoder's attention heads", config.text.num_attention_heads),
        ("the decoder's key/value heads", config.text.num_key_value_heads),
        ("the vision tower's attention heads", config.vision.num_heads),
    )
    return [f"{what}: {count}" for what, count in counts if count % size]


def _layer_problems(model: Model, size: int) -> list[str]:
    problems = {}  # one line per kind of layer: `model.layers.*.mlp.down_proj`, not 36
    for path, split in split_modules(model).items():
        module = module_at(model, path)
        out_dims, in_dims = _dims(module)
        kind = re.sub(r"\.\d+\.", ".*.", path)
        if split.kind == ALL_TO_SHARDED and out_dims % (size * split.segments):
            problems[kind] = f"{kind}: {out_dims} outputs"
        if split.kind == SHARDED_TO_ALL:
            group = getattr(module, "group_size", 1)
            if in_dims % (size * group):
                unit = f" in quantization groups of {group}" if group > 1 else ""
                problems[kind] = f"{kind}: {in_dims} inputs{unit}"
    return sorted(problems.values())


def _dims(module: nn.Module) -> tuple[int, int]:
    out_dims, width = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        width = width * 32 // module.bits
    return out_dims, width


def _fitting(fits) -> list[int]:
    return [n for n in range(2, LARGEST_SUGGESTED + 1) if fits(n)]


def _refusal(size: int, problems: list[str], fitting: list[int]) -> str:
    shown = "; ".join(problems[:6]) + (
        f"; ... ({len(problems)} in all)" if len(problems) > 6 else ""
    )
    advice = (
        f"group sizes that fit this model: {', '.join(map(str, fitting))}"
        if fitting
        else f"no group size from 2 to {LARGEST_SUGGESTED} fits this model"
    )
    if any("quantization groups" in problem for problem in problems):
        advice += "; a folder converted with a smaller --q-group-size splits further"
    return (
        f"this model cannot be split across {size} ranks: each rank needs whole heads and equal "
        f"slices of every split layer, but these do not divide by {size}: {shown}. Start a "
        f"different number of ranks ({advice})."
    )


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (list items by index: `visual.merger.mlp.0`)."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at a dotted path in place of what is there."""
    parent_path, _, name = path.rpartition(".")
    parent = module_at(model, parent_path)
    if isinstance(parent, list):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
