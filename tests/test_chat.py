"""Chat template rendering, vision placeholder expansion, thinking split; vs transformers."""

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

from mimo_mlx.errors import MimoError
from mimo_mlx.inputs.template import (
    ThinkingSplitter,
    build_messages,
    build_prompt,
    expand_vision_tokens,
    load_chat_template,
    render_chat,
    split_thinking,
)
from mimo_mlx.inputs.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

MIMO_SYSTEM = "You are MiMo, an AI assistant developed by Xiaomi."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def ours(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_processor(hf_tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class ProcessorWithoutVideoCheck(transformers.Qwen2_5_VLProcessor):
        # Qwen2VLVideoProcessor needs torchvision, which is not installed: a stub with merge_size
        # stands in for it; only text expansion (replace_video_token) touches it.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    video_stub = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return ProcessorWithoutVideoCheck(
        image_processor=image_processor,
        tokenizer=hf_tokenizer,
        video_processor=video_stub,
        chat_template=CHAT_TEMPLATE,
    )


def _hf_messages(text, images=0, videos=0, system=None):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos
    content = content + [{"type": "text", "text": text}]
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + [{"role": "user", "content": content}]


CASES = {
    "text": dict(prompt="Hi there!", hf=_hf_messages("Hi there!")),
    "one_image": dict(prompt="What is this?", num_images=1, hf=_hf_messages("What is this?", 1)),
    "two_images": dict(prompt="Compare.", num_images=2, hf=_hf_messages("Compare.", 2)),
    "video": dict(prompt="What happens?", num_videos=1, hf=_hf_messages("What happens?", videos=1)),
    "two_videos": dict(
        prompt="Same place?", num_videos=2, hf=_hf_messages("Same place?", videos=2)
    ),
    "images_and_videos": dict(
        prompt="Both?", num_images=2, num_videos=2, hf=_hf_messages("Both?", 2, videos=2)
    ),
    "system": dict(
        prompt="Hi", system="You are terse.", hf=_hf_messages("Hi", system="You are terse.")
    ),
    "no_think": dict(prompt="Hi", no_think=True, hf=_hf_messages("Hi /no_think")),
    "no_think_image": dict(
        prompt="描述图片", num_images=1, no_think=True, hf=_hf_messages("描述图片 /no_think", 1)
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_prompt_matches_transformers(ours, folder, hf_tokenizer, hf_processor, case):
    args = dict(CASES[case])
    hf_messages = args.pop("hf")
    text = build_prompt(ours, load_chat_template(folder), **args)
    by_tokenizer = hf_tokenizer.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=False
    )
    by_processor = hf_processor.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=False
    )
    assert text == by_tokenizer == by_processor
    assert text.endswith("<|im_start|>assistant\n")


def test_prompt_golden(ours, folder):
    text = build_prompt(ours, load_chat_template(folder), "Hi", num_images=1, no_think=True)
    assert text == (
        f"<|im_start|>system\n{MIMO_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi /no_think<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_build_messages_order():
    messages = build_messages("Go", num_images=2, num_videos=2, system="S", no_think=True)
    assert messages[0] == {"role": "system", "content": "S"}
    kinds = [c["type"] for c in messages[1]["content"]]
    assert kinds == ["image", "image", "video", "video", "text"]
    assert messages[1]["content"][-1]["text"] == "Go /no_think"
    # A text-only turn is a plain string, which templates that handle nothing else can render.
    assert build_messages("Go\n", no_think=True)[0]["content"] == "Go\n/no_think"
    assert build_messages("Go /no_think", no_think=True)[0]["content"] == "Go /no_think"


TRICKY_TEMPLATE = (
    "{%- for m in messages %}\n"
    "    {%- if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
    "  {{ m['role'] | upper }}: {{ m['content'] | tojson }}\n"
    "    {%- for c in m['content'] %}{% if loop.index > 2 %}{% break %}{% endif %}{{ c }}"
    "{% endfor %}\n"
    "{% generation %}[{{ eos_token }}]{% endgeneration %}\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<{{ strftime_now('%Y') | length }}>{% endif %}"
)


def test_environment_matches_transformers(hf_tokenizer):
    messages = [
        {"role": "user", "content": "héllo <b>&</b> 图"},
        {"role": "assistant", "content": "ok"},
    ]
    ours = render_chat(TRICKY_TEMPLATE, messages, {"eos_token": "<|im_end|>"})
    theirs = hf_tokenizer.apply_chat_template(
        messages, chat_template=TRICKY_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert ours == theirs
    assert '"héllo <b>&</b> 图"' in ours  # tojson neither escapes HTML nor non-ASCII


def test_template_errors_are_mimo_errors():
    with pytest.raises(MimoError, match="bad role"):
        render_chat(TRICKY_TEMPLATE, [{"role": "bad", "content": "x"}])


def test_sandbox_blocks_unsafe_access():
    with pytest.raises(MimoError, match="unsafe"):
        render_chat("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(MimoError, match="unsafe"):
        render_chat("{{ messages.append(1) }}", [])


def test_template_precedence(folder, tmp_path, hf_tokenizer):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from-config"}))
    assert load_chat_template(tmp_path) == "from-config"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "t"},
                    {"name": "default", "template": "d"},
                ]
            }
        )
    )
    assert load_chat_template(tmp_path) == "d"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert load_chat_template(tmp_path) == "from-jinja"
    # The processor prefers the legacy chat_template.json over chat_template.jinja (transformers 5).
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from-json"}))
    assert load_chat_template(tmp_path) == "from-json"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "from-processor"}))
    assert load_chat_template(tmp_path) == "from-processor"
    assert load_chat_template(folder) == CHAT_TEMPLATE == hf_tokenizer.chat_template


