"""Enrollment throughput and latency through a real Mosquitto against a real coordinator process.

    python benchmarks/enroll_bench.py [--sizes 1000 5000] [--rate 500] [--seconds 5] [--connections 4]

What runs: Mosquitto with the config `restnet acl` writes (lifted in-flight/queue limits, TCP_NODELAY), the
coordinator as its own process (`python -m restnet.cli coordinator`, SQLite in WAL mode with
synchronous=FULL and group commit: every answer is durable before it is published), and this process as the
devices. Each simulated device is a distinct device id with its own profile and request id; to keep the load
generator light, the devices share a few MQTT connections (a `loadgen` user allowed on every device topic)
instead of one connection each, so broker fan-in of thousands of sockets is not what is measured.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.mqtt import make_client  # noqa: E402
from server.mqtt_acl import password_hash, write_broker_files  # noqa: E402
from shared.artifacts import BlobStore, BlockRef, Manifest, tensors_to_bytes  # noqa: E402
from shared.catalog import Catalog, ModelInfo, VariantRecord  # noqa: E402
from shared.config import BrokerConfig, FleetConfig  # noqa: E402
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="burst sizes (default 1000 5000)")
    ap.add_argument("--rate", type=float, default=500.0, help="offered enrollments/s for the paced run")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the paced run")
    ap.add_argument("--connections", type=int, default=4, help="load-generator MQTT connections")
    args = ap.parse_args()

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = Path(tempfile.mkdtemp(prefix="enroll-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        catalog = build_catalog(work / "catalog")
        mqtt_port, http_port = _free_port(), _free_port()
        fleet = FleetConfig(broker=BrokerConfig(url=f"mqtt://127.0.0.1:{mqtt_port}", username="restnet-coordinator",
                                                password="coordinator-pw"),
                            registry=str(work / "fleet.db"), http_port=http_port, memory_margin=MARGIN)
        paths = write_broker_files(fleet, work / "mosquitto", mqtt_port,
                                   run_as="root" if os.geteuid() == 0 else None)
        loadgen_users = [f"loadgen-{i}" for i in range(args.connections)]  # client id = username on Mosquitto
        with open(paths["passwd"], "a") as fh:
            fh.writelines(f"{user}:{password_hash('loadgen-pw')}\n" for user in loadgen_users)
        with open(paths["acl"], "a") as fh:
            fh.write("\n# benchmark only: the load generator speaks for every device\n")
            fh.writelines(f"user {user}\ntopic write fleet/v1/dev/+/enroll\ntopic read fleet/v1/dev/+/desired\n"
                          for user in loadgen_users)
        log = open(work / "processes.log", "ab")
        procs.append(subprocess.Popen([mosquitto, "-c", str(paths["conf"])], stdout=log, stderr=log,
                                      start_new_session=True))
        config = work / "fleet.yaml"
        config.write_text(yaml.safe_dump({"name": "bench", "large": {"name": "bench-front"},
                                          "small": {"name": "bench-behind"}, "fleet": asdict(fleet)}))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs.append(subprocess.Popen([sys.executable, "-m", "restnet.cli", "coordinator", "--config",
                                       str(config), "--catalog", str(catalog.root)], stdout=log, stderr=log, env=env,
                                      start_new_session=True))
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
        _wait(lambda: _get(metrics_url) is not None, 60, "the coordinator did not come up (see processes.log)")
        gen = LoadGen(fleet.broker.url, "loadgen-pw", args.connections)

        print(f"enroll_bench: Mosquitto on :{mqtt_port}, coordinator process (SQLite WAL, synchronous=FULL, group "
              f"commit), {args.connections} load-generator connections, {os.cpu_count()} CPUs")
        results, violations = {}, 0
        runs = [(f"burst N={n}", n, None) for n in args.sizes]
        runs.append((f"paced {args.rate:g}/s x {args.seconds:g}s", int(args.rate * args.seconds), args.rate))
        for r, (name, n, rate) in enumerate(runs):
            ids = [f"bench{r}-{i:05d}" for i in range(n)]
            profiles = {i: PROFILES[k % len(PROFILES)] for k, i in enumerate(ids)}
            res = gen.run(ids, profiles, rate)
            violations += sum(gen.answers[i] != best(catalog, profiles[i]) for i in ids if i in gen.answers)
            results[name] = res
            print(f"{name:<24} answered {res['answered']}/{res['n']}  {res['rate']:7.0f} enrollments/s  "
                  f"p50 {res['p50']:6.1f} ms  p99 {res['p99']:6.1f} ms", flush=True)
        gen.close()

        text = _get(metrics_url) or ""
        commits = max(1.0, _sample(text, "fleet_commit_batch_messages_count"))
        batches = _sample(text, "fleet_commit_batch_messages_sum") / commits
        print(f"coordinator: mean group-commit batch {batches:.1f} messages; assignments off-budget or not best: "
              f"{violations}")
        burst_rates = [results[f"burst N={n}"]["rate"] for n in args.sizes]
        paced = results[runs[-1][0]]
        ok_rate = min(burst_rates) >= 1000
        ok_p99 = paced["p99"] < 250 and paced["answered"] == paced["n"]
        print(f"target >= 1000 enrollments/s sustained: {'PASS' if ok_rate else 'FAIL'} "
              f"(min over bursts {min(burst_rates):.0f}/s)")
        print(f"target p99 < 250 ms at {args.rate:g}/s offered: {'PASS' if ok_p99 else 'FAIL'} ({paced['p99']:.1f} ms)")
        return 0 if ok_rate and ok_p99 and violations == 0 else 1
    except BaseException:  # show why the broker or coordinator failed
        if (work / "processes.log").is_file():
            print((work / "processes.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


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
