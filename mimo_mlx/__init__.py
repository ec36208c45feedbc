"""mimo-mlx: MiMo-VL-7B on MLX."""

from .config import ModelConfig
from .errors import MimoError
from .loading import load_model
from .model import Model

__all__ = ["MimoError", "Model", "ModelConfig", "load_model"]
