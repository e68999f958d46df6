"""Figures people would rather look at than read: CKA heatmap, accuracy/size frontier, accuracy per round."""
from __future__ import annotations

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
                  title: str = "") -> Path:
    """Accuracy versus parameters: every catalog variant, the base models, assigned variants highlighted."""
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
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Accuracy versus size", fontsize=9)
    return _save(fig, path)


def plot_rounds(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Accuracy per federated round, one line per variant (round 0 = as delivered)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for vid, accs in sorted(history.items()):
        ax.plot(range(len(accs)), [100 * a for a in accs], "o-", label=vid)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("federated round (0 = as delivered)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Federated stitch-only fine-tuning", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
