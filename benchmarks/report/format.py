"""Number formatting and lookups shared by the report's sections."""

from __future__ import annotations

GB = 1e9


def median(entry: dict | None, key: str):
    if not entry or "error" in entry or key not in entry:
        return None
    return entry[key]["median"]


def fmt(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}g}{unit}"


def vision_row(entry: dict | None, size: int) -> dict | None:
    if not entry or "error" in entry:
        return None
    return next((s for s in entry["sizes"] if s["size"] == size), None)


def dig(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data