def test_tokenizer_prefers_jinja_like_transformers(folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ 'jinja wins' }}")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert load_chat_template(tmp_path) == hf.chat_template == "{{ 'jinja wins' }}"


def test_missing_template(tmp_path):
    with pytest.raises(MimoError, match="No chat template"):
        load_chat_template(tmp_path)


# ---------------------------------------------------------------- vision placeholders


def test_image_expansion_matches_processor(ours, folder, hf_processor):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(56, 84), (100, 60), (200, 140)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    prompt = build_prompt(ours, load_chat_template(folder), "Compare them.", num_images=len(images))
    out = hf_processor(text=[prompt], images=images, return_tensors="np")
    grids = out["image_grid_thw"].tolist()
    expanded = expand_vision_tokens(prompt, image_grid_thw=grids, merge_size=2)
    assert ours.encode(expanded) == out["input_ids"][0].tolist()
    assert expanded.count("<|image_pad|>") == sum(t * h * w // 4 for t, h, w in grids)


@pytest.mark.parametrize(
    "image_grids, video_grids",
    [
        ([[1, 4, 4]], []),
        ([[1, 2, 6], [1, 8, 4]], [[3, 4, 6]]),
        ([], [[2, 6, 2]]),
        ([[1, 6, 6], [1, 2, 2], [1, 10, 4]], [[4, 2, 4]]),
    ],
)
def test_expansion_matches_processor_rule(ours, folder, hf_processor, image_grids, video_grids):
    # The processor's own path (replace_*_token + get_text_with_replacements) on given grids.
    prompt = build_prompt(
        ours,
        load_chat_template(folder),
        "x",
        num_images=len(image_grids),
        num_videos=len(video_grids),
    )
    images = {"image_grid_thw": np.array(image_grids, dtype=np.int64).reshape(-1, 3)}
    videos = {"video_grid_thw": np.array(video_grids, dtype=np.int64).reshape(-1, 3)}
    image_reps = [hf_processor.replace_image_token(images, i) for i in range(len(image_grids))]
    video_reps = [hf_processor.replace_video_token(videos, i) for i in range(len(video_grids))]
    theirs = hf_processor.get_text_with_replacements([prompt], image_reps, video_reps)[0][0]
    assert expand_vision_tokens(prompt, image_grids, video_grids, merge_size=2) == theirs


def test_expansion_count_mismatch():
    with pytest.raises(MimoError, match="1 <\\|image_pad\\|> placeholder"):
        expand_vision_tokens("<|image_pad|>", image_grid_thw=[[1, 2, 2], [1, 2, 2]])
    with pytest.raises(MimoError, match="video"):
        expand_vision_tokens("<|video_pad|>")


# ---------------------------------------------------------------- thinking splitter


def _merged(segments):
    merged = []
    for kind, text in segments:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        elif text:
            merged.append((kind, text))
    return merged


def _split_run(pieces, **kwargs):
    splitter = ThinkingSplitter(**kwargs)
    segments = [seg for piece in pieces for seg in splitter.feed(piece)]
    return _merged(segments + splitter.finalize())


SPLIT_CASES = [
    # (generated text, prompt opened <think>, expected merged segments)
    (
        "<think>\nStep 1.\n</think>\n\nAnswer.",
        False,
        [("thinking", "\nStep 1.\n"), ("answer", "\n\nAnswer.")],
    ),
    ("\n<think>a<b</think>c</think>", False, [("thinking", "a<b"), ("answer", "c")]),
    ("Plain answer <think>x</think>", False, [("answer", "Plain answer "), ("thinking", "x")]),
    (
        "<think>a</think>b<think>c</think>d",
        False,
        [("thinking", "a"), ("answer", "b"), ("thinking", "c"), ("answer", "d")],
    ),
    (
        "r1</think>x<think>r2</think>y",
        True,
        [("thinking", "r1"), ("answer", "x"), ("thinking", "r2"), ("answer", "y")],
    ),
    ("<think>a</think><think>b</think>c", False, [("thinking", "ab"), ("answer", "c")]),
    ("ans <thin", False, [("answer", "ans <thin")]),
    ("reasoning</think>answer", True, [("thinking", "reasoning"), ("answer", "answer")]),
    ("<think>r</think>a", True, [("thinking", "r"), ("answer", "a")]),
    ("<think></think>only answer", False, [("answer", "only answer")]),
    ("<think>never closed </thi", False, [("thinking", "never closed </thi")]),
    ("<thi", False, [("answer", "<thi")]),
    ("  ", True, [("thinking", "  ")]),
]


@pytest.mark.parametrize("text, opened, expected", SPLIT_CASES)
def test_thinking_splitter_every_boundary(text, opened, expected):
    assert _split_run([text], prompt_opened_thinking=opened) == expected
    assert _split_run(list(text), prompt_opened_thinking=opened) == expected
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        pieces = [text[:i], text[i:j], text[j:]]
        assert _split_run(pieces, prompt_opened_thinking=opened) == expected, pieces


def test_thinking_splitter_streams_early():
    splitter = ThinkingSplitter()
    assert splitter.feed("<thi") == []
    assert splitter.feed("nk>abc</") == [("thinking", "abc")]
    assert splitter.feed("think>The") == [("answer", "The")]
    assert splitter.feed(" end") == [("answer", " end")]
    assert splitter.finalize() == []


def test_split_thinking_joins_every_block():
    text = "<think>\nFirst.\n</think>\nPart one. <think>Second.</think> Part two."
    thinking, answer = split_thinking(text)
    assert thinking == "First.\n\nSecond."
    assert answer == "Part one.  Part two."
    assert "<think>" not in answer and "</think>" not in answer


# llama.cpp's MiMo-VL template shape: string content only, concatenated with `+`.
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_string_only_template_renders_text_prompts(ours):
    text = build_prompt(ours, STRING_ONLY_TEMPLATE, "Hi", system="S")
    assert (
        text
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_string_only_template_says_what_it_cannot_render(ours):
    with pytest.raises(MimoError) as caught:
        build_prompt(ours, STRING_ONLY_TEMPLATE, "What is this?", num_images=1)
    message = str(caught.value)
    assert "TypeError" in message and "text-only prompts" in message and "\n" not in message


def test_template_that_drops_images_is_refused(ours):
    drops = (
        "{% for m in messages %}{{ m['content'] if m['content'] is string else 'x' }}{% endfor %}"
    )
    with pytest.raises(MimoError, match="does not place images"):
        build_prompt(ours, drops, "What is this?", num_images=1)
