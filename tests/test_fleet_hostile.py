"""Hostile input at scale: 10,000 generated payloads over every topic a device may write (enroll, status, state,
heartbeat), through a real Mosquitto with the generated ACL, to a live coordinator; and the hand-written cases.

Every generated payload is invalid by construction, and an oracle independent of the coordinator's code says which
error code it must get. For each, the coordinator answers on the device's error topic with that code; the registry
file's bytes (after a WAL checkpoint) stay exactly as they were; and the coordinator serves a real enrollment after
the storm.
"""
from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from dataclasses import replace

import pytest
from fleet_helpers import (DEVICES, _synthetic_catalog_template, assert_assignment_ok, fleet_config,  # noqa: F401
                           fleet_coordinator, metric, mosquitto_broker, profile_of, raw_clients, synthetic_catalog,
                           wait_until)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.messages import (MAX_PAYLOAD_BYTES, Enroll, Heartbeat, Presence, Status, decode_desired, decode_error,
                             encode, topic)

DEVICE = "fuzz-1"
BATCH, BATCHES = 50, 200  # 10,000 payloads
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_INT = 2**53 - 1

finite = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), finite, st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)


def valid(kind: str) -> dict:
    message = {"enroll": Enroll(DEVICE, "req-0", profile_of(DEVICES[1])),
               "status": Status(DEVICE, "assign-0", "INSTALLED", "syn.2_3", None),
               "state": Presence(DEVICE, True, 3), "heartbeat": Heartbeat(DEVICE, 5)}[kind]
    return json.loads(encode(message))


def not_number_in(low: float, high: float):
    """JSON values that are not a number in (low, high]."""
    return st.one_of(st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=2),
                     finite.filter(lambda x: not low < x <= high), st.integers(-2**70, 2**70).filter(
                         lambda x: not low < x <= high))


def not_integer_in(low: int, high: int):
    return st.one_of(st.text(max_size=10), st.booleans(), finite, st.integers(-2**70, 2**70).filter(
        lambda x: not low <= x <= high))


not_token = st.one_of(st.text(max_size=80).filter(lambda s: not TOKEN.fullmatch(s)), st.integers(), st.booleans(),
                      st.lists(st.text(max_size=3), max_size=2))
FIELD_CORRUPTIONS = {  # (path, may be left out) -> values that break the field
    "enroll": {
        (("request_id",), False): not_token,
        (("profile",), False): st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
        (("profile", "memory_mb"), False): not_number_in(0, 1e9),
        (("profile", "compute"), False): not_number_in(0, 1e6),
        (("profile", "latency_ms"), True): not_number_in(0, 1e9).filter(lambda v: v is not None),
        (("profile", "agent_version"), False): not_token,
    },
    "status": {
        (("assignment_id",), False): not_token,
        (("state",), False): json_values.filter(lambda v: v not in ("DOWNLOADING", "VERIFIED", "INSTALLED", "FAILED")),
        (("variant_id",), True): not_token.filter(lambda v: not isinstance(v, str) or len(v) > 128),
        (("reason",), True): st.one_of(st.integers(), st.text(min_size=513, max_size=600), st.just("line\nbreak")),
    },
    "state": {(("online",), False): json_values.filter(lambda v: not isinstance(v, bool)),
              (("seq",), False): not_integer_in(0, MAX_INT)},
    "heartbeat": {(("seq",), False): not_integer_in(0, MAX_INT)},
}
KINDS = tuple(FIELD_CORRUPTIONS)


def dumps(payload: dict) -> bytes:
    return json.dumps(payload).encode()


@st.composite
def corrupted_field(draw, kind):
    payload = valid(kind)
    (path, optional), values = draw(st.sampled_from(sorted(FIELD_CORRUPTIONS[kind].items(), key=str)))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if not optional and draw(st.booleans()):
        del target[path[-1]]  # a required field, missing
    else:
        target[path[-1]] = draw(values)
    return dumps(payload), "schema"


@st.composite
def unknown_field(draw, kind):
    payload = valid(kind)
    where = payload["profile"] if kind == "enroll" and draw(st.booleans()) else payload
    where[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in where and k != "v"))] = draw(json_values)
    return dumps(payload), "schema"


