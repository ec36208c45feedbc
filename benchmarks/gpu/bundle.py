"""Wheels as one byte stream cut into upload-sized parts, and put back together (standard library
only: it runs on the offline machine before anything is installed).

The prepared folder (`.gpu/` in the checkout, git-ignored) holds `upload-N/` for N = 1..uploads:
each is what one command carries, its part of the stream (`part-N`) and a copy of the manifest.
The manifest names every wheel (size, SHA-256, offset in the stream), every part (size, SHA-256)
and what was prepared (versions, Python, the commit of the checkout). On the machine, parts wait
in STASH (outside the checkout, which each command may replace) until all have come.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
STASH = Path("/tmp/mimo-mlx-gpu")
UPLOAD_BYTES = 60_000_000  # of one command's ~64 MiB: room left for the checkout itself
CHUNK = 1 << 20


class BundleError(Exception):
    """Something is missing or damaged; the message says what and what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def pack(wheels: list[Path], out: Path, upload_bytes: int, about: dict) -> dict:
    """Write `wheels` into `out`/upload-N/part-N (each at most `upload_bytes`) with the manifest
    in each upload folder; returns the manifest. `about` is recorded as it is."""
    if out.exists():
        shutil.rmtree(out)
    wheels, entries, total = sorted(wheels), [], 0
    for wheel in wheels:
        size = wheel.stat().st_size
        entries.append({"name": wheel.name, "size": size, "sha256": sha256(wheel), "offset": total})
        total += size
    count = max(1, -(-total // upload_bytes))
    parts = []
    handles = [open(wheel, "rb") for wheel in wheels]
    try:
        reader = _Concatenated(handles)
        for number in range(1, count + 1):
            path = out / f"upload-{number}" / f"part-{number}"
            path.parent.mkdir(parents=True)
            _copy(reader, path, min(upload_bytes, total - upload_bytes * (number - 1)))
            parts.append(
                {"name": path.name, "upload": number, "size": path.stat().st_size}
                | {"sha256": sha256(path)}
            )
    finally:
        for handle in handles:
            handle.close()
    manifest = {**about, "wheels": entries, "parts": parts, "total_bytes": total}
    for number in range(1, count + 1):
        (out / f"upload-{number}" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _copy(reader: _Concatenated, path: Path, count: int) -> None:
    """The next `count` bytes of `reader` into a new file `path`."""
    with open(path, "wb") as handle:
        while count:
            block = reader.read(min(count, CHUNK))
            if not block:
                raise BundleError(f"the input ends {count} bytes short of {path.name}")
            handle.write(block)
            count -= len(block)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"cannot read {path} ({err}): prepare the uploads again") from None


def stash(prepared: Path, stash_dir: Path = STASH) -> tuple[dict, list[str]]:
    """Copy every part found under `prepared` (upload-N folders) into `stash_dir`, checked;
    returns the manifest and the names of the parts now waiting there."""
    uploads = sorted(prepared.glob("upload-*"))
    if not uploads and not (stash_dir / MANIFEST).is_file():
        raise BundleError(f"no {prepared}/upload-* here: was the upload carried with the command?")
    manifest = read_manifest(uploads[0] if uploads else stash_dir)
    if (stash_dir / MANIFEST).is_file() and read_manifest(stash_dir)["parts"] != manifest["parts"]:
        shutil.rmtree(stash_dir)  # parts of an earlier preparation: never mix them
    stash_dir.mkdir(parents=True, exist_ok=True)
    for upload in uploads:
        mine = read_manifest(upload)
        if mine["parts"] != manifest["parts"]:
            raise BundleError(f"{upload} is from another preparation: prepare and upload again")
        for part in manifest["parts"]:
            source = upload / part["name"]
            if source.is_file():
                _check(source, part)
                shutil.copyfile(source, stash_dir / part["name"])
    (stash_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    waiting = [p["name"] for p in manifest["parts"] if (stash_dir / p["name"]).is_file()]
    return manifest, waiting


def unpack(stash_dir: Path, into: Path) -> list[Path]:
    """The wheels rebuilt from the parts in `stash_dir` into `into`, every SHA-256 checked."""
    manifest = read_manifest(stash_dir)
    missing = [p for p in manifest["parts"] if not (stash_dir / p["name"]).is_file()]
    if missing:
        names = ", ".join(f"{p['name']} (upload {p['upload']})" for p in missing)
        raise BundleError(
            f"missing {names} of {len(manifest['parts'])} parts in {stash_dir}: run "
            "`python3 -m benchmarks.gpu.stash` with each earlier upload on this same machine "
            "first (a machine that went cold between the commands starts empty)"
        )
    for part in manifest["parts"]:
        _check(stash_dir / part["name"], part)
    into.mkdir(parents=True, exist_ok=True)
    handles = [open(stash_dir / p["name"], "rb") for p in manifest["parts"]]
    wheels = []
    try:
        reader = _Concatenated(handles)
        for wheel in manifest["wheels"]:
            path = into / wheel["name"]
            _copy(reader, path, wheel["size"])
            _check(path, wheel)
            wheels.append(path)
    finally:
        for handle in handles:
            handle.close()
    return wheels


class _Concatenated:
    """read(n) over several open files, one after another."""

    def __init__(self, handles: list) -> None:
        self.handles = list(handles)

    def read(self, count: int) -> bytes:
        while self.handles:
            block = self.handles[0].read(count)
            if block:
                return block
            self.handles.pop(0)
        return b""


def _check(path: Path, entry: dict) -> None:
    size = path.stat().st_size
    if size != entry["size"] or sha256(path) != entry["sha256"]:
        raise BundleError(
            f"{path} is damaged ({size} bytes, expected {entry['size']} with SHA-256 "
            f"{entry['sha256'][:12]}...): carry its upload again"
        )
