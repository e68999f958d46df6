"""Message schemas: round trips, topics, and every rejection code with what it carries back."""
from __future__ import annotations

import json

import pytest

from shared.messages import (MAX_PAYLOAD_BYTES, Assignment, Desired, Enroll, ErrorReply, Heartbeat, MessageError,
                             Presence, Profile, Refusal, Status, decode, decode_desired, decode_error, encode,
                             parse_topic, topic)

SHA = "a" * 64


def enroll_dict(**over) -> dict:
    d = {"v": 1, "device_id": "dev-1", "request_id": "r1",
         "profile": {"memory_mb": 64.0, "compute": 1.5, "latency_ms": None, "agent_version": "0.1.0"}}
    d.update(over)
    return d


def rejected(kind: str, payload, device_id: str = "dev-1") -> MessageError:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(MessageError) as info:
        decode(kind, device_id, data)
    return info.value


def test_round_trips():
    msgs = {
        "enroll": Enroll("dev-1", "r1", Profile(64.0, 1.5, 20.0, agent_version="0.1.0")),
        "status": Status("dev-1", "abc", "FAILED", "v.1_2", "hash mismatch"),
        "state": Presence("dev-1", True, 7),
        "heartbeat": Heartbeat("dev-1", 3),
    }
    for kind, msg in msgs.items():
        assert decode(kind, "dev-1", encode(msg)) == msg
    assignment = Assignment("v.1_2", 3, "http://h/manifests/v.1_2/v3.json", SHA, 10)
    desired = Desired("dev-1", 2, "abc", "r1", assignment, None)
    assert decode_desired("dev-1", encode(desired)) == desired
    refusal = Desired("dev-1", 1, "abc", "r1", None, Refusal("too small", {"variant_id": "v", "memory_mb": 9.6,
                                                                             "compute": None}))
    assert decode_desired("dev-1", encode(refusal)) == refusal
    error = ErrorReply("schema", "enroll: field 'request_id' is required", "r1")
    assert decode_error(encode(error)) == error


def test_topics_bind_one_device_level():
    assert topic("dev-1", "enroll") == "fleet/v1/dev/dev-1/enroll"
    assert parse_topic("fleet/v1/dev/dev-1/status") == ("dev-1", "status")
    for bad in ("fleet/v1/dev/a/b/enroll", "fleet/v2/dev/x/enroll", "fleet/v1/dev/x/other", "fleet/v1/dev/ /enroll",
                "fleet/v1/dev/" + "x" * 65 + "/enroll"):
        with pytest.raises(MessageError) as info:
            parse_topic(bad)
        assert info.value.code == "bad_topic"
    for bad_id in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            topic(bad_id, "enroll")


def test_oversize_rejected_before_parsing():
    assert rejected("enroll", b"{" * (MAX_PAYLOAD_BYTES + 1)).code == "oversize"


