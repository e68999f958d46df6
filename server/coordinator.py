"""The coordinator: enrollments in, assignments out, over MQTT; artifacts and an API over HTTP.

Threads: paho's network loop only queues incoming messages; one worker thread owns every registry write. The
worker drains the queue in batches, handles each message, commits the batch once (group commit), and only then
publishes the answers and acknowledges the MQTT messages (manual PUBACK). So an answer a device has seen is
always in the registry, and a message the coordinator had not committed when it died is redelivered by the
broker to the coordinator's persistent session when it comes back.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import torch

from server.artifact_http import ApiError, ArtifactServer
from server.assignment import Assigner
from server.broker import EmbeddedBroker
from shared.mqtt import make_client, parse_url
from server.metrics import FleetMetrics
from server.registry import DeviceRow, Registry
from shared.artifacts import bytes_to_tensors, with_new_stitch
from shared.catalog import Catalog
from shared.config import FleetConfig
from shared.errors import ConfigError, IntegrityError
from shared.messages import (Assignment, Desired, Enroll, ErrorReply, Heartbeat, MessageError, Presence, Profile,
                             Refusal, Status, decode, encode, parse_topic, topic, valid_variant_id)

log = logging.getLogger("restnet.coordinator")

MAX_BATCH = 1000  # messages per registry commit
SUBSCRIPTIONS = ("enroll", "status", "state", "heartbeat")
CONNECT_TIMEOUT_S = 10.0
TASK_TIMEOUT_S = 60.0


@dataclass
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    arrived: float  # time.monotonic() when paho handed it over


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool
    arrived: float | None = None  # set for answers to enrollments: feeds the assignment latency histogram


@dataclass
class _Task:
    """Work that must run on the worker (it writes the registry or the catalog) and may publish."""

    fn: Callable[[list, float], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


_STOP = object()


class Coordinator:
    def __init__(self, fleet: FleetConfig, catalog: Catalog):
        self.fleet = fleet
        self.catalog = catalog
        self.client_id = fleet.broker.username or "restnet-coordinator"  # Mosquitto: client id = username
        self.registry = Registry(fleet.registry)
        self.metrics = FleetMetrics(self.registry)
        self.assigner = Assigner(catalog.variants, fleet.memory_margin)
        for rec in catalog.variants:
            if rec.accuracy is not None and math.isfinite(rec.accuracy):
                self.metrics.variant_accuracy.labels(rec.id).set(rec.accuracy)
        self._manifests: dict[str, tuple[int, str, int]] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="coordinator-worker", daemon=True)
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._fl_lock = threading.Lock()
        self._fl_reports: set[tuple] = set()  # (run_id, round, variant_id) already counted
        self._fl_rounds: set[tuple] = set()  # (run_id, round) already counted
        self._embedded: EmbeddedBroker | None = None
        self.http: ArtifactServer | None = None
        self.client: mqtt.Client | None = None
        self.public_url = ""

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> "Coordinator":
        address = parse_url(self.fleet.broker.url)
        try:
            self._start(address)
        except BaseException:
            self.stop()  # release whatever had started: ports, the broker process, threads
            raise
        log.info("coordinator up: mqtt %s:%d, http %s", address.host, address.port, self.public_url)
        return self

    def _start(self, address) -> None:
        f = self.fleet
        try:
            self.http = ArtifactServer(self, f.http_host, f.http_port, f.http_cert_file, f.http_key_file,
                                       f.api_token).start()
        except OSError as exc:
            raise ConfigError(f"cannot serve HTTP on {f.http_host}:{f.http_port}: {exc}",
                              "set fleet.http_port to a free port") from None
        host = "127.0.0.1" if f.http_host in ("0.0.0.0", "", "::") else f.http_host
        self.public_url = (f.http_public_url or f"{self.http.scheme}://{host}:{self.http.port}").rstrip("/")
        if address.embedded:
            self._embedded = EmbeddedBroker(address, f.broker.max_payload).start()
        self._worker.start()
        client, _ = make_client(f.broker, self.client_id, f.broker.username, f.broker.password,
                                clean_session=False)
        client.manual_ack_set(True)
        client.reconnect_delay_set(1, 10)
        client.on_connect, client.on_message = self._on_connect, self._on_message
        self.client = client
        try:
            client.connect(address.host, address.port, keepalive=30)
        except OSError as exc:
            raise ConfigError(f"cannot reach the MQTT broker at {address.host}:{address.port}: {exc}",
                              "start the broker or fix broker.url") from None
        client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S) or self._connect_error:
            raise ConfigError(f"the MQTT broker refused the coordinator: {self._connect_error or 'no answer'}",
                              "check broker.username/password and the broker's ACL")

    def stop(self) -> None:
        if self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(10)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        if self.http is not None:
            self.http.stop()
        if self._embedded is not None:
            self._embedded.stop()
        self.registry.close()

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- MQTT callbacks (paho's thread: queue and return) ----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            self._connected.set()
            return
        client.subscribe([(f"fleet/v1/dev/+/{kind}", 1) for kind in SUBSCRIPTIONS])
        if not flags.session_present:  # a broker that lost its state lost our retained desired states too
            self._queue.put(_Task(self._republish_all))
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        self._queue.put(_Incoming(msg.topic, msg.payload, msg.mid, msg.qos, time.monotonic()))

    # ---- the worker -------------------------------------------------------------------------------------

    def _work(self) -> None:
        sweep_every = max(0.5, min(self.fleet.heartbeat_s, self.fleet.stale_after_s) / 2)
        next_sweep = time.monotonic() + sweep_every
        stopping = False
        while not stopping:
            batch = []
            try:
                item = self._queue.get(timeout=0.25)
                while item is not _STOP:
                    batch.append(item)
                    if len(batch) == MAX_BATCH:
                        break
                    item = self._queue.get_nowait()
                stopping = item is _STOP
            except queue.Empty:
                pass
            sweep = time.monotonic() >= next_sweep
            if batch or sweep:
                self._run_batch(batch, sweep)
            if sweep:
                next_sweep = time.monotonic() + sweep_every

    def _run_batch(self, batch: list, sweep: bool) -> None:
        out: list[_Outgoing] = []
        now = time.time()
        try:
            with self.registry.transaction():
                for item in batch:
                    if isinstance(item, _Task):
                        try:
                            item.result = item.fn(out, now)
                        except Exception as exc:  # reported to whoever submitted the task
                            item.error = exc
                    else:
                        try:
                            self._handle(item, out, now)
                        except Exception:  # a bug or a broken catalog must not stop the other messages
                            log.exception("could not handle a message on %s", item.topic[:120])
                            self.metrics.rejected.labels("internal").inc()
                if sweep:
                    self.registry.mark_stale(now - self.fleet.stale_after_s)
        except Exception:  # the registry failed to commit: nothing is published, nothing acknowledged
            log.exception("registry commit failed; %d messages left for the broker to redeliver", len(batch))
            for item in batch:
                if isinstance(item, _Task):
                    item.error = item.error or RuntimeError("registry commit failed")
                    item.done.set()
            return
        if batch:
            self.metrics.batch_size.observe(len(batch))
        for o in out:
            self.client.publish(o.topic, o.payload, qos=1, retain=o.retain)
            if o.retain:
                self.metrics.desired_published.inc()
            if o.arrived is not None:
                self.metrics.assignment_seconds.observe(time.monotonic() - o.arrived)
        for item in batch:
            if isinstance(item, _Task):
                item.done.set()
            elif item.qos > 0:
                self.client.ack(item.mid, item.qos)

    def _handle(self, item: _Incoming, out: list[_Outgoing], now: float) -> None:
        try:
            device_id, kind = parse_topic(item.topic)
            msg = decode(kind, device_id, item.payload)
        except MessageError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            if exc.code != "bad_topic":
                out.append(_Outgoing(topic(device_id, "error"),
                                     encode(ErrorReply(exc.code, exc.message, exc.request_id)), False))
            return
        if isinstance(msg, Enroll):
            self._enroll(msg, out, now, item.arrived)
        elif isinstance(msg, Status):
            self.metrics.status_reports.labels(msg.state).inc()
            self.registry.set_state(msg.device_id, msg.assignment_id, msg.state.lower(), msg.reason, now)
        elif isinstance(msg, Presence):
            self.registry.set_presence(msg.device_id, "online" if msg.online else "offline", msg.seq, now)
        elif isinstance(msg, Heartbeat):
            self.registry.touch(msg.device_id, now)

    def _enroll(self, msg: Enroll, out: list[_Outgoing], now: float, arrived: float) -> None:
        prev = self.registry.get(msg.device_id)
        if prev is not None and self.registry.seen_request(prev.id, msg.request_id):
            dev, result = prev, "duplicate"
        else:
            dev, result = self._assign(msg.device_id, msg.profile, msg.request_id, prev, now)
            self.registry.put(dev)
        self.metrics.enrollments.labels(result).inc()
        out.append(_Outgoing(topic(dev.id, "desired"), dev.desired, True, arrived))

    def _assign(self, device_id: str, profile: Profile, request_id: str, prev: DeviceRow | None,
                now: float, force_new: bool = False) -> tuple[DeviceRow, str]:
        """The device's next row and desired state; the version moves only when what it should run changes."""
        choice = self.assigner.choose(profile)
        assignment, refusal = (None, choice) if isinstance(choice, Refusal) else (self._assignment(choice.id), None)
        variant = (assignment.variant_id, assignment.variant_version) if assignment else (None, None)
        same = prev is not None and not force_new and (prev.variant_id, prev.variant_version) == variant
        if same:
            version, assignment_id, state, reason = prev.version, prev.assignment_id, prev.state, prev.reason
            result = "unchanged" if assignment else "refused"
        else:
            version, assignment_id, reason = (prev.version + 1 if prev else 1), uuid.uuid4().hex[:16], None
            state = "assigned" if assignment else "refused"
            result = "refused" if refusal else ("assigned" if prev is None else "reassigned")
        desired = encode(Desired(device_id, version, assignment_id, request_id, assignment, refusal))
        row = DeviceRow(device_id, profile, request_id, version, assignment_id, variant[0], variant[1], desired,
                        state, reason, prev.enrolled_at if prev else now, now)
        return row, result

    def _assignment(self, variant_id: str) -> Assignment:
        if variant_id not in self._manifests:
            m = self.catalog.manifest(variant_id)
            self._manifests[variant_id] = (m.version, m.sha256, m.total_bytes)
        version, sha, total = self._manifests[variant_id]
        return Assignment(variant_id, version, f"{self.public_url}/manifests/{variant_id}/v{version}.json", sha, total)

    def _republish_all(self, out: list[_Outgoing], now: float) -> int:
        rows = self.registry.all_desired()
        out.extend(_Outgoing(topic(device_id, "desired"), desired, True) for device_id, desired in rows)
        return len(rows)

    def _call(self, fn: Callable[[list, float], object]):
        """Run `fn(out, now)` on the worker, inside its transaction; return its result or raise its error."""
        task = _Task(fn)
        self._queue.put(task)
        if not task.done.wait(TASK_TIMEOUT_S):
            raise ApiError(503, "the coordinator is busy; try again")
        if task.error is not None:
            raise task.error
        return task.result

    # ---- what the HTTP side asks (server.artifact_http.FleetAPI) ----------------------------------------

    def manifest_path(self, variant_id: str, version: int) -> Path | None:
        try:
            rec = self.catalog.get(variant_id)
        except KeyError:
            return None
        rel = rec.manifest if version == rec.version else f"manifests/{variant_id}/v{version}.json"
        return self.catalog.root / rel

    def blob_path(self, sha256: str) -> Path:
        return self.catalog.store.path(sha256)

    def catalog_bytes(self) -> bytes:
        return (self.catalog.root / "catalog.json").read_bytes()

    def devices(self) -> list[dict]:
        return self.registry.snapshot()

    def fl_report(self, report: dict) -> dict:
        """One variant's result of one federated round -> metrics (a repeated report is counted once)."""
        r = _check_report(report, {v.id for v in self.catalog.variants})
        with self._fl_lock:
            if (r["run_id"], r["round"], r["variant_id"]) in self._fl_reports:
                return {"duplicate": True}
            self._fl_reports.add((r["run_id"], r["round"], r["variant_id"]))
            if (r["run_id"], r["round"]) not in self._fl_rounds:
                self._fl_rounds.add((r["run_id"], r["round"]))
                self.metrics.fl_rounds.inc()
        self.metrics.fl_update_bytes.inc(r["update_bytes"])
        for reason, count in r["rejected"].items():
            self.metrics.fl_rejected.labels(self.metrics.fl_reason(reason)).inc(count)
        if r["accuracy"] is not None:
            self.metrics.variant_accuracy.labels(r["variant_id"]).set(r["accuracy"])
        return {"duplicate": False}

    def stitch_update(self, variant_id: str, accuracy: float, body: bytes) -> dict:
        """Aggregated stitch weights -> the variant's next version, pushed to every device that runs it."""
        if not valid_variant_id(variant_id) or variant_id not in {v.id for v in self.catalog.variants}:
            raise ApiError(404, f"no variant {variant_id!r} in the catalog")
        if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise ApiError(400, f"accuracy must be in [0, 1], got {accuracy}")
        try:
            state = bytes_to_tensors(body)
        except IntegrityError as exc:
            raise ApiError(400, f"body is not safetensors: {exc.message}") from None
        return self._call(lambda out, now: self._new_version(variant_id, accuracy, state, out, now))

    def _new_version(self, variant_id: str, accuracy: float, state: dict, out: list[_Outgoing], now: float) -> dict:
        manifest = self.catalog.manifest(variant_id)
        current = bytes_to_tensors(self.catalog.store.read(manifest.stitch_block().sha256))
        _check_same_layout(current, state)
        rec = self.catalog.get(variant_id)
        new = with_new_stitch(manifest, state, self.catalog.store,
                              {**manifest.record, "accuracy": accuracy, "version": manifest.version + 1})
        rec.accuracy = accuracy
        self.catalog.add_manifest(rec, new)
        self.catalog.save()
        self._manifests.pop(variant_id, None)
        self.assigner = Assigner(self.catalog.variants, self.fleet.memory_margin)
        devices = self.registry.on_variant(variant_id)
        for prev in devices:
            row, _ = self._assign(prev.id, prev.profile, prev.request_id, prev, now, force_new=True)
            self.registry.put(row)
            out.append(_Outgoing(topic(row.id, "desired"), row.desired, True))
        self.metrics.stitch_updates.inc()
        self.metrics.variant_accuracy.labels(variant_id).set(accuracy)
        return {"variant_id": variant_id, "version": new.version, "manifest_sha256": new.sha256,
                "devices": len(devices)}


