"""Structured output, enforced while decoding: JSON valid against a schema, or Qwen2.5-style tool
calls, through llguidance (the `structured` extra).

An `OutputFormat` says what the answer must be (`json_format`, `tool_call_format`); a `Constraint`
follows one generation. Before each token is drawn, llguidance computes on the host which tokens
the grammar allows next (while the model's forward pass runs), and every other logit becomes -inf
after the logits processors and before the sampler: temperature, top-k, top-p and min-p only see
tokens that keep the answer valid. Once the answer is complete only an end token is allowed, so
the answer always parses, unless max_tokens cuts it short (finish_reason "length").

MiMo reasons before it answers: the grammar lets it write anything up to `</think>` (but no end
token), then constrains what follows. `thinking="off"` (--no-think) constrains from the first
token; "opened" is for prompts whose chat template already opened `<think>`.

Prompt lookup works unchanged: a drafted token the grammar refuses is masked out of the row that
verifies it, so it is rejected like any wrong guess, and the grammar follows the tokens the cache
keeps (rolled back when a rejected draft is trimmed from the cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import mlx.core as mx
import numpy as np

from ..errors import MimoError
from ..inputs.tokenizer import Tokenizer

Thinking = Literal["optional", "opened", "off"]

# Whitespace between JSON tokens, one run at most this long: enough for pretty-printed JSON,
# bounded so that a model can never spend its whole budget on spaces and newlines.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"
_GAP = r"/[\x20\x0A\x0D\x09]{1,8}/"  # after </think>, between tool calls


def llguidance() -> Any:
    """The llguidance module; a MimoError that says how to install it when it is missing."""
    try:
        import llguidance as module  # noqa: PLC0415  (an extra: imported when asked for)
    except ImportError:
        raise MimoError(
            "structured output (JSON schemas, forced tool calls) needs its extra: pip install "
            '"mimo-mlx[structured]"'
        ) from None
    return module


@dataclass(frozen=True)
class OutputFormat:
    """What an answer must be, after any reasoning: Lark rules that define `answer` (they may use
    the rules `open_call` and `close_call`, Qwen's tool-call tags). `what` names it in errors."""

    rules: str
    what: str

    def check(self) -> None:
        """MimoError if llguidance cannot enforce it (an unsupported schema keyword, a bad
        pattern...): before any work is queued."""
        module = llguidance()
        grammar = module.LLMatcher.grammar_from_lark(_grammar(self, "off", set()))
        error = module.LLMatcher.validate_grammar(grammar)
        if error:
            raise MimoError(f"{self.what} cannot be enforced: {_first_line(error)}")


def _json_rule(name: str, schema: Any) -> str:
    """A Lark rule for JSON valid against `schema`, its whitespace bounded. A schema's own
    `x-guidance` settings are replaced: they could lift the bound or relax the schema."""
    if not isinstance(schema, dict):
        raise MimoError(f"a JSON schema must be an object, got {type(schema).__name__}")
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    schema["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}
    try:
        text = json.dumps(schema, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise MimoError(f"the JSON schema is not JSON ({err})") from None
    return f"{name}: %json {text}\n"


def json_format(schema: dict | None = None) -> OutputFormat:
    """JSON valid against `schema`; None: any JSON object (OpenAI's json_object)."""
    schema = {"type": "object"} if schema is None else schema
    return OutputFormat(_json_rule("answer", schema), "the JSON schema")


def tool_call_format(tools: list[dict], parallel: bool = True) -> OutputFormat:
    """Tool calls in Qwen2.5's format, one or more (exactly one unless `parallel`):

        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
        </tool_call>

    `tools` are OpenAI function objects ({"name", "parameters"}); the arguments must be valid
    against the named tool's parameters. The name and the key order are fixed, as the chat
    template shows them to the model."""
    if not tools:
        raise MimoError("a forced tool call needs at least one tool")
    rules, names = [], []
    for i, tool in enumerate(tools):
        head = json.dumps({"name": tool["name"]})[:-1] + ', "arguments": '
        names.append(f"call_{i}")
        rules.append(
            f'call_{i}: open_call {json.dumps(chr(10) + head)} args_{i} "}}\\n" close_call\n'
        )
        rules.append(_json_rule(f"args_{i}", tool.get("parameters") or {"type": "object"}))
    calls = "(call GAP?)+" if parallel else "call GAP?"
    answer = f"answer: {calls}\ncall: {' | '.join(names)}\n"
    return OutputFormat(answer + "".join(rules), "the tools' parameters")


def _grammar(fmt: OutputFormat, thinking: Thinking, tokens: set[str]) -> str:
    """The whole Lark grammar: what MiMo may write first, then `fmt`'s answer. A tag in `tokens`
    (single tokens of the tokenizer) is matched as that token, the way the model writes it;
    others as text."""

    def tag(text: str) -> str:
        return text if text in tokens else json.dumps(text)

    if "</think>" in tokens:
        # THOUGHT never holds a special token, so no end token while the model reasons.
        reasoning, lexeme = "THOUGHT </think>", "THOUGHT: /(.|\\n)*/\n"
    else:
        reasoning, lexeme = "thought", 'thought[suffix="</think>"]: /(.|\\n)*/\n'
    start = {
        "off": "start: GAP? answer\n",
        "optional": f"start: ({tag('<think>')} {reasoning})? GAP? answer\n",
        "opened": f"start: {reasoning} GAP? answer\n",
    }[thinking]
    tags = f"open_call: {tag('<tool_call>')}\nclose_call: {tag('</tool_call>')}\n"
    return start + lexeme + f"GAP: {_GAP}\n" + tags + fmt.rules


def _first_line(error: str) -> str:
    """llguidance's message, without where in our own grammar it arose."""
    line = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return re.sub(r"^at \d+\(\d+\): ", "", line)


TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


@lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer` for logits `vocab_size` wide (ids past the tokenizer's,
    the embedding's padding rows, are never allowed); the end tokens are the generation's. Built
    once per tokenizer (about a second for MiMo's 151k tokens), shared by every generation."""
    if vocab_size < tokenizer.vocab_size:
        raise MimoError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's logits only "
            f"{vocab_size}: they do not belong together"
        )
    module = llguidance()
    return module.LLTokenizer(
        tokenizer.to_json(), n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)
    )


@mx.compile
def _mask_logits(logits: mx.array, words: mx.array) -> mx.array:
    """logits (R, V) with the tokens whose bit is clear in `words` (R, W) uint32 at -inf (bit
    t % 32 of word t // 32 is token t), unpacked on the device."""
    bits = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1  # (R, W, 32)
    allowed = bits.reshape(words.shape[0], -1)[:, : logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


class Constraint:
    """One generation's grammar: masks the logits of each step (see the module docstring).

    Not thread-safe and not reusable: one per generation. The first `mask` call is the prompt's
    last pass; each later call feeds the tokens the model was given (the one sampled last, then
    any draft) at cache `offset`, rolling the grammar back to the tokens the cache still holds.
    """

    def __init__(
        self, fmt: OutputFormat, tokenizer: Tokenizer, vocab_size: int, thinking: Thinking
    ) -> None:
        module = llguidance()
        present = {text for text in TAGS if tokenizer.has_token(text)}
        grammar = module.LLMatcher.grammar_from_lark(_grammar(fmt, thinking, present))
        lltokenizer = grammar_tokenizer(tokenizer, vocab_size)
        self._matcher = module.LLMatcher(lltokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise MimoError(
                f"{fmt.what} cannot be enforced: {_first_line(self._matcher.get_error())}"
            )
        self._words = (vocab_size + 31) // 32
        self._ends = tokenizer.eos_token_ids
        self._start: int | None = None  # cache offset where the answer begins
        self._consumed = 0  # answer tokens the grammar has taken

    def mask(self, logits: mx.array, input_ids: mx.array, offset: int) -> mx.array:
        """`logits` (R, V) for the last R of `input_ids` (1, L), fed at cache `offset`, with
        every token the grammar refuses at -inf. Reads the fed tokens on the host: queue the
        forward pass first, so that the grammar works while it runs."""
        rows, length = logits.shape[0], input_ids.shape[1]
        bitmask = np.full((rows, self._words), -1, dtype=np.int32)
        if self._start is None:  # the prompt's last pass: nothing of the answer yet
            self._start = offset + length
            self._fill(bitmask, 0)
        else:
            self._rollback_to(offset - self._start)
            self._feed(input_ids[0].tolist(), bitmask)
        return _mask_logits(logits, mx.array(bitmask.view(np.uint32)))

    @property
    def complete(self) -> bool:
        """The answer so far is complete: only an end token may follow."""
        return self._matcher.is_stopped()

    def _feed(self, tokens: list[int], bitmask: np.ndarray) -> None:
        """Take tokens[0] (sampled under the last mask) and as much of the draft after it as the
        grammar accepts; row i gets the mask after tokens[: i + 1]. Rows past a refused draft
        token are never used (verification stops before them) and stay all-allowed, as do the
        rows after an end token (the step after it is queued before the caller sees it, and
        never used)."""
        if tokens[0] in self._ends:
            return
        self._consume([tokens[0]])
        self._fill(bitmask, 0)
        draft = tokens[1 : bitmask.shape[0]]
        valid = self._matcher.validate_tokens(draft) if draft else 0
        for i, token in enumerate(draft[:valid], start=1):
            self._consume([token])
            self._fill(bitmask, i)

    def _consume(self, tokens: list[int]) -> None:
        if not self._matcher.consume_tokens(tokens):
            # Only a bug gets here: every token fed was sampled under this grammar's mask.
            raise RuntimeError(
                f"the grammar refused token(s) {tokens}: {self._matcher.get_error()}"
            )
        self._consumed += len(tokens)

    def _rollback_to(self, kept: int) -> None:
        """Forget answer tokens the cache no longer holds (a rejected draft was trimmed)."""
        if kept > self._consumed:
            raise RuntimeError(
                f"the cache holds {kept} answer tokens, the grammar {self._consumed}"
            )
        if kept < self._consumed:
            self._matcher.rollback(self._consumed - kept)
            self._consumed = kept

    def _fill(self, bitmask: np.ndarray, row: int) -> None:
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.ctypes.data, view.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"the grammar failed: {self._matcher.get_error()}")
