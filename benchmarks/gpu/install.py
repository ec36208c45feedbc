"""On the offline machine, with the last upload: `python3 -m benchmarks.gpu.install`.

Stashes the parts this command carried, rebuilds the wheels from every part (each checked), and
installs them into this Python with pip, no index and no dependencies: MLX, its CUDA build and
mlx-vlm, and setuptools where this Python's is missing or too old for an editable install; then
mimo-mlx from this checkout, editable (so `mimo_mlx.convert` maps to convert/ as in development).
Says which modules the harness needs are still missing (transformers, torch and the runtime's own
dependencies must already be on the machine; a peer that is missing fails its own workers only),
and checks that MLX computes on the GPU: without one a full-scale run would take hours on the
CPU, so it stops there (exit 1). `--dry-run` rebuilds and checks the wheels and prints the pip
commands without running them. Standard library only: nothing is installed yet.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

from .bundle import STASH, BundleError, stash, unpack

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("numpy", "safetensors", "tokenizers", "jinja2", "click", "PIL", "huggingface_hub")
PEERS = ("transformers", "torch")  # the reference runtime; mlx-vlm comes with the wheels
OPTIONAL = ("psutil", "matplotlib")  # CPU memory sampling; the chart
EDITABLE_SETUPTOOLS = 68  # what pyproject.toml's build-system requires
CHECK = (
    "import mlx.core as mx, mimo_mlx.convert; a = mx.ones((1024, 1024), mx.bfloat16); "
    "mx.eval(a @ a); print('MLX', mx.__version__, 'on', mx.default_device())"
)


def pip(args: list[str], dry_run: bool) -> None:
    """pip install, offline; a Python marked externally managed (PEP 668) is told we mean it."""
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *args]
    print(("would run: " if dry_run else "running: ") + shlex.join(command), flush=True)
    if dry_run:
        return
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode and "externally-managed-environment" in done.stderr:
        done = subprocess.run([*command, "--break-system-packages"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"install: pip failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def setuptools_ready() -> bool:
    try:
        major = importlib.metadata.version("setuptools").split(".")[0]
    except importlib.metadata.PackageNotFoundError:
        return False
    return major.isdigit() and int(major) >= EDITABLE_SETUPTOOLS


def missing(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=REPO / ".gpu")
    parser.add_argument("--stash", type=Path, default=STASH)
    parser.add_argument("--dry-run", action="store_true", help="check and print, install nothing")
    parser.add_argument("--allow-cpu", action="store_true", help="go on where MLX has no GPU")
    args = parser.parse_args(argv)
    try:
        manifest, _ = stash(args.prepared, args.stash)
        wheels = unpack(args.stash, args.stash / "wheels")
    except BundleError as err:
        sys.exit(f"install: {err}")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != manifest["python"]:
        sys.exit(
            f"install: the wheels were prepared for Python {manifest['python']}, this is {python}: "
            f"prepare again with --python {python}"
        )
    print(f"install: {len(wheels)} wheels rebuilt and checked: {', '.join(w.name for w in wheels)}")
    chosen = [w for w in wheels if not w.name.startswith("setuptools-")]
    setuptools = [w for w in wheels if w.name.startswith("setuptools-")]
    if setuptools and not setuptools_ready():
        pip(["--no-compile", *map(str, setuptools)], args.dry_run)
    if chosen:
        pip(["--no-compile", *map(str, chosen)], args.dry_run)
    pip(["--no-build-isolation", "-e", str(REPO)], args.dry_run)
    if absent := missing(NEEDED):
        print(f"install: mimo-mlx needs {', '.join(absent)}, not on this machine: no worker runs")
    if absent := missing(PEERS):
        print(f"install: not on this machine: {', '.join(absent)} (the transformers runs fail)")
    if absent := missing(OPTIONAL):
        print(f"install: optional, not on this machine: {', '.join(absent)}")
    if args.dry_run:
        return
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO)
    print(done.stdout.strip() or done.stderr[-2000:], flush=True)
    if done.returncode or ("gpu" not in done.stdout and not args.allow_cpu):
        sys.exit("install: MLX does not compute on a GPU here; a full-scale run would take hours")


if __name__ == "__main__":
    main()
