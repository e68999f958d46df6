"""Plain-text tables for terminals (no dependency, aligned columns)."""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?[0-9][0-9,]*(\.[0-9]+)?(e[+-]?[0-9]+)?(%|[KMG]|[KMG]iB|B)?")


def format_table(headers: list[str], rows: list[list], align_right: set[int] | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = align_right if align_right is not None else {
        i for i in range(len(headers)) if cells and all(_numeric(r[i]) for r in cells)}

    def line(values):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _numeric(text: str) -> bool:
    """Numbers with or without a unit (12.5%, 3.1M, 4.7MiB) and the empty cell line up on the right."""
    return text == "-" or _NUMBER.fullmatch(text) is not None


def human_bytes(n: float | None) -> str:
    """Bytes in binary units, labelled as such (1 MiB = 1024 KiB = 1,048,576 bytes)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