@st.composite
def wrong_version(draw, kind):
    payload = valid(kind)
    payload["v"] = draw(json_values.filter(lambda v: v not in (1, 2) or isinstance(v, (bool, float))))
    integer = isinstance(payload["v"], int) and not isinstance(payload["v"], bool)
    return dumps(payload), "unknown_version" if integer else "schema"


@st.composite
def other_device(draw, kind):
    payload = valid(kind)
    payload["device_id"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).filter(lambda i: i != DEVICE))
    return dumps(payload), "id_mismatch"


@st.composite
def oversize(draw, kind):
    payload = valid(kind)
    payload["padding"] = "x" * draw(st.integers(MAX_PAYLOAD_BYTES, 3 * MAX_PAYLOAD_BYTES))
    return dumps(payload), "oversize"


@st.composite
def not_json(draw, kind):
    """Bytes that are not the protocol's JSON: garbage, a byte-order mark, UTF-16, NaN, a key twice."""
    text = dumps(valid(kind)).decode()
    how = draw(st.sampled_from(["garbage", "bom", "utf16", "constant", "twice"]))
    if how == "garbage":
        data = draw(st.binary(min_size=1, max_size=200))
        try:
            json.loads(data)
            data = b"{" + data  # now certainly not JSON
        except (ValueError, RecursionError):
            pass
        return data, "malformed_json"
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode(), "malformed_json"
    if how == "utf16":
        return text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"]))), "malformed_json"
    if how == "constant":
        field = '"seq": ' if kind in ("state", "heartbeat") else '"v": '
        return text.replace(field + re.search(re.escape(field) + r"(\d+)", text).group(1),
                            field + draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])), 1).encode(), \
            "malformed_json"
    return (text[:-1] + ', "device_id": "' + draw(st.sampled_from([DEVICE, "other"])) + '"}').encode(), \
        "malformed_json"


@st.composite
def non_object(draw, kind):
    return dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))), "schema"


@st.composite
def hostile(draw):
    kind = draw(st.sampled_from(KINDS))
    make = draw(st.sampled_from([corrupted_field, unknown_field, wrong_version, other_device, oversize, not_json,
                                 non_object]))
    payload, code = draw(make(kind))
    return kind, payload, code


def registry_bytes(path) -> bytes:
    """The registry file's bytes once the write-ahead log is folded in."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return open(path, "rb").read()


@pytest.fixture
def hostile_fleet(tmp_path, mosquitto_broker, synthetic_catalog, fleet_coordinator, raw_clients):
    """(fleet, coordinator, the fuzzing device's client): a real Mosquitto with the ACL; the device enrolled once."""
    fleet = fleet_config(tmp_path, "mqtt://unused")
    extra = [replace(DEVICES[0], id=DEVICE, password="pw-fuzz"), replace(DEVICES[0], id="d" * 64, password="pw-long")]
    fleet = replace(fleet, devices=fleet.devices + extra)
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    device = raw_clients(fleet.broker.url, DEVICE, DEVICE, "pw-fuzz")
    assert not device.connect().is_failure
    device.subscribe(topic(DEVICE, "desired"))
    device.subscribe(topic(DEVICE, "error"))
    device.publish(topic(DEVICE, "enroll"), encode(Enroll(DEVICE, "req-0", profile_of(DEVICES[1]))))
    answer = device.next_message()
    assert answer[0] == topic(DEVICE, "desired")
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[1]), decode_desired(DEVICE, answer[1]).assignment.variant_id)
    return fleet, coordinator, device


