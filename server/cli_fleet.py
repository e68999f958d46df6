"""`restnet coordinator | device | devices | acl`: the fleet's commands (registered by shared/cli.py).

Also runnable alone: `python -m server.cli_fleet coordinator --config F`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from shared.errors import ConfigError, RestnetError


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("coordinator", help="run the fleet coordinator (MQTT enrollment, artifact HTTP, metrics)",
                              description="Serve enrollments over MQTT and artifacts, /metrics and /api over HTTP "
                                          "until interrupted.")
    c.add_argument("--config", required=True, help="fleet config YAML")
    c.add_argument("--catalog", help="catalog folder (default: fleet.catalog from the config)")
    c.set_defaults(func=run, fleet_command="coordinator")

    d = subparsers.add_parser("device", help="run one device agent",
                              description="Enroll, install the assigned variant, report, stay present.")
    d.add_argument("--config", required=True, help="fleet config YAML")
    d.add_argument("--id", required=True, help="device id (its MQTT username and client id)")
    d.add_argument("--dir", help="device folder (default: fleet.device_root/ID)")
    d.add_argument("--measure", action="store_true",
                   help="measure memory and compute here instead of taking them from fleet.devices")
    d.add_argument("--latency-ms", type=float, help="latency target, with --measure")
    d.add_argument("--remeasure-s", type=float, default=60.0,
                   help="with --measure: measure again this often and re-enroll when the budget changed (default 60)")
    d.set_defaults(func=run, fleet_command="device")

    s = subparsers.add_parser("devices", help="simulate every device of the fleet config in one process")
    s.add_argument("--config", required=True, help="fleet config YAML")
    s.add_argument("--only", help="comma-separated device ids (default: all)")
    s.add_argument("--root", help="folder for the device folders (default: fleet.device_root)")
    s.set_defaults(func=run, fleet_command="devices")

    a = subparsers.add_parser("acl", help="write a Mosquitto password file, ACL and config for the fleet",
                              description="Per-device credentials: each device may only use its own topics.")
    a.add_argument("--config", required=True, help="fleet config YAML")
    a.add_argument("--out", required=True, help="output folder (passwd, acl, mosquitto.conf)")
    a.add_argument("--port", type=int, default=1883, help="listener port in mosquitto.conf (default 1883)")
    a.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1)")
    a.add_argument("--tls-cert", help="server certificate for an mqtts listener")
    a.add_argument("--tls-key", help="its private key")
    a.set_defaults(func=run, fleet_command="acl")


def run(args) -> int:
    from shared.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    return {"coordinator": _coordinator, "device": _device, "devices": _devices, "acl": _acl}[args.fleet_command](
        cfg.fleet, args)


def _stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _coordinator(fleet, args) -> int:
    from server.coordinator import Coordinator
    from shared.catalog import Catalog

    catalog = Catalog.load(args.catalog or fleet.catalog)
    coordinator = Coordinator(fleet, catalog).start()
    print(f"coordinator: {len(catalog.variants)} variants, broker {fleet.broker.url}, http {coordinator.public_url} "
          f"(/metrics, /api/devices)", flush=True)
    try:
        _stop_event().wait()
    finally:
        coordinator.stop()
    return 0


def _device(fleet, args) -> int:
    from client.agent import DeviceAgent
    from client.profile import budget_changed, device_profile
    from shared.messages import valid_device_id

    if not valid_device_id(args.id):
        raise ConfigError(f"device id {args.id!r} may only hold letters, digits, '-' and '_' (at most 64)")
    device = next((d for d in fleet.devices if d.id == args.id), None)
    if device is None and not args.measure:
        raise ConfigError(f"device {args.id} is not in fleet.devices", "add it, or pass --measure to profile here")
    password = os.environ.get("RESTNET_DEVICE_PASSWORD") or (device.password if device else None)
    profile = device_profile(device, args.measure, args.latency_ms)
    print(f"{args.id}: memory {profile.memory_mb:g} MiB, compute {profile.compute:g}, "
          f"latency target {profile.latency_ms or 'none'}", flush=True)
    folder = Path(args.dir or Path(fleet.device_root) / args.id)
    agent = DeviceAgent(args.id, fleet.broker, password, profile, folder, fleet.http_ca_file, fleet.heartbeat_s,
                        on_installed=lambda d: print(f"installed into {d}", flush=True))
    agent.start()
    threading.Thread(target=_report_changes, args=([agent],), daemon=True).start()
    stop = _stop_event()
    try:
        while not stop.wait(args.remeasure_s if args.measure else None):
            measured = device_profile(device, True, args.latency_ms)
            if budget_changed(agent.profile, measured):
                print(f"{args.id}: budget changed to {measured.memory_mb:g} MiB, compute {measured.compute:g}: "
                      "enrolling again", flush=True)
                agent.update_profile(measured)
    finally:
        agent.stop()
    return 0


def _devices(fleet, args) -> int:
    from client.fleet_sim import start_fleet

    agents = start_fleet(fleet, args.root, args.only.split(",") if args.only else None)
    print(f"simulating {len(agents)} devices", flush=True)
    threading.Thread(target=_report_changes, args=(agents,), daemon=True).start()
    try:
        _stop_event().wait()
    finally:
        for agent in agents:
            agent.stop()
    return 0


def _report_changes(agents) -> None:
    """Print a device's line whenever its description changes."""
    from client.fleet_sim import describe

    last: dict[str, str] = {}
    while True:
        for agent in agents:
            line = describe(agent)
            if line != last.get(agent.device_id):
                last[agent.device_id] = line
                print(line, flush=True)
        time.sleep(0.5)


def _acl(fleet, args) -> int:
    from server.mqtt_acl import write_broker_files

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    paths = write_broker_files(fleet, Path(args.out), args.port, args.bind, tls)
    print(f"wrote {', '.join(str(p) for p in paths.values())} for {len(fleet.devices)} devices; "
          f"run: mosquitto -c {paths['conf']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli_fleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RestnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
