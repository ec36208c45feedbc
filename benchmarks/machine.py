"""What a result needs to be reproduced: the machine, the software versions, the git commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .gpu.bundle import MANIFEST, STASH

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mlx", "mlx-vlm", "transformers", "torch", "numpy", "safetensors", "matplotlib")


def provenance(module: str) -> dict:
    """What every result file starts with: the command that made it (`python -m module` and this
    process's arguments), the machine, the software versions and the git commit."""
    return {
        "command": " ".join([f"python -m {module}", *sys.argv[1:]]),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_state(),
    }


def write_json(result: dict, out: Path | None, echo: bool = True) -> None:
    """Print `result` as JSON (unless `echo` is False), and write it to `out` if one is given."""
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def machine_info() -> dict:
    """CPU model, cores, RAM and OS of this machine, and its NVIDIA GPUs if any (on a Mac the
    chip is the CPU's name)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(ram_bytes() / 1e9, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": _nvidia_gpus(),
    }


def _nvidia_gpus() -> str | None:
    """`nvidia-smi`'s name, memory and driver of each GPU, or None where there is none."""
    gpus = _nvidia_smi("name,memory.total,driver_version", "csv,noheader")
    return "; ".join(gpus) if gpus else None


def gpu_memory_bytes() -> int | None:
    """The first NVIDIA GPU's memory (`nvidia-smi`), bytes; None where there is none."""
    gpus = _nvidia_smi("memory.total", "csv,noheader,nounits")  # MiB
    try:
        return int(gpus[0]) * 2**20 if gpus else None
    except ValueError:
        return None


def _nvidia_smi(fields: str, form: str) -> list[str] | None:
    """`nvidia-smi`'s line of `fields` for each GPU, or None where it cannot say."""
    query = ["nvidia-smi", f"--query-gpu={fields}", f"--format={form}"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return gpus if done.returncode == 0 and gpus else None


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

    def run(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:  # no git on this machine
            return None

    def git(*args: str) -> str:
        result = run(*args)
        return result.stdout.strip() if result is not None and result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    for manifest in [*sorted(REPO.glob(".gpu/upload-*/manifest.json")), STASH / MANIFEST]:
        if not manifest.is_file():
            continue
        prepared = json.loads(manifest.read_text())
        contained = run("merge-base", "--is-ancestor", str(prepared.get("commit")), "HEAD")
        if commit and contained is not None and contained.returncode == 0:
            break  # prepared here earlier: this checkout's own git is newer or the same
        # No git here, or a copy of .git older than the files beside it (a lent machine got the
        # checkout's files with the .git its session started with): the commit prepared is it.
        why = "no git here" if not commit else f"this copy's .git says {commit[:12]}"
        return {
            "commit": prepared.get("commit"),
            "dirty": prepared.get("dirty"),
            "from": f"{manifest} ({why}): the checkout the wheels were prepared in",
        }
    if commit:
        return {"commit": commit, "dirty": bool(git("status", "--porcelain"))}
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


def ram_bytes() -> int:
    """This machine's physical memory, bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
