"""The coordinator: enrollments in and assignments out over MQTT; artifacts, metrics and an API over HTTP.

It wires the parts together and answers the HTTP side's questions (`server.artifact_http.FleetAPI`):
- `server.transport`: the MQTT session and the worker that commits each batch before publishing and acknowledging;
- `server.enrollment`: device messages -> registry rows and desired states;
- `server.versioning`: the catalog served, new versions of a variant (published here or by another writer);
- `server.fl_reports`: federated-round reports -> metrics.
"""
from __future__ import annotations

import logging
import math

from server.artifact_http import ApiError, ArtifactServer
from server.broker import EmbeddedBroker
from server.enrollment import DEVICE_TOPICS, Enrollment
from server.fl_reports import FLReports
from server.metrics import FleetMetrics
from server.registry import is_shared_url, open_registry
from server.transport import Busy, MqttTransport, Outgoing, Sharing
from server.versioning import VariantVersions
from shared.artifacts import bytes_to_tensors
from shared.catalog import Catalog, StaleVersion, manifest_path
from shared.config import FleetConfig
from shared.errors import ConfigError, IntegrityError
from shared.messages import TOPIC_ROOT
from shared.mqtt import parse_url
from shared.signing import load_signer
from shared.vocabulary import valid_variant_id

log = logging.getLogger("restnet.coordinator")


