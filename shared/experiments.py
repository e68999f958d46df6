"""The paper's findings as experiments on a config's two models; every result is plain data (JSON-ready).

- `directions` (Table III): Slow-to-Fast against Fast-to-Slow, one variant per budget band in each direction.
- `strategies` (Table IV): the four fine-tuning strategies from the same least-squares-initialised stitch.
- `cka_vs_accuracy` (Fig. 4): cut pairs spread over the CKA range, stitched, fine-tuned (stitch only) and
  evaluated; rank and linear correlation with both CKA estimators, and whether they pick the same stitch points.
- `heatmaps` (Fig. 5): cross-model CKA, each model's own block-vs-block CKA, and a stitched variant's.

Trained base models and calibration activations depend only on the models, data and calibration settings, so
they are kept in `OUT/cache/` under a digest of those settings and reused by every experiment and run.
A run of a variant fine-tunes from the same least-squares fit with a seed that orders the training data (and
draws augmentations); every accuracy is reported over `seeds` runs, with the validation examples behind it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import stats
from tqdm.auto import tqdm

from shared import costs as C
from shared.blocks import BlockedModel, activation_specs, block_outputs
from shared.build import Calibration, PairCosts, pair_costs, prepare_bases, variant_id
from shared.cka import cka_accumulator
from shared.config import Config
from shared.datasets import calibration_batches, load_splits
from shared.errors import BudgetError
from shared.selection import default_budgets, sweep
from shared.stitching import StitchedModel, stitching_layer
from shared.training import evaluate, finetune
from shared.vocabulary import CKA_ESTIMATORS, DIRECTIONS, STRATEGIES

def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Setup:
    """What every experiment starts from: data, both trained base models, their calibration activations."""

    cfg: Config
    train: torch.utils.data.TensorDataset
    val: torch.utils.data.TensorDataset
    models: dict  # role -> (model, blocked, accuracy)
    acts: dict  # role -> [repeat][block] outputs over the calibration batches (head excluded)
    images: list[torch.Tensor]  # the calibration batches

    def direction(self, name: str) -> "Direction":
        front, behind = ("large", "small") if name == "slow_to_fast" else ("small", "large")
        return Direction(self, name, front, behind)


class Direction:
    """One stitching direction over a Setup: its CKA matrices (both estimators) and pair costs."""

    def __init__(self, s: Setup, name: str, front_role: str, behind_role: str):
        self.s, self.name = s, name
        self.front_role, self.behind_role = front_role, behind_role
        self.front: BlockedModel = s.models[front_role][1]
        self.behind: BlockedModel = s.models[behind_role][1]
        shape = s.cfg.input_shape
        self.f_specs = activation_specs(self.front, shape)[:-1]
        self.b_specs = activation_specs(self.behind, shape)[:-1]
        self.front_acts, self.behind_acts = s.acts[front_role], s.acts[behind_role]
        self.cka = {e: self._cka(e) for e in CKA_ESTIMATORS}
        cal = Calibration(self.cka["unbiased"], {}, self.front_acts[0], self.behind_acts[0],
                          len(s.images[0]), len(s.images))
        self.costs: PairCosts = pair_costs(self.front, self.behind, cal, s.images[0][:1], self.f_specs, self.b_specs,
                                           False, s.cfg.catalog.stitch_kernel_size)

    def _cka(self, estimator: str) -> np.ndarray:
        acc = cka_accumulator(estimator, len(self.f_specs), len(self.b_specs))
        for fa, fb in zip(self.front_acts, self.behind_acts):
            acc.update(fa, fb)
        return acc.result()

    def names(self) -> tuple[str, str]:
        cfg = self.s.cfg
        return getattr(cfg, self.front_role).name, getattr(cfg, self.behind_role).name

    def sweep(self, budgets: list[float], estimator: str | None = None) -> list[tuple[tuple[int, int], list[float]]]:
        """The catalog's selection (Algorithm 1 per budget band, from the smaller base model's size), by params,
        with the config's CKA estimator unless another is named."""
        floor = min(C.count_params(self.s.models[r][0]) for r in ("large", "small"))
        try:
            chosen = sweep(self.cka[estimator or self.s.cfg.data.calibration.estimator], self.costs.params, budgets,
                           floor)
        except BudgetError:  # no pair in any band: a result here, not an error
            return []
        return sorted(chosen.items(), key=lambda kv: self.costs.params[kv[0]])

    def least_squares(self, a: int, b: int) -> dict[str, torch.Tensor]:
        """The stitch of cut pair (a, b) fitted by least squares on the first calibration batch, as a catalog's."""
        stitch = stitching_layer(self.f_specs[a], self.b_specs[b], self.s.cfg.catalog.stitch_kernel_size)
        stitch.init_least_squares(self.front_acts[0][a], self.behind_acts[0][b])
        return {k: v.clone() for k, v in stitch.state_dict().items()}

    def model(self, a: int, b: int, stitch_state: dict, own_blocks: bool) -> StitchedModel:
        stitch = stitching_layer(self.f_specs[a], self.b_specs[b], self.s.cfg.catalog.stitch_kernel_size)
        stitch.load_state_dict(stitch_state)
        blocks_f, blocks_b = list(self.front.blocks[:a + 1]), list(self.behind.blocks[b + 1:])
        if own_blocks:  # strategies other than stitch-only change base blocks: never the shared ones
            blocks_f, blocks_b = copy.deepcopy(blocks_f), copy.deepcopy(blocks_b)
        return StitchedModel(blocks_f, stitch, blocks_b).eval()

    def describe(self, a: int, b: int) -> dict:
        front, behind = self.names()
        return {"variant": variant_id(front, a + 1, behind, b + 1), "front_cut": a + 1, "behind_cut": b + 1,
                "cka": _num(self.cka["unbiased"][a, b]), "cka_paper": _num(self.cka["paper"][a, b]),
                "params": int(self.costs.params[a, b]), "stitch_params": int(self.costs.stitch_params[a, b])}

    def run(self, a: int, b: int, seeds: list[int], strategy: str = "stitch", init: dict | None = None,
            bar=None) -> dict:
        """Fine-tune the stitched variant (a, b) once per seed from the same least-squares fit; accuracies."""
        init = init or self.least_squares(a, b)
        accs, acc_init, trainable = [], None, 0
        for seed in seeds:
            model = self.model(a, b, init, own_blocks=strategy != "stitch")
            if acc_init is None:
                acc_init = evaluate(model, self.s.val)
            out = finetune(model, self.s.train, self.s.cfg.catalog.finetune, strategy, progress=False, seed=seed)
            trainable = out["trainable_params"]
            accs.append(evaluate(model, self.s.val))
            if bar is not None:
                bar.update(1)
        return {**self.describe(a, b), "strategy": strategy, "trainable_params": int(trainable),
                "accuracy_init": acc_init, "accuracy": spread(accs)}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min, max and the values (accuracies in [0, 1])."""
    v = np.asarray(values, dtype=float)
    # the mean of equal values can round one ulp past them: a table must not show a mean above its max
    return {"mean": float(np.clip(v.mean(), v.min(), v.max())), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [float(x) for x in v]}


def _num(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def prepare(cfg: Config, out: Path, progress: bool = True, log=print) -> Setup:
    """Data, base models and calibration activations, from `out/cache/` when computed before."""
    train, val = load_splits(cfg.data)
    data = asdict(cfg.data)
    calib = data.pop("calibration")
    bases_key = digest(asdict(cfg.large), asdict(cfg.small), data, cfg.num_classes)
    base_dir = Path(out) / "cache" / f"bases-{bases_key}"
    ckpts = {role: base_dir / "checkpoints" / f"{role}.safetensors" for role in ("large", "small")}
    cfg = copy.deepcopy(cfg)
    if all(p.is_file() for p in ckpts.values()):
        log(f"reusing the base models in {base_dir}")
        for role, path in ckpts.items():
            getattr(cfg, role).checkpoint = str(path)
    models = prepare_bases(cfg, train, val, base_dir, progress, log)
    for role, path in ckpts.items():  # models given by checkpoint or hub are not trained: keep them as they are
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in models[role][0].state_dict().items()}, str(path))

    calib.pop("batch_size")
    calib.pop("estimator")
    images = calibration_batches(train, calib["examples"], calib["repeats"], cfg.data.seed)
    acts_path = base_dir / f"activations-{digest(calib)}.safetensors"
    if acts_path.is_file():
        flat = load_file(str(acts_path))
        log(f"reusing the calibration activations in {acts_path}")
    else:
        flat = {}
        with torch.no_grad():
            for role in ("large", "small"):
                for r, x in enumerate(images):
                    for i, y in enumerate(block_outputs(models[role][1], x)[:-1]):
                        flat[f"{role}.{r}.{i}"] = y.contiguous()
        save_file(flat, str(acts_path))
    acts = {role: [[flat[f"{role}.{r}.{i}"] for i in range(len(models[role][1].blocks) - 1)]
                   for r in range(len(images))] for role in ("large", "small")}
    return Setup(cfg, train, val, models, acts, images)


def budgets_of(s: Setup, count: int) -> list[float]:
    """`count` params budgets evenly spaced from the smaller base model's size to the larger one's."""
    low, high = sorted(C.count_params(s.models[r][0]) for r in ("large", "small"))
    return default_budgets(low, high, count)


def _header(s: Setup, name: str, seeds: list[int]) -> dict:
    cfg = s.cfg
    return {"experiment": name, "config": cfg.source, "dataset": cfg.data.dataset, "val_examples": len(s.val),
            "train_examples": len(s.train), "seeds": list(seeds), "finetune": asdict(cfg.catalog.finetune),
            "calibration": asdict(cfg.data.calibration),
            "bases": {role: {"name": getattr(cfg, role).name, "params": C.count_params(m), "accuracy": acc}
                      for role, (m, _, acc) in s.models.items()}}


def spearman(x, y) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def pearson(x, y) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.pearsonr(x, y).statistic)


def directions(s: Setup, seeds: list[int], budget_count: int = 8, progress: bool = True) -> dict:
    """Table III: in each direction the catalog's pair per params budget band, fine-tuned stitch-only."""
    budgets = budgets_of(s, budget_count)
    picked = {name: s.direction(name) for name in DIRECTIONS}
    chosen = {name: d.sweep(budgets) for name, d in picked.items()}
    bar = tqdm(total=sum(len(c) for c in chosen.values()) * len(seeds), desc="directions", disable=None if progress
               else True, leave=False, unit="run")
    rows = []
    for name, d in picked.items():
        for (a, b), bands in chosen[name]:
            rows.append({"direction": name, "budgets": bands, **d.run(a, b, seeds, bar=bar)})
    bar.close()
    matched = []
    for budget in budgets:
        by = {r["direction"]: r for r in rows if budget in r["budgets"]}
        if len(by) == 2:
            s2f, f2s = by["slow_to_fast"], by["fast_to_slow"]
            matched.append({"budget": budget, "slow_to_fast": s2f["variant"], "fast_to_slow": f2s["variant"],
                            "difference": s2f["accuracy"]["mean"] - f2s["accuracy"]["mean"]})
    summary = {"matched_budgets": len(matched), "slow_to_fast_ahead": sum(m["difference"] > 0 for m in matched)}
    for name in DIRECTIONS:
        mine = [r for r in rows if r["direction"] == name]
        summary[f"spearman_params_accuracy_{name}"] = spearman([r["params"] for r in mine],
                                                               [r["accuracy"]["mean"] for r in mine])
    return {**_header(s, "directions", seeds), "budgets": budgets, "rows": rows, "matched": matched,
            "summary": summary}


