"""Flower ServerApp: per-variant federated fine-tuning of stitching layers.

Each round: ask new nodes which variant they run (a query message), send every node the current stitching
weights of ITS OWN variant (only the stitch tensors travel; nodes answer with their float16 change to them), wait
for replies up to the round timeout (a node that is gone or late is simply left out of this round), validate
and aggregate the replies group by group (`server.aggregation`), and evaluate each variant on the held-out
validation split. Nodes are re-discovered every round, so a node that comes back (with a new node id) takes part
again.

Results go to the coordinator's HTTP API when `coordinator-url` is set (round reports, then each variant's new
stitching weights) and to `output-dir` when that is set: `events.jsonl` (progress), `results.json`, and
`<variant_id>.safetensors` per improved variant (its best aggregate, never one below the delivered accuracy).
"""
from __future__ import annotations

import json
import ssl
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.aggregation import Update, aggregate_variant
from server.run_config import RunSettings
from shared.artifacts import atomic_write, bytes_to_tensors, sha256_bytes, tensors_to_bytes
from shared.variants import load_variant
from shared.catalog import Catalog
from shared.errors import RestnetError
from shared.vocabulary import FLOAT16

# Errors that mean "no answer from the node" (gone, or too late), as opposed to a node that answered with a failure.
_UNAVAILABLE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


@dataclass
class VariantState:
    """What the server holds for one variant during a run: its model (for evaluation) and current stitch."""

    variant_id: str
    base_version: int  # the catalog version the run started from
    model: torch.nn.Module
    current: dict[str, torch.Tensor]
    val_front: torch.utils.data.TensorDataset  # validation images through the frozen front, computed once
    accuracy_initial: float = 0.0
    accuracy: float = 0.0  # of `current`, the latest aggregate
    best: dict[str, torch.Tensor] | None = None  # the best aggregate so far that is no worse than the initial
    best_accuracy: float = 0.0

    @property
    def improved(self) -> bool:
        """An aggregate reached at least the delivered accuracy: only then is a new version published, so a
        federated run never ships a regression."""
        return self.best is not None

    def evaluate(self) -> float:
        from shared.training import evaluate

        self.model.load_stitch_state(self.current)
        return evaluate(self.model, self.val_front, forward=self.model.forward_from_front)


def load_variant_state(catalog: Catalog, variant_id: str, val) -> VariantState:
    from shared.training import cache_front_outputs

    manifest = catalog.manifest(variant_id)
    model = load_variant(manifest, catalog.store)
    current = bytes_to_tensors(catalog.store.read(manifest.stitch_block().sha256))
    state = VariantState(variant_id, manifest.version, model, current, cache_front_outputs(model, val))
    state.accuracy_initial = state.accuracy = state.evaluate()
    return state


# ---------------------------------------------------------------- messages


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 1.0,
             on_sent: Callable[[], None] = lambda: None) -> dict[int, Message]:
    """Send messages and collect replies until all arrived or `timeout` passed: {destination node id: reply}."""
    if not messages:
        return {}
    ids = list(grid.push_messages(messages))
    dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    on_sent()
    pending, replies = set(dst), {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                replies[dst[mid]] = reply
        if pending:
            time.sleep(poll)
    return replies


def query_message(node_id: int, rnd: int, ttl: float) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"round": rnd})}), dst_node_id=node_id,
                   message_type=MessageType.QUERY, group_id=str(rnd), ttl=ttl)


def read_variant_reply(reply: Message) -> str | None:
    """The variant id a node reports, or None when it reported none (e.g. nothing installed yet)."""
    if reply.has_error() or "variant" not in reply.content.config_records:
        return None
    return str(reply.content.config_records["variant"].get("variant-id", "")) or None


