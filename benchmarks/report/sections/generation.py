"""Generation: time to first token, prefill and decode rates, peak memory."""

from __future__ import annotations

from ..format import GB, fmt


def section(report: dict) -> list[str]:
    res = report["results"]["generate"]
    if not res:
        return []
    lines = [
        "",
        "## Generation (one image in the prompt, greedy, fixed token count)",
        "",
        "| runtime | variant | device / dtype | prompt tokens | TTFT s | prefill tok/s "
        "| decode tok/s | peak to first token GB | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tokens = {}
    for key, entry in res.items():
        runtime, variant = key.split("/")
        if "error" in entry:
            lines.append(f"| {runtime} | {variant} | failed: {entry['error']} | | | | | | |")
            continue
        b = entry["backend"]
        tokens[key] = entry["tokens"]
        lines.append(
            f"| {runtime} | {variant} | {b['device']} / {b['dtype']} | {entry['prompt_tokens']} | "
            f"{fmt(entry['ttft_s']['median'])} | {fmt(entry['prefill_tps']['median'])} | "
            f"{fmt(entry['decode_tps']['median'])} ({100 * entry['decode_tps']['spread']:.0f}%) | "
            f"{_gb(entry.get('ttft_peak_memory_bytes'))} | {entry['peak_memory_bytes'] / GB:.2f} |"
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
            "tokens / TTFT, decode tok/s = (tokens - 1) / (last - first token time); peak to "
            "first token: the vision pass and the prefill (weights included). "
            f"Greedy tokens equal to mimo-mlx's of the same variant: {same}.",
        ]
    ours, theirs = (
        res.get(k, {}).get("quantized_fingerprint") for k in ("mimo-mlx/4bit", "mlx-vlm/4bit")
    )
    if ours and theirs:
        lines.append(
            "4-bit weights (quantized in memory by each converter's default recipe): "
            + ("identical in mimo-mlx and mlx-vlm." if ours == theirs else "they DIFFER.")
        )
    lines += [
        f"{key} failed: {entry['error']} (see work/generate-{key.replace('/', '-')}.log)"
        for key, entry in res.items()
        if "error" in entry
    ]
    return lines


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"
