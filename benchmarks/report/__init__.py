"""results.json (everything, to reproduce) and results.md (tables, targets); chart.py draws the PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .chart import chart
from .ranks import ranks_markdown
from .synthetic import checkpoint_shapes

GB = 1e9


def size_plans(settings: dict) -> list[dict]:
    """Warm-up and timed runs per vision size, as the harness ran them."""
    cutoff, per_size = settings.get("large_warmup_from"), settings.get("size_runs", {})
    return [
        {
            "size": size,
            "warmup": 0 if cutoff and size >= cutoff else settings["warmup"],
            "runs": int(per_size.get(size, per_size.get(str(size), settings["runs"]))),
        }
        for size in sorted(settings["sizes"])
    ]


def vision_weight_bytes(config: dict, bytes_per_param: int = 4) -> int:
    """Vision tower and merger weights in the dtype they are computed in."""
    shapes = checkpoint_shapes(config)
    return bytes_per_param * sum(math.prod(s) for k, s in shapes.items() if k.startswith("visual."))


def vision_work(config: dict, size: int) -> dict:
    """FLOPs of matmuls and count of softmax exps in one vision pass over a size x size image.

    Linear layers: 2 * rows * weights; attention: QK^T and PV (4 * N * keys * C) and N * keys
    exps per head, with N keys per frame in full-attention blocks and one window's patches in the
    others; patch embedding and merger included. Window padding at image edges is ignored.
    """
    v = config["vision_config"]
    c, inner, heads, depth = v["hidden_size"], v["intermediate_size"], v["num_heads"], v["depth"]
    merge, out = v["spatial_merge_size"] ** 2, v["out_hidden_size"]
    side = 2 * round(size / 28)  # patches per side after the processor resizes to 28k
    n = side * side
    window = min(n, (v["window_size"] // v["patch_size"]) ** 2)
    full = len(v["fullatt_block_indexes"])
    linear = 2 * n * (4 * c * c + 3 * c * inner) * depth
    linear += 2 * n * 1176 * c + 2 * (n // merge) * ((merge * c) ** 2 + merge * c * out)
    keys = full * n + (depth - full) * window  # keys per query, summed over blocks
    return {"patches": n, "matmul_flops": linear + 4 * n * keys * c, "exps": n * keys * heads}


def vision_floor(config: dict, size: int, bounds: dict) -> dict | None:
    """Seconds the backend's kernels alone need for one vision pass (matmuls at the measured ViT
    matmul rate, exps at the measured softmax rate, nothing overlapped)."""
    gflops = _dig(bounds, ("matmul_gflops_f32", "vit_mlp_x1280x3456"))
    rate = _dig(bounds, ("elements_per_s", "mlx_softmax"))
    if not gflops or not rate:
        return None
    work = vision_work(config, size)
    matmul_s, softmax_s = work["matmul_flops"] / (gflops * 1e9), work["exps"] / rate
    return {**work, "matmul_s": matmul_s, "softmax_s": softmax_s, "floor_s": matmul_s + softmax_s}


def _median(entry: dict | None, key: str):
    if not entry or "error" in entry or key not in entry:
        return None
    return entry[key]["median"]


def _fmt(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}g}{unit}"


def _vision_row(entry: dict | None, size: int) -> dict | None:
    if not entry or "error" in entry:
        return None
    return next((s for s in entry["sizes"] if s["size"] == size), None)


def _compare(found: list, target: str, ours, theirs, higher_is_better: bool) -> None:
    met = None
    if ours is not None and theirs is not None:
        met = ours >= theirs if higher_is_better else ours <= theirs
    found.append({"target": target, "measured": f"{_fmt(ours)} vs {_fmt(theirs)}", "met": met})


def targets(report: dict) -> list[dict]:
    """Each target with the measured numbers and whether it is met (None: unmeasured).

    mimo-mlx at least as fast as mlx-vlm on every figure (decode and time to first token per
    variant, vision encode per size); decode overhead above the bare kernels under 5%; the vision
    graph at most half of mlx-vlm's operations; a 1344x1344 encode within the vision weights plus
    1.5 GB; on a GPU, the largest image encoded 2x faster than mlx-vlm and faster than torch;
    prompt lookup (`lookup_targets`).
    """
    res, found = report["results"], []
    gen = res["generate"]
    for variant in report["settings"]["variants"] if gen else ():
        ours, theirs = gen.get(f"mimo-mlx/{variant}"), gen.get(f"mlx-vlm/{variant}")
        _compare(
            found,
            f"decode tok/s >= mlx-vlm's ({variant})",
            _median(ours, "decode_tps"),
            _median(theirs, "decode_tps"),
            higher_is_better=True,
        )
        _compare(
            found,
            f"time to first token <= mlx-vlm's ({variant})",
            _median(ours, "ttft_s"),
            _median(theirs, "ttft_s"),
            higher_is_better=False,
        )
        over = (ours or {}).get("overhead")
        found.append(
            {
                "target": f"decode overhead above the kernels < 5% ({variant})",
                "measured": "-" if not over else f"{100 * over['overhead']:.1f}%",
                "met": None if not over else over["overhead"] < 0.05,
            }
        )
    vision = res["vision"]
    for size in sorted(report["settings"]["sizes"]) if vision else ():
        ours, theirs = (
            _vision_row(vision.get("mimo-mlx"), size),
            _vision_row(vision.get("mlx-vlm"), size),
        )
        _compare(
            found,
            f"vision {size}x{size} encode s <= mlx-vlm's",
            ours and ours["seconds"]["median"],
            theirs and theirs["seconds"]["median"],
            higher_is_better=False,
        )
    size = max(report["settings"]["sizes"])
    ours = _vision_row(vision.get("mimo-mlx"), size)
    on_gpu = (vision.get("mimo-mlx") or {}).get("backend", {}).get("device") == "gpu"
    for other, factor in (("mlx-vlm", 2.0), ("torch", 1.0)) if on_gpu else ():
        theirs = _vision_row(vision.get(other), size)
        if ours and theirs:
            speedup = theirs["seconds"]["median"] / ours["seconds"]["median"]
            found.append(
                {
                    "target": f"GPU: vision {size}x{size} >= {factor:g}x faster than {other}",
                    "measured": f"{speedup:.2f}x",
                    "met": speedup >= factor if factor > 1 else speedup > 1,
                }
            )
    for variant, entry in res.get("multiturn", {}).items():
        if "error" not in entry:
            found.append(
                {
                    "target": f"turn 2 TTFT with reuse >= 5x shorter ({variant})",
                    "measured": f"{entry['speedup']:.1f}x",
                    "met": entry["speedup"] >= 5,
                }
            )
    found += lookup_targets(res.get("prompt_lookup", {}))
    ops_a = (vision.get("mimo-mlx") or {}).get("ops", {}).get("ops")
    ops_b = (vision.get("mlx-vlm") or {}).get("ops", {}).get("ops")
    if ops_a and ops_b:
        found.append(
            {
                "target": "vision MLX ops <= half of mlx-vlm's",
                "measured": f"{ops_a} vs {ops_b} ({ops_a / ops_b:.2f})",
                "met": ops_a <= ops_b / 2,
            }
        )
    if ours:
        limit = vision_weight_bytes(report["settings"]["config"]) + 1.5 * GB
        peak = ours["peak_memory_bytes"]
        found.append(
            {
                "target": f"vision {size} peak <= vision weights + 1.5 GB ({limit / GB:.2f} GB)",
                "measured": f"{peak / GB:.2f} GB",
                "met": peak <= limit,
            }
        )
    return found


def markdown(report: dict) -> str:
    """The human-readable report: setup, one table per measurement, targets, what was skipped."""
    sections = (
        _header,
        _vision,
        _generation,
        _overhead,
        _multiturn,
        _lookup,
        _ranks,
        _ops,
        _syncs,
        _bounds,
        _floor,
        _targets,
        _skipped,
    )
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _header(report: dict) -> list[str]:
    s, m, v = report["settings"], report["machine"], report["versions"]
    commit = (report["git"]["commit"] or "?")[:12]
    weights = (
        "synthetic random (real key names and shapes at this scale)"
        if s["weights"]["synthetic"]
        else s["weights"]["source"]
    )
    plans = ", ".join(f"{p['size']}: {p['warmup']}+{p['runs']}" for p in size_plans(s))
    return [
        f"# mimo-mlx benchmark: scale `{report['scale']}`",
        "",
        f"`{report['command']}` at {report['started_utc']}, commit `{commit}`"
        + (" (uncommitted changes)" if report["git"]["dirty"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        f"MLX float dtype {s['mlx_float_dtype']}; OpenBLAS preloaded into MLX processes: "
        f"{s['openblas_preload'] or 'no'}. Weights: {weights}.",
        "Repetitions (median of timed runs; spread = (max - min) / median): vision "
        f"{plans} (warm-up + timed); generation {s['gen_warmup']}+{s['gen_runs']}"
        + (
            f"; {s['rounds']} rounds, runtimes taking turns, runs pooled."
            if s.get("rounds", 1) > 1
            else "."
        ),
    ]


def _vision(report: dict) -> list[str]:
    res = report["results"]["vision"]
    runtimes = [r for r in report["settings"]["runtimes"] if r in res]
    if not runtimes:
        return []
    lines = [
        "",
        "## Vision tower (encode one image; seconds, median (spread); peak memory)",
        "",
        "| image | patches | "
        + " | ".join(f"{r} s | {r} peak GB" for r in runtimes)
        + " | mlx-vlm / mimo-mlx | torch / mimo-mlx |",
        "|" + "---|" * (2 + 2 * len(runtimes) + 2),
    ]
    for size in sorted(report["settings"]["sizes"]):
        rows = {r: _vision_row(res[r], size) for r in runtimes}
        any_row = next((x for x in rows.values() if x), None)
        cells = [f"{size}x{size}", str(any_row["patches"]) if any_row else "-"]
        for row in rows.values():
            cells += (
                [
                    f"{row['seconds']['median']:.3g} ({100 * row['seconds']['spread']:.0f}%)",
                    f"{row['peak_memory_bytes'] / GB:.2f}",
                ]
                if row
                else ["-", "-"]
            )
        ours = rows.get("mimo-mlx")
        for other in ("mlx-vlm", "torch"):
            row = rows.get(other)
            ratio = row["seconds"]["median"] / ours["seconds"]["median"] if row and ours else None
            cells.append(_fmt(ratio, 3, "x"))
        lines.append("| " + " | ".join(cells) + " |")
    done = {r: e["sizes"] for r, e in res.items() if e.get("sizes")}
    grids = {row["size"]: row["grid_thw"] for rows in done.values() for row in rows}
    resized = ", ".join(f"{size} -> {14 * g[1]}x{14 * g[2]}" for size, g in sorted(grids.items()))
    methods = "; ".join(f"{r}: {rows[0]['memory_method']}" for r, rows in done.items())
    lines += ["", f"Images are resized to multiples of 28 as the processor does ({resized})."]
    lines += [f"Peak memory: {methods}."]
    lines += [
        f"{r} failed: {e['error']} (see work/vision-{r}.log)"
        for r, e in res.items()
        if "error" in e
    ]
    return lines


def _generation(report: dict) -> list[str]:
    res = report["results"]["generate"]
    if not res:
        return []
    lines = [
        "",
        "## Generation (one image in the prompt, greedy, fixed token count)",
        "",
        "| runtime | variant | device / dtype | prompt tokens | TTFT s | prefill tok/s "
        "| decode tok/s | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tokens = {}
    for key, entry in res.items():
        runtime, variant = key.split("/")
        if "error" in entry:
            lines.append(f"| {runtime} | {variant} | failed: {entry['error']} | | | | | |")
            continue
        b = entry["backend"]
        tokens[key] = entry["tokens"]
        lines.append(
            f"| {runtime} | {variant} | {b['device']} / {b['dtype']} | {entry['prompt_tokens']} | "
            f"{_fmt(entry['ttft_s']['median'])} | {_fmt(entry['prefill_tps']['median'])} | "
            f"{_fmt(entry['decode_tps']['median'])} ({100 * entry['decode_tps']['spread']:.0f}%) | "
            f"{entry['peak_memory_bytes'] / GB:.2f} |"
        )
    if tokens:
        entry = next(e for e in res.values() if "error" not in e)
        same = ", ".join(
            f"{k} {'yes' if t == tokens.get('mimo-mlx/' + k.split('/')[1]) else 'no'}"
            for k, t in tokens.items()
        )
        lines += [
            "",
            f"Image {entry['image_size']}x{entry['image_size']}, {entry['decode_tokens']} "
            "decoded tokens; TTFT includes vision encoding and prefill, prefill tok/s = prompt "
            "tokens / TTFT, decode tok/s = (tokens - 1) / (last - first token time). "
            f"Greedy tokens equal to mimo-mlx's of the same variant: {same}.",
        ]
    return lines


def _overhead(report: dict) -> list[str]:
    rows = [
        f"| {key.split('/')[1]} | {1e3 * o['step_s']:.3f} | "
        f"{1e3 * o['kernels_step_s']['median']:.3f} | {100 * o['overhead']:.1f}% |"
        for key, entry in report["results"]["generate"].items()
        if (o := entry.get("overhead"))
    ]
    if not rows:
        return []
    return [
        "",
        "## Decode overhead (mimo-mlx step vs the same MLX kernels alone)",
        "",
        "| variant | mimo-mlx ms/step | kernels ms/step | overhead |",
        "|---|---|---|---|",
        *rows,
    ]


def _multiturn(report: dict) -> list[str]:
    rows = []
    for variant, entry in report["results"].get("multiturn", {}).items():
        if "error" in entry:
            rows.append(f"| {variant} | failed: {entry['error']} | | | |")
            continue
        for name in ("without_reuse", "with_reuse"):
            e = entry[name]
            rows.append(
                f"| {variant} | {name.replace('_', ' ')} | {e['prompt_tokens']} | "
                f"{e['prefilled_tokens']} | {_fmt(e['ttft_s']['median'])} |"
            )
        rows.append(f"| {variant} | speedup | | | {entry['speedup']:.1f}x |")
    if not rows:
        return []
    return [
        "",
        "## Multi-turn: a second question about the same image",
        "",
        "Turn 2 of a conversation whose turn 1 showed the image: with reuse (mimo-mlx's",
        "Conversation: cached tokens kept, the image not encoded again) and without (the whole",
        "conversation through stream_generate from scratch, as a runtime that keeps nothing does).",
        "",
        "| variant | turn 2 | prompt tokens | tokens computed | TTFT s |",
        "|---|---|---|---|---|",
        *rows,
    ]


LOOKUP_COPY_SPEEDUP = 1.5  # copy-heavy task: at least this much faster with prompt lookup
LOOKUP_PLAIN_SLOWDOWN = 0.05  # plain tasks: at most this much slower


def lookup_targets(results: dict) -> list[dict]:
    """Per variant: the same tokens; the copy task 1.5x faster; the others at most 5% slower."""
    found = []
    for variant, entry in results.items():
        if "error" in entry:
            continue
        tasks = entry["tasks"]
        same = all(t["identical"] for t in tasks.values())
        found.append(
            {
                "target": f"prompt lookup: the same greedy tokens on every task ({variant})",
                "measured": "same" if same else "different",
                "met": same,
            }
        )
        for name, task in tasks.items():
            floor = LOOKUP_COPY_SPEEDUP if name == "copy" else 1 - LOOKUP_PLAIN_SLOWDOWN
            found.append(
                {
                    "target": f"prompt lookup, {name} task: tok/s >= {floor:g}x without ({variant})",
                    "measured": f"{task['speedup']:.2f}x",
                    "met": task["speedup"] >= floor,
                }
            )
    return found


def _lookup(report: dict) -> list[str]:
    rows = []
    for variant, entry in report["results"].get("prompt_lookup", {}).items():
        if "error" in entry:
            rows.append(f"| {variant} | failed: {entry['error']} | | | | | |")
            continue
        for name, task in entry["tasks"].items():
            for mode in ("without", "with"):
                e = task[mode]
                speedup = f"{task['speedup']:.2f}x" if mode == "with" else ""
                drafts = f"{e['accepted']} / {e['drafted']}" if mode == "with" else ""
                rows.append(
                    f"| {variant} | {name} | {mode} | {e['tokens_per_pass']:.2f} | {drafts} | "
                    f"{_fmt(e['decode_tps']['median'])} | {speedup} |"
                )
    if not rows:
        return []
    tokens = next(iter(report["results"]["prompt_lookup"].values())).get("answer_tokens", "")
    return [
        "",
        "## Prompt lookup (mimo-mlx, greedy)",
        "",
        f"A {tokens}-token answer with and without prompt lookup on a synthetic model whose",
        "greedy choice follows a fixed chain of tokens (benchmarks/lookup.py). copy: the prompt",
        "holds the chain, so the answer repeats prompt text; plain: random text instead; shuffled:",
        "the chain's tokens in random order (every lookup finds a match, every draft would be wrong).",
        "This measures the mechanism, not MiMo-VL's acceptance rates. On a CPU, MLX's quantized",
        "matmul costs a decode step per verified token, so 4-bit cannot gain there.",
        "",
        "| variant | task | lookup | tokens/pass | accepted / drafted | decode tok/s | speedup |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _ranks(report: dict) -> list[str]:
    return ranks_markdown(report["results"].get("ranks", {}))


def _ops(report: dict) -> list[str]:
    ops = {r: e["ops"] for r, e in report["results"]["vision"].items() if e.get("ops")}
    if not ops:
        return []
    lines = [
        "",
        "## MLX operations in one vision forward pass",
        "",
        "| runtime | image | ops | top primitives | note |",
        "|---|---|---|---|---|",
    ]
    for r, o in ops.items():
        top = ", ".join(f"{k} {n}" for k, n in list(o.get("by_op", {}).items())[:5])
        lines.append(f"| {r} | {o['size']} | {o['ops']} | {top} | {o.get('note', '')} |")
    return lines


def _syncs(report: dict) -> list[str]:
    rows = []
    for runtime, entry in report["results"]["vision"].items():
        for row in entry.get("sizes", []):
            if row.get("host_syncs"):
                rows.append(
                    f"| {runtime} | vision pass {row['size']}x{row['size']} | "
                    f"{row['host_syncs']['host_syncs']} |"
                )
    for key, entry in report["results"]["generate"].items():
        syncs = entry.get("host_syncs")
        if syncs:
            rows.append(
                f"| {key} | prompt to first token | {syncs['to_first_token']['host_syncs']} |"
            )
            rows.append(f"| {key} | per decode step | {syncs['per_decode_step']:.2f} |")
    if not rows:
        return []
    return [
        "",
        "## Host syncs (the host waits for the device: mx.eval, mx.synchronize, item, tolist)",
        "",
        "On a GPU each one is a pipeline bubble. On the CPU mimo-mlx evaluates large vision passes",
        "in pieces to bound the attention scores it would otherwise hold; on Metal and CUDA in half",
        "precision the pass is one lazy graph.",
        "",
        "| runtime | what | host syncs |",
        "|---|---|---|",
        *rows,
    ]


def _bounds(report: dict) -> list[str]:
    bounds = report.get("kernel_bounds", {})
    if not bounds:
        return []
    lines = [
        "",
        "## Kernel bounds of this backend",
        "",
        "| measure | " + " | ".join(bounds) + " |",
        "|---|" + "---|" * len(bounds),
    ]
    for label, path in _BOUND_ROWS:
        lines.append(
            f"| {label} | " + " | ".join(_fmt(_dig(b, path)) for b in bounds.values()) + " |"
        )
    return lines


def _floor(report: dict) -> list[str]:
    found = report.get("vision_kernel_floor") or floors(report)
    if not any(v for sizes in found.values() for v in sizes.values()):
        return []
    lines = [
        "",
        "## Vision kernel floor (the backend's kernels alone, measured rates above)",
        "",
        "| bounds | image | matmul TFLOP | matmul s | exps (G) | softmax s | floor s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, sizes in found.items():
        for size, f in sizes.items():
            if f:
                lines.append(
                    f"| {name} | {size} | {f['matmul_flops'] / 1e12:.2f} | {f['matmul_s']:.3g} | "
                    f"{f['exps'] / 1e9:.2f} | {f['softmax_s']:.3g} | {f['floor_s']:.3g} |"
                )
    return lines


def _targets(report: dict) -> list[str]:
    found = targets(report)
    if not found:
        return []
    lines = ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in found:
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return lines


def _skipped(report: dict) -> list[str]:
    if not report["skipped"]:
        return []
    return ["", "## Skipped", ""] + [
        f"- {x['runtime']} {x['variant']} ({x['task']}): {x['reason']}" for x in report["skipped"]
    ]


_BOUND_ROWS = [
    ("matmul f32 square (1024^3) GFLOPS", ("matmul_gflops_f32", "square_f32")),
    ("matmul f32 ViT MLP (1024x1280x3456) GFLOPS", ("matmul_gflops_f32", "vit_mlp_x1280x3456")),
    ("4-bit quantized matmul 1x4096 @ 4096x4096 GFLOPS", ("quantized_matmul_gflops_4bit", "m1")),
    ("4-bit quantized matmul 64x4096 @ 4096x4096 GFLOPS", ("quantized_matmul_gflops_4bit", "m64")),
    ("MLX exp elements/s", ("elements_per_s", "mlx_exp")),
    ("MLX exp, mx.compile'd, elements/s", ("elements_per_s", "mlx_exp_compiled")),
    ("MLX softmax elements/s", ("elements_per_s", "mlx_softmax")),
    ("MLX add elements/s", ("elements_per_s", "mlx_add")),
    ("numpy exp elements/s", ("elements_per_s", "numpy_exp")),
    (
        "softmax of 1344x1344 full attention (5.4 G exps) s",
        ("full_attention_softmax_1344_s", "at_mlx_softmax_rate"),
    ),
]


def _dig(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def floors(report: dict) -> dict:
    """Per kernel-bounds run (as is / OpenBLAS) and image size: the vision pass's kernel floor."""
    config = report["settings"]["config"]
    return {
        name: {str(size): vision_floor(config, size, b) for size in report["settings"]["sizes"]}
        for name, b in report.get("kernel_bounds", {}).items()
        if "error" not in b
    }


def write_report(report: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and (with matplotlib) results.png into `out`."""
    report = {**report, "vision_kernel_floor": floors(report), "targets": targets(report)}
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    drawn = report["results"]["vision"] or report["results"]["generate"]
    if drawn and chart(report, out / "results.png"):
        paths.append(out / "results.png")
    return paths
