"""What apps and agents need from `mimo-mlx serve`, through the official openai client against a
server subprocess: tool calls (a full round trip), JSON that validates, text completions, and a
model field that clients with a fixed model name can use."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import openai
import pytest
from server_process import ServerProcess
from test_structured import GUI_ACTION
from test_tools import WEATHER
from tool_models import write_tool_model_folder

import mimo_mlx
from mimo_mlx.generation.loop import generate_step

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 20}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tool_model_folder(tmp_path_factory.mktemp("apps"))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("apps-log") / "server.log"
    with ServerProcess(folder, log, "--max-tokens", "400") as running:
        yield running


@pytest.fixture(scope="module")
def local(folder):
    return mimo_mlx.load(folder)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def validate_call(call, tools=(WEATHER, SEARCH)) -> dict:
    (tool,) = [t for t in tools if t["function"]["name"] == call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


def test_a_tool_round_trip(client, local):
    """A forced call, its result sent back in a tool message, and the answer that follows."""
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        tools=[WEATHER, SEARCH],
        tool_choice="required",
        temperature=1.0,
        seed=3,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        validate_call(call)
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in choice.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "12 C, rain"})
    second = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER, SEARCH], max_tokens=20, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The result went through the template: the prompt is what the library renders for it.
    _, processor = local
    rendered = processor.prepare_messages(messages, tools=[WEATHER, SEARCH])
    assert "<tool_response>\n12 C, rain\n</tool_response>" in rendered.text
    assert second.usage.prompt_tokens == rendered.input_ids.shape[1]
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2


def test_a_named_tool_streams_as_openai_streams_calls(client):
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Search for MLX."}],
        tools=[WEATHER, SEARCH],
        tool_choice={"type": "function", "function": {"name": "search"}},
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or delta.id
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    expected = whole.choices[0].message.tool_calls
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    assert {c.function.name for c in expected} == {"search"}
    for call in expected:
        validate_call(call)


def test_one_call_when_parallel_calls_are_off(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Do both."}],
            tools=[WEATHER, SEARCH],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
        )
        assert len(reply.choices[0].message.tool_calls) == 1
        validate_call(reply.choices[0].message.tool_calls[0])


def test_tool_choice_none_hides_the_tools(client, local):
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    _, processor = local
    assert reply.usage.prompt_tokens == processor.prepare_messages(messages).input_ids.shape[1]
    assert reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_answers_validate(client, seed):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Click the OK button."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "action", "schema": GUI_ACTION, "strict": True},
        },
        temperature=1.0,
        seed=seed,
        max_tokens=600,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), GUI_ACTION)


def test_json_object_answers_parse(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Describe it as JSON."}],
        response_format={"type": "json_object"},
        temperature=0.8,
        seed=1,
        max_tokens=800,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_schema_it_cannot_enforce_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    error = caught.value.body
    assert error["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in error["message"]


def raw_greedy(local, prompt: str, max_tokens: int, **cache_options) -> tuple[str, str]:
    """(text, finish_reason) of plain greedy decoding of the raw prompt, in this process, with
    a cache stored as `cache_options` (kv_bits, ...) say."""
    model, processor = local
    tokenizer = processor.tokenizer
    ids = np.array(tokenizer.encode(prompt))
    tokens = []
    for token, _ in generate_step(ids, model, max_tokens=max_tokens, **cache_options):
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(tokens, skip_special_tokens=True), "stop"
        tokens.append(token)
    return tokenizer.decode(tokens, skip_special_tokens=True), "length"


def test_text_completions_continue_the_raw_prompt(client, local):
    prompt = "The quick brown fox"
    reply = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt=prompt, max_tokens=16, temperature=0
    )
    text, finish = raw_greedy(local, prompt, 16)
    assert reply.object == "text_completion"
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (text, finish)
    assert reply.usage.prompt_tokens == len(local[1].tokenizer.encode(prompt))
    pieces = list(
        client.completions.create(
            model="x", prompt=prompt, max_tokens=16, temperature=0, stream=True, echo=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == prompt + text
    assert pieces[-1].choices[0].finish_reason == finish


def test_text_completions_stop_at_a_stop_sequence(client, local):
    prompt = "Numbers: 0 1 2"
    text, _ = raw_greedy(local, prompt, 30)
    stop = text[3:5]
    reply = client.completions.create(
        model="x", prompt=prompt, max_tokens=30, temperature=0, stop=[stop]
    )
    assert reply.choices[0].text == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_any_model_name_is_answered_and_the_id_is_listed(client, folder):
    assert [m.id for m in client.models.list().data] == [str(folder)]
    for name in ("gpt-4o", folder.name, "XiaomiMiMo/MiMo-VL-7B-RL-2508"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert reply.model == str(folder)
