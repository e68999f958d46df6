"""Fixtures for the fleet tests: a synthetic catalog, real brokers on free ports, real registries (a SQLite file,
a PostgreSQL started once per session), a budget oracle.

The catalog is real in every way that matters for delivery (Catalog, VariantRecord, Manifest, BlobStore, blocks
exported from actual randomly initialised stitched models, so `load_variant` works on a device); only the
costs and accuracies are chosen by hand so the tests know which variant fits which budget.
"""
from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.catalog import Catalog, VariantRecord
from shared.config import BrokerConfig, DeviceConfig, FleetConfig
from shared.errors import ConfigError
from shared.messages import TOPIC_ROOT, Enroll, Profile, decode_desired, encode, topic
from shared.mqtt import make_client

MIB = 1 << 20
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
COORDINATOR_USER, COORDINATOR_PASSWORD = "restnet-coordinator", "coordinator-secret"

# (variant front_cut, behind_cut, memory MiB, fine-tune MiB, latency ms, accuracy)
VARIANTS = [(1, 3, 8, 4, 2.0, 0.70), (2, 3, 24, 8, 5.0, 0.80), (4, 4, 64, 16, 12.0, 0.90)]
MARGIN = 0.2

# Three budgets: each gets a different best variant (needs with the 20% margin: 14.4, 38.4, 96 MiB).
DEVICES = [
    DeviceConfig("dev-small", memory_mb=20, compute=1.0, latency_ms=None, password="pw-small"),
    DeviceConfig("dev-mid", memory_mb=50, compute=0.5, latency_ms=20.0, password="pw-mid"),
    DeviceConfig("dev-large", memory_mb=200, compute=2.0, latency_ms=10.0, password="pw-large"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, alive: subprocess.Popen | None = None) -> None:
    """Until something listens on `port` (and, given `alive`, that process still runs: a server that could not
    bind exits at once, while whoever took the port answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (alive is None or alive.poll() is None):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if alive is None or alive.poll() is None:
                    return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def profile_of(d: DeviceConfig) -> Profile:
    return Profile(d.memory_mb, d.compute, d.latency_ms, agent_version="test")


# ---- the budget oracle (independent of server.assignment) ----------------------------------------------------

def fits(rec: VariantRecord, profile: Profile, margin: float = MARGIN) -> bool:
    memory_ok = (rec.memory_bytes + rec.finetune_memory_bytes) * (1 + margin) <= profile.memory_mb * MIB
    latency_ok = profile.latency_ms is None or rec.latency_ms / profile.compute <= profile.latency_ms
    return memory_ok and latency_ok


def best_fit(catalog: Catalog, profile: Profile, margin: float = MARGIN) -> VariantRecord | None:
    ok = [r for r in catalog.variants if fits(r, profile, margin)]
    return max(ok, key=lambda r: (r.expected_accuracy, -r.params)) if ok else None


def assert_assignment_ok(catalog: Catalog, profile: Profile, variant_id: str | None, margin: float = MARGIN) -> None:
    """Every assignment in every test: it fits the device's budget and nothing that fits is better."""
    best = best_fit(catalog, profile, margin)
    if variant_id is None:
        assert best is None, f"refused although {best.id} fits {profile}"
        return
    rec = catalog.get(variant_id)
    assert fits(rec, profile, margin), f"{variant_id} does not fit {profile}"
    assert best is not None and rec.expected_accuracy >= best.expected_accuracy, f"{variant_id} is not the best fit"


# ---- the synthetic catalog --------------------------------------------------------------------------------------

def _build_catalog(root: Path) -> Catalog:
    import torch

    from shared.artifacts import BlobStore, export_variant
    from shared.blocks import activation_specs, split_model
    from shared.catalog import ModelInfo
    from shared.variants import architecture_of
    from shared.models import create_model
    from shared.stitching import StitchedModel, StitchingLayer

    torch.manual_seed(0)
    shape = (1, 16, 16)
    infos, blocked = [], []
    for name in ("cifar_vgg13", "cifar_vgg11"):
        kwargs = {"width": 0.0625, "in_chans": 1, "num_classes": 4}
        bm = split_model(create_model(name, kwargs), name)
        blocked.append(bm)
        infos.append(ModelInfo(name, kwargs, bm.family, list(bm.block_names),
                               sum(p.numel() for p in bm.parameters()), 10**6))
    front, behind = blocked
    f_specs, b_specs = activation_specs(front, shape), activation_specs(behind, shape)
    catalog = Catalog(infos[0], infos[1], "slow_to_fast", "params", list(shape), 4, "synthetic", [], root=root)
    store = BlobStore(root / "blobs")
    for front_cut, behind_cut, mem, ft, latency, acc in VARIANTS:
        stitch = StitchingLayer(f_specs[front_cut - 1], b_specs[behind_cut - 1])
        model = StitchedModel(list(front.blocks[:front_cut]), stitch, list(behind.blocks[behind_cut:])).eval()
        vid = f"syn.{front_cut}_{behind_cut}"
        rec = VariantRecord(vid, infos[0].name, infos[1].name, front_cut, behind_cut, "slow_to_fast", acc,
                            stitch.kind, sum(p.numel() for p in model.parameters()), int(latency * 1e7),
                            mem * MIB, ft * MIB, sum(p.numel() for p in stitch.parameters()), latency,
                            accuracy=acc)
        arch = architecture_of(infos[0], infos[1], front_cut, behind_cut, f_specs[front_cut - 1],
                               b_specs[behind_cut - 1])
        catalog.add_manifest(rec, export_variant(model, vid, 1, arch, store, rec.manifest_record()))
        catalog.variants.append(rec)
    catalog.save(root)
    return catalog


@pytest.fixture(scope="session")
def _synthetic_catalog_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic-catalog")
    _build_catalog(root)
    return root


@pytest.fixture
def synthetic_catalog(tmp_path, _synthetic_catalog_template) -> Catalog:
    """A private copy per test (tests tamper with blobs and add versions)."""
    root = tmp_path / "catalog"
    shutil.copytree(_synthetic_catalog_template, root)
    return Catalog.load(root)


# ---- fleet configs and brokers ------------------------------------------------------------------------------

# ---- registries -------------------------------------------------------------------------------------------------

REGISTRIES = ["sqlite", "postgresql"]


def make_registry_url(request, tmp_path: Path, kind: str) -> str:
    """A fresh registry of that kind: a SQLite file in tmp_path or a new database of the session's PostgreSQL
    (`postgres_server` in conftest.py)."""
    if kind == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture(params=REGISTRIES)
def registry_url(request, tmp_path) -> str:
    """Each kind of registry in turn, empty: `fleet.registry` for it."""
    return make_registry_url(request, tmp_path, request.param)


def fleet_config(tmp_path: Path, broker_url: str, **overrides) -> FleetConfig:
    broker = BrokerConfig(url=broker_url, username=COORDINATOR_USER, password=COORDINATOR_PASSWORD)
    cfg = FleetConfig(broker=broker, registry=str(tmp_path / "fleet.db"), http_port=0, memory_margin=MARGIN,
                      heartbeat_s=1.0, stale_after_s=3.0, devices=[replace(d) for d in DEVICES],
                      catalog=str(tmp_path / "catalog"), device_root=str(tmp_path / "devices"))
    return replace(cfg, **overrides)


class Mosquitto:
    """A real Mosquitto on a free port with the password file, ACL and config `restnet acl` generates."""

    def __init__(self, folder: Path, fleet: FleetConfig, tls: tuple[str, str] | None = None):
        self.fleet, self.folder, self.tls = fleet, folder, tls
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> "Mosquitto":
        """On a free port; on another when that one was taken before Mosquitto could bind it."""
        from server.mqtt_acl import write_broker_files

        keep = self.port  # a restart keeps its port and its files (a test may have added logins to them)
        for attempt in range(1, attempts + 1):
            if not keep:
                self.port = free_port()
                self.paths = write_broker_files(self.fleet, self.folder, self.port, tls=self.tls,
                                                run_as=getpass.getuser())
            self.log = open(self.folder / "mosquitto.log", "ab")
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.paths["conf"])], stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_port(self.port, alive=self.proc)
                return self
            except TimeoutError:
                self.stop()
                if keep or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture
def mosquitto_broker(tmp_path):
    """Factory: `mosquitto_broker(fleet, tls=None)` starts a Mosquitto for that fleet; all are stopped after."""
    started: list[Mosquitto] = []

    def start(fleet: FleetConfig, tls: tuple[str, str] | None = None) -> Mosquitto:
        folder = tmp_path / f"mosquitto-{len(started)}"
        folder.mkdir()
        broker = Mosquitto(folder, fleet, tls).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def http_servers():
    """Factory: `http_servers(handler_class)` serves plain HTTP on a free port in a thread and returns its base URL
    (a stand-in for a broken or hostile artifact server); all are shut down after the test."""
    servers = []

    def start(handler: type[BaseHTTPRequestHandler]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200, headers: dict | None = None) -> None:
    """Answer with `body` and a Content-Length that says its true size."""
    handler.send_response(status)
    for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def embedded_broker_url() -> str:
    """The URL that makes the coordinator start its own embedded rumqttd on a free port."""
    return f"embedded://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem); devices trust cert.pem as CA."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return str(cert), str(key)


def start_agent(fleet: FleetConfig, device: DeviceConfig, tmp_path: Path, **kwargs):
    """A DeviceAgent for a configured device, with test-friendly retry and heartbeat periods."""
    from client.agent import DeviceAgent
    from shared.signing import load_verifier

    kwargs.setdefault("enroll_retry_s", 1.0)
    kwargs.setdefault("heartbeat_s", fleet.heartbeat_s)
    kwargs.setdefault("http_ca_file", fleet.http_ca_file)
    kwargs.setdefault("trusted", load_verifier(fleet.trusted_keys))
    return DeviceAgent(device.id, fleet.broker, device.password, profile_of(device),
                       tmp_path / "devices" / device.id, **kwargs).start()


