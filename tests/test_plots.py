"""The demo's accuracy plots, drawn directly (the demo test only sees them at the end of a long run)."""
from __future__ import annotations

import struct

from shared.plots import plot_frontier, plot_rounds

VARIANTS = [{"id": "a", "params": 40_000, "accuracy": 0.80, "accuracy_init": 0.70},
            {"id": "b", "params": 400_000, "accuracy": 0.90, "accuracy_init": 0.85}]
BASES = [{"name": "small", "params": 30_000, "accuracy": 0.75}, {"name": "large", "params": 900_000, "accuracy": 0.95}]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_frontier_marks_assigned_variants_and_the_accuracy_after_rounds(tmp_path):
    plain = plot_frontier(VARIANTS, BASES, tmp_path / "plain.png")
    marked = plot_frontier(VARIANTS, BASES, tmp_path / "marked.png", highlight={"b"}, after={"b": 0.93})
    assert png_size(plain) == png_size(marked) == (704, 462)  # 6.4 x 4.2 in at 110 dpi
    assert plain.read_bytes() != marked.read_bytes()  # the assigned circle and the after-rounds marker are drawn


def test_the_rounds_plot_draws_one_line_per_variant(tmp_path):
    one = plot_rounds({"a": [0.8, 0.85]}, tmp_path / "one.png")
    two = plot_rounds({"a": [0.8, 0.85], "b": [0.9, 0.91]}, tmp_path / "sub" / "two.png")
    assert png_size(one) == png_size(two) == (704, 440)
    assert one.read_bytes() != two.read_bytes()
