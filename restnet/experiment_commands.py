"""`restnet experiment NAME --config F --out DIR`: the paper's findings, each as a markdown table, a PNG and a
JSON of raw results (`shared/experiments.py` computes, `shared/plots.py` draws, this module writes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from shared.vocabulary import EXPERIMENTS

PAPER = {
    "directions": "Table III: Slow-to-Fast (larger model first) against Fast-to-Slow at matched budgets",
    "strategies": "Table IV: the four fine-tuning strategies from the same least-squares-initialised stitch",
    "cka-vs-accuracy": "Fig. 4: CKA of the stitched block pair against accuracy after stitch-only fine-tuning",
    "heatmaps": "Fig. 5: cross-model CKA, each model's own block-vs-block CKA, and a stitched variant's",
}


def add_parsers(sub) -> None:
    e = sub.add_parser(
        "experiment", help="reproduce one of the paper's findings: a markdown table, a PNG and raw JSON",
        description="Runs one of the paper's experiments on the config's two models and data, and writes "
                    "OUT/<name>.md, OUT/<name>.png and OUT/<name>.json. Trained base models and calibration "
                    "activations are cached in OUT/cache/ (keyed by the settings they depend on) and reused by "
                    "every experiment. Each accuracy is the mean over --seeds fine-tuning runs (min-max and std "
                    "beside it), on the validation split whose size the table states. Experiments: "
                    + "; ".join(f"{k}: {v}" for k, v in PAPER.items()) + ". `all` runs the four in turn.")
    e.add_argument("name", choices=(*EXPERIMENTS, "all"), help="which experiment")
    e.add_argument("--config", required=True, help="fleet config YAML: models, data, calibration, catalog.finetune")
    e.add_argument("--out", required=True, help="output folder (OUT/cache/ keeps base models and activations)")
    e.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per variant (default 3; at least 1)")
    e.add_argument("--epochs", type=int, help="override catalog.finetune.epochs for every fine-tuning run")
    e.add_argument("--budgets", type=int, default=8,
                   help="params budget bands between the two base models' sizes (default 8): directions, "
                        "strategies, heatmaps and the stitch points of cka-vs-accuracy")
    e.add_argument("--points", type=int, default=12, help="cka-vs-accuracy: cut pairs over the CKA range (default 12)")
    e.add_argument("--variants", type=int, default=3, help="strategies: how many catalog variants (default 3)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from shared.config import load_config
    from shared.errors import RestnetError
    from shared.experiments import prepare

    if args.seeds < 1:
        raise RestnetError("--seeds must be at least 1")
    cfg = load_config(args.config)
    if args.epochs is not None:
        cfg.catalog.finetune.epochs = args.epochs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    setup = prepare(cfg, out, not args.quiet, log)
    seeds = [cfg.data.seed + k for k in range(args.seeds)]
    for name in EXPERIMENTS if args.name == "all" else (args.name,):
        log(f"experiment {name}: {PAPER[name]}")
        result = run_one(name, setup, seeds, args)
        paths = write_outputs(name, result, out)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_one(name: str, setup, seeds: list[int], args) -> dict:
    from shared import experiments as X

    progress = not args.quiet
    if name == "directions":
        return X.directions(setup, seeds, args.budgets, progress)
    if name == "strategies":
        return X.strategies(setup, seeds, args.budgets, args.variants, progress)
    if name == "cka-vs-accuracy":
        return X.cka_vs_accuracy(setup, seeds, args.points, args.budgets, progress)
    return X.heatmaps(setup, seeds, args.budgets, progress=progress)


def write_outputs(name: str, result: dict, out: Path) -> dict[str, Path]:
    from shared import plots
    from shared.vocabulary import STRATEGIES

    paths = {"md": out / f"{name}.md", "png": out / f"{name}.png", "json": out / f"{name}.json"}
    paths["json"].write_text(json.dumps(result, indent=1))
    if name == "directions":
        plots.plot_directions(result, paths["png"])
    elif name == "strategies":
        plots.plot_strategies(result, STRATEGIES, paths["png"])
    elif name == "cka-vs-accuracy":
        plots.plot_cka_accuracy(result, paths["png"])
    else:
        plots.plot_heatmaps(result["matrices"], paths["png"])
    paths["md"].write_text(REPORTS[name](result) + "\n")
    return paths


def _preamble(result: dict, title: str) -> list[str]:
    from shared.tables import pct

    bases = ", ".join(f"{b['name']} ({role}) {b['params'] / 1e6:.3f}M params, {pct(b['accuracy'])}"
                      for role, b in result["bases"].items())
    ft = result["finetune"]
    return [f"# {title}", "",
            f"Config `{result['config']}`, data `{result['dataset']}`: {result['train_examples']} training and "
            f"**{result['val_examples']} validation examples** (one example = {100 / result['val_examples']:.2f} "
            f"points). Base models: {bases}.",
            f"Accuracies: mean ± sample std (min-max) over {len(result['seeds'])} seeds {result['seeds']}; a seed "
            f"orders the training data of a fine-tuning run that starts from the same least-squares stitch "
            f"({ft['epochs']} epochs, lr {ft['lr']:g}, batch {ft['batch_size']}).", ""]


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def report_directions(r: dict) -> str:
    from shared.tables import human_count, markdown_table, pct_spread

    lines = _preamble(r, "Stitching direction (the paper's Table III)")
    rows = []
    for budget in r["budgets"]:
        row = [f"{budget / 1e6:.3f}M"]
        for name in ("slow_to_fast", "fast_to_slow"):
            hit = next((x for x in r["rows"] if x["direction"] == name and budget in x["budgets"]), None)
            row += ([hit["variant"], f"{hit['params'] / 1e6:.3f}M", human_count(hit["trainable_params"]),
                     pct_spread(hit["accuracy"])] if hit else ["none in this band", "-", "-", "-"])
        rows.append(row)
    lines.append(markdown_table(["budget (params)", "Slow-to-Fast variant", "params", "trainable", "accuracy (%)",
                                 "Fast-to-Slow variant", "params", "trainable", "accuracy (%)"], rows))
    s = r["summary"]
    lines += ["", f"Budgets where both directions have a variant: {s['matched_budgets']}; Slow-to-Fast ahead at "
                  f"{s['slow_to_fast_ahead']} of them. Spearman(params, accuracy): Slow-to-Fast "
                  f"{_fmt(s['spearman_params_accuracy_slow_to_fast'], '.2f')}, Fast-to-Slow "
                  f"{_fmt(s['spearman_params_accuracy_fast_to_slow'], '.2f')}."]
    return "\n".join(lines)


def report_strategies(r: dict) -> str:
    from shared.tables import human_count, markdown_table, pct_spread
    from shared.vocabulary import STRATEGIES

    lines = _preamble(r, "Fine-tuning strategies (the paper's Table IV)")
    rows = []
    for vid in dict.fromkeys(x["variant"] for x in r["rows"]):
        mine = {x["strategy"]: x for x in r["rows"] if x["variant"] == vid}
        first = mine[STRATEGIES[0]]
        row = [vid, f"{first['params'] / 1e6:.3f}M", f"{100 * first['accuracy_init']:.2f}"]
        for strategy in STRATEGIES:
            row += [pct_spread(mine[strategy]["accuracy"]), human_count(mine[strategy]["trainable_params"])]
        rows.append(row)
    headers = ["variant", "params", "LS init (%)"]
    for strategy in STRATEGIES:
        headers += [f"{strategy}: accuracy (%)", "trainable"]
    lines.append(markdown_table(headers, rows))
    lines += ["", "Whole model minus stitch only, in points: " + ", ".join(
        f"{g['variant']} {100 * g['full_minus_stitch']:+.2f}" for g in r["gaps"]) + "."]
    return "\n".join(lines)


def report_cka_vs_accuracy(r: dict) -> str:
    from shared.tables import markdown_table, pct_spread

    lines = _preamble(r, "CKA against accuracy (the paper's Fig. 4)")
    rows = [[x["variant"], _fmt(x["cka"]), _fmt(x["cka_paper"]), f"{x['params'] / 1e6:.3f}M",
             f"{100 * x['accuracy_init']:.2f}", pct_spread(x["accuracy"])]
            for x in sorted(r["rows"], key=lambda x: x["cka"])]
    lines.append(markdown_table(["cut pair", "CKA (unbiased)", "CKA (paper)", "params", "LS init (%)",
                                 "after stitch-only fine-tuning (%)"], rows))
    c = r["correlation"]
    lines += ["", markdown_table(["correlation", "Spearman", "Pearson"],
                                 [[_correlation_label(k), _fmt(v["spearman"], ".2f"), _fmt(v["pearson"], ".2f")]
                                  for k, v in c.items()])]
    lines += ["", f"Stitch points chosen per budget band (Algorithm 1): the two estimators agree on "
                  f"{r['summary']['same_stitch_points']} of {r['summary']['budgets']} bands ((a, b): front block a's "
                  f"output into behind block b + 1).", ""]
    lines.append(markdown_table(["budget (params)", "unbiased picks (a, b)", "paper picks (a, b)", "same"],
                                [[f"{p['budget'] / 1e6:.3f}M", p["unbiased"], p["paper"], "yes" if p["same"] else "no"]
                                 for p in r["stitch_points"]]))
    return "\n".join(lines)


def _correlation_label(key: str) -> str:
    """`shared.experiments.correlations`' keys in words."""
    if key == "params":
        return "params vs accuracy after fine-tuning"
    estimator, _, condition = key.partition(", ")
    if condition == "least-squares fit only":
        return f"CKA ({estimator}) vs accuracy of the least-squares fit, before fine-tuning"
    if condition == "given params":
        return f"CKA ({estimator}) vs accuracy after fine-tuning, params partialled out"
    return f"CKA ({estimator}) vs accuracy after fine-tuning"


def report_heatmaps(r: dict) -> str:
    from shared.tables import markdown_table

    lines = _preamble(r, "CKA heatmaps (the paper's Fig. 5)")
    lines[-2] = f"CKA estimator: {r['estimator']}; the stitched variant is {r['variant']['variant']}."
    rows = []
    for m in r["matrices"]:
        s = m["summary"]
        if "neighbours_mean" in s:
            what = f"neighbouring blocks {_fmt(s['neighbours_mean'])}, blocks >= 4 apart {_fmt(s['far_mean'])}"
        else:
            what = (f"most similar behind block per front block {s['best_behind_block']}, rank correlation with "
                    f"depth {_fmt(s['spearman_depth'], '.2f')}")
        rows.append([m["title"], f"{len(m['rows'])} x {len(m['cols'])}", what])
    lines.append(markdown_table(["matrix", "blocks", "pattern"], rows))
    return "\n".join(lines)


REPORTS = {"directions": report_directions, "strategies": report_strategies,
           "cka-vs-accuracy": report_cka_vs_accuracy, "heatmaps": report_heatmaps}
