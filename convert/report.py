"""What a conversion produced: the summary printed at the end, the config sections, the model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .plan import PARTS, Options, QuantSpec, part_of
from .quantize import ErrorStats

FORMAT_VERSION = 1


@dataclass
class ConversionReport:
    """The result of `convert`: where it went, how big it is, and how much quantization changed."""

    path: Path
    source: str
    revision: str | None
    options: Options
    dtype_origin: str = "--dtype"  # or where the checkpoint's own type was read
    parameters: int = 0  # of the float model
    weight_bytes: int = 0  # of all stored tensors
    folder_bytes: int = 0  # of every file in the output folder
    shards: int = 0
    quantized_modules: int = 0
    float_modules: list[str] = field(default_factory=list)  # Linear/Embedding weights kept in float
    errors: dict[str, ErrorStats] = field(default_factory=lambda: {p: ErrorStats() for p in PARTS})

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.parameters if self.parameters else 0.0

    def part_storage(self, part: str) -> str:
        """How a part's weights were stored, as they were: a layer too narrow for the groups
        stays in float, and a part where none was wide enough is not quantized at all."""
        spec, dtype = self.options.parts[part], self.options.dtype
        if spec is None:
            return dtype
        asked = _storage(spec, dtype)
        if not self.errors[part].count:
            return f"{dtype} (too narrow for {asked})"
        # The 1176-wide patch embedding never splits into groups; the card's text names it.
        kept = sum(
            part_of(name) == part and name != "visual.patch_embed.proj"
            for name in self.float_modules
        )
        return f"{asked}, {kept} layer(s) in {dtype} (too narrow)" if kept else asked

    def summary(self) -> dict:
        """The `mimo_mlx.quantization` record of config.json."""
        return {
            "mode": "affine" if self.options.quantized else None,
            "float_dtype": self.options.dtype,
            "float_dtype_from": self.dtype_origin,
            "parts": {p: _spec_record(self.options.parts[p]) for p in PARTS},
            "quantized_modules": self.quantized_modules,
            "float_modules": self.float_modules,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "error": {p: s.as_dict() for p, s in self.errors.items() if s.count},
        }

    def config_section(self) -> dict:
        """config.json's `mimo_mlx` section; its presence marks the folder as this converter's."""
        return {
            "format": FORMAT_VERSION,
            "source": self.source,
            "revision": self.revision,
            "quantization": self.summary(),
        }

    def lines(self) -> list[str]:
        """The human summary printed when a conversion finishes."""
        out = [
            f"Wrote {self.path}: {format_size(self.folder_bytes)} in {self.shards} shard(s), "
            f"{self.bits_per_weight:.2f} bits per weight ({_count(self.parameters)} parameters)",
            f"Norms, biases, float weights and scales in {self.options.dtype} ({self._dtype_why()})",
            "Quantization error against the float weights (|dequantized - float|):",
        ]
        for part in PARTS:
            stats = self.errors[part]
            storage = self.part_storage(part)
            if stats.count:
                storage = storage if len(storage) <= 12 else f"{storage}:"
                out.append(f"  {part:<8} {storage:<12} mean {stats.mean:.3e}   max {stats.max:.3e}")
            else:
                out.append(f"  {part:<8} {storage}: not quantized")
        return out

    def _dtype_why(self) -> str:
        if self.dtype_origin == "--dtype":
            return "--dtype"
        return f"the checkpoint's own, from {self.dtype_origin}"


def sized_model_card(report: ConversionReport, other_bytes: int) -> bytes:
    """The model card of a folder whose other files hold `other_bytes`: the size it states is the
    whole folder's, the card's own bytes included, so it equals what the summary prints.

    The stated number changes the card's length, so it is rendered again until the two agree.
    Near a unit's edge a larger size can print shorter ("999.99 kB" -> "1.00 MB"); then the card
    is padded with newlines up to the size it states, and the loop ends either way.
    """
    total = other_bytes
    while True:
        card = model_card(report, total).encode()
        size = other_bytes + len(card)
        if size == total:
            return card
        if size < total:
            return card + b"\n" * (total - size)
        total = size


def model_card(report: ConversionReport, folder_bytes: int) -> str:
    """A short README.md for the output folder, which holds `folder_bytes` in all."""
    name = report.path.name
    if report.revision is not None:  # from the hub: link it and name the exact commit
        origin = f"[{report.source}](https://huggingface.co/{report.source}) at revision "
        origin += f"`{report.revision}`"
        base_model = f"base_model: {report.source}\n"
    else:
        origin, base_model = f"`{report.source}`", ""
    rows = "\n".join(f"| {p} | {report.part_storage(p)} |" for p in PARTS)
    size = format_size(folder_bytes)
    return f"""---
library_name: mlx
tags: [mlx, mimo-mlx, qwen2_5_vl, image-text-to-text]
{base_model}---

# {name}

{origin}, converted for Apple's MLX with `mimo-mlx convert`.

| part | stored as |
|---|---|
{rows}

Norms, biases and any weight whose width does not split into quantization groups (such as the
1176-wide patch embedding) are stored in {report.options.dtype}. In all: {size}
({folder_bytes:,} bytes, this card included), {report.bits_per_weight:.2f} bits per weight.
config.json's `quantization` section says exactly how each module is stored.

```python
import mimo_mlx

model = mimo_mlx.load_model("{name}")
```
"""


def _storage(spec: QuantSpec | None, dtype: str) -> str:
    return f"{spec.bits}-bit g{spec.group_size}" if spec else dtype


def _spec_record(spec: QuantSpec | None) -> dict | str:
    return {"bits": spec.bits, "group_size": spec.group_size} if spec else "float"


def format_size(nbytes: int) -> str:
    """Bytes as the summary and the model card print them: "4.71 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
