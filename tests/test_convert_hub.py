"""The hub path: a repo id resolved through huggingface_hub's real cache code, offline.

Each test builds the cache layout huggingface_hub itself writes (models--org--name/{blobs,
snapshots/<commit>, refs/<branch>}, optionally trees/<commit>.json) in tmp_path. Nothing of ours or
theirs is mocked: HF_HUB_OFFLINE and HF_HUB_CACHE are set as a user would set them, for a real
`mimo-mlx` process, or on huggingface_hub's constants (read from the environment at import) in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from convert_helpers import leftovers, make_source, stored
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert, hub

REPO = "tiny-org/mimo-tiny"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs=("main",)):
    """One commit of `repo` in the cache: content-addressed blobs, a snapshot of symlinks, refs."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return storage


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return make_source(root / "a", seed=7), make_source(root / "b", seed=8)


@pytest.fixture
def cache(tmp_path, checkpoints):
    cache = tmp_path / "hf" / "hub"
    add_snapshot(cache, REPO, COMMIT_A, folder_files(checkpoints[0]))
    add_snapshot(cache, REPO, COMMIT_B, folder_files(checkpoints[1]), refs=("v2",))
    return cache


@pytest.fixture
def offline(cache, monkeypatch):
    """In-process: what HF_HUB_OFFLINE=1 HF_HUB_CACHE=... would have set at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_repo_id_through_a_real_process(cache, checkpoints, tmp_path):
    env = dict(os.environ, HF_HOME=str(cache.parent), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from mimo_mlx.cli.main import main; main()", "convert"]
    args = ["--hf-path", REPO, "--mlx-path", str(out)]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Wrote {out}:") and "decoder" in done.stdout
    assert "Converting" in done.stderr  # the progress bar (only its label when not a terminal)
    section = json.loads((out / "config.json").read_text())["mimo_mlx"]
    assert section["source"] == REPO and section["revision"] == COMMIT_A
    local = tmp_path / "local"
    convert(hf_path=str(checkpoints[0]), mlx_path=str(local))
    ours, reference = stored(out), stored(local)
    assert ours.keys() == reference.keys()
    assert all(mx.array_equal(ours[k], reference[k]) for k in ours)


@pytest.mark.parametrize("revision, commit", [("v2", COMMIT_B), (COMMIT_A, COMMIT_A)])
def test_revision_is_resolved_and_recorded(offline, tmp_path, revision, commit):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", REPO, "--revision", revision, "--mlx-path", str(out)]
    )
    assert result.exit_code == 0, result.output
    section = json.loads((out / "config.json").read_text())["mimo_mlx"]
    assert section["revision"] == commit
    assert f"at revision `{commit}`" in (out / "README.md").read_text()


def run_failing(tmp_path, *args):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "--mlx-path", str(out), *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert leftovers(tmp_path, "out") == []
    return errors[0]


def test_repo_not_in_the_cache(offline, tmp_path):
    error = run_failing(tmp_path, "--hf-path", "tiny-org/elsewhere")
    assert "tiny-org/elsewhere is not in the Hugging Face cache" in error
    assert "the hub cannot be reached (HF_HUB_OFFLINE is set" in error


def test_unknown_revision(offline, tmp_path):
    error = run_failing(tmp_path, "--hf-path", REPO, "--revision", "nope")
    assert f"{REPO} at revision nope is not in the Hugging Face cache" in error


def test_partly_cached_snapshot(offline, tmp_path, checkpoints):
    # huggingface_hub records each commit's file listing; a shard in it but not on disk means an
    # interrupted download, which it reports rather than handing back a partial folder.
    files = folder_files(checkpoints[0])
    shard = files.pop("model.safetensors")
    storage = add_snapshot(offline, "tiny-org/partial", COMMIT_A, files)
    listing = {name: {"size": len(data), "blob_id": "0" * 40} for name, data in files.items()}
    listing["model.safetensors"] = {"size": len(shard), "blob_id": "1" * 40}
    (storage / "trees").mkdir()
    (storage / "trees" / f"{COMMIT_A}.json").write_text(
        json.dumps({"format_version": 1, "files": listing})
    )
    error = run_failing(tmp_path, "--hf-path", "tiny-org/partial")
    assert "tiny-org/partial is not in the Hugging Face cache, or only partly" in error


def test_missing_shard_in_the_cache(offline, tmp_path, checkpoints):
    files = folder_files(checkpoints[0])
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    ).encode()
    add_snapshot(offline, "tiny-org/noshard", COMMIT_A, files)
    error = run_failing(tmp_path, "--hf-path", "tiny-org/noshard")
    assert "missing weight shards" in error and "model-00002-of-00002.safetensors" in error


def test_not_a_qwen2_5_vl_repo_is_refused_from_its_config(offline, tmp_path):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    add_snapshot(offline, "tiny-org/llama", COMMIT_A, {"config.json": json.dumps(config).encode()})
    error = run_failing(tmp_path, "--hf-path", "tiny-org/llama")
    assert "model_type is 'llama'" in error and "Qwen2.5-VL" in error


def test_pickle_only_repo(offline, tmp_path, checkpoints):
    files = {k: v for k, v in folder_files(checkpoints[0]).items() if k != "model.safetensors"}
    files["pytorch_model.bin"] = pickle.dumps({"never": "loaded"})
    add_snapshot(offline, "tiny-org/pickled", COMMIT_A, files)
    error = run_failing(tmp_path, "--hf-path", "tiny-org/pickled")
    assert "never downloads or loads pickled PyTorch checkpoints" in error


def test_download_patterns_fetch_only_what_is_needed():
    """Our allow-patterns through huggingface_hub's own filter, on MiMo-VL-7B-RL's file list."""
    repo_files = [
        ".gitattributes",
        "README.md",
        "added_tokens.json",
        "chat_template.json",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "pytorch_model-00001-of-00002.bin",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "figures/benchmark.png",
    ]
    small = set(filter_repo_objects(repo_files, allow_patterns=list(hub.SMALL_FILES)))
    assert small == set(repo_files) - {
        ".gitattributes",
        "README.md",
        "pytorch_model-00001-of-00002.bin",
        "figures/benchmark.png",
    } - {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(filter_repo_objects(repo_files, allow_patterns=shards)) == shards
