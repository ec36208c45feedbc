"""Preparing the wheels for an offline GPU machine, and putting them back together there.

No wheel is downloaded: stand-in wheels (random bytes under wheel names, the CUDA one the largest,
as MLX's is) go through `benchmarks.gpu.prepare --wheels`; each upload must fit its budget and the
parts must rebuild the very same files, on a "machine" that gets the uploads one command at a
time. `install --dry-run` prints what it would install and installs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import install, prepare
from benchmarks.gpu.bundle import BundleError, sha256, stash, unpack

REPO = Path(__file__).resolve().parent.parent

REPO = Path(__file__).resolve().parent.parent
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
SIZES = {  # bytes: the CUDA build is larger than one upload
    "mlx-0.32.4-cp312-cp312-manylinux_2_35_x86_64.whl": 700_000,
    "mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl": 4_500_000,
    "mlx_vlm-0.7.10-py3-none-any.whl": 300_000,
    "setuptools-80.9.0-py3-none-any.whl": 100_000,
}
BUDGET = 3_000_000


@pytest.fixture
def wheels(tmp_path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, size in SIZES.items():
        (folder / name).write_bytes(os.urandom(size))
    return folder


@pytest.fixture
def prepared(tmp_path, wheels, capsys) -> tuple[Path, str]:
    out = tmp_path / ".gpu"
    prepare.main(
        ["--wheels", str(wheels), "--out", str(out), "--upload-bytes", str(BUDGET),
         "--python", PYTHON]
    )  # fmt: skip
    return out, capsys.readouterr().out


def test_each_upload_fits_and_the_manifest_says_what_is_where(prepared, wheels):
    out, printed = prepared
    total = sum(SIZES.values())
    uploads = sorted(out.iterdir())
    assert [u.name for u in uploads] == ["upload-1", "upload-2"]  # 5.6 MB in 3 MB uploads
    for number, upload in enumerate(uploads, start=1):
        part = upload / f"part-{number}"
        assert sorted(p.name for p in upload.iterdir()) == ["manifest.json", part.name]
        assert part.stat().st_size == (BUDGET if number == 1 else total - BUDGET)
    manifest = json.loads((uploads[0] / "manifest.json").read_text())
    assert manifest == json.loads((uploads[1] / "manifest.json").read_text())
    assert manifest["total_bytes"] == total and manifest["python"] == PYTHON
    assert [w["name"] for w in manifest["wheels"]] == sorted(SIZES)
    for wheel in manifest["wheels"]:
        assert wheel["sha256"] == sha256(wheels / wheel["name"])
    assert manifest["commit"] and isinstance(manifest["dirty"], bool)
    lines = printed.splitlines()
    assert "carry .gpu/upload-1 (3.0 MB): python3 -m benchmarks.gpu.stash" in lines[2]
    assert "carry .gpu/upload-2" in lines[3] and "benchmarks.gpu.install && python3 -m " in lines[3]
    assert "--scale full --time-budget" in lines[3]
    assert "install && bash benchmarks/gpu/everything.sh" in lines[4]


def test_the_parts_rebuild_the_same_wheels_one_upload_at_a_time(prepared, wheels, tmp_path):
    out, _ = prepared
    machine, held = tmp_path / "machine" / ".gpu", tmp_path / "stash"
    machine.mkdir(parents=True)
    shutil.copytree(out / "upload-1", machine / "upload-1")  # the first command's files
    _, waiting = stash(machine, held)
    assert waiting == ["part-1"]
    with pytest.raises(BundleError, match=r"missing part-2 \(upload 2\) of 2 parts"):
        unpack(held, tmp_path / "rebuilt")
    shutil.rmtree(machine / "upload-1")  # the next command's checkout holds only its own upload
    shutil.copytree(out / "upload-2", machine / "upload-2")
    _, waiting = stash(machine, held)
    assert waiting == ["part-1", "part-2"]
    rebuilt = unpack(held, tmp_path / "rebuilt")
    assert [w.name for w in rebuilt] == sorted(SIZES)
    for wheel in rebuilt:
        assert wheel.read_bytes() == (wheels / wheel.name).read_bytes()


def test_a_damaged_part_is_refused(prepared, tmp_path):
    out, _ = prepared
    part = out / "upload-2" / "part-2"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="part-2 is damaged.*carry its upload again"):
        stash(out, tmp_path / "stash")


def test_install_dry_run_checks_and_prints_without_installing(prepared, tmp_path, capsys):
    out, _ = prepared
    install.main(["--prepared", str(out), "--stash", str(tmp_path / "stash"), "--dry-run"])
    printed = capsys.readouterr().out
    assert "install: 4 wheels rebuilt and checked" in printed
    commands = [line for line in printed.splitlines() if line.startswith("would run: ")]
    assert len(commands) in (2, 3)  # setuptools first only where this Python's is too old
    assert "--no-index --no-deps --no-compile" in commands[-2] and "mlx_cuda_13" in commands[-2]
    assert "setuptools" not in commands[-2]
    assert commands[-1].endswith(f"--no-index --no-deps --no-build-isolation -e {REPO}")


def test_install_says_what_is_missing_before_anything_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.install", "--prepared", str(tmp_path / "none"),
         "--stash", str(tmp_path / "stash"), "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "was the upload carried with the command?" in done.stderr


def test_a_stash_of_an_earlier_preparation_is_not_mixed_in(prepared, wheels, tmp_path):
    out, _ = prepared
    held = tmp_path / "stash"
    stash(out, held)
    (wheels / "mlx_vlm-0.7.10-py3-none-any.whl").write_bytes(os.urandom(300_000))
    again = tmp_path / "again"
    prepare.main(
        ["--wheels", str(wheels), "--out", str(again), "--upload-bytes", str(BUDGET),
         "--python", PYTHON]
    )  # fmt: skip
    _, waiting = stash(again, held)  # the new preparation, both uploads
    assert waiting == ["part-1", "part-2"]
    rebuilt = {w.name: w for w in unpack(held, tmp_path / "rebuilt")}
    name = "mlx_vlm-0.7.10-py3-none-any.whl"
    assert rebuilt[name].read_bytes() == (wheels / name).read_bytes()


def test_results_name_the_prepared_commit_where_there_is_no_git(prepared, tmp_path, monkeypatch):
    from benchmarks import machine

    out, _ = prepared
    copy = tmp_path / "copy"  # a copy of the checkout, without .git, as the machine gets it
    shutil.copytree(out, copy / ".gpu")
    monkeypatch.setattr(machine, "REPO", copy)
    monkeypatch.setattr(machine, "STASH", tmp_path / "no-stash")
    state = machine.git_state()
    manifest = json.loads((out / "upload-1" / "manifest.json").read_text())
    assert state["commit"] == manifest["commit"] and state["dirty"] == manifest["dirty"]
    assert "no git here" in state["from"]


def test_results_name_the_prepared_commit_where_the_copy_of_git_is_stale(
    prepared, tmp_path, monkeypatch
):
    """A lent machine got the checkout's files with the .git its session started with (the H200
    run's JSON said 187830b, dirty): the prepared commit wins, and says why."""
    from benchmarks import machine

    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy / ".gpu")
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(
        ["git", "-C", str(copy), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
         "--allow-empty", "-m", "older"],
        check=True,
    )  # fmt: skip
    monkeypatch.setattr(machine, "REPO", copy)
    monkeypatch.setattr(machine, "STASH", tmp_path / "no-stash")
    state = machine.git_state()
    manifest = json.loads((out / "upload-1" / "manifest.json").read_text())
    assert state["commit"] == manifest["commit"] and "this copy's .git says" in state["from"]


