"""Which timm models the generic block splitter handles: measured over every timm module, not claimed.

For each timm model module that defines `forward_intermediates` (89 in timm 1.0.31), take its smallest registered
model (fewest parameters at 10 classes, counted on the meta device, so nothing is initialised) that classifies,
create it with random weights at the smallest input size from SIZES it accepts (passing `img_size` where the
model takes one), and check, in eval mode:
- split: `shared.blocks.split_model` succeeds (else the ModelError's reason);
- exact: the blocks run in order against `model(x)` (max abs diff; `torch.equal` is "bit-exact");
- restore: the blocks of a second, differently initialised model of the same name, loaded from the first one's
  per-block state_dicts, reproduce the first model's output (what a device does with a variant's artifacts);
- stitch: two stitched models with a partner of another family (ResNet-18; MobileNetV3-Small for the `resnet`
  module), this model's front half -> the partner's back half and the partner's front half -> this model's back
  half, each running forward and backward with gradients only in the stitching layer.
A module is OK when all four hold. Times are wall-clock on a shared machine: the split time of a model's first
split in the process (what a device pays per rebuild, tracing included), not a ratio.

    PYTHONPATH=. <venv>/bin/python benchmarks/model_coverage.py [--modules resnet,convnext] [--markdown]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F

from shared.blocks import activation_specs, block_outputs, split_model
from shared.errors import ModelError
from shared.stitching import StitchedModel, StitchingLayer

SIZES = (64, 96, 128, 160, 192, 224, 256, 384)
PARTNER, PARTNER_FOR_RESNET = "resnet18", "mobilenetv3_small_050"
NUM_CLASSES = 10
SETUP_TRIES = 3  # registered names tried per module, smallest first (the smallest may be a headless encoder)


@dataclass
class Row:
    module: str
    model: str = ""
    size: int = 0
    split: bool = False
    exact: bool = False
    max_diff: float = float("nan")
    restore: bool = False
    stitch: bool = False
    boundaries: int = 0
    layouts: str = ""
    split_s: float = float("nan")
    reason: str = ""
    kinds: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.split and self.exact and self.restore and self.stitch


def modules_with_forward_intermediates() -> list[str]:
    found = []
    for name in sorted(timm.list_modules()):
        if importlib.util.find_spec(f"timm.models.{name}") is None:  # registered from outside timm (ours)
            continue
        mod = importlib.import_module(f"timm.models.{name}")
        classes = [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__]
        if any("forward_intermediates" in c.__dict__ for c in classes):
            found.append(name)
    return found


def by_size(module: str) -> list[str]:
    """The module's registered names, fewest parameters first (created on the meta device: no memory, no init)."""
    sized = []
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in timm.create_model(name, num_classes=NUM_CLASSES).parameters())
        except Exception:  # a model whose construction needs real tensors: not a candidate
            continue
        sized.append((params, name))
    return [name for _, name in sorted(sized)]


def create_at_small_size(name: str, seed: int = 0):
    """(model, size, kwargs): the smallest size in SIZES whose forward works; `img_size` is passed to models that
    take it (one model per size), the others are created once and tried at each size."""
    last = None
    for kwargs_of in (lambda s: {"img_size": s}, lambda s: {}):
        model = None
        for size in SIZES:
            kwargs = kwargs_of(size)
            try:
                if model is None or kwargs:
                    torch.manual_seed(seed)
                    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
                with torch.no_grad():
                    out = model(torch.randn(1, 3, size, size))
                if isinstance(out, torch.Tensor) and out.shape == (1, NUM_CLASSES):
                    return model, size, kwargs
                last = ValueError(f"its output {getattr(out, 'shape', type(out).__name__)} is not logits")
            except TypeError as exc:  # no img_size argument
                last = exc
                if "img_size" in str(exc):
                    break
            except Exception as exc:
                last = exc
    raise RuntimeError(f"no input size in {SIZES} works: {str(last).splitlines()[0][:120]}")


def stitch_check(front, front_specs, behind, behind_specs, x: torch.Tensor) -> str:
    """Front's middle boundary -> behind's middle boundary; one train step's gradients only in the stitch.

    Many timm models start their classifier (or layer scales) at zero, which would zero every gradient before it:
    such all-zero behind weights get small random values first, so that "gradients reach the stitch" can fail.
    """
    a, b = (len(front_specs) - 2) // 2, (len(behind_specs) - 2) // 2
    stitch = StitchingLayer(front_specs[a], behind_specs[b])
    model = StitchedModel(list(front.blocks[: a + 1]), stitch, list(behind.blocks[b + 1:]))
    with torch.no_grad():
        for p in model.behind.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(std=0.02)
    model.train()
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % NUM_CLASSES)
    loss.backward()
    stitch_ids = {id(p) for p in stitch.parameters()}
    for p in model.parameters():
        if id(p) in stitch_ids:
            assert p.grad is not None and torch.isfinite(p.grad).all(), "stitch without a finite gradient"
        else:
            assert p.grad is None, "a frozen block received a gradient"
    assert any(p.grad.abs().sum() > 0 for p in stitch.parameters()), "all stitch gradients are zero"
    model.zero_grad(set_to_none=True)
    return stitch.kind


