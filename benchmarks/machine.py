"""What a result needs to be reproduced: the machine, the software versions, the git commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from .gpu.bundle import MANIFEST, STASH

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mlx", "mlx-vlm", "transformers", "torch", "numpy", "safetensors", "matplotlib")


def machine_info() -> dict:
    """CPU model, cores, RAM and OS of this machine."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_ram_bytes() / 1e9, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state() -> dict:
    """The commit measured, and whether the working tree differed from it. A copy of the checkout
    without git (as an offline GPU machine gets it) reports what `benchmarks.gpu.prepare`
    recorded of the checkout it was run in, and says so."""

    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:  # no git on this machine
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    if commit := git("rev-parse", "HEAD"):
        return {"commit": commit, "dirty": bool(git("status", "--porcelain"))}
    for manifest in [*sorted(REPO.glob(".gpu/upload-*/manifest.json")), STASH / MANIFEST]:
        if manifest.is_file():
            prepared = json.loads(manifest.read_text())
            return {
                "commit": prepared.get("commit"),
                "dirty": prepared.get("dirty"),
                "from": f"{manifest} (no git here): the checkout the wheels were prepared in",
            }
    return {"commit": None, "dirty": None}


def _cpu_model() -> str:
    if platform.system() == "Darwin":
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        return out.stdout.strip() or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
