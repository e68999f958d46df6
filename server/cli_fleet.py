"""`restnet coordinator | device | devices | acl | status`: the fleet's commands (registered by shared/cli.py).

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

    for p in (d, s):
        p.add_argument("--superlink", metavar="HOST:PORT",
                       help="start a Flower SuperNode for each installed device, connected to this SuperLink "
                            "(restarted when the device is re-assigned to another variant)")
        p.add_argument("--superlink-ca", help="CA certificate of a TLS SuperLink (default: plain HTTP, --insecure)")
        p.add_argument("--supernode-key", help="the device's private key when the SuperLink authenticates SuperNodes")
    d.add_argument("--data-partition", default="0/1", metavar="K/N",
                   help="with --superlink: train on share K of N of the config's dataset (default 0/1: all of it, "
                        "a device's own data)")

    a = subparsers.add_parser("acl", help="write a Mosquitto password file, ACL and config for the fleet",
                              description="Per-device credentials: each device may only use its own topics.")
    a.add_argument("--config", required=True, help="fleet config YAML")
    a.add_argument("--out", required=True, help="output folder (passwd, acl, mosquitto.conf)")
    a.add_argument("--port", type=int, default=1883, help="listener port in mosquitto.conf (default 1883)")
    a.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1)")
    a.add_argument("--tls-cert", help="server certificate for an mqtts listener")
    a.add_argument("--tls-key", help="its private key")
    a.set_defaults(func=run, fleet_command="acl")

    st = subparsers.add_parser("status", help="show the fleet: devices, presence, states, variants, versions",
                               description="Ask a running coordinator's HTTP API for its devices and catalog and "
                                           "print them as a table (the same view as the page at the coordinator's /).")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--coordinator", metavar="URL",
                       help="the coordinator's HTTP base URL (default: http://127.0.0.1:8780)")
    where.add_argument("--config", help="fleet config YAML: use its fleet.http_public_url or http_host:http_port")
    st.add_argument("--json", action="store_true", help="print the devices as JSON (the /api/devices listing)")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until interrupted")
    st.set_defaults(func=_status)


def run(args) -> int:
    from shared.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    if args.fleet_command in ("device", "devices"):
        return {"device": _device, "devices": _devices}[args.fleet_command](cfg, args)
    return {"coordinator": _coordinator, "acl": _acl}[args.fleet_command](cfg.fleet, args)


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


def _supernodes(cfg, args, partition_of: dict[str, int], num_partitions: int):
    """With --superlink: the hook that gives every installed device its SuperNode (else None)."""
    if not getattr(args, "superlink", None):
        return None
    from client.supernode import SuperNodeManager

    return SuperNodeManager(args.superlink, cfg.data, cfg.federated.partition, partition_of, num_partitions,
                            root_certificates=args.superlink_ca, auth_private_key=args.supernode_key)


def _partition(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(v) for v in text.split("/"))
        if 0 <= k < n:
            return k, n
    except ValueError:
        pass
    raise ConfigError(f"--data-partition {text!r} is not K/N with 0 <= K < N", "e.g. 0/3 for the first of three")


def _device(cfg, args) -> int:
    from client.agent import DeviceAgent
    from client.profile import budget_changed, device_profile
    from shared.messages import valid_device_id

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

    agent = DeviceAgent(args.id, fleet.broker, password, profile, folder, fleet.http_ca_file, fleet.heartbeat_s,
                        on_installed=installed)
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
        if nodes is not None:
            nodes.stop()
    return 0


def _devices(cfg, args) -> int:
    from client.fleet_sim import start_fleet

    fleet = cfg.fleet
    ids = [d.id for d in fleet.devices]
    nodes = _supernodes(cfg, args, {d: i for i, d in enumerate(ids)}, len(ids))  # device i owns partition i of n
    agents = start_fleet(fleet, args.root, args.only.split(",") if args.only else None,
                         on_installed=nodes.on_installed if nodes else None)
    print(f"simulating {len(agents)} devices", flush=True)
    threading.Thread(target=_report_changes, args=(agents,), daemon=True).start()
    try:
        _stop_event().wait()
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


def _acl(fleet, args) -> int:
    from server.mqtt_acl import write_broker_files

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    paths = write_broker_files(fleet, Path(args.out), args.port, args.bind, tls)
    print(f"wrote {', '.join(str(p) for p in paths.values())} for {len(fleet.devices)} devices; "
          f"run: mosquitto -c {paths['conf']}")
    return 0


def _status(args) -> int:
    """`restnet status`: a read-only client of the HTTP API, so it works wherever the coordinator is reachable."""
    url, ca_file = _coordinator_url(args)
    if args.watch is not None and args.watch <= 0:
        raise ConfigError("--watch needs a positive number of seconds")
    report = _status_report(url, ca_file, args.json)  # the first look must work, or the URL is wrong
    while True:
        if args.watch is not None and sys.stdout.isatty():
            print("\033[H\033[2J", end="")  # clear the terminal: a watch redraws in place
        print(report, flush=True)
        if args.watch is None:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        try:
            report = _status_report(url, ca_file, args.json)
        except RestnetError as exc:  # a coordinator restart should not end the watch
            report = f"{time.strftime('%H:%M:%S')} error: {exc}"


def _coordinator_url(args) -> tuple[str, str | None]:
    """(base URL, CA file) from --coordinator or the config's HTTP settings, as devices would reach it."""
    if args.config is None:
        url = args.coordinator or "http://127.0.0.1:8780"
        return (url if "://" in url else f"http://{url}").rstrip("/"), None
    from shared.config import load_config

    f = load_config(args.config).fleet
    host = "127.0.0.1" if f.http_host in ("0.0.0.0", "", "::") else f.http_host
    url = f.http_public_url or f"{'https' if f.http_cert_file else 'http'}://{host}:{f.http_port}"
    return url.rstrip("/"), f.http_ca_file


