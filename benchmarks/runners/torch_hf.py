"""transformers on PyTorch: MPS, else CUDA, else CPU, in the dtype a user would pick there."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from .base import MemoryReading, process_peak_rss, rss_sampler

ATTENTION = "sdpa"  # transformers' default where torch has it


def pick_device() -> tuple[torch.device, torch.dtype]:
    """MPS float16, else CUDA bfloat16, else CPU float32 (CPU half precision is slow or missing)."""
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.float16
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


_SAMPLER = rss_sampler()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif device.type == "cpu" and _SAMPLER is not None:
        _SAMPLER.start()


def peak(device: torch.device) -> MemoryReading:
    if device.type == "cuda":
        return MemoryReading(torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated")
    if device.type == "mps":
        # MPS keeps no peak counter: memory the driver holds after the run is the closest reading.
        return MemoryReading(
            torch.mps.driver_allocated_memory(), "torch.mps.driver_allocated_memory"
        )
    if _SAMPLER is not None:
        return _SAMPLER.stop()
    return process_peak_rss()


def vision_state(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tower's tensors only, in `dtype`, from either checkpoint key layout."""
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                for prefix in ("visual.", "model.visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = handle.get_tensor(key).to(dtype)
    return state


class Vision:
    def __init__(self, folder: Path, dtype: str | None = None):
        self.device, self.dtype = pick_device()
        config = Qwen2_5_VLConfig.from_pretrained(folder).vision_config
        config._attn_implementation = ATTENTION
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
        model.load_state_dict(vision_state(folder, self.dtype), strict=True)
        self.model = model.to(self.device, self.dtype).eval()

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        with torch.inference_mode():
            px = torch.from_numpy(pixels).to(self.device, self.dtype)
            self.model(px, grid_thw=torch.from_numpy(grid).to(self.device))
            synchronize(self.device)

    def reset_peak(self) -> None:
        reset_peak(self.device)

    def peak(self) -> MemoryReading:
        return peak(self.device)


class _Timestamps(BaseStreamer):
    """Records when each generated token reaches the streamer (the first put is the prompt)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.tokens: list[tuple[int, float]] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        self.tokens += [(int(t), now) for t in value.reshape(-1).tolist()]

    def end(self) -> None:
        pass


class Generate:
    def __init__(self, folder: Path, dtype: str | None = None, recipe: str | None = None):
        if recipe is not None:
            raise ValueError("transformers runs the float weights only")
        self.device, self.dtype = pick_device()
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=self.dtype, attn_implementation=ATTENTION
        ).to(self.device)
        self.model.eval()
        self.image_token_id = self.model.config.image_token_id

    def generate(
        self, ids: np.ndarray, pixels: np.ndarray, grid: np.ndarray, tokens: int
    ) -> list[tuple[int, float]]:
        streamer = _Timestamps()
        input_ids = torch.from_numpy(ids).to(self.device)
        # transformers 5 applies 3-D (M-RoPE) positions only when told which tokens are image tokens.
        mm_types = (input_ids == self.image_token_id).to(torch.int64)
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.from_numpy(pixels).to(self.device, self.dtype),
                image_grid_thw=torch.from_numpy(grid).to(self.device),
                mm_token_type_ids=mm_types,
                max_new_tokens=tokens,
                min_new_tokens=tokens,  # end tokens are masked, so every runtime decodes `tokens`
                do_sample=False,
                streamer=streamer,
            )
        return streamer.tokens

    def reset_peak(self) -> None:
        reset_peak(self.device)

    def peak(self) -> MemoryReading:
        return peak(self.device)
