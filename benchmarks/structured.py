"""What structured output costs: decode tok/s with and without a JSON schema enforced.

    python -m benchmarks.structured --scale small --out /tmp/structured

The model is the harness's synthetic config at `--scale` (`synthetic.scaled_config`) with random
weights, built in memory; the tokenizer a byte-level BPE trained in-process on Python's own
library sources to the model's whole vocabulary (a grammar's work per step grows with the number
and shapes of the tokens, so a byte-level toy vocabulary would flatter it), plus the end tokens.
The prompt is random text ids. Both ways decode exactly `--tokens` tokens greedily with
`generate_step`, alternating run by run in one process, under a schema the answer cannot finish
in that many tokens (a list of at least 64 GUI actions), without reasoning first.

Figures: decode tok/s ((tokens - 1) / (last token time - first token time)) both ways, their
ratio (target: at most 10% slower), and the grammar's own cost per token: the tokens the
constrained run chose fed again through a fresh constraint (llguidance's mask and its application
to the logits), timed step by step. Results: `OUT/results.json` and a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mimo_mlx.generation.constrained import Constraint, json_format
from mimo_mlx.generation.loop import generate_step
from mimo_mlx.inputs.tokenizer import Tokenizer as MimoTokenizer
from mimo_mlx.model.config import ModelConfig
from mimo_mlx.model.mimo_vl import Model

from .machine import git_state, machine_info, versions
from .stats import summarize
from .synthetic import scaled_config

TARGET_SLOWDOWN = 0.10
END_TOKENS = ("<|endoftext|>", "<|im_end|>")
ACTION = {
    "type": "object",
    "properties": {
        "action": {"enum": ["click", "scroll", "input", "drag", "press", "finished"]},
        "start_point": {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 2,
            "maxItems": 2,
        },
        "text": {"type": "string"},
    },
    "required": ["action", "start_point"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"steps": {"type": "array", "items": ACTION, "minItems": 64}},
    "required": ["steps"],
    "additionalProperties": False,
}


def corpus(limit_bytes: int = 16 << 20):
    """Python's standard library sources: English prose and code, enough for 32k merges."""
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text
        if total > limit_bytes:
            return


def trained_tokenizer(vocab_size: int) -> MimoTokenizer:
    """A Qwen-like byte-level BPE of `vocab_size` ids, the end tokens last."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(END_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True) for t in END_TOKENS])
    return MimoTokenizer(backend, config={"eos_token": "<|im_end|>"})


def random_model(config: dict, seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelConfig.from_hf(config))
    mx.eval(model.parameters())
    return model


def decode(model, tokenizer, prompt, tokens: int, constrained: bool) -> tuple[float, list[int]]:
    """(decode tok/s, the tokens) of one greedy generation of exactly `tokens` tokens."""
    constraint = None
    if constrained:
        vocab = model.config.text.vocab_size
        constraint = Constraint(json_format(SCHEMA), tokenizer, vocab, "off")
    out, times = [], []
    for token, _ in generate_step(prompt, model, max_tokens=tokens, constraint=constraint):
        times.append(time.perf_counter())
        out.append(token)
    if any(t in tokenizer.eos_token_ids for t in out):
        raise RuntimeError("the answer ended early; the decode rates would not compare")
    return (len(out) - 1) / (times[-1] - times[0]), out


def grammar_cost(model, tokenizer, answer: list[int]) -> list[float]:
    """Seconds per step of the grammar alone along `answer`: mask, then apply it to logits."""
    vocab = model.config.text.vocab_size
    constraint = Constraint(json_format(SCHEMA), tokenizer, vocab, "off")
    logits = mx.zeros((1, vocab))
    mx.eval(constraint.mask(logits, mx.array([[0]]), 0))  # the prompt's pass
    costs = []
    for offset, token in enumerate(answer[:-1], start=1):
        fed = mx.array([[token]])
        mx.eval(fed)
        start = time.perf_counter()
        mx.eval(constraint.mask(logits, fed, offset))
        costs.append(time.perf_counter() - start)
    return costs


def measure(scale: str, tokens: int, runs: int, prompt_tokens: int = 64) -> dict:
    config = scaled_config(scale)
    vocab = config["vocab_size"]
    tokenizer = trained_tokenizer(vocab)
    model = random_model(config)
    limit = min(config["bos_token_id"], config["vision_start_token_id"], tokenizer.vocab_size - 2)
    prompt = np.random.default_rng(0).integers(0, limit, prompt_tokens)
    plain, constrained, answer = [], [], []
    decode(model, tokenizer, prompt, tokens, False)  # warm-up both ways
    decode(model, tokenizer, prompt, tokens, True)
    for _ in range(runs):  # alternating: a busy machine slows both alike
        plain.append(decode(model, tokenizer, prompt, tokens, False)[0])
        rate, answer = decode(model, tokenizer, prompt, tokens, True)
        constrained.append(rate)
    ratio = float(np.median(constrained) / np.median(plain))
    return {
        "scale": scale,
        "vocab_size": vocab,
        "tokenizer_tokens": tokenizer.vocab_size,
        "decoder": {k: config[k] for k in ("hidden_size", "num_hidden_layers")},
        "tokens": tokens,
        "runs": runs,
        "plain_tok_s": summarize(plain),
        "json_schema_tok_s": summarize(constrained),
        "ratio": ratio,
        "slowdown": 1 - ratio,
        "target": f"at most {TARGET_SLOWDOWN:.0%} slower",
        "met": 1 - ratio <= TARGET_SLOWDOWN,
        "grammar_s_per_token": summarize(grammar_cost(model, tokenizer, answer)),
        "answer_start": tokenizer.decode(answer[:40]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.scale, args.tokens, args.runs)
    report = {
        "command": " ".join(["python -m benchmarks.structured", *(argv or sys.argv[1:])]),
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "result": result,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plain, schema = result["plain_tok_s"]["median"], result["json_schema_tok_s"]["median"]
    cost = result["grammar_s_per_token"]["median"] * 1e6
    print(
        f"{args.scale}: decode {plain:.1f} tok/s plain, {schema:.1f} tok/s with a JSON schema "
        f"({result['slowdown']:+.1%} slower; target {result['target']}); the grammar alone "
        f"{cost:.0f} us per token over {result['tokenizer_tokens']} tokens"
    )
    return report


if __name__ == "__main__":
    main()