_partners: dict[tuple[str, int], tuple] = {}


def partner(name: str, size: int):
    key = (name, size)
    if key not in _partners:
        torch.manual_seed(0)
        bm = split_model(timm.create_model(name, num_classes=NUM_CLASSES).eval(), name)
        _partners[key] = bm, activation_specs(bm, (3, size, size))
    return _partners[key]


def check(module: str) -> Row:
    row = Row(module)
    for name in by_size(module)[:SETUP_TRIES]:  # the smallest that is a classifier at some size in SIZES
        try:
            row.model = name
            model, row.size, kwargs = create_at_small_size(name)
            break
        except Exception as exc:
            row.reason = f"setup: {str(exc).splitlines()[0][:150]}"
    else:
        return row
    row.reason = ""
    x = torch.randn(2, 3, row.size, row.size, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    try:
        bm = split_model(model, row.model)
    except ModelError as exc:
        row.reason = str(exc.message)
        return row
    row.split_s, row.split = time.perf_counter() - t, True
    try:
        with torch.no_grad():
            expected, got = model(x), bm(x)
        row.max_diff = float((expected - got).abs().max())
        row.exact = row.max_diff == 0.0 and torch.equal(expected, got)
        specs = activation_specs(bm, (3, row.size, row.size))
        row.boundaries = len(bm.blocks) - 1
        counts = {layout: sum(s.layout == layout for s in specs[:-1]) for layout in ("nchw", "nhwc", "tokens")}
        row.layouts = " ".join(f"{n} {layout}" for layout, n in counts.items() if n)
        other = timm.create_model(row.model, num_classes=NUM_CLASSES, **kwargs).eval()
        other_bm = split_model(other, row.model)
        for src, dst in zip(bm.blocks, other_bm.blocks):
            dst.load_state_dict(src.state_dict(), strict=True)
        with torch.no_grad():
            row.restore = torch.equal(other(x), expected) and torch.equal(block_outputs(other_bm, x)[-1], expected)
        p_bm, p_specs = partner(PARTNER_FOR_RESNET if module == "resnet" else PARTNER, row.size)
        row.kinds = [stitch_check(bm, specs, p_bm, p_specs, x), stitch_check(p_bm, p_specs, bm, specs, x)]
        row.stitch = True
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        row.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]} ({frame.name})"
    if row.split and not row.exact and not row.reason:
        row.reason = f"not exact: max abs diff {row.max_diff:.2e}"
    if row.split and row.exact and not row.restore and not row.reason:
        row.reason = "blocks restored from state_dicts do not reproduce the model"
    return row


def table(rows: list[Row]) -> str:
    lines = ["| module | model | input | OK | exact (max diff) | boundaries | layouts | split s | stitch kinds | "
             "reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = "bit-exact" if r.exact else ("" if r.max_diff != r.max_diff else f"{r.max_diff:.1e}")
        split_s = "" if r.split_s != r.split_s else f"{r.split_s:.2f}"
        lines.append(f"| {r.module} | {r.model} | {r.size or ''} | {'yes' if r.ok else 'no'} | {exact} | "
                     f"{r.boundaries or ''} | {r.layouts} | {split_s} | {', '.join(r.kinds)} | {r.reason} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", help="comma-separated timm module names (default: all with forward_intermediates)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modules = modules_with_forward_intermediates()
    total = len(modules)
    if args.modules:
        wanted = args.modules.split(",")
        unknown = sorted(set(wanted) - set(modules))
        if unknown:
            ap.error(f"not timm modules with forward_intermediates: {', '.join(unknown)}")
        modules = [m for m in modules if m in wanted]
    rows = []
    for i, module in enumerate(modules):
        t = time.perf_counter()
        row = check(module)
        rows.append(row)
        print(f"[{i + 1}/{len(modules)}] {module}: {row.model} {'OK' if row.ok else 'FAIL ' + row.reason} "
              f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    print(table(rows))
    ok = sum(r.ok for r in rows)
    print(f"\n{ok} of {len(rows)} modules OK ({ok / max(len(rows), 1):.0%})"
          + (f"; {total} timm modules define forward_intermediates" if len(rows) != total else ""))
    times = [r.split_s for r in rows if r.split]
    if times:
        print(f"split time per model (first split in the process): median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s ({rows[[r.split_s for r in rows].index(max(times))].model})")


if __name__ == "__main__":
    main()