def strategies(s: Setup, seeds: list[int], budget_count: int = 8, variants: int = 3, progress: bool = True) -> dict:
    """Table IV: the catalog's Slow-to-Fast variants (`variants` of them, spread over its sizes), each trained with
    the four strategies from the same least-squares fit and the same seeds."""
    d = s.direction("slow_to_fast")
    chosen = [pair for pair, _ in d.sweep(budgets_of(s, budget_count))]
    if len(chosen) > variants:
        chosen = [chosen[i] for i in np.unique(np.round(np.linspace(0, len(chosen) - 1, variants)).astype(int))]
    bar = tqdm(total=len(chosen) * len(STRATEGIES) * len(seeds), desc="strategies",
               disable=None if progress else True, leave=False, unit="run")
    rows = []
    for a, b in chosen:
        init = d.least_squares(a, b)
        rows.extend(d.run(a, b, seeds, strategy, init, bar) for strategy in STRATEGIES)
    bar.close()
    gaps = []
    for a, b in chosen:
        vid = d.describe(a, b)["variant"]
        acc = {r["strategy"]: r["accuracy"]["mean"] for r in rows if r["variant"] == vid}
        gaps.append({"variant": vid, "full_minus_stitch": acc["full"] - acc["stitch"],
                     "best_minus_stitch": max(acc.values()) - acc["stitch"]})
    summary = {"max_full_minus_stitch": max(g["full_minus_stitch"] for g in gaps) if gaps else None}
    return {**_header(s, "strategies", seeds), "rows": rows, "gaps": gaps, "summary": summary}