def _check_same_layout(current: dict, new: dict) -> None:
    if set(current) != set(new):
        raise ApiError(400, f"stitch tensors {sorted(new)[:8]} differ from the variant's {sorted(current)[:8]}")
    for name, t in new.items():
        ref = current[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ApiError(400, f"stitch tensor {name}: {t.dtype}{list(t.shape)}, "
                                f"expected {ref.dtype}{list(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ApiError(400, f"stitch tensor {name} has non-finite values")


def _check_report(r, variants: set[str]) -> dict:
    """Validate a POST /api/fl/report body; every problem is a 400 naming the field."""
    keys = {"run_id", "round", "variant_id", "accuracy", "num_updates", "rejected", "update_bytes"}
    if not isinstance(r, dict) or set(r) != keys:
        raise ApiError(400, f"report must be an object with exactly the keys {', '.join(sorted(keys))}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53

    if not (isinstance(r["run_id"], str) and 0 < len(r["run_id"]) <= 128):
        raise ApiError(400, "run_id must be a non-empty string")
    if not count(r["round"]) or not count(r["num_updates"]) or not count(r["update_bytes"]):
        raise ApiError(400, "round, num_updates and update_bytes must be non-negative integers")
    if r["variant_id"] not in variants:
        raise ApiError(400, f"unknown variant_id {str(r['variant_id'])[:128]!r}")
    acc = r["accuracy"]
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))
                            or not math.isfinite(acc) or not 0 <= acc <= 1):
        raise ApiError(400, "accuracy must be null or a number in [0, 1]")
    rejected = r["rejected"]
    if not isinstance(rejected, dict) or not all(isinstance(k, str) and count(v) for k, v in rejected.items()):
        raise ApiError(400, "rejected must map reasons to non-negative integer counts")
    return r
