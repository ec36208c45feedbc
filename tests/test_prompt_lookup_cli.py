"""Prompt lookup as users reach it: `generate`, `Conversation`, `mimo-mlx generate` / `chat`.

The model is a tiny checkpoint with the chat template and tokenizer, made to copy in memory
(`benchmarks.lookup.follow_chain`): the prompt quotes the chain its answer follows, so drafts are
accepted and the stats are not vacuous. The output must equal the output without lookup.
The pass cost that sizes the drafts is a flat one here (`flat_cost`), so drafting never depends
on the machine's load; test_pass_cost.py measures it for real.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from test_generate import MAX_PIXELS, sample_images, write_model_folder

import mimo_mlx
from benchmarks.lookup import chain, follow_chain
from mimo_mlx import MimoError
from mimo_mlx.cli import main as cli
from mimo_mlx.conversation.conversation import Conversation
from mimo_mlx.conversation.vision_cache import VisionCache
from mimo_mlx.generation import loop
from mimo_mlx.generation.loop import generate, stream_generate
from mimo_mlx.generation.pass_cost import PassCost

STATS = re.compile(r"prompt lookup: (\d+) of (\d+) drafted tokens accepted")


@pytest.fixture(autouse=True)
def flat_cost(monkeypatch) -> list[int]:
    """Lookup measures the pass cost at its first draft: here every pass costs one step. Returns
    the row counts it was asked for, one entry per measurement."""
    asked = []

    def measure(model, rows):
        asked.append(rows)
        return PassCost.flat(rows)

    monkeypatch.setattr(loop, "measure_pass_cost", measure)
    return asked


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """(model, processor, prompt): the prompt asks to copy the chain the answer will follow."""
    model, processor = mimo_mlx.load(write_model_folder(tmp_path_factory.mktemp("pl-cli"), 21))
    successor = follow_chain(model, seed=3)
    last = int(processor.prepare("Copy this:").input_ids[0, -1])  # the template's last token
    text = processor.tokenizer.decode(chain(successor, successor[last], 80))
    return model, processor, "Copy this: " + text


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("pl-images"))


def test_generate_with_lookup_gives_the_same_answer(copier, images):
    model, processor, prompt = copier
    for media in ([], images[:1]):
        plain = generate(model, processor, prompt, media, max_tokens=60, max_pixels=MAX_PIXELS)
        responses = list(
            stream_generate(
                model, processor, prompt, media, max_tokens=60, max_pixels=MAX_PIXELS,
                prompt_lookup=True,
            )
        )  # fmt: skip
        assert [r.token for r in responses] == plain.tokens
        assert "".join(r.text for r in responses) == plain.text
        last = responses[-1]
        assert last.accepted_tokens == sum(r.from_draft for r in responses) > 0
        assert last.drafted_tokens >= last.accepted_tokens
        assert plain.stats.drafted_tokens == plain.stats.accepted_tokens == 0


def test_conversation_with_lookup_answers_every_turn_the_same(copier, images):
    model, processor, prompt = copier
    turns = [(prompt, images[:1]), ("Once more, the same text.", [])]
    answers = {}
    for lookup in (False, True):
        chat = Conversation(model, processor, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
        answers[lookup] = [
            chat.ask(text, media, max_tokens=40, prompt_lookup=lookup) for text, media in turns
        ]
    assert [a.tokens for a in answers[True]] == [a.tokens for a in answers[False]]
    assert all(a.stats.accepted_tokens > 0 for a in answers[True])


def test_a_conversation_measures_the_pass_cost_once(copier, flat_cost):
    model, processor, prompt = copier
    chat = Conversation(model, processor, vision_cache=VisionCache(), max_pixels=MAX_PIXELS)
    assert chat.lookup_cost is None
    for text in (prompt, "Once more, the same text.", "And again."):
        chat.ask(text, max_tokens=30, prompt_lookup=True, prompt_lookup_num_tokens=6)
    assert flat_cost == [7] and chat.lookup_cost == PassCost.flat(7)  # 6 drafted + 1 own token


def test_stopping_inside_a_draft_counts_only_what_was_given(copier):
    model, processor, prompt = copier
    whole = list(stream_generate(model, processor, prompt, max_tokens=40, prompt_lookup=True))
    tokens = [r.token for r in whole]
    # A draft token followed by another from the same draft, its id not seen before in the answer.
    at = next(
        i
        for i in range(len(whole) - 1)
        if whole[i].from_draft and whole[i + 1].from_draft and tokens[i] not in tokens[:i]
    )
    original = processor.tokenizer.eos_token_ids
    processor.tokenizer.eos_token_ids = frozenset({tokens[at]})
    try:
        responses = list(
            stream_generate(model, processor, prompt, max_tokens=40, prompt_lookup=True)
        )
    finally:
        processor.tokenizer.eos_token_ids = original
    assert [r.token for r in responses] == tokens[: at + 1]
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].accepted_tokens == sum(r.from_draft for r in responses)
    assert responses[-1].accepted_tokens < whole[-1].accepted_tokens


def test_options_are_declared_once_and_checked(copier):
    model, processor, prompt = copier
    with pytest.raises(MimoError, match="max_matching_ngram_size applies to prompt lookup"):
        generate(model, processor, prompt, max_tokens=2, max_matching_ngram_size=3)
    with pytest.raises(MimoError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        generate(model, processor, prompt, max_tokens=2, prompt_lookup_num_tokens=0)
    with pytest.raises(TypeError, match="prompt_lookup_num_tokens"):  # listed among the known
        generate(model, processor, prompt, max_tokens=2, prompt_lookup_tokens=3)
    # transformers' convention: giving the draft length turns lookup on.
    result = generate(model, processor, prompt, max_tokens=30, prompt_lookup_num_tokens=4)
    assert result.stats.drafted_tokens > 0


@pytest.fixture
def patched_cli(copier, monkeypatch):
    model, processor, prompt = copier
    monkeypatch.setattr(cli, "_load", lambda path, group=None: (model, processor))
    return prompt


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.main, list(args), input=input)


def test_cli_generate_flag_and_stats_line(patched_cli):
    base = ["generate", "--prompt", patched_cli, "--temp", "0", "-m", "40"]
    plain, looked = invoke(*base), invoke(*base, "--prompt-lookup")
    assert plain.exit_code == 0 and looked.exit_code == 0, looked.output
    assert looked.stdout == plain.stdout
    accepted, drafted = map(int, STATS.search(looked.stderr).groups())
    assert 0 < accepted <= drafted
    assert "prompt lookup" not in plain.stderr
    short = invoke(*base, "--prompt-lookup-num-tokens", "3", "--max-matching-ngram-size", "1")
    assert short.exit_code == 0 and short.stdout == plain.stdout and STATS.search(short.stderr)


def test_cli_chat_flag_and_stats_lines(patched_cli):
    lines = f"{patched_cli}\nAgain.\n"
    done = invoke("chat", "--temp", "0", "-m", "30", "--prompt-lookup", input=lines)
    assert done.exit_code == 0, done.output
    stats = [line for line in done.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(stats) == 2 and all("prompt lookup: " in line for line in stats)
    assert int(STATS.search(stats[0]).group(1)) > 0


def test_cli_refuses_bad_lookup_options_before_loading(monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda path: pytest.fail("loaded a model"))
    for command in ("generate", "chat"):
        args = [command, "--max-matching-ngram-size", "3"]
        done = invoke(*args, *(["--prompt", "x"] if command == "generate" else []))
        assert (
            done.exit_code == 1
            and "error: --max-matching-ngram-size applies to prompt lookup: also pass "
            "--prompt-lookup\n"
            == done.stderr
        )
        assert "Traceback" not in done.output
        done = invoke(command, "--prompt-lookup-num-tokens", "0")
        assert done.exit_code == 1
        assert done.stderr == "error: --prompt-lookup-num-tokens must be at least 1, got 0\n"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_says_what_the_defaults_are(command):
    text = re.sub(r"\s+", " ", invoke(command, "--help").stdout)
    assert "--prompt-lookup " in text
    assert (
        "--prompt-lookup-num-tokens INTEGER RANGE With --prompt-lookup: most tokens drafted" in text
    )
    assert "[default: 10]" in text and "[default: 2]" in text
