"""The converter on tiny random checkpoints: layouts, output format, options, logits, streaming."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_helpers import (
    LOGIT_BOUNDS,
    SIDE_FILES,
    edit_tensors,
    leftovers,
    logits,
    make_source,
    relative_rms,
    sample_inputs,
    split_shards,
    stored,
)
from safetensors import safe_open

from mimo_mlx import load_model
from mimo_mlx.convert import convert, pipeline
from mimo_mlx.convert.report import format_size, model_card, sized_model_card

LAYOUTS = [
    ("text_config", "model"),
    ("text_config", "language_model"),
    ("root", "model"),
    ("root", "language_model"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture(scope="module")
def inputs():
    return sample_inputs()


@pytest.fixture(scope="module")
def float_logits(source, inputs):
    return logits(source, inputs)


@pytest.fixture(scope="module")
def default_output(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tiny-4bit"
    report = convert(hf_path=str(source), mlx_path=str(out))
    return out, report


def test_default_output_folder(default_output, source):
    out, report = default_output
    files = {p.name for p in out.iterdir()}
    assert files == SIDE_FILES | {
        "config.json",
        "README.md",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
    }
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("quantization", "mimo_mlx")} == original
    # Decoder, vision blocks and merger at 4-bit g64; only the 1176-wide patch embedding stays float.
    assert config["quantization"] == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "visual.patch_embed.proj": False,
    }
    section = config["mimo_mlx"]
    assert section["format"] == 1
    assert section["source"] == str(source.resolve()) and section["revision"] is None
    assert section["quantization"]["float_modules"] == ["visual.patch_embed.proj"]
    assert set(section["quantization"]["error"]) == {"vision", "merger", "decoder"}
    assert report.bits_per_weight == pytest.approx(section["quantization"]["bits_per_weight"], 1e-3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored(out))


def test_default_dtypes_and_quantized_modules(default_output):
    out, _ = default_output
    with safe_open(out / "model-00001-of-00001.safetensors", "np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # The float type defaults to the checkpoint's own: float32 for this tiny one.
    assert dtypes["visual.patch_embed.proj.weight"] == "F32"
    assert dtypes["model.norm.weight"] == "F32" and dtypes["visual.blocks.0.attn.qkv.bias"] == "F32"
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "U32"
    assert dtypes["model.layers.0.mlp.up_proj.scales"] == "F32"
    model = load_model(out)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    for module in (
        model.lm_head,
        model.model.layers[1].self_attn.q_proj,
        model.model.layers[1].mlp.down_proj,
        model.visual.blocks[0].attn.qkv,
        model.visual.blocks[3].mlp.down_proj,
        model.visual.merger.mlp[0],
        model.visual.merger.mlp[2],
    ):
        assert isinstance(module, nn.QuantizedLinear) and module.bits == 4
    assert type(model.visual.patch_embed.proj) is nn.Linear
    assert model.visual.patch_embed.proj.weight.shape == (64, 1176)


def test_summary_lines(default_output):
    _, report = default_output
    lines = report.lines()
    assert "bits per weight" in lines[0] and "1 shard" in lines[0]
    for part in ("vision", "merger", "decoder"):
        stats = report.errors[part]
        assert 0 < stats.mean < stats.max < 0.2
        assert any(line.split()[0] == part and "4-bit g64" in line for line in lines)


def test_a_part_too_narrow_for_the_groups_is_said_to_be_float(tmp_path):
    """The narrow tiny model: no vision layer splits into groups of 64, and two decoder layers
    (96 wide) do not either. The card and the summary say what is stored, not what was asked."""
    source = make_source(tmp_path / "narrow", wide=False)
    out = tmp_path / "narrow-4bit"
    report = convert(hf_path=str(source), mlx_path=str(out))
    card = (out / "README.md").read_text()
    assert "| vision | float32 (too narrow for 4-bit g64) |" in card
    assert "| merger | 4-bit g64 |" in card
    assert "| decoder | 4-bit g64, 2 layer(s) in float32 (too narrow) |" in card
    lines = report.lines()
    assert "  vision   float32 (too narrow for 4-bit g64): not quantized" in lines
    model = load_model(out)
    assert type(model.visual.blocks[0].attn.qkv) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear  # 96 inputs
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)


def stated_size(card: str) -> tuple[str, int]:
    """The size a model card states: as printed ("1.23 MB") and in bytes."""
    match = re.search(
        r"In all: (\d+(?:\.\d+)? [kMG]?B)\s+\(([\d,]+) bytes, this card included\)", card
    )
    assert match, card
    return match[1], int(match[2].replace(",", ""))


def test_model_card_states_the_printed_size(default_output):
    out, report = default_output
    on_disk = sum(p.stat().st_size for p in out.iterdir())
    printed = re.match(rf"Wrote {re.escape(str(out))}: (.+?) in 1 shard", report.lines()[0])[1]
    assert stated_size((out / "README.md").read_text()) == (printed, on_disk)
    assert report.folder_bytes == on_disk


@pytest.mark.parametrize("edge", [10**3, 10**6, 10**7, 10**9])
def test_model_card_size_is_exact_at_unit_edges(default_output, edge):
    """Where a larger size prints shorter ("999.99 kB" -> "1.00 MB", or one more digit), the card
    must still state exactly the folder's size with itself included."""
    _, report = default_output
    length = len(model_card(report, edge).encode())
    for other in range(max(0, edge - length - 40), edge - length + 40):
        card = sized_model_card(report, other)
        assert stated_size(card.decode()) == (format_size(other + len(card)), other + len(card))


