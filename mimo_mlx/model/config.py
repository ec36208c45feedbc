"""Typed model configuration, read from either config.json layout.

Published MiMo-VL checkpoints keep the decoder's keys at the root of config.json with
``rope_scaling = {"type": "mrope", "mrope_section": [...]}``; transformers 5 writes them under
``text_config`` with ``rope_parameters``. ``ModelConfig.from_hf`` reads both and never mutates its input.
Defaults are MiMo-VL-7B's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MimoError

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3456
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 4096
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # transformers hard-codes it for the vision tower

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one decoder token (4 for a 2x2 merge)."""
        return self.spatial_merge_size**2

    @property
    def window_side(self) -> int:
        """Side of one attention window, in merged tokens (4 for window_size 112)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 640000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: tuple[int, ...] = (151645,)
    # {"group_size": 64, "bits": 4, "<module path>": {...} | False, ...}; None for a float model.
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict in either layout (see the module docstring)."""
        if not isinstance(config, dict):
            raise MimoError(f"config.json must hold a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = config.get("architectures")
            raise MimoError(
                f"config.json: model_type is {model_type!r} (architectures {archs}); mimo-mlx runs "
                "Qwen2.5-VL-architecture models (model_type 'qwen2_5_vl'), such as MiMo-VL-7B"
            )
        text_raw = config.get("text_config")
        text = _text_config(text_raw if isinstance(text_raw, dict) else config, config)
        vision_raw = config.get("vision_config")
        if not isinstance(vision_raw, dict):
            raise MimoError(
                "config.json: vision_config is missing; it is needed to build the vision tower"
            )
        vision = _vision_config(vision_raw)
        _check_compatible(text, vision)
        eos = _read(config, "", "eos_token_id", None) or _read(
            text_raw or {}, "text_config.", "eos_token_id", None
        )
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        ids = {
            name: _read(config, "", name, getattr(cls, name), int)
            for name in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
            )
        }
        quantization = config.get("quantization")
        if quantization is not None and not isinstance(quantization, dict):
            raise MimoError("config.json: quantization must be an object with bits and group_size")
        return cls(text=text, vision=vision, eos_token_id=eos_ids, quantization=quantization, **ids)


def _text_config(raw: dict[str, Any], root: dict[str, Any]) -> TextConfig:
    prefix = "text_config." if raw is not root else ""
    defaults = TextConfig()
    values = {
        name: _read(raw, prefix, name, getattr(defaults, name), kind)
        for name, kind in (
            ("vocab_size", int),
            ("hidden_size", int),
            ("intermediate_size", int),
            ("num_hidden_layers", int),
            ("num_attention_heads", int),
            ("rms_norm_eps", float),
            ("max_position_embeddings", int),
            ("hidden_act", str),
        )
    }
    values["num_key_value_heads"] = _read(
        raw, prefix, "num_key_value_heads", values["num_attention_heads"], int
    )
    # Older saves put tie_word_embeddings inside text_config, newer ones at the root.
    tied = raw.get("tie_word_embeddings", False) or root.get("tie_word_embeddings", False)
    values["tie_word_embeddings"] = bool(tied)
    values["rope_theta"], values["mrope_section"] = _rope(raw, prefix)
    return TextConfig(**values)


