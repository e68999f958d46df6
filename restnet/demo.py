"""`restnet demo`: the whole product on one machine, offline, with real processes.

1. Catalog: two small CNNs trained on the digits data and stitched (built once, then reused while the config
   is unchanged); each stitching layer is fitted by least squares, then fine-tuned on the operator's training
   split (Algorithm 2) before delivery, so the catalog rises with size as delivered.
2. Coordinator: embedded MQTT broker, SQLite registry, artifact HTTP, /metrics and the status page.
3. Fleet: simulated devices enroll with their budgets, download and verify their variants; each installed
   device starts its own Flower SuperNode with its share of the data.
4. Federated rounds on a real SuperLink; the coordinator versions each improved stitching layer and pushes it
   to the devices that run it.
5. A table and plots of what happened; every process started is stopped (Ctrl-C too).
With `--pressure`, step 4 is replaced by a ladder at work (`restnet/pressure.py`): the roomiest device holds a
ladder and its memory is squeezed and released; a table shows it stepping down and back up.

Float reductions depend on the number of threads, so the same run on a 1-core and a 2-core machine would train
slightly different models and could print another table. The demo runs every process with one thread
(`THREADS`): its table is the same on any machine of the same CPU kind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from shared.artifacts import MANIFEST_SCHEMA
from shared.errors import RestnetError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "fleet_configs" / "demo.yaml"
THREADS = 1  # torch threads in the demo and every process it starts (SuperLink, SuperNodes, their apps)


def add_parsers(subparsers) -> None:
    d = subparsers.add_parser(
        "demo", help="run the whole fleet on this machine: catalog, coordinator, devices, federated rounds",
        description="Builds (or reuses) a catalog, starts the coordinator with an embedded MQTT broker, a Flower "
                    "SuperLink and the simulated devices of the config, runs enrollment, delivery and federated "
                    "fine-tuning, then prints a table and writes plots. Offline; Ctrl-C stops everything.")
    d.add_argument("--config", default=str(DEFAULT_CONFIG), help="fleet config (default: fleet_configs/demo.yaml)")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--rounds", type=int, help="override federated.rounds")
    d.add_argument("--http-port", type=int, help="coordinator HTTP port (default: fleet.http_port; 0 = any free)")
    d.add_argument("--broker-port", type=int, help="embedded broker port (default: 1883; 0 = any free)")
    d.add_argument("--rebuild", action="store_true", help="rebuild the catalog even if the config is unchanged")
    d.add_argument("--linger", type=float, default=0.0,
                   help="keep the coordinator and its status page up this many seconds after the run")
    d.add_argument("--quiet", action="store_true", help="no progress bars or Flower log")
    d.add_argument("--pressure", action="store_true",
                   help="instead of federated rounds: squeeze the roomiest device's memory and release it; its "
                        "ladder steps down and back up (restnet/pressure.py)")
    d.set_defaults(func=run)


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def config_digest(cfg) -> str:
    """What the catalog depends on (models, data, catalog settings, the artifact format this release writes):
    editing the fleet or the federated settings does not rebuild it."""
    parts = {k: asdict(getattr(cfg, k)) for k in ("large", "small", "data", "catalog")}
    parts["num_classes"], parts["artifacts"] = cfg.num_classes, MANIFEST_SCHEMA
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ensure_catalog(cfg, base: Path, rebuild: bool, progress: bool, log=say) -> None:
    """Build the catalog into `base` unless one built from the same settings is already there."""
    from shared.build import build_catalog

    stamp = base / ".config-digest"
    digest = config_digest(cfg)
    if not rebuild and stamp.is_file() and stamp.read_text() == digest and (base / "catalog.json").is_file():
        log(f"reusing the catalog in {base} (built from the same settings; delete it to build it again)")
        return
    shutil.rmtree(base, ignore_errors=True)
    log("building the catalog: training two base models, stitching and fine-tuning the stitches (a few minutes)")
    build_catalog(cfg, base, progress=progress, log=log)
    stamp.write_text(digest)


def pin_threads(count: int = THREADS) -> None:
    """Every float reduction in the same order on any machine: `count` threads here and in our child processes
    (they inherit the environment, and torch reads it when it starts)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(count)
    # glibc gives each thread that allocates its own malloc arena (64 MiB of address space each, partly resident);
    # the Flower processes run gRPC and HTTP threads that need none of that.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    torch.set_num_threads(count)


def run(args) -> int:
    """The demo, its whole process tree's resident memory sampled throughout (printed at the end)."""
    from restnet.memory import TreeMemory

    with TreeMemory() as memory:
        return _run(args, memory)


