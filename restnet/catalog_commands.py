"""`restnet catalog build | show`, `restnet cka`, `restnet train-base`, `restnet stitch-train`: the operator's
commands over the ReStNet core (`shared/`). Each is a small function over the library; errors are one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from shared.errors import RestnetError


def add_parsers(sub) -> None:
    cat = sub.add_parser("catalog", help="build or inspect a catalog of stitched variants")
    catsub = cat.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    b = catsub.add_parser("build", help="train/load both models, compute CKA, select, stitch, fine-tune, export",
                          description="Build a catalog: catalog.json, cka.json, blobs/, manifests/, cka.png, frontier.png.")
    b.add_argument("--config", required=True, help="fleet config YAML (see fleet_configs/)")
    b.add_argument("--out", required=True, help="output folder for the catalog")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_catalog_build)
    s = catsub.add_parser("show", help="print a catalog's variants")
    s.add_argument("catalog", help="catalog folder")
    s.add_argument("--json", action="store_true", help="print catalog.json instead of a table")
    s.set_defaults(func=cmd_catalog_show)

    c = sub.add_parser("cka", help="CKA matrix between every block of the config's two models",
                       description="Writes cka.json and cka.png; trains the models first when the config says so.")
    c.add_argument("--config", required=True, help="fleet config YAML")
    c.add_argument("--out", default="out/cka", help="output folder (default: out/cka)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_cka)

    t = sub.add_parser("train-base", help="train the config's base model(s) from scratch and save checkpoints")
    t.add_argument("--config", required=True, help="fleet config YAML")
    t.add_argument("--role", choices=("large", "small", "both"), default="both", help="which model (default: both)")
    t.add_argument("--out", default="out/base", help="output folder; checkpoints land in OUT/checkpoints/")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_base)

    st = sub.add_parser("stitch-train", help="fine-tune one catalog variant (Algorithm 2 or another strategy)")
    st.add_argument("--config", required=True, help="fleet config YAML (data and fine-tuning settings)")
    st.add_argument("--catalog", required=True, help="catalog folder")
    st.add_argument("--variant", required=True, help="variant id (see `restnet catalog show`)")
    st.add_argument("--strategy", default="stitch", choices=("stitch", "stitch+behind", "stitch+front", "full"),
                    help="which weights to train (default: stitch, the paper's choice)")
    st.add_argument("--epochs", type=int, default=None, help="override catalog.finetune.epochs")
    st.add_argument("--save", action="store_true", help="store the result as the variant's next version")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    st.set_defaults(func=cmd_stitch_train)


def _catalog_table(catalog) -> str:
    from shared.tables import format_table, human_bytes, pct

    rows = [[v.id, f"{v.cka:.3f}", v.stitch_kind, f"{v.params / 1e6:.3f}M", f"{v.flops / 1e6:.1f}M",
             f"{v.macs / 1e6:.1f}M", human_bytes(v.memory_bytes), f"{v.trainable_params / 1e3:.1f}K",
             pct(v.accuracy_init), pct(v.accuracy), v.version]
            for v in sorted(catalog.variants, key=lambda v: v.params)]
    for role, m in (("front", catalog.front), ("behind", catalog.behind)):
        rows.append([f"(base {role}) {m.name}", "-", "-", f"{m.params / 1e6:.3f}M", f"{m.flops / 1e6:.1f}M",
                     f"{m.macs / 1e6:.1f}M", "-", "-", "-", pct(m.accuracy), "-"])
    return format_table(["variant", "cka", "stitch", "params", "flops", "macs", "memory", "trainable", "acc init",
                         "accuracy", "ver"], rows)


def write_catalog_plots(catalog, out: Path, highlight: set[str] = frozenset(),
                        after: dict[str, float] | None = None) -> list[Path]:
    from dataclasses import asdict

    import numpy as np

    from shared.plots import plot_cka, plot_frontier

    cka = catalog.load_cka()
    matrix = np.array([[np.nan if v is None else v for v in row] for row in cka["matrix"]], dtype=float)
    chosen = [(v.front_cut - 1, v.behind_cut - 1) for v in catalog.variants]
    return [
        plot_cka(matrix, cka["front_blocks"], cka["behind_blocks"], chosen, out / "cka.png",
                 f"CKA: {catalog.front.name} (front) vs {catalog.behind.name} (behind)"),
        plot_frontier([v.to_dict() for v in catalog.variants], [asdict(catalog.front), asdict(catalog.behind)],
                      out / "frontier.png", set(highlight), after=after),
    ]


def cmd_catalog_build(args) -> int:
    from shared.build import build_catalog
    from shared.config import load_config

    cfg = load_config(args.config)
    out = Path(args.out)
    report = build_catalog(cfg, out, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    plots = write_catalog_plots(report.catalog, out)
    print(_catalog_table(report.catalog))
    print(f"\ncatalog: {out / 'catalog.json'}  cka: {out / report.catalog.cka_file}  plots: "
          + ", ".join(str(p) for p in plots))
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    return 0


def cmd_catalog_show(args) -> int:
    from shared.catalog import Catalog

    catalog = Catalog.load(args.catalog)
    if args.json:
        print(json.dumps(catalog.to_dict(), indent=2))
    else:
        print(_catalog_table(catalog))
    return 0


def cmd_cka(args) -> int:
    import numpy as np

    from shared.build import calibrate, prepare_bases
    from shared.config import load_config
    from shared.datasets import calibration_batches, load_splits
    from shared.plots import plot_cka

    cfg = load_config(args.config)
    out = Path(args.out)
    train, val = load_splits(cfg.data)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    bases = prepare_bases(cfg, train, val, out, not args.quiet, log)
    ba, bb = bases["large"][1], bases["small"][1]
    batches = calibration_batches(train, cfg.data.calibration.examples, cfg.data.calibration.repeats, cfg.data.seed)
    cal = calibrate(ba, bb, batches, cfg.data.calibration.batch_size, cfg.data.calibration.estimator)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"rows": ba.block_names[:-1], "cols": bb.block_names[:-1],
           "matrix": [[None if not np.isfinite(v) else float(v) for v in row] for row in cal.cka]}
    (out / "cka.json").write_text(json.dumps(doc))
    plot_cka(cal.cka, doc["rows"], doc["cols"], [], out / "cka.png", f"CKA: {cfg.large.name} vs {cfg.small.name}")
    np.set_printoptions(precision=3, suppress=True, linewidth=200)
    print(cal.cka)
    if cal.undefined:
        print(f"undefined: {cal.undefined}")
    print(f"wrote {out / 'cka.json'} and {out / 'cka.png'}")
    return 0


def cmd_train_base(args) -> int:
    from shared.build import prepare_bases
    from shared.config import load_config
    from shared.datasets import load_splits
    from shared.errors import ConfigError

    cfg = load_config(args.config)
    out = Path(args.out)
    train, val = load_splits(cfg.data)
    roles = ("large", "small") if args.role == "both" else (args.role,)
    for role in roles:
        mc = getattr(cfg, role)
        if mc.train is None:
            raise ConfigError(f"{role}.train is not set in {cfg.source}", "add `train: {epochs: 10}` to the model")
        mc.checkpoint, mc.pretrained = None, False
    for role in {"large", "small"} - set(roles):  # the other model is left untrained
        getattr(cfg, role).train = None
    prepare_bases(cfg, train, val, out, not args.quiet, print)
    for role in roles:
        print(f"checkpoint: {out / 'checkpoints' / f'{role}.safetensors'}")
    return 0


def cmd_stitch_train(args) -> int:
    from shared.variants import load_variant
    from shared.catalog import Catalog
    from shared.config import load_config
    from shared.datasets import load_splits
    from shared.training import evaluate, finetune

    if args.save and args.strategy != "stitch":
        raise RestnetError("only stitch-only fine-tuning can be saved as a new version",
                           "other strategies change shared base blocks; use --strategy stitch")
    cfg = load_config(args.config)
    catalog = Catalog.load(args.catalog)
    try:
        rec = catalog.get(args.variant)
    except KeyError:
        raise RestnetError(f"no variant {args.variant!r} in {args.catalog}",
                           "variants: " + ", ".join(v.id for v in catalog.variants)) from None
    manifest = catalog.manifest(rec.id)
    model = load_variant(manifest, catalog.store)
    train, val = load_splits(cfg.data)
    before = evaluate(model, val)
    tcfg = cfg.catalog.finetune
    if args.epochs is not None:
        tcfg.epochs = args.epochs
    stats = finetune(model, train, tcfg, args.strategy, desc=f"fine-tune {rec.id}", progress=not args.quiet)
    after = evaluate(model, val)
    print(f"{rec.id}: strategy {args.strategy}, {stats['trainable_params']} trainable params, "
          f"{stats['seconds']:.1f}s, accuracy {before:.4f} -> {after:.4f}")
    if args.save:
        new = catalog.publish_stitch(rec.id, model.stitch_state(), after, base_version=manifest.version)
        print(f"saved {rec.id} version {new.version}")
    return 0
