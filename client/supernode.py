"""A device's Flower SuperNode, started after a variant is installed (a `shared.processes.ManagedProcess`).

By default the SuperNode runs with `--isolation process` and its tasks are served by a `ClientAppHost` in this
process (`client.clientapp_host`): the ClientApp stays warm between rounds, and no `flower-superexec` or
per-message `flwr-clientapp` process is started. `hosted=False` keeps Flower's own executor (a superexec child
starting one ClientApp process per message; stopping the SuperNode stops those too), which the round benchmark
compares against.

The SuperNode's node config (`<device-dir>/node-config.toml`) points at the device folder and its data
(`shared.node_data.NodeData`); its Flower state (the installed app bundles) lives in `<device-dir>/flwr` and its
log in `<device-dir>/supernode.log`.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.clientapp_host import ClientAppHost
from client.fl_client import app, installed_variant
from shared.artifacts import atomic_write
from shared.flower_link import LinkSecurity
from shared.node_data import NodeData
from shared.processes import ManagedProcess, PortTaken, flower_executable, free_port

log = logging.getLogger(__name__)
NODE_CONFIG = "node-config.toml"


def generate_supernode_key(path: Path) -> Path:
    """A SuperNode's identity for Flower's node authentication: an EC P-384 key pair in OpenSSH format
    (`path`, readable by its owner only, and `path.pub`, which the operator registers with the SuperLink).
    An existing key is kept: a device's identity does not change on restart."""
    path = Path(path)
    if not path.is_file():
        key = ec.generate_private_key(ec.SECP384R1())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
        atomic_write(Path(f"{path}.pub"), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH))
    return Path(f"{path}.pub")


def write_node_config(node: NodeData) -> Path:
    """The node config as a TOML file in the device folder (`flower-supernode --node-config FILE.toml` reads it):
    paths with spaces or quotes need no escaping of ours."""
    path = node.device_dir / NODE_CONFIG
    atomic_write(path, tomli_w.dumps(node.to_node_config()).encode())
    return path


class SuperNode:
    """A device's `flower-supernode`, connected to a SuperLink, running our ClientApp for its installed variant."""

    def __init__(self, node: NodeData, superlink: str, security: LinkSecurity, port: int | None = None,
                 auth_private_key: str | None = None, hosted: bool = True):
        """`security`: TLS with the SuperLink's CA, or insecure when asked for; `auth_private_key`: this device's
        key (`generate_supernode_key`) when the SuperLink admits registered SuperNodes only; `hosted`: run the
        ClientApp in this process (else Flower starts a process per message)."""
        self.node, self.superlink, self.hosted = node, superlink, hosted
        self.fixed_port = port is not None
        self.port = port or free_port()  # the node's local runtime API (its superexec talks to it)
        self.security = security.supernode_args()
        if auth_private_key:
            self.security += ["--auth-supernode-private-key", str(auth_private_key)]
        self.process: ManagedProcess | None = None
        self.host: ClientAppHost | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self, wait: bool = True) -> "SuperNode":
        """Start the SuperNode; with `wait`, return once it is up (start many with wait=False, then wait_ready)."""
        device_dir = self.node.device_dir
        cmd = [flower_executable("flower-supernode"), *self.security, "--superlink", self.superlink,
               "--port", str(self.port), "--node-config", str(write_node_config(self.node))]
        if self.hosted:
            cmd += ["--isolation", "process"]
        self.process = ManagedProcess(f"supernode {device_dir.name}", cmd, device_dir / "supernode.log",
                                      env={"FLWR_HOME": str(device_dir / "flwr")}, ports=(self.port,))
        self.process.start()
        if self.hosted and self.host is None:
            self.host = ClientAppHost(self.runtime_address, app, device_dir.name).start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Wait until it serves its port; a port chosen here but taken meanwhile by another process is changed."""
        for attempt in range(1, attempts + 1):
            try:
                return self.process.wait_ready(self.port, timeout)
            except PortTaken:
                if self.fixed_port or attempt == attempts:
                    raise
                self.port = free_port()
                self.stop()
                self.start(wait=False)

    @property
    def runtime_address(self) -> str:
        """Where the SuperNode serves its local runtime API (the ClientApp's executor talks to it); read when
        used, as `wait_ready` may move the port."""
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> None:
        if self.host is not None:
            self.host.stop()
            self.host = None
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None

    def restart(self, node: NodeData | None = None) -> "SuperNode":
        """Stop and start again, e.g. after a re-assignment installed another variant (new node config)."""
        self.stop()
        self.node = node or self.node
        return self.start()


class SuperNodeManager:
    """The device side of "a SuperNode per installed device": start a device's SuperNode on its first install,
    restart it when it is re-assigned to another variant (a new version of the same variant needs nothing: the
    ClientApp reads the installed variant on every message). Use `on_installed` as the agent's hook.

    After `stop`, installs start nothing: an agent still finishing an install while the program shuts down must
    not leave a SuperNode behind that nobody will stop."""

    def __init__(self, superlink: str, security: LinkSecurity, data, partition, partition_of: dict[str, int],
                 num_partitions: int, auth_key_of: Callable[[Path], Path | None] = lambda device_dir: None):
        """`partition_of[device id]` is the device's share of the dataset, out of `num_partitions`;
        `auth_key_of(device_dir)` the device's SuperNode key when the SuperLink authenticates SuperNodes."""
        self.superlink, self.security, self.data, self.partition = superlink, security, data, partition
        self.partition_of, self.num_partitions, self.auth_key_of = partition_of, num_partitions, auth_key_of
        self.nodes: dict[str, tuple[str, SuperNode]] = {}  # device id -> (variant id, its SuperNode)
        self.lock = threading.Lock()
        self.stopped = False

    def on_installed(self, device_dir: Path) -> None:
        device_dir = Path(device_dir)
        variant = installed_variant(device_dir)["variant-id"]
        with self.lock:
            if self.stopped:
                log.info("%s: installed %s after shutdown began; not starting its SuperNode", device_dir.name, variant)
                return
            known = self.nodes.get(device_dir.name)
            if known is not None and known[0] == variant:
                return
            node_data = NodeData(device_dir, self.data, self.partition_of[device_dir.name], self.num_partitions,
                                 self.partition)
            node = known[1].restart(node_data) if known else \
                SuperNode(node_data, self.superlink, self.security,
                          auth_private_key=self.auth_key_of(device_dir)).start(wait=False)
            self.nodes[device_dir.name] = (variant, node)

    def wait_ready(self) -> None:
        for _, node in list(self.nodes.values()):
            node.wait_ready()

    def stop(self) -> None:
        """Stop every node at once (each may wait out its grace period: in turn, a fleet would wait for all)."""
        with self.lock:
            self.stopped = True
            nodes = [node for _, node in self.nodes.values()]
            if nodes:
                with ThreadPoolExecutor(len(nodes)) as pool:
                    list(pool.map(SuperNode.stop, nodes))
            self.nodes.clear()

