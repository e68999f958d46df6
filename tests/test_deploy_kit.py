"""The deployment kit in docker/ is consistent: what can be checked without a Docker engine, is.

- The compose files validate with docker-compose (`config`), and every service, volume, file and image they refer
  to exists; the services the kit promises are there.
- The fleet config the containers share fits the compose file: broker host and port, the coordinator's public URL,
  the devices started, the SuperLink port; the coordinator cluster: one service per fleet.cluster.coordinators
  with its --instance, all on the PostgreSQL service the registry URL names, with its credentials.
- The broker config works with the password file and ACL that `restnet acl` generates: a real Mosquitto is
  started with them (on free loopback ports), and a device can log in with its password, not with another, and
  cannot subscribe to another device's topics.
- Prometheus scrapes the coordinator service on its HTTP port; the Grafana dashboard parses, and each panel's
  PromQL uses only metric names the coordinator really exports (read from server/metrics.py's registry).
- The Dockerfiles copy paths that exist, install CPU torch, run as a non-root user, and have health checks; the
  device image's entrypoint passes its arguments through.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
TLS_COMPOSE = DOCKER / "docker-compose.tls.yml"
FLEET = DOCKER / "fleet.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fleet.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "fleet.yml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
MOSQUITTO_CONF = DOCKER / "mosquitto" / "mosquitto.conf"

# The metric names of the design (docs), used only if server/metrics.py cannot be imported.
DESIGN_METRICS = {
    "fleet_devices": "gauge", "fleet_enrollments_total": "counter", "fleet_assignment_duration_seconds": "histogram",
    "fleet_artifact_bytes_sent_total": "counter", "fleet_messages_rejected_total": "counter",
    "fleet_fl_rounds_total": "counter", "fleet_fl_update_bytes_total": "counter",
    "fleet_fl_updates_rejected_total": "counter", "fleet_variant_accuracy": "gauge",
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
                "offset", "inf", "nan", "Inf", "NaN"}


# --- helpers ----------------------------------------------------------------------------------------------------

def compose_config(*files: Path) -> dict:
    """`docker-compose -f ... config`: validates the files and prints the merged, resolved model."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed: ./bootstrap test installs Debian's docker-compose package"
    args = [exe]
    for f in files:
        args += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(args + ["config"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config(COMPOSE)


@pytest.fixture(scope="module")
def fleet_cfg():
    from shared.config import load_config

    return load_config(FLEET)


def exported_samples() -> set[str]:
    """Every sample name the coordinator's /metrics can carry (counters as _total, histograms as _bucket etc.)."""
    try:
        from server.metrics import FleetMetrics
    except ImportError:
        families = dict(DESIGN_METRICS)
    else:
        class AnyRegistry:  # the metrics only ask the registry for counts at scrape time
            def __getattr__(self, name):
                return lambda *args, **kwargs: {}

        families = {}
        for fam in FleetMetrics(AnyRegistry()).prom.collect():
            name = fam.name + "_total" if fam.type == "counter" and not fam.name.endswith("_total") else fam.name
            families[name] = fam.type
    samples = set()
    for name, kind in families.items():
        if kind == "counter":
            base = name[: -len("_total")] if name.endswith("_total") else name
            samples |= {base + "_total", base + "_created"}
        elif kind in ("histogram", "summary"):
            samples |= {name, name + "_sum", name + "_count", name + "_created"}
            if kind == "histogram":
                samples.add(name + "_bucket")
        else:
            samples.add(name)
    return samples


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are neither functions, keywords, labels nor strings."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors, incl. Grafana's $__rate_interval
    s = re.sub(r"\boffset\s+\S+", " ", s)
    s = re.sub(r"\$\w+", " ", s)  # other Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if re.fullmatch(r"\d+(\.\d+)?([eE][-+]?\d+)?", m.group()):
            continue
        following = s[m.end():].lstrip()
        if following.startswith("(") or m.group() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e3)
        names.add(m.group())
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def services_using(compose: dict, image_part: str) -> dict:
    return {n: s for n, s in compose["services"].items() if image_part in s.get("image", "")}


def device_services(compose: dict) -> dict:
    return {n: s for n, s in compose["services"].items() if "DEVICE_ID" in (s.get("environment") or {})}


# --- compose ----------------------------------------------------------------------------------------------------

def test_compose_has_every_part_of_the_kit(compose):
    services = compose["services"]
    for name in ("mosquitto", "postgres", "superlink", "coordinator", "coordinator-2", "prometheus", "grafana",
                 "credentials", "catalog"):
        assert name in services, f"compose lacks the {name} service"
    assert len(device_services(compose)) >= 3, "the compose file should start a few devices"
    assert "eclipse-mosquitto" in services["mosquitto"]["image"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_references_resolve(compose):
    services, declared = compose["services"], set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"
                assert ROOT in Path(source).parents, f"{name} mounts {source} from outside the repository"
            else:
                assert source in declared, f"{name} uses volume {source}, which is not declared"
        build = svc.get("build")
        if build:
            assert Path(build["context"]).resolve() == ROOT, f"{name} must build from the repository root"
            assert (ROOT / build.get("dockerfile", "Dockerfile")).is_file()
    used = {(v.split(":")[0] if isinstance(v, str) else v.get("source"))
            for s in services.values() for v in s.get("volumes") or []}
    assert not declared - used, f"declared volumes nobody uses: {declared - used}"


def test_our_images_are_built_not_pulled(compose):
    ours = services_using(compose, "restnet-fleet/")
    assert {"coordinator", "superlink", "credentials", "catalog"} <= set(ours)
    for name, svc in ours.items():
        assert "build" in svc, f"{name} uses our image {svc['image']} but cannot build it"
        dockerfile = svc["build"]["dockerfile"]
        expected = "Dockerfile.device" if svc["image"].startswith("restnet-fleet/device") else "Dockerfile.coordinator"
        assert dockerfile.endswith(expected), f"{name}: {svc['image']} is built from {dockerfile}"


def test_start_order(compose):
    s = compose["services"]

    def cond(svc, dep):
        return (s[svc].get("depends_on") or {}).get(dep, {}).get("condition")

    assert cond("mosquitto", "credentials") == "service_completed_successfully"
    assert cond("coordinator", "catalog") == "service_completed_successfully"
    assert cond("coordinator", "mosquitto") == "service_healthy"
    for name in device_services(compose):
        assert cond(name, "coordinator") == "service_healthy"
    for name in ("mosquitto", "superlink", "coordinator", "prometheus", "grafana", *device_services(compose)):
        assert "healthcheck" in s[name] and s[name]["healthcheck"].get("test"), f"{name} has no health check"


def test_commands_match_the_cli(compose):
    """The commands the containers run exist in `restnet`, with the arguments they are given."""
    from restnet.cli import build_parser

    s = compose["services"]
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("coordinator", "credentials", "fl"):
        argv = s[name]["command"]
        assert argv[0] in commands, (f"the {name} service runs `restnet {argv[0]}`, which `restnet` does not have: "
                                     f"register its module in restnet/cli.py")
        parser.parse_args(argv)  # SystemExit (a test error) on an unknown argument
    catalog_cmd = " ".join(s["catalog"]["command"])
    m = re.search(r"exec restnet (catalog build [^;|&]*)", catalog_cmd)
    assert m, catalog_cmd
    parser.parse_args(m.group(1).split())
    assert s["credentials"]["command"][0] == "acl"
    for name, svc in device_services(compose).items():  # the device image runs `restnet device --config --id ...`
        parser.parse_args(["device", "--config", "c.yaml", "--id", "x", *svc["command"]])
        assert "--superlink-insecure" in svc["command"], f"{name}: plain HTTP inside the compose network, said so"
    superlink = s["superlink"]
    assert superlink["entrypoint"] == ["flower-superlink"]
    assert "--disable-runtime-dependency-installation" in superlink["command"]


def test_fleet_config_fits_the_compose_file(compose, fleet_cfg):
    s = compose["services"]
    fleet = fleet_cfg.fleet
    broker = urlsplit(fleet.broker.url)
    assert broker.scheme == "mqtt" and broker.hostname == "mosquitto"
    listeners = re.findall(r"^listener[ \t]+(\d+)(?:[ \t]+(\S+))?[ \t]*$", MOSQUITTO_CONF.read_text(), re.M)
    assert (str(broker.port or 1883), "") in listeners, "the fleet's broker port is not a public Mosquitto listener"
    assert fleet.broker.username and fleet.broker.password, "restnet acl needs the coordinator's credentials"
    assert fleet.http_host == "0.0.0.0", "the coordinator must listen beyond its container's loopback"
    public = urlsplit(fleet.http_public_url or "")
    assert public.hostname == "coordinator" and public.port == fleet.http_port
    assert any(str(fleet.http_port) == str(p.get("target") if isinstance(p, dict) else p).split(":")[-1]
               for p in s["coordinator"].get("ports", [])), "the coordinator's HTTP port is not published"
    assert fleet.device_root.startswith("/data/")
    ids = {d.id: d for d in fleet.devices}
    for name, svc in device_services(compose).items():
        device_id = svc["environment"]["DEVICE_ID"]
        assert device_id in ids, f"{name} runs device {device_id}, which fleet.yaml does not list"
        assert ids[device_id].password, f"device {device_id} needs a password for the broker"
        assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in svc["volumes"]), \
            f"{name} needs its own volume for its device folder"
    assert f"--port={fleet_cfg.federated.superlink_port}" in s["superlink"]["command"]


def test_the_coordinator_cluster_shares_postgres_broker_and_catalog(compose, fleet_cfg):
    from restnet.cli import build_parser

    s = compose["services"]
    fleet = fleet_cfg.fleet
    registry = urlsplit(fleet.registry)
    assert registry.scheme == "postgresql" and registry.hostname == "postgres" and registry.password is None, \
        "the registry is the postgres service, its password from the environment (PGPASSWORD)"
    env = s["postgres"]["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (registry.username, registry.path.lstrip("/"))
    n = fleet.cluster.coordinators
    assert n >= 2, "the kit runs a coordinator cluster"
    names = ["coordinator"] + [f"coordinator-{k}" for k in range(2, n + 1)]
    for k, name in enumerate(names, start=1):
        svc = s[name]
        args = build_parser().parse_args(svc["command"])
        assert args.instance == k and args.config == "/config/fleet.yaml", name
        assert svc["environment"]["PGPASSWORD"] == env["POSTGRES_PASSWORD"], name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["mosquitto"]["condition"] == "service_healthy", name
        assert any(v.split(":")[:2] == ["coordinator-data", "/data"] for v in svc["volumes"]), name  # the catalog
    assert "healthcheck" in s["postgres"]


def test_catalog_and_coordinator_share_the_catalog_volume(compose, fleet_cfg):
    s = compose["services"]

    def data_volume(svc):
        return next(v.split(":")[0] for v in s[svc]["volumes"] if v.split(":")[1] == "/data")

    assert data_volume("catalog") == data_volume("coordinator")
    assert "/data/catalog" in s["coordinator"]["command"]
    assert fleet_cfg.fleet.catalog == "/data/catalog"
    # The ServerApp runs in the SuperLink's container and reads the catalog at the path `restnet fl run` names.
    assert data_volume("superlink") == data_volume("coordinator") == data_volume("fl")
    assert "--catalog=/data/catalog" in s["fl"]["command"]
    assert "--superlink=superlink:9091" in s["fl"]["command"]


def test_tls_overlay_validates_and_fits_its_fleet_config(fleet_cfg):
    from shared.config import load_config

    merged = compose_config(COMPOSE, TLS_COMPOSE)
    s = merged["services"]
    assert "--insecure" not in s["superlink"]["command"]
    flags = dict(a.split("=", 1) for a in s["superlink"]["command"] if "=" in a)
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert flags.get(flag, "").startswith("/tls/"), f"superlink {flag} should come from the tls volume"
    assert "tls:/tls:ro" in s["superlink"]["volumes"]
    from restnet.cli import build_parser

    parser = build_parser()
    for name, svc in device_services(merged).items():  # every SuperNode verifies the SuperLink with the CA
        args = parser.parse_args(["device", "--config", "c.yaml", "--id", "x", *svc["command"]])
        assert args.superlink_ca == "/tls/ca.crt" and not args.superlink_insecure, name
        assert "tls:/tls:ro" in svc["volumes"], name
    fl = parser.parse_args(s["fl"]["command"])
    assert fl.root_certificates == "/tls/ca.crt" and not fl.insecure and "tls:/tls:ro" in s["fl"]["volumes"]
    assert (s["mosquitto"]["depends_on"]["certs"]["condition"]) == "service_completed_successfully"
    tls_cfg = load_config(DOCKER / "fleet-tls.yaml")
    fleet = tls_cfg.fleet
    broker = urlsplit(fleet.broker.url)
    assert broker.scheme == "mqtts" and broker.hostname == "mosquitto"
    conf = (DOCKER / "mosquitto" / "mosquitto-tls.conf").read_text()
    assert re.search(rf"^listener {broker.port}$", conf, re.M), "fleet-tls.yaml's broker port is not a listener"
    assert not re.search(r"^listener 1883", conf, re.M), "the TLS broker must not keep a plain-text fleet listener"
    assert urlsplit(fleet.http_public_url).scheme == "https"
    for path in (fleet.broker.ca_file, fleet.http_cert_file, fleet.http_key_file, fleet.http_ca_file):
        assert path and path.startswith("/tls/"), path
    for name in ("coordinator", *device_services(merged)):
        vols = s[name]["volumes"]
        assert "tls:/tls:ro" in vols, f"{name} needs the CA and certificates"
        assert any(v.startswith(str(DOCKER / "fleet-tls.yaml") + ":/config/fleet.yaml") for v in vols), name
    assert s["coordinator"]["environment"]["RESTNET_HEALTH_URL"].startswith("https://")
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus-tls.yml").read_text())["scrape_configs"][0]
    assert prom["scheme"] == "https" and prom["tls_config"]["ca_file"].startswith("/etc/prometheus/tls/")
    # The two fleet configs describe the same fleet.
    assert [(d.id, d.memory_mb, d.compute, d.password) for d in fleet.devices] == \
        [(d.id, d.memory_mb, d.compute, d.password) for d in fleet_cfg.fleet.devices]
    assert (tls_cfg.large, tls_cfg.small, tls_cfg.data, tls_cfg.catalog, tls_cfg.federated) == \
        (fleet_cfg.large, fleet_cfg.small, fleet_cfg.data, fleet_cfg.catalog, fleet_cfg.federated)


# --- broker -----------------------------------------------------------------------------------------------------

class Broker:
    """Debian's Mosquitto with one of our configs, its /mosquitto/... paths moved into tmp_path, free ports."""

    def __init__(self, tmp_path: Path, conf_file: Path, fleet, tls_dir: Path | None = None):
        from server.mqtt_acl import write_broker_files

        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        assert exe, "mosquitto is not installed: ./bootstrap test installs Debian's mosquitto package"
        self.dir = tmp_path
        auth, conf_dir, data = tmp_path / "auth", tmp_path / "config", tmp_path / "data"
        for d in (conf_dir, data):
            d.mkdir(parents=True)
        write_broker_files(fleet, auth)  # what `restnet acl` writes: passwd, acl (and a conf we do not use)
        conf = conf_file.read_text()
        listeners = re.findall(r"^listener (\d+)(?: (\S+))?$", conf, flags=re.M)
        assert listeners, f"{conf_file.name} has no listener"
        self.ports = {}
        for port, bind in listeners:
            self.ports[int(port)] = free_port()
            conf = re.sub(rf"^listener {port}(?: \S+)?$", f"listener {self.ports[int(port)]} 127.0.0.1", conf,
                          flags=re.M)
        conf = conf.replace("/mosquitto/auth/", f"{auth}/").replace("/mosquitto/config/", f"{conf_dir}/")
        conf = conf.replace("/mosquitto/data/", f"{data}/")
        if tls_dir is not None:
            conf = conf.replace("/mosquitto/tls/", f"{tls_dir}/")
        unmapped = [ln for ln in conf.splitlines() if "/mosquitto/" in ln and not ln.lstrip().startswith("#")]
        assert not unmapped, f"paths of the broker config were not mapped: {unmapped}"
        if os.geteuid() == 0:  # as root Mosquitto would switch to the `mosquitto` user, who cannot read tmp_path
            conf = "user root\n" + conf
        shutil.copy(DOCKER / "mosquitto" / "health.acl", conf_dir / "health.acl")
        (conf_dir / "mosquitto.conf").write_text(conf)
        self.log = tmp_path / "mosquitto.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([exe, "-c", str(conf_dir / "mosquitto.conf")], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        for port in self.ports.values():
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "mosquitto did not open its ports"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def mqtt_session(port, user, password, subscribe=None, publish=(), wait_s=1.0, until_message=False, ca=None,
                 host="127.0.0.1"):
    """Connect (over TLS when `ca`); publish retained QoS-1 messages; subscribe and collect topics for `wait_s`."""
    import ssl

    import paho.mqtt.client as mqtt

    result = {"connect": None, "granted": None, "messages": set(), "error": None}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user or "health", protocol=mqtt.MQTTv311)
    client.reconnect_delay_set(0.02, 0.05)  # a refused login should not hold the test for paho's 1 s retry delay
    if user:
        client.username_pw_set(user, password)
    if ca:
        client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = lambda c, u, f, rc, p: result.update(connect=not rc.is_failure)
    client.on_subscribe = lambda c, u, mid, codes, p: result.update(granted=[not r.is_failure for r in codes])
    client.on_message = lambda c, u, m: result["messages"].add(m.topic)
    client.on_disconnect = lambda c, u, f, rc, p: result["connect"] is None and result.update(connect=False)
    try:
        client.connect(host, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        result.update(connect=False, error=repr(exc))
        return result
    client.loop_start()
    try:
        end = time.monotonic() + 3
        while result["connect"] is None and time.monotonic() < end:
            time.sleep(0.02)
        if result["connect"]:
            for topic in publish:
                client.publish(topic, b"{}", qos=1, retain=True).wait_for_publish(3)
            if subscribe:
                client.subscribe(subscribe, qos=1)
                end = time.monotonic() + wait_s
                while time.monotonic() < end and not (until_message and result["messages"]):
                    time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    return result


def test_broker_config_with_generated_credentials(tmp_path, fleet_cfg):
    """Real Mosquitto, our mosquitto.conf, the passwd and acl of `restnet acl`: logins and ACL behave."""
    fleet = fleet_cfg.fleet
    broker = Broker(tmp_path, MOSQUITTO_CONF, fleet)
    try:
        port, health = broker.ports[1883], broker.ports[1880]
        a, b = fleet.devices[:2]
        coord = mqtt_session(port, fleet.broker.username, fleet.broker.password, "fleet/v1/dev/+/enroll",
                             publish=[f"fleet/v1/dev/{a.id}/desired", f"fleet/v1/dev/{b.id}/desired"], wait_s=0.1)
        assert coord["connect"] and coord["granted"] == [True], coord
        own = mqtt_session(port, a.id, a.password, "fleet/v1/dev/+/desired")
        assert own["connect"], own
        assert own["messages"] == {f"fleet/v1/dev/{a.id}/desired"}, "a device must see its own desired state only"
        assert mqtt_session(port, a.id, "not-the-password")["connect"] is False
        assert mqtt_session(port, a.id, b.password)["connect"] is False
        assert mqtt_session(port, None, None)["connect"] is False, "anonymous logins must be refused"
        # The health listener is anonymous and loopback-only: $SYS yes, fleet topics no.
        sys_msgs = mqtt_session(health, None, None, "$SYS/broker/uptime", wait_s=3, until_message=True)["messages"]
        assert sys_msgs == {"$SYS/broker/uptime"}, "the health-check listener does not answer"
        assert not mqtt_session(health, None, None, "fleet/#", wait_s=0.5)["messages"], \
            "the anonymous health listener must not read fleet topics"
    finally:
        broker.stop()


def test_tls_broker_with_generated_certificates(tmp_path):
    """mosquitto-tls.conf with certificates from docker/tls/gen_certs.py: mqtts works, verified by the CA only."""
    from shared.config import load_config

    fleet = load_config(DOCKER / "fleet-tls.yaml").fleet
    tls = tmp_path / "tls"
    subprocess.run([sys.executable, str(DOCKER / "tls" / "gen_certs.py"), "--out", str(tls), "--device", "cam-01"],
                   check=True, capture_output=True, timeout=60)
    for name in ("ca.crt", "mosquitto.crt", "mosquitto.key", "coordinator.crt", "superlink.crt", "supernode-cam-01",
                 "supernode-cam-01.pub"):
        assert (tls / name).is_file(), name
    assert (tls / "mosquitto.key").stat().st_mode & 0o077 == 0, "private keys must be owner-only"
    broker = Broker(tmp_path / "broker", DOCKER / "mosquitto" / "mosquitto-tls.conf", fleet, tls_dir=tls)
    try:
        port = broker.ports[8883]
        a = fleet.devices[0]
        ok = mqtt_session(port, a.id, a.password, ca=tls / "ca.crt", host="localhost")
        assert ok["connect"], ok
        other_ca = tmp_path / "other"
        subprocess.run([sys.executable, str(DOCKER / "tls" / "gen_certs.py"), "--out", str(other_ca), "--host", "x"],
                       check=True, capture_output=True, timeout=60)
        assert mqtt_session(port, a.id, a.password, ca=other_ca / "ca.crt", host="localhost")["connect"] is False
        assert not mqtt_session(port, a.id, a.password)["connect"], "plain MQTT must not reach the TLS listener"
    finally:
        broker.stop()
    # Flower reads the SuperNode keys: OpenSSH EC keys on a NIST curve.
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert isinstance(load_ssh_private_key((tls / "supernode-cam-01").read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key((tls / "supernode-cam-01.pub").read_bytes()).curve, ec.SECP384R1)


# --- monitoring -------------------------------------------------------------------------------------------------

def test_prometheus_scrapes_the_coordinator(compose, fleet_cfg):
    doc = yaml.safe_load(PROMETHEUS.read_text())
    targets = [(job, t) for job in doc["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert targets, "prometheus.yml has no static targets"
    coordinator = [(job, t) for job, t in targets if t.split(":")[0] == "coordinator"]
    assert coordinator, f"no scrape target is the coordinator service: {targets}"
    for job, target in coordinator:
        assert target == f"coordinator:{fleet_cfg.fleet.http_port}"
        assert job.get("metrics_path", "/metrics") == "/metrics"
    for job, target in targets:
        assert target.split(":")[0] in compose["services"], f"{target} is not a compose service"
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(v.startswith(str(PROMETHEUS) + ":/etc/prometheus/prometheus.yml") for v in mounts)


def test_dashboard_parses_and_uses_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exported = exported_samples()
    assert dash.get("uid") and dash.get("title")
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    assert len(panels) >= 6
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource_uids = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    used = set()
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in datasource_uids, f"panel {panel['title']!r}: unknown datasource"
        for key in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][key], int)
        for target in panel["targets"]:
            names = promql_metrics(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - exported
            assert not unknown, (f"panel {panel['title']!r} queries {sorted(unknown)}, which the coordinator does "
                                 f"not export (it exports {sorted(n for n in exported if not n.endswith('_created'))})")
            used |= names
    # The dashboard covers the fleet's headline metrics.
    for name in ("fleet_devices", "fleet_enrollments_total", "fleet_assignment_duration_seconds_bucket",
                 "fleet_artifact_bytes_sent_total", "fleet_fl_rounds_total", "fleet_fl_updates_rejected_total",
                 "fleet_variant_accuracy", "fleet_devices_running", "fleet_rung_switches_total"):
        assert name in used, f"the dashboard shows nothing of {name}"


def test_promql_parser_finds_names():
    assert promql_metrics('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))') \
        == {"a_bucket"}
    assert promql_metrics("sum(rate(b_total[5m])) / sum(c) * 1e3 > bool 0") == {"b_total", "c"}


def test_grafana_provisioning_matches_the_mounts(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    providers = yaml.safe_load(DASH_PROVIDERS.read_text())["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"dashboards are provisioned from {path}, which is not mounted"
        assert Path(mounts[path]) == DASHBOARD.parent
    assert mounts.get("/etc/grafana/provisioning") == str(DOCKER / "grafana" / "provisioning")
    for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]:
        host = urlsplit(ds["url"]).hostname
        assert host in compose["services"], f"datasource points at {host}, not a compose service"


# --- Dockerfiles ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.device"])
def test_dockerfile(name):
    text = (DOCKER / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "--index-url https://download.pytorch.org/whl/cpu" in joined
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    # The dependency step reads pyproject.toml the way the Dockerfile does.
    m = re.search(r'python -c "([^"]+)"', joined)
    assert m, "dependency extraction step not found"
    out = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True, cwd=ROOT, check=True)
    import tomllib

    assert out.stdout.split() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_device_entrypoint_passes_arguments(tmp_path):
    """Run the device image's ENTRYPOINT with a stand-in `restnet` that prints its arguments."""
    text = (DOCKER / "Dockerfile.device").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    fake = tmp_path / "restnet"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "DEVICE_ID": "cam-01", "RESTNET_CONFIG": "/config/fleet.yaml"}
    out = subprocess.run(entry + ["--measure"], capture_output=True, text=True, env=env, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == ["device", "--config", "/config/fleet.yaml", "--id", "cam-01", "--measure"]
    env["DEVICE_ID"] = ""
    out = subprocess.run(entry, capture_output=True, text=True, env=env, timeout=10)
    assert out.returncode == 2 and "DEVICE_ID" in out.stderr