@pytest.mark.parametrize("payload", [b"", b"not json", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"v": 1,'])
def test_malformed_json(payload):
    assert rejected("enroll", payload).code in ("malformed_json", "oversize")


def test_unknown_version_keeps_request_id_for_the_reply():
    err = rejected("enroll", enroll_dict(v=3))  # 1 and 2 are spoken (2: ladders)
    assert (err.code, err.request_id) == ("unknown_version", "r1")
    for not_an_integer in (True, 1.0, "1", None):  # the version is the JSON integer 1, nothing that equals it
        err = rejected("enroll", enroll_dict(v=not_an_integer))
        assert (err.code, err.request_id) == ("schema", "r1")
    assert rejected("enroll", {k: v for k, v in enroll_dict().items() if k != "v"}).code == "schema"


def raw(text: str) -> bytes:
    """An enroll payload written by hand (json.dumps could not write most of these)."""
    return text.encode()


GOOD = json.dumps(enroll_dict())


@pytest.mark.parametrize("payload, code", [
    # one object, keys once: a first-wins reader downstream would see another device id than we validated
    (raw(GOOD[:-1] + ', "device_id": "dev-2"}'), "malformed_json"),
    (raw(GOOD.replace('"compute": 1.5', '"compute": 1.5, "compute": 1.5')), "malformed_json"),
    # UTF-8 only, and no byte-order mark
    (b"\xef\xbb\xbf" + raw(GOOD), "malformed_json"),
    (GOOD.encode("utf-16"), "malformed_json"),
    (GOOD.encode("utf-16-le"), "malformed_json"),
    (raw(GOOD).replace(b"dev-1", b"dev-\xff"), "malformed_json"),
    # NaN and Infinity are not JSON; a number past the double range is not in range
    (raw(GOOD.replace('"compute": 1.5', '"compute": NaN')), "malformed_json"),
    (raw(GOOD.replace('"compute": 1.5', '"compute": -Infinity')), "malformed_json"),
    (raw(GOOD.replace('"compute": 1.5', '"compute": 1e400')), "schema"),
    (raw(GOOD.replace('"compute": 1.5', '"compute": ' + "9" * 400)), "schema"),  # an int too large for a float
    (raw("[" * 3000 + "]" * 1000), "malformed_json"),  # deep nesting (within the size limit)
    (raw('{"v": 1, "device_id": "dev-1", "request_id": "r1", "profile": ' + "[" * 1900 + "]" * 1900 + "}"),
     "malformed_json"),
])
def test_hostile_json_gets_the_code_the_protocol_names(payload, code):
    assert rejected("enroll", payload).code == code


def test_one_number_rule():
    """Integer fields take JSON integers only (no fraction, no exponent); number fields take any finite number."""
    def state(seq):
        return raw('{"v": 1, "device_id": "dev-1", "online": true, "seq": %s}' % seq)

    assert decode("state", "dev-1", state("7")).seq == 7
    for not_an_integer in ("7.0", "1e6", "true", '"7"'):
        assert rejected("state", state(not_an_integer)).code == "schema"
    assert decode("state", "dev-1", state(str(2**53 - 1))).seq == 2**53 - 1
    assert rejected("state", state(str(2**53))).code == "schema"  # integers stay below 2^53
    for number in ("64", "64.0", "6.4e1"):
        assert decode("enroll", "dev-1", raw(GOOD.replace("64.0", number))).profile.memory_mb == 64.0


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("request_id"),
    lambda d: d.update(extra=1),
    lambda d: d["profile"].update(extra=1),
    lambda d: d["profile"].update(v=1),
    lambda d: d["profile"].update(memory_mb=True),
    lambda d: d["profile"].update(memory_mb=-1),
    lambda d: d["profile"].update(memory_mb="64"),
    lambda d: d["profile"].update(compute=0),
    lambda d: d["profile"].update(compute=1e300),
    lambda d: d["profile"].update(latency_ms=-5),
    lambda d: d["profile"].pop("agent_version"),
    lambda d: d.update(request_id="r" * 65),
    lambda d: d.update(request_id="has space"),
    lambda d: d.update(request_id=7),
    lambda d: d.update(profile=[1, 2]),
    lambda d: d.update(device_id="a/b"),
])
def test_schema_violations(mutate):
    d = enroll_dict()
    mutate(d)
    assert rejected("enroll", d).code == "schema"


def test_device_id_must_match_topic():
    err = rejected("enroll", enroll_dict(device_id="dev-2"))
    assert (err.code, err.request_id) == ("id_mismatch", "r1")
    assert rejected("status", json.loads(encode(Status("dev-2", "a", "INSTALLED")))).code == "id_mismatch"


def test_status_presence_heartbeat_fields():
    assert rejected("status", {"v": 1, "device_id": "dev-1", "assignment_id": "a", "state": "DONE"}).code == "schema"
    assert rejected("state", {"v": 1, "device_id": "dev-1", "online": 1, "seq": 0}).code == "schema"
    assert rejected("heartbeat", {"v": 1, "device_id": "dev-1", "seq": -1}).code == "schema"
    assert rejected("heartbeat", {"v": 1, "device_id": "dev-1", "seq": 2**60}).code == "schema"


def test_devices_cannot_send_coordinator_kinds():
    assert rejected("desired", {"v": 1}).code == "bad_topic"


def test_desired_needs_exactly_one_outcome():
    base = {"v": 1, "device_id": "dev-1", "version": 1, "assignment_id": "a", "request_id": None}
    with pytest.raises(MessageError):
        decode_desired("dev-1", json.dumps({**base, "assignment": None, "refusal": None}).encode())
    with pytest.raises(MessageError) as info:
        decode_desired("dev-2", encode(Desired("dev-1", 1, "a", None, None, Refusal("no", {}))))
    assert info.value.code == "id_mismatch"
