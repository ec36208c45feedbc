"""Prepare the wheels an offline CUDA machine needs: `python -m benchmarks.gpu.prepare`.

Run here, with network access, from the checkout. Downloads (pip, no dependencies) MLX's core
wheel, its CUDA build (`mlx-cuda-13`) and mlx-vlm, at the versions installed here unless told
otherwise, for the machine's Python and platform; adds setuptools (the editable install of
mimo-mlx needs one recent enough); and cuts them into `.gpu/upload-N/` folders that each fit one
command's upload. Prints the commands to send, in order. `--wheels DIR` takes the wheels from a
folder instead of downloading them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .bundle import UPLOAD_BYTES, pack

REPO = Path(__file__).resolve().parents[2]
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64")
RUN = 'python3 -m benchmarks.run --scale full --time-budget 390 --out "$OUT/gpu-full"'
# The harness, memory.sh and both probes in one command, packed into one file to bring back.
EVERYTHING = 'bash benchmarks/gpu/everything.sh /tmp/everything "$OUT"'


def installed(name: str, fallback: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return fallback


def download(requirements: list[str], into: Path, python: str) -> list[Path]:
    """Wheels for `requirements` (no dependencies) for CPython `python` on x86_64 Linux."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
         str(into), "--python-version", python, "--implementation", "cp", *platforms,
         *requirements],
        check=True,
    )  # fmt: skip
    return sorted(into.glob("*.whl"))


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu", help="default: .gpu/")
    parser.add_argument("--mlx-version", default=installed("mlx", "0.32.4"))
    parser.add_argument("--mlx-vlm-version", default=installed("mlx-vlm", "0.7.10"))
    parser.add_argument("--cuda", default="13", help="CUDA major version of the machine's driver")
    parser.add_argument("--python", default="3.12", help="the machine's Python (major.minor)")
    parser.add_argument("--upload-bytes", type=int, default=UPLOAD_BYTES)
    parser.add_argument("--wheels", type=Path, help="take the wheels from this folder")
    args = parser.parse_args(argv)
    requirements = [
        f"mlx=={args.mlx_version}",
        f"mlx-cuda-{args.cuda}=={args.mlx_version}",
        f"mlx-vlm=={args.mlx_vlm_version}",
        "setuptools>=70",
    ]
    about = {
        "mlx": args.mlx_version,
        "mlx_vlm": args.mlx_vlm_version,
        "cuda": args.cuda,
        "python": args.python,
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain")),
        "prepared_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        wheels = sorted(args.wheels.glob("*.whl")) if args.wheels else None
        wheels = wheels or download(requirements, Path(tmp), args.python)
        manifest = pack(wheels, args.out, args.upload_bytes, about)
    count = len(manifest["parts"])
    print(f"{args.out}: {', '.join(w['name'] for w in manifest['wheels'])}")
    print(f"{manifest['total_bytes'] / 1e6:.1f} MB in {count} uploads; send, in order:")
    for part in manifest["parts"]:
        upload = f"{args.out.name}/upload-{part['upload']}"
        command = "python3 -m benchmarks.gpu.stash"
        if part["upload"] == count:
            command = f"python3 -m benchmarks.gpu.install && {RUN}"
        print(f"  carry {upload} ({part['size'] / 1e6:.1f} MB): {command}")
    print(f"  (or, the harness and the memory probes: ... install && {EVERYTHING})")
    if about["dirty"]:
        print("note: the checkout has uncommitted changes; the results will say so")


if __name__ == "__main__":
    main()
