"""Weight loading: every key and shape accounted for, clear errors for broken folders."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import TOKENS, build_ids, pixels, save_checkpoint, tiny_hf_model

from mimo_mlx import MimoError, load_model
from mimo_mlx.model.checkpoint import read_safetensors
from mimo_mlx.model.weights import HF, MLX_VLM, sanitize


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return save_checkpoint(tiny_hf_model(seed=11), tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "model")


def edit_weights(folder, change):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_weight_is_named(folder):
    edit_weights(folder, lambda t: t.pop("visual.blocks.2.attn.qkv.bias"))
    with pytest.raises(MimoError, match=r"missing: visual\.blocks\.2\.attn\.qkv\.bias"):
        load_model(folder)


def test_unexpected_weight_is_named(folder):
    edit_weights(
        folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)})
    )
    with pytest.raises(MimoError, match=r"unexpected: model\.layers\.0\.mlp\.extra\.weight"):
        load_model(folder)


def test_wrong_shape_is_named(folder):
    edit_weights(folder, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(MimoError, match=r"wrong shape: model\.norm\.weight \(63,\)"):
        load_model(folder)


def test_pickle_only_checkpoint_is_refused_unread(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(MimoError, match="never loads pickles"):
        load_model(folder)


def test_missing_shard_listed_in_the_index(folder):
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MimoError, match="missing weight shards.*model-00001-of-00002"):
        load_model(folder)


def test_truncated_shard(folder):
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(MimoError, match="is damaged or incomplete .*download it again"):
        load_model(folder)


def test_a_damaged_folder_of_our_converter_is_converted_again(folder):
    """What to do depends on where the folder came from: mimo-mlx convert wrote this one."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mimo_mlx": {"version": "0.1.0"}}))
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(MimoError, match="written by mimo-mlx convert: convert it again") as caught:
        load_model(folder)
    assert "download" not in str(caught.value)


def test_a_weight_file_this_user_may_not_read_says_so(folder, monkeypatch):
    """transformers saves model.safetensors with mode 0600: another user cannot read it. (The
    refusal is simulated: the tests may run as root, who reads anything.)"""
    file = folder / "model.safetensors"
    file.chmod(0o600)
    opened = type(file).open

    def refused(path, *args, **kwargs):
        if path == file:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(type(file), "open", refused)
    with pytest.raises(MimoError, match=r"cannot read .*no permission to read it \(mode 600\)"):
        load_model(folder)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda f: shutil.rmtree(f), "is not a folder"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_not_a_model_folder(folder, setup, message):
    setup(folder)
    with pytest.raises(MimoError, match=message):
        load_model(folder)


def test_image_token_count_mismatch(pristine):
    model = load_model(pristine)
    rng = np.random.default_rng(0)
    ids = build_ids([("text", 3), ("image", (1, 4, 6)), ("text", 2)], rng)
    ids[0, 5] = 7  # one pad fewer than the image's 6 features
    grid = np.array([[1, 4, 6]])
    with pytest.raises(MimoError, match="5 image placeholder tokens but the image grids give 6"):
        model.prepare_prompt(ids, pixel_values=pixels(grid, rng), image_grid_thw=grid)


def test_pixels_and_grid_must_agree(pristine):
    model = load_model(pristine)
    ids = build_ids([("image", (1, 4, 6))], np.random.default_rng(0))
    with pytest.raises(MimoError, match="pixel_values has 10 patches"):
        model.prepare_prompt(
            ids, pixel_values=np.zeros((10, 1176), np.float32), image_grid_thw=np.array([[1, 4, 6]])
        )


def test_sanitize_is_idempotent_and_accounts_for_every_tensor(pristine):
    raw = read_safetensors(pristine)
    once = sanitize(raw, HF, tie_word_embeddings=False)
    assert sanitize(once, HF, tie_word_embeddings=False).keys() == once.keys()
    assert all(mx.array_equal(sanitize(once, HF, False)[k], v) for k, v in once.items())
    assert len(once) == len(raw)
    assert once["visual.patch_embed.proj.weight"].shape == (32, 1176)


def test_mlx_vlm_names_and_conv_layout_map_to_ours(pristine):
    raw = read_safetensors(pristine)
    renamed = {}
    for key, value in raw.items():
        if key.startswith("visual."):
            key = "vision_tower." + key[len("visual.") :]
            if key.endswith("patch_embed.proj.weight"):
                value = value.transpose(0, 2, 3, 4, 1)  # MLX Conv3d layout (out, T, P, P, C)
        elif key.startswith("lm_head."):
            key = "language_model." + key
        else:
            key = "language_model." + key
        renamed[key] = value
    ours = sanitize(raw, HF, False)
    theirs = sanitize(renamed, MLX_VLM, False)
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]) for k in ours)


def test_dtype_cast_on_load(pristine):
    model = load_model(pristine, dtype="float16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    assert TOKENS["image_token_id"] == model.config.image_token_id


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_an_unreadable_config_is_one_line(tmp_path, monkeypatch, name):
    """Permission denied (simulated: the tests run as root, for whom chmod changes nothing)."""
    from pathlib import Path

    from test_generate import write_model_folder

    import mimo_mlx

    folder = write_model_folder(tmp_path / "model", seed=5)
    original = Path.read_text

    def refuse(self, *args, **kwargs):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(MimoError, match=f"cannot read .*{name}: Permission denied"):
        mimo_mlx.load(folder)
