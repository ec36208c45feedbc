"""Tools through the model's own chat template, and tool calls read back out of answers."""

from __future__ import annotations

import asyncio
import json
import time

import mlx.core as mx
import numpy as np
import pytest
import transformers
from PIL import Image
from tiny_tokenizer import CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE
from tool_models import write_tool_model_folder

from mimo_mlx import MimoError
from mimo_mlx.generation.loop import GenerationResponse
from mimo_mlx.generation.tool_calls import ToolCall, ToolCallStream, parse_call
from mimo_mlx.inputs.processor import Processor
from mimo_mlx.inputs.template import IMAGE_TOKEN, renders_tools
from mimo_mlx.serve.answers import JobAnswer
from mimo_mlx.serve.events import Delta, Job
from mimo_mlx.serve.requests import Limits
from mimo_mlx.serve.tools import parse_chat

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


LIMITS = Limits(("tiny",), context=4096)


def served_answer(text: str, tools: list[dict], piece: int = 3):
    """(deltas, finish_reason) the server makes of an answer the model wrote freely, `piece`
    characters per decoded step, for a request offering `tools` with tool_choice "auto"."""
    request = parse_chat(
        {"messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": "auto"},
        LIMITS,
    )
    assert request.output_format is None  # "auto": nothing is forced, the answer is parsed
    loop = asyncio.new_event_loop()
    job = Job(
        id="t",
        messages=[],
        options={},
        deadline=time.monotonic() + 60,
        loop=loop,
        tool_names=tuple(request.tools.names),
    )
    answer = JobAnswer(job, tokenizer=None, opens_thinking=False)
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    for i, text_piece in enumerate(pieces):
        last = i == len(pieces) - 1
        response = GenerationResponse(
            text_piece,
            0,
            mx.zeros(1),
            False,
            5,
            1.0,
            i + 1,
            1.0,
            0.0,
            0.1,
            "stop" if last else None,
        )
        if answer.add(response):
            break
    _, finished = answer.end()
    loop.run_until_complete(asyncio.sleep(0))  # deliver what the generation thread emitted
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    loop.close()
    return [e for e in events if isinstance(e, Delta)], finished.finish_reason


def test_with_tool_choice_auto_the_models_own_call_is_taken_out_of_its_answer():
    text = (
        "<think>The user wants the weather.</think>Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    deltas, finish = served_answer(text, [WEATHER])
    assert "".join(d.reasoning for d in deltas) == "The user wants the weather."
    assert "".join(d.content for d in deltas) == "Let me check."
    assert [c for d in deltas for c in d.tool_calls] == [
        ToolCall("get_weather", '{"city": "Oslo"}')
    ]
    assert finish == "tool_calls"


def test_with_tool_choice_auto_a_call_to_no_offered_tool_stays_text():
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    deltas, finish = served_answer(text, [WEATHER])
    assert "".join(d.content for d in deltas) == text
    assert not any(d.tool_calls for d in deltas) and finish == "stop"