def spread_pairs(cka: np.ndarray, count: int) -> list[tuple[int, int]]:
    """`count` defined cut pairs at evenly spaced ranks of CKA, lowest to highest (all of them if fewer)."""
    a_idx, b_idx = np.nonzero(np.isfinite(cka))
    order = np.argsort(cka[a_idx, b_idx], kind="stable")
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(count, len(order)))).astype(int))
    return [(int(a_idx[order[k]]), int(b_idx[order[k]])) for k in picks]


def cka_vs_accuracy(s: Setup, seeds: list[int], points: int = 12, budget_count: int = 8,
                    progress: bool = True) -> dict:
    """Fig. 4: cut pairs spread over the (unbiased) CKA range, each stitched from its least-squares fit and
    fine-tuned stitch-only with the same epochs; correlations for both estimators."""
    d = s.direction("slow_to_fast")
    pairs = spread_pairs(d.cka["unbiased"], points)
    bar = tqdm(total=len(pairs) * len(seeds), desc="cka-vs-accuracy", disable=None if progress else True,
               leave=False, unit="run")
    rows = [d.run(a, b, seeds, bar=bar) for a, b in pairs]
    bar.close()
    correlation = correlations(rows)
    budgets = budgets_of(s, budget_count)
    picks = {est: dict((tuple(p), bands) for p, bands in d.sweep(budgets, est)) for est in CKA_ESTIMATORS}
    per_budget = []
    for budget in budgets:
        pair = {est: next((list(p) for p, bands in picks[est].items() if budget in bands), None)
                for est in CKA_ESTIMATORS}
        per_budget.append({"budget": budget, **pair, "same": pair["unbiased"] == pair["paper"]})
    return {**_header(s, "cka-vs-accuracy", seeds), "rows": rows, "correlation": correlation,
            "stitch_points": per_budget,
            "summary": {"points": len(rows), "spearman_unbiased": correlation["unbiased"]["spearman"],
                        "spearman_paper": correlation["paper"]["spearman"],
                        "same_stitch_points": sum(p["same"] for p in per_budget), "budgets": len(budgets)}}


