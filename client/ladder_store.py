"""A ladder in the device folder: which rungs the device holds, in order, and which one it runs now.

  ladder.json          [{"variant_id", "variant_version", "manifest_sha256", "memory_mb"}, ...], top rung first
  rungs/<sha256>.json  each rung's manifest bytes, named by their sha256 (checked again on every read)
  running.json         {"variant_id", "manifest_sha256"}: the rung the agent chose for the memory available now

The agent writes them (after every rung verified), the application's `client.runtime.Runtime` and the Flower
ClientApp read them: three processes, so files replaced atomically, never shared memory. A device without a
ladder has none of them and runs `current.json`. Torch-free: the ClientApp's query reads this module and must stay
cheap (torch costs seconds to import).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import IntegrityError

LADDER = "ladder.json"
RUNNING = "running.json"
RUNGS_DIR = "rungs"
CURRENT = "current.json"


@dataclass(frozen=True)
class HeldRung:
    variant_id: str
    variant_version: int
    manifest_sha256: str
    memory_mb: float  # what the coordinator says the rung needs (inference + fine-tuning + margin)


def write_ladder(device_dir: Path, rungs) -> None:
    from shared.artifacts import atomic_write  # here, not at the top: shared.artifacts imports torch

    held = [HeldRung(r.variant_id, r.variant_version, r.manifest_sha256, r.memory_mb) for r in rungs]
    atomic_write(Path(device_dir) / LADDER, json.dumps([asdict(h) for h in held]).encode())


def read_ladder(device_dir: Path) -> list[HeldRung]:
    """The rungs held, top first; [] for a device without a ladder."""
    path = Path(device_dir) / LADDER
    if not path.is_file():
        return []
    return [HeldRung(str(r["variant_id"]), int(r["variant_version"]), str(r["manifest_sha256"]),
                     float(r["memory_mb"])) for r in json.loads(path.read_bytes())]


def drop_ladder(device_dir: Path) -> None:
    """Back to one variant (`current.json`): the ladder's files go, its blobs stay in the store."""
    for name in (RUNNING, LADDER):
        (Path(device_dir) / name).unlink(missing_ok=True)


def rung_manifest_bytes(device_dir: Path, rung: HeldRung) -> bytes:
    data = (Path(device_dir) / RUNGS_DIR / f"{rung.manifest_sha256}.json").read_bytes()
    if hashlib.sha256(data).hexdigest() != rung.manifest_sha256:
        raise IntegrityError(f"the manifest of rung {rung.variant_id} does not match its sha256",
                             "the device folder was altered: enroll again to fetch the ladder")
    return data


def set_running(device_dir: Path, rung: HeldRung) -> None:
    """Replaced atomically (readers never see half of it) but not synced to disk: after a crash the agent chooses
    again from the memory it has then, and a sync would cost a switch several milliseconds."""
    path = Path(device_dir) / RUNNING
    tmp = path.with_name(f".{RUNNING}.tmp")
    tmp.write_text(json.dumps({"variant_id": rung.variant_id, "manifest_sha256": rung.manifest_sha256}))
    os.replace(tmp, path)


def running_manifest_bytes(device_dir: Path) -> bytes | None:
    """The manifest of the variant the device runs now: the running rung of its ladder (the top rung until the
    agent chose one), else `current.json`; None when nothing is installed."""
    device_dir = Path(device_dir)
    rungs = read_ladder(device_dir)
    if rungs:
        running = device_dir / RUNNING
        chosen = json.loads(running.read_bytes()).get("manifest_sha256") if running.is_file() else None
        rung = next((r for r in rungs if r.manifest_sha256 == chosen), rungs[0])
        return rung_manifest_bytes(device_dir, rung)
    path = device_dir / CURRENT
    return path.read_bytes() if path.is_file() else None
