"""Signed instructions: the chain a device checks (trusted key -> signed desired state -> manifest sha256 -> block
sha256), with a real broker anyone may publish on (the embedded one has no ACL: a misconfigured broker) and a
man in the middle on the artifacts' plain HTTP."""
from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_helpers import (COORDINATOR_PASSWORD, COORDINATOR_USER, DEVICES,  # noqa: F401
                           _synthetic_catalog_template, assert_assignment_ok, device_agents, embedded_broker_url,
                           fleet_config, fleet_coordinator, http_servers, mosquitto_broker, profile_of, raw_clients,
                           reply, synthetic_catalog, wait_until)

from client.download import install
from client.fleet_sim import settled
from server.registry import open_registry
from shared.errors import IntegrityError
from shared.messages import Assignment, Desired, Refusal, decode_desired, encode, topic
from shared.signing import SignatureError, Signer, Verifier, canonical, generate_key, load_signer, load_verifier
from shared.vocabulary import request_sequence


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: `old` and `new` -> (private path, public path)."""
    made = {}
    for name in ("old", "new", "stranger"):
        generate_key(tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub")
        made[name] = (str(tmp_path / "keys" / f"{name}.key"), str(tmp_path / "keys" / f"{name}.pub"))
    return made


def desired(version=1, device="dev-small") -> Desired:
    return Desired(device, version, "a1", "r1", None, Refusal("nothing fits", {"variant_id": None}))


# ---- the signature itself -------------------------------------------------------------------------------------

def test_a_signed_desired_state_verifies_and_anything_else_is_refused(keys):
    signer, trusted = load_signer(keys["old"][0]), load_verifier([keys["old"][1]])
    payload = encode(desired(), signer)
    assert decode_desired("dev-small", payload, trusted) == desired()
    assert decode_desired("dev-small", payload) == desired()  # a device without keys ignores signatures

    data = json.loads(payload)
    forged = {**data, "version": 9}  # content changed after signing
    unsigned = {k: v for k, v in data.items() if k not in ("key_id", "sig")}
    other = load_signer(keys["stranger"][0]).sign_object(unsigned)
    broken = {**data, "sig": "not base64!"}
    for bad, why in [(forged, "does not match"), (unsigned, "not signed"), (other, "does not trust"),
                     (broken, "does not match")]:
        with pytest.raises(SignatureError, match=why):
            decode_desired("dev-small", json.dumps(bad).encode(), trusted)
    # During a rotation a device trusts both keys.
    both = load_verifier([keys["old"][1], keys["new"][1]])
    for name in ("old", "new"):
        assert decode_desired("dev-small", encode(desired(), load_signer(keys[name][0])), both) == desired()


def test_the_canonical_form_is_independent_of_member_order():
    assert canonical({"b": 1, "a": [1.5, "é"]}) == b'{"a":[1.5,"\\u00e9"],"b":1}'


def test_the_documented_vector_of_a_signed_desired_state():
    """docs/PROTOCOL.md, "Signatures": a fixed test key (Ed25519 signatures are deterministic), the payload on the
    wire, the canonical bytes the signature covers, and how canonical JSON writes numbers and non-ASCII text."""
    signer = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))  # a published test key: never use it
    state = Desired("dev-tiny", 1, "0123456789abcdef", "a1", None,
                    Refusal("no variant fits", {"variant_id": "syn.1_3", "memory_mb": 14.4, "compute": None}))
    wire = encode(state, signer)
    assert signer.key_id == "56475aa75463474c"
    assert wire == (b'{"v":1,"device_id":"dev-tiny","version":1,"assignment_id":"0123456789abcdef","request_id":"a1",'
                    b'"assignment":null,"refusal":{"message":"no variant fits","smallest":{"variant_id":"syn.1_3",'
                    b'"memory_mb":14.4,"compute":null}},"key_id":"56475aa75463474c","sig":"JY9FqAi1Vk6veIHjLd5orT8l'
                    b'Ou/oT3vhbqEpHoSUkXxmv6exmkkqkANB0wJRzquVaAkViLJ8FOiNqOvINET0Dw=="}')
    public = signer.private.public_key()
    assert public.public_bytes_raw().hex() == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert decode_desired("dev-tiny", wire, Verifier({signer.key_id: public})) == state
    signed = {k: v for k, v in json.loads(wire).items() if k not in ("key_id", "sig")}
    assert canonical(signed) == (b'{"assignment":null,"assignment_id":"0123456789abcdef","device_id":"dev-tiny",'
                                 b'"refusal":{"message":"no variant fits","smallest":{"compute":null,"memory_mb":14.4,'
                                 b'"variant_id":"syn.1_3"}},"request_id":"a1","v":1,"version":1}')
    assert canonical({"x": [50.0, 1e-05, 1e16, 2**53 - 1, -0.0, "\u2028\U0001F600"]}) == \
        b'{"x":[50.0,1e-05,1e+16,9007199254740991,-0.0,"\\u2028\\ud83d\\ude00"]}'


# ---- on a running fleet ---------------------------------------------------------------------------------------

def signed_fleet(tmp_path, url, keys, signing="old", trusted=("old",)):
    return fleet_config(tmp_path, url, signing_key=keys[signing][0], trusted_keys=[keys[k][1] for k in trusted])


def test_devices_refuse_instructions_the_coordinator_did_not_sign(tmp_path, embedded_broker_url, keys,
                                                                  synthetic_catalog, fleet_coordinator,
                                                                  device_agents, raw_clients):
    fleet = signed_fleet(tmp_path, embedded_broker_url, keys)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    device = DEVICES[1]
    agent = device_agents(fleet, device)
    assert agent.wait(settled, 60)
    installed = agent.installed
    genuine = agent.desired
    assert_assignment_ok(synthetic_catalog, profile_of(device), genuine.assignment.variant_id)
    signature = json.loads((synthetic_catalog.root / f"manifests/{installed.variant_id}/v1.json.sig").read_text())
    assert signature["key_id"] == load_signer(keys["old"][0]).key_id  # the manifest is signed too

    # An intruder on a broker without ACL replaces the retained desired state: unsigned, then signed by a stranger,
    # each time pointing the device at the smallest variant (which it would happily download: it fits).
    target = min(synthetic_catalog.variants, key=lambda r: r.memory_bytes)
    manifest = synthetic_catalog.manifest(target.id)
    assignment = Assignment(target.id, 1, f"{coordinator.public_url}/manifests/{target.id}/v1.json",
                            manifest.sha256, manifest.total_bytes)
    evil = Desired(device.id, genuine.version + 1, "evil", None, assignment, None)
    intruder = raw_clients(fleet.broker.url, "intruder")
    assert not intruder.connect().is_failure
    for payload, why in [(encode(evil), "not signed"), (encode(evil, load_signer(keys["stranger"][0])), "not trust")]:
        intruder.publish(topic(device.id, "desired"), payload, retain=True)
        assert wait_until(lambda: agent.failure is not None and why in agent.failure, 30)
        row = coordinator.registry.device(device.id)
        assert wait_until(lambda: why in (coordinator.registry.device(device.id).reason or ""), 30)
        assert coordinator.registry.device(device.id).state == "failed"  # reported against the genuine assignment
        assert agent.installed.sha256 == installed.sha256 and agent.desired == genuine  # nothing else changed
        agent.failure = None
    assert row.assignment_id == genuine.assignment_id


def test_an_older_state_replayed_is_refused_even_after_a_restart(tmp_path, mosquitto_broker, keys, synthetic_catalog,
                                                                  fleet_coordinator, device_agents, raw_clients):
    """Signatures do not expire: v1, which the coordinator really signed, put back as the retained state after v2
    (by whoever can publish it) must not take a restarted device back."""
    fleet = fleet_config(tmp_path, "mqtt://unused", signing_key=keys["old"][0], trusted_keys=[keys["old"][1]])
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    device = DEVICES[1]
    agent = device_agents(fleet, device)
    assert agent.wait(settled, 60)
    first = agent.desired
    signed_v1 = coordinator.registry.device(device.id).desired  # exactly what was published, signature included
    assert json.loads(signed_v1)["version"] == first.version and "sig" in json.loads(signed_v1)
    agent.update_profile(profile_of(DEVICES[2]))  # a larger budget: another variant, the next version
    assert request_sequence(agent.request_id) == request_sequence(first.request_id) + 1  # ordered request ids
    assert agent.wait(lambda a: settled(a) and a.desired.version > first.version, 60)
    assert agent.installed.variant_id != first.assignment.variant_id
    upgraded = agent.installed.sha256
    agent.stop()
    coordinator.stop()  # nobody answers the restarted agent: only the replay reaches it

    replayer = raw_clients(fleet.broker.url, "replayer", COORDINATOR_USER, COORDINATOR_PASSWORD)
    assert not replayer.connect().is_failure
    replayer.publish(topic(device.id, "desired"), signed_v1, retain=True)
    again = device_agents(fleet, device)
    assert wait_until(lambda: again.failure is not None and "already followed" in again.failure, 30)
    assert again.desired is None and again.installed.sha256 == upgraded
    assert request_sequence(again.request_id) == request_sequence(first.request_id) + 2  # counted on across restarts


class Tamper(BaseHTTPRequestHandler):
    """A man in the middle on plain HTTP: forwards to the coordinator, changing what `change` says."""

    upstream = ""
    change = staticmethod(lambda path, body: body)

    def do_GET(self):
        with urllib.request.urlopen(self.upstream + self.path, timeout=10) as resp:
            reply(self, self.change(self.path, resp.read()))

    def log_message(self, *args):
        pass


@pytest.fixture
def middleman(http_servers):
    return lambda upstream, change: http_servers(type("Handler", (Tamper,), {"upstream": upstream,
                                                                            "change": staticmethod(change)}))


def test_a_manifest_changed_in_transit_is_refused(tmp_path, embedded_broker_url, synthetic_catalog, keys,
                                                 fleet_coordinator, middleman):
    """Each check of the chain on its own: the sha256 that the (signed) desired state pins, the manifest's own
    signature, and the variant and version the manifest names."""
    coordinator = fleet_coordinator(signed_fleet(tmp_path, embedded_broker_url, keys), synthetic_catalog)
    upstream = coordinator.public_url
    target, other = synthetic_catalog.variants[0], synthetic_catalog.variants[1]
    genuine = synthetic_catalog.manifest(target.id)

    def assignment(base: str, variant=target, manifest=genuine) -> Assignment:
        return Assignment(target.id, 1, f"{base}/manifests/{variant.id}/v1.json", manifest.sha256,
                          manifest.total_bytes)

    def swap_block(path, body):
        if not path.endswith(".json"):
            return body
        d = json.loads(body)
        d["blocks"][0]["sha256"] = "0" * 64  # a block pointed at other bytes
        return json.dumps(d, sort_keys=True, indent=1).encode()

    with pytest.raises(IntegrityError, match="does not match the sha256 in the assignment"):
        install(assignment(middleman(upstream, swap_block)), tmp_path / "dev-a")  # no keys: the sha256 alone

    stranger = load_signer(keys["stranger"][0])
    resigned = middleman(upstream, lambda path, body: json.dumps(stranger.sign(genuine.to_bytes())).encode()
                         if path.endswith(".sig") else body)
    with pytest.raises(SignatureError, match="does not trust"):
        install(assignment(resigned), tmp_path / "dev-b", trusted=load_verifier([keys["old"][1]]))
    trusting_both = load_verifier([keys["stranger"][1], keys["old"][1]])
    assert install(assignment(resigned), tmp_path / "dev-c", trusted=trusting_both).sha256 == genuine.sha256

    crossed = assignment(upstream, other, synthetic_catalog.manifest(other.id))  # a coordinator bug, say
    with pytest.raises(IntegrityError, match=f"manifest is {other.id} v1, assigned {target.id} v1"):
        install(crossed, tmp_path / "dev-d")
    for d in ("dev-a", "dev-b", "dev-d"):
        assert not (tmp_path / d / "current.json").exists()  # nothing was installed


def test_a_key_rotation_keeps_every_device_served(tmp_path, embedded_broker_url, keys, synthetic_catalog,
                                                  fleet_coordinator, device_agents):
    fleet = signed_fleet(tmp_path, embedded_broker_url, keys, "old", ("old", "new"))
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[1])
    assert agent.wait(settled, 60)
    before = coordinator.registry.device(DEVICES[1].id)
    coordinator.stop()

    rotated = replace(fleet, signing_key=keys["new"][0])
    fleet_coordinator(rotated, synthetic_catalog)  # on start: every stored desired state signed again
    new_id = load_signer(keys["new"][0]).key_id
    row = open_registry(fleet.registry).device(DEVICES[1].id)
    assert json.loads(row.desired)["key_id"] == new_id and row.version == before.version  # same instruction
    sig = json.loads((synthetic_catalog.root / f"manifests/{row.variant_id}/v1.json.sig").read_text())
    assert sig["key_id"] == new_id
    agent.stop()
    # A device that now trusts only the new key takes the retained (re-signed) state and stays installed.
    only_new = device_agents(replace(fleet, trusted_keys=[keys["new"][1]]), DEVICES[1])
    assert only_new.wait(settled, 60) and only_new.failure is None
    assert only_new.installed.sha256 == agent.installed.sha256
