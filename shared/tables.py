"""Plain-text tables for terminals (no dependency, aligned columns) and markdown tables for reports."""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?[0-9][0-9,]*(\.[0-9]+)?(e[+-]?[0-9]+)?(%|[KMG]|[KMG]iB|B)?")


def format_table(headers: list[str], rows: list[list], align_right: set[int] | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = align_right if align_right is not None else {
        i for i in range(len(headers)) if cells and all(_numeric(r[i]) for r in cells)}

    def line(values):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

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


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; cells formatted as in `format_table`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_count(n: int) -> str:
    """A parameter count: 68, 4.1K, 1.18M."""
    return str(n) if n < 1000 else f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.2f}M"


def pct_spread(acc: dict) -> str:
    """An accuracy over seeds: mean ± sample std (min-max), in percent."""
    return f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} ({100 * acc['min']:.2f}-{100 * acc['max']:.2f})"
