"""`restnet fl run`: federated fine-tuning of the catalog's stitching layers on Flower's deployment engine.

Starts a SuperLink (unless `--superlink` names a running one) and, with `--devices`, one SuperNode per device
folder on this machine; submits the Flower app with the fleet config's federated settings; follows the run; and
closes the loop: without `--coordinator` each improved variant becomes a new version in the catalog, with one the
ServerApp hands the new stitching weights to the coordinator, which versions and pushes them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from shared.errors import RestnetError


def add_parsers(subparsers) -> None:
    fl = subparsers.add_parser("fl", help="federated fine-tuning of stitching layers with Flower")
    sub = fl.add_subparsers(dest="fl_command", metavar="ACTION", required=True)
    r = sub.add_parser(
        "run", help="run a federated fine-tuning job (SuperLink, optional local SuperNodes, the Flower app)",
        description="Each device trains only its variant's stitching layer on its own data; the server averages "
                    "per variant and the result becomes the variant's next version.")
    r.add_argument("--config", required=True, help="fleet config YAML (data, federated settings)")
    r.add_argument("--catalog", required=True, help="catalog folder")
    r.add_argument("--out", default="out/fl", help="output folder; each run writes OUT/<time>/ (default: out/fl)")
    r.add_argument("--devices", help="folder of device folders (each with current.json + blobs/): start one "
                                     "SuperNode per device here, each with its partition of the data")
    r.add_argument("--superlink", help="HOST:PORT of a running SuperLink (default: start one on "
                                       "federated.superlink_port)")
    r.add_argument("--root-certificates", help="CA file of a TLS SuperLink given with --superlink (used by the "
                                               "flwr CLI and by the SuperNodes of --devices)")
    r.add_argument("--coordinator", default="", help="coordinator base URL: report rounds and hand it the new "
                                                     "stitching weights (default: write new versions to --catalog)")
    r.add_argument("--rounds", type=int, help="override federated.rounds")
    r.add_argument("--min-nodes", type=int, help="nodes to wait for before round 1 (default: the --devices count)")
    r.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    r.add_argument("--quiet", action="store_true", help="do not echo the run's log")
    r.set_defaults(func=run)


def run(args) -> int:
    from shared.node_data import NodeData
    from client.supernode import SuperNode
    from server.fl_runner import SuperLink, commit_results, flwr_run
    from server.run_config import run_config
    from shared.catalog import Catalog
    from shared.config import load_config
    from shared.tables import format_table, pct

    cfg = load_config(args.config)
    if args.root_certificates and not args.superlink:
        raise RestnetError("--root-certificates needs --superlink", "the SuperLink started here serves plain HTTP")
    Catalog.load(args.catalog)  # fail early on a missing or broken catalog
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    devices = _device_dirs(Path(args.devices)) if args.devices else []
    link, nodes = None, []
    try:
        if args.superlink:
            address = args.superlink
        else:
            link = SuperLink(run_dir / "flower", port=cfg.federated.superlink_port).start()
            address = link.address
        for i, device_dir in enumerate(devices):
            node = NodeData(device_dir, cfg.data, i, len(devices), cfg.federated.partition)
            nodes.append(SuperNode(node, address, root_certificates=args.root_certificates).start(wait=False))
        for node in nodes:
            node.wait_ready()
        config = run_config(cfg, Path(args.catalog), run_dir, args.coordinator.rstrip("/"),
                            min_nodes=args.min_nodes or len(devices) or 1, rounds=args.rounds)
        echo = None if args.quiet else (lambda line: print(line, file=sys.stderr))
        outcome = flwr_run(address, config, run_dir / "flwr-home", run_dir / "flower.log", args.timeout, echo,
                           args.root_certificates)
    finally:
        for node in nodes:
            node.stop()
        if link is not None:
            link.stop()
    if not outcome.ok:
        raise RestnetError(f"Flower run {outcome.run_id} ended {outcome.status}: {outcome.details}",
                           f"see {run_dir / 'flower.log'}")
    results = json.loads((run_dir / "results.json").read_text())
    rows = [[r["round"], r["variant_id"], pct(r["accuracy"]), f"{r['num_updates']}/{r['num_nodes']}",
             r["num_examples"], ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "-",
             r["dropped"], r["failed"], r["update_bytes"]] for r in results["rounds"]]
    print(format_table(["round", "variant", "accuracy", "updates", "examples", "rejected", "dropped", "failed",
                        "update bytes"], rows))
    print(f"\nrun {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f}s; results in {run_dir}")
    if args.coordinator:
        print("new stitching weights were handed to the coordinator, which versions and delivers them")
    else:
        committed, refused = commit_results(Path(args.catalog), run_dir)
        for vid, version in committed:
            print(f"catalog: {vid} is now version {version}")
        if refused:
            raise RestnetError("; ".join(exc.message for exc in refused), refused[0].hint)
    return 0


def _device_dirs(root: Path) -> list[Path]:
    dirs = sorted(d for d in root.iterdir() if (d / "current.json").is_file()) if root.is_dir() else []
    if not dirs:
        raise RestnetError(f"no device folders with an installed variant under {root}",
                           "expected DIR/<device>/current.json, as the device agent writes them")
    return dirs
