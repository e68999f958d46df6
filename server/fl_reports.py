"""Federated-round results reported by the ServerApp (`POST /api/fl/report`): checked, counted once, metrics."""
from __future__ import annotations

import math
import threading

from server.artifact_http import ApiError
from server.metrics import FleetMetrics

REPORT_KEYS = {"run_id", "round", "variant_id", "accuracy", "num_updates", "rejected", "update_bytes"}


class FLReports:
    def __init__(self, metrics: FleetMetrics):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._reports: set[tuple] = set()  # (run_id, round, variant_id) already counted
        self._rounds: set[tuple] = set()  # (run_id, round) already counted

    def record(self, report, variants: set[str]) -> dict:
        """One variant's result of one round -> metrics; a repeated report is counted once."""
        r = check_report(report, variants)
        with self._lock:
            if (r["run_id"], r["round"], r["variant_id"]) in self._reports:
                return {"duplicate": True}
            self._reports.add((r["run_id"], r["round"], r["variant_id"]))
            if (r["run_id"], r["round"]) not in self._rounds:
                self._rounds.add((r["run_id"], r["round"]))
                self.metrics.fl_rounds.inc()
        self.metrics.fl_update_bytes.inc(r["update_bytes"])
        for reason, count in r["rejected"].items():
            self.metrics.fl_rejected.labels(self.metrics.fl_reason(reason)).inc(count)
        if r["accuracy"] is not None:
            self.metrics.variant_accuracy.labels(r["variant_id"]).set(r["accuracy"])
        return {"duplicate": False}


def check_report(r, variants: set[str]) -> dict:
    """Validate a report body; every problem is a 400 naming the field."""
    if not isinstance(r, dict) or set(r) != REPORT_KEYS:
        raise ApiError(400, f"report must be an object with exactly the keys {', '.join(sorted(REPORT_KEYS))}")

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
