"""Many simulated devices in one process: one real DeviceAgent (own MQTT connection, own folder) per configured
device, with the profile the fleet config gives it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from client.agent import DeviceAgent
from client.profile import device_profile
from shared.config import FleetConfig
from shared.errors import ConfigError
from shared.signing import load_verifier


def start_fleet(fleet: FleetConfig, root: Path | str | None = None, only: list[str] | None = None,
                on_installed: Callable[[Path], None] | None = None, **agent_options) -> list[DeviceAgent]:
    """Start an agent for every device in `fleet.devices` (or those named in `only`), each in `root/<id>`."""
    root = Path(root if root is not None else fleet.device_root)
    devices = fleet.devices if only is None else [d for d in fleet.devices if d.id in set(only)]
    unknown = sorted(set(only or ()) - {d.id for d in devices})
    if unknown:
        raise ConfigError(f"not in fleet.devices: {', '.join(unknown)}")
    agent_options.setdefault("heartbeat_s", fleet.heartbeat_s)
    agent_options.setdefault("http_ca_file", fleet.http_ca_file)
    agent_options.setdefault("trusted", load_verifier(fleet.trusted_keys))
    return [DeviceAgent(d.id, fleet.broker, d.password, device_profile(d), root / d.id, on_installed=on_installed,
                        **agent_options).start() for d in devices]


def settled(agent: DeviceAgent) -> bool:
    """The agent's latest enrollment is answered and its desired state is installed (or refused)."""
    d = agent.desired
    if not agent.answered or d is None:
        return False
    if d.assignment is None:
        return True
    return agent.status == "INSTALLED" and agent.installed is not None \
        and agent.installed.variant_id == d.assignment.variant_id \
        and agent.installed.version == d.assignment.variant_version


def wait_settled(agents: list[DeviceAgent], timeout: float) -> list[DeviceAgent]:
    """Wait until every agent has settled; returns the ones that did not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for agent in agents:
        agent.wait(settled, max(0.0, deadline - time.monotonic()))
    return [a for a in agents if not settled(a)]


def describe(agent: DeviceAgent) -> str:
    d = agent.desired
    if d is None:
        refused = f" (the broker refused the login: {agent.connect_error})" if agent.connect_error else ""
        return f"{agent.device_id}: waiting for an assignment{refused}"
    if d.assignment is None:
        return f"{agent.device_id}: refused: {d.refusal.message}"
    a = d.assignment
    state = agent.status or "pending"
    extra = f" ({agent.failure})" if agent.failure and state == "FAILED" else ""
    return f"{agent.device_id}: {a.variant_id} v{a.variant_version} {state}{extra}"
