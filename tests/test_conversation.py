"""Conversations: each turn equals transformers' generate from scratch on the whole conversation,
while only the new tokens are computed and no image is encoded twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import (
    MAX_PIXELS,
    NEW_TOKENS,
    assert_same_tokens,
    hf_generate,
    hf_reference,
    sample_images,
    write_model_folder,
)

import mimo_mlx
from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.conversation.vision_cache import VisionCache
from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.messages import Media

VIDEO_LIMITS = dict(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny-chat"), seed=21)


@pytest.fixture(scope="module")
def ours(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return hf_reference(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("chat-images"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Six frames; at 4 fps each temporal patch is one position, within the clip's grid (beyond
    it transformers 5 places the following text differently from the original M-RoPE rule)."""
    folder = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(7)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def conversation(model_processor, **options) -> Conversation:
    model, processor = model_processor
    options = dict(max_pixels=MAX_PIXELS, fps=4.0, **VIDEO_LIMITS, **options)
    return Conversation(model, processor, vision_cache=options.pop("vision_cache", None), **options)


def hf_turn(reference, chat: Conversation, prompt_media: list, **options) -> list[int]:
    """transformers' greedy answer to the prompt of `chat`'s last turn (its messages without the
    answer just given), computed from scratch.

    The ids come from transformers' template and expansion rules (video placeholders counted
    from our grids: its video processor needs torchvision); images' pixels from its own image
    processor; `prompt_media` lists the conversation's images (PIL) and videos in order.
    """
    hf_model, hf_processor = reference
    messages = []
    for message in chat.messages[:-1]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": p["type"]} if p["type"] != "text" else {"type": "text", "text": p["text"]}
                for p in content
            ]
        messages.append({"role": message["role"], "content": content})
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [m for m in prompt_media if isinstance(m, Image.Image)]
    image = hf_processor.image_processor(images=pil, return_tensors="np")
    inputs = chat._inputs
    image_counts = [t * h * w // 4 for t, h, w in image["image_grid_thw"]]
    videos = inputs.video_grid_thw if inputs.video_grid_thw is not None else []
    video_counts = [t * h * w // 4 for t, h, w in videos]
    counts = {"<|image_pad|>": iter(image_counts), "<|video_pad|>": iter(video_counts)}
    pieces = []
    for chunk in text.split("<|vision_end|>"):
        for pad, numbers in counts.items():
            if chunk.endswith(pad):
                chunk = chunk[: -len(pad)] + pad * next(numbers)
        pieces.append(chunk)
    ids = hf_processor.tokenizer("<|vision_end|>".join(pieces), return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(inputs.input_ids, ids.numpy())
    # The conversation keeps no pixels once encoded: preprocess its media again to compare them.
    ours = [
        chat.processor.preprocess(
            Media("image" if isinstance(m, Image.Image) else "video", m), opts
        )
        for m in prompt_media
        for opts in [chat.prompt_options]
    ]
    ours_images = np.concatenate([m.pixel_values for m in ours if m.kind == "image"])
    np.testing.assert_array_equal(ours_images, image["pixel_values"])
    hf_inputs = dict(
        input_ids=ids,
        pixel_values=torch.tensor(image["pixel_values"]),
        image_grid_thw=torch.tensor(image["image_grid_thw"]),
    )
    if inputs.video_grid_thw is not None:
        ours_videos = np.concatenate([m.pixel_values for m in ours if m.kind == "video"])
        hf_inputs.update(
            pixel_values_videos=torch.tensor(ours_videos),
            video_grid_thw=torch.tensor(inputs.video_grid_thw),
            second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts),
        )
    return hf_generate(hf_model, hf_inputs, **options)


def pil(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def test_three_turns_equal_transformers_from_scratch(ours, reference, images, clip):
    chat = conversation(ours, vision_cache=VisionCache())
    first, second = pil(images[0]), pil(images[1])
    turn1 = chat.ask("Describe this picture.", images=[first], max_tokens=NEW_TOKENS)
    assert turn1.stats.cached_tokens == 0
    assert_same_tokens(turn1.tokens, hf_turn(reference, chat, [first]))

    turn2 = chat.ask("And what colour is it?", max_tokens=NEW_TOKENS)
    assert turn2.stats.cached_tokens > turn1.stats.prompt_tokens  # turn 1 and most of its answer
    assert_same_tokens(turn2.tokens, hf_turn(reference, chat, [first]))

    turn3 = chat.ask("Compare with this.", images=[second], videos=[clip], max_tokens=NEW_TOKENS)
    # At least turn 2's prompt: this answer starts with a byte piece that renders as U+FFFD, so
    # its re-tokenized text differs from the generated tokens at once (and is recomputed).
    assert turn3.stats.cached_tokens >= turn2.stats.prompt_tokens
    assert_same_tokens(turn3.tokens, hf_turn(reference, chat, [first, second, clip]))
    # Each image and the video went through the tower once, in the turn that brought it.
    assert (chat.vision_cache.misses, chat.vision_cache.hits) == (3, 0)


def test_divergence_inside_an_earlier_answer(ours, reference, images):
    """History re-rendered differently from what was generated (here: the first answer edited,
    as a template that drops reasoning would): the cache is trimmed back to the first difference,
    rotary offsets included, and the turn still equals transformers from scratch."""
    chat = conversation(ours, vision_cache=VisionCache())
    first = pil(images[0])
    chat.ask("Describe this picture.", images=[first], max_tokens=NEW_TOKENS)
    held = chat.cached_tokens
    answer = chat.messages[-1]["content"]
    edited = [*chat.messages[:-1], {"role": "assistant", "content": answer[: len(answer) // 2]}]
    turn = {"role": "user", "content": "Go on."}
    responses = list(chat.stream_messages([*edited, turn], max_tokens=NEW_TOKENS))
    reused = responses[-1].cached_tokens
    assert chat._inputs.input_ids.shape[1] - 30 < held and reused < held  # trimmed
    assert reused > chat._inputs.input_ids.shape[1] // 2  # ... inside the answer, not earlier
    assert_same_tokens([r.token for r in responses], hf_turn(reference, chat, [first]))


def test_trim_before_an_image_reuses_its_features(ours, reference, images):
    """An earlier user message edited before its image: everything from there is recomputed and
    the image's features come from those the conversation kept (not its pixels), without
    running the tower."""
    chat = conversation(ours, vision_cache=VisionCache())
    first = pil(images[0])
    chat.ask("Describe this picture.", images=[first], max_tokens=8)
    edited = [
        {"role": "system", "content": "You are terse."},
        *chat.messages,
        {"role": "user", "content": "Again?"},
    ]
    responses = list(chat.stream_messages(edited, max_tokens=NEW_TOKENS))
    image_at = int(np.argmax(chat._inputs.input_ids[0] == chat.model.config.image_token_id))
    assert 0 < responses[-1].cached_tokens < image_at  # "<|im_start|>system\nYou are" is shared
    assert (chat.vision_cache.misses, chat.vision_cache.hits) == (1, 0)
    assert all(m.pixel_values is None for m in chat._inputs.media)
    assert_same_tokens([r.token for r in responses], hf_turn(reference, chat, [first]))


def test_evictions_never_change_an_answer(ours, images):
    """A vision cache too small for anything gives the same answers as one that keeps it all."""
    answers = []
    for cache in (VisionCache(), VisionCache(max_bytes=1)):
        chat = conversation(ours, vision_cache=cache)
        chat.ask("Describe this picture.", images=[pil(images[0])], max_tokens=6)
        answers.append(chat.ask("Compare.", images=[pil(images[1])], max_tokens=NEW_TOKENS).tokens)
        edited = [
            {"role": "system", "content": "S"},
            *chat.messages,
            {"role": "user", "content": "?"},
        ]
        answers.append([r.token for r in chat.stream_messages(edited, max_tokens=NEW_TOKENS)])
    assert answers[0:2] == answers[2:4]


def test_a_video_past_its_budget_is_noted_in_the_turn_that_brings_it(ours, clip):
    chat = conversation(ours, vision_cache=VisionCache(), video_max_tokens=12)
    chat.ask("What happens?", videos=[clip], max_tokens=4)
    (notice,) = chat.notices
    assert notice.startswith(f"{clip.name}: 6 frames at 84x56 would take 18 tokens")
    assert chat._inputs.video_grid_thw.tolist() == [[3, 2, 4]]  # 56x28: 2 tokens a pair
    chat.ask("And then?", max_tokens=4)
    assert chat.notices == ()


def test_a_stopped_answer_stays_in_the_history(ours):
    chat = conversation(ours)
    stream = chat.stream("Tell me a story.", max_tokens=NEW_TOKENS)
    taken = [next(stream).token for _ in range(5)]
    stream.close()  # the reader went away (Ctrl-C, a closed connection)
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"] == chat.processor.tokenizer.decode(
        taken, skip_special_tokens=True
    )
    assert chat.cached_tokens == chat.cache.offset
    chat.ask("Go on.", max_tokens=4)  # and the conversation continues


@pytest.fixture
def small_context(ours):
    """The tiny model with a 120-token limit on the cache."""
    return ours, 120


def test_pixel_limits_no_image_could_meet_are_refused_at_once(ours):
    """A conversation refuses such limits when it is made, not at its first image."""
    with pytest.raises(MimoError, match=r"max_pixels \(100\) is below min_pixels"):
        Conversation(*ours, max_pixels=100)
    with pytest.raises(MimoError, match=r"video_max_pixels \(10\) is below video_min_pixels"):
        Conversation(*ours, video_max_pixels=10)


def test_at_the_context_limit_a_turn_is_refused(small_context):
    model_processor, limit = small_context
    chat = conversation(model_processor, max_kv_size=limit)
    chat.ask("Tell me a story.", max_tokens=40)
    with pytest.raises(MimoError, match=f"at most {limit} fit.*--drop-old-turns"):
        for _ in range(4):
            chat.ask("Tell me another story, a longer one please.", max_tokens=40)


def test_old_turns_are_dropped_when_asked(small_context):
    model_processor, limit = small_context
    chat = conversation(model_processor, max_kv_size=limit, drop_old_turns=True)
    for i in range(5):
        chat.ask(f"Tell me story number {i}.", max_tokens=30)
        assert chat.cache.offset <= limit
    users = [m["content"][-1]["text"] for m in chat.messages if m["role"] == "user"]
    assert users[-1] == "Tell me story number 4." and "Tell me story number 0." not in users


def test_save_and_load_continue_identically(ours, images, tmp_path):
    chat = conversation(ours, vision_cache=VisionCache())
    chat.ask("Describe this picture.", images=[pil(images[0])], max_tokens=8)
    chat.ask("And the colour?", max_tokens=8)
    path = chat.save(tmp_path / "chat.safetensors")
    again = Conversation.load(path, *ours)
    assert again.cached_tokens == chat.cached_tokens and again.messages[-1] == chat.messages[-1]
    expected = chat.ask("Compare.", images=[pil(images[1])], max_tokens=NEW_TOKENS)
    resumed = again.ask("Compare.", images=[pil(images[1])], max_tokens=NEW_TOKENS)
    assert resumed.tokens == expected.tokens
    assert resumed.stats.cached_tokens == expected.stats.cached_tokens > 0


@pytest.mark.parametrize("name", ["chat.st", "chat", "chat.npz"])
def test_a_file_named_anything_loads(ours, tmp_path, name):
    """The file is safetensors whatever it is called (MLX would take the format from the name)."""
    chat = conversation(ours)
    chat.ask("Hi", max_tokens=3)
    again = Conversation.load(chat.save(tmp_path / name), *ours)
    assert again.cached_tokens == chat.cached_tokens and again.messages == chat.messages


def test_a_conversation_keeps_features_not_pixels(ours, images):
    """Between turns a conversation holds its KV cache, its images' vision features and token
    ids: no preprocessed pixels (two float32 copies of every patch, once), and counts it all."""
    chat = conversation(ours, vision_cache=VisionCache())
    chat.ask("Describe this picture.", images=[pil(images[0])], max_tokens=4)
    parts = [p for m in chat.messages if isinstance(m["content"], list) for p in m["content"]]
    media = [p["image"] for p in parts if p["type"] == "image"]
    assert len(media) == 1 and media[0].pixel_values is None
    assert chat._inputs.pixel_values is None and chat._inputs.media[0].pixel_values is None
    (features,) = chat._features.values()
    assert features.shape[0] == int(np.prod(media[0].grid_thw)) // 4
    token_ids = 8 * chat.cached_tokens  # int64, one per cached token
    assert chat.nbytes >= chat.cache.nbytes + features.nbytes + token_ids
    assert chat.nbytes < chat.cache.nbytes + features.nbytes + 100 * token_ids + 10_000
    history = chat.processor.prepare_messages([*chat.messages, {"role": "user", "content": "?"}])
    with pytest.raises(MimoError, match="encoded by a Conversation"):  # not a model error
        next(mimo_mlx.stream_generate(chat.model, chat.processor, "", inputs=history))


def test_a_conversation_counts_the_text_and_token_ids_it_keeps(ours):
    chat = conversation(ours)
    text = "Read this. " * 200  # the tiny tokenizer: about two characters a token
    chat.ask(text, max_tokens=2)
    kept = chat.nbytes - chat.cache.nbytes
    # The message, the prompt rendered from it and the answer; its token ids twice (the
    # conversation's and the last prompt's), 8 bytes each.
    assert kept >= 2 * len(text) + 2 * 8 * chat.cached_tokens


def test_a_turn_ended_before_its_images_were_encoded_counts_their_pixels(ours, images):
    """A client that leaves while its request waits in a batch for the vision tower: the turn
    ends with no answer and its images' preprocessed pixels still held. The pool counts them,
    and drops the conversation once they pass its budget."""
    from mimo_mlx.conversation.pool import ConversationPool

    messages = [{"role": "user", "content": [{"type": "image", "image": pil(images[0])},
                                             {"type": "text", "text": "Describe."}]}]  # fmt: skip
    pool = ConversationPool(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
    chat, turn, _ = pool.begin(messages, max_tokens=4)
    (item,) = turn.inputs.media
    patch_dim = ours[0].config.vision.patch_dim
    pixels = int(np.prod(item.grid_thw)) * patch_dim * 4  # float32, a patch of each grid cell
    pool.end(chat, turn, [])
    assert len(pool) == 1 and pool.nbytes >= pixels
    stats = pool.stats()
    assert stats["bytes"] == stats["kv_bytes"] + stats["vision_bytes"] + stats["history_bytes"]
    assert stats["history_bytes"] >= pixels
    pool = ConversationPool(*ours, max_bytes=pixels // 2, max_pixels=MAX_PIXELS)
    chat, turn, _ = pool.begin(messages, max_tokens=4)
    pool.end(chat, turn, [])
    assert len(pool) == 0 and pool.nbytes == 0


def test_another_conversation_reuses_the_features_a_history_carries(ours, images, tmp_path):
    """Messages taken from a conversation carry their images' features (for the model that
    computed them): a new conversation given them runs no vision tower; another model cannot
    use them and says so."""
    chat = conversation(ours, vision_cache=VisionCache())
    chat.ask("Describe this picture.", images=[pil(images[0])], max_tokens=4)
    turn = [*chat.messages, {"role": "user", "content": "And?"}]
    fresh = conversation(ours, vision_cache=VisionCache())
    answer = [r.token for r in fresh.stream_messages(turn, max_tokens=4)]
    assert fresh.vision_cache.misses == 0 and answer
    other = mimo_mlx.load(write_model_folder(tmp_path / "other", seed=22))
    with pytest.raises(MimoError, match="encoded by another model"):
        list(conversation(other).stream_messages(turn, max_tokens=2))


def test_a_format_1_file_with_pixels_still_loads(ours, images, tmp_path, monkeypatch):
    """Files written before features were kept hold the pixels: they load, and continue as the
    conversation that wrote them would."""
    chat = conversation(ours, vision_cache=VisionCache())
    photo = pil(images[0])
    chat.ask("Describe this picture.", images=[photo], max_tokens=8)
    with_pixels = chat.processor.preprocess(Media("image", photo), chat.prompt_options)
    old = Conversation.load(chat.save(tmp_path / "now.safetensors"), *ours)
    old.messages = [
        {**m, "content": [{"type": "image", "image": with_pixels} if p["type"] == "image" else p
                          for p in m["content"]]} if isinstance(m["content"], list) else m
        for m in old.messages
    ]  # fmt: skip
    old._features = {}
    monkeypatch.setattr("mimo_mlx.conversation.file.FORMAT", 1)
    path = old.save(tmp_path / "format1.safetensors")
    monkeypatch.undo()
    legacy = Conversation.load(path, *ours)
    assert legacy._features == {}
    expected = chat.ask("Compare.", images=[pil(images[1])], max_tokens=NEW_TOKENS)
    resumed = legacy.ask("Compare.", images=[pil(images[1])], max_tokens=NEW_TOKENS)
    assert resumed.tokens == expected.tokens


def test_a_file_from_another_model_is_refused(ours, folder, tmp_path):
    chat = conversation(ours)
    chat.ask("Hi", max_tokens=3)
    path = chat.save(tmp_path / "chat.safetensors")
    other = mimo_mlx.load(write_model_folder(tmp_path / "other", seed=22))
    with pytest.raises(MimoError, match="saved with another model"):
        Conversation.load(path, *other)
    same_weights_other_dtype = (mimo_mlx.load_model(folder, dtype="bfloat16"), ours[1])
    with pytest.raises(MimoError, match="another dtype"):
        Conversation.load(path, *same_weights_other_dtype)


def test_a_file_of_another_format_or_no_conversation_is_refused(
    ours, folder, tmp_path, monkeypatch
):
    chat = conversation(ours)
    chat.ask("Hi", max_tokens=3)
    monkeypatch.setattr("mimo_mlx.conversation.file.FORMAT", 99)
    path = chat.save(tmp_path / "future.safetensors")
    monkeypatch.undo()
    with pytest.raises(MimoError, match="format 99; this mimo-mlx .* reads formats 1, 2, 3"):
        Conversation.load(path, *ours)
    with pytest.raises(MimoError, match="not a mimo-mlx conversation file"):
        Conversation.load(next(folder.glob("*.safetensors")), *ours)


def test_the_pool_continues_each_clients_conversation(ours, images):
    """Two clients re-sending growing conversations: each turn 2 reuses its own turn 1, and a
    client that starts like another forks it instead of trimming it away."""
    from mimo_mlx.conversation.pool import ConversationPool

    pool = ConversationPool(*ours, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
    first = [{"role": "user", "content": [{"type": "image", "image": pil(images[0])},
                                          {"type": "text", "text": "Describe."}]}]  # fmt: skip
    other = [{"role": "user", "content": "Tell me a story."}]
    answers, reused = {}, {}
    for name, messages in (("a", first), ("b", other)):
        responses = list(pool.stream(messages, max_tokens=6, temp=0.0))
        answers[name], reused[name] = pool._entries[-1].messages, responses[-1].cached_tokens
    # b starts like a (the default system prompt): a's cache is forked there, not trimmed.
    assert reused["a"] == 0 and 0 < reused["b"] < pool._entries[0].cached_tokens
    assert len(pool) == 2
    turn2 = [*answers["a"], {"role": "user", "content": "More."}]
    responses = list(pool.stream(turn2, max_tokens=6, temp=0.0))
    assert responses[-1].cached_tokens > 40  # turn 1 and its image came from client a's cache
    held = [entry.cached_tokens for entry in pool._entries]
    branch = [{"role": "user", "content": "Tell me a poem."}]  # starts like b, then parts
    responses = list(pool.stream(branch, max_tokens=4, temp=0.0))
    assert responses[-1].cached_tokens > reused["b"]  # "...user\nTell me a" from b's cache
    assert len(pool) == 3 and [e.cached_tokens for e in pool._entries[:2]] == held  # b forked


def test_the_pool_keeps_within_its_bytes(ours):
    from mimo_mlx.conversation.pool import ConversationPool

    pool = ConversationPool(*ours, max_bytes=1)
    for i in range(3):
        list(pool.stream([{"role": "user", "content": f"Story {i}."}], max_tokens=3))
        assert len(pool) == 0 and pool.nbytes == 0  # not even the one just used fits
    pool = ConversationPool(*ours, max_bytes=2**30)
    list(pool.stream([{"role": "user", "content": "Story 0."}], max_tokens=3))
    pool.max_bytes = budget = int(2.5 * pool.nbytes)  # about two such conversations
    for i in range(1, 5):
        list(pool.stream([{"role": "user", "content": f"Story {i}."}], max_tokens=3))
        assert 1 <= len(pool) <= 2 and pool.nbytes <= budget
    assert pool.stats()["bytes"] == pool.nbytes and pool.stats()["limit"] == budget
