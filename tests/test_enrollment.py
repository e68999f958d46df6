"""Enrollment and variant versioning on their own: a real registry (SQLite, PostgreSQL) and a real catalog, no
broker."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

from fleet_helpers import (DEVICES, MARGIN, _synthetic_catalog_template, assert_assignment_ok,  # noqa: F401
                           profile_of, registry_url, synthetic_catalog)
from server.enrollment import RACE_WINDOW_S, Enrollment
from server.metrics import FleetMetrics
from server.registry import REQUESTS_KEPT, open_registry
from server.transport import Incoming
from server.versioning import VariantVersions
from shared.artifacts import bytes_to_tensors
from shared.catalog import Catalog
from shared.messages import Enroll, decode_desired, decode_error, encode, topic


def parts(registry_url, catalog):
    registry = open_registry(registry_url)
    versions = VariantVersions(catalog, MARGIN, "http://coordinator:1")
    return registry, versions, Enrollment(registry, versions, FleetMetrics(registry))


def enroll(enrollment, registry, device, request_id="r1", now=1.0):
    out = []
    msg = Enroll(device.id, request_id, profile_of(device))
    item = Incoming(topic(device.id, "enroll"), encode(msg), 1, 1, 0.0)
    with enrollment.transaction([item]):
        enrollment.handle(item, out, now)
    return out


def test_enrollment_assigns_answers_repeats_and_rejects(registry_url, synthetic_catalog):
    registry, _, enrollment = parts(registry_url, synthetic_catalog)
    for device in DEVICES:
        (answer,) = enroll(enrollment, registry, device)
        desired = decode_desired(device.id, answer.payload)
        assert answer.retain and answer.topic == topic(device.id, "desired")
        assert_assignment_ok(synthetic_catalog, profile_of(device), desired.assignment.variant_id)
        assert desired.assignment.manifest_url.startswith("http://coordinator:1/manifests/")
    again = enroll(enrollment, registry, DEVICES[0])  # the same request: the current state, nothing new
    assert again[0].payload == registry.device(DEVICES[0].id).desired

    out = []
    with registry.transaction():
        enrollment.handle(Incoming(topic("dev-x", "enroll"), b'{"v": 1}', 2, 1, 0.0), out, 1.0)
    assert decode_error(out[0].payload).code == "schema" and registry.device("dev-x") is None


def test_forgotten_request_ids_are_new_requests_and_recent_ones_get_the_current_state(registry_url,
                                                                                       synthetic_catalog):
    registry, _, enrollment = parts(registry_url, synthetic_catalog)
    device = DEVICES[1]
    first = decode_desired(device.id, enroll(enrollment, registry, device, "req-0")[0].payload)
    for n in range(1, 1000):  # the same budget under 999 more request ids: same variant, same version
        enroll(enrollment, registry, device, f"req-{n}", now=1.0 + n)
    row = registry.device(device.id)
    assert len(row.requests) == REQUESTS_KEPT and row.requests[-1] == "req-999"
    assert (row.version, row.assignment_id, row.request_id) == (first.version, first.assignment_id, "req-999")
    recent = decode_desired(device.id, enroll(enrollment, registry, device, "req-990")[0].payload)
    assert recent.request_id == "req-999"  # a recent request again: the device's current desired state, unchanged
    assert registry.device(device.id).requests == row.requests
    forgotten = decode_desired(device.id, enroll(enrollment, registry, device, "req-0")[0].payload)
    assert forgotten.request_id == "req-0" and forgotten.version == first.version  # handled as new, unchanged answer
    assert registry.device(device.id).requests == (*row.requests[1:], "req-0")


def test_a_version_published_by_another_writer_reaches_the_devices_on_it(registry_url, synthetic_catalog):
    registry, versions, enrollment = parts(registry_url, synthetic_catalog)
    device = DEVICES[1]
    enroll(enrollment, registry, device)
    row = registry.device(device.id)
    assert versions.refresh() == set()  # nothing changed on disk

    other = Catalog.load(synthetic_catalog.root)  # e.g. `restnet stitch-train --save` on the same folder
    manifest = other.manifest(row.variant_id)
    stitch = {k: v + 0.01 for k, v in bytes_to_tensors(other.store.read(manifest.stitch_block().sha256)).items()}
    other.publish_stitch(row.variant_id, stitch, 0.95, base_version=1)

    assert versions.refresh() == {row.variant_id}
    out = []
    with registry.transaction():
        assert enrollment.follow_new_version(row.variant_id, out, 2.0) == 1
        assert enrollment.follow_new_version(row.variant_id, [], 3.0) == 0  # told once
    desired = decode_desired(device.id, out[0].payload)
    assert desired.version == row.version + 1 and desired.assignment.variant_version == 2
    assert json.loads(registry.device(device.id).desired)["assignment"]["variant_version"] == 2


def test_a_latency_target_too_small_for_any_variant_is_refused_not_crashed(registry_url, synthetic_catalog):
    registry, _, enrollment = parts(registry_url, synthetic_catalog)
    device = replace(DEVICES[2], latency_ms=5e-324)  # in range for the schema; the compute it needs overflows
    (answer,) = enroll(enrollment, registry, device)
    desired = decode_desired(device.id, answer.payload)
    assert desired.assignment is None and desired.refusal.smallest["compute"] == sys.float_info.max
    assert registry.device(device.id).state == "refused"


def test_a_failure_of_ours_answers_the_device_instead_of_leaving_it_retrying(registry_url, synthetic_catalog,
                                                                            monkeypatch):
    registry, versions, enrollment = parts(registry_url, synthetic_catalog)

    def broken(variant_id):
        raise RuntimeError("a bug")

    monkeypatch.setattr(versions, "assignment", broken)
    (answer,) = enroll(enrollment, registry, DEVICES[0], request_id="r7")
    error = decode_error(answer.payload)
    assert (answer.topic, error.code, error.request_id) == (topic(DEVICES[0].id, "error"), "internal", "r7")
    assert registry.device(DEVICES[0].id) is None  # nothing applied


def test_an_enrollment_the_device_made_earlier_does_not_replace_a_later_one(registry_url, synthetic_catalog):
    """Two coordinators may hold a device's two enrollments at once and commit the later one first: the earlier one,
    committed after it, must not win. Within the race window it gets the current state; after the window it counts
    again (a device whose folder was wiped starts its sequence over); ids without a sequence stay unordered."""
    registry, _, enrollment = parts(registry_url, synthetic_catalog)
    small, large = DEVICES[0], replace(DEVICES[2], id=DEVICES[0].id)  # one device, two budgets
    later = decode_desired(small.id, enroll(enrollment, registry, large, "2.later", now=10.0)[0].payload)
    (answer,) = enroll(enrollment, registry, small, "1.earlier", now=10.5)
    assert decode_desired(small.id, answer.payload) == later  # the current state, nothing changed
    row = registry.device(small.id)
    assert (row.request_id, row.profile, row.version) == ("2.later", profile_of(large), later.version)

    (answer,) = enroll(enrollment, registry, small, "1.wiped", now=10.0 + RACE_WINDOW_S + 1)
    wiped = decode_desired(small.id, answer.payload)
    assert wiped.request_id == "1.wiped" and wiped.version == later.version + 1  # its own budget, a new state
    assert wiped.assignment.variant_id != later.assignment.variant_id

    enroll(enrollment, registry, large, "plain-b", now=100.0)
    enroll(enrollment, registry, small, "plain-a", now=100.5)
    assert registry.device(small.id).request_id == "plain-a"  # unordered ids: the one committed later wins
