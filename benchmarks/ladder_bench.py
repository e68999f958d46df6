"""Ladders: a local rung switch against the re-enroll + download path for the same change, and the storage a
ladder of k rungs takes against k variants stored separately, side by side in one run.

    python benchmarks/ladder_bench.py --catalog DIR [--reps 5] [--out FILE.json]

`--catalog`: a built catalog folder (the demo's is `<demo out>/catalog-base`, built offline by `restnet demo`);
it is copied, never changed. What runs: one coordinator (embedded rumqttd, SQLite registry, HTTP artifacts) on
the copy, and two devices of the same memory:
- ladder: a DeviceAgent with a storage budget for every frontier variant, its memory limit in cgroup-v2 files
  this script writes, and the application's `client.runtime.Runtime`. Timed from the moment the device knows its
  memory changed, as for the re-enroll path below: one reading of the limit and the agent's decision
  (`check_memory`: read the files, choose, write running.json, publish SWITCHED) plus the runtime assembling the
  rung from blocks it holds (`follow`). Also timed, with a second ladder device whose watcher polls every 50 ms:
  from the limit file written to the runtime's model ready, so the polling delay included (what
  tests/test_ladder.py bounds). Back up: the same with a hold time of 0 (the hold is policy, not cost).
- re-enroll: a DeviceAgent without a storage budget holding the top variant only (a fresh device folder each
  repetition, as a device that never held the smaller variant). Timed: from its new, smaller profile handed to
  the agent to the smaller variant installed and loaded as a model (`load_variant`): enrollment over MQTT, the
  coordinator's commit and answer, the manifest and missing blocks over HTTP, verification, loading. (How soon
  the device notices is left out here as above: `restnet device --measure` re-measures every 60 s by default.)
Bytes over the network: the coordinator's `fleet_artifact_bytes_sent_total` around each switch (MQTT control
messages are not counted: a few hundred bytes either way).
Storage: for k = 1 .. the frontier's length, the top k variants of the frontier (the largest first, as a ladder
holds them) as one ladder (each blob once) against the same k variants stored separately (sum of their bytes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.agent import DeviceAgent  # noqa: E402
from client.fleet_sim import settled  # noqa: E402
from client.memory import MemorySource  # noqa: E402
from client.runtime import Runtime  # noqa: E402
from server.assignment import Assigner  # noqa: E402
from server.coordinator import Coordinator  # noqa: E402
from server.ladder import frontier  # noqa: E402
from shared.artifacts import BlobStore, Manifest  # noqa: E402
from shared.catalog import Catalog  # noqa: E402
from shared.config import BrokerConfig, FleetConfig  # noqa: E402
from shared.messages import Profile  # noqa: E402
from shared.variants import load_variant  # noqa: E402

MIB = 1 << 20
MARGIN = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_table(catalog: Catalog) -> list[dict]:
    assigner = Assigner(catalog.variants, MARGIN)
    everything = Profile(1e9, 1e6, None, agent_version="bench")
    rungs = list(reversed(frontier(assigner, everything, below=float("inf"))))  # largest first
    rows = []
    for k in range(1, len(rungs) + 1):
        manifests = [catalog.manifest(r.id) for r in rungs[:k]]
        union = {b.sha256: b.size for m in manifests for b in m.blocks}
        separate = sum(m.total_bytes for m in manifests)
        rows.append({"k": k, "rungs": [r.id for r in rungs[:k]], "ladder_bytes": sum(union.values()),
                     "separate_bytes": separate, "ratio": sum(union.values()) / separate})
    return rows


def write_limit(cgroup: Path, mib: float) -> float:
    (cgroup / "memory.max.tmp").write_text(str(int(mib * MIB)))
    (cgroup / "memory.max.tmp").replace(cgroup / "memory.max")
    return time.perf_counter()


def sent_bytes(coordinator) -> float:
    return coordinator.metrics.prom.get_sample_value("fleet_artifact_bytes_sent_total") or 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True, help="a built catalog folder (copied, not changed)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    shutil.copytree(args.catalog, work / "catalog")
    catalog = Catalog.load(work / "catalog")
    storage = storage_table(catalog)

    assigner = Assigner(catalog.variants, MARGIN)
    ladder_ids = storage[-1]["rungs"]
    top, small = ladder_ids[0], ladder_ids[-1]
    need = {r.id: assigner.needs[r.id].memory_mb for r in catalog.variants}
    big_mib, small_mib = need[top] * 1.05, need[small] * 1.05  # only `small` fits the squeezed limit
    assert all(need[v] > small_mib for v in ladder_ids[:-1]), "the squeezed limit must leave only the smallest rung"
    fleet = FleetConfig(broker=BrokerConfig(url=f"embedded://127.0.0.1:{free_port()}"), registry=str(work / "fleet.db"),
                        http_port=0, memory_margin=MARGIN, heartbeat_s=5.0, catalog=str(work / "catalog"),
                        device_root=str(work / "devices"))
    coordinator = Coordinator(fleet, catalog).start()
    agents: list[DeviceAgent] = []
    try:
        cgroup, polled_cgroup = work / "cgroup", work / "cgroup-polled"
        for folder in (cgroup, polled_cgroup):
            folder.mkdir()
            (folder / "memory.current").write_text("0")
            write_limit(folder, big_mib * 10)
        storage_mb = storage[-1]["ladder_bytes"] / MIB * 1.01
        profile = Profile(big_mib, 1e6, None, agent_version="bench", storage_mb=storage_mb)
        direct = DeviceAgent("bench-ladder", fleet.broker, None, profile, work / "devices" / "bench-ladder",
                             memory=MemorySource(cgroup), memory_poll_s=3600, hold_s=0.0).start()  # read on demand
        polled = DeviceAgent("bench-ladder-polled", fleet.broker, None, profile,
                             work / "devices" / "bench-ladder-polled", memory=MemorySource(polled_cgroup),
                             memory_poll_s=0.05, hold_s=0.0).start()
        agents += [direct, polled]
        assert direct.wait(lambda a: settled(a), 60) and direct.check_memory() == top, "the ladder did not install"
        assert polled.wait(lambda a: settled(a) and a.running == top, 60), "the ladder did not install"
        runtimes = {direct: Runtime(direct.device_dir), polled: Runtime(polled.device_dir)}
        local = {"down_s": [], "up_s": [], "bytes": []}
        local_polled = {"down_s": [], "up_s": [], "bytes": []}
        for _ in range(args.reps):
            for target, mib, key in ((small, small_mib, "down_s"), (top, big_mib * 10, "up_s")):
                before = sent_bytes(coordinator)
                start = write_limit(cgroup, mib)
                rt = runtimes[direct]
                assert direct.check_memory() == target, f"no switch to {target}"
                rt.follow()
                local[key].append(time.perf_counter() - start)
                assert rt.rung == target
                local["bytes"].append(sent_bytes(coordinator) - before)
                before = sent_bytes(coordinator)
                start = write_limit(polled_cgroup, mib)
                assert polled.wait(lambda a: a.running == target, 10), f"no switch to {target}"
                runtimes[polled].follow()
                local_polled[key].append(time.perf_counter() - start)
                local_polled["bytes"].append(sent_bytes(coordinator) - before)

        remote = {"down_s": [], "bytes": []}
        for rep in range(args.reps):
            dev = DeviceAgent(f"bench-reenroll-{rep}", fleet.broker, None,
                              Profile(big_mib, 1e6, None, agent_version="bench"),
                              work / "devices" / f"bench-reenroll-{rep}").start()
            agents.append(dev)
            assert dev.wait(lambda a: settled(a) and a.installed.variant_id == top, 60), "top did not install"
            before = sent_bytes(coordinator)
            start = time.perf_counter()
            dev.update_profile(Profile(small_mib, 1e6, None, agent_version="bench"))
            assert dev.wait(lambda a: settled(a) and a.installed.variant_id == small, 60), "no re-assignment"
            load_variant(Manifest.from_bytes((dev.device_dir / "current.json").read_bytes()),
                         BlobStore(dev.device_dir / "blobs"))
            remote["down_s"].append(time.perf_counter() - start)
            remote["bytes"].append(sent_bytes(coordinator) - before)
    finally:
        for agent in agents:
            agent.stop()
        coordinator.stop()

    med = statistics.median
    result = {"catalog": args.catalog, "top": top, "small": small, "reps": args.reps, "storage": storage,
              "local": local, "local_polled": local_polled, "reenroll": remote,
              "speedup_down": med(remote["down_s"]) / med(local["down_s"])}
    print(f"catalog {args.catalog}: ladder {' > '.join(ladder_ids)}\n")
    print("| switch top -> smallest rung | median | min | max | bytes over the network (median) |")
    print("|---|---|---|---|---|")
    for name, d in (("local rung switch (ladder)", local), ("same, noticed by the agent's 50 ms poll", local_polled),
                    ("re-enroll + download", remote)):
        s = d["down_s"]
        print(f"| {name} | {med(s) * 1e3:.1f} ms | {min(s) * 1e3:.1f} ms | {max(s) * 1e3:.1f} ms | "
              f"{med(d['bytes']):,.0f} |")
    print(f"| local switch back up (hold 0) | {med(local['up_s']) * 1e3:.1f} ms | {min(local['up_s']) * 1e3:.1f} ms | "
          f"{max(local['up_s']) * 1e3:.1f} ms | {med(local['bytes']):,.0f} |")
    print(f"\nre-enroll / local: {result['speedup_down']:.0f}x\n")
    print("| k | rungs | ladder | k variants stored separately | ratio |")
    print("|---|---|---|---|---|")
    for row in storage:
        print(f"| {row['k']} | {', '.join(row['rungs'])} | {row['ladder_bytes'] / 1024:.1f} KiB | "
              f"{row['separate_bytes'] / 1024:.1f} KiB | {row['ratio']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
