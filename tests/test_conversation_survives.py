"""A conversation survives what a user can do to it: Ctrl-C anywhere in a turn, and a /save that
cannot write. Afterwards it saves, loads in another process, and continues exactly as a fresh
conversation given the same history would."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_generate import MAX_PIXELS, write_model_folder

import mimo_mlx
from mimo_mlx.cli.chat import ChatSession
from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.conversation.file import CannotWrite
from mimo_mlx.conversation.pool import ConversationPool
from mimo_mlx.conversation.vision_cache import VisionCache
from mimo_mlx.model.language import MLP
from mimo_mlx.model.vision import VisionMLP

STORY = "Tell me a long story about the sea and the ships on it."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-survives"), seed=21)


@pytest.fixture(scope="module")
def ours(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("survives-photos")
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8)).save(folder / name)
    return folder / "a.png", folder / "b.png"


def new_chat(ours) -> Conversation:
    return Conversation(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)


def outline(messages: list) -> list:
    """Each message's role and parts: text as it is, an image or video by its content key."""

    def part(p):
        return p.get("text") or p[p["type"]].key

    return [
        (
            m["role"],
            m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]],
        )
        for m in messages
    ]


class Interrupt:
    """Raises KeyboardInterrupt, as Ctrl-C would, at the `at`-th call of a wrapped function."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def interrupt_inside(monkeypatch, cls, module, at: int) -> None:
    """Ctrl-C in the middle of a forward pass: at `module`'s `at`-th call, after the layers
    before it (and its own attention) have written their part of the cache."""
    interrupt, call = Interrupt(at), cls.__call__

    def interrupted(self, x):
        if self is module:
            interrupt.tick()
        return call(self, x)

    monkeypatch.setattr(cls, "__call__", interrupted)


def interrupt_after_a_step_is_queued(monkeypatch, at: int) -> None:
    """Ctrl-C while a token is read back: the next decode step is queued (the cache holds one
    token more than was yielded), as it is for nearly all of an answer's time."""
    import mimo_mlx.generation.loop as loop

    interrupt, stepper = Interrupt(at), loop._stepper

    def stepper_with_interrupt(*args):
        step = stepper(*args)

        def interrupted(*step_args, **inputs):
            queued = step(*step_args, **inputs)
            interrupt.tick()
            return queued

        return interrupted

    monkeypatch.setattr(loop, "_stepper", stepper_with_interrupt)


def ask_until_interrupted(chat: Conversation, text: str, **kwargs) -> None:
    with pytest.raises(KeyboardInterrupt):
        for _ in chat.stream(text, max_tokens=40, **kwargs):
            pass


INTERRUPTS = {
    "after the prompt's last chunk": lambda mp, model: interrupt_after_a_step_is_queued(mp, 1),
    "reading the 1st token": lambda mp, model: interrupt_after_a_step_is_queued(mp, 2),
    "reading the 7th token": lambda mp, model: interrupt_after_a_step_is_queued(mp, 7),
    "inside a decode step": lambda mp, model: interrupt_inside(
        mp, MLP, model.model.layers[0].mlp, 9
    ),
    "inside a prefill chunk": lambda mp, model: interrupt_inside(
        mp, MLP, model.model.layers[0].mlp, 2
    ),
    "encoding the image": lambda mp, model: interrupt_inside(
        mp, VisionMLP, model.visual.blocks[1].mlp, 1
    ),
}


@pytest.mark.parametrize("where", INTERRUPTS)
def test_ctrl_c_anywhere_leaves_a_conversation_that_saves_and_continues(
    ours, photos, tmp_path, monkeypatch, where
):
    chat = new_chat(ours)
    chat.ask("Describe this picture.", images=[photos[0]], max_tokens=6)
    with monkeypatch.context() as patch:
        INTERRUPTS[where](patch, ours[0])
        # Prefill in chunks of 8, so an interrupt can land between two of them.
        ask_until_interrupted(chat, STORY, images=[photos[1]], prefill_step_size=8)
    offsets = {layer.offset for layer in chat.cache.layers}
    assert offsets == {chat.cached_tokens}, "every layer holds what the conversation says"

    loaded = Conversation.load(chat.save(tmp_path / "chat.safetensors"), *ours)
    assert loaded.cached_tokens == chat.cached_tokens
    assert outline(loaded.messages) == outline(chat.messages)
    follow_up = {"role": "user", "content": "Go on."}
    fresh = new_chat(ours)  # the same history, computed from nothing
    expected = [r.token for r in fresh.stream_messages([*chat.messages, follow_up], max_tokens=8)]
    assert [r.token for r in chat.stream("Go on.", max_tokens=8)] == expected
    assert [r.token for r in loaded.stream("Go on.", max_tokens=8)] == expected


