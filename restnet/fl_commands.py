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
    security = r.add_argument_group("security (one of --tls-dir, --root-certificates or --insecure)")
    security.add_argument("--tls-dir", help="certificates for the SuperLink started here: ca.crt, superlink.crt, "
                                            "superlink.key (docker/tls/gen_certs.py writes them)")
    security.add_argument("--root-certificates", help="CA of the TLS SuperLink given with --superlink")
    security.add_argument("--insecure", action="store_true",
                          help="plain HTTP between SuperLink and SuperNodes: only on a single machine")
    security.add_argument("--node-auth", action="store_true",
                          help="with --tls-dir: the SuperLink admits registered SuperNodes only; the SuperNodes of "
                               "--devices get a key each (<device>/supernode-key) and are registered")
    r.add_argument("--coordinator", default="", help="coordinator base URL: report rounds and hand it the new "
                                                     "stitching weights (default: write new versions to --catalog)")
    r.add_argument("--rounds", type=int, help="override federated.rounds")
    r.add_argument("--min-nodes", type=int, help="nodes to wait for before round 1 (default: the --devices count)")
    r.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    r.add_argument("--quiet", action="store_true", help="do not echo the run's log")
    r.set_defaults(func=run)

    from restnet.simulate import add_parser as add_simulate_parser

    add_simulate_parser(sub)

    g = sub.add_parser("register", help="admit devices' SuperNodes to a SuperLink that authenticates them",
                       description="Registers each public key (`restnet keys supernode` writes them) with the "
                                   "SuperLink (started with --enable-supernode-auth), through Flower's CLI.")
    g.add_argument("keys", nargs="+", metavar="KEY.pub", help="SuperNode public keys (OpenSSH, EC P-384)")
    g.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    g.add_argument("--root-certificates", required=True, help="CA of the SuperLink's certificate")
    g.set_defaults(func=register)


def run(args) -> int:
    from client.supernode import SuperNode, generate_supernode_key
    from server.fl_runner import SuperLink, SuperLinkTLS, commit_results, flwr_run, register_supernode
    from shared.flower_link import LinkSecurity
    from shared.node_data import NodeData
    from server.run_config import run_config
    from shared.catalog import Catalog
    from shared.config import load_config
    from restnet.fl_tables import rounds_table

    cfg = load_config(args.config)
    if args.superlink and args.tls_dir:
        raise RestnetError("--tls-dir is for the SuperLink started here", "with --superlink give --root-certificates")
    if args.node_auth and not args.tls_dir:
        raise RestnetError("--node-auth needs --tls-dir", "SuperNode authentication runs over TLS only")
    tls = SuperLinkTLS.from_dir(args.tls_dir) if args.tls_dir else None
    security = LinkSecurity(tls.ca) if tls else LinkSecurity.choose(
        args.root_certificates, args.insecure, "--tls-dir, --root-certificates (with --superlink) and --insecure")
    Catalog.load(args.catalog)  # fail early on a missing or broken catalog
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    devices = _device_dirs(Path(args.devices)) if args.devices else []
    link, nodes = None, []
    try:
        if args.superlink:
            address = args.superlink
        else:
            link = SuperLink(run_dir / "flower", cfg.federated.superlink_port, tls, args.node_auth).start()
            address = link.address
        for i, device_dir in enumerate(devices):
            key = None
            if args.node_auth:
                key = device_dir / "supernode-key"
                node_id = register_supernode(address, security, generate_supernode_key(key), run_dir / "flwr-home")
                print(f"{device_dir.name}: SuperNode key registered (node {node_id})", file=sys.stderr)
            node = NodeData(device_dir, cfg.data, i, len(devices), cfg.federated.partition)
            nodes.append(SuperNode(node, address, security, auth_private_key=key).start(wait=False))
        for node in nodes:
            node.wait_ready()
        config = run_config(cfg, Path(args.catalog), run_dir, args.coordinator.rstrip("/"),
                            min_nodes=args.min_nodes or len(devices) or 1, rounds=args.rounds)
        echo = None if args.quiet else (lambda line: print(line, file=sys.stderr))
        outcome = flwr_run(address, config, run_dir / "flwr-home", run_dir / "flower.log", security, args.timeout,
                           echo)
    finally:
        for node in nodes:
            node.stop()
        if link is not None:
            link.stop()
    if not outcome.ok:
        raise RestnetError(f"Flower run {outcome.run_id} ended {outcome.status}: {outcome.details}",
                           f"see {run_dir / 'flower.log'}")
    results = json.loads((run_dir / "results.json").read_text())
    print(rounds_table(results))
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


def register(args) -> int:
    import tempfile

    from server.fl_runner import register_supernode
    from shared.flower_link import LinkSecurity

    security = LinkSecurity.choose(args.root_certificates, False, "--root-certificates")
    with tempfile.TemporaryDirectory() as flwr_home:
        for key in args.keys:
            print(f"{key}: node {register_supernode(args.superlink, security, Path(key), Path(flwr_home))}")
    return 0


def _device_dirs(root: Path) -> list[Path]:
    dirs = sorted(d for d in root.iterdir() if (d / "current.json").is_file()) if root.is_dir() else []
    if not dirs:
        raise RestnetError(f"no device folders with an installed variant under {root}",
                           "expected DIR/<device>/current.json, as the device agent writes them")
    return dirs
