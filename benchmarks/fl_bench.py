"""Federated stitch-only fine-tuning: upload size, server aggregation time, accuracy against centralised training
(the benchmark of issue 4).

    PYTHONPATH=. python benchmarks/fl_bench.py [--config fleet_configs/digits.yaml] [--catalog out/digits]
        [--devices 8] [--alpha 0.5] [--rounds 10] [--local-epochs 1] [--lr 0.05] [--variants ID ...]
        [--updates 1000] [--stitch-channels 256] [--pairs fleet_configs/cifar10-vgg19-vgg11.yaml ...]
        [--encodings float16 int8] [--quick]

1. Upload per client per round: the ArrayRecord a ClientApp returns (the change to the stitch tensors in each
   update encoding, float16 and int8, `count_bytes`) against the ArrayRecord of the whole stitched model
   (float32, as stored), for every variant of the catalog; and, for the paper-scale model pairs of `--pairs`
   (random weights: only shapes matter), over every stitchable cut pair (a, b). The parameter ratio is printed
   beside the byte ratios: the encoding accounts for a factor of about 2 (float16) or 4 (int8) of the latter.
2. Server-side time for `--updates` updates of one variant, in each encoding: reading them from ArrayRecords
   (as the ServerApp does), decoding and validating each, and combining with fedavg / trimmed_mean / median; for
   the catalog's largest stitch and for a `--stitch-channels`^2 1x1-conv stitch.
3. Accuracy on the validation split after `--rounds` rounds of federated stitch-only training on `--devices`
   Dirichlet(`--alpha`) partitions of the training split, against centralised stitch-only training on the union
   of the same data for the same number of epochs (rounds x local epochs), both from the same starting stitch:
   `--start ls` (default) re-fits the least-squares initialisation the catalog build starts from (the catalog's
   own stitch is already trained centrally, which would make the comparison trivial), `random` re-initialises it
   randomly, `catalog` takes the catalog's. One federated run per encoding of `--encodings`; each executes the
   ClientApp's training function (`client.fl_client.local_update`, on device folders as the SuperNodes see
   them) and the ServerApp's aggregation (`aggregate_variant`) in-process, without Flower processes: same
   computation, no transport.

The catalog is built from `--config` into `--catalog` when that folder has none (a few minutes for digits).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.fl_client import TrainRequest, local_update
from shared.node_data import NodeData
from server.aggregation import Update, aggregate_variant
from shared.variants import load_variant
from shared.catalog import Catalog
from shared.config import PartitionConfig, load_config
from shared.datasets import load_splits
from shared.training import evaluate, finetune_stitch
from shared.updates import encode_delta
from shared.vocabulary import FLOAT16, INT8, UPDATE_FORMATS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fleet_helpers import install_from_catalog  # noqa: E402  (the tests' device-folder helper)


def ensure_catalog(config: str, root: Path) -> Catalog:
    if not (root / "catalog.json").is_file():
        from shared.build import build_catalog

        print(f"building the catalog of {config} into {root} ...", flush=True)
        build_catalog(load_config(config), root, progress=False, log=lambda m: None)
    return Catalog.load(root)


# ---------------------------------------------------------------- 1. bytes


def upload_bytes(catalog: Catalog) -> None:
    print("\n## 1. Upload per client per round: stitch tensors vs the whole stitched model (ArrayRecord bytes)")
    print(f"{'variant':34} {'params':>10} {'stitch':>8} {'params ratio':>13} {'model B':>11} {'float16 B':>10} "
          f"{'ratio':>6} {'int8 B':>8} {'ratio':>6}")
    ratios: dict[str, list[float]] = {FLOAT16: [], INT8: []}
    for rec in sorted(catalog.variants, key=lambda v: v.params):
        model = load_variant(catalog.manifest(rec.id), catalog.store)
        stitch = model.stitch_state()
        whole = ArrayRecord({k: v for k, v in model.state_dict().items()}).count_bytes()
        line = f"{rec.id:34} {rec.params:>10,} {rec.trainable_params:>8,} " \
               f"{rec.params / rec.trainable_params:>12.0f}x {whole:>11,}"
        for fmt, width in ((FLOAT16, 10), (INT8, 8)):
            up = ArrayRecord(encode_delta(stitch, stitch, fmt)).count_bytes()
            ratios[fmt].append(whole / up)
            line += f" {up:>{width},} {whole / up:>5.0f}x"
        print(line)
    for fmt, values in ratios.items():
        print(f"bytes ratio {fmt}: min {min(values):.0f}x, median {statistics.median(values):.0f}x "
              f"(target: at least 100x)")


def pair_ratios(config: str) -> None:
    """Whole-variant / stitch parameters and upload bytes for every stitchable cut of a paper-scale pair (shapes
    only). Bytes are tensor data: the whole variant's parameters in float32 against the encoded change."""
    from shared.blocks import activation_specs, split_model
    from shared.costs import count_params
    from shared.models import create_model
    from shared.stitching import StitchingLayer

    cfg = load_config(config)
    front = split_model(create_model(cfg.large.name, cfg.large.kwargs), cfg.large.name)
    behind = split_model(create_model(cfg.small.name, cfg.small.kwargs), cfg.small.name)
    fs, bs = activation_specs(front, cfg.input_shape), activation_specs(behind, cfg.input_shape)
    fp, bp = [count_params(b) for b in front.blocks], [count_params(b) for b in behind.blocks]
    pairs = []  # (parameter ratio, a, b, stitch params, variant params, {format: bytes ratio})
    budgets = sorted(cfg.catalog.budgets)
    for a in range(len(fs) - 1):
        for b in range(len(bs) - 1):
            try:
                state = StitchingLayer(fs[a], bs[b]).state_dict()
            except ValueError:
                continue
            stitch = sum(t.numel() for t in state.values())
            total = sum(fp[:a + 1]) + stitch + sum(bp[b + 1:])
            sent = {fmt: sum(t.numel() * t.element_size() for t in encode_delta(state, state, fmt).values())
                    for fmt in (FLOAT16, INT8)}
            pairs.append((total / stitch, a, b, stitch, total, {fmt: 4 * total / n for fmt, n in sent.items()}))
    pairs.sort(key=lambda r: r[0])
    q = [pairs[int(f * (len(pairs) - 1))] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    print(f"\n{cfg.large.name} -> {cfg.small.name} ({len(pairs)} cut pairs): whole/stitch parameter ratio "
          + ", ".join(f"{name} {r[0]:.0f}x" for name, r in zip(("min", "p25", "median", "p75", "max"), q)))
    worst = pairs[0]
    print(f"  worst: front[:{worst[1] + 1}] -> behind[{worst[2] + 1}:], stitch {worst[3]:,} of {worst[4]:,} params; "
          f"pairs under 100x: {sum(r[0] < 100 for r in pairs)} in parameters, in bytes "
          + ", ".join(f"{sum(r[5][fmt] < 100 for r in pairs)} in {fmt}" for fmt in (FLOAT16, INT8)))
    # The pairs a budget sweep would pick from: variants within the config's budget range.
    within = [r for r in pairs if budgets and budgets[0] * 0.9 <= r[4] <= budgets[-1] * 1.1]
    if within:
        print(f"  within the config's budgets ({budgets[0] / 1e6:.1f}M..{budgets[-1] / 1e6:.1f}M params, "
              f"{len(within)} pairs): parameter ratio min {within[0][0]:.0f}x, median "
              f"{within[len(within) // 2][0]:.0f}x; bytes ratio "
              + ", ".join(f"{fmt} min {min(r[5][fmt] for r in within):.0f}x, median "
                          f"{statistics.median(r[5][fmt] for r in within):.0f}x" for fmt in (FLOAT16, INT8)))


# ---------------------------------------------------------------- 2. aggregation time


def aggregation_time(current: dict[str, torch.Tensor], n: int, label: str, fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    records = [ArrayRecord(encode_delta(current, {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                  for k, v in current.items()}, fmt, seed=i)) for i in range(n)]
    params = sum(v.numel() for v in current.values())
    t = time.perf_counter()
    updates = [Update(i, "v", {k: torch.from_numpy(a.numpy()) for k, a in r.items()}, 100 + i % 50,
                      update_format=fmt) for i, r in enumerate(records)]
    read = time.perf_counter() - t
    print(f"{label}, {fmt}: {params:,} params/update, {n} updates ({sum(r.count_bytes() for r in records) / 1e6:.0f} "
          f"MB): read from ArrayRecords {read:.2f}s", end="")
    for method in ("fedavg", "trimmed_mean", "median"):
        t = time.perf_counter()
        res = aggregate_variant("v", current, updates, method)
        assert len(res.accepted) == n
        print(f", decode+validate+{method} {time.perf_counter() - t:.2f}s", end="")
    print()


# ---------------------------------------------------------------- 3. accuracy


def least_squares_start(catalog: Catalog, cfg, model, behind_cut: int) -> None:
    """Re-fit the stitch by least squares on the calibration examples, as `restnet catalog build` does."""
    from shared.blocks import split_model
    from shared.datasets import calibration_batches
    from shared.models import create_model

    role = "small" if catalog.direction == "slow_to_fast" else "large"
    checkpoint = catalog.root / "checkpoints" / f"{role}.safetensors"
    behind = split_model(create_model(catalog.behind.name, catalog.behind.kwargs, checkpoint=checkpoint),
                         catalog.behind.name).eval()
    train, _ = load_splits(cfg.data)
    x = torch.cat(calibration_batches(train, cfg.data.calibration.examples, cfg.data.calibration.repeats,
                                      cfg.data.seed))
    with torch.no_grad():
        dst = x
        for block in behind.blocks[:behind_cut]:
            dst = block(dst)
        model.stitch.init_least_squares(model.front(x), dst)


def federated_vs_central(catalog: Catalog, cfg, variant_id: str, args,
                         work: Path) -> tuple[float, dict[str, float], float]:
    """Accuracy from the starting stitch, after federated training in each of `args.encodings`, and after
    centralised training on the same data."""
    _, val = load_splits(cfg.data)
    model = load_variant(catalog.manifest(variant_id), catalog.store)
    if args.start == "ls":
        least_squares_start(catalog, cfg, model, catalog.get(variant_id).behind_cut)
    elif args.start == "random":
        model.stitch.init_random(seed=123)
    start = model.stitch_state()
    partition = PartitionConfig("dirichlet", args.alpha, 0)
    nodes = []
    for i in range(args.devices):
        node = NodeData(work / variant_id / f"dev{i}", cfg.data, i, args.devices, partition)
        install_from_catalog(catalog, variant_id, node.device_dir)
        nodes.append(node)
    fed = {}
    for encoding in args.encodings:
        fmt, current = UPDATE_FORMATS[encoding], start
        for rnd in range(1, args.rounds + 1):
            req = TrainRequest(variant_id, 1, rnd, args.local_epochs, args.lr, args.batch_size, fmt)
            updates = []
            for node in nodes:
                delta, metrics = local_update(node, req, {k: v.numpy() for k, v in current.items()})
                updates.append(Update(node.partition_id, variant_id, delta, metrics["num-examples"],
                                      update_format=fmt))
            current = aggregate_variant(variant_id, current, updates, "fedavg").state
        model.load_stitch_state(current)
        fed[encoding] = evaluate(model, val)

    train, _ = load_splits(cfg.data)
    model.load_stitch_state(start)
    init = evaluate(model, val)
    finetune_stitch(model, train, args.rounds * args.local_epochs, args.lr, args.batch_size)
    return init, fed, evaluate(model, val)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="fleet_configs/digits.yaml", help="fleet config the catalog is built from")
    p.add_argument("--catalog", default="out/digits", help="catalog folder (built from --config when empty)")
    p.add_argument("--devices", type=int, default=8, help="simulated devices, one data partition each")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID partitions")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (centralised: rounds x local epochs)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs each device trains per round")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of both trainings")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of both trainings")
    p.add_argument("--start", choices=("ls", "random", "catalog"), default="ls",
                   help="starting stitch of both trainings: the least-squares fit, random, or the catalog's")
    p.add_argument("--variants", nargs="*", help="variant ids for the accuracy comparison; not given: every variant")
    p.add_argument("--updates", type=int, default=1000, help="updates of one variant for the aggregation timing")
    p.add_argument("--stitch-channels", type=int, default=256,
                   help="channels of the square 1x1-conv stitch also timed (a paper-scale stitch)")
    p.add_argument("--pairs", nargs="*", default=["fleet_configs/cifar10-vgg19-vgg11.yaml",
                                                  "fleet_configs/cifar10-resnet34-vgg11.yaml"],
                   help="fleet configs whose every cut pair's upload ratio is counted (random weights)")
    p.add_argument("--encodings", nargs="+", choices=sorted(UPDATE_FORMATS), default=["float16", "int8"],
                   help="update encodings the federated runs use, one run each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: multi-threaded small ops stall on a busy 2-core machine)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 4 devices, 200 updates, one variant")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.devices, args.updates = 3, 4, 200
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    catalog = ensure_catalog(args.config, Path(args.catalog))

    upload_bytes(catalog)
    for pair in args.pairs:
        pair_ratios(pair)

    print(f"\n## 2. Server-side validation + aggregation of {args.updates} updates of one variant")
    largest = max(catalog.variants, key=lambda v: v.trainable_params)
    c = args.stitch_channels
    for fmt in (FLOAT16, INT8):
        aggregation_time(load_variant(catalog.manifest(largest.id), catalog.store).stitch_state(), args.updates,
                         f"catalog's largest stitch ({largest.id})", fmt)
        aggregation_time({"proj.weight": torch.randn(c, c, 1, 1), "proj.bias": torch.randn(c)}, args.updates,
                         f"{c}->{c} 1x1-conv stitch", fmt)

    print(f"\n## 3. Accuracy: {args.rounds} rounds x {args.local_epochs} local epoch(s) on {args.devices} "
          f"Dirichlet({args.alpha}) devices vs centralised stitch-only training for the same epochs, from the "
          f"{args.start} stitch "
          f"(ClientApp/ServerApp functions in-process, no Flower transport)")
    ids = args.variants or [v.id for v in sorted(catalog.variants, key=lambda v: v.params)]
    if args.quick:
        ids = ids[:1]
    gaps: dict[str, list[float]] = {e: [] for e in args.encodings}
    with tempfile.TemporaryDirectory() as work:
        for vid in ids:
            t = time.perf_counter()
            init, fed, central = federated_vs_central(catalog, cfg, vid, args, Path(work))
            line = f"{vid:34} start {100 * init:6.2f}%  centralised {100 * central:6.2f}%"
            for encoding, acc in fed.items():
                gaps[encoding].append(100 * (central - acc))
                line += f"  federated {encoding} {100 * acc:6.2f}% (gap {100 * (central - acc):+5.2f})"
            print(f"{line}  ({time.perf_counter() - t:.0f}s)", flush=True)
    for encoding, values in gaps.items():
        print(f"{encoding}: largest gap {max(values):+.2f} points, mean {statistics.mean(values):+.2f} "
              f"(target: within 2 points)")
    return 0


if __name__ == "__main__":
    from shared.errors import RestnetError

    np.set_printoptions(precision=3)
    try:
        sys.exit(main())
    except RestnetError as exc:  # a bad --config: one line and exit code, as the restnet commands give them
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
