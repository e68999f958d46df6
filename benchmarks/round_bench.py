"""A federated round's device-side time outside training, as a fraction of training time; and the demo's peak
resident memory (issue 14 items 4-5).

    PYTHONPATH=. python benchmarks/round_bench.py [--config fleet_configs/demo.yaml] [--out out/round-bench]
        [--rounds 3] [--demo-base REV] [--skip-demo]

1. One SuperLink and four SuperNodes on Flower's real deployment engine, in the same rounds (side by side), each
   a device folder with the catalog's largest variant and an IID share of the config's data:
   - `per-message, no cache` (before): Flower's default executor (the SuperNode's `flower-superexec` starts a
     `flwr-clientapp` process per message); the device's front-output cache is deleted after every round, so
     each round runs the front pass as the ClientApp did before the cache;
   - `per-message, cache`: the same, cache kept;
   - `isolation process, cache`: `flower-supernode --isolation process` with Flower's `flower-superexec` beside it
     (Flower 1.41's process isolation mode: still a process per message), cache kept;
   - `hosted in the agent, cache` (ours, the default of `client.supernode.SuperNode`): `--isolation process`
     served by `client.clientapp_host.ClientAppHost` in this benchmark's process, as the device agent does.
   Each training request's timestamps (`fl_history.jsonl`: handling started — the ClientApp process created, or
   the task acquired by the host —, message handled, its turn to train in the process, torch & co imported,
   variant loaded, front outputs ready, training) split the time outside training into start, turn, imports,
   loading and the front pass; the table shows their sum as a fraction of training time and how many processes
   served the rounds (distinct pids).
2. `restnet fl simulate` with as many virtual devices on the same data: the simulation engine's actors are
   ClientApp processes that serve many messages; the same fractions from round 2 on.
3. The demo's peak resident memory (sum of RSS and of PSS over its whole process tree, sampled every 0.5 s) for
   this tree and for `--demo-base` (a git revision, exported to a temporary folder and run with the same venv),
   one after the other on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fleet_helpers import install_from_catalog  # noqa: E402  (the tests' device-folder helper)

from client.clientapp_host import POLL_S  # noqa: E402
from client.fl_client import HISTORY  # noqa: E402
from client.supernode import SuperNode, write_node_config  # noqa: E402
from restnet.demo import ensure_catalog  # noqa: E402
from restnet.memory import MIB, TreeMemory  # noqa: E402
from server.fl_runner import SuperLink, flwr_run  # noqa: E402
from server.run_config import run_config  # noqa: E402
from shared.catalog import Catalog  # noqa: E402
from shared.config import PartitionConfig, load_config  # noqa: E402
from shared.front_cache import CACHE_DIR  # noqa: E402
from shared.node_data import NodeData  # noqa: E402
from shared.processes import ManagedProcess, flower_executable, free_port  # noqa: E402
from shared.tables import format_table  # noqa: E402

NODES = ("per-message, no cache", "per-message, cache", "isolation process, cache", "hosted in the agent, cache")


def history(device_dir: Path) -> list[dict]:
    path = device_dir / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def forget_cache_each_round(device_dir: Path, stop: threading.Event) -> None:
    """Delete the device's front-output cache as soon as a round's history entry appears (the 'before' case)."""
    seen = 0
    while not stop.is_set():
        entries = len(history(device_dir))
        if entries > seen:
            shutil.rmtree(device_dir / CACHE_DIR, ignore_errors=True)
            seen = entries
        stop.wait(0.05)


def split(entries: list[dict]) -> dict:
    """Mean seconds per round: the start of the message's handling to the message handler (a new process: Python,
    Flower, the app bundle; hosted: pulling the task from the SuperNode), the lazy imports (torch, timm), loading
    the variant, the front pass (or reading its cache), and training."""
    def mean(f):
        return statistics.mean(f(e) for e in entries) if entries else float("nan")
    return {"start": mean(lambda e: e["received_at"] - e["started_at"]),
            "wait": mean(lambda e: e["turn_at"] - e["received_at"]),
            "imports": mean(lambda e: e["imported_at"] - e["turn_at"]),
            "load": mean(lambda e: e["loaded_at"] - e["imported_at"]),
            "front": mean(lambda e: e["front_at"] - e["loaded_at"]),
            "train": mean(lambda e: e["train-seconds"]),
            "pids": len({e["pid"] for e in entries}), "rounds": len(entries)}


def row(name: str, s: dict, long_running: bool = False) -> list:
    outside = s["wait"] + s["imports"] + s["load"] + s["front"] + (0.0 if long_running else s["start"])
    start = "(process kept)" if long_running else f"{s['start']:.2f}s"
    return [name, start, f"{s['wait']:.3f}s", f"{s['imports']:.2f}s", f"{s['load']:.3f}s", f"{s['front']:.3f}s",
            f"{s['train']:.3f}s", f"{outside / s['train']:.2f}", f"{s['pids']}/{s['rounds']}"]


def deployment(cfg, catalog, out: Path, rounds: int, nodes: tuple[str, ...] = NODES) -> list[list]:
    """`nodes` train in the same rounds, each on a 1/len(NODES) share of the data (the same share size however
    many run)."""
    variant = max(catalog.variants, key=lambda v: v.params).id
    part = PartitionConfig("iid")
    link = SuperLink(out / "flower").start()
    procs, stop = [], threading.Event()
    try:
        dirs = []
        for i, name in enumerate(nodes):
            device_dir = out / f"dev{i}"
            install_from_catalog(catalog, variant, device_dir)
            dirs.append(device_dir)
            node = NodeData(device_dir, cfg.data, i, len(NODES), part)
            if name.startswith("isolation process"):
                port = free_port()
                sn = ManagedProcess("supernode process", [
                    flower_executable("flower-supernode"), "--insecure", "--superlink", link.address, "--port",
                    str(port), "--isolation", "process", "--node-config", str(write_node_config(node))],
                    device_dir / "supernode.log", env={"FLWR_HOME": str(device_dir / "flwr")}, ports=(port,))
                procs.append(sn)
                sn.start()
                sn.wait_ready(port)
                ex = ManagedProcess("superexec", [flower_executable("flower-superexec"), "--insecure",
                                                  "--runtime-api-address", f"127.0.0.1:{port}"],
                                    device_dir / "superexec.log", env={"FLWR_HOME": str(device_dir / "flwr")})
                procs.insert(0, ex)
                ex.start()
            else:
                procs.append(SuperNode(node, link.address, link.security, hosted=name.startswith("hosted")))
                procs[-1].start()
        for name, device_dir in zip(nodes, dirs):
            if "no cache" in name:
                threading.Thread(target=forget_cache_each_round, args=(device_dir, stop), daemon=True).start()
        config = run_config(cfg, catalog.root, out / "fl", min_nodes=len(nodes), rounds=rounds)
        outcome = flwr_run(link.address, config, out / "flwr-home", out / "flower.log", link.security, 1800)
        if not outcome.ok:
            raise SystemExit(f"the Flower run ended {outcome.status}: see {out / 'flower.log'}")
    finally:
        stop.set()
        for p in procs:
            p.stop()
        link.stop()
    rows = []
    for name, device_dir in zip(nodes, dirs):
        entries = history(device_dir)
        later = [e for e in entries if e["round"] > 1] if "no cache" not in name else entries
        rows.append(row(name, split(later)))
    return rows


def simulation(config_path: str, catalog_root: Path, out: Path, rounds: int) -> list:
    from restnet.cli import main

    if main(["fl", "simulate", "--config", config_path, "--catalog", str(catalog_root), "--devices", str(len(NODES)),
             "--partition", "iid", "--rounds", str(rounds), "--out", str(out), "--quiet"]) != 0:
        raise SystemExit("the simulation failed")
    run_dir = next(out.iterdir())
    entries = [e for d in (run_dir / "variants").iterdir() for e in history(d) if e["round"] > 1]
    return row("simulation actor (long-running), cache", split(entries), long_running=True)


def demo_memory(source: Path, out: Path, python: str) -> TreeMemory:
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.Popen([python, "-m", "restnet.cli", "demo", "--quiet", "--out", str(out), "--http-port", "0",
                             "--broker-port", "0"], cwd=source, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / "demo.log", "a"))
    with TreeMemory(proc.pid) as mem:
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"the demo from {source} failed (exit {code}): see {out.parent / 'demo.log'}")
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "fleet_configs" / "demo.yaml"))
    ap.add_argument("--out", default="out/round-bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--demo-base", default="main", help="git revision whose demo is the memory baseline")
    ap.add_argument("--skip-demo", action="store_true", help="only the round timings")
    args = ap.parse_args()
    cfg = load_config(args.config)
    out = Path(args.out)
    shutil.rmtree(out / "deploy", ignore_errors=True)
    shutil.rmtree(out / "sim", ignore_errors=True)
    ensure_catalog(cfg, out / "catalog", rebuild=False, progress=False)
    catalog = Catalog.load(out / "catalog")
    rows = deployment(cfg, catalog, out / "deploy", args.rounds)
    # The same hosted device alone: without the per-message processes above starting (and importing torch) on
    # the same cores at the moment it pulls its task, as on a device that runs one SuperNode.
    shutil.rmtree(out / "deploy-alone", ignore_errors=True)
    alone = deployment(cfg, catalog, out / "deploy-alone", args.rounds, NODES[-1:])
    rows += [[f"{r[0]}, alone", *r[1:]] for r in alone]
    rows.append(simulation(args.config, out / "catalog", out / "sim", args.rounds))
    print(format_table(["ClientApp", "start (new process / task pull)", "turn", "imports", "load", "front pass",
                        "training", "outside / training", "processes / rounds"], rows))
    print("(rounds after the first for the cached rows; every round for `no cache`. Not counted: the executor's "
          f"polling for a task, up to {POLL_S}s hosted, up to 1s with Flower's superexec)")
    if args.skip_demo:
        return
    mems = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.demo_base], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        # Both demos reuse the catalog built above (the same config digest): neither process tree trains it.
        shutil.copytree(out / "catalog", out / "demo" / "catalog-base", dirs_exist_ok=True)
        for name, source in ((args.demo_base, base), ("this tree", ROOT)):
            mem = demo_memory(source, (out / "demo").resolve(), sys.executable)
            mems.append([name, f"{mem.peak_rss / MIB:,.0f} MiB", f"{mem.peak_pss / MIB:,.0f} MiB",
                         mem.peak_processes])
    print(format_table(["demo", "peak sum of RSS", "peak sum of PSS", "processes at the RSS peak"], mems))


if __name__ == "__main__":
    main()
