"""Enrollment throughput and latency through a real Mosquitto against real coordinator processes: the SQLite
single coordinator, 1..N coordinators sharing a PostgreSQL registry, and the broker's echo ceiling, in one run.

    python benchmarks/enroll_bench.py [--coordinators 1 2 3] [--registry postgresql://USER:PW@HOST:PORT/DB]
                                      [--sizes 1000 5000] [--rate 500] [--seconds 5] [--connections 4]

What runs: Mosquitto with the config `restnet acl` writes (lifted in-flight/queue limits, TCP_NODELAY), and one
after the other: (1) the echo ceiling: a trivial paho responder process that answers each enrollment with a
canned desired state (no registry, no assignment): what this machine's broker and load generator allow; (2) the
baseline: one coordinator process (`python -m restnet.cli coordinator`) on SQLite (WAL, synchronous=FULL, group
commit: every answer is durable before it is published); (3) N coordinator processes sharing one PostgreSQL
registry through MQTT 5 shared subscriptions, for each N of --coordinators (a new database each time). Without
--registry the script starts a throwaway PostgreSQL with its durable defaults (fsync on; Debian's package, run as
the `postgres` user when root) and creates one database per N; with --registry, N's database is that URL's with
`_nN` appended (created on the same server). The load generator is this process: each simulated device is a
distinct device id with its own profile and request id; to keep the load generator light, the devices share a few
MQTT connections (a `loadgen` user allowed on every device topic) instead of one connection each, so broker fan-in
of thousands of sockets is not what is measured.
Latency is from a device's enroll publish to its desired state arriving (answers are matched by request id).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # postgres_server: the test suite's throwaway PostgreSQL

from shared.mqtt import make_client  # noqa: E402
from server.mqtt_acl import password_hash, write_broker_files  # noqa: E402
from shared.artifacts import BlobStore, BlockRef, Manifest, tensors_to_bytes  # noqa: E402
from shared.catalog import Catalog, ModelInfo, VariantRecord  # noqa: E402
from shared.config import BrokerConfig, ClusterConfig, FleetConfig  # noqa: E402
from shared.messages import Enroll, Profile, decode_desired, encode, topic  # noqa: E402

MIB = 1 << 20
MARGIN = 0.2
# (id, memory MiB, fine-tune MiB, latency ms, accuracy)
VARIANTS = [("bench.small", 8, 4, 2.0, 0.70), ("bench.mid", 24, 8, 5.0, 0.80), ("bench.large", 64, 16, 12.0, 0.90)]
PROFILES = [Profile(20, 1.0, None, agent_version="bench"), Profile(50, 0.5, 20.0, agent_version="bench"), Profile(200, 2.0, 10.0, agent_version="bench"),
            Profile(10, 1.0, None, agent_version="bench")]  # the last fits nothing: refusals are answers too


def build_catalog(root: Path) -> Catalog:
    """Three variants of random-tensor blocks (delivery is not benchmarked here, only enrollment)."""
    info = ModelInfo("bench-front", {}, "synthetic", ["b0", "b1"], 1000, 10**6)
    catalog = Catalog(info, replace(info, name="bench-behind"), "slow_to_fast", "params", [1, 8, 8], 4, "none", [],
                      root=root)
    store = BlobStore(root / "blobs")
    for n, (vid, mem, ft, latency, acc) in enumerate(VARIANTS):
        blocks = []
        for role, index in (("front", 0), ("stitch", 1), ("behind", 2)):
            data = tensors_to_bytes({"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(n * 3 + index))})
            blocks.append(BlockRef(role, index, store.put(data), len(data)))
        rec = VariantRecord(vid, "bench-front", "bench-behind", 1, 2, "slow_to_fast", acc, "synthetic", 1000 * (n + 1),
                            int(latency * 1e7), mem * MIB, ft * MIB, 256, latency, accuracy=acc)
        catalog.add_manifest(rec, Manifest(vid, 1, {}, blocks, rec.to_dict()))
        catalog.variants.append(rec)
    catalog.save(root)
    return catalog


def fits(rec: VariantRecord, p: Profile) -> bool:
    memory = (rec.memory_bytes + rec.finetune_memory_bytes) * (1 + MARGIN) <= p.memory_mb * MIB
    return memory and (p.latency_ms is None or rec.latency_ms / p.compute <= p.latency_ms)


def best(catalog: Catalog, p: Profile) -> str | None:
    ok = [r for r in catalog.variants if fits(r, p)]
    return max(ok, key=lambda r: r.expected_accuracy).id if ok else None


class LoadGen:
    """The simulated devices: publish enrollments, time the answers (connection i logs in as loadgen-i)."""

    def __init__(self, url: str, password: str, connections: int):
        self.clients = []
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.answers: dict[str, str | None] = {}
        self.expected_request: dict[str, str] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.want = 0
        self.subacks: set[int] = set()
        for i in range(connections):
            client, address = make_client(BrokerConfig(url=url), f"loadgen-{i}", f"loadgen-{i}", password, True)
            client.on_message = self._on_message
            client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.add(mid)
            client.connect(address.host, address.port, keepalive=60)
            client.loop_start()
            self.clients.append(client)

    def _on_message(self, client, userdata, msg):
        now = time.perf_counter()
        device_id = msg.topic.split("/")[3]
        desired = decode_desired(device_id, msg.payload)
        with self.lock:
            if desired.request_id == self.expected_request.get(device_id) and device_id not in self.answered:
                self.answered[device_id] = now
                self.answers[device_id] = desired.assignment.variant_id if desired.assignment else None
                if len(self.answered) >= self.want:
                    self.done.set()

    def subscribe(self, ids: list[str]) -> None:
        """Each connection subscribes to its share of the devices' desired topics; wait for every SUBACK."""
        pending = []
        for k, client in enumerate(self.clients):
            mine = ids[k::len(self.clients)]
            for start in range(0, len(mine), 200):
                pending.append(client.subscribe([(topic(i, "desired"), 1) for i in mine[start:start + 200]])[1])
        _wait(lambda: self.subacks.issuperset(pending), 30, "the broker did not acknowledge the subscriptions")

    def run(self, ids: list[str], profiles: dict[str, Profile], rate: float | None, timeout: float = 120.0) -> dict:
        self.subscribe(ids)
        with self.lock:
            self.want = len(self.answered) + len(ids)
            self.done.clear()
            for i in ids:
                self.expected_request[i] = f"req-{i}"
        start = time.perf_counter()
        for n, device_id in enumerate(ids):
            if rate:
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            payload = encode(Enroll(device_id, f"req-{device_id}", profiles[device_id]))
            self.sent[device_id] = time.perf_counter()
            self.clients[n % len(self.clients)].publish(topic(device_id, "enroll"), payload, qos=1)
        self.done.wait(timeout)
        latencies = sorted((self.answered[i] - self.sent[i]) * 1000 for i in ids if i in self.answered)
        end = max((self.answered[i] for i in ids if i in self.answered), default=time.perf_counter())
        return {"n": len(ids), "answered": len(latencies), "seconds": end - start,
                "rate": len(latencies) / (end - start), "p50": _pct(latencies, 50), "p99": _pct(latencies, 99)}

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def echo_responder(url: str, password: str) -> None:
    """The ceiling: answer every enrollment with a canned desired state, nothing else (a separate process)."""
    import json

    client, address = make_client(BrokerConfig(url=url), "echo", "echo", password, True)
    template = {"v": 1, "version": 1, "assignment_id": "0123456789abcdef", "assignment": None,
                "refusal": {"message": "echo", "smallest": {"variant_id": "bench.small", "memory_mb": 1.0,
                                                            "compute": None}}}

    def on_message(c, userdata, msg):
        device_id = msg.topic.split("/")[3]
        reply = {**template, "device_id": device_id, "request_id": json.loads(msg.payload)["request_id"]}
        c.publish(topic(device_id, "desired"), json.dumps(reply).encode(), qos=1, retain=True)

    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("fleet/v1/dev/+/enroll", qos=1)
    client.connect(address.host, address.port, keepalive=60)
    client.loop_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coordinators", type=int, nargs="+", default=[1, 2, 3],
                    help="numbers of coordinators on PostgreSQL to measure (default 1 2 3)")
    ap.add_argument("--registry", help="a PostgreSQL URL (default: start a throwaway PostgreSQL)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="burst sizes (default 1000 5000)")
    ap.add_argument("--rate", type=float, default=500.0, help="offered enrollments/s for the paced run")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the paced run")
    ap.add_argument("--connections", type=int, default=4, help="load-generator MQTT connections")
    ap.add_argument("--echo-responder", nargs=2, metavar=("URL", "PASSWORD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_responder:
        echo_responder(*args.echo_responder)
        return 0

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = Path(tempfile.mkdtemp(prefix="enroll-bench-"))
    procs: list[subprocess.Popen] = []
    postgres = None
    try:
        if args.registry is None:
            from postgres_server import PostgresServer

            postgres = PostgresServer(fsync=True).start()
        catalog = build_catalog(work / "catalog")
        mqtt_port = _free_port()
        most = max(args.coordinators)
        fleet = FleetConfig(broker=BrokerConfig(url=f"mqtt://127.0.0.1:{mqtt_port}", username="restnet-coordinator",
                                                password="coordinator-pw"),
                            registry=str(work / "fleet.db"), memory_margin=MARGIN,
                            cluster=ClusterConfig(coordinators=most))
        paths = write_broker_files(fleet, work / "mosquitto", mqtt_port,
                                   run_as="root" if os.geteuid() == 0 else None)
        extra_users = [f"loadgen-{i}" for i in range(args.connections)] + ["echo"]  # client id = username
        with open(paths["passwd"], "a") as fh:
            fh.writelines(f"{user}:{password_hash('loadgen-pw')}\n" for user in extra_users)
        with open(paths["acl"], "a") as fh:
            fh.write("\n# benchmark only: the load generator speaks for every device, the echo answers them\n")
            fh.writelines(f"user {user}\ntopic write fleet/v1/dev/+/enroll\ntopic read fleet/v1/dev/+/desired\n"
                          for user in extra_users[:-1])
            fh.write("user echo\ntopic read fleet/v1/dev/+/enroll\ntopic write fleet/v1/dev/+/desired\n")
        log = open(work / "processes.log", "ab")
        procs.append(subprocess.Popen([mosquitto, "-c", str(paths["conf"])], stdout=log, stderr=log,
                                      start_new_session=True))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        setups = [("echo ceiling", None, 0), ("SQLite, 1 coordinator", str(work / "fleet.db"), 1)]
        for n in args.coordinators:
            if postgres is not None:
                url = postgres.create_database(f"bench_n{n}")
            else:
                url = _database_beside(args.registry, f"n{n}")
            setups.append((f"PostgreSQL, {n} coordinator{'s' if n > 1 else ''}", url, n))
        runs = [(f"burst {n}", n, None) for n in args.sizes]
        runs.append((f"paced {args.rate:g}/s", int(args.rate * args.seconds), args.rate))
        print(f"enroll_bench: Mosquitto on :{mqtt_port}, {args.connections} load-generator connections, "
              f"{os.cpu_count()} CPUs; coordinators durable before publishing (SQLite synchronous=FULL, "
              f"PostgreSQL fsync on), group commit", flush=True)
        table, violations = [], 0
        for s_index, (name, registry, n) in enumerate(setups):
            started = _start_setup(work, fleet, registry, n, catalog, log, env)
            procs.extend(started)
            gen = LoadGen(fleet.broker.url, "loadgen-pw", args.connections)
            _warm_up(gen, f"warm{s_index}")
            row = {"setup": name}
            for r, (run, size, rate) in enumerate(runs):
                ids = [f"bench{s_index}-{r}-{i:05d}" for i in range(size)]
                profiles = {i: PROFILES[k % len(PROFILES)] for k, i in enumerate(ids)}
                res = gen.run(ids, profiles, rate)
                if registry is not None:
                    violations += sum(gen.answers[i] != best(catalog, profiles[i]) for i in ids if i in gen.answers)
                row[run] = res
                print(f"  {name:<28} {run:<14} answered {res['answered']}/{res['n']}  {res['rate']:7.0f}/s  "
                      f"p50 {res['p50']:6.1f} ms  p99 {res['p99']:6.1f} ms", flush=True)
            gen.close()
            for proc in started:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
                procs.remove(proc)
            table.append(row)
        return _report(table, runs, args, violations)
    except BaseException:  # show why the broker or a coordinator failed
        if (work / "processes.log").is_file():
            print((work / "processes.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


def _start_setup(work: Path, fleet: FleetConfig, registry: str | None, n: int, catalog: Catalog, log,
                 env: dict) -> list[subprocess.Popen]:
    """The echo responder (registry None), or n coordinator processes on `registry`; returns once all serve."""
    if registry is None:
        proc = subprocess.Popen([sys.executable, __file__, "--echo-responder", fleet.broker.url, "loadgen-pw"],
                                stdout=log, stderr=log, env=env, start_new_session=True)
        return [proc]
    procs = []
    for k in range(1, n + 1):
        cfg = replace(fleet, registry=registry, http_port=_free_port(), cluster=replace(fleet.cluster, coordinators=n))
        config = work / f"fleet-{n}-{k}.yaml"
        config.write_text(yaml.safe_dump({"name": "bench", "large": {"name": "bench-front"},
                                          "small": {"name": "bench-behind"}, "fleet": asdict(cfg)}))
        procs.append(subprocess.Popen([sys.executable, "-m", "restnet.cli", "coordinator", "--config", str(config),
                                       "--catalog", str(catalog.root), "--instance", str(k)], stdout=log, stderr=log,
                                      env=env, start_new_session=True))
        url = f"http://127.0.0.1:{cfg.http_port}/metrics"
        _wait(lambda: _get(url) is not None, 60, "a coordinator did not come up (see processes.log)")
    return procs


def _warm_up(gen: LoadGen, prefix: str) -> None:
    """Small rounds until one is fully answered: everything is subscribed, connected and warm."""
    for attempt in range(60):
        ids = [f"{prefix}-{attempt}-{i}" for i in range(50)]
        if gen.run(ids, {i: PROFILES[0] for i in ids}, None, timeout=2.0)["answered"] == len(ids):
            return
    raise SystemExit("the responder never answered (see processes.log)")


def _database_beside(url: str, suffix: str) -> str:
    """`url`'s server, database `<its name>_<suffix>` (created when missing)."""
    import psycopg
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    name = f"{parts.path.lstrip('/')}_{suffix}"
    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return parts._replace(path=f"/{name}").geturl()


def _report(table: list[dict], runs: list, args, violations: int) -> int:
    """The side-by-side table (markdown, as benchmarks/README.md shows it) and the targets."""
    big = f"burst {max(args.sizes)}"
    paced = runs[-1][0]
    base = next(r for r in table if r["setup"].startswith("SQLite"))[big]["rate"]
    echo = table[0][big]["rate"]
    print(f"\n| setup | {' | '.join(f'{run} /s' for run, _, _ in runs[:-1])} | p99 {big} | p99 {paced} | "
          f"vs SQLite | vs echo |")
    print("|---" * (len(runs) + 4) + "|")
    for row in table:
        rates = " | ".join(f"{row[run]['rate']:.0f}" for run, _, _ in runs[:-1])
        print(f"| {row['setup']} | {rates} | {row[big]['p99']:.0f} ms | {row[paced]['p99']:.0f} ms | "
              f"{row[big]['rate'] / base:.2f}x | {row[big]['rate'] / echo:.2f}x |")
    sqlite = next(r for r in table if r["setup"].startswith("SQLite"))
    ok_rate = min(sqlite[f"burst {n}"]["rate"] for n in args.sizes) >= 1000
    ok_p99 = all(r[paced]["p99"] < 250 and r[paced]["answered"] == r[paced]["n"] for r in table[1:])
    two = next((r for r in table if r["setup"] == "PostgreSQL, 2 coordinators"), None)
    ok_two = two is None or two[big]["rate"] >= 0.8 * base
    print(f"\nassignments off-budget or not best: {violations}")
    print(f"target SQLite >= 1000 enrollments/s in bursts: {'PASS' if ok_rate else 'FAIL'}")
    print(f"target p99 < 250 ms at {args.rate:g}/s offered, every setup: {'PASS' if ok_p99 else 'FAIL'}")
    if two is not None:
        print(f"target PostgreSQL with 2 coordinators >= 0.8x SQLite ({big}): {'PASS' if ok_two else 'FAIL'} "
              f"({two[big]['rate'] / base:.2f}x)")
    return 0 if ok_rate and ok_p99 and ok_two and violations == 0 else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _wait(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(message)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
