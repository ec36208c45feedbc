"""Check that a folder holds a float Qwen2.5-VL checkpoint we can convert, reading only small files."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mimo_mlx.errors import MimoError
from mimo_mlx.model.checkpoint import read_config, remedy, safetensors_files
from mimo_mlx.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from mimo_mlx.model.weights import detect_layout

from .plan import FLOAT_DTYPES
from .reader import DOWNLOAD_AGAIN, SourceTensor, read_headers

# Sizes that decide every weight's shape: a config relying on defaults for them is not trusted.
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TEXT_FIELDS += ("vocab_size",)
_VISION_FIELDS = ("depth", "hidden_size", "num_heads")
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes the first, transformers 5 the second
_DTYPE_NAMES = {code: name for name, code in FLOAT_DTYPES.items()}  # "BF16" -> "bfloat16"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: dict  # config.json as written by the checkpoint's authors
    model_config: ModelConfig
    tensors: dict[str, SourceTensor]  # by the checkpoint's own key
    layout: str  # weights.HF, MLX_VLM or MIMO_MLX
    dtype: str  # the float type it was saved in: float16, bfloat16 or float32
    dtype_origin: str  # where `dtype` was read, for the summary


def read_source_config(folder: Path) -> tuple[dict, ModelConfig]:
    """config.json of `folder`, refused unless it describes a float Qwen2.5-VL model completely."""
    raw = read_config(folder)
    if raw.get("model_type") in SUPPORTED_MODEL_TYPES and isinstance(
        raw.get("vision_config"), dict
    ):
        _check_sizes_given(raw, folder)  # before from_hf, whose defaults would hide a missing size
    config = ModelConfig.from_hf(raw)
    for key in ("quantization", "quantization_config"):
        if key in raw:
            raise MimoError(
                f"{folder / 'config.json'} has a {key} section: the checkpoint is already "
                "quantized; convert the original float checkpoint instead"
            )
    return raw, config


def _check_sizes_given(raw: dict, folder: Path) -> None:
    # Same rule as ModelConfig.from_hf: decoder fields under text_config when it is an object.
    nested = isinstance(raw.get("text_config"), dict)
    text, prefix = (raw["text_config"], "text_config.") if nested else (raw, "")
    missing = [prefix + f for f in _TEXT_FIELDS if f not in text]
    missing += ["vision_config." + f for f in _VISION_FIELDS if f not in raw["vision_config"]]
    if missing:
        raise MimoError(
            f"{folder / 'config.json'} lacks {', '.join(missing)}; these decide the weights' shapes"
        )


def open_checkpoint(folder: Path) -> Checkpoint:
    """Config and the header of every shard; pickles are refused and never opened."""
    raw, config = read_source_config(folder)
    if not (folder / "tokenizer.json").is_file():
        raise MimoError(
            f"{folder} has no tokenizer.json; a converted model needs the checkpoint's tokenizer"
        )
    advice = remedy(folder, raw, otherwise=DOWNLOAD_AGAIN)  # for a damaged file: who wrote it
    tensors = read_headers(safetensors_files(folder), advice)
    dtype, origin = saved_dtype(raw, tensors, folder)
    return Checkpoint(folder, raw, config, tensors, detect_layout(tensors, raw), dtype, origin)


def saved_dtype(raw: dict, tensors: dict[str, SourceTensor], folder: Path) -> tuple[str, str]:
    """The float type the checkpoint was saved in, and where that was read: config.json's
    torch_dtype or dtype (at its root, then in text_config), else the type most weights have."""
    sections = [("", raw)]
    if isinstance(raw.get("text_config"), dict):
        sections.append(("text_config.", raw["text_config"]))
    for prefix, section in sections:
        for key in _DTYPE_KEYS:
            value = section.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES:
                return value.removeprefix("torch."), f"config.json {prefix}{key}"
    elements = Counter()
    for tensor in tensors.values():
        elements[tensor.dtype] += math.prod(tensor.shape)
    if not elements:
        raise MimoError(f"{folder} has safetensors files but no tensors in them")
    return _DTYPE_NAMES[max(elements, key=elements.get)], "the safetensors headers"
