"""Splitting the model across ranks, in one process: each rank's slices as MLX would cut them, read
without reading whole tensors; refusals before loading; the watchdog; the requests rank 0 sends.

The multi-process runs (mlx.launch on 127.0.0.1) are in test_distributed_launch.py.
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from convert_helpers import make_source
from distributed_folders import FakeGroup, write_quantized_folder, write_split_folder
from distributed_worker import generation_prompts
from mlx.nn.layers.distributed import shard_inplace
from mlx.utils import tree_flatten

from mimo_mlx import MimoError, load_model
from mimo_mlx.cli.main import main
from mimo_mlx.distributed import loading as shard_loading_module
from mimo_mlx.distributed.group import Watchdog, launched
from mimo_mlx.distributed.loading import load_sharded_model, read_slices, stored_tensors
from mimo_mlx.distributed.lockstep import Request, decode_request, encode_request
from mimo_mlx.distributed.sharding import module_at, param_axis, part_ranges, split_modules


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return {
        # transformers' other key names (model.language_model.*, model.visual.*)
        "float32": (write_split_folder(root / "float32", key_layout="language_model"), (2,)),
        # the published dtype and config layout
        "bfloat16": (
            write_split_folder(root / "bfloat16", seed=5, dtype="bfloat16", config_layout="root"),
            (2,),
        ),
        "three-way": (write_split_folder(root / "three-way", ranks=3, seed=6), (3,)),
        "4-bit": (write_quantized_folder(root / "4-bit", group_size=32), (2,)),
    }


@pytest.fixture(scope="module")
def mlx_vlm_folder(tmp_path_factory):
    """An mlx-community style folder (mlx-vlm's own converter, 4-bit decoder in groups of 32):
    other names, and the patch embedding as an MLX Conv3d."""
    convert = pytest.importorskip("mlx_vlm.convert").convert
    root = tmp_path_factory.mktemp("mlx-vlm")
    source = make_source(root / "source", seed=8, config_layout="root")
    convert(
        hf_path=str(source), mlx_path=str(root / "4-bit"), quantize=True, q_bits=4, q_group_size=32
    )
    return root / "4-bit", (2,)


def reference_part(folder, rank: int, size: int) -> dict[str, mx.array]:
    """The whole model loaded in one process, then cut by MLX's own `shard_inplace`."""
    model = load_model(folder)
    group = FakeGroup(rank, size).mx_group
    for path, split in split_modules(model).items():
        shard_inplace(module_at(model, path), split.kind, segments=split.segments, group=group)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "three-way", "4-bit", "mlx-vlm"])
def test_each_rank_holds_exactly_mlx_s_slices(folders, name, request):
    folder, sizes = (
        request.getfixturevalue("mlx_vlm_folder") if name == "mlx-vlm" else folders[name]
    )
    for size in sizes:
        for rank in range(size):
            ours = dict(
                tree_flatten(load_sharded_model(folder, FakeGroup(rank, size)).parameters())
            )
            theirs = reference_part(folder, rank, size)
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                assert ours[key].dtype == value.dtype, key
                assert ours[key].shape == value.shape, key
                assert mx.array_equal(ours[key], value).item(), f"{key} (rank {rank} of {size})"


def test_split_layers_are_read_slice_by_slice(folders, monkeypatch):
    """Rank 1 of 2 reads every whole tensor once and half of each split one: never a whole split
    tensor, and no byte twice."""
    folder, _ = folders["4-bit"]
    read = []
    original = shard_loading_module._open

    class Counting:
        def __init__(self, file):
            self.handle = original(file)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            return self.handle.seek(offset)

        def readinto(self, buffer):
            count = self.handle.readinto(buffer)
            read.append(count)
            return count

    monkeypatch.setattr(shard_loading_module, "_open", Counting)
    model = load_sharded_model(folder, FakeGroup(1, 2))
    stored, _ = stored_tensors(folder, {}, model.config)
    plan = split_modules(model)
    whole = split = 0
    for key, tensor in stored.items():
        module, param = key.rsplit(".", 1)
        nbytes = int(np.prod(tensor.shape)) * tensor.itemsize
        if module in plan and param_axis(plan[module], param) is not None:
            split += nbytes
        else:
            whole += nbytes
    assert split > 0 and sum(read) == whole + split // 2


def test_slices_along_a_later_axis_with_segments(tmp_path):
    values = np.arange(6 * 12, dtype=np.float32).reshape(6, 12)
    file = tmp_path / "t.safetensors"
    mx.save_safetensors(str(file), {"t": mx.array(values)})
    tensor = shard_loading_module.read_header(file)["t"]
    ranges = part_ranges(12, rank=1, size=2, segments=3)  # [(2, 4), (6, 8), (10, 12)]
    assert ranges == [(2, 4), (6, 8), (10, 12)]
    expected = np.concatenate([values[:, a:b] for a, b in ranges], axis=1)
    assert np.array_equal(np.array(read_slices(tensor, -1, ranges)), expected)
    assert np.array_equal(np.array(read_slices(tensor, 0, [(4, 6)])), values[4:6])


def test_head_counts_that_do_not_divide_are_refused_before_any_weight(folders, tmp_path):
    folder, _ = folders["float32"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())  # no weights
    with pytest.raises(MimoError) as caught:
        load_sharded_model(tmp_path, FakeGroup(0, 3))
    message = str(caught.value)
    assert "cannot be split across 3 ranks" in message
    assert "the decoder's attention heads: 4" in message and "key/value heads: 2" in message
    assert "group sizes that fit this model: 2" in message


