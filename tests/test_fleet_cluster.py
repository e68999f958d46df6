"""Three coordinators on one Mosquitto and one PostgreSQL registry (MQTT 5 shared subscriptions): 200 devices enroll,
some twice in a row with different budgets, while one coordinator is killed with SIGKILL. Every device is answered
and assigned within its budget, each device has one row, no answer a device saw is missing from the registry,
a version never names two different states, and the state the broker retains for each device is the registry's.

The devices are simulated in a few MQTT connections (a `loadgen` user allowed on every device's enroll and desired
topics) that behave like the agent: re-send an unanswered enrollment every second with the same request id, and
record every desired state that arrives.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace

from fleet_helpers import (BUDGETS, SimulatedDevices, _synthetic_catalog_template, allow_loadgen,  # noqa: F401
                           assert_assignment_ok, fleet_config, free_port, http, mosquitto_broker, synthetic_catalog,
                           wait_until, write_config)

from server.registry import open_registry
from shared.config import BrokerConfig, ClusterConfig
from shared.messages import TOPIC_ROOT
from shared.mqtt import make_client

COORDINATORS, N = 3, 200


def start_coordinator(config, instance: int, catalog_root, log):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "restnet.cli", "coordinator", "--config", str(config),
                             "--catalog", str(catalog_root), "--instance", str(instance)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def retained_desired(url: str, password: str, device_ids: list[str]) -> dict[str, bytes]:
    """What a newcomer reads: the broker's retained desired state of each device."""
    got, client = {}, make_client(BrokerConfig(url=url), "loadgen-0", "loadgen-0", password, True)[0]
    client.on_message = lambda c, u, m: got.__setitem__(m.topic.split("/")[3], m.payload)
    address = url.split("//")[1].split(":")
    client.connect(address[0], int(address[1]))
    client.loop_start()
    client.subscribe(f"{TOPIC_ROOT}/dev/+/desired", qos=1)
    wait_until(lambda: len(got) >= len(device_ids), 15)
    client.disconnect()
    client.loop_stop()
    return got


def test_three_coordinators_serve_200_devices_while_one_is_killed(tmp_path, postgres_server, mosquitto_broker,
                                                                  synthetic_catalog):
    registry_url = postgres_server.create_database()
    cluster = ClusterConfig(coordinators=COORDINATORS, share_group="coordinators", session_expiry_s=2)
    fleet = fleet_config(tmp_path, "mqtt://unused", registry=registry_url, cluster=cluster, devices=[])
    broker = mosquitto_broker(fleet)  # the ACL of `restnet acl`: one login per coordinator
    allow_loadgen(broker, "loadgen-pw")
    fleet = replace(fleet, broker=replace(fleet.broker, url=broker.url))
    ports = [free_port() for _ in range(COORDINATORS)]
    log = open(tmp_path / "coordinators.log", "ab")
    procs = [start_coordinator(write_config(tmp_path / f"fleet-{k}.yaml", replace(fleet, http_port=ports[k - 1])),
                               k, synthetic_catalog.root, log) for k in range(1, COORDINATORS + 1)]
    devices = None
    try:
        for port in ports:
            assert wait_until(lambda: _up(port), 60), (tmp_path / "coordinators.log").read_text()[-3000:]
        devices = SimulatedDevices(fleet.broker.url, "loadgen-pw")
        ids = [f"dev-{i:03d}" for i in range(N)]
        twice = set(ids[::4])  # these enroll twice in a row, with another budget: two coordinators, close together

        def burst():
            for i, device_id in enumerate(ids):
                devices.enroll(device_id, f"{device_id}-a", BUDGETS[i % len(BUDGETS)])
                if device_id in twice:
                    devices.enroll(device_id, f"{device_id}-b", BUDGETS[(i + 1) % len(BUDGETS)])
                time.sleep(0.01)

        starter = threading.Thread(target=burst)
        starter.start()
        assert wait_until(lambda: len(devices.answered) >= 30, 30)
        handled = [_enrollments(ports[1])]
        procs[1].send_signal(signal.SIGKILL)  # coordinator 2 dies mid-burst
        procs[1].wait()
        starter.join()
        assert len(devices.answered) < N, "the kill must land in the middle of the burst"

        deadline = time.monotonic() + 90
        while len(devices.answered) < N and time.monotonic() < deadline:
            time.sleep(1.0)
            devices.resend_unanswered()
        assert len(devices.answered) == N, f"unanswered: {sorted(set(ids) - devices.answered)[:10]}"
        handled += [_enrollments(ports[0]), _enrollments(ports[2])]
        # Shared, not copied: each coordinator got a part of the enrollments, none all of them.
        assert all(0 < n < N for n in handled), handled
        retained = retained_desired(fleet.broker.url, "loadgen-pw", ids)
    finally:
        if devices is not None:
            devices.close()
        for proc in procs:
            proc.kill()
            proc.wait()
        log.close()

    registry = open_registry(registry_url)
    try:
        rows = registry.snapshot()
        assert sorted(r["id"] for r in rows) == ids  # one row per device, no more
        versions_checked = 0
        for device_id in ids:
            row = registry.device(device_id)
            seen = devices.received[device_id]
            by_version = defaultdict(set)
            for desired in seen:
                by_version[desired.version].add(desired.assignment_id)
                versions_checked += 1
            assert all(len(a) == 1 for a in by_version.values()), f"{device_id}: a version named two states"
            newest = max(seen, key=lambda d: d.version)
            # No lost acknowledgement: the newest state the device saw is the registry's, and so is the retained one.
            assert (newest.version, newest.assignment_id, newest.request_id) == \
                (row.version, row.assignment_id, row.request_id), device_id
            assert retained[device_id] == row.desired, f"{device_id}: the broker retains an older state"
            profile = devices.profiles[(device_id, row.request_id)]
            assert_assignment_ok(synthetic_catalog, profile, newest.assignment.variant_id if newest.assignment
                                 else None)
        assert versions_checked >= N
        print(f"cluster: {N} devices ({len(twice)} enrolled twice), enrollments handled per coordinator {handled}, "
              f"{versions_checked} desired states received and checked")
    finally:
        registry.close()


def _enrollments(port: int) -> float:
    """Enrollments a coordinator handled (every result), from its /metrics."""
    body = http(f"http://127.0.0.1:{port}/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith("fleet_enrollments_total{"))


def _up(port: int) -> bool:
    try:
        return http(f"http://127.0.0.1:{port}/api/devices")[0] == 200
    except OSError:
        return False
