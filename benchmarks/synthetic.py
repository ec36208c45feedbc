"""Synthetic MiMo-VL-7B checkpoints: real key names, shapes, dtype and config, random weights.

The real checkpoint cannot be downloaded on our machines; converter and loader benchmarks need one
of the right size. `write_checkpoint` writes a bfloat16 safetensors checkpoint (sharded, with an
index) for the published config with any number of decoder layers and vision blocks (all of them:
`full=True`, 16.6 GB). The numbers are drawn with MLX on the default device, one shard (at most
`max_shard_bytes`) in memory at a time: on a GPU the full model takes seconds, mostly the write.
Each tensor's numbers come from its own key (the seed and its place in the sorted key list), so the
same seed and config always give the same checkpoint. `scaled_config` gives the benchmark scales:
`tiny` and `small` shrink widths too, `full` is the published model.

    python benchmarks/synthetic.py /tmp/synth --decoder-layers 2 --vision-blocks 2
    python benchmarks/synthetic.py /tmp/synth-small --scale small
    /usr/bin/time -v mimo-mlx convert --hf-path /tmp/synth --mlx-path /tmp/synth-4bit
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mimo_mlx.convert.plan import OutputTensor
from mimo_mlx.convert.writer import assign_shards
from mimo_mlx.model.config import ModelConfig
from mimo_mlx.model.mimo_vl import Model

# MiMo-VL-7B-RL's config.json (the published layout: decoder keys at the root).
MIMO_VL_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "rope_theta": 640000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151680,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 4096,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>")
SPECIAL_TOKENS += ("<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
WEIGHT_STD = 0.02  # the published config's initializer_range


# Benchmark scales: overrides of the published config. Head dims stay real where they can (128 in
# the decoder, 80 in the ViT) so the attention kernels are the ones the real model runs; vocab and
# special-token ids shrink together (ids keep their distance from the end of the vocabulary).
SCALES: dict[str, dict] = {
    "tiny": {
        "text": dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            mrope_section=[2, 3, 3],
        ),
        "vision": dict(
            depth=4, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=[1, 3]
        ),
    },
    "small": {
        "text": dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=32768,
            mrope_section=[16, 24, 24],
        ),
        "vision": dict(
            depth=8,
            hidden_size=640,
            intermediate_size=1728,
            num_heads=8,
            fullatt_block_indexes=[3, 7],
        ),
    },
    "full": {"text": {}, "vision": {}},
}
TOKEN_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
)


def scaled_config(scale: str) -> dict:
    """The published config at a benchmark scale (see `SCALES`)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; pick one of {', '.join(SCALES)}")
    config = json.loads(json.dumps(MIMO_VL_7B_CONFIG))
    text = dict(SCALES[scale]["text"])
    if "mrope_section" in text:
        config["rope_scaling"]["mrope_section"] = text.pop("mrope_section")
    if "vocab_size" in text:
        shift = text["vocab_size"] - config["vocab_size"]
        for key in TOKEN_ID_KEYS:
            config[key] += shift
    config.update(text)
    config["max_window_layers"] = config["num_hidden_layers"]
    config["vision_config"].update(SCALES[scale]["vision"])
    config["vision_config"]["out_hidden_size"] = config["hidden_size"]
    return config


def synthetic_config(decoder_layers: int, vision_blocks: int) -> dict:
    """The published config with fewer layers; full-attention blocks kept where they still exist."""
    config = json.loads(json.dumps(MIMO_VL_7B_CONFIG))
    config["num_hidden_layers"] = config["max_window_layers"] = decoder_layers
    vision = config["vision_config"]
    vision["depth"] = vision_blocks
    full = [i for i in vision["fullatt_block_indexes"] if i < vision_blocks]
    vision["fullatt_block_indexes"] = full or [vision_blocks - 1]
    return config


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape as transformers saves it: our model's parameters (named like the checkpoint),
    with the patch embedding as the Conv3d it is in torch."""
    model_config = ModelConfig.from_hf(config)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model(model_config).parameters())}
    vision = model_config.vision
    out = shapes["visual.patch_embed.proj.weight"][0]
    shapes["visual.patch_embed.proj.weight"] = (
        out,
        vision.in_channels,
        vision.temporal_patch_size,
        vision.patch_size,
        vision.patch_size,
    )
    return dict(sorted(shapes.items()))


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array) -> mx.array:
    """bfloat16, uniform with std WEIGHT_STD around 0 (norm scales around 1); lazy."""
    half = WEIGHT_STD * math.sqrt(3)
    values = mx.random.uniform(-half, half, shape, dtype=mx.bfloat16, key=key)
    if "norm" in name or name.endswith("ln_q.weight"):
        values = values + 1.0
    return values


def shard_groups(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Tensor names packed in order into shards of at most `max_bytes` of bfloat16 (a larger
    tensor gets its own), as the converter packs its output (`writer.assign_shards`)."""
    tensors = [[OutputTensor(name, "BF16", tuple(shape))] for name, shape in shapes.items()]
    return [[t.name for t in shard] for shard in assign_shards(tensors, max_bytes)]


def write_checkpoint(
    folder: Path,
    decoder_layers: int = 2,
    vision_blocks: int = 2,
    full: bool = False,
    max_shard_bytes: int = 4 << 30,
    seed: int = 0,
    config: dict | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write config.json, bfloat16 shards with an index and a minimal tokenizer; returns the shapes.

    `config` (e.g. from `scaled_config`) replaces the layer/block counts and `full`.
    """
    if config is None:
        config = (
            synthetic_config(36, 32) if full else synthetic_config(decoder_layers, vision_blocks)
        )
    shapes = checkpoint_shapes(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder)
    keys = dict(zip(shapes, mx.random.split(mx.random.key(seed), len(shapes)), strict=True))
    shards = shard_groups(shapes, max_shard_bytes)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = SHARD_NAME.format(number, len(shards))
        arrays = {n: random_tensor(n, shapes[n], keys[n]) for n in names}
        mx.eval(arrays)
        mx.save_safetensors(str(folder / file), arrays, metadata={"format": "pt"})
        del arrays
        weight_map.update({n: file for n in names})
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return shapes


def _write_tokenizer(folder: Path) -> None:
    # Byte-level, no merges: enough for a folder that must hold a tokenizer, not for real text.
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--decoder-layers", default=2, show_default=True)
@click.option("--vision-blocks", default=2, show_default=True)
@click.option("--full", is_flag=True, help="All 36 layers and 32 blocks (16.6 GB).")
@click.option(
    "--scale", type=click.Choice(list(SCALES)), help="A benchmark scale (overrides the rest)."
)
def main(
    folder: Path, decoder_layers: int, vision_blocks: int, full: bool, scale: str | None
) -> None:
    """Write a synthetic MiMo-VL-7B checkpoint to FOLDER."""
    config = scaled_config(scale) if scale else None
    shapes = write_checkpoint(folder, decoder_layers, vision_blocks, full, config=config)
    largest = max(shapes, key=lambda k: math.prod(shapes[k]))
    total = sum(math.prod(s) for s in shapes.values())
    click.echo(
        f"{folder}: {len(shapes)} tensors, {total / 1e9:.3f}B parameters, {2 * total / 1e9:.2f} GB; "
        f"largest {largest} {shapes[largest]} = {2 * math.prod(shapes[largest]) / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()
