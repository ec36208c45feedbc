"""Structured output enforced while decoding (llguidance): on tiny random models, whose weights
alone write noise, every answer must still parse and validate against its schema."""

from __future__ import annotations

import builtins
import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
import tiny_tokenizer
from click.testing import CliRunner
from test_generate import write_model_folder
from tiny_tokenizer import SPECIAL_TOKEN_IDS
from tokenizers import AddedToken
from tool_models import TOOL_MODEL_VOCAB, write_tool_model_folder

import mimo_mlx
from mimo_mlx import MimoError
from mimo_mlx.cli.main import main
from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.generation.constrained import Constraint, json_format, tool_call_format
from mimo_mlx.inputs.tokenizer import Tokenizer

PADDED_VOCAB = TOOL_MODEL_VOCAB  # the embedding has rows no token uses, as MiMo's does
THINK, END_THINK = SPECIAL_TOKEN_IDS["<think>"], SPECIAL_TOKEN_IDS["</think>"]
IM_END = SPECIAL_TOKEN_IDS["<|im_end|>"]

GUI_ACTION = {
    "type": "object",
    "properties": {
        "action": {"enum": ["click", "scroll", "input", "finished"]},
        "start_point": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 1920},
            "minItems": 2,
            "maxItems": 2,
        },
        "text": {"type": "string", "maxLength": 12},
    },
    "required": ["action", "start_point"],
    "additionalProperties": False,
}
FORM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "email": {"anyOf": [{"type": "null"}, {"type": "string", "format": "email"}]},
    },
    "required": ["name", "age", "score", "address", "email"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"const": "0150"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """The tiny model with Qwen2.5's tool-call tokens, its embedding wider than its tokenizer."""
    return mimo_mlx.load(write_tool_model_folder(tmp_path_factory.mktemp("structured")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_model_folder(tmp_path_factory.mktemp("structured-cli"), seed=21)
    return folder, mimo_mlx.load(folder)


def object_of(**properties) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def steer(plan: dict[int, int]):
    """A logits processor that pushes token plan[i] at answer position i (the grammar still has
    the last word: it masks after the processors)."""
    start: list[int] = []

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if not start:
            start.append(tokens.shape[-1])  # the first call sees the prompt
        token = plan.get(tokens.shape[-1] - start[0])
        if token is None:
            return logits
        return logits + 100.0 * (mx.arange(logits.shape[-1]) == token)

    return processor


@pytest.mark.parametrize("schema", [GUI_ACTION, FORM], ids=["gui-action", "form"])
def test_noise_becomes_valid_json(padded, schema):
    model, processor = padded
    assert model.config.text.vocab_size == PADDED_VOCAB > processor.tokenizer.vocab_size
    for seed in range(4):
        result = mimo_mlx.generate(
            model, processor, "Act.", json_schema=schema, temp=1.0, seed=seed, max_tokens=600
        )
        assert result.stats.finish_reason == "stop", result.text
        assert max(result.tokens) < processor.tokenizer.vocab_size  # no padding row drawn
        jsonschema.validate(json.loads(result.answer), schema)


def test_sampling_filters_see_only_allowed_tokens(padded):
    """top-k 1 after the mask is greedy over the allowed tokens, never an empty choice."""
    model, processor = padded
    kwargs = dict(json_schema=GUI_ACTION, max_tokens=200, no_think=True)
    greedy = mimo_mlx.generate(model, processor, "Go.", temp=0.0, **kwargs)
    top1 = mimo_mlx.generate(model, processor, "Go.", temp=1.5, top_k=1, seed=3, **kwargs)
    assert greedy.tokens == top1.tokens
    jsonschema.validate(json.loads(greedy.answer), GUI_ACTION)


def test_reasoning_first_then_the_schema(padded):
    model, processor = padded
    words = processor.tokenizer.encode(" Let me look {at} it.")
    plan = {0: THINK, **{i + 1: t for i, t in enumerate(words)}}
    plan[len(words) + 1] = END_THINK
    result = mimo_mlx.generate(
        model,
        processor,
        "Act.",
        json_schema=GUI_ACTION,
        max_tokens=300,
        logits_processors=[steer(plan)],
    )
    assert result.tokens[0] == THINK and END_THINK in result.tokens
    assert result.thinking == "Let me look {at} it."
    jsonschema.validate(json.loads(result.answer), GUI_ACTION)


def test_no_end_token_while_reasoning(padded):
    """The model wants to stop inside its reasoning: it cannot, the answer still comes."""
    model, processor = padded
    plan = {0: THINK, **{i: IM_END for i in range(1, 40)}, 40: END_THINK}
    result = mimo_mlx.generate(
        model,
        processor,
        "Act.",
        json_schema=GUI_ACTION,
        max_tokens=400,
        logits_processors=[steer(plan)],
    )
    assert result.tokens.index(END_THINK) == 40
    assert result.stats.finish_reason == "stop"
    jsonschema.validate(json.loads(result.answer), GUI_ACTION)


def test_no_think_constrains_from_the_first_token(padded):
    model, processor = padded
    result = mimo_mlx.generate(
        model,
        processor,
        "Act.",
        json_schema=GUI_ACTION,
        no_think=True,
        max_tokens=300,
        logits_processors=[steer({0: THINK, 1: THINK})],
    )
    assert THINK not in result.tokens and result.thinking == ""
    jsonschema.validate(json.loads(result.text), GUI_ACTION)


def test_prompt_lookup_gives_the_same_tokens(padded):
    """Greedy with prompt lookup is token for token the plain answer, under the grammar too:
    drafts the grammar refuses are rejected, and the grammar rolls back with the cache."""
    model, processor = padded
    prompt = 'Copy: {"action": "click", "start_point": [10, 20]} {"action": "click", "start'
    kwargs = dict(json_schema=GUI_ACTION, max_tokens=500, no_think=True)
    plain = mimo_mlx.generate(model, processor, prompt, **kwargs)
    looked = mimo_mlx.generate(
        model, processor, prompt, prompt_lookup=True, prompt_lookup_num_tokens=4, **kwargs
    )
    assert looked.tokens == plain.tokens and plain.stats.finish_reason == "stop"
    assert looked.stats.drafted_tokens > looked.stats.accepted_tokens > 0
    jsonschema.validate(json.loads(plain.answer), GUI_ACTION)


def test_drafts_are_masked_along_the_draft_and_rolled_back(padded):
    """The constraint's view of a verification pass, fed by hand."""
    model, processor = padded
    tokenizer = processor.tokenizer
    constraint = Constraint(json_format(GUI_ACTION), tokenizer, PADDED_VOCAB, "off")
    logits = mx.zeros((1, PADDED_VOCAB))
    first = constraint.mask(logits, mx.array([[1, 2, 3]]), offset=7)  # the prompt: 10 tokens
    allowed = np.isfinite(np.array(first[0]))
    assert not allowed[tokenizer.vocab_size :].any() and not allowed[IM_END]
    opening = tokenizer.encode('{"action": "click", "')
    good, bad = opening[1:3], tokenizer.encode("}}")
    rows = constraint.mask(
        mx.zeros((1 + len(good) + len(bad), PADDED_VOCAB)),
        mx.array([[opening[0], *good, *bad]]),
        offset=10,
    )
    rows = np.isfinite(np.array(rows))
    assert rows[0, good[0]] and rows[1, good[1]]  # each draft token allowed where it is checked
    assert not rows[2, bad[0]]  # the refused one is not: verification rejects it
    # The cache kept the first token and one draft token; the next pass feeds the correction.
    again = constraint.mask(mx.zeros((1, PADDED_VOCAB)), mx.array([[good[1]]]), offset=12)
    assert np.isfinite(np.array(again[0])).sum() > 0
    with pytest.raises(RuntimeError, match="refused"):
        constraint.mask(mx.zeros((1, PADDED_VOCAB)), mx.array([[bad[0]]]), offset=13)


def test_forced_tool_calls_name_a_tool_and_validate(padded):
    model, processor = padded
    point = GUI_ACTION["properties"]["start_point"]
    tools = [
        {"name": "click", "parameters": object_of(point=point)},
        {"name": "type_text", "parameters": object_of(text={"type": "string", "maxLength": 8})},
    ]
    chat = Conversation(model, processor, no_think=True)
    for seed in range(3):
        chat.reset()
        result = chat.ask(
            "Do it.", temp=1.0, seed=seed, max_tokens=400, output_format=tool_call_format(tools)
        )
        calls = result.answer.split("<tool_call>")[1:]
        assert calls and result.stats.finish_reason == "stop", result.text
        for call in calls:
            body = json.loads(call.split("</tool_call>")[0])
            tool = {t["name"]: t for t in tools}[body["name"]]
            jsonschema.validate(body["arguments"], tool["parameters"])


def test_a_conversation_keeps_the_json_answer(padded):
    model, processor = padded
    chat = Conversation(model, processor, no_think=True)
    first = chat.ask("Where?", json_schema=GUI_ACTION, max_tokens=800)
    assert first.stats.finish_reason == "stop"
    jsonschema.validate(json.loads(first.answer), GUI_ACTION)
    assert chat.messages[-1] == {"role": "assistant", "content": first.text}
    second = chat.ask("And now?", json_schema=FORM, max_tokens=800, temp=1.0, seed=1)
    jsonschema.validate(json.loads(second.answer), FORM)


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "array", "uniqueItems": True}, "Unimplemented keys"),
        ({"type": "string", "format": "no-such-format"}, "Unknown format"),
        ([1, 2], "must be an object"),
    ],
)
def test_schemas_it_cannot_enforce_are_refused(padded, schema, message):
    model, processor = padded
    with pytest.raises(MimoError, match=message):
        mimo_mlx.generate(model, processor, "Hi", json_schema=schema, max_tokens=5)


