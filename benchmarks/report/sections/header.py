"""The run: command, commit, machine, versions, settings."""

from __future__ import annotations

from ...settings import size_plans


def section(report: dict) -> list[str]:
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
        + (" (uncommitted changes)" if report["git"]["dirty"] else "")
        + (" (as prepared: see the JSON's git.from)" if report["git"].get("from") else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}"
        + (f"; GPU: {m['gpu']}." if m.get("gpu") else "."),
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
        *_timing(report),
    ]


def _timing(report: dict) -> list[str]:
    """How the weights were made and how long each phase took."""
    lines = []
    made = report.get("weights") or {}
    if made.get("made"):
        lines.append(
            f"Weights: {made['parameters'] / 1e6:,.0f} M parameters drawn on {made['device']} "
            f"and written ({made['bytes'] / 1e6:,.0f} MB) in {made['seconds']:.1f} s."
        )
    if phases := report.get("phases_s"):
        total = sum(phases.values())
        budget = report.get("time_budget_s")
        lines.append(
            "Phases: "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
            + f"; {total:.0f} s in all"
            + (f" (time budget {budget:.0f} s)." if budget else ".")
        )
    return lines
