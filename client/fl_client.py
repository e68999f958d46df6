"""Flower ClientApp: stitch-only fine-tuning of the device's installed variant on its local data.

The node config (written by `client.supernode`) says where the device keeps its installed variant
(`<device-dir>/current.json` + `blobs/`) and which data it owns (`shared.node_data.NodeData`).

- query: answer with the id and version of the variant the device runs now: a ladder's running rung
  (`client.ladder_store`), else the installed variant (cheap: no torch, no model).
- train: load that variant (every block's hash verified), take the server's stitching weights for it,
  train only the stitching layer on the frozen front's outputs for the local partition, and return only the
  change to the stitching weights (in the update format the server asked for, float16 or int8:
  `shared.updates`), the example count and metrics.
  The front's outputs are kept in `<device-dir>/front-cache/` (`shared.front_cache`: keyed by the front blocks'
  sha256s and the partition, verified on reuse), so only a device's first round runs the front.
  Every training request is appended to `<device-dir>/fl_history.jsonl` (what was received, what was sent back,
  whether the front ran, and where the time went).

Our SuperNodes run this app inside the device's agent process (`client.clientapp_host`), which serves message
after message: torch is imported once and the loaded variants stay in memory (`_loaded_variant`, keyed by the
manifest's sha256), as in the simulation engine's actors. Under Flower's own executor the same app runs in a new
process per message and pays for all of it every time (`benchmarks/round_bench.py`).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.clientapp_host import task_acquired_at
from client.ladder_store import running_manifest_bytes
from shared.node_data import NodeData
from shared.errors import IntegrityError, RestnetError
from shared.vocabulary import FLOAT16, UPDATE_FORMATS

HISTORY = "fl_history.jsonl"
_PROCESS_STARTED = psutil.Process().create_time()


def installed_variant(device_dir: Path) -> dict:
    """{"variant-id", "version"} of the variant the device runs now: its ladder's running rung, else the installed
    variant (read without loading any weights)."""
    data = running_manifest_bytes(device_dir)
    if data is None:
        raise IntegrityError(f"no variant is installed in {device_dir}", "enroll the device first")
    manifest = json.loads(data)
    return {"variant-id": str(manifest["variant_id"]), "version": int(manifest["version"])}


@dataclass
class TrainRequest:
    variant_id: str
    version: int
    round: int
    epochs: int
    lr: float
    batch_size: int
    update_format: str = FLOAT16

    @classmethod
    def from_record(cls, cfg) -> "TrainRequest":
        """Refuses a request for an update format this device cannot produce (a server of another release).
        A request without one comes from the release before formats were named, which wanted float16."""
        wanted = str(cfg.get("update-format", FLOAT16))
        if wanted not in UPDATE_FORMATS.values():
            raise RestnetError(f"the server asks for updates in format {wanted}; this device sends "
                               f"{', '.join(UPDATE_FORMATS.values())}",
                               "run the same restnet-fleet release on the server and the devices")
        return cls(str(cfg["variant-id"]), int(cfg["version"]), int(cfg["round"]), int(cfg["local-epochs"]),
                   float(cfg["learning-rate"]), int(cfg["batch-size"]), wanted)


_LOADED: dict[tuple[str, str], object] = {}  # (device dir, manifest sha256) -> the verified model
# One training at a time in a process, whichever device it is for: building a variant traces it with torch.fx,
# which patches `torch.nn.Module.__call__` process-wide while it runs, so another thread's forward pass at that
# moment fails ("module is not installed as a submodule"). A host's devices then take turns, a few tenths of a
# second each for the stitch-only rounds, and the process holds one training's tensors at a time.
_TRAINING = threading.Lock()
_LOADED_MAX = 16  # a host may serve several devices (the demo: six), each with a ladder of rungs


def _loaded_variant(device_dir: Path, manifest):
    """The installed variant as a model, loaded (and verified) once per process: blobs are immutable and named by
    their hash, and a new version has a new manifest sha256, hence a new entry."""
    from shared.artifacts import BlobStore
    from shared.variants import load_variant

    key = (str(device_dir), manifest.sha256)
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load_variant(manifest, BlobStore(device_dir / "blobs"))
    return _LOADED[key]


def local_update(node: NodeData, req: TrainRequest, arrays: dict, run_id: int = 0,
                 received_at: float | None = None) -> tuple[dict, dict]:
    """Train the installed variant's stitching layer from the received `arrays` (numpy, as they arrive);
    returns (the change to send back, in the requested update format; metrics)."""
    received_at = received_at or time.time()
    with _TRAINING:
        return _local_update(node, req, arrays, run_id, received_at)


def _local_update(node: NodeData, req: TrainRequest, arrays: dict, run_id: int, received_at: float):
    turn_at = time.time()
    # Imported here, not at the top: torch costs seconds in a fresh process and a query never needs it.
    import torch

    from shared.artifacts import Manifest, sha256_bytes, tensors_to_bytes
    from shared.front_cache import CACHE_DIR, FrontCache, front_key
    from shared.training import cache_front_outputs, train_stitch_on_front
    from shared.updates import encode_delta
    import shared.variants  # noqa: F401 - timm and torchvision: the rest of the heavy imports, timed with them

    imported_at = time.time()
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}

    manifest = Manifest.from_bytes(running_manifest_bytes(node.device_dir))  # the rung running now
    if manifest.variant_id != req.variant_id:
        raise IntegrityError(f"asked to train {req.variant_id} but {manifest.variant_id} runs now",
                             "the device was re-assigned; the server asks again next round")
    model = _loaded_variant(node.device_dir, manifest)
    model.load_stitch_state(state)  # refuses weights of another shape, dtype, or with NaN/inf
    loaded_at = time.time()
    key = front_key(manifest, node.train_partition_description())
    front, cached = FrontCache(node.device_dir / CACHE_DIR).get_or_compute(
        key, lambda: cache_front_outputs(model, node.load_train_partition()))
    front_at = time.time()
    seed = 1000 * req.round + node.partition_id  # repeatable per device and round: shuffling, int8 rounding
    stats = train_stitch_on_front(model, front, req.epochs, req.lr, req.batch_size, seed=seed)
    delta = encode_delta(state, model.stitch_state(), req.update_format, seed=seed)
    metrics = {"num-examples": len(front), "train-loss": float(stats["loss"]), "train-seconds": float(stats["seconds"])}
    entry = {"time": time.time(), "run_id": str(run_id), "round": req.round, "variant_id": manifest.variant_id,
             "partition_id": node.partition_id, "installed_version": manifest.version, "server_version": req.version,
             "received_sha256": sha256_bytes(tensors_to_bytes(state)),
             "sent_sha256": sha256_bytes(tensors_to_bytes(delta)), "front_key": key, "front_cached": cached,
             # where the time went: the message's handling started (task acquired by the agent's host, else this
             # process created), message received, its turn to train (`_TRAINING`), torch & co imported, variant
             # loaded, front outputs ready (computed or read), then training
             "pid": os.getpid(), "hosted": task_acquired_at() is not None,
             "started_at": task_acquired_at() or _PROCESS_STARTED, "received_at": received_at, "turn_at": turn_at,
             "imported_at": imported_at, "loaded_at": loaded_at, "front_at": front_at, **metrics}
    with open(node.device_dir / HISTORY, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return delta, metrics


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    node = NodeData.from_context(context.node_config, context.run_config)
    return Message(RecordDict({"variant": ConfigRecord(installed_variant(node.device_dir))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    received_at = time.time()
    node = NodeData.from_context(context.node_config, context.run_config)
    req = TrainRequest.from_record(msg.content.config_records["config"])
    arrays = {k: a.numpy() for k, a in msg.content.array_records["stitch"].items()}
    delta, metrics = local_update(node, req, arrays, context.run_id, received_at)
    content = RecordDict({"stitch-delta": ArrayRecord(delta), "metrics": MetricRecord(metrics),
                          "variant": ConfigRecord({"variant-id": req.variant_id,
                                                   "update-format": req.update_format})})
    return Message(content, reply_to=msg)
