"""Faults survived, each on real processes: the broker restarted mid-enrollment, the coordinator killed and restarted
with devices connected, a device agent killed mid-download, the artifact server cutting a blob, oversized
artifacts, and a registry that refuses the coordinator."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fleet_helpers import (BUDGETS, DEVICES, SimulatedDevices, _synthetic_catalog_template,  # noqa: F401
                           allow_loadgen, assert_assignment_ok, device_agents, embedded_broker_url, fleet_config,
                           fleet_coordinator, free_port, http, http_servers, metric, mosquitto_broker, profile_of,
                           raw_clients, reply, synthetic_catalog, wait_until, write_config)

from client.download import MAX_MANIFEST_BYTES, fetch_blob, install
from client.fleet_sim import settled, wait_settled
from server.registry import open_registry
from shared.artifacts import BlobStore, Manifest
from shared.config import DeviceConfig
from shared.errors import IntegrityError
from shared.messages import Assignment, Enroll, decode_desired, encode, topic
from shared.variants import load_variant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def start_process(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "restnet.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def api_up(port: int) -> bool:
    try:
        return http(f"http://127.0.0.1:{port}/api/devices")[0] == 200
    except OSError:
        return False


def check_registry(fleet, catalog, expect: dict) -> None:
    """One row per device, and each row is what the device last saw; its assignment fits the profile it sent."""
    registry = open_registry(fleet.registry)
    try:
        assert sorted(d["id"] for d in registry.snapshot()) == sorted(expect)
        for device_id, (desired, profile) in expect.items():
            row = registry.device(device_id)
            assert (row.version, row.assignment_id, row.request_id) == \
                (desired.version, desired.assignment_id, desired.request_id), device_id
            assert_assignment_ok(catalog, profile, desired.assignment.variant_id if desired.assignment else None)
    finally:
        registry.close()


def test_a_broker_restart_during_200_enrollments_loses_none(tmp_path, mosquitto_broker, synthetic_catalog,
                                                             fleet_coordinator):
    fleet = fleet_config(tmp_path, "mqtt://unused", devices=[])
    broker = mosquitto_broker(fleet)  # persistence on, as `restnet acl` writes it
    allow_loadgen(broker, "loadgen-pw")
    fleet = replace(fleet, broker=replace(fleet.broker, url=broker.url))
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    devices = SimulatedDevices(broker.url, "loadgen-pw")
    ids = [f"dev-{i:03d}" for i in range(200)]
    try:
        def burst():
            for i, device_id in enumerate(ids):
                devices.enroll(device_id, f"{device_id}-a", BUDGETS[i % len(BUDGETS)])
                time.sleep(0.005)

        starter = threading.Thread(target=burst)
        starter.start()
        assert wait_until(lambda: len(devices.answered) >= 40, 30)
        broker.stop()  # mid-burst: Mosquitto saves its state (persistence) and goes away
        broker.start()  # back on the same port
        starter.join()
        assert len(devices.answered) < len(ids), "the restart must land in the middle of the enrollments"
        deadline = time.monotonic() + 90
        while len(devices.answered) < len(ids) and time.monotonic() < deadline:
            devices.resend_unanswered()  # what agents do: the same request again until answered
            wait_until(lambda: len(devices.answered) == len(ids), 1.0)
        assert len(devices.answered) == len(ids), sorted(set(ids) - devices.answered)[:10]
    finally:
        devices.close()
    newest = {d: max(devices.received[d], key=lambda x: x.version) for d in ids}
    check_registry(fleet, synthetic_catalog, {d: (newest[d], devices.profiles[(d, newest[d].request_id)])
                                              for d in ids})
    assert metric(coordinator, "fleet_enrollments_total", result="assigned") + \
        metric(coordinator, "fleet_enrollments_total", result="refused") == len(ids)  # each row made once


def test_a_coordinator_killed_with_50_devices_connected_serves_them_all_again(tmp_path, mosquitto_broker,
                                                                               synthetic_catalog, device_agents):
    budgets = [(20, 1.0, None), (50, 0.5, 20.0), (200, 2.0, 10.0)]
    devices = [DeviceConfig(f"dev-{i:02d}", *budgets[i % 3], password=f"pw-{i}") for i in range(50)]
    port = free_port()
    fleet = fleet_config(tmp_path, "mqtt://unused", devices=devices, http_port=port)
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    config = write_config(tmp_path / "fleet.yaml", fleet)
    log = open(tmp_path / "coordinator.log", "ab")
    args = ["coordinator", "--config", str(config), "--catalog", str(synthetic_catalog.root)]
    proc = start_process(args, log)
    try:
        assert wait_until(lambda: api_up(port), 60), (tmp_path / "coordinator.log").read_text()[-3000:]
        agents = [device_agents(fleet, d, enroll_retry_s=1.0) for d in devices]
        assert not wait_settled(agents, 90)
        before = {a.device_id: a.desired.version for a in agents}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # While it is down every device's budget changes: their enrollments wait at the broker for the
        # coordinator's persistent session.
        new = {}
        for i, (agent, device) in enumerate(zip(agents, devices)):
            new[agent.device_id] = replace(profile_of(device), memory_mb=budgets[(i + 1) % 3][0],
                                           compute=budgets[(i + 1) % 3][1], latency_ms=budgets[(i + 1) % 3][2])
            agent.update_profile(new[agent.device_id])
        assert all(a.connected for a in agents)  # they stay connected to the broker throughout
        proc = start_process(args, log)
        late = wait_settled(agents, 120)
        assert not late, [a.device_id for a in late]
    finally:
        proc.kill()
        proc.wait()
        log.close()
    for a in agents:
        assert a.desired.request_id == a.request_id  # the enrollment sent while the coordinator was down
    moved = sum(a.desired.version > before[a.device_id] for a in agents)
    assert moved > 0  # budgets changed: some devices got another variant, a new version of their state
    check_registry(fleet, synthetic_catalog, {a.device_id: (a.desired, new[a.device_id]) for a in agents})


# ---- HTTP between the coordinator and a device ---------------------------------------------------------------

class Relay(BaseHTTPRequestHandler):
    """Forwards GETs to the coordinator; a test decides per request how the body travels (`send(self, path,
    range_start, body)`) and every request is recorded as (path, the Range header)."""

    upstream = ""
    requests: list
    send = staticmethod(lambda handler, path, start, body: handler.wfile.write(body))

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        request = urllib.request.Request(self.upstream + self.path, headers=dict(
            [("Range", self.headers["Range"])] if self.headers.get("Range") else []))
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                status, body, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
                content_range = resp.headers.get("Content-Range")
        except urllib.error.HTTPError as exc:
            status, body, ctype, content_range = exc.code, exc.read(), "application/json", None
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        start = int(content_range.split()[1].split("-")[0]) if content_range else 0
        try:
            self.send(self, self.path, start, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def relay(http_servers):
    def start(upstream: str, send=None) -> tuple[str, list]:
        requests: list = []
        attrs = {"upstream": upstream, "requests": requests}
        if send is not None:
            attrs["send"] = staticmethod(send)
        return http_servers(type("Handler", (Relay,), attrs)), requests

    return start


def largest_block(catalog, variant_id):
    return max(catalog.manifest(variant_id).blocks, key=lambda b: b.size)


def test_a_device_agent_killed_mid_download_resumes_and_installs_once(tmp_path, embedded_broker_url, relay,
                                                                      synthetic_catalog, fleet_coordinator):
    device = DEVICES[2]  # the largest variant
    fleet = fleet_config(tmp_path, embedded_broker_url, devices=[device])
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    vid = synthetic_catalog.variants[-1].id
    big = largest_block(synthetic_catalog, vid)
    chunk = max(1024, big.size // 60)

    def slowly(handler, path, start, body):  # about 6 s for the largest block: time to kill the agent mid-way
        for i in range(0, len(body), chunk):
            handler.wfile.write(body[i:i + chunk])
            handler.wfile.flush()
            time.sleep(0.1)

    proxy, requests = relay(coordinator.public_url, slowly)
    fleet.http_public_url = coordinator.variants.public_url = proxy  # devices download through the slow relay
    config = write_config(tmp_path / "fleet.yaml", fleet)
    folder = tmp_path / "devices" / device.id
    part = folder / "partial" / big.sha256
    log = open(tmp_path / "agent.log", "ab")
    args = ["device", "--config", str(config), "--id", device.id, "--dir", str(folder)]
    agent = start_process(args, log)
    try:
        assert wait_until(lambda: part.is_file() and 0 < part.stat().st_size < big.size / 2, 60), \
            (tmp_path / "agent.log").read_text()[-2000:]
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        kept = part.stat().st_size
        assert not (folder / "current.json").exists()  # nothing half-downloaded is installed
        agent = start_process(args, log)
        assert wait_until(lambda: (folder / "current.json").is_file(), 90), (tmp_path / "agent.log").read_text()[-2000:]
    finally:
        agent.kill()
        agent.wait()
        log.close()
    installed = Manifest.from_bytes((folder / "current.json").read_bytes())
    assert installed.variant_id == vid
    load_variant(installed, BlobStore(folder / "blobs"))  # every block verified
    assert (f"/blobs/{big.sha256}", f"bytes={kept}-") in requests  # resumed where the killed agent stopped
    assert wait_until(lambda: metric(coordinator, "fleet_status_reports_total", state="INSTALLED") == 1, 10)


def test_downloads_cut_several_times_resume_and_install(tmp_path, embedded_broker_url, relay, synthetic_catalog,
                                                        fleet_coordinator, device_agents):
    device = DEVICES[2]
    fleet = fleet_config(tmp_path, embedded_broker_url, devices=[device])
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    vid = synthetic_catalog.variants[-1].id
    big = largest_block(synthetic_catalog, vid)
    cuts = {"left": 3}

    def cutting(handler, path, start, body):  # the largest block: the connection drops after a third, three times
        if path.endswith(big.sha256) and cuts["left"] > 0:
            cuts["left"] -= 1
            handler.wfile.write(body[: max(1, len(body) // 3)])
            handler.wfile.flush()
            handler.connection.shutdown(2)
            return
        handler.wfile.write(body)

    proxy, requests = relay(coordinator.public_url, cutting)
    fleet.http_public_url = coordinator.variants.public_url = proxy
    agent = device_agents(fleet, device)
    assert agent.wait(settled, 60), agent.failure
    ranges = [r for p, r in requests if p.endswith(big.sha256)]
    assert ranges[0] is None and len(ranges) == 4  # a fresh start, then three resumes
    offsets = [int(r[len("bytes="):-1]) for r in ranges[1:]]
    assert offsets == sorted(offsets) and offsets[0] > 0  # each resume from further on
    load_variant(agent.installed, BlobStore(agent.device_dir / "blobs"))


def test_an_oversized_manifest_or_blob_is_refused(tmp_path, synthetic_catalog, http_servers):
    vid = synthetic_catalog.variants[0].id
    manifest = synthetic_catalog.manifest(vid)
    block = manifest.blocks[0]

    class Oversized(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith(".json"):
                body = b" " * (MAX_MANIFEST_BYTES + 1)
            else:
                body = synthetic_catalog.store.read(block.sha256) + b"more than the manifest says"
            reply(self, body)

        def log_message(self, *args):
            pass

    base = http_servers(Oversized)
    big = Assignment(vid, 1, f"{base}/manifests/{vid}/v1.json", manifest.sha256, manifest.total_bytes)
    with pytest.raises(IntegrityError, match="larger than"):
        install(big, tmp_path / "a")

    store = BlobStore(tmp_path / "b" / "blobs")
    with pytest.raises(IntegrityError, match="does not match"):
        fetch_blob(f"{base}/blobs/{block.sha256}", block.sha256, block.size, store, tmp_path / "b" / "partial")
    assert not store.has(block.sha256) and not (tmp_path / "b" / "partial" / block.sha256).exists()
    assert not (tmp_path / "a" / "current.json").exists()


# ---- the registry ------------------------------------------------------------------------------------------------

def test_a_registry_that_fails_publishes_and_acknowledges_nothing(tmp_path, postgres_server, mosquitto_broker,
                                                                  synthetic_catalog, device_agents, raw_clients):
    """While the database refuses the coordinator nothing is answered; the message it could not commit stays
    unacknowledged at the broker (a restarted coordinator receives it again), and devices that re-send are answered
    once the database is back."""
    import psycopg

    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    port = free_port()
    lone, retrying = DEVICES[0], DEVICES[1]
    fleet = fleet_config(tmp_path, "mqtt://unused", registry=url, http_port=port, devices=[lone, retrying])
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    config = write_config(tmp_path / "fleet.yaml", fleet)
    log = open(tmp_path / "coordinator.log", "ab")
    args = ["coordinator", "--config", str(config), "--catalog", str(synthetic_catalog.root)]
    proc = start_process(args, log)

    def database(allow: bool) -> None:
        with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:  # and the coordinator's open connections end
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    try:
        assert wait_until(lambda: api_up(port), 60), (tmp_path / "coordinator.log").read_text()[-3000:]
        database(allow=False)
        once = raw_clients(fleet.broker.url, lone.id, lone.id, lone.password)
        assert not once.connect().is_failure
        once.subscribe(topic(lone.id, "desired"))
        once.publish(topic(lone.id, "enroll"), encode(Enroll(lone.id, "only-once", profile_of(lone))))
        agent = device_agents(fleet, retrying, enroll_retry_s=1.0)
        assert wait_until(lambda: b"registry commit failed" in (tmp_path / "coordinator.log").read_bytes(), 30)
        assert once.next_message(3) is None and agent.desired is None  # nothing was published

        proc.send_signal(signal.SIGKILL)  # what it failed to commit it never acknowledged...
        proc.wait()
        database(allow=True)
        proc = start_process(args, log)
        message = once.next_message(60)  # ...so the broker hands it to the coordinator's session again
        assert message is not None and decode_desired(lone.id, message[1]).request_id == "only-once"
        assert agent.wait(settled, 60)  # and the device that kept re-sending is answered
    finally:
        proc.kill()
        proc.wait()
        log.close()
    registry = open_registry(url)
    try:
        assert registry.device(lone.id).request_id == "only-once"
        assert registry.device(retrying.id).request_id == agent.request_id
    finally:
        registry.close()


def test_a_block_damaged_on_the_device_is_fetched_again(tmp_path, embedded_broker_url, synthetic_catalog,
                                                        fleet_coordinator):
    coordinator = fleet_coordinator(fleet_config(tmp_path, embedded_broker_url), synthetic_catalog)
    vid = synthetic_catalog.variants[0].id
    manifest = synthetic_catalog.manifest(vid)
    assignment = Assignment(vid, 1, f"{coordinator.public_url}/manifests/{vid}/v1.json", manifest.sha256,
                            manifest.total_bytes)
    device = tmp_path / "device"
    install(assignment, device)
    store = BlobStore(device / "blobs")
    block = largest_block(synthetic_catalog, vid)
    damaged = bytearray(store.path(block.sha256).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # a bit flipped on disk
    store.path(block.sha256).write_bytes(bytes(damaged))

    assert install(assignment, device).sha256 == manifest.sha256  # the next install repairs it ...
    assert store.read(block.sha256)  # ... and the block hashes to its name again
    load_variant(Manifest.from_bytes((device / "current.json").read_bytes()), store)


def test_a_blob_that_never_ends_is_cut_just_past_its_declared_size(tmp_path, synthetic_catalog, http_servers):
    """A hostile server streaming without end: the device stops reading once past the block's size (disk and time
    bounded), instead of reading all of it to find that the hash does not match."""
    vid = synthetic_catalog.variants[0].id
    block = largest_block(synthetic_catalog, vid)
    offered, sent = 256 << 20, []

    class Endless(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection does
            total, chunk = 0, b"\0" * (1 << 16)
            try:
                while total < offered:
                    self.wfile.write(chunk)
                    total += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent.append(total)

        def log_message(self, *args):
            pass

    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(IntegrityError, match="does not match"):
        fetch_blob(f"{http_servers(Endless)}/blobs/{block.sha256}", block.sha256, block.size, store,
                   tmp_path / "partial")
    assert wait_until(lambda: sent, 30)
    assert sent[0] < block.size + (16 << 20) < offered  # socket buffers aside, nothing past the size was read
    assert not store.has(block.sha256) and not (tmp_path / "partial" / block.sha256).exists()
