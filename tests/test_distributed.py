"""Splitting the model across ranks, in one process: each rank's slices as MLX would cut them, read
without reading whole tensors; refusals before loading; the watchdog; the requests rank 0 sends.

The multi-process runs (mlx.launch on 127.0.0.1) are in test_distributed_launch.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from mimo_mlx.distributed import Watchdog, launched


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
