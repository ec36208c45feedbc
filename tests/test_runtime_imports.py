"""transformers, torch and mlx-vlm are test and benchmark tools: the runtime never imports them."""

from __future__ import annotations

import subprocess
import sys

from test_generate import write_model_folder

SCRIPT = """
import sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torch", "torchvision", "mlx_vlm"):
            raise ImportError("the runtime imported " + name)

sys.meta_path.insert(0, Forbid())
import mimo_mlx, mimo_mlx.cli.main, mimo_mlx.convert
model, processor = mimo_mlx.load(sys.argv[1])
print(len(mimo_mlx.generate(model, processor, "Hi", max_tokens=3).tokens))
"""


def test_load_and_generate_without_the_reference_libraries(tmp_path):
    folder = write_model_folder(tmp_path / "model", seed=2)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 1