def test_a_checkout_that_prepared_earlier_names_its_own_commit(prepared, tmp_path, monkeypatch):
    """Here, where the wheels were prepared and work went on, git's HEAD is the commit measured."""
    from benchmarks import machine

    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy / ".gpu")
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty"]
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), *commit, "-m", "prepared here"], check=True)
    first = subprocess.run(
        ["git", "-C", str(copy), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for manifest in (copy / ".gpu").glob("upload-*/manifest.json"):
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "commit": first}))
    subprocess.run(["git", "-C", str(copy), *commit, "-m", "later work"], check=True)
    monkeypatch.setattr(machine, "REPO", copy)
    monkeypatch.setattr(machine, "STASH", tmp_path / "no-stash")
    state = machine.git_state()
    assert state["commit"] != first and "from" not in state


def test_the_verdict_reads_the_published_h200_run(tmp_path):
    """`benchmarks.gpu.verdict` on the H200 files as published: the figures the README quotes,
    each against its issue's target."""
    from benchmarks.gpu.verdict import verdict

    rows = {r["check"]: r for r in verdict(REPO / "benchmarks/published/h200-cuda-full")}
    expect = {
        "vision 1344x1344: peak above the tower's weights": ("1.34 GB", "NOT met"),
        "vision 1024x1024: time against one lazy graph": ("75.4 / 51.6 ms = 1.46x", "NOT met"),
        "128-frame video: peak above the tower's weights": ("1.03 GB", "met"),
        ".: whole 4-bit generation, peak memory against mlx-vlm": ("6.32 / 11.80 GB", "met"),
        "lookup-4bit: prompt lookup 4bit, copy task, against plain decoding": ("0.90x", "NOT met"),
        ".: prompt lookup float, copy task, against plain decoding": ("1.30x", "met"),
    }
    for check, (measured, found) in expect.items():
        assert (rows[check]["measured"], rows[check]["verdict"]) == (measured, found), check
    (whole,) = [r for k, r in rows.items() if k.startswith(".: harness time")]
    assert whole["verdict"] == "NOT met" and "5 measurements cut" in whole["measured"]
    partial = rows["lookup-4bit: harness time, lookup (no kernel bounds)"]
    assert partial["verdict"] == "not measured"  # one scenario is not the whole harness
    assert all(r["verdict"] == "not measured" for r in verdict(tmp_path))  # nothing there
