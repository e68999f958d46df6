"""The coordinator's Prometheus metrics, in their own registry (several coordinators can share a process).

Naming follows Prometheus practice: `fleet_` prefix, base units (seconds, bytes), `_total` counters, histograms
for latency, and no per-device labels: label values come from small fixed sets or from the catalog's variant
ids. Label values that arrive from outside (FL rejection reasons) are sanitised and capped.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.registry import Registry

MAX_REASONS = 20
_REASON = re.compile(r"[a-z][a-z0-9_]{0,31}")


class _RegistryCollector(Collector):
    """Device counts read from the registry at scrape time, so they are never out of step with it."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self):
        by_state = GaugeMetricFamily("fleet_devices", "Registered devices by lifecycle state", labels=["state"])
        for state, n in self.registry.count_by_state().items():
            by_state.add_metric([state], n)
        by_presence = GaugeMetricFamily("fleet_devices_presence", "Devices by presence (last will + heartbeat)",
                                        labels=["presence"])
        for presence, n in self.registry.count_by_presence().items():
            by_presence.add_metric([presence], n)
        running = GaugeMetricFamily("fleet_devices_running", "Devices by the variant (rung) they run now",
                                    labels=["variant"])
        for variant, n in self.registry.count_by_running().items():
            running.add_metric([variant], n)
        return [by_state, by_presence, running]


class FleetMetrics:
    def __init__(self, registry: Registry):
        self.prom = CollectorRegistry()
        r = self.prom
        r.register(_RegistryCollector(registry))
        self.enrollments = Counter("fleet_enrollments_total", "Enrollments handled, by result", ["result"],
                                   registry=r)
        self.assignment_seconds = Histogram(
            "fleet_assignment_duration_seconds", "From an enrollment's arrival to its desired state's publication",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.batch_size = Histogram("fleet_commit_batch_messages", "Messages per registry commit (group commit)",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.rejected = Counter("fleet_messages_rejected_total", "Device messages rejected, by reason", ["reason"],
                                registry=r)
        self.status_reports = Counter("fleet_status_reports_total", "Device status reports, by state", ["state"],
                                      registry=r)
        self.rung_switches = Counter("fleet_rung_switches_total", "Rung switches devices reported (ladders)",
                                     registry=r)
        self.desired_published = Counter("fleet_desired_published_total", "Desired states published", registry=r)
        self.artifact_bytes = Counter("fleet_artifact_bytes_sent_total", "Artifact bytes served over HTTP",
                                      registry=r)
        self.artifact_requests = Counter("fleet_artifact_requests_total", "Artifact HTTP requests, by kind and code",
                                         ["kind", "code"], registry=r)
        self.fl_rounds = Counter("fleet_fl_rounds_total", "Federated rounds reported", registry=r)
        self.fl_update_bytes = Counter("fleet_fl_update_bytes_total", "Bytes of FL updates received by the server",
                                       registry=r)
        self.fl_rejected = Counter("fleet_fl_updates_rejected_total", "FL updates rejected, by reason", ["reason"],
                                   registry=r)
        self.variant_accuracy = Gauge("fleet_variant_accuracy", "Latest measured accuracy of a variant",
                                      ["variant"], registry=r)
        self.stitch_updates = Counter("fleet_stitch_updates_total", "New variant versions from aggregated stitches",
                                      registry=r)
        self._reasons: set[str] = set()

    def fl_reason(self, reason: str) -> str:
        """A bounded label value: known-shaped reasons, at most MAX_REASONS of them, the rest as 'other'."""
        if not isinstance(reason, str) or not _REASON.fullmatch(reason):
            return "other"
        if reason not in self._reasons and len(self._reasons) >= MAX_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason

    def exposition(self) -> bytes:
        return generate_latest(self.prom)