def train_message(node_id: int, variant: VariantState, rnd: int, s: RunSettings) -> Message:
    config = ConfigRecord({"variant-id": variant.variant_id, "version": variant.base_version, "round": rnd,
                           "local-epochs": s.local_epochs, "learning-rate": s.lr, "batch-size": s.batch_size,
                           "update-format": s.update_format})
    content = RecordDict({"stitch": ArrayRecord(variant.current), "config": config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(rnd),
                   ttl=s.round_timeout)


def reply_format(content: RecordDict) -> str:
    """The update format a train reply is in. Devices of the release before formats were named send float16
    deltas without saying so; devices from before deltas send their trained weights as `stitch`."""
    if "stitch-delta" not in content.array_records and "stitch" in content.array_records:
        return "weights-float32/0"
    variant = content.config_records.get("variant")
    return str(variant.get("update-format", FLOAT16)) if variant is not None else FLOAT16


def read_update(node_id: int, reply: Message, expected_format: str = FLOAT16) -> Update | str:
    """A train reply as an Update, or why it is not one: "dropped" (no answer), "failed" (the node reported an
    error), "incompatible" (not in the update format asked for: another release) or "malformed" (an answer we
    cannot read)."""
    if reply.has_error():
        if reply.error.code in _UNAVAILABLE:
            return "dropped"
        log(WARNING, "node %s failed to train: %s", node_id, reply.error.reason)
        return "failed"
    try:
        content = reply.content
        sent = reply_format(content)
        if sent != expected_format:
            log(WARNING, "node %s answered in update format %s, the server asked for %s: run the same "
                "restnet-fleet release on the server and the devices", node_id, sent, expected_format)
            return "incompatible"
        arrays = content.array_records["stitch-delta"]
        num_bytes = arrays.count_bytes()
        delta = {k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}
        metrics = dict(content.metric_records["metrics"])
        variant_id = str(content.config_records["variant"]["variant-id"])
        num_examples = metrics.pop("num-examples")
    except (KeyError, TypeError, ValueError) as exc:
        log(WARNING, "node %s sent an unreadable update: %s", node_id, exc)
        return "malformed"
    return Update(node_id, variant_id, delta, num_examples, metrics, num_bytes, sent)


# ---------------------------------------------------------------- results


@dataclass
class RoundRecord:
    round: int
    variant_id: str
    accuracy: float
    num_nodes: int  # nodes asked to train
    num_updates: int  # updates accepted
    num_examples: int
    rejected: dict = field(default_factory=dict)  # reason -> count
    failed: int = 0  # nodes that answered with an error
    dropped: int = 0  # nodes that did not answer in time
    update_bytes: int = 0
    stitch_sha256: str = ""  # of the weights after this round
    seconds: float = 0.0


class Recorder:
    """Where results go: the output folder (events, results, weights) and the coordinator's HTTP API."""

    def __init__(self, run_id: int, s: RunSettings):
        self.run_id, self.output_dir, self.url = run_id, s.output_dir, s.coordinator_url
        self.headers = {"Authorization": f"Bearer {s.coordinator_token}"} if s.coordinator_token else {}
        self.ssl = ssl.create_default_context(cafile=s.coordinator_ca or None)
        self.rounds: list[RoundRecord] = []
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def event(self, name: str, **fields) -> None:
        """One line of progress in events.jsonl (tests and operators follow a run with it)."""
        log(INFO, "%s %s", name, fields)
        if self.output_dir:
            with open(self.output_dir / "events.jsonl", "a") as fh:
                fh.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")

    def round(self, rec: RoundRecord) -> None:
        self.rounds.append(rec)
        if self.url:
            report = {"run_id": str(self.run_id), "round": rec.round, "variant_id": rec.variant_id,
                      "accuracy": rec.accuracy, "num_updates": rec.num_updates, "rejected": rec.rejected,
                      "update_bytes": rec.update_bytes}
            try:  # observability is best effort: a coordinator hiccup must not stop training
                self._post("/api/fl/report", json.dumps(report).encode(), "application/json")
            except OSError as exc:
                log(WARNING, "could not report round %s of %s to the coordinator: %s", rec.round, rec.variant_id, exc)

    def finish(self, variants: dict[str, VariantState], settings: RunSettings) -> dict:
        """Write each improved variant's weights and results.json, then hand new stitches to the coordinator."""
        summary = {}
        for vid, v in sorted(variants.items()):
            entry = {"base_version": v.base_version, "accuracy_initial": v.accuracy_initial,
                     "accuracy": v.best_accuracy if v.improved else v.accuracy_initial,
                     "accuracy_last_round": v.accuracy, "improved": v.improved}
            if v.improved:
                data = tensors_to_bytes(v.best)
                entry["stitch_sha256"] = sha256_bytes(data)
                if self.output_dir:
                    atomic_write(self.output_dir / f"{vid}.safetensors", data)
                    entry["stitch_file"] = f"{vid}.safetensors"
            summary[vid] = entry
        shown = {**asdict(settings), "coordinator_token": "***" if settings.coordinator_token else ""}
        results = {"run_id": str(self.run_id), "settings": _jsonable(shown),
                   "rounds": [asdict(r) for r in self.rounds], "variants": summary}
        if self.output_dir:
            atomic_write(self.output_dir / "results.json", json.dumps(results, indent=1).encode())
        if self.url:
            for vid, v in sorted(variants.items()):
                if v.improved:  # a failure here is the run's failure: the loop would stay open
                    # repr: every digit, so a variant tied with another stays tied (rounding would rank it below)
                    query = urllib.parse.urlencode({"accuracy": repr(float(v.best_accuracy)),
                                                    "base_version": v.base_version})
                    answer = self._post(f"/api/variants/{urllib.parse.quote(vid, safe='')}/stitch?{query}",
                                        tensors_to_bytes(v.best), "application/octet-stream")
                    log(INFO, "coordinator accepted the new stitch of %s: %s", vid, answer)
        return results

    def _post(self, path: str, body: bytes, content_type: str, timeout: float = 30.0) -> str:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": content_type, **self.headers})
        with urllib.request.urlopen(req, timeout=timeout, context=self.ssl) as resp:
            return resp.read().decode(errors="replace")[:500]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return str(obj) if isinstance(obj, Path) else obj


# ---------------------------------------------------------------- the run


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not nodes:
        raise RestnetError("no SuperNode is connected to the SuperLink",
                           "start the devices' SuperNodes (restnet fl run --devices DIR, or the device agents)")
    if len(nodes) < min_nodes:
        log(WARNING, "only %d of %d expected nodes are online; starting anyway", len(nodes), min_nodes)
    return nodes


def discover(grid: Grid, rnd: int, s: RunSettings, catalog: Catalog, val, variants: dict[str, VariantState],
             node_variant: dict[int, str]) -> int:
    """Ask every online node we do not know yet which variant it runs (loading new variants on the way);
    forget nodes that went offline. Updates `variants` and `node_variant`; returns how many did not answer."""
    online = set(grid.get_node_ids())
    for node in set(node_variant) - online:
        del node_variant[node]
    asked = sorted(online - set(node_variant))
    replies = exchange(grid, [query_message(n, rnd, s.query_timeout) for n in asked], s.query_timeout)
    for node, reply in replies.items():
        vid = read_variant_reply(reply)
        if vid is None:
            continue
        if vid not in variants:
            try:
                variants[vid] = load_variant_state(catalog, vid, val)
            except KeyError:
                log(WARNING, "node %s runs variant %s, which is not in the catalog; leaving it out", node, vid)
                continue
        node_variant[node] = vid
    return len(asked) - len(replies)


def aggregate_replies(rnd: int, v: VariantState, nodes: list[int], replies: dict[int, Message],
                      s: RunSettings) -> tuple[RoundRecord, list[int]]:
    """One variant's round: read, validate and combine its nodes' replies, evaluate the result.
    Returns the round's record and the nodes that gave no usable answer (dropped, failed, incompatible or
    malformed)."""
    updates, lost, unreadable, unusable = [], Counter(), Counter(), []
    for node in nodes:
        got = read_update(node, replies[node], s.update_format) if node in replies else "dropped"
        if isinstance(got, Update):
            updates.append(got)
            continue
        unusable.append(node)
        (unreadable if got in ("malformed", "incompatible") else lost)[got] += 1  # the latter are not rejections
    agg = aggregate_variant(v.variant_id, v.current, updates, s.aggregation, s.norm_bound, s.trim_fraction,
                            unreadable)
    if agg.accepted:
        v.current = agg.state
        v.accuracy = v.evaluate()
        if v.accuracy >= max(v.accuracy_initial, v.best_accuracy if v.best is not None else 0.0):
            v.best, v.best_accuracy = v.current, v.accuracy
    record = RoundRecord(
        round=rnd, variant_id=v.variant_id, accuracy=v.accuracy, num_nodes=len(nodes),
        num_updates=len(agg.accepted), num_examples=agg.num_examples, rejected=dict(agg.rejected),
        failed=lost["failed"], dropped=lost["dropped"], update_bytes=sum(u.num_bytes for u in updates),
        stitch_sha256=sha256_bytes(tensors_to_bytes(v.current)))
    return record, unusable


def run_federation(grid: Grid, s: RunSettings, run_id: int) -> dict:
    """The whole run; returns what results.json holds."""
    from shared.datasets import load_splits

    catalog = Catalog.load(s.catalog)
    _, val = load_splits(s.data)
    rec = Recorder(run_id, s)
    variants: dict[str, VariantState] = {}
    node_variant: dict[int, str] = {}  # nodes that told us their variant and have not failed since
    wait_for_nodes(grid, s.min_nodes, s.wait_nodes_timeout)
    for rnd in range(1, s.rounds + 1):
        started = time.monotonic()
        unanswered = discover(grid, rnd, s, catalog, val, variants, node_variant)
        targets = sorted(node_variant.items())
        rec.event("discovered", round=rnd, nodes={str(n): v for n, v in targets}, unanswered=unanswered)
        replies = exchange(grid, [train_message(n, variants[v], rnd, s) for n, v in targets], s.round_timeout,
                           on_sent=lambda: rec.event("train_sent", round=rnd, nodes=[n for n, _ in targets]))
        for vid in sorted({v for _, v in targets}):
            record, unusable = aggregate_replies(rnd, variants[vid], [n for n, v in targets if v == vid], replies, s)
            record.seconds = time.monotonic() - started
            rec.round(record)
            rec.event("aggregated", **asdict(record))
            for node in unusable:  # ask again next round: it may be back (with a new id) or re-assigned
                node_variant.pop(node, None)
    results = rec.finish(variants, s)
    rec.event("finished", variants=sorted(variants))
    return results


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunSettings.from_run_config(context.run_config), context.run_id)
