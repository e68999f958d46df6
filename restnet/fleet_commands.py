"""`restnet coordinator | acl | status`: the operator's fleet commands."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from restnet.signals import stop_event
from shared.config import load_config
from shared.errors import ConfigError, RestnetError


def add_parsers(subparsers) -> None:
    c = subparsers.add_parser("coordinator", help="run the fleet coordinator (MQTT enrollment, artifact HTTP, metrics)",
                              description="Serve enrollments over MQTT and artifacts, /metrics and /api over HTTP "
                                          "until interrupted.")
    c.add_argument("--config", required=True, help="fleet config YAML")
    c.add_argument("--catalog", help="catalog folder (default: fleet.catalog from the config)")
    c.add_argument("--instance", type=int, default=1,
                   help="which of the fleet.cluster.coordinators this one is, 1..N (default 1): its MQTT login")
    c.set_defaults(func=_coordinator)

    a = subparsers.add_parser("acl", help="write a Mosquitto password file, ACL and config for the fleet",
                              description="Per-device credentials: each device may only use its own topics.")
    a.add_argument("--config", required=True, help="fleet config YAML")
    a.add_argument("--out", required=True, help="output folder (passwd, acl, mosquitto.conf)")
    a.add_argument("--port", type=int, default=1883, help="listener port in mosquitto.conf (default 1883)")
    a.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1)")
    a.add_argument("--tls-cert", help="server certificate for an mqtts listener")
    a.add_argument("--tls-key", help="its private key")
    a.set_defaults(func=_acl)

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


def _coordinator(args) -> int:
    from server.coordinator import Coordinator
    from shared.catalog import Catalog

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fleet = load_config(args.config).fleet
    catalog = Catalog.load(args.catalog or fleet.catalog)
    coordinator = Coordinator(fleet, catalog, args.instance).start()
    print(f"coordinator: {len(catalog.variants)} variants, broker {fleet.broker.url}, http {coordinator.public_url} "
          f"(/metrics, /api/devices)", flush=True)
    try:
        stop_event().wait()
    finally:
        coordinator.stop()
    return 0


def _acl(args) -> int:
    from server.mqtt_acl import write_broker_files

    fleet = load_config(args.config).fleet
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

    fleet = load_config(args.config).fleet
    return fleet.public_url(), fleet.http_ca_file


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
    if any(d["rungs"] for d in devices):  # ladders: the rung each device runs now, and where it is on its ladder
        headers.append("runs now")
        for row, d in zip(rows, devices):
            at = f" ({d['rungs'].index(d['running']) + 1} of {len(d['rungs'])})" if d["running"] in d["rungs"] else ""
            row.append(f"{d['running']}{at}")
    if any(d["reason"] for d in devices):  # why a device failed, shortened to keep one line per device
        headers.append("reason")
        for row, d in zip(rows, devices):
            row.append((d["reason"] or "")[:60])
    table = format_table(headers, rows, align_right={4, 5, 6, 7})
    return f"{table}\n{summary(devices, variants)}  ({url}, {time.strftime('%H:%M:%S')})"


def summary(devices: list[dict], variants: list[dict]) -> str:
    """One line about the fleet (the status page's headline says the same)."""
    presence = {p: sum(d["presence"] == p for d in devices) for p in ("online", "stale", "offline")}
    installed = sum(d["state"] == "installed" for d in devices)
    used = {d["variant_id"] for d in devices if d["variant_id"] is not None}
    in_use = sum(v["id"] in used for v in variants)
    return (f"{len(devices)} devices · {presence['online']} online · {presence['stale']} stale · "
            f"{presence['offline']} offline · {installed} installed · {in_use} of {len(variants)} variants in use")


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0, round(now - ts))
    return f"{s} s ago" if s < 120 else f"{round(s / 60)} min ago" if s < 7200 else f"{round(s / 3600)} h ago"
