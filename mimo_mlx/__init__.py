"""mimo-mlx: MiMo-VL-7B on MLX.

model, processor = mimo_mlx.load("XiaomiMiMo/MiMo-VL-7B-RL-2508")   # or a model folder
result = mimo_mlx.generate(model, processor, "What is in this picture?", images=["photo.jpg"])
print(result.answer)
"""

from .config import ModelConfig
from .errors import MimoError
from .generate import (
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