def correlations(rows: list[dict]) -> dict:
    """How CKA (each estimator) and size go with accuracy after fine-tuning; with the least-squares fit's accuracy;
    and CKA's rank correlation once size is accounted for (partial Spearman given params)."""
    acc = [r["accuracy"]["mean"] for r in rows]
    init = [r["accuracy_init"] for r in rows]
    params = [r["params"] for r in rows]
    out = {}
    for est, key in (("unbiased", "cka"), ("paper", "cka_paper")):
        xs = [r[key] for r in rows]
        out[est] = {"spearman": spearman(xs, acc), "pearson": pearson(xs, acc)}
        out[f"{est}, least-squares fit only"] = {"spearman": spearman(xs, init), "pearson": pearson(xs, init)}
        out[f"{est}, given params"] = {"spearman": partial_spearman(xs, acc, params), "pearson": None}
    out["params"] = {"spearman": spearman(params, acc), "pearson": pearson(params, acc)}
    return out


def partial_spearman(x, y, z) -> float | None:
    """Rank correlation of x and y with z's linear share removed from both ranks."""
    if len(x) < 4:
        return None
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    res = [r - np.polyval(np.polyfit(rz, r, 1), rz) for r in (rx, ry)]
    return pearson(list(res[0]), list(res[1]))