def _run(args, memory) -> int:
    from client.fleet_sim import describe, start_fleet, wait_settled
    from shared.processes import free_port
    from client.supernode import SuperNodeManager
    from server.coordinator import Coordinator
    from server.fl_runner import SuperLink, flwr_run
    from server.run_config import run_config
    from shared.catalog import Catalog
    from shared.config import load_config
    from shared.signing import generate_key

    config_path = Path(args.config)
    cfg = load_config(config_path)
    if not cfg.fleet.devices:
        raise RestnetError(f"{config_path} lists no devices under fleet.devices", "see fleet_configs/demo.yaml")
    out = Path(args.out)
    run_dir = out / "run"
    started = time.monotonic()
    pin_threads()
    ensure_catalog(cfg, out / "catalog-base", args.rebuild, not args.quiet)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(out / "catalog-base", run_dir / "catalog")
    catalog = Catalog.load(run_dir / "catalog")

    fleet = cfg.fleet
    fleet.registry = str(run_dir / "fleet.db")
    fleet.device_root = str(run_dir / "devices")
    if not fleet.signing_key:  # the trust chain on, as in production: the demo's own key, trusted by its devices
        generate_key(run_dir / "keys" / "coordinator.key", run_dir / "keys" / "coordinator.pub")
        fleet.signing_key, fleet.trusted_keys = str(run_dir / "keys" / "coordinator.key"), [
            str(run_dir / "keys" / "coordinator.pub")]
    if args.http_port is not None:
        fleet.http_port = args.http_port or free_port()
    if fleet.broker.url.startswith("embedded") and args.broker_port is not None:
        fleet.broker.url = f"embedded://127.0.0.1:{args.broker_port or free_port()}"
    device_ids = [d.id for d in fleet.devices]

    with ExitStack() as stack:
        coordinator = Coordinator(fleet, catalog).start()
        stack.callback(coordinator.stop)
        say(f"coordinator up: metrics {coordinator.public_url}/metrics, status page {coordinator.public_url}/")
        link = SuperLink(run_dir / "flower").start()  # one machine: plain HTTP on loopback
        stack.callback(link.stop)
        say(f"Flower SuperLink up on {link.address}")
        nodes = SuperNodeManager(link.address, link.security, cfg.data, cfg.federated.partition,
                                 {d: i for i, d in enumerate(device_ids)}, len(device_ids))
        stack.callback(nodes.stop)
        ladder_options = {}
        if args.pressure:
            from client.memory import MemorySource
            from restnet import pressure

            squeezed_id = pressure.prepare(fleet, catalog, run_dir / "pressure-cgroup")
            ladder_options = {"memory": MemorySource(run_dir / "pressure-cgroup"), "hold_s": pressure.HOLD_S,
                              "memory_poll_s": pressure.POLL_S}
        agents = start_fleet(fleet, run_dir / "devices", on_installed=nodes.on_installed, **ladder_options)
        stack.callback(lambda: [a.stop() for a in agents])
        say(f"{len(agents)} devices enrolling")
        late = wait_settled(agents, timeout=180)
        for agent in agents:
            say("  " + describe(agent))
        if late:
            raise RestnetError(f"devices did not settle in time: {', '.join(a.device_id for a in late)}")
        delivered = {a.device_id: a.installed for a in agents if a.installed is not None}
        if not delivered:
            raise RestnetError("no device received a variant", "raise the devices' memory_mb in the config")
        if args.pressure:
            squeezed = next(a for a in agents if a.device_id == squeezed_id)
            rows = pressure.run(coordinator, squeezed, run_dir / "pressure-cgroup", say)
            print(pressure.table(rows, squeezed_id))
            (out / "demo.json").write_text(json.dumps({"pressure": {"device": squeezed_id, "steps": rows}}, indent=1))
            if args.linger > 0:
                say(f"status page stays up for {args.linger:.0f}s at {coordinator.public_url}/ (Ctrl-C to stop)")
                time.sleep(args.linger)
            say("stopping every process")
            return 0
        nodes.wait_ready()

        rounds = args.rounds or cfg.federated.rounds
        say(f"federated fine-tuning: {rounds} rounds over {len(delivered)} SuperNodes")
        config = run_config(cfg, run_dir / "catalog", run_dir / "fl", coordinator.public_url,
                            min_nodes=len(delivered), rounds=rounds)
        echo = None if args.quiet else (lambda line: print(f"  | {line}", file=sys.stderr))
        outcome = flwr_run(link.address, config, run_dir / "flwr-home", run_dir / "flower.log", link.security,
                           1800, echo)
        if not outcome.ok:
            raise RestnetError(f"the Flower run ended {outcome.status}: {outcome.details}",
                               f"see {run_dir / 'flower.log'}")
        results = json.loads((run_dir / "fl" / "results.json").read_text())
        late = wait_settled(agents, timeout=120)  # new versions pushed by the coordinator get installed
        if late:
            raise RestnetError(f"devices did not install the new versions: {', '.join(a.device_id for a in late)}")
        final = Catalog.load(run_dir / "catalog")
        report = summarize(cfg, final, agents, delivered, results)
        as_delivered = Catalog.load(out / "catalog-base")
        report["catalog"] = delivered_catalog(as_delivered)
        print(report["table"])
        print("\n" + report["catalog"]["summary"])
        plots = write_plots(as_delivered, report, results, out)
        print(f"\nplots: {', '.join(str(p) for p in plots)}")
        print(f"results: {out / 'demo.json'}; metrics were at {coordinator.public_url}/metrics")
        report["memory"] = {"peak_rss_bytes": memory.peak_rss, "peak_pss_bytes": memory.peak_pss,
                            "processes": memory.peak_processes, "at_peak_by_process": memory.peak_by_name}
        print(memory.summary())
        (out / "demo.json").write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1))
        say(f"done in {time.monotonic() - started:.0f}s")
        if args.linger > 0:
            say(f"status page stays up for {args.linger:.0f}s at {coordinator.public_url}/ (Ctrl-C to stop)")
            time.sleep(args.linger)
        say("stopping every process")
    return 0


