"""Rebuild the README's grounding example: a drawn street scene, an answer in MiMo-VL's format
(written by hand: the model itself has not run on this project's machines), and the picture that
`mimo-mlx annotate` draws from them.

    python tests/examples/make_grounding_example.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SCENE, ANSWER, PICTURE = HERE / "street.png", HERE / "street-answer.txt", HERE / "grounding.png"
# Where the scene's objects are, in pixels of the 1280 x 853 picture.
OBJECTS = {
    "red car": (140, 520, 560, 730),
    "sun": (1010, 70, 1170, 230),
    "tree": (760, 250, 960, 700),
}
RESIZED = (1092, 728)  # what smart_resize makes of 1280 x 853 at the default max_pixels


def scene() -> Image.Image:
    image = Image.new("RGB", (1280, 853), (150, 200, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 640, 1280, 853), fill=(120, 120, 125))  # road
    draw.rectangle((0, 600, 1280, 640), fill=(95, 160, 80))  # verge
    draw.ellipse(OBJECTS["sun"], fill=(250, 210, 60))
    x1, y1, x2, y2 = OBJECTS["tree"]
    draw.rectangle((x1 + 80, y1 + 250, x2 - 80, y2), fill=(110, 75, 40))
    draw.ellipse((x1, y1, x2, y1 + 300), fill=(40, 130, 60))
    x1, y1, x2, y2 = OBJECTS["red car"]
    draw.rounded_rectangle((x1, y1 + 60, x2, y2 - 50), radius=30, fill=(200, 30, 35))
    draw.polygon(
        [(x1 + 90, y1 + 60), (x1 + 150, y1), (x2 - 150, y1), (x2 - 80, y1 + 60)], fill=(200, 30, 35)
    )
    for cx in (x1 + 100, x2 - 100):
        draw.ellipse((cx - 50, y2 - 100, cx + 50, y2), fill=(30, 30, 30))
    return image


def answer() -> str:
    """The boxes in pixels of the resized image, as MiMo-VL would write them."""
    sx, sy = RESIZED[0] / 1280, RESIZED[1] / 853
    rows = [
        f'  {{"bbox_2d": [{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}], '
        f'"label": "{label}"}}'
        for label, (x1, y1, x2, y2) in OBJECTS.items()
    ]
    reasoning = (
        "The car is on the road at the left; the sun is at the top right; a tree stands between."
    )
    return f"<think>\n{reasoning}\n</think>\n```json\n[\n" + ",\n".join(rows) + "\n]\n```\n"


def main() -> None:
    scene().save(SCENE)
    ANSWER.write_text(answer())
    PICTURE.unlink(missing_ok=True)
    command = [sys.executable, "-m", "mimo_mlx", "annotate", "--image", str(SCENE)]
    subprocess.run([*command, "--answer", str(ANSWER), "--out", str(PICTURE)], check=True)


if __name__ == "__main__":
    main()
