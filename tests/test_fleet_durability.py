"""A coordinator killed with SIGKILL mid-burst loses no acknowledged enrollment, and every device ends up served."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

from fleet_helpers import (assert_assignment_ok, device_agents, fleet_config, free_port, http,  # noqa: F401
                           mosquitto_broker, profile_of, registry_url, request_count, synthetic_catalog,
                           _synthetic_catalog_template, wait_until, write_config)

from client.fleet_sim import settled, wait_settled
from server.registry import open_registry
from shared.config import DeviceConfig

BUDGETS = [(20, 1.0, None), (50, 0.5, 20.0), (200, 2.0, 10.0), (10, 1.0, None)]  # the last one is refused
N = 40


def start_coordinator(config, catalog_root, log):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "restnet.cli", "coordinator", "--config", str(config),
                             "--catalog", str(catalog_root)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def test_acknowledged_enrollments_survive_sigkill(tmp_path, mosquitto_broker, registry_url, synthetic_catalog,
                                                  device_agents):
    devices = [DeviceConfig(f"dev-{i:03d}", *BUDGETS[i % len(BUDGETS)], password=f"pw-{i}") for i in range(N)]
    fleet = fleet_config(tmp_path, "mqtt://unused", devices=devices, http_port=free_port(), registry=registry_url)
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    config = write_config(tmp_path / "fleet.yaml", fleet)
    url = f"http://127.0.0.1:{fleet.http_port}/api/devices"
    log = open(tmp_path / "coordinator.log", "ab")
    proc = start_coordinator(config, synthetic_catalog.root, log)
    try:
        assert wait_until(lambda: _up(url), 60), (tmp_path / "coordinator.log").read_text()
        agents = []

        def burst():  # devices arrive over about a second
            for d in devices:
                agents.append(device_agents(fleet, d, enroll_retry_s=1.0))
                time.sleep(0.025)

        starter = threading.Thread(target=burst)
        starter.start()
        assert wait_until(lambda: sum(a.answered for a in list(agents)) >= 5, 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acknowledged = {a.device_id: a.desired for a in list(agents) if a.answered}
        starter.join()
        assert 5 <= len(acknowledged) < N, "the kill must land in the middle of the burst"

        proc = start_coordinator(config, synthetic_catalog.root, log)
        assert not wait_settled(agents, 60)
    finally:
        proc.kill()
        proc.wait()
        log.close()

    registry = open_registry(fleet.registry)
    try:
        for device_id, desired in acknowledged.items():
            row = registry.device(device_id)  # what the device was told is what the registry holds
            assert row is not None and (row.request_id, row.assignment_id, row.version) == \
                (desired.request_id, desired.assignment_id, desired.version)
        for agent, device in zip(agents, devices):
            row = registry.device(agent.device_id)
            assert request_count(registry, agent.device_id) == 1  # retries and redeliveries counted once
            assert row.assignment_id == agent.desired.assignment_id
            variant = agent.desired.assignment.variant_id if agent.desired.assignment else None
            assert_assignment_ok(synthetic_catalog, profile_of(device), variant)
            assert settled(agent)
    finally:
        registry.close()


def _up(url: str) -> bool:
    try:
        return http(url)[0] == 200
    except OSError:
        return False
