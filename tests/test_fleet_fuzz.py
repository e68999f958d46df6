"""Hostile payloads on the enroll and status topics, through a real Mosquitto to a live coordinator.

Every payload is invalid by construction (garbage bytes, non-objects, one corrupted field, an unknown field, a
wrong version, another device's id, too many bytes). For each one the coordinator must answer on the device's
error topic with the right code, leave the registry exactly as it was, and keep serving.
"""
from __future__ import annotations

import json
import math
import re

from dataclasses import replace

from fleet_helpers import (DEVICES, assert_assignment_ok, fleet_config, fleet_coordinator, metric,  # noqa: F401
                           mosquitto_broker, profile_of, raw_clients, request_count, synthetic_catalog, _synthetic_catalog_template)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.messages import MAX_PAYLOAD_BYTES, Enroll, Status, decode_desired, decode_error, encode, topic

DEVICE = "fuzz-1"
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
EXAMPLES = 1200

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)


def valid(kind: str) -> dict:
    if kind == "enroll":
        return json.loads(encode(Enroll(DEVICE, "req-0", profile_of(DEVICES[1]))))
    return json.loads(encode(Status(DEVICE, "assign-0", "INSTALLED", "syn.2_3", None)))


def not_number_in(low: float, high: float):
    """Values that are not a number in (low, high]: wrong types, out of range, non-finite."""
    return st.one_of(st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=2),
                     st.floats(allow_nan=True, allow_infinity=True).filter(
                         lambda x: not (math.isfinite(x) and low < x <= high)),
                     st.integers(-2**70, 2**70).filter(lambda x: not low < x <= high))


not_token = st.one_of(st.text(max_size=80).filter(lambda s: not TOKEN.fullmatch(s)), st.integers(), st.booleans(),
                      st.lists(st.text(max_size=3), max_size=2))
FIELD_CORRUPTIONS = {
    "enroll": {
        ("request_id",): not_token,
        ("profile",): st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
        ("profile", "memory_mb"): not_number_in(0, 1e9),
        ("profile", "compute"): not_number_in(0, 1e6),
        ("profile", "latency_ms"): not_number_in(0, 1e9).filter(lambda v: v is not None),
        ("profile", "agent_version"): not_token,
    },
    "status": {
        ("assignment_id",): not_token,
        ("state",): json_values.filter(lambda v: v not in ("DOWNLOADING", "VERIFIED", "INSTALLED", "FAILED")),
        ("variant_id",): not_token.filter(lambda v: not isinstance(v, str) or len(v) > 64),
        ("reason",): st.one_of(st.integers(), st.text(min_size=513, max_size=600), st.just("line\nbreak")),
    },
}


@st.composite
def corrupted_field(draw, kind):
    payload = valid(kind)
    path = draw(st.sampled_from(sorted(FIELD_CORRUPTIONS[kind])))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if draw(st.booleans()) and path[-1] not in ("latency_ms", "variant_id", "reason"):
        del target[path[-1]]  # a required field, missing
    else:
        target[path[-1]] = draw(FIELD_CORRUPTIONS[kind][path])
    return json.dumps(payload).encode(), {"schema", "oversize"}


@st.composite
def unknown_field(draw, kind):
    payload = valid(kind)
    where = payload["profile"] if kind == "enroll" and draw(st.booleans()) else payload
    name = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in where and k != "v"))
    where[name] = draw(json_values)
    return json.dumps(payload).encode(), {"schema", "oversize"}


@st.composite
def wrong_version(draw, kind):
    payload = valid(kind)
    version = draw(json_values.filter(lambda v: v != 1 or isinstance(v, bool)))
    payload["v"] = version
    return json.dumps(payload).encode(), {"unknown_version"}


@st.composite
def other_device(draw, kind):
    payload = valid(kind)
    payload["device_id"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).filter(lambda i: i != DEVICE))
    return json.dumps(payload).encode(), {"id_mismatch"}


@st.composite
def oversize(draw, kind):
    payload = valid(kind)
    payload["padding"] = "x" * draw(st.integers(MAX_PAYLOAD_BYTES, 3 * MAX_PAYLOAD_BYTES))
    return json.dumps(payload).encode(), {"oversize"}


@st.composite
def garbage(draw, kind):
    data = draw(st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
    try:
        is_object = isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        is_object = False
    if is_object:
        data = b"{" + data  # now certainly not JSON
    return data, {"malformed_json", "schema"}


@st.composite
def non_object(draw, kind):
    value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return json.dumps(value).encode(), {"schema"}


@st.composite
def hostile(draw):
    kind = draw(st.sampled_from(["enroll", "status"]))
    make = draw(st.sampled_from([corrupted_field, unknown_field, wrong_version, other_device, oversize, garbage,
                                 non_object]))
    payload, codes = draw(make(kind))
    return kind, payload, codes


def registry_dump(coordinator) -> list:
    return coordinator.registry._read("SELECT * FROM devices ORDER BY id")


def test_hostile_payloads_leave_the_registry_unchanged_and_the_coordinator_serving(
        tmp_path, mosquitto_broker, synthetic_catalog, fleet_coordinator, raw_clients):
    fleet = fleet_config(tmp_path, "mqtt://unused")
    fleet = replace(fleet, devices=fleet.devices + [replace(DEVICES[0], id=DEVICE, password="pw-fuzz")])
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    device = raw_clients(fleet.broker.url, DEVICE, DEVICE, "pw-fuzz")
    device.connect()
    device.subscribe(topic(DEVICE, "desired"))
    device.subscribe(topic(DEVICE, "error"))
    device.publish(topic(DEVICE, "enroll"), encode(Enroll(DEVICE, "req-0", profile_of(DEVICES[1]))))
    answer = device.next_message()
    assert answer[0] == topic(DEVICE, "desired")
    first = decode_desired(DEVICE, answer[1])
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[1]), first.assignment.variant_id)
    before = registry_dump(coordinator)
    sent = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile())
    def one_payload(case):
        kind, payload, codes = case
        device.publish(topic(DEVICE, kind), payload)
        reply = device.next_message()
        assert reply is not None and reply[0] == topic(DEVICE, "error"), (kind, payload[:200])
        assert decode_error(reply[1]).code in codes, (kind, payload[:200], decode_error(reply[1]))
        assert registry_dump(coordinator) == before
        sent.append(payload)

    one_payload()
    assert len(sent) >= 1000
    rejected = sum(metric(coordinator, "fleet_messages_rejected_total", reason=r) for r in
                   ("oversize", "malformed_json", "unknown_version", "schema", "id_mismatch"))
    assert rejected == len(sent)
    # Still serving: a real enrollment after the storm is answered, durably, within budget.
    device.publish(topic(DEVICE, "enroll"), encode(Enroll(DEVICE, "req-1", profile_of(DEVICES[2]))))
    reply = device.next_message()
    desired = decode_desired(DEVICE, reply[1])
    assert desired.request_id == "req-1"
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[2]), desired.assignment.variant_id)
    assert request_count(coordinator.registry, DEVICE) == 2