def _self_cka(acts: list[list[torch.Tensor]], estimator: str) -> np.ndarray:
    acc = cka_accumulator(estimator, len(acts[0]), len(acts[0]))
    for batch in acts:
        acc.update(batch, batch)
    return acc.result()


@torch.no_grad()
def _stitched_outputs(model: StitchedModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block output of a stitched model, the stitch's included, the head's left out."""
    outs = []
    for block in [*model.front, model.stitch, *model.behind][:-1]:
        x = block(x)
        outs.append(x)
    return outs


def heatmaps(s: Setup, seeds: list[int], budget_count: int = 8, progress: bool = True) -> dict:
    """Fig. 5: CKA between the two models, each model against itself, and a stitched variant against itself: the
    Slow-to-Fast catalog's variant that keeps the most blocks of both models (the largest min of the two counts),
    fine-tuned stitch-only with the first seed."""
    d = s.direction("slow_to_fast")
    estimator = s.cfg.data.calibration.estimator
    chosen = [pair for pair, _ in d.sweep(budgets_of(s, budget_count))]
    behind_blocks = len(d.b_specs)
    a, b = max(chosen, key=lambda p: min(p[0] + 1, behind_blocks - p[1] - 1))
    model = d.model(a, b, d.least_squares(a, b), own_blocks=False)
    finetune(model, s.train, s.cfg.catalog.finetune, "stitch", progress=progress, seed=seeds[0])
    stitched = [_stitched_outputs(model, x) for x in s.images]
    names = {"large": s.models["large"][1].block_names[:-1], "small": s.models["small"][1].block_names[:-1]}
    front, behind = d.names()
    stitched_names = ([f"F:{n}" for n in names["large"][:a + 1]] + ["stitch"]
                      + [f"B:{n}" for n in names["small"][b + 1:]])
    matrices = [
        {"title": f"{front} (rows) vs {behind} (columns)", "rows": names["large"], "cols": names["small"],
         "matrix": d.cka[estimator], "chosen": [[a, b]]},
        {"title": f"{front} vs itself", "rows": names["large"], "cols": names["large"],
         "matrix": _self_cka(s.acts["large"], estimator)},
        {"title": f"{behind} vs itself", "rows": names["small"], "cols": names["small"],
         "matrix": _self_cka(s.acts["small"], estimator)},
        {"title": f"stitched {d.describe(a, b)['variant']} vs itself", "rows": stitched_names,
         "cols": stitched_names, "matrix": _self_cka(stitched, estimator), "stitch_index": a + 1},
    ]
    for m in matrices:
        m["summary"] = band_summary(m["matrix"]) if m["rows"] == m["cols"] else cross_summary(m["matrix"])
        m["matrix"] = [[_num(v) for v in row] for row in np.asarray(m["matrix"])]
    return {**_header(s, "heatmaps", seeds), "estimator": estimator, "variant": d.describe(a, b),
            "matrices": matrices}


def band_summary(m: np.ndarray) -> dict:
    """Self-similarity by distance from the diagonal: neighbouring blocks against blocks 4 or more apart."""
    m = np.asarray(m, dtype=float)
    dist = np.abs(np.subtract.outer(np.arange(len(m)), np.arange(len(m))))
    near, far = m[dist == 1], m[dist >= 4]
    return {"neighbours_mean": _num(np.nanmean(near)) if near.size else None,
            "far_mean": _num(np.nanmean(far)) if far.size else None}


def cross_summary(m: np.ndarray) -> dict:
    """For each front block, the behind block most similar to it; whether that rises with depth."""
    m = np.asarray(m, dtype=float)
    best = [int(np.nanargmax(row)) if np.isfinite(row).any() else None for row in m]
    known = [v for v in best if v is not None]
    return {"best_behind_block": best, "spearman_depth": spearman(list(range(len(known))), known)}

