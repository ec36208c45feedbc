"""How far a quantized KV cache moves the logits, measured: where the bounds in
`tests/test_quantized_cache.py` (and the README's figures) come from.

    python -m benchmarks.kv_fidelity --out benchmarks/results/kv-fidelity.json

Tiny random models in float32 (the tests' own builders, head dimension 64), seeds 61 to 70, each
as drawn and "decisive" (the head tied to permuted embeddings, residual writes halved, as the
tests' held-out models), on the parity prompts (text, two images, a video, long text then an
image). Per cache (bits and group size) it reports, against the same model with a full-precision
cache, over the prompts' every position: the largest and the mean |logit difference| relative to
the largest |logit|, the Pearson correlation of all the logits, the share of positions whose top
token agrees; and for 8 bits, where a greedy answer of `--tokens` tokens parts from the float
one, the float step's gap between its two best tokens against how far the step's log-probabilities
moved (a flip needs gap < 2 x moved).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from .machine import provenance, write_json

REPO = Path(__file__).resolve().parent.parent
CACHES = {"8bit-g64": (8, 64), "8bit-g32": (8, 32), "4bit-g64": (4, 64), "4bit-g32": (4, 32)}


def _test_helpers():
    """The tests' tiny-model builders and parity prompts (tests/ is not a package)."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_bfloat16  # noqa: PLC0415
    import test_quantized_cache  # noqa: PLC0415
    import tiny_models  # noqa: PLC0415

    return test_quantized_cache, test_bfloat16.parity_prompts, tiny_models


def measure(seeds: range, tokens: int) -> dict:
    from mimo_mlx import load_model  # noqa: PLC0415
    from mimo_mlx.generation.loop import generate_step  # noqa: PLC0415

    kv, parity_prompts, tiny = _test_helpers()
    rows, parted = {name: [] for name in CACHES}, []

    class Factory:  # what decisive_model wants of pytest's tmp_path_factory
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    for decisive in (False, True):
        for seed in seeds:
            if decisive:
                model = kv.decisive_model(seed, Factory())
            else:
                folder = Path(tempfile.mkdtemp())
                model = load_model(
                    tiny.save_checkpoint(tiny.tiny_hf_model(seed=seed, **tiny.WIDE_HEADS), folder)
                )
            for name, (ids, vision) in parity_prompts(np.random.default_rng(seed)).items():
                base = np.array(tiny.mlx_logits(model, ids, cache=model.make_cache(), **vision))
                scale = np.abs(base).max()
                for cache, (bits, group) in CACHES.items():
                    quantized = model.make_cache(kv_bits=bits, kv_group_size=group)
                    ours = np.array(tiny.mlx_logits(model, ids, cache=quantized, **vision))
                    diff = np.abs(ours - base)
                    rows[cache].append(
                        {
                            "max_rel": float(diff.max() / scale),
                            "mean_rel": float(diff.mean() / scale),
                            "correlation": float(np.corrcoef(ours.ravel(), base.ravel())[0, 1]),
                            "top1_agree": float((ours.argmax(-1) == base.argmax(-1)).mean()),
                        }
                    )

                ours, theirs = (
                    [
                        (t, np.array(lp))
                        for t, lp in generate_step(
                            model.prepare_prompt(ids, **vision),
                            model,
                            max_tokens=tokens,
                            kv_bits=bits,
                        )
                    ]
                    for bits in (8, None)
                )
                pairs = zip(ours, theirs, strict=True)
                step = next((i for i, (a, b) in enumerate(pairs) if a[0] != b[0]), None)
                if step is not None:
                    best, second = np.sort(theirs[step][1])[-2:][::-1]
                    moved = np.abs(ours[step][1] - theirs[step][1]).max()
                    parted.append(
                        {
                            "seed": seed,
                            "decisive": decisive,
                            "prompt": name,
                            "step": step,
                            "gap": float(best - second),
                            "moved": float(moved),
                        }
                    )
    summary = {
        cache: {
            "runs": len(found),
            "max_rel": max(r["max_rel"] for r in found),
            "mean_rel": max(r["mean_rel"] for r in found),
            "min_correlation": min(r["correlation"] for r in found),
            "top1_agree_mean": float(np.mean([r["top1_agree"] for r in found])),
        }
        for cache, found in rows.items()
    }
    answers = 2 * len(seeds) * 4
    return {"summary": summary, "8bit_answers": answers, "8bit_parted": parted}


@click.command()
@click.option("--first-seed", default=61, show_default=True)
@click.option("--seeds", "count", default=10, show_default=True)
@click.option("--tokens", default=24, show_default=True, help="Greedy tokens per answer.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the result here as JSON.")
def main(first_seed: int, count: int, tokens: int, out: Path | None) -> None:
    """Measure how far 8- and 4-bit caches move tiny models' logits and greedy answers."""
    result = {
        **provenance("benchmarks.kv_fidelity"),
        **measure(range(first_seed, first_seed + count), tokens),
    }
    write_json(result, out)


if __name__ == "__main__":
    main()
