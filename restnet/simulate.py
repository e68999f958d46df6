"""`restnet fl simulate`: the fleet's federated fine-tuning over N virtual devices on Flower's simulation engine.

The same ServerApp (`server/fl_server.py`) and ClientApp (`client/fl_client.py`) as `restnet fl run`, submitted
with `flwr run` to a SuperLink started with `--simulation` (Ray runs the ClientApps). Virtual device i takes the
budget of the fleet config's device i mod len(devices), gets the variant the coordinator's assignment rule
(`server.assignment.Assigner`) gives that budget, and owns partition i of N of the training split (IID or
Dirichlet); a device that no variant fits keeps its partition unused and is no Flower node. Devices on the same
variant share one installed-variant folder (`<out>/variants/<id>/`), whose front-output cache holds one entry
per partition: a virtual device costs its few examples, not a model.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from shared.errors import ConfigError, RestnetError



def add_parser(sub) -> None:
    s = sub.add_parser(
        "simulate", help="federated fine-tuning over N virtual devices on Flower's simulation engine (Ray)",
        description="Runs the fleet's ServerApp and ClientApp (the same code as `restnet fl run`) over N virtual "
                    "devices: device i has the budget of the config's fleet.devices[i mod len], the variant the "
                    "assignment rule gives it, and partition i of the training data. Prints accuracy, accepted "
                    "and rejected updates and update bytes per variant and round. Nothing is published to the "
                    "catalog.")
    s.add_argument("--config", required=True, help="fleet config YAML: models, data, fleet.devices (the budget "
                                                   "classes), federated settings")
    s.add_argument("--devices", type=int, required=True, help="number of virtual devices")
    s.add_argument("--catalog", help="catalog folder (default: build one from the config into OUT/catalog, "
                                     "reused while the config's model and data settings are unchanged)")
    s.add_argument("--partition", choices=("iid", "dirichlet"), help="override federated.partition.kind")
    s.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller: fewer classes per device)")
    s.add_argument("--rounds", type=int, help="override federated.rounds")
    s.add_argument("--ray-address", help="run on a Ray cluster (HOST:PORT of its head, as for `ray start "
                                         "--address`; default: a local Ray instance on this machine's cores)")
    s.add_argument("--actors", type=int, help="ClientApp processes (Ray actors) on this machine, each serving "
                                              "many virtual devices (default: one per core; ignored with "
                                              "--ray-address, where the cluster's CPUs decide)")
    s.add_argument("--out", default="out/simulate", help="output folder (default: out/simulate)")
    s.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    s.add_argument("--quiet", action="store_true", help="do not echo the run's log")
    s.set_defaults(func=run)


def assign(cfg, catalog, n: int) -> list[str | None]:
    """The variant id of each virtual device (None: no variant fits its budget), by the coordinator's rule."""
    from server.assignment import Assigner
    from shared.catalog import VariantRecord
    from shared.messages import Profile

    assigner = Assigner(catalog.variants, cfg.fleet.memory_margin)
    classes = []
    for d in cfg.fleet.devices:
        choice = assigner.choose(Profile(memory_mb=d.memory_mb, compute=d.compute, latency_ms=d.latency_ms,
                                         agent_version="simulate"))
        classes.append(choice.id if isinstance(choice, VariantRecord) else None)
    return [classes[i % len(classes)] for i in range(n)]


def install_variants(catalog, variant_ids: set[str], sim_dir: Path) -> None:
    """One installed-variant folder per variant (`current.json` + `blobs/`, as a device agent leaves it)."""
    for vid in sorted(variant_ids):
        folder = sim_dir / "variants" / vid
        manifest = catalog.manifest(vid)
        (folder / "blobs").mkdir(parents=True, exist_ok=True)
        for block in manifest.blocks:
            target = folder / "blobs" / block.sha256
            if not target.is_file():
                shutil.copyfile(catalog.store.path(block.sha256), target)
        (folder / "current.json").write_bytes(manifest.to_bytes())