def test_a_schema_cannot_loosen_its_own_enforcement(padded):
    """A client's x-guidance settings (whitespace, leniency) are replaced by ours."""
    schema = {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}
    with pytest.raises(MimoError, match="Unimplemented keys"):
        json_format(schema).check()


def test_without_the_extra_it_says_how_to_install_it(padded, monkeypatch):
    real_import = builtins.__import__

    def no_llguidance(name, *args, **kwargs):
        if name == "llguidance":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    model, processor = padded
    with pytest.raises(MimoError, match=r'pip install "mimo-mlx\[structured\]"'):
        mimo_mlx.generate(model, processor, "Hi", json_schema=GUI_ACTION, max_tokens=5)


def test_generate_json_schema_on_the_command_line(tiny, tmp_path):
    folder, _ = tiny
    schema = tmp_path / "action.json"
    schema.write_text(json.dumps(GUI_ACTION))
    args = [
        "generate",
        "--model",
        folder,
        "-p",
        "Act.",
        "--json-schema",
        schema,
        "--no-think",
        "--temp",
        "1",
        "--seed",
        "2",
        "-m",
        "300",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), GUI_ACTION)


@pytest.mark.parametrize(
    "content, message",
    [("{nope", "is not JSON"), ('{"type": "string", "format": "x"}', "Unknown format: x")],
)
def test_a_bad_schema_file_is_one_line(tiny, tmp_path, content, message):
    folder, _ = tiny
    schema = tmp_path / "bad.json"
    schema.write_text(content)
    result = CliRunner().invoke(
        main, ["generate", "--model", str(folder), "-p", "x", "--json-schema", str(schema)]
    )
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_tags_the_tokenizer_lacks_are_matched_as_text():
    """A tokenizer without <think> or <tool_call> tokens: the grammar reads the tags as text."""
    backend = tiny_tokenizer._train_bpe(300)
    backend.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tokenizer = Tokenizer(backend, config={"eos_token": "<|im_end|>"})
    assert not tokenizer.has_token("</think>") and not tokenizer.has_token("<tool_call>")

    def accepts(fmt, thinking, text) -> bool:
        constraint = Constraint(fmt, tokenizer, 304, thinking)
        rows = constraint.mask(mx.zeros((1, 304)), mx.array([[1]]), offset=0)
        for offset, token in enumerate(tokenizer.encode(text), start=1):
            if not np.isfinite(np.array(rows)[0, token]):
                return False
            rows = constraint.mask(mx.zeros((1, 304)), mx.array([[token]]), offset)
        return True

    schema = json_format({"type": "object"})
    assert accepts(schema, "optional", '<think>a {b} </thin</think>\n{"a": 1}')
    assert accepts(schema, "opened", 'hmm</think>{"a": 1}')
    assert not accepts(schema, "optional", 'hmm</think>{"a": 1}')  # no reasoning unopened
    call = tool_call_format([{"name": "f"}])
    assert accepts(call, "off", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert not accepts(call, "off", '<tool_call>\n{"name": "g"')
