"""`restnet demo --pressure`: one device's memory squeezed and released, its ladder doing the work offline.

The demo gives its roomiest device a storage budget for every block of the catalog (so it holds the whole
frontier that fits its memory as a ladder) and points the agents' memory watchers at cgroup-v2 files in the run
folder instead of the machine's own cgroup. Then three steps: roomy (the top rung fits), squeezed (only the
smallest rung fits), released (room again: the device climbs back after the hold time). Each step waits until
the coordinator reports the device on the rung that fits (what the status page's "runs now" column shows, from
the same `/api/devices`) and records how long that took and what the artifact server sent meanwhile: nothing,
the switch is local. Each step is held for a few seconds so an open status page shows it.
"""
from __future__ import annotations

import time
from pathlib import Path

from shared.errors import RestnetError

MIB = 1 << 20
HOLD_S = 3.0  # how long memory must stay free before the device climbs back (the agent's default is 10 s)
POLL_S = 0.2  # how often the agent reads the memory files
SHOW_S = 4.0  # each step stays on screen a little longer than the status page's refresh (3 s)


def prepare(fleet, catalog, cgroup: Path) -> str:
    """Give the roomiest device a ladder (a storage budget for every block) and write the memory files its
    watcher reads (no limit yet: the top rung fits). Returns the device's id."""
    device = max(fleet.devices, key=lambda d: d.memory_mb)
    blobs = {b.sha256: b.size for r in catalog.variants for b in catalog.manifest(r.id).blocks}
    device.storage_mb = round(sum(blobs.values()) / MIB * 1.01 + 0.01, 2)
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "memory.current").write_text("0")
    (cgroup / "memory.max").write_text("max")
    return device.id


def set_limit(cgroup: Path, mib: float) -> None:
    (cgroup / "memory.max.tmp").write_text(str(int(mib * MIB)))
    (cgroup / "memory.max.tmp").replace(cgroup / "memory.max")


def run(coordinator, agent, cgroup: Path, say) -> list[dict]:
    """The three steps; one row each: step, limit, the rung expected and the rung the coordinator shows."""
    rungs = agent.ladder
    if len(rungs) < 2:
        raise RestnetError(f"{agent.device_id} holds {len(rungs)} rung(s): nothing to switch between",
                           "give the pressure device more memory in the config (it gets the catalog's frontier)")
    roomy = rungs[0].memory_mb * 2
    squeezed = (rungs[-1].memory_mb + rungs[-2].memory_mb) / 2  # only the smallest rung fits
    rows = []
    for step, limit in (("roomy", roomy), ("squeezed", squeezed), ("released", roomy)):
        expected = next(r for r in rungs if r.memory_mb <= limit).variant_id
        sent = _sent(coordinator)
        start = time.monotonic()
        set_limit(cgroup, limit)
        if not _wait(lambda: _shown(coordinator, agent.device_id) == expected, HOLD_S + 30):
            raise RestnetError(f"{agent.device_id} did not switch to {expected} under a {limit:.2f} MiB limit")
        rows.append({"step": step, "limit_mb": round(limit, 3), "expected": expected,
                     "shown": _shown(coordinator, agent.device_id), "rung": [r.variant_id for r in rungs].index(expected) + 1,
                     "of": len(rungs), "seconds": round(time.monotonic() - start, 3),
                     "bytes_downloaded": _sent(coordinator) - sent})
        say(f"pressure: {step}, limit {limit:.2f} MiB -> {agent.device_id} runs {expected} "
            f"(rung {rows[-1]['rung']} of {len(rungs)}) after {rows[-1]['seconds']:.2f} s")
        time.sleep(SHOW_S)
    return rows


def table(rows: list[dict], device_id: str) -> str:
    from shared.tables import format_table

    return f"memory pressure on {device_id}:\n" + format_table(
        ["step", "memory limit", "runs now (coordinator)", "rung", "switched after", "bytes downloaded"],
        [[r["step"], f"{r['limit_mb']:.2f}MiB", r["shown"], f"{r['rung']} of {r['of']}", f"{r['seconds']:.2f}s",
          f"{r['bytes_downloaded']:.0f}"] for r in rows])


def _shown(coordinator, device_id: str) -> str | None:
    return next((d["running"] for d in coordinator.devices() if d["id"] == device_id), None)


def _sent(coordinator) -> float:
    return coordinator.metrics.prom.get_sample_value("fleet_artifact_bytes_sent_total") or 0.0


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