def test_quantization_groups_split_across_ranks_are_refused(tmp_path):
    """4-bit in groups of 64: o_proj's 64 inputs split in two leave 32, half a group per rank."""
    folder = write_quantized_folder(tmp_path / "g64", group_size=64)
    with pytest.raises(MimoError) as caught:
        load_sharded_model(folder, FakeGroup(0, 2))
    message = str(caught.value)
    assert "model.layers.*.self_attn.o_proj: 64 inputs in quantization groups of 64" in message
    assert "visual.blocks.*.attn.proj: 64 inputs in quantization groups of 64" in message
    assert "a smaller --q-group-size" in message


def test_watchdog_fires_without_progress_and_only_when_armed():
    fired = []
    dog = Watchdog(0.3, lambda: "rank 1 of 2", on_expire=fired.append)
    try:
        time.sleep(0.5)
        assert not fired  # unarmed: idling is fine
        with dog.waiting("while generating"):
            for _ in range(6):  # progress every 0.1 s keeps it quiet
                time.sleep(0.1)
                dog.progress()
            assert not fired
            time.sleep(0.6)
        assert len(fired) == 1
        assert fired[0].startswith("rank 1 of 2: waited 0 s while generating with no progress")
        assert "--group-timeout" in fired[0]
        with dog.waiting("outer"):
            with dog.waiting("inner"):
                pass
            time.sleep(0.5)
        assert "outer" in fired[1]
    finally:
        dog.stop()


def test_watchdog_ends_a_wait_that_never_returns():
    """The main thread stuck (as in a collective whose peer vanished): the watchdog still fires."""
    fired = threading.Event()
    dog = Watchdog(0.2, lambda: "rank 0 of 2", on_expire=lambda message: fired.set())
    try:
        with dog.waiting("while generating"):
            assert fired.wait(5)
    finally:
        dog.stop()


def test_requests_round_trip(folders):
    config = load_model(folders["float32"][0]).config
    inputs = generation_prompts(config)["image_and_video"]
    request = Request(inputs, 7, {"temp": 0.3, "seed": 4}, 16)
    back = decode_request(encode_request(request))
    assert (back.max_tokens, back.sampling, back.prefill_step_size) == (7, request.sampling, 16)
    for name in ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos"):
        assert np.array_equal(getattr(back.inputs, name), getattr(inputs, name))
    assert back.inputs.second_per_grid_ts == [0.5] and back.inputs.image_grid_thw.ndim == 2
    text = decode_request(encode_request(Request(generation_prompts(config)["text"], 1, {})))
    assert text.inputs.pixel_values is None and text.inputs.video_grid_thw is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"MLX_RANK": "1", "MLX_HOSTFILE": "HOSTS"}, True),
        ({"MLX_RANK": "0", "MLX_HOSTFILE": "EMPTY"}, False),  # mlx.launch -n 1
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, False),
    ],
)
def test_launched_by_a_launcher(monkeypatch, tmp_path, env, expected):
    (tmp_path / "hosts.json").write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    (tmp_path / "empty").write_text("\n")
    paths = {"HOSTS": str(tmp_path / "hosts.json"), "EMPTY": str(tmp_path / "empty")}
    for name in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PMI_RANK", raising=False)
    monkeypatch.delenv("PMI_SIZE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, paths.get(value, value))
    assert launched() is expected


def test_chat_is_refused_under_a_launcher(monkeypatch, tmp_path):
    (tmp_path / "hosts.json").write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    result = CliRunner().invoke(main, ["chat", "--model", str(tmp_path)])
    assert result.exit_code == 1
    assert "under mlx.launch (or mpirun) use `mimo-mlx generate`" in result.output


def test_closing_waits_for_a_heartbeat_being_sent_and_then_tells_the_ranks(monkeypatch):
    """Ctrl-C closes the leader at any moment, also while its heartbeat thread is sending a
    heartbeat (holding the lock): close must wait for it and send the stop, or the other ranks
    wait for a stop that never comes (seen once under mlx.launch: the ranks outlived Ctrl-C)."""
    import contextlib
    from types import SimpleNamespace

    from mimo_mlx.distributed import lockstep

    sent = []
    monkeypatch.setattr(lockstep, "send_request", lambda group, request: sent.append(request))
    monkeypatch.setattr(lockstep, "send_heartbeat", lambda group: None)
    group = SimpleNamespace(
        rank=0,
        label="rank 0",
        waiting=lambda what: contextlib.nullcontext(),
        errors=lambda: contextlib.nullcontext(),
    )
    leader = lockstep.Leader(model=None, processor=None, group=group)
    beating = threading.Event()

    def heartbeat_in_flight() -> None:
        with leader._lock:  # what the heartbeat thread holds while it sends one
            beating.set()
            time.sleep(0.3)

    thread = threading.Thread(target=heartbeat_in_flight)
    thread.start()
    beating.wait(5)
    leader.close()
    thread.join()
    assert sent == [None]  # the stop went out, after the heartbeat
    leader._heartbeat.join(1)
    assert not leader._heartbeat.is_alive()  # and no heartbeat follows it