def test_the_pool_keeps_a_request_stopped_midway(ours, monkeypatch):
    """A server request that fails midway (or is cancelled) leaves its cached conversation
    as exact as one that finished: the next turn answers as from scratch."""
    pool = ConversationPool(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
    first = [{"role": "user", "content": STORY}]
    with monkeypatch.context() as patch:
        interrupt_after_a_step_is_queued(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            list(pool.stream(first, max_tokens=40, temp=0.0))
    (entry,) = pool._entries
    assert {layer.offset for layer in entry.cache.layers} == {entry.cached_tokens}
    turn2 = [*entry.messages, {"role": "user", "content": "Go on."}]
    answer = list(pool.stream(turn2, max_tokens=8, temp=0.0))
    fresh = ConversationPool(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
    assert [r.token for r in answer] == [r.token for r in fresh.stream(turn2, max_tokens=8)]
    assert answer[-1].cached_tokens > 0


@pytest.mark.parametrize("where", ["inside a prefill chunk", "reading the 7th token"])
def test_chat_says_whether_a_stopped_message_was_kept(ours, photos, monkeypatch, capsys, where):
    """Ctrl-C before the first token drops the message (and what was attached to it) from the
    conversation: chat says so, so nobody asks a follow-up about an image it never kept."""
    session = ChatSession(new_chat(ours), hide_thinking=False, max_tokens=40, sampling={})
    session.images = [photos[0]]
    with monkeypatch.context() as patch:
        INTERRUPTS[where](patch, ours[0])
        assert session._answer(STORY)
    said = capsys.readouterr().err.splitlines()[-1]
    if where == "inside a prefill chunk":
        assert session.chat.messages == []
        kept = "the message and its attachments were not kept"
        assert said == f"[stopped before the answer began: {kept}]"
    else:
        assert [m["role"] for m in session.chat.messages][-2:] == ["user", "assistant"]
        assert said == "[stopped]"


# ---------------------------------------------------------------- a save that cannot write


def answered(ours) -> Conversation:
    chat = new_chat(ours)
    chat.ask("Hi", max_tokens=4)
    return chat


def assert_intact_and_saves(chat: Conversation, folder: Path, ours) -> None:
    """Nothing was left behind, and the conversation still saves and continues."""
    tokens, messages = chat.cached_tokens, list(chat.messages)
    path = chat.save(folder / "later.safetensors")
    again = Conversation.load(path, *ours)
    assert again.cached_tokens == tokens and outline(again.messages) == outline(messages)
    assert not [p for p in folder.iterdir() if "partial" in p.name]


@pytest.mark.parametrize(
    "target, reason",
    [
        ("missing/chat.safetensors", r"the folder .*missing does not exist"),
        ("a-file/chat.safetensors", r"a-file is a file, not a folder"),
        ("a-folder", r"it is a folder"),
    ],
)
def test_a_save_that_cannot_write_says_why_and_writes_nothing(ours, tmp_path, target, reason):
    chat = answered(ours)
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(CannotWrite, match=f"cannot write .*: .*{reason}; nothing was written"):
        chat.save(tmp_path / target)
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "a-folder").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert_intact_and_saves(chat, tmp_path, ours)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_save_into_a_folder_not_ours(ours, tmp_path):
    chat = answered(ours)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(CannotWrite, match="no permission to write in"):
            chat.save(locked / "chat.safetensors")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    assert_intact_and_saves(chat, tmp_path, ours)


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.EROFS, "is on a read-only disk"),
        (errno.EACCES, "no permission to write in"),  # what root, as CI runs, never meets
        (errno.ENOSPC, "the disk is full"),
    ],
    ids=["read-only", "no-permission", "full"],
)
def test_a_disk_that_refuses_fails_once_with_one_reason(ours, tmp_path, monkeypatch, code, reason):
    """The file cannot be made and its cleanup fails too (macOS says so for a file that is not
    there, on a read-only disk): still one error naming the reason, and the conversation goes
    on."""
    chat = answered(ours)

    def refused(method):
        def on_this_disk(self, *args, **kwargs):
            if self.parent == tmp_path:
                raise OSError(code, os.strerror(code))
            return method(self, *args, **kwargs)

        return on_this_disk

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", refused(Path.open))
        patch.setattr(Path, "unlink", refused(Path.unlink))
        with pytest.raises(CannotWrite, match=f"{reason}.*; nothing was written$"):
            chat.save(tmp_path / "chat.safetensors")
    assert_intact_and_saves(chat, tmp_path, ours)


