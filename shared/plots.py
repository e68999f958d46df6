"""Figures people would rather look at than read: CKA heatmap, accuracy/size frontier, accuracy per round, and
the experiments' figures (directions, strategies, CKA against accuracy, CKA heatmaps side by side)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def plot_cka(cka: np.ndarray, front_blocks: list[str], behind_blocks: list[str], chosen: list[tuple[int, int]],
             path: Path, title: str = "") -> Path:
    """CKA of every front block (rows) against every behind block (columns); chosen stitch points circled."""
    cka = np.asarray(cka, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * cka.shape[1], 1.2 + 0.3 * cka.shape[0]), dpi=110)
    masked = np.ma.masked_invalid(cka)
    im = ax.imshow(masked, cmap="magma", vmin=min(0.0, float(np.nanmin(cka)) if np.isfinite(cka).any() else 0.0),
                   vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(behind_blocks)), behind_blocks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(front_blocks)), front_blocks, fontsize=7)
    ax.set_xlabel("behind model: block output")
    ax.set_ylabel("front model: block output")
    for a, b in chosen:
        ax.scatter([b], [a], s=90, facecolors="none", edgecolors="cyan", linewidths=2)
    nan = np.argwhere(~np.isfinite(cka))
    if len(nan):
        ax.scatter(nan[:, 1], nan[:, 0], marker="x", color="grey", s=20, label="undefined")
        ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title or "CKA similarity (circles: chosen stitch points)", fontsize=9)
    return _save(fig, path)


def plot_frontier(variants: list[dict], bases: list[dict], path: Path, highlight: set[str] = frozenset(),
                  title: str = "", after: dict[str, float] | None = None) -> Path:
    """Accuracy versus parameters: every catalog variant, the base models, assigned variants highlighted, and
    (`after`) variants' accuracy after federated rounds, by id."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    vs = sorted(variants, key=lambda v: v["params"])
    xs = [v["params"] / 1e6 for v in vs]
    ax.plot(xs, [100 * (v.get("accuracy") or 0) for v in vs], "o-", color="tab:blue", label="stitched (current version)")
    if any(v.get("accuracy_init") is not None for v in vs):
        ax.plot(xs, [100 * (v.get("accuracy_init") or 0) for v in vs], "o--", color="tab:gray", alpha=0.6,
                label="stitched (least-squares init only)")
    for v in vs:
        if v["id"] in highlight:
            ax.scatter([v["params"] / 1e6], [100 * (v.get("accuracy") or 0)], s=160, facecolors="none",
                       edgecolors="tab:red", linewidths=2)
    for b in bases:
        if b.get("accuracy") is not None:
            ax.scatter([b["params"] / 1e6], [100 * b["accuracy"]], marker="*", s=160, label=f"base {b['name']}")
    if highlight:
        ax.scatter([], [], s=160, facecolors="none", edgecolors="tab:red", label="assigned to devices")
    if after:
        known = [v for v in vs if v["id"] in after]
        ax.scatter([v["params"] / 1e6 for v in known], [100 * after[v["id"]] for v in known], marker="^", s=60,
                   color="tab:green", zorder=3, label="after federated rounds")
    return _save_accuracy(fig, ax, "parameters (M)", title or "Accuracy versus size", path)