class Coordinator:
    """Coordinator `instance` (1..fleet.cluster.coordinators) of the fleet; with more than one, they share the device
    topics (MQTT 5 shared subscriptions), the PostgreSQL registry and the catalog folder."""

    def __init__(self, fleet: FleetConfig, catalog: Catalog, instance: int = 1):
        self.fleet = fleet
        cluster = fleet.cluster
        if not 1 <= instance <= cluster.coordinators:
            raise ConfigError(f"coordinator instance {instance} is not one of the {cluster.coordinators} in "
                              "fleet.cluster.coordinators")
        if cluster.coordinators > 1:
            if parse_url(fleet.broker.url).embedded:
                raise ConfigError("several coordinators (fleet.cluster.coordinators) cannot share the embedded broker",
                                  "run Mosquitto or EMQX and set fleet.broker.url to mqtt://HOST:PORT")
            if not is_shared_url(fleet.registry):
                raise ConfigError("several coordinators (fleet.cluster.coordinators) cannot share a SQLite registry",
                                  "set fleet.registry to postgresql://USER@HOST:PORT/DATABASE")
        signer = load_signer(fleet.signing_key) if fleet.signing_key else None
        self.registry = open_registry(fleet.registry)
        self.metrics = FleetMetrics(self.registry)
        self.variants = VariantVersions(catalog, fleet.memory_margin, signer=signer)
        self.enrollment = Enrollment(self.registry, self.variants, self.metrics, signer)
        self.fl_reports = FLReports(self.metrics)
        for variant_id, accuracy in self.variants.accuracies().items():
            self.metrics.variant_accuracy.labels(variant_id).set(accuracy)
        sharing = Sharing(cluster.share_group, cluster.session_expiry_s) if cluster.coordinators > 1 else None
        self.transport = MqttTransport(
            fleet.broker, fleet.coordinator_login(instance),  # Mosquitto: client id = username
            [f"{TOPIC_ROOT}/dev/+/{kind}" for kind in DEVICE_TOPICS], self.enrollment.transaction,
            self.enrollment.handle, self._sweep, max(0.5, min(fleet.heartbeat_s, fleet.stale_after_s) / 2),
            self.enrollment.republish_all, self.metrics, sharing,
            self.enrollment.stale_desired if sharing else None)
        self._embedded: EmbeddedBroker | None = None
        self.http: ArtifactServer | None = None
        self.public_url = ""

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> "Coordinator":
        try:
            self._start()
        except BaseException:
            self.stop()  # release whatever had started: ports, the broker process, threads
            raise
        log.info("coordinator up: mqtt %s, http %s", self.fleet.broker.url, self.public_url)
        return self

    def _start(self) -> None:
        f = self.fleet
        try:
            self.http = ArtifactServer(self, f.http_host, f.http_port, f.http_cert_file, f.http_key_file,
                                       f.api_token).start()
        except OSError as exc:
            raise ConfigError(f"cannot serve HTTP on {f.http_host}:{f.http_port}: {exc}",
                              "set fleet.http_port to a free port") from None
        self.public_url = self.variants.public_url = f.public_url(self.http.port)
        address = parse_url(f.broker.url)
        if address.embedded:
            self._embedded = EmbeddedBroker(address, f.broker.max_payload).start()
        self.transport.start()
        resigned = self.transport.call(self.enrollment.resign_all)
        if resigned:
            log.info("signed %d stored desired states with key %s", resigned, self.enrollment.signer.key_id)

    def stop(self) -> None:
        self.transport.stop()
        if self.http is not None:
            self.http.stop()
        if self._embedded is not None:
            self._embedded.stop()
        self.registry.close()

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- on the worker ----------------------------------------------------------------------------------

    def _sweep(self, out: list[Outgoing], now: float) -> None:
        """Periodically: devices not heard from become stale; versions other writers published reach devices."""
        self.registry.mark_stale(now - self.fleet.stale_after_s)
        try:
            moved = self.variants.refresh()
        except Exception:  # a catalog another writer broke must not stop the fleet: keep serving the last good one
            log.exception("cannot reload the catalog; serving the one loaded before")
            return
        self._deliver(moved, out, now)

    def _deliver(self, moved: set[str], out: list[Outgoing], now: float) -> int:
        devices = 0
        for variant_id in sorted(moved):
            devices += self.enrollment.follow_new_version(variant_id, out, now)
            rec = self.variants.catalog.get(variant_id)
            if rec.accuracy is not None and math.isfinite(rec.accuracy):
                self.metrics.variant_accuracy.labels(variant_id).set(rec.accuracy)
        return devices

    # ---- what the HTTP side asks (server.artifact_http.FleetAPI) ----------------------------------------

    def manifest_path(self, variant_id: str, version: int):
        if not any(v.id == variant_id for v in self.variants.catalog.variants):
            return None
        return self.variants.catalog.root / manifest_path(variant_id, version)

    def blob_path(self, sha256: str):
        return self.variants.catalog.store.path(sha256)

    def catalog_bytes(self) -> bytes:
        return (self.variants.catalog.root / "catalog.json").read_bytes()

    def devices(self) -> list[dict]:
        return self.registry.snapshot()

    def fl_report(self, report: dict) -> dict:
        return self.fl_reports.record(report, {v.id for v in self.variants.catalog.variants})

    def stitch_update(self, variant_id: str, accuracy: float, base_version: int, body: bytes) -> dict:
        """Aggregated stitch weights trained from `base_version` -> the variant's next version, pushed to every
        device that runs it."""
        if not valid_variant_id(variant_id) or variant_id not in {v.id for v in self.variants.catalog.variants}:
            raise ApiError(404, f"no variant {variant_id!r} in the catalog")
        if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise ApiError(400, f"accuracy must be in [0, 1], got {accuracy}")
        try:
            stitch = bytes_to_tensors(body)
        except IntegrityError as exc:
            raise ApiError(400, f"body is not safetensors: {exc.message}") from None

        def publish(out: list[Outgoing], now: float) -> dict:
            manifest, moved = self.variants.publish(variant_id, stitch, accuracy, base_version)
            self.metrics.stitch_updates.inc()
            devices = self._deliver(moved, out, now)
            return {"variant_id": variant_id, "version": manifest.version, "manifest_sha256": manifest.sha256,
                    "devices": devices}

        try:
            return self.transport.call(publish)
        except StaleVersion as exc:
            raise ApiError(409, str(exc)) from None
        except IntegrityError as exc:
            raise ApiError(400, exc.message) from None
        except Busy:
            raise ApiError(503, "the coordinator is busy; try again") from None