def test_quantized_logits_within_stated_bound(
    default_output, source, inputs, float_logits, tmp_path
):
    four = relative_rms(logits(default_output[0], inputs), float_logits)
    convert(hf_path=str(source), mlx_path=str(tmp_path / "q8"), q_bits=8)
    q8 = logits(tmp_path / "q8", inputs)
    eight = relative_rms(q8, float_logits)
    assert eight < LOGIT_BOUNDS[8]
    assert (q8.argmax(-1) == float_logits.argmax(-1)).all()  # 8-bit keeps every greedy token
    assert four < LOGIT_BOUNDS[4]
    assert eight < four / 4


def test_no_quantize_float32_is_exact(source, inputs, float_logits, tmp_path):
    out = tmp_path / "f32"
    report = convert(hf_path=str(source), mlx_path=str(out), no_quantize=True, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert config["mimo_mlx"]["quantization"]["parts"] == dict.fromkeys(
        ("vision", "merger", "decoder"), "float"
    )
    assert report.bits_per_weight == pytest.approx(32)
    np.testing.assert_allclose(logits(out, inputs), float_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config_layout, key_layout", LAYOUTS[1:])
def test_every_layout_converts_to_the_same_weights(
    default_output, config_layout, key_layout, tmp_path
):
    src = make_source(tmp_path / "src", config_layout=config_layout, key_layout=key_layout)
    out = tmp_path / "out"
    convert(hf_path=str(src), mlx_path=str(out))
    reference, ours = stored(default_output[0]), stored(out)
    assert reference.keys() == ours.keys()
    assert all(mx.array_equal(reference[k], ours[k]) for k in ours)
    load_model(out)


def test_tied_head_and_ignored_buffers(tmp_path, inputs):
    src = make_source(tmp_path / "src", tied=True)
    edit_tensors(  # a buffer some exports carry: no learned weight, dropped like the loader does
        src / "model.safetensors",
        lambda t: t.update({"model.rotary_emb.inv_freq": np.ones(8, np.float32)}),
    )
    out = tmp_path / "out"
    convert(hf_path=str(src), mlx_path=str(out), q_bits=8)
    names = stored(out)
    assert not any(k.startswith("lm_head") or "inv_freq" in k for k in names)
    model = load_model(out)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    float_logits = logits(src, inputs)
    assert relative_rms(logits(out, inputs), float_logits) < LOGIT_BOUNDS[8]


def test_per_part_options(source, tmp_path):
    out = tmp_path / "mixed"
    convert(
        hf_path=str(source),
        mlx_path=str(out),
        q_bits=3,
        q_group_size=32,
        vision_bits=8,
        merger_bits="float",
        dtype="bfloat16",
    )
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: quant[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 32,
        "bits": 3,
        "mode": "affine",
    }
    eight = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert quant["visual.blocks.2.mlp.gate_proj"] == eight
    assert quant["visual.merger.mlp.0"] is False and quant["visual.merger.mlp.2"] is False
    assert quant["visual.patch_embed.proj"] is False
    assert not any(k.startswith("model.") or k == "lm_head" for k in quant)
    with safe_open(out / "model-00001-of-00001.safetensors", "np") as f:
        assert f.get_slice("visual.merger.mlp.0.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.self_attn.o_proj.scales").get_dtype() == "BF16"
    model = load_model(out, dtype="float32")
    assert model.model.layers[0].self_attn.o_proj.bits == 3
    assert model.visual.blocks[2].mlp.gate_proj.bits == 8
    assert type(model.visual.merger.mlp[0]) is nn.Linear


def test_widths_not_divisible_by_the_group_stay_float(tmp_path):
    # The default tiny model: vision width 32, vision MLP 48, decoder MLP 96; group 64 fits only
    # the decoder's 64-wide inputs and the merger's 128.
    src = make_source(tmp_path / "src", wide=False)
    out = tmp_path / "out"
    convert(hf_path=str(src), mlx_path=str(out))
    quant = json.loads((out / "config.json").read_text())["quantization"]
    floats = sorted(k for k, v in quant.items() if v is False)
    assert floats == sorted(
        ["visual.patch_embed.proj"]
        + [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
        + [
            f"visual.blocks.{i}.{m}"
            for i in range(4)
            for m in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        ]
    )
    model = load_model(out)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(model.visual.merger.mlp[2], nn.QuantizedLinear)


def test_blocks_and_shards_do_not_change_the_result(default_output, source, tmp_path, monkeypatch):
    split = make_source(tmp_path / "src")
    split_shards(split, parts=3)
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 1000)  # many blocks per tensor, one row minimum
    out = tmp_path / "out"
    report = convert(hf_path=str(split), mlx_path=str(out), max_shard_bytes=40_000)
    assert report.shards > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-{i:05d}-of-{report.shards:05d}.safetensors" for i in range(1, report.shards + 1)
    ]
    reference, ours = stored(default_output[0]), stored(out)
    assert reference.keys() == ours.keys()
    assert all(mx.array_equal(reference[k], ours[k]) for k in ours)


def test_existing_output_is_refused_unless_forced(source, tmp_path):
    out = tmp_path / "out"
    convert(hf_path=str(source), mlx_path=str(out))
    with pytest.raises(Exception, match="already exists; pass --force"):
        convert(hf_path=str(source), mlx_path=str(out))
    convert(hf_path=str(source), mlx_path=str(out), force=True, q_bits=8)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert leftovers(tmp_path, "out") == ["out"]
    (out / "keep.txt").write_text("mine")  # no longer only a conversion: --force leaves it be
    with pytest.raises(Exception, match="does not write \\(keep.txt\\)"):
        convert(hf_path=str(source), mlx_path=str(out), force=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_output_may_not_replace_the_source(source):
    with pytest.raises(Exception, match="would replace the checkpoint"):
        convert(hf_path=str(source), mlx_path=str(source.parent), force=True)
    assert (source / "model.safetensors").is_file()
