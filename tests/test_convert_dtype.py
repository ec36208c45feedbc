"""The float type a conversion stores: the checkpoint's own unless --dtype says otherwise."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from convert_helpers import make_source
from safetensors import safe_open

from mimo_mlx.cli.main import main
from mimo_mlx.convert import convert


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """Saved as MiMo-VL is: bfloat16 weights, config.json saying so."""
    return make_source(tmp_path_factory.mktemp("bf16") / "model", wide=False, dtype="bfloat16")


def stored_dtypes(folder) -> dict[str, str]:
    with safe_open(folder / "model-00001-of-00001.safetensors", "np") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_default_is_the_checkpoints_bfloat16(bf16_source, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(bf16_source), "--mlx-path", str(out)]
    )
    assert result.exit_code == 0, result.output
    dtypes = stored_dtypes(out)
    assert (
        dtypes["model.norm.weight"] == "BF16" and dtypes["visual.patch_embed.proj.weight"] == "BF16"
    )
    assert dtypes["model.layers.0.mlp.up_proj.scales"] == "BF16"
    record = json.loads((out / "config.json").read_text())["mimo_mlx"]["quantization"]
    assert record["float_dtype"] == "bfloat16"
    assert record["float_dtype_from"] == "config.json dtype"
    line = "in bfloat16 (the checkpoint's own, from config.json dtype)"
    assert line in result.stdout
    assert "stored in bfloat16" in (out / "README.md").read_text()


def test_unquantized_bfloat16_is_copied_bit_for_bit(bf16_source, tmp_path):
    out = tmp_path / "out"
    convert(hf_path=str(bf16_source), mlx_path=str(out), no_quantize=True)
    with safe_open(bf16_source / "model.safetensors", "pt") as src:
        with safe_open(out / "model-00001-of-00001.safetensors", "pt") as ours:
            for key in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
                assert ours.get_tensor(key).dtype == src.get_tensor(key).dtype
                assert ours.get_tensor(key).equal(src.get_tensor(key))


@pytest.mark.parametrize(
    "change, origin",
    [
        # transformers 4 and the published MiMo-VL config.json: torch_dtype at the root
        (lambda c: c.update(torch_dtype=c.pop("dtype")), "config.json torch_dtype"),
        # only the decoder's section names it
        (lambda c: c["text_config"].update(dtype=c.pop("dtype")), "config.json text_config.dtype"),
        # nothing in config.json (or a value that is not a float type): the weights' own type
        (lambda c: c.pop("dtype"), "the safetensors headers"),
        (lambda c: c.update(dtype="auto"), "the safetensors headers"),
    ],
)
def test_where_the_checkpoints_type_is_read(bf16_source, tmp_path, change, origin):
    source = make_source(tmp_path / "src", wide=False, dtype="bfloat16")
    edit_config(source, change)
    out = tmp_path / "out"
    report = convert(hf_path=str(source), mlx_path=str(out))
    assert report.options.dtype == "bfloat16" and report.dtype_origin == origin
    assert stored_dtypes(out)["model.norm.weight"] == "BF16"


def test_a_float32_checkpoint_stays_float32(tmp_path):
    source = make_source(tmp_path / "src", wide=False)  # transformers' default: float32
    report = convert(hf_path=str(source), mlx_path=str(tmp_path / "out"))
    assert report.options.dtype == "float32"
    assert stored_dtypes(tmp_path / "out")["model.norm.weight"] == "F32"


def test_dtype_option_overrides_the_checkpoint(bf16_source, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["convert", "--hf-path", str(bf16_source), "--mlx-path", str(out), "--dtype", "float16"],
    )
    assert result.exit_code == 0, result.output
    assert "in float16 (--dtype)" in result.stdout
    assert stored_dtypes(out)["model.layers.0.mlp.up_proj.scales"] == "F16"
    record = json.loads((out / "config.json").read_text())["mimo_mlx"]["quantization"]
    assert record["float_dtype"] == "float16" and record["float_dtype_from"] == "--dtype"


def test_help_names_the_default_and_why_bfloat16():
    result = CliRunner().invoke(main, ["convert", "--help"])
    text = " ".join(result.output.split())  # click wraps lines
    assert "[default: (the checkpoint's own, bfloat16 for MiMo-VL)]" in text
    assert "float16, whose range ends at 65504" in text
