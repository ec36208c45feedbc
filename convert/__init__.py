"""The converter: hub or local Qwen2.5-VL checkpoint -> self-contained MLX model folder (mimo_mlx.convert).

from mimo_mlx.convert import convert
report = convert(hf_path="XiaomiMiMo/MiMo-VL-7B-RL", mlx_path="mimo-vl-7b-rl-4bit")
print("\n".join(report.lines()))

May import: errors, options, model.
"""

from .pipeline import convert
from .report import ConversionReport

__all__ = ["ConversionReport", "convert"]
