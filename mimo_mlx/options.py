"""Every user-facing option of a request, declared once: name, default, meaning.

`PromptOptions` shape the prompt (system prompt, thinking switch, image and video sizing);
`SamplingOptions` shape how tokens are drawn; `LookupOptions` switch on prompt-lookup decoding,
which changes how fast tokens come, never which; `CacheOptions` say how the decoder's key/value
cache is stored (full precision, or quantized to save memory). The processor, `stream_generate`,
`generate` and the command line all take their options from these declarations; the CLI builds
its flags and help from the field metadata. No mlx import here: `mimo-mlx --help` stays fast.

May import: errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import MimoError

DEFAULT_MAX_PIXELS = 1024 * 28 * 28
"""At most 1024 merged decoder tokens (4096 vision patches) per image, about 896 x 896 pixels.

The checkpoint allows 16x more, which on a 16 GB MacBook means ~170 TFLOPs of vision tower (a
minute or more on a base M-series GPU) and ~2.4 GB of bf16 KV cache for one photo, next to a
~4.5 GB 4-bit model. 1024 tokens keep a screenshot or a page of text legible (28 px per token
side) while one image costs ~150 MB of KV cache and seconds of vision compute. Pass
``max_pixels=None`` to use the checkpoint's limit.
"""
DEFAULT_VIDEO_FPS = 2.0
DEFAULT_VIDEO_MAX_FRAMES = 128
"""64 s at 2 fps. qwen-vl-utils allows 768; with the per-frame limits below that is up to 98k
decoder tokens, far beyond a 16 GB laptop. 128 frames cost at most 64 x 256 = 16,384 tokens."""
DEFAULT_VIDEO_MAX_TOKENS = 16384
"""The decoder tokens one video may take: what the default frame count and size give (128 frames
at 256 tokens a pair), about 2.4 GB of bfloat16 key/value cache for MiMo-VL-7B (147 KB a token),
so a video prompt stays well inside the 32K tokens MiMo-VL was trained to and, beside 4.7 GB of
4-bit weights, inside what a 16 GB MacBook's GPU may use. Raising max_frames or
video_max_pixels past it shrinks the frames, then samples fewer of them."""
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame floor (~317 x 317)
DEFAULT_VIDEO_MAX_PIXELS = 256 * 28 * 28
"""~448 x 448 per frame, 256 merged tokens per pair of frames; qwen-vl-utils' ceiling is
768 * 28 * 28, three times the tokens for every second of video."""
DEFAULT_MODEL = "XiaomiMiMo/MiMo-VL-7B-RL-2508"
DEFAULT_MAX_TOKENS = 2048  # MiMo reasons before it answers; short limits cut the answer off
DEFAULT_GROUP_TIMEOUT = 300.0
"""Seconds a rank of a group (mlx.launch) waits on the others without progress before every rank
stops. Progress is each prefill chunk and each token, so the longest single wait is one prompt's
vision tower or one prefill chunk: minutes for a long video on a slow Mac, which this allows."""


def option(default: Any, help: str, *, cli: dict | None = None) -> Any:
    """A dataclass field carrying its command-line help (and click settings in `cli`)."""
    return field(default=default, metadata={"help": help, "cli": cli or {}})


@dataclass(frozen=True)
class PromptOptions:
    """How a request becomes a prompt."""

    system: str | None = option(None, "Replace the default system prompt.")
    no_think: bool = option(
        False,
        "Ask the model to answer without reasoning first. MiMo-VL 2508 models (RL-2508, "
        "SFT-2508) follow it: '/no_think' is appended to the prompt. The original RL and SFT "
        "models do not know the switch and may reason anyway.",
        cli={"is_flag": True},
    )
    min_pixels: int | None = option(
        None,
        "Smallest area an image is resized to. [default: the model's, 3136]",
        cli={"min": 1},
    )
    max_pixels: int | None = option(
        DEFAULT_MAX_PIXELS,
        "Largest area an image is resized to (the default, 1024 vision tokens, keeps a 16 GB "
        "MacBook responsive; the checkpoint allows 12845056).",
        cli={"min": 1},
    )
    fps: float = option(
        DEFAULT_VIDEO_FPS, "Video frames sampled per second.", cli={"min": 0, "min_open": True}
    )
    max_frames: int = option(
        DEFAULT_VIDEO_MAX_FRAMES, "Most frames sampled per video.", cli={"min": 1}
    )
    video_min_pixels: int | None = option(
        DEFAULT_VIDEO_MIN_PIXELS, "Smallest area a video frame is resized to.", cli={"min": 1}
    )
    video_max_pixels: int | None = option(
        DEFAULT_VIDEO_MAX_PIXELS,
        "Largest area a video frame is resized to (256 vision tokens per pair of frames).",
        cli={"min": 1},
    )
    video_max_tokens: int = option(
        DEFAULT_VIDEO_MAX_TOKENS,
        "Most decoder tokens one video may take. A video that would take more has its frames "
        "shrunk (down to --video-min-pixels), then fewer frames sampled, evenly over the clip; "
        "a note says so. The default is what 128 frames at the default size take, ~2.4 GB of "
        "bfloat16 cache for MiMo-VL-7B.",
        cli={"min": 1},
    )

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value > 0):
                raise MimoError(f"{name} must be a positive integer, got {value!r}")
        if not (_is_number(self.fps) and math.isfinite(self.fps) and self.fps > 0):
            raise MimoError(f"fps must be a positive number, got {self.fps!r}")
        if not (_is_int(self.max_frames) and self.max_frames >= 1):
            raise MimoError(f"max_frames must be an integer >= 1, got {self.max_frames!r}")
        if not (_is_int(self.video_max_tokens) and self.video_max_tokens >= 1):
            raise MimoError(
                f"video_max_tokens must be an integer >= 1, got {self.video_max_tokens!r}"
            )


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are drawn (mlx-lm's names). temp 0 is greedy."""

    temp: float = option(
        0.0,
        "Sampling temperature; 0 is greedy. [default: the model's generation_config, else 0.3 "
        "as MiMo recommends]",
        cli={"aliases": ("--temperature",), "min": 0, "model_default": True},
    )
    top_p: float = option(
        1.0,
        "Nucleus sampling: keep the most likely tokens up to this probability mass; 1 (or 0) "
        "disables. [default: generation_config, else 0.95]",
        cli={"min": 0, "max": 1, "model_default": True},
    )
    top_k: int = option(
        0,
        "Keep only the k most likely tokens; 0 disables. [default: generation_config, else 0]",
        cli={"min": 0, "model_default": True},
    )
    min_p: float = option(
        0.0,
        "Drop tokens less likely than min-p times the most likely one.",
        cli={"min": 0, "max": 1},
    )
    repetition_penalty: float | None = option(
        None,
        "Penalize tokens already in the prompt or the answer (> 1 discourages repeats).",
        cli={"min": 0, "min_open": True},
    )
    seed: int | None = option(None, "Random seed, for repeatable sampling.")

    def __post_init__(self) -> None:
        if not (_is_number(self.temp) and 0 <= self.temp < math.inf):
            raise MimoError(
                f"temp must be a finite number >= 0 (0 means greedy), got {self.temp!r}"
            )
        if not (_is_number(self.top_p) and 0 <= self.top_p <= 1):
            raise MimoError(f"top_p must be in [0, 1] (0 or 1 disables it), got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise MimoError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise MimoError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        penalty = self.repetition_penalty
        if penalty is not None and not (_is_number(penalty) and 0 < penalty < math.inf):
            raise MimoError(
                f"repetition_penalty must be a finite number > 0 (1 disables it), got {penalty!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise MimoError(f"seed must be an integer, got {self.seed!r}")


DEFAULT_LOOKUP_TOKENS = 10  # transformers' suggestion for prompt_lookup_num_tokens
DEFAULT_LOOKUP_NGRAM = 2  # transformers' default max_matching_ngram_size
MAX_LOOKUP_NGRAM = 16  # every n-gram up to this size is indexed for every token seen


@dataclass(frozen=True)
class LookupOptions:
    """Prompt-lookup decoding (transformers' names): draft the next tokens by finding the last few
    tokens earlier in the prompt or the answer and copying what followed; the model checks the
    whole draft in one forward pass. The output is the same as without it (greedy: token for
    token; sampling: the same distribution); copying answers (OCR, documents, quoting) come faster.
    """

    prompt_lookup: bool = option(
        False,
        "Prompt-lookup decoding: draft tokens by copying from the prompt and the answer so far "
        "and verify them in one forward pass. Faster when the answer repeats text it has seen "
        "(OCR, documents, code); the output stays the same (greedy: token for token; sampling: "
        "the same distribution).",
        cli={"is_flag": True},
    )
    prompt_lookup_num_tokens: int | None = option(
        None,
        f"With --prompt-lookup: most tokens drafted per forward pass (giving it also turns prompt "
        f"lookup on, as in transformers). [default: {DEFAULT_LOOKUP_TOKENS}]",
        cli={"min": 1},
    )
    max_matching_ngram_size: int | None = option(
        None,
        "With --prompt-lookup: the longest run of last tokens matched against the text seen; "
        f"shorter runs are tried down to one token. [default: {DEFAULT_LOOKUP_NGRAM}]",
        cli={"min": 1, "max": MAX_LOOKUP_NGRAM},
    )

    def __post_init__(self) -> None:
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise MimoError(f"{name} must be an integer >= 1, got {value!r}")
        ngram = self.max_matching_ngram_size
        if ngram is not None and ngram > MAX_LOOKUP_NGRAM:
            raise MimoError(
                f"max_matching_ngram_size must be at most {MAX_LOOKUP_NGRAM}, got {ngram}"
            )
        if not isinstance(self.prompt_lookup, bool):
            raise MimoError(f"prompt_lookup must be True or False, got {self.prompt_lookup!r}")
        if self.max_matching_ngram_size is not None and not self.enabled:
            raise MimoError(
                "max_matching_ngram_size applies to prompt lookup: also pass prompt_lookup=True"
            )

    @property
    def enabled(self) -> bool:
        return self.prompt_lookup or self.prompt_lookup_num_tokens is not None

    @property
    def num_tokens(self) -> int:
        return self.prompt_lookup_num_tokens or DEFAULT_LOOKUP_TOKENS

    @property
    def ngram_size(self) -> int:
        return self.max_matching_ngram_size or DEFAULT_LOOKUP_NGRAM


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what MLX's affine quantization supports


@dataclass(frozen=True)
class CacheOptions:
    """How the decoder's key/value cache is stored (mlx-lm's names). Quantized, keys and values
    take 8 or 4 bits plus a scale and a bias per group, about 53% or 28% of a bfloat16 cache for
    MiMo-VL-7B, and attention reads them through MLX's quantized matmuls. The answer changes a
    little (see the README's figures); the cache is what grows with a long video or conversation.
    """

    kv_bits: int | None = option(
        None,
        "Store the key/value cache quantized to 4 or 8 bits: about 53% (8) or 28% (4) of the "
        "memory of a full-precision cache, for long videos and conversations. [default: full "
        "precision]",
        cli={"choices": KV_BITS},
    )
    kv_group_size: int = option(
        64,
        "With --kv-bits: how many values share one scale and bias (smaller: closer to full "
        "precision, a little more memory).",
        cli={"choices": KV_GROUP_SIZES},
    )
    quantized_kv_start: int = option(
        0,
        "With --kv-bits: keep the cache in full precision until it holds this many tokens, then "
        "quantize it (the forward pass that crosses the mark still attends in full precision).",
        cli={"min": 0},
    )

    def __post_init__(self) -> None:
        if self.kv_bits is not None and (not _is_int(self.kv_bits) or self.kv_bits not in KV_BITS):
            raise MimoError(
                f"kv_bits must be 4 or 8 (or None: no quantization), got {self.kv_bits!r}"
            )
        if not _is_int(self.kv_group_size) or self.kv_group_size not in KV_GROUP_SIZES:
            raise MimoError(f"kv_group_size must be 32, 64 or 128, got {self.kv_group_size!r}")
        start = self.quantized_kv_start
        if not (_is_int(start) and start >= 0):
            raise MimoError(f"quantized_kv_start must be an integer >= 0, got {start!r}")

    def describe(self) -> str:
        """'8-bit (group 64, from token 100)' or 'full-precision', for messages."""
        if self.kv_bits is None:
            return "full-precision"
        start = f", from token {self.quantized_kv_start}" if self.quantized_kv_start else ""
        return f"{self.kv_bits}-bit (group {self.kv_group_size}{start})"

    def flags(self) -> str:
        """The command-line flags that ask for this storage."""
        if self.kv_bits is None:
            return "no --kv-bits"
        return (
            f"--kv-bits {self.kv_bits} --kv-group-size {self.kv_group_size} "
            f"--quantized-kv-start {self.quantized_kv_start}"
        )


def pop_cache_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the cache options among `kwargs` (only those given)."""
    names = {f.name for f in fields(CacheOptions)}
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}


def pop_lookup_options(kwargs: dict[str, Any]) -> LookupOptions:
    """Remove the prompt-lookup options from `kwargs` and return them, checked."""
    names = {f.name for f in fields(LookupOptions)}
    return LookupOptions(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})


def split_options(options: dict[str, Any]) -> tuple[PromptOptions, SamplingOptions]:
    """Keyword arguments -> (PromptOptions, SamplingOptions); an unknown name is an error.
    (Take the `LookupOptions` and `CacheOptions` out first, with `pop_lookup_options` and
    `pop_cache_options`.)"""
    prompt_names = {f.name for f in fields(PromptOptions)}
    sampling_names = {f.name for f in fields(SamplingOptions)}
    unknown = sorted(options.keys() - prompt_names - sampling_names)
    if unknown:
        others = {f.name for kind in (LookupOptions, CacheOptions) for f in fields(kind)}
        known = ", ".join(sorted(prompt_names | sampling_names | others))
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are: {known}")
    prompt = PromptOptions(**{k: v for k, v in options.items() if k in prompt_names})
    sampling = SamplingOptions(**{k: v for k, v in options.items() if k in sampling_names})
    return prompt, sampling


def pop_prompt_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the prompt options among `kwargs`."""
    names = {f.name for f in fields(PromptOptions)}
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
