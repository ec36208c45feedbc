"""mimo-mlx: MiMo-VL-7B on MLX.

model, processor = mimo_mlx.load("XiaomiMiMo/MiMo-VL-7B-RL-2508")   # or a model folder
result = mimo_mlx.generate(model, processor, "What is in this picture?", images=["photo.jpg"])
print(result.answer)

Names are imported on first use, so `import mimo_mlx` (and the CLI's --help) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> module that defines it.
_EXPORTS = {
    "GenerationResponse": "generation",
    "GenerationResult": "generation",
    "MimoError": "errors",
    "Model": "model",
    "ModelConfig": "config",
    "ModelInputs": "processor",
    "Processor": "processor",
    "Prompt": "model",
    "PromptOptions": "options",
    "SamplingOptions": "options",
    "generate": "generation",
    "generate_step": "generation",
    "load": "loading",
    "load_model": "loading",
    "make_logits_processors": "sampling",
    "make_sampler": "sampling",
    "stream_generate": "generation",
}
__all__ = [
    "GenerationResponse",
    "GenerationResult",
    "MimoError",
    "Model",
    "ModelConfig",
    "ModelInputs",
    "Processor",
    "Prompt",
    "PromptOptions",
    "SamplingOptions",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]

if TYPE_CHECKING:
    from .config import ModelConfig
    from .errors import MimoError
    from .generation import (
        GenerationResponse,
        GenerationResult,
        generate,
        generate_step,
        stream_generate,
    )
    from .loading import load, load_model
    from .model import Model, Prompt
    from .options import PromptOptions, SamplingOptions
    from .processor import ModelInputs, Processor
    from .sampling import make_logits_processors, make_sampler


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimo_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
