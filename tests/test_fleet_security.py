"""Access control on a real Mosquitto, tamper resistance of delivery, TLS, and the API token."""
from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest

from fleet_helpers import (DEVICES, assert_assignment_ok, device_agents, fleet_config, fleet_coordinator,  # noqa: F401
                           free_port, http, metric, mosquitto_broker, profile_of, raw_clients, synthetic_catalog,
                           _synthetic_catalog_template, tls_cert, wait_until, write_config)

from client.fleet_sim import settled
from restnet.cli import main as fleet_cli
from server.coordinator import Coordinator
from shared.artifacts import BlobStore, sha256_bytes
from shared.errors import ConfigError
from shared.messages import (PUBLISH_OVERHEAD, Enroll, Presence, Profile, Status, decode_desired, decode_error,
                             encode, topic)


def mosquitto_fleet(tmp_path, mosquitto_broker, tls=None, **overrides):
    fleet = fleet_config(tmp_path, "mqtt://unused", **overrides)
    broker = mosquitto_broker(fleet, tls)
    return replace(fleet, broker=replace(fleet.broker, url=broker.url))


def test_anonymous_and_wrong_credentials_are_refused(tmp_path, mosquitto_broker, raw_clients):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker)
    url = fleet.broker.url
    for username, password in [(None, None), ("dev-small", "wrong"), ("intruder", "pw-small"), ("dev-small", None)]:
        reason = raw_clients(url, "x", username, password).connect()
        assert reason is not None and reason.is_failure, (username, password)
    assert not raw_clients(url, "dev-small", "dev-small", "pw-small").connect().is_failure


def test_a_device_can_neither_write_nor_read_another_devices_topics(tmp_path, mosquitto_broker, synthetic_catalog,
                                                                    fleet_coordinator, device_agents, raw_clients):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    victim_cfg, intruder_cfg = DEVICES[1], DEVICES[0]
    victim = device_agents(fleet, victim_cfg)
    assert victim.wait(settled, 20)
    assert_assignment_ok(synthetic_catalog, profile_of(victim_cfg), victim.desired.assignment.variant_id)
    assert wait_until(lambda: coordinator.devices()[0]["state"] == "installed")
    before = coordinator.devices()

    # The intruder even asks for the victim's client id: the broker gives it its own username instead.
    intruder = raw_clients(fleet.broker.url, victim_cfg.id, intruder_cfg.id, intruder_cfg.password)
    assert not intruder.connect().is_failure
    for topic_filter in (topic(victim_cfg.id, "desired"), "fleet/v1/dev/+/desired", "fleet/v1/#",
                         topic(intruder_cfg.id, "desired")):
        intruder.subscribe(topic_filter)
    v = victim_cfg.id
    intruder.publish(topic(v, "enroll"), encode(Enroll(v, "spoof", Profile(1.0, 1.0, None, agent_version="x"))))
    intruder.publish(topic(v, "status"), encode(Status(v, before[0]["assignment_id"], "FAILED", None, "spoofed")))
    intruder.publish(topic(v, "state"), encode(Presence(v, False, 10**9)), retain=True)
    intruder.publish(topic(v, "desired"), b"{}", retain=True)
    # The intruder's own enrollment is answered, and everything it published before had its chance.
    intruder.publish(topic(intruder_cfg.id, "enroll"), encode(Enroll(intruder_cfg.id, "own", profile_of(intruder_cfg))))
    received = []
    while (message := intruder.next_message(timeout=3)) is not None:
        received.append(message)
        own = message[0] == topic(intruder_cfg.id, "desired")
        if own and decode_desired(intruder_cfg.id, message[1]).request_id == "own":
            break
    assert received and all(t == topic(intruder_cfg.id, "desired") for t, _ in received)
    assert_assignment_ok(synthetic_catalog, profile_of(intruder_cfg),
                         decode_desired(intruder_cfg.id, received[-1][1]).assignment.variant_id)
    after = {d["id"]: d for d in coordinator.devices()}
    victim_row = {k: v for k, v in before[0].items() if k != "last_seen"}
    assert {k: v for k, v in after[victim_cfg.id].items() if k != "last_seen"} == victim_row
    assert victim.connected and victim.desired.request_id != "spoof"


def test_a_tampered_block_is_refused_and_the_previous_variant_stays(tmp_path, mosquitto_broker, synthetic_catalog,
                                                                    fleet_coordinator, device_agents):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[0])
    assert agent.wait(settled, 20)
    old_variant = agent.installed.variant_id
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[0]), old_variant)
    current = (agent.device_dir / "current.json").read_bytes()

    bigger = Profile(200.0, 2.0, 10.0, agent_version="test")
    target = "syn.4_4"
    assert_assignment_ok(synthetic_catalog, bigger, target)
    have = {b.sha256 for b in synthetic_catalog.manifest(old_variant).blocks}
    missing = next(b for b in synthetic_catalog.manifest(target).blocks if b.sha256 not in have)
    blob = synthetic_catalog.store.path(missing.sha256)
    original = blob.read_bytes()
    blob.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # one bit, on the server

    agent.update_profile(bigger)
    assert agent.wait(lambda a: a.status == "FAILED", 20)
    assert "does not match its sha256" in agent.failure
    assert (agent.device_dir / "current.json").read_bytes() == current and agent.installed.variant_id == old_variant
    assert not BlobStore(agent.device_dir / "blobs").has(missing.sha256)
    assert not (agent.device_dir / "partial" / missing.sha256).exists()
    assert wait_until(lambda: coordinator.devices()[0]["state"] == "failed")
    assert "sha256" in coordinator.devices()[0]["reason"]

    blob.write_bytes(original)  # the operator repairs the store: the agent's retry succeeds
    assert agent.wait(lambda a: settled(a) and a.installed.variant_id == target, 20)
    assert_assignment_ok(synthetic_catalog, bigger, agent.desired.assignment.variant_id)
    assert sha256_bytes((agent.device_dir / "current.json").read_bytes()) == agent.desired.assignment.manifest_sha256