def _rope(raw: dict[str, Any], prefix: str) -> tuple[float, tuple[int, ...]]:
    """rope_theta and mrope_section from `rope_parameters` (transformers 5) or `rope_scaling` (older)."""
    params = raw.get("rope_parameters")
    name = "rope_parameters"
    if params is None:
        params, name = raw.get("rope_scaling"), "rope_scaling"
    if not isinstance(params, dict):
        raise MimoError(
            f"config.json: {prefix}rope_parameters (or rope_scaling) with an mrope_section is required "
            "for the decoder's multimodal rotary embedding"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise MimoError(
            f"config.json: {prefix}{name} type {rope_type!r} is not supported (expected 'mrope')"
        )
    section = params.get("mrope_section")
    if not (
        isinstance(section, list)
        and len(section) == 3
        and all(_is_int(s) and s > 0 for s in section)
    ):
        raise MimoError(
            f"config.json: {prefix}{name}.mrope_section must be three positive integers, got {section!r}"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", TextConfig.rope_theta))
    if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0):
        raise MimoError(f"config.json: {prefix}rope_theta must be a positive number, got {theta!r}")
    return float(theta), tuple(section)


def _vision_config(raw: dict[str, Any]) -> VisionConfig:
    prefix = "vision_config."
    defaults = VisionConfig()
    values = {
        name: _read(raw, prefix, name, getattr(defaults, name), kind)
        for name, kind in (
            ("depth", int),
            ("hidden_size", int),
            ("intermediate_size", int),
            ("num_heads", int),
            ("in_channels", int),
            ("patch_size", int),
            ("temporal_patch_size", int),
            ("spatial_merge_size", int),
            ("window_size", int),
            ("out_hidden_size", int),
            ("tokens_per_second", float),
            ("hidden_act", str),
        )
    }
    full = raw.get("fullatt_block_indexes", list(defaults.fullatt_block_indexes))
    if not (isinstance(full, list) and all(_is_int(i) for i in full)):
        raise MimoError(
            f"config.json: {prefix}fullatt_block_indexes must be a list of integers, got {full!r}"
        )
    bad = [i for i in full if not 0 <= i < values["depth"]]
    if bad:
        raise MimoError(
            f"config.json: {prefix}fullatt_block_indexes {bad} are outside 0..{values['depth'] - 1} (depth)"
        )
    values["fullatt_block_indexes"] = tuple(full)
    rope = raw.get("rope_parameters") or {}
    values["rope_theta"] = float(rope.get("rope_theta", defaults.rope_theta))
    return VisionConfig(**values)


def _check_compatible(text: TextConfig, vision: VisionConfig) -> None:
    if text.hidden_size % text.num_attention_heads:
        raise MimoError(
            f"config.json: hidden_size {text.hidden_size} is not divisible by "
            f"num_attention_heads {text.num_attention_heads}"
        )
    if text.num_attention_heads % text.num_key_value_heads:
        raise MimoError(
            f"config.json: num_attention_heads {text.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {text.num_key_value_heads}"
        )
    if 2 * sum(text.mrope_section) != text.head_dim:
        raise MimoError(
            f"config.json: mrope_section {list(text.mrope_section)} must sum to half the head dim "
            f"({text.head_dim // 2})"
        )
    if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
        raise MimoError(
            f"config.json: vision_config.hidden_size {vision.hidden_size} must split into "
            f"num_heads {vision.num_heads} heads whose size is a multiple of 4"
        )
    if vision.window_side < 1 or vision.window_size % (
        vision.patch_size * vision.spatial_merge_size
    ):
        raise MimoError(
            f"config.json: vision_config.window_size {vision.window_size} must be a multiple of "
            f"patch_size x spatial_merge_size ({vision.patch_size * vision.spatial_merge_size})"
        )
    if vision.out_hidden_size != text.hidden_size:
        raise MimoError(
            f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} must equal the "
            f"decoder's hidden_size {text.hidden_size}"
        )
    for part, act in (
        ("hidden_act", text.hidden_act),
        ("vision_config.hidden_act", vision.hidden_act),
    ):
        if act not in SUPPORTED_ACTIVATIONS:
            raise MimoError(f"config.json: {part} {act!r} is not supported (expected 'silu')")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read(
    raw: dict[str, Any], prefix: str, name: str, default: Any, kind: type | None = None
) -> Any:
    """One field, type-checked, with an error that names it."""
    value = raw.get(name, default)
    if kind is None or value is None and default is None:
        return value
    if kind is float and _is_int(value):
        value = float(value)
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise MimoError(f"config.json: {prefix}{name} must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and value <= 0:
        raise MimoError(f"config.json: {prefix}{name} must be positive, got {value!r}")
    return value