def check_ray_address(address: str) -> str:
    """HOST:PORT of a reachable Ray head, or a one-line error saying what to do."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT",
                          "give the Ray head's address, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise RestnetError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
                           "start its head with `ray start --head --port PORT` or fix --ray-address") from None
    return address


def run(args) -> int:
    from server.fl_runner import SuperLink, flwr_run
    from server.run_config import run_config
    from shared.catalog import Catalog
    from shared.config import PartitionConfig, load_config
    from shared.node_data import write_simulation
    from restnet.fl_tables import rounds_table

    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: a simulation needs at least one virtual device",
                          "e.g. --devices 1000")
    if args.actors is not None and args.actors < 1:
        raise ConfigError(f"--actors {args.actors}: needs at least one", "e.g. --actors 2")
    cfg = load_config(args.config)
    if not cfg.fleet.devices:
        raise ConfigError(f"{args.config} lists no devices under fleet.devices",
                          "the simulation draws its budget mix from them; see fleet_configs/demo.yaml")
    ray_address = check_ray_address(args.ray_address) if args.ray_address else None
    part = cfg.federated.partition
    cfg.federated.partition = PartitionConfig(kind=args.partition or part.kind,
                                              alpha=part.alpha if args.alpha is None else args.alpha, seed=part.seed)
    out = Path(args.out)
    if args.catalog:
        catalog_dir = Path(args.catalog)
    else:
        from restnet.demo import ensure_catalog

        catalog_dir = out / "catalog"
        ensure_catalog(cfg, catalog_dir, rebuild=False, progress=not args.quiet, log=say)
    catalog = Catalog.load(catalog_dir)

    run_dir = out / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    variants = assign(cfg, catalog, args.devices)
    install_variants(catalog, {v for v in variants if v}, run_dir)
    nodes = [(i, f"variants/{v}") for i, v in enumerate(variants) if v]  # refused devices train nothing
    write_simulation(run_dir, nodes, args.devices, cfg.data, cfg.federated.partition)
    counts = Counter(v or "(refused)" for v in variants)
    say(f"{args.devices} virtual devices: " + ", ".join(f"{v} x{c}" for v, c in sorted(counts.items())))
    if not nodes:
        raise RestnetError("no variant fits any device budget of the config", "raise fleet.devices' memory_mb")

    config = run_config(cfg, catalog_dir, run_dir / "fl", min_nodes=len(nodes), rounds=args.rounds,
                        simulation_dir=run_dir)
    config["round-timeout"] = config["query-timeout"] = args.timeout  # thousands of devices on a few cores
    # One Ray CPU per ClientApp actor (Flower 1.41 takes whole CPUs here). Locally, Ray's CPU count is the number
    # of actors (logical CPUs: more than the cores makes more actors per core); a cluster offers its own CPUs.
    federation = {"num-supernodes": len(nodes), "client-resources-num-cpus": 1, "init-args-log-to-driver": False}
    if not ray_address:
        federation["init-args-num-cpus"] = args.actors or os.cpu_count() or 1
    link = SuperLink(run_dir / "flower", simulation=True, env={"RAY_ADDRESS": ray_address} if ray_address else {})
    started = time.monotonic()
    echo = None if args.quiet else (lambda line: print(f"  | {line}", file=sys.stderr))
    say(f"starting Flower's simulation engine{' on ' + ray_address if ray_address else ''}")
    done = threading.Event()
    progress = threading.Thread(target=follow_progress, args=(run_dir / "fl" / "events.jsonl", done), daemon=True)
    try:
        link.start()
        progress.start()
        outcome = flwr_run(link.address, config, run_dir / "flwr-home", run_dir / "flower.log", link.security,
                           args.timeout, echo, federation_config=federation)
    finally:
        done.set()
        link.stop()
    if not outcome.ok:
        raise RestnetError(f"the simulation ended {outcome.status}: {outcome.details}", f"see {run_dir / 'flower.log'}")
    results = json.loads((run_dir / "fl" / "results.json").read_text())
    print(rounds_table(results))
    rounds = len({r["round"] for r in results["rounds"]})
    print(f"\n{args.devices} virtual devices, {rounds} rounds in {time.monotonic() - started:.0f}s; "
          f"results in {run_dir}")
    return 0


def follow_progress(events: Path, done: threading.Event) -> None:
    """One line per step of the ServerApp (its events.jsonl): a run of thousands of devices takes minutes."""
    seen = 0
    while not done.wait(2.0):
        text = events.read_text() if events.is_file() else ""
        lines = text[:text.rfind("\n") + 1].splitlines()  # complete lines only: the ServerApp may be writing
        for line in lines[seen:]:
            e = json.loads(line)
            if e["event"] == "discovered":
                say(f"round {e['round']}: {len(e['nodes'])} devices asked to train")
            elif e["event"] == "aggregated":
                say(f"round {e['round']}: {e['variant_id']} {e['num_updates']}/{e['num_nodes']} updates, "
                    f"accuracy {e['accuracy']:.2%}")
        seen = len(lines)


def say(msg: str) -> None:
    print(f"[simulate] {msg}", file=sys.stderr, flush=True)