@pytest.fixture(params=[(b, r) for b in ("mosquitto", "embedded") for r in REGISTRIES], ids="-".join)
def broker_fleet(request, tmp_path, mosquitto_broker) -> FleetConfig:
    """A fleet config whose broker is a real Mosquitto (password file + ACL) or the embedded rumqttd, and whose
    registry is a SQLite file or a PostgreSQL database."""
    broker, registry = request.param
    registry = make_registry_url(request, tmp_path, registry)
    if broker == "embedded":
        return fleet_config(tmp_path, f"embedded://127.0.0.1:{free_port()}", registry=registry)
    cfg = fleet_config(tmp_path, "mqtt://unused", registry=registry)
    broker = mosquitto_broker(cfg)
    return replace(cfg, broker=replace(cfg.broker, url=broker.url))


@pytest.fixture
def fleet_coordinator():
    """Factory: `fleet_coordinator(fleet, catalog)` starts a Coordinator; all are stopped after the test."""
    from server.coordinator import Coordinator

    started = []

    def start(fleet: FleetConfig, catalog: Catalog, attempts: int = 3):
        """An embedded broker whose free port was taken meanwhile moves to another: `fleet.broker.url` is
        updated in place, so agents started from the same config find it."""
        for attempt in range(1, attempts + 1):
            try:
                c = Coordinator(fleet, catalog).start()
                break
            except ConfigError as exc:
                if "embedded broker" not in str(exc) or attempt == attempts:
                    raise
                fleet.broker.url = f"embedded://127.0.0.1:{free_port()}"
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


