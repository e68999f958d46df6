"""`restnet device | devices`: a device agent, or every device of a fleet config simulated in one process."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from restnet.signals import stop_event
from shared.config import load_config
from shared.errors import ConfigError


def add_parsers(subparsers) -> None:
    d = subparsers.add_parser("device", help="run one device agent",
                              description="Enroll, install the assigned variant, report, stay present.")
    d.add_argument("--config", required=True, help="fleet config YAML")
    d.add_argument("--id", required=True, help="device id (its MQTT username and client id)")
    d.add_argument("--dir", help="device folder (default: fleet.device_root/ID)")
    d.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="the coordinator's public key (repeat during a key rotation); instructions not signed by one "
                        "are refused (default: fleet.trusted_keys)")
    d.add_argument("--measure", action="store_true",
                   help="measure memory and compute here instead of taking them from fleet.devices")
    d.add_argument("--latency-ms", type=float, help="latency target, with --measure")
    d.add_argument("--remeasure-s", type=float, default=60.0,
                   help="with --measure: measure again this often and re-enroll when the budget changed (default 60)")
    d.add_argument("--cgroup-dir", default="/sys/fs/cgroup", metavar="DIR",
                   help="with a ladder (fleet.devices[].storage_mb): where to read memory.max and memory.current "
                        "(default /sys/fs/cgroup; without a limit there, the system's available memory)")
    d.add_argument("--hold-s", type=float, default=10.0,
                   help="with a ladder: how long memory must stay free before the device climbs a rung (default 10)")
    d.set_defaults(func=_device)

    s = subparsers.add_parser("devices", help="simulate every device of the fleet config in one process")
    s.add_argument("--config", required=True, help="fleet config YAML")
    s.add_argument("--only", help="comma-separated device ids (default: all)")
    s.add_argument("--root", help="folder for the device folders (default: fleet.device_root)")
    s.set_defaults(func=_devices)

    for p in (d, s):
        p.add_argument("--superlink", metavar="HOST:PORT",
                       help="start a Flower SuperNode for each installed device, connected to this SuperLink "
                            "(restarted when the device is re-assigned to another variant)")
        p.add_argument("--superlink-ca", help="CA certificate of the TLS SuperLink")
        p.add_argument("--superlink-insecure", action="store_true",
                       help="plain HTTP to the SuperLink instead (a single machine only)")
        p.add_argument("--supernode-key", help="the device's private key when the SuperLink authenticates SuperNodes "
                                               "(restnet keys supernode)")
    d.add_argument("--data-partition", default="0/1", metavar="K/N",
                   help="with --superlink: train on share K of N of the config's dataset (default 0/1: all of it, "
                        "a device's own data)")


def _supernodes(cfg, args, partition_of: dict[str, int], num_partitions: int):
    """With --superlink: the hook that gives every installed device its SuperNode (else None)."""
    if not getattr(args, "superlink", None):
        return None
    from client.supernode import SuperNodeManager
    from shared.flower_link import LinkSecurity

    security = LinkSecurity.choose(args.superlink_ca, args.superlink_insecure, "--superlink-ca and --superlink-insecure")
    key = Path(args.supernode_key) if args.supernode_key else None
    return SuperNodeManager(args.superlink, security, cfg.data, cfg.federated.partition, partition_of, num_partitions,
                            auth_key_of=lambda device_dir: key)


def _partition(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(v) for v in text.split("/"))
        if 0 <= k < n:
            return k, n
    except ValueError:
        pass
    raise ConfigError(f"--data-partition {text!r} is not K/N with 0 <= K < N", "e.g. 0/3 for the first of three")


def _device(args) -> int:
    from client.agent import DeviceAgent
    from client.memory import MemorySource
    from client.profile import budget_changed, device_profile
    from shared.signing import load_verifier
    from shared.vocabulary import valid_device_id

    cfg = _load(args)
    fleet = cfg.fleet
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
    # A real device owns its data (partition 0/1 of data.root here); a simulated one takes its share K/N.
    k, n = _partition(args.data_partition)
    nodes = _supernodes(cfg, args, {folder.name: k}, n)

    def installed(d: Path) -> None:
        print(f"installed into {d}", flush=True)
        if nodes is not None:
            nodes.on_installed(d)

    trusted = load_verifier(args.trusted_key or fleet.trusted_keys)
    if trusted is None:
        print(f"{args.id}: no trusted keys: instructions are taken unsigned (see docs/SECURITY.md)", flush=True)
    agent = DeviceAgent(args.id, fleet.broker, password, profile, folder, fleet.http_ca_file, fleet.heartbeat_s,
                        on_installed=installed, trusted=trusted, memory=MemorySource(args.cgroup_dir),
                        hold_s=args.hold_s)
    agent.start()
    threading.Thread(target=_report_changes, args=([agent],), daemon=True).start()
    stop = stop_event()
    try:
        while not stop.wait(args.remeasure_s if args.measure else None):
            measured = device_profile(device, True, args.latency_ms)
            if budget_changed(agent.profile, measured):
                print(f"{args.id}: budget changed to {measured.memory_mb:g} MiB, compute {measured.compute:g}: "
                      "enrolling again", flush=True)
                agent.update_profile(measured)
    finally:
        agent.stop()
        if nodes is not None:
            nodes.stop()
    return 0


def _devices(args) -> int:
    from client.fleet_sim import start_fleet

    cfg = _load(args)
    fleet = cfg.fleet
    ids = [d.id for d in fleet.devices]
    nodes = _supernodes(cfg, args, {d: i for i, d in enumerate(ids)}, len(ids))  # device i owns partition i of n
    agents = start_fleet(fleet, args.root, args.only.split(",") if args.only else None,
                         on_installed=nodes.on_installed if nodes else None)
    print(f"simulating {len(agents)} devices", flush=True)
    threading.Thread(target=_report_changes, args=(agents,), daemon=True).start()
    try:
        stop_event().wait()
    finally:
        for agent in agents:
            agent.stop()
        if nodes is not None:
            nodes.stop()
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


def _load(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(args.config)
