"""The inputs every runtime gets: one preprocessed image per size and one prompt, made once.

Pixels come from mimo-mlx's image processor (checked against transformers' in the tests) with
max_pixels raised so 448, 1024 and 1344 keep their size (1344x1344 -> grid (1, 96, 96)); the prompt
is built as token ids, not text, so no runtime's tokenizer or chat template is on the clock.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mimo_mlx.inputs.images import ImageProcessorConfig, preprocess_images

MAX_PIXELS = 2048 * 2048  # well above 1344^2: the benchmark sizes are never shrunk


def image_inputs(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (patches, 1176) float32, grid_thw (1, 3)) of a size x size noise image."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    pixels, grid = preprocess_images([image], ImageProcessorConfig(), max_pixels=MAX_PIXELS)
    return np.asarray(pixels, dtype=np.float32), np.asarray(grid, dtype=np.int64).reshape(-1, 3)


def prompt_ids(config: dict, grid: np.ndarray, text_tokens: int, seed: int = 0) -> np.ndarray:
    """(1, L) ids: `text_tokens` / 2 text tokens, the image's placeholders, the rest of the text.

    Text ids are drawn below the special tokens, so every runtime sees ordinary text.
    """
    rng = np.random.default_rng(seed)
    merge = config["vision_config"]["spatial_merge_size"]
    pads = int(np.prod(grid, axis=1).sum()) // merge**2
    limit = min(config["bos_token_id"], config["vision_start_token_id"])
    before = rng.integers(0, limit, text_tokens // 2).tolist()
    after = rng.integers(0, limit, text_tokens - text_tokens // 2).tolist()
    image = [config["vision_start_token_id"], *[config["image_token_id"]] * pads]
    image.append(config["vision_end_token_id"])
    return np.array([before + image + after], dtype=np.int64)
