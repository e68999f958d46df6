"""Flower ClientApp: stitch-only fine-tuning of the device's installed variant on its local data.

The node config (written by `client.supernode`) says where the device keeps its installed variant
(`<device-dir>/current.json` + `blobs/`) and which data it owns (`shared.node_data.NodeData`).

- query: answer with the id and version of the variant the device runs now: a ladder's running rung
  (`client.ladder_store`), else the installed variant (cheap: no torch, no model).
- train: load that variant (every block's hash verified), take the server's stitching weights for it,
  train only the stitching layer on the local partition with the frozen front's outputs computed once, and
  return only the change to the stitching weights (in the update format the server asked for, float16 or int8:
  `shared.updates`), the example count and metrics.
  Every training request is appended to `<device-dir>/fl_history.jsonl` (what was received, what was sent back).

Flower starts one ClientApp process per message, so nothing is kept in memory between rounds.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ladder_store import running_manifest_bytes
from shared.node_data import NodeData
from shared.errors import IntegrityError, RestnetError
from shared.vocabulary import FLOAT16, UPDATE_FORMATS

HISTORY = "fl_history.jsonl"


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


def local_update(node: NodeData, req: TrainRequest, arrays: dict, run_id: int = 0) -> tuple[dict, dict]:
    """Train the installed variant's stitching layer from the received `arrays` (numpy, as they arrive);
    returns (the change to send back, in the requested update format; metrics)."""
    # Imported here, not at the top: torch costs seconds and a query never needs it.
    import torch

    from shared.artifacts import BlobStore, Manifest, sha256_bytes, tensors_to_bytes
    from shared.variants import load_variant
    from shared.training import finetune_stitch
    from shared.updates import encode_delta

    state = {k: torch.from_numpy(v) for k, v in arrays.items()}

    manifest = Manifest.from_bytes(running_manifest_bytes(node.device_dir))  # the rung running now
    if manifest.variant_id != req.variant_id:
        raise IntegrityError(f"asked to train {req.variant_id} but {manifest.variant_id} runs now",
                             "the device was re-assigned; the server asks again next round")
    model = load_variant(manifest, BlobStore(node.device_dir / "blobs"))
    model.load_stitch_state(state)  # refuses weights of another shape, dtype, or with NaN/inf
    data = node.load_train_partition()
    seed = 1000 * req.round + node.partition_id  # repeatable per device and round: shuffling, int8 rounding
    stats = finetune_stitch(model, data, req.epochs, req.lr, req.batch_size, seed=seed)
    delta = encode_delta(state, model.stitch_state(), req.update_format, seed=seed)
    metrics = {"num-examples": len(data), "train-loss": float(stats["loss"]), "train-seconds": float(stats["seconds"])}
    entry = {"time": time.time(), "run_id": str(run_id), "round": req.round, "variant_id": manifest.variant_id,
             "installed_version": manifest.version, "server_version": req.version,
             "received_sha256": sha256_bytes(tensors_to_bytes(state)),
             "sent_sha256": sha256_bytes(tensors_to_bytes(delta)), **metrics}
    with open(node.device_dir / HISTORY, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return delta, metrics


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    node = NodeData.from_node_config(context.node_config)
    return Message(RecordDict({"variant": ConfigRecord(installed_variant(node.device_dir))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = NodeData.from_node_config(context.node_config)
    req = TrainRequest.from_record(msg.content.config_records["config"])
    arrays = {k: a.numpy() for k, a in msg.content.array_records["stitch"].items()}
    delta, metrics = local_update(node, req, arrays, context.run_id)
    content = RecordDict({"stitch-delta": ArrayRecord(delta), "metrics": MetricRecord(metrics),
                          "variant": ConfigRecord({"variant-id": req.variant_id,
                                                   "update-format": req.update_format})})
    return Message(content, reply_to=msg)