def test_a_full_disk_leaves_no_partial_file(folder, tmp_path):
    """A file-size limit (what a full disk looks like to a writer) stops MLX mid-file: the
    error says so, nothing is left, and a later save in the same process works."""
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        import mimo_mlx
        from mimo_mlx.conversation.conversation import Conversation
        from mimo_mlx.errors import MimoError
        chat = Conversation(*mimo_mlx.load({str(folder)!r}))
        chat.ask("Hi", max_tokens=4)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            chat.save({str(tmp_path / "full.safetensors")!r})
        except MimoError as err:
            print("error:", err)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        chat.save({str(tmp_path / "later.safetensors")!r})
        print("saved", chat.cached_tokens)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    error, saved = done.stdout.splitlines()
    assert error.startswith("error: cannot write ") and error.endswith("nothing was written")
    assert "MLX could not write it" in error or "the disk is full" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.safetensors"]
    assert saved.startswith("saved ")


def test_a_full_disk_says_how_much_is_free_once_the_partial_file_is_gone(
    ours, tmp_path, monkeypatch
):
    """A disk with less room than the file: MLX's write fails once the disk is full, so the free
    space to report is what is left after the partial file is removed (not the 0 bytes the
    partial file left), against what the whole file needs."""
    chat = answered(ours)
    size = chat.save(tmp_path / "whole.safetensors").stat().st_size
    (tmp_path / "whole.safetensors").unlink()
    capacity = size - 1000  # the file does not fit, its arrays alone may

    def used() -> int:
        return sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())

    def small_disk(path):
        return shutil._ntuple_diskusage(capacity, used(), capacity - used())

    def write_until_full(file, arrays, metadata=None):
        Path(file).write_bytes(bytes(capacity - used()))
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", small_disk)
        patch.setattr(mx, "save_safetensors", write_until_full)
        with pytest.raises(CannotWrite) as caught:
            chat.save(tmp_path / "chat.safetensors")
    said = re.fullmatch(
        rf"cannot write {re.escape(str(tmp_path / 'chat.safetensors'))}: the disk is full "
        r"\(([\d,]+) kB free, about ([\d,]+) kB needed\); nothing was written",
        str(caught.value),
    )
    assert said, str(caught.value)
    free, needed = (int(n.replace(",", "")) for n in said.groups())
    assert free == round(capacity / 1e3) and abs(needed - size / 1e3) <= 1
    assert_intact_and_saves(chat, tmp_path, ours)


def test_loading_a_folder_says_it_is_a_folder(ours, tmp_path):
    with pytest.raises(mimo_mlx.MimoError, match="is a folder, not a conversation file"):
        Conversation.load(tmp_path, *ours)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello\n", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64)],
    ids=["empty", "text", "jpeg"],
)
def test_loading_a_file_that_is_no_safetensors_says_so(ours, tmp_path, data):
    """An empty file, a note or a photo given to /load: one plain sentence, not MLX's reader's
    words ("[read] Unable to read 8 bytes from file")."""
    path = tmp_path / "chat.safetensors"
    path.write_bytes(data)
    with pytest.raises(mimo_mlx.MimoError) as caught:
        Conversation.load(path, *ours)
    assert str(caught.value) == f"{path} is not a mimo-mlx conversation file"


def test_loading_a_truncated_conversation_says_it_is_incomplete(ours, tmp_path):
    path = answered(ours).save(tmp_path / "chat.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(mimo_mlx.MimoError, match=r"^\S+ is damaged or incomplete \(.*\)$"):
        Conversation.load(path, *ours)
