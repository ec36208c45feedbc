"""mimo-mlx: MiMo-VL-7B on MLX.

model, processor = mimo_mlx.load("XiaomiMiMo/MiMo-VL-7B-RL-2508")   # or a model folder
result = mimo_mlx.generate(model, processor, "What is in this picture?", images=["photo.jpg"])
print(result.answer)

Names are imported on first use, so `import mimo_mlx` (and the CLI's --help) stays light.

The package is one folder per subsystem, each importing only those below it (each folder's
`__init__` says which; tests/test_layout.py checks it):

    errors, options        what every layer shares: the user's errors, every request option
    model                  the network, its cache, config, checkpoint layouts, backend policy
    inputs                 tokenizer, chat template, image and video preprocessing, Processor
    convert, loading       checkpoint -> MLX folder; a folder or hub id -> (model, processor)
    grounding              boxes and points back on the user's image
    generation             generate_step -> stream_generate -> generate, batches, sampling, lookup
    conversation           multi-turn reuse, saved conversations, the server's pool
    distributed, serve     several processes as one model; the OpenAI-compatible server
    cli                    the command line
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> module that defines it.
_EXPORTS = {
    "BatchGenerator": "generation.batch",
    "CacheOptions": "options",
    "Conversation": "conversation.conversation",
    "GenerationResponse": "generation.loop",
    "GenerationResult": "generation.loop",
    "MimoError": "errors",
    "Model": "model.mimo_vl",
    "ModelConfig": "model.config",
    "ModelInputs": "inputs.processor",
    "Processor": "inputs.processor",
    "Prompt": "model.mimo_vl",
    "PromptOptions": "options",
    "SamplingOptions": "options",
    "batch_generate": "generation.batch",
    "generate": "generation.loop",
    "generate_step": "generation.loop",
    "load": "loading",
    "load_model": "loading",
    "make_logits_processors": "generation.sampling",
    "make_sampler": "generation.sampling",
    "stream_generate": "generation.loop",
}
__all__ = [
    "BatchGenerator",
    "CacheOptions",
    "Conversation",
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
    "batch_generate",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]

if TYPE_CHECKING:
    from .conversation.conversation import Conversation
    from .errors import MimoError
    from .generation.batch import BatchGenerator, batch_generate
    from .generation.loop import (
        GenerationResponse,
        GenerationResult,
        generate,
        generate_step,
        stream_generate,
    )
    from .generation.sampling import make_logits_processors, make_sampler
    from .inputs.processor import ModelInputs, Processor
    from .loading import load, load_model
    from .model.config import ModelConfig
    from .model.mimo_vl import Model, Prompt
    from .options import CacheOptions, PromptOptions, SamplingOptions


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimo_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