def delivered_catalog(catalog) -> dict:
    """The catalog the devices were given, smallest variant first, and how its accuracy follows its size."""
    from shared.experiments import spearman

    variants = [{"id": v.id, "params": v.params, "accuracy": v.accuracy}
                for v in sorted(catalog.variants, key=lambda v: v.params)]
    rho = spearman([v["params"] for v in variants], [v["accuracy"] for v in variants])
    large = max((catalog.front, catalog.behind), key=lambda m: m.params)
    summary = (f"catalog as delivered: {len(variants)} variants, Spearman(params, accuracy) "
               f"{'n/a' if rho is None else f'{rho:.2f}'}; largest {variants[-1]['accuracy']:.2%} against the large "
               f"base model's {large.accuracy:.2%}")
    return {"variants": variants, "spearman": rho, "large_accuracy": large.accuracy, "summary": summary}


def summarize(cfg, catalog, agents, delivered, results) -> dict:
    """One row per device: budget, assignment, costs, accuracy as delivered and after federated rounds."""
    from shared.tables import format_table, human_bytes, pct

    budgets = {d.id: d for d in cfg.fleet.devices}
    rows, devices = [], []
    for agent in agents:
        d = budgets[agent.device_id]
        inst = agent.installed
        if inst is None:
            rows.append([d.id, f"{d.memory_mb:g}MiB", f"{d.compute:g}", "refused", "-", "-", "-", "-", "-", "-"])
            devices.append({"device": d.id, "memory_mb": d.memory_mb, "compute": d.compute, "variant": None})
            continue
        rec = catalog.get(inst.variant_id)
        res = results["variants"].get(inst.variant_id, {})
        entry = {"device": d.id, "memory_mb": d.memory_mb, "compute": d.compute, "variant": rec.id,
                 "version_delivered": delivered[d.id].version, "version_now": inst.version, "params": rec.params,
                 "memory_bytes": rec.memory_bytes, "finetune_memory_bytes": rec.finetune_memory_bytes,
                 "flops": rec.flops, "accuracy_delivered": res.get("accuracy_initial"),
                 "accuracy_after": res.get("accuracy")}
        devices.append(entry)
        rows.append([d.id, f"{d.memory_mb:g}MiB", f"{d.compute:g}", rec.id, f"{rec.params / 1e6:.3f}M",
                     human_bytes(rec.memory_bytes + rec.finetune_memory_bytes), f"{rec.flops / 1e6:.1f}M",
                     pct(entry["accuracy_delivered"]), pct(entry["accuracy_after"]),
                     f"v{entry['version_delivered']}->v{entry['version_now']}"])
    table = format_table(["device", "memory", "compute", "variant", "params", "needs (infer+tune)", "flops",
                          "acc delivered", "acc after FL", "version"], rows)
    return {"table": table, "devices": devices, "rounds": results["rounds"]}


def write_plots(catalog, report: dict, results: dict, out: Path) -> list[Path]:
    """The catalog as delivered (its frontier, the assigned variants circled, their accuracy after the federated
    rounds beside), the CKA matrix, and accuracy per round."""
    from restnet.catalog_commands import write_catalog_plots
    from shared.plots import plot_rounds

    assigned = {d["variant"] for d in report["devices"] if d["variant"]}
    after = {d["variant"]: d["accuracy_after"] for d in report["devices"] if d.get("accuracy_after") is not None}
    plots = write_catalog_plots(catalog, out, assigned, after)
    history: dict[str, list[float]] = {}
    for vid, entry in results["variants"].items():
        history[vid] = [entry["accuracy_initial"]]
    for r in sorted(results["rounds"], key=lambda r: r["round"]):
        if r.get("accuracy") is not None and r["variant_id"] in history:
            history[r["variant_id"]].append(r["accuracy"])
    plots.append(plot_rounds(history, out / "rounds.png"))
    return plots