def _get_json(url: str, ca_file: str | None) -> tuple[object, float]:
    """(parsed JSON, the server's clock from the Date header) of a GET; every failure is one RestnetError."""
    import json
    import ssl
    import urllib.error
    import urllib.request
    from email.utils import parsedate_to_datetime

    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:
            body, date = resp.read(), resp.headers.get("Date")
        return json.loads(body), parsedate_to_datetime(date).timestamp() if date else time.time()
    except urllib.error.HTTPError as exc:
        raise RestnetError(f"the coordinator answered {url} with HTTP {exc.code}",
                           "is this the coordinator's HTTP address (fleet.http_port)?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RestnetError(f"cannot reach the coordinator at {url}: {reason}",
                           "is `restnet coordinator` running? pass its URL with --coordinator or --config") from None
    except ValueError:
        raise RestnetError(f"{url} did not answer JSON", "is this the coordinator's HTTP address?") from None


def _status_report(url: str, ca_file: str | None, as_json: bool) -> str:
    import json

    from server.status_page import ago, summary
    from shared.tables import format_table

    devices, now = _get_json(f"{url}/api/devices", ca_file)
    if as_json:
        return json.dumps(devices, indent=2)
    variants = _get_json(f"{url}/api/catalog", ca_file)[0].get("variants", [])
    headers = ["device", "presence", "state", "variant", "version", "memory", "compute", "last seen"]
    rows = [[d["id"], d["presence"], d["state"], d["variant_id"],
             None if d["variant_version"] is None else f"v{d['variant_version']}",
             f"{d['profile']['memory_mb']:g} MiB", d["profile"]["compute"], ago(d["last_seen"], now)]
            for d in devices]
    if any(d["reason"] for d in devices):  # why a device failed, shortened to keep one line per device
        headers.append("reason")
        for row, d in zip(rows, devices):
            row.append((d["reason"] or "")[:60])
    table = format_table(headers, rows, align_right={4, 5, 6, 7})
    return f"{table}\n{summary(devices, variants)}  ({url}, {time.strftime('%H:%M:%S')})"


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