@pytest.mark.slow
def test_ten_thousand_hostile_payloads_change_nothing_and_the_coordinator_serves(hostile_fleet, synthetic_catalog):
    fleet, coordinator, device = hostile_fleet
    before = registry_bytes(fleet.registry)
    sent = Counter()

    @settings(max_examples=BATCHES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.lists(hostile(), min_size=BATCH, max_size=BATCH))
    def one_batch(batch):
        for kind, payload, _ in batch:
            device.client.publish(topic(DEVICE, kind), payload, qos=1)
        got = []
        for _ in batch:
            reply = device.next_message(10)
            assert reply is not None and reply[0] == topic(DEVICE, "error"), batch
            got.append(decode_error(reply[1]).code)
        assert sorted(got) == sorted(code for _, _, code in batch), batch  # each the code the oracle names
        sent.update(code for _, _, code in batch)

    one_batch()
    assert sum(sent.values()) == BATCH * BATCHES and len(sent) == 5, sent
    assert registry_bytes(fleet.registry) == before  # not one byte of the registry changed
    for code, count in sent.items():
        assert metric(coordinator, "fleet_messages_rejected_total", reason=code) == count
    # Still serving: a real enrollment after the storm is answered, durably, within budget.
    device.publish(topic(DEVICE, "enroll"), encode(Enroll(DEVICE, "req-1", profile_of(DEVICES[2]))))
    desired = decode_desired(DEVICE, device.next_message()[1])
    assert desired.request_id == "req-1"
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[2]), desired.assignment.variant_id)
    assert coordinator.registry.device(DEVICE).request_id == "req-1"


def test_hand_written_hostile_cases(hostile_fleet, raw_clients):
    fleet, coordinator, device = hostile_fleet
    good = dumps(valid("enroll")).decode()
    cases = [
        (good[:-1] + ', "device_id": "dev-small"}', "malformed_json"),  # a key twice: which device is it?
        (good.replace('"compute": 0.5', '"compute": 1e400'), "schema"),
        (good.replace('"compute": 0.5', '"compute": ' + "9" * 300), "schema"),
        ("[" * 2000 + "]" * 2000, "malformed_json"),  # nested past the parser's limit, within the size limit
        (b"\xef\xbb\xbf" + good.encode(), "malformed_json"),
        (good.encode().replace(b"req-0", b"req-\xc3\x28"), "malformed_json"),  # invalid UTF-8
        (good.replace('"v": 1', '"v": true'), "schema"),
        (good.replace('"v": 1', '"v": 1.0'), "schema"),
        (good.replace('"req-0"', '"' + "r" * 65 + '"'), "schema"),  # one past the token limit
        (good.replace('"req-0"', '"' + "r" * 64 + '"'), None),  # at the limit: answered with a desired state
    ]
    before = registry_bytes(fleet.registry)
    for payload, code in cases:
        device.publish(topic(DEVICE, "enroll"), payload if isinstance(payload, bytes) else payload.encode())
        reply = device.next_message(10)
        if code is None:
            assert reply[0] == topic(DEVICE, "desired")
        else:
            assert reply[0] == topic(DEVICE, "error") and decode_error(reply[1]).code == code, payload[:80]
            assert registry_bytes(fleet.registry) == before

    # A device id at the pattern's limit enrolls like any other.
    long_id = "d" * 64
    longest = raw_clients(fleet.broker.url, long_id, long_id, "pw-long")
    assert not longest.connect().is_failure
    longest.subscribe(topic(long_id, "desired"))
    longest.publish(topic(long_id, "enroll"), encode(Enroll(long_id, "r1", profile_of(DEVICES[0]))))
    assert decode_desired(long_id, longest.next_message(10)[1]).request_id == "r1"

    # A retained message on another device's desired topic is refused by the broker's ACL.
    other = raw_clients(fleet.broker.url, "dev-small", "dev-small", "pw-small")
    assert not other.connect().is_failure
    other.publish(topic(DEVICE, "desired"), b'{"v":1,"forged":true}', retain=True)
    device.publish(topic(DEVICE, "enroll"), encode(Enroll(DEVICE, "req-9", profile_of(DEVICES[1]))))
    answer = device.next_message(10)  # the coordinator's answer, and nothing forged before it
    assert answer[0] == topic(DEVICE, "desired") and decode_desired(DEVICE, answer[1]).request_id == "req-9"
    device.subscribe(topic(DEVICE, "desired"))  # subscribing again delivers the retained state: the coordinator's
    assert device.next_message(10)[1] == coordinator.registry.device(DEVICE).desired
    assert device.next_message(1) is None