@pytest.fixture
def device_agents(tmp_path):
    """Factory: `device_agents(fleet, device, **options)` starts a DeviceAgent; all are stopped after the test."""
    started = []

    def start(fleet: FleetConfig, device: DeviceConfig, **options):
        agent = start_agent(fleet, device, tmp_path, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


class RawClient:
    """A bare MQTT client (a hand-driven device, an intruder) that records what it receives, per topic."""

    def __init__(self, url: str, client_id: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None):
        import queue

        self.client, self.address = make_client(BrokerConfig(url=url, ca_file=ca_file), client_id, username, password,
                                                clean_session=True)
        self.messages: "queue.Queue" = queue.Queue()
        self.connack = None
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._subacks.put(codes)
        self._subacks: "queue.Queue" = queue.Queue()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self._connected.set()
        if reason_code.is_failure:
            client.disconnect()

    def connect(self, timeout: float = 5.0):
        """Connect and return the CONNACK reason code (None: no answer)."""
        self.client.connect(self.address.host, self.address.port, keepalive=60)
        self.client.loop_start()
        self._connected.wait(timeout)
        return self.connack

    def subscribe(self, topic_filter: str, timeout: float = 5.0):
        self.client.subscribe(topic_filter, qos=1)
        return self._subacks.get(timeout=timeout)

    def publish(self, topic_name: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic_name, payload, qos=1, retain=retain).wait_for_publish(5)

    def next_message(self, timeout: float = 5.0):
        import queue

        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw_clients():
    """Factory for RawClient; all are closed after the test."""
    made = []

    def make(*args, **kwargs) -> RawClient:
        c = RawClient(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def metric(coordinator, name: str, **labels) -> float:
    return coordinator.metrics.prom.get_sample_value(name, labels) or 0.0


def http(url: str, data: bytes | None = None, headers: dict | None = None, ca_file: str | None = None):
    """(status, body bytes, headers) of a GET (or POST when `data` is given), errors included."""
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def write_config(path: Path, fleet: FleetConfig) -> Path:
    """A complete fleet config YAML (the CLI's input) around `fleet`."""
    from dataclasses import asdict

    import yaml

    doc = {"name": "fleet-test", "large": {"name": "cifar_vgg13"}, "small": {"name": "cifar_vgg11"},
           "fleet": asdict(fleet)}
    path.write_text(yaml.safe_dump(doc))
    return path


def install_from_catalog(catalog, variant_id: str, device_dir: Path):
    """Place a catalog variant in a device folder the way the device agent does (`blobs/<sha256>` +
    `current.json`), for tests without a coordinator; enrolled devices download theirs."""
    from shared.artifacts import BlobStore, atomic_write

    manifest = catalog.manifest(variant_id)
    store = BlobStore(Path(device_dir) / "blobs")
    for block in manifest.blocks:
        if not store.has(block.sha256):
            store.put(catalog.store.read(block.sha256))
    atomic_write(Path(device_dir) / "current.json", manifest.to_bytes())
    return manifest


def install_ladder_from_catalog(catalog, variant_ids: list[str], device_dir: Path, running: int):
    """Place a ladder of catalog variants (largest first, each rung's memory need decreasing) the way the agent
    does, running rung number `running` (0 = the top); returns the rungs as `client.ladder_store` reads them."""
    from types import SimpleNamespace

    from client.ladder_store import RUNGS_DIR, read_ladder, set_running, write_ladder
    from shared.artifacts import atomic_write

    rungs = []
    # the top rung last: current.json is then the top rung's, as the agent leaves it
    for i, vid in reversed(list(enumerate(variant_ids))):
        manifest = install_from_catalog(catalog, vid, device_dir)  # blobs, and current.json
        atomic_write(Path(device_dir) / RUNGS_DIR / f"{manifest.sha256}.json", manifest.to_bytes())
        rungs.insert(0, SimpleNamespace(variant_id=vid, variant_version=manifest.version,
                                        manifest_sha256=manifest.sha256, memory_mb=10.0 * (len(variant_ids) - i)))
    write_ladder(device_dir, rungs)
    set_running(device_dir, read_ladder(device_dir)[running])
    return read_ladder(device_dir)


def request_count(registry, device_id: str) -> int:
    """Request ids the registry remembers for a device (0 without a row)."""
    row = registry.device(device_id)
    return len(row.requests) if row else 0


# ---- many devices over a few connections ---------------------------------------------------------------------

BUDGETS = [Profile(20, 1.0, None, agent_version="t"), Profile(50, 0.5, 20.0, agent_version="t"),
           Profile(200, 2.0, 10.0, agent_version="t"), Profile(10, 1.0, None, agent_version="t")]  # last: refused


def allow_loadgen(broker: Mosquitto, password: str, clients: int = 4) -> None:
    """Logins `loadgen-0..` that may enroll as any device and read any desired state: many simulated devices over
    a few connections (a real device may touch only its own topics)."""
    from server.mqtt_acl import password_hash

    with open(broker.paths["passwd"], "a") as fh:
        fh.writelines(f"loadgen-{i}:{password_hash(password)}\n" for i in range(clients))
    with open(broker.paths["acl"], "a") as fh:
        fh.writelines(f"user loadgen-{i}\ntopic write fleet/v1/dev/+/enroll\ntopic read fleet/v1/dev/+/desired\n"
                      for i in range(clients))
    broker.proc.send_signal(signal.SIGHUP)  # Mosquitto reloads its password file and ACL


class SimulatedDevices:
    """Many devices over a few connections: enroll, re-send until answered, record every desired state."""

    def __init__(self, url: str, password: str, publishers: int = 3):
        self.lock = threading.Lock()
        self.current: dict[str, tuple[str, Profile]] = {}  # device -> (request id, profile) it waits an answer for
        self.profiles: dict[tuple[str, str], Profile] = {}  # (device, request id) -> profile sent
        self.answered: set[str] = set()
        self.received = defaultdict(list)  # device -> every Desired that arrived, in arrival order
        self.clients = []
        subscribed = threading.Event()
        for i in range(publishers + 1):
            client, address = make_client(BrokerConfig(url=url), f"loadgen-{i}", f"loadgen-{i}", password, True)
            client.reconnect_delay_set(0.2, 2)
            if i == publishers:  # the listener: subscribes on every (re)connection, e.g. after a broker restart
                client.on_message = self._on_message
                client.on_connect = lambda c, *args: c.subscribe(f"{TOPIC_ROOT}/dev/+/desired", qos=1)
                client.on_subscribe = lambda *args: subscribed.set()
            client.connect(address.host, address.port, keepalive=60)
            client.loop_start()
            self.clients.append(client)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg):
        device_id = msg.topic.split("/")[3]
        desired = decode_desired(device_id, msg.payload)
        with self.lock:
            self.received[device_id].append(desired)
            if device_id in self.current and desired.request_id == self.current[device_id][0]:
                self.answered.add(device_id)

    def enroll(self, device_id: str, request_id: str, profile: Profile) -> None:
        with self.lock:
            self.current[device_id] = (request_id, profile)
            self.profiles[(device_id, request_id)] = profile
            self.answered.discard(device_id)
        self._send(device_id, request_id, profile)

    def _send(self, device_id: str, request_id: str, profile: Profile) -> None:
        client = self.clients[hash(device_id) % (len(self.clients) - 1)]
        client.publish(topic(device_id, "enroll"), encode(Enroll(device_id, request_id, profile)), qos=1)

    def resend_unanswered(self) -> int:
        with self.lock:
            pending = [(d, *self.current[d]) for d in self.current if d not in self.answered]
        for args in pending:
            self._send(*args)
        return len(pending)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()