def test_tls_for_mqtt_and_artifact_http(tmp_path, mosquitto_broker, tls_cert, synthetic_catalog, fleet_coordinator,
                                        device_agents):
    cert, key = tls_cert
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker, tls=(cert, key), http_cert_file=cert, http_key_file=key,
                            http_ca_file=cert)
    fleet = replace(fleet, broker=replace(fleet.broker, ca_file=cert))
    assert fleet.broker.url.startswith("mqtts://")
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    assert coordinator.public_url.startswith("https://")
    agent = device_agents(fleet, DEVICES[2])
    assert agent.wait(settled, 20)
    assert agent.desired.assignment.manifest_url.startswith("https://")
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[2]), agent.installed.variant_id)
    assert http(coordinator.public_url + "/metrics", ca_file=cert)[0] == 200


def test_posts_need_the_api_token_when_one_is_set(tmp_path, mosquitto_broker, synthetic_catalog, fleet_coordinator):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker, api_token="s3cret")
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    url = coordinator.public_url + "/api/fl/report"
    report = json.dumps({"run_id": "r", "round": 0, "variant_id": "syn.1_3", "accuracy": None, "num_updates": 0,
                         "rejected": {}, "update_bytes": 0}).encode()
    assert http(url, report)[0] == 401
    assert http(url, report, {"Authorization": "Bearer wrong"})[0] == 401
    assert http(url, report, {"Authorization": "Bearer s3cret"})[0] == 200
    assert http(coordinator.public_url + "/api/variants/syn.1_3/stitch?accuracy=0.5", b"x")[0] == 401


def test_acl_command_writes_mosquitto_files(tmp_path, capsys):
    config = write_config(tmp_path / "fleet.yaml", fleet_config(tmp_path, "mqtt://127.0.0.1:1883"))
    assert fleet_cli(["acl", "--config", str(config), "--out", str(tmp_path / "acl")]) == 0
    passwd = (tmp_path / "acl" / "passwd").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in passwd) == sorted(["restnet-coordinator"] + [d.id for d in DEVICES])
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in passwd)
    assert "pw-small" not in "".join(passwd)
    assert (tmp_path / "acl" / "passwd").stat().st_mode & 0o077 == 0
    acl = (tmp_path / "acl" / "acl").read_text()
    assert "pattern read fleet/v1/dev/%u/desired" in acl and "pattern write fleet/v1/dev/%u/enroll" in acl
    assert "use_username_as_clientid true" in (tmp_path / "acl" / "mosquitto.conf").read_text()

    no_password = replace(fleet_config(tmp_path, "mqtt://h"), devices=[replace(DEVICES[0], password=None)])
    assert fleet_cli(["acl", "--config", str(write_config(tmp_path / "bad.yaml", no_password)),
                      "--out", str(tmp_path / "bad")]) == 2
    assert "has no password" in capsys.readouterr().err


def test_a_coordinator_with_wrong_credentials_fails_with_a_clear_error(tmp_path, mosquitto_broker, synthetic_catalog):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker)
    wrong = replace(fleet, broker=replace(fleet.broker, password="wrong"), http_port=free_port())
    with pytest.raises(ConfigError, match="refused the coordinator"):
        Coordinator(wrong, synthetic_catalog).start()
    with socket.socket() as s:  # its HTTP port was released
        s.bind(("127.0.0.1", wrong.http_port))


def test_the_broker_drops_a_payload_past_its_limit_before_the_coordinator_sees_it(tmp_path, mosquitto_broker,
                                                                                   synthetic_catalog, raw_clients,
                                                                                   fleet_coordinator):
    fleet = mosquitto_fleet(tmp_path, mosquitto_broker)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    device = DEVICES[0]

    def connected():
        client = raw_clients(fleet.broker.url, device.id, device.id, device.password)
        assert not client.connect().is_failure
        client.subscribe(topic(device.id, "error"))
        return client

    def oversize_replies() -> float:
        return metric(coordinator, "fleet_messages_rejected_total", reason="oversize")

    client = connected()
    client.publish(topic(device.id, "enroll"), b"x" * fleet.broker.max_payload)  # at the limit: delivered...
    assert decode_error(client.next_message(10)[1]).code == "oversize"  # ...and refused by the coordinator
    assert oversize_replies() == 1

    client.client.publish(topic(device.id, "enroll"), b"x" * (fleet.broker.max_payload + PUBLISH_OVERHEAD + 1), qos=1)
    assert wait_until(lambda: not client.client.is_connected(), 10)  # the broker hung up on the sender
    again = connected()
    again.publish(topic(device.id, "enroll"), b"x" * 5000)
    assert decode_error(again.next_message(10)[1]).code == "oversize"
    assert oversize_replies() == 2  # the one past the broker's limit never reached the coordinator
