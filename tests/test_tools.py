"""Tools through the model's own chat template, and tool calls read back out of answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from PIL import Image
from tiny_tokenizer import CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE
from tool_models import write_tool_model_folder

from mimo_mlx import MimoError
from mimo_mlx.generation.tool_calls import ToolCall, ToolCallStream, parse_call
from mimo_mlx.inputs.processor import Processor
from mimo_mlx.inputs.template import IMAGE_TOKEN, renders_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tool_model_folder(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_folder(folder)


def test_the_folders_tool_template_is_found_beside_the_vision_one(processor):
    assert processor.chat_template == CHAT_TEMPLATE and not renders_tools(CHAT_TEMPLATE)
    assert processor.tool_template == TOOLS_CHAT_TEMPLATE


def test_tools_and_results_render_as_transformers_renders_them(folder, processor):
    """The OpenAI shapes go through the template as transformers passes them (arguments as
    objects, as chat templates expect)."""
    inputs = processor.prepare_messages(ROUND_TRIP, tools=[WEATHER])
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    expected = [dict(m) for m in ROUND_TRIP]
    expected[1] = {**expected[1], "content": ""}
    call = expected[1]["tool_calls"][0]
    expected[1]["tool_calls"] = [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    theirs = hf.apply_chat_template(
        expected,
        tools=[WEATHER],
        chat_template=TOOLS_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert inputs.text == theirs
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        in theirs
    )
    assert "<tool_response>\n12 C, rain\n</tool_response>" in theirs
    assert json.dumps(WEATHER) in theirs
    assert inputs.input_ids[0].tolist() == hf(theirs, add_special_tokens=False)["input_ids"]


def test_images_are_written_in_for_a_text_only_tool_template(processor):
    image = Image.fromarray(np.zeros((56, 84, 3), np.uint8))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "Click the button."},
            ],
        }
    ]
    inputs = processor.prepare_messages(messages, tools=[WEATHER])
    assert inputs.text.count(IMAGE_TOKEN) == 1 and "# Tools" in inputs.text
    assert "<|vision_start|><|image_pad|><|vision_end|>Click the button." in inputs.text
    assert inputs.image_grid_thw.tolist() == [[1, 4, 6]]
    plain = processor.prepare_messages(messages)  # no tools: the vision template, as before
    assert "# Tools" not in plain.text and plain.text.count(IMAGE_TOKEN) == 1


def test_a_model_whose_templates_ignore_tools_says_so(folder, tmp_path):
    processor = Processor.from_folder(folder)
    processor.tool_template = None
    with pytest.raises(MimoError, match="do not render tools"):
        processor.prepare_messages([{"role": "user", "content": "Hi"}], tools=[WEATHER])


@pytest.mark.parametrize(
    "message, error",
    [
        ({"role": "assistant", "tool_calls": "x"}, "must be a list"),
        ({"role": "assistant", "tool_calls": [{"function": {}}]}, "function.name"),
        ({"role": "user", "content": "x", "tool_calls": []}, "in an assistant message"),
    ],
)
def test_bad_tool_messages_are_refused(processor, message, error):
    with pytest.raises(MimoError, match=error):
        processor.prepare_messages([{"role": "user", "content": "Hi"}, message], tools=[WEATHER])


ANSWER = (
    "Let me check.\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_wether", "arguments": {}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Bergen\\"}"}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_weather", '
)


@pytest.mark.parametrize("size", [1, 2, 5, 13, len(ANSWER)])
def test_calls_come_out_of_the_stream_whatever_the_pieces(size):
    stream = ToolCallStream(["get_weather"])
    text, calls = "", []
    for start in range(0, len(ANSWER), size):
        piece, found = stream.feed(ANSWER[start : start + size])
        text, calls = text + piece, calls + found
    text += stream.finish()
    assert calls == [
        ToolCall("get_weather", '{"city": "Oslo"}'),
        ToolCall("get_weather", '{"city": "Bergen"}'),
    ]
    # An unknown tool's block and the unfinished one stay text, as the model wrote them.
    assert text == (
        'Let me check.<tool_call>\n{"name": "get_wether", "arguments": {}}\n</tool_call>'
        '<tool_call>\n{"name": "get_weather", '
    )


def test_one_call_only_when_asked():
    stream = ToolCallStream(["get_weather"], limit=1)
    text, calls = stream.feed(ANSWER)
    assert text == "Let me check." and len(calls) == 1 and stream.done and stream.finish() == ""


@pytest.mark.parametrize(
    "block",
    ['{"name": 3}', "[]", "not json", '{"name": "f", "arguments": [1]}', '{"arguments": {}}'],
)
def test_blocks_that_are_not_calls(block):
    assert parse_call(block) is None
