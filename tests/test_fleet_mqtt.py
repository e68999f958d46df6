"""The fleet end to end over real brokers: Mosquitto (password file + ACL) and the embedded rumqttd."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fleet_helpers import (DEVICES, _synthetic_catalog_template, assert_assignment_ok, broker_fleet,  # noqa: F401
                           device_agents, embedded_broker_url, fleet_config, fleet_coordinator, free_port, http,
                           metric, mosquitto_broker, profile_of, raw_clients, registry_url, request_count,
                           synthetic_catalog, wait_until, write_config)

from client.download import fetch_blob
from client.fleet_sim import settled, wait_settled
from shared.artifacts import BlobStore, Manifest, bytes_to_tensors, sha256_bytes, tensors_to_bytes
from shared.catalog import Catalog
from shared.errors import IntegrityError
from shared.messages import Enroll, Profile, decode_desired, encode, topic
from shared.variants import load_variant


def blob_requests(coordinator) -> float:
    return metric(coordinator, "fleet_artifact_requests_total", kind="blob", code="200")


def test_three_budgets_each_get_their_best_variant_installed(broker_fleet, synthetic_catalog, fleet_coordinator,
                                                              device_agents):
    coordinator = fleet_coordinator(broker_fleet, synthetic_catalog)
    agents = [device_agents(broker_fleet, d) for d in DEVICES]
    assert not wait_settled(agents, 20)
    assigned = set()
    for agent, device in zip(agents, DEVICES):
        a = agent.desired.assignment
        assert_assignment_ok(synthetic_catalog, profile_of(device), a.variant_id)
        assigned.add(a.variant_id)
        current = (agent.device_dir / "current.json").read_bytes()
        assert sha256_bytes(current) == a.manifest_sha256
        store = BlobStore(agent.device_dir / "blobs")
        for block in Manifest.from_bytes(current).blocks:
            store.read(block.sha256)  # raises unless the bytes hash to their name
    assert assigned == {v.id for v in synthetic_catalog.variants}  # three budgets, three different variants
    assert wait_until(lambda: [d["state"] for d in coordinator.devices()] == ["installed"] * 3)
    # What the Flower ClientApp does with an installed device folder:
    folder = agents[0].device_dir
    model = load_variant(Manifest.from_bytes((folder / "current.json").read_bytes()), BlobStore(folder / "blobs"))
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    assert metric(coordinator, "fleet_enrollments_total", result="assigned") == 3
    assert metric(coordinator, "fleet_devices", state="installed") == 3
    assert metric(coordinator, "fleet_assignment_duration_seconds_count") == 3
    assert metric(coordinator, "fleet_artifact_bytes_sent_total") > 0
    status, body, _ = http(coordinator.public_url + "/metrics")
    assert status == 200 and b'fleet_devices_presence{presence="online"} 3.0' in body


def test_the_same_enrollment_twice_gives_the_same_answer_and_one_row(broker_fleet, synthetic_catalog,
                                                                     fleet_coordinator, raw_clients):
    coordinator = fleet_coordinator(broker_fleet, synthetic_catalog)
    device = DEVICES[1]
    client = raw_clients(broker_fleet.broker.url, device.id, device.id, device.password)
    assert not client.connect().is_failure
    client.subscribe(topic(device.id, "desired"))
    enroll = encode(Enroll(device.id, "req-1", profile_of(device)))
    answers = []
    for _ in range(2):
        client.publish(topic(device.id, "enroll"), enroll)
        answers.append(client.next_message())
    assert answers[0] == answers[1] and answers[0][0] == topic(device.id, "desired")
    desired = decode_desired(device.id, answers[0][1])
    assert desired.request_id == "req-1" and desired.version == 1
    assert_assignment_ok(synthetic_catalog, profile_of(device), desired.assignment.variant_id)
    assert len(coordinator.devices()) == 1 and request_count(coordinator.registry, device.id) == 1
    assert metric(coordinator, "fleet_enrollments_total", result="duplicate") == 1


def test_a_budget_change_reassigns_and_fetches_only_missing_blocks(broker_fleet, synthetic_catalog,
                                                                   fleet_coordinator, device_agents):
    coordinator = fleet_coordinator(broker_fleet, synthetic_catalog)
    device = DEVICES[0]
    agent = device_agents(broker_fleet, device)
    assert agent.wait(settled, 20)
    first = agent.desired
    assert_assignment_ok(synthetic_catalog, profile_of(device), first.assignment.variant_id)
    before = blob_requests(coordinator)

    bigger = Profile(200.0, 2.0, 10.0, agent_version="test")
    agent.update_profile(bigger)
    assert agent.wait(settled, 20)
    second = agent.desired
    assert_assignment_ok(synthetic_catalog, bigger, second.assignment.variant_id)
    assert second.assignment.variant_id != first.assignment.variant_id and second.version == first.version + 1
    old = {b.sha256 for b in synthetic_catalog.manifest(first.assignment.variant_id).blocks}
    new = {b.sha256 for b in synthetic_catalog.manifest(second.assignment.variant_id).blocks}
    assert blob_requests(coordinator) - before == len(new - old) > 0

    agent.update_profile(Profile(210.0, 2.0, 10.0, agent_version="test"))  # a new budget with the same best variant
    assert agent.wait(settled, 20)
    assert agent.desired.version == second.version and agent.desired.assignment == second.assignment
    assert metric(coordinator, "fleet_enrollments_total", result="unchanged") == 1
    assert len(coordinator.devices()) == 1


def test_a_budget_below_every_variant_is_refused_with_the_smallest_needs(broker_fleet, synthetic_catalog,
                                                                          fleet_coordinator, device_agents):
    coordinator = fleet_coordinator(broker_fleet, synthetic_catalog)
    tiny = replace(DEVICES[0], memory_mb=10.0)
    agent = device_agents(broker_fleet, tiny)
    assert agent.wait(settled, 20)
    refusal = agent.desired.refusal
    assert agent.desired.assignment is None and refusal is not None
    assert_assignment_ok(synthetic_catalog, profile_of(tiny), None)
    assert refusal.smallest["variant_id"] == "syn.1_3" and refusal.smallest["memory_mb"] == 14.4
    assert "syn.1_3" in refusal.message and "14.4 MiB" in refusal.message and "10.0 MiB" in refusal.message
    assert not (agent.device_dir / "current.json").exists()
    assert coordinator.devices()[0]["state"] == "refused"
    assert metric(coordinator, "fleet_enrollments_total", result="refused") == 1


def test_presence_follows_last_will_and_heartbeats(broker_fleet, synthetic_catalog, fleet_coordinator,
                                                   device_agents):
    fleet = replace(broker_fleet, stale_after_s=3.0)  # ten heartbeats: a loaded machine may delay a few
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[1], heartbeat_s=0.3)
    assert agent.wait(settled, 20)
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[1]), agent.desired.assignment.variant_id)

    def presence():
        return coordinator.devices()[0]["presence"]

    def last_seen():
        return coordinator.devices()[0]["last_seen"] or 0.0

    assert wait_until(lambda: presence() == "online")
    first = last_seen()
    # Heartbeats keep it fresh: seen again and again for longer than the stale limit, and online all along.
    assert wait_until(lambda: presence() == "online" and last_seen() > first + fleet.stale_after_s, 20)
    agent.heartbeat_s = 3600  # the device goes quiet but stays connected
    assert wait_until(lambda: presence() == "stale", 10)
    agent.client.loop_stop()  # ...then dies without a goodbye: the broker publishes its last will
    agent.client.socket().close()
    assert wait_until(lambda: presence() == "offline", 10)
    assert metric(coordinator, "fleet_devices_presence", presence="offline") == 1


@pytest.fixture
def standalone_broker():
    """An embedded rumqttd the test (not the coordinator) starts and stops."""
    from iotcore import Broker

    broker = Broker(port=free_port(), listen="127.0.0.1").start()
    yield broker
    broker.stop()


def test_agent_and_coordinator_recover_from_broker_loss(tmp_path, synthetic_catalog, standalone_broker,
                                                        fleet_coordinator, device_agents, raw_clients):
    fleet = fleet_config(tmp_path, f"mqtt://127.0.0.1:{standalone_broker.port}")
    fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[0])
    assert agent.wait(settled, 20)
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[0]), agent.desired.assignment.variant_id)
    standalone_broker.stop()  # the broker dies, and its retained messages with it
    assert agent.wait(lambda a: not a.connected, 10)
    assert wait_until(lambda: _restart(standalone_broker), 10)
    assert agent.wait(lambda a: a.connected, 20)
    # The coordinator republishes the desired states the broker lost: a newcomer reads it retained.
    observer = raw_clients(fleet.broker.url, "observer")
    observer.connect()
    observer.subscribe(topic(DEVICES[0].id, "desired"))
    message = observer.next_message(timeout=20)
    assert message is not None and decode_desired(DEVICES[0].id, message[1]) == agent.desired
    bigger = Profile(200.0, 2.0, 10.0, agent_version="test")
    agent.update_profile(bigger)
    assert agent.wait(settled, 30)
    assert_assignment_ok(synthetic_catalog, bigger, agent.desired.assignment.variant_id)


def _restart(broker) -> bool:
    try:
        broker.start()
        return True
    except OSError:  # the old listener's port is not free yet
        return False


def test_aggregated_stitch_becomes_a_new_version_that_only_moves_the_stitch(tmp_path, embedded_broker_url,
                                                                           registry_url, synthetic_catalog,
                                                                           fleet_coordinator, device_agents):
    fleet = fleet_config(tmp_path, embedded_broker_url, registry=registry_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[1])
    assert agent.wait(settled, 20)
    vid = agent.desired.assignment.variant_id
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[1]), vid)
    old = synthetic_catalog.manifest(vid)
    stitch = bytes_to_tensors(synthetic_catalog.store.read(old.stitch_block().sha256))
    url = f"{coordinator.public_url}/api/variants/{vid}/stitch"

    bad_shape = {k: torch.zeros(3) for k in stitch}
    nan = {k: torch.full_like(v, float("nan")) for k, v in stitch.items()}
    for target, body, code in [(url + "?accuracy=0.5&base_version=1", tensors_to_bytes(bad_shape), 400),
                               (url + "?accuracy=0.5&base_version=1", tensors_to_bytes(nan), 400),
                               (url + "?accuracy=0.5&base_version=1", b"not safetensors", 400),
                               (url + "?accuracy=1.5&base_version=1", tensors_to_bytes(stitch), 400),
                               (url + "?base_version=1", tensors_to_bytes(stitch), 400),
                               (url + "?accuracy=0.5", tensors_to_bytes(stitch), 400),
                               (url + "?accuracy=0.5&base_version=0", tensors_to_bytes(stitch), 409),
                               (url.replace(vid, "no-such-variant") + "?accuracy=0.5&base_version=1",
                                tensors_to_bytes(stitch), 404)]:
        status, reply, _ = http(target, body)
        assert status == code and "error" in json.loads(reply)
    assert synthetic_catalog.get(vid).version == 1

    before = blob_requests(coordinator)
    trained = {k: v + 0.01 for k, v in stitch.items()}
    status, reply, _ = http(url + "?accuracy=0.85&base_version=1", tensors_to_bytes(trained))
    assert status == 200, reply
    answer = json.loads(reply)
    assert answer["version"] == 2 and answer["devices"] == 1
    assert agent.wait(lambda a: settled(a) and a.installed.version == 2, 20)
    assert blob_requests(coordinator) - before == 1  # the stitch block alone travelled
    assert agent.installed.sha256 == answer["manifest_sha256"]
    assert_assignment_ok(synthetic_catalog, profile_of(DEVICES[1]), agent.desired.assignment.variant_id)
    folder = agent.device_dir
    model = load_variant(Manifest.from_bytes((folder / "current.json").read_bytes()), BlobStore(folder / "blobs"))
    assert torch.equal(model.stitch_state()[next(iter(trained))], trained[next(iter(trained))])
    _, catalog_json, _ = http(coordinator.public_url + "/api/catalog")
    record = next(v for v in json.loads(catalog_json)["variants"] if v["id"] == vid)
    assert record["version"] == 2 and record["accuracy"] == 0.85
    assert metric(coordinator, "fleet_variant_accuracy", variant=vid) == 0.85
    assert metric(coordinator, "fleet_stitch_updates_total") == 1
    status, reply, _ = http(url + "?accuracy=0.9&base_version=1", tensors_to_bytes(stitch))  # made from v1: stale
    assert status == 409 and "at version 2" in json.loads(reply)["error"]


def test_a_version_another_writer_publishes_reaches_the_devices(tmp_path, embedded_broker_url, registry_url,
                                                                synthetic_catalog, fleet_coordinator, device_agents):
    fleet = fleet_config(tmp_path, embedded_broker_url, registry=registry_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = device_agents(fleet, DEVICES[1])
    assert agent.wait(settled, 20)
    vid = agent.desired.assignment.variant_id
    other = Catalog.load(synthetic_catalog.root)  # `restnet stitch-train --save` on the catalog the coordinator serves
    old = other.manifest(vid)
    stitch = {k: v + 0.01 for k, v in bytes_to_tensors(other.store.read(old.stitch_block().sha256)).items()}
    new = other.publish_stitch(vid, stitch, 0.88, base_version=1)
    assert agent.wait(lambda a: settled(a) and a.installed.version == 2, 20)
    assert agent.installed.sha256 == new.sha256
    assert metric(coordinator, "fleet_variant_accuracy", variant=vid) == 0.88


def test_every_request_gets_a_status_even_when_the_coordinator_fails(tmp_path, embedded_broker_url,
                                                                    synthetic_catalog, fleet_coordinator, monkeypatch):
    coordinator = fleet_coordinator(fleet_config(tmp_path, embedded_broker_url), synthetic_catalog)

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(coordinator.registry, "snapshot", broken)
    status, body, _ = http(coordinator.public_url + "/api/devices")
    assert status == 500 and json.loads(body) == {"error": "internal error"}  # not a connection closed silently
    assert http(coordinator.public_url + "/api/catalog")[0] == 200  # and the server goes on


def test_fl_reports_feed_metrics_once(tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator):
    coordinator = fleet_coordinator(fleet_config(tmp_path, embedded_broker_url), synthetic_catalog)
    url = coordinator.public_url + "/api/fl/report"
    report = {"run_id": "run-1", "round": 1, "variant_id": "syn.1_3", "accuracy": 0.75, "num_updates": 4,
              "rejected": {"shape_mismatch": 1, "Bad Label!": 2}, "update_bytes": 1000}
    for _ in range(2):  # a retried POST is not counted twice
        status, _, _ = http(url, json.dumps(report).encode())
        assert status == 200
    http(url, json.dumps({**report, "variant_id": "syn.2_3", "rejected": {}}).encode())  # same round, other variant
    assert metric(coordinator, "fleet_fl_rounds_total") == 1
    assert metric(coordinator, "fleet_fl_update_bytes_total") == 2000
    assert metric(coordinator, "fleet_fl_updates_rejected_total", reason="shape_mismatch") == 1
    assert metric(coordinator, "fleet_fl_updates_rejected_total", reason="other") == 2
    assert metric(coordinator, "fleet_variant_accuracy", variant="syn.1_3") == 0.75
    for bad in [{**report, "round": -1}, {**report, "variant_id": "nope"}, {**report, "accuracy": 2},
                {k: v for k, v in report.items() if k != "run_id"}, {**report, "extra": 1}, [1, 2]]:
        assert http(url, json.dumps(bad).encode())[0] == 400
    assert http(url, b"{not json")[0] == 400
    status, body, _ = http(coordinator.public_url + "/api/devices")
    assert status == 200 and json.loads(body) == []


def test_blobs_support_ranges_and_downloads_resume(tmp_path, embedded_broker_url, synthetic_catalog,
                                                   fleet_coordinator):
    coordinator = fleet_coordinator(fleet_config(tmp_path, embedded_broker_url), synthetic_catalog)
    block = max(synthetic_catalog.manifest("syn.4_4").blocks, key=lambda b: b.size)
    data = synthetic_catalog.store.read(block.sha256)
    url = f"{coordinator.public_url}/blobs/{block.sha256}"
    status, body, headers = http(url, headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert http(url, headers={"Range": "bytes=-5"})[1] == data[-5:]
    assert http(url, headers={"Range": f"bytes={len(data) - 3}-"})[1] == data[-3:]
    assert http(url, headers={"Range": f"bytes={len(data)}-"})[0] == 416
    assert http(url, headers={"Range": "bytes=5-1"})[:2] == (200, data)  # invalid ranges are ignored
    for huge in ("bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000, "bytes=1-" + "9" * 19):
        assert http(url, headers={"Range": huge})[:2] == (200, data)  # so are positions past any file
    assert http(f"{coordinator.public_url}/blobs/{'0' * 64}")[0] == 404
    assert http(f"{coordinator.public_url}/manifests/syn.4_4/v9.json")[0] == 404
    assert http(f"{coordinator.public_url}/manifests/..%2Fcatalog/v1.json")[0] == 404

    store, partial = BlobStore(tmp_path / "dev" / "blobs"), tmp_path / "dev" / "partial"
    partial.mkdir(parents=True)
    (partial / block.sha256).write_bytes(data[: len(data) // 2])  # an interrupted download
    sent = metric(coordinator, "fleet_artifact_bytes_sent_total")
    fetch_blob(url, block.sha256, block.size, store, partial)
    assert store.read(block.sha256) == data
    rest = len(data) - len(data) // 2  # counted by the server thread once written: allow it a moment
    assert wait_until(lambda: metric(coordinator, "fleet_artifact_bytes_sent_total") - sent == rest, 5)

    other = synthetic_catalog.manifest("syn.1_3").stitch_block()
    (partial / other.sha256).write_bytes(b"\0" * 10)  # a partial file that is not a prefix of the real block
    with pytest.raises(IntegrityError):
        fetch_blob(f"{coordinator.public_url}/blobs/{other.sha256}", other.sha256, other.size, store, partial)
    assert not (partial / other.sha256).exists() and not store.has(other.sha256)
    fetch_blob(f"{coordinator.public_url}/blobs/{other.sha256}", other.sha256, other.size, store, partial)
    assert store.has(other.sha256)


def test_devices_command_simulates_the_configured_fleet(tmp_path, embedded_broker_url, synthetic_catalog,
                                                        fleet_coordinator):
    fleet = fleet_config(tmp_path, embedded_broker_url)
    fleet_coordinator(fleet, synthetic_catalog)
    config = write_config(tmp_path / "fleet.yaml", fleet)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "restnet.cli", "devices", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a silent child
    watchdog.start()
    try:
        installed = set()
        for line in proc.stdout:
            if line.strip().endswith("INSTALLED"):
                installed.add(line.split(":")[0])
            if len(installed) == len(DEVICES):
                break
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert installed == {d.id for d in DEVICES}
    for d in DEVICES:
        manifest = Manifest.from_bytes((Path(fleet.device_root) / d.id / "current.json").read_bytes())
        assert_assignment_ok(synthetic_catalog, profile_of(d), manifest.variant_id)