def plot_rounds(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Accuracy per federated round, one line per variant (round 0 = as delivered)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for vid, accs in sorted(history.items()):
        ax.plot(range(len(accs)), [100 * a for a in accs], "o-", label=vid)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save_accuracy(fig, ax, "federated round (0 = as delivered)", title or "Federated stitch-only fine-tuning",
                          path)


def _save_accuracy(fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """The finish every accuracy plot shares: labels, grid, legend, title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _acc_bars(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Means and [below, above] error bars (min and max over seeds) in percent."""
    mean = np.array([100 * r["accuracy"]["mean"] for r in rows])
    err = np.array([[100 * (r["accuracy"]["mean"] - r["accuracy"]["min"]) for r in rows],
                    [100 * (r["accuracy"]["max"] - r["accuracy"]["mean"]) for r in rows]])
    return mean, np.clip(err, 0.0, None)  # equal values: a mean a rounding error off its min or max


def plot_directions(result: dict, path: Path) -> Path:
    """Accuracy (mean, min-max over seeds) against parameters, one line per stitching direction (Table III)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, style in (("slow_to_fast", "o-"), ("fast_to_slow", "s--")):
        rows = sorted((r for r in result["rows"] if r["direction"] == name), key=lambda r: r["params"])
        if rows:
            mean, err = _acc_bars(rows)
            ax.errorbar([r["params"] / 1e6 for r in rows], mean, yerr=err, fmt=style, capsize=3,
                        label=name.replace("_", "-"))
    for role, base in result["bases"].items():
        ax.scatter([base["params"] / 1e6], [100 * base["accuracy"]], marker="*", s=160, label=f"base {base['name']}")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"validation accuracy (%), mean and min-max of {len(result['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Stitching direction ({result['val_examples']} validation examples)", fontsize=9)
    return _save(fig, path)


def plot_strategies(result: dict, strategies: tuple[str, ...], path: Path) -> Path:
    """Accuracy of each fine-tuning strategy, grouped by variant (Table IV)."""
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(variants), 4.2), dpi=110)
    width = 0.8 / len(strategies)
    for k, strategy in enumerate(strategies):
        rows = [next(r for r in result["rows"] if r["variant"] == v and r["strategy"] == strategy) for v in variants]
        mean, err = _acc_bars(rows)
        ax.bar(np.arange(len(variants)) + (k - (len(strategies) - 1) / 2) * width, mean, width, yerr=err, capsize=2,
               label=strategy)
    lows = [100 * r["accuracy"]["min"] for r in result["rows"]]
    ax.set_ylim(max(0.0, min(lows) - 3), 100)
    ax.set_xticks(range(len(variants)), [re.sub(r"(\.\d+)_", "\\1\n", v, count=1) for v in variants], fontsize=7)
    ax.set_ylabel(f"validation accuracy (%), {len(result['seeds'])} seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Fine-tuning strategies ({result['val_examples']} validation examples)", fontsize=9)
    return _save(fig, path)


def plot_cka_accuracy(result: dict, path: Path) -> Path:
    """Accuracy after stitch-only fine-tuning against the cut pair's CKA, one panel per estimator (Fig. 4)."""
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110, sharey=True)
    mean, err = _acc_bars(rows)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for ax, (estimator, key) in zip(axes, (("unbiased", "cka"), ("paper", "cka_paper"))):
        c, c0 = result["correlation"][estimator], result["correlation"][f"{estimator}, least-squares fit only"]
        ax.errorbar([r[key] for r in rows], mean, yerr=err, fmt="o", capsize=3,
                    label=f"after stitch-only fine-tuning (Spearman {fmt(c['spearman'])})")
        ax.scatter([r[key] for r in rows], [100 * r["accuracy_init"] for r in rows], facecolors="none",
                   edgecolors="tab:gray", label=f"least-squares fit only (Spearman {fmt(c0['spearman'])})")
        ax.set_title(f"CKA estimator: {estimator} (after fine-tuning: Pearson {fmt(c['pearson'])})", fontsize=9)
        ax.legend(fontsize=7)
        ax.set_xlabel("CKA of the stitched block pair")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation accuracy (%), {len(result['seeds'])} seeds, {result['val_examples']} examples")
    return _save(fig, path)


def plot_heatmaps(matrices: list[dict], path: Path) -> Path:
    """CKA matrices side by side (Fig. 5); `chosen` cells circled, a stitched model's stitch marked."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.6), dpi=110)
    for ax, m in zip(np.atleast_1d(axes), matrices):
        values = np.array([[np.nan if v is None else v for v in row] for row in m["matrix"]], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(values), cmap="magma", vmin=min(0.0, float(np.nanmin(values))), vmax=1.0)
        ax.set_xticks(range(len(m["cols"])), m["cols"], rotation=90, fontsize=5)
        ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=5)
        for a, b in m.get("chosen", []):
            ax.scatter([b], [a], s=90, facecolors="none", edgecolors="cyan", linewidths=2)
        if "stitch_index" in m:
            for line in (ax.axhline, ax.axvline):
                line(m["stitch_index"], color="cyan", linewidth=0.8)
        ax.set_title(m["title"], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
