"""Running Flower processes for a device: its SuperNode, started after a variant is installed.

Flower processes spawn children (`flower-superexec`, then one `flwr-clientapp` per message) that outlive a plain
kill of their parent, so every process here starts in its own session (= process group) and is stopped as a
group: SIGTERM (the SuperNode then tells the SuperLink it is leaving), SIGKILL after a grace period, and then we
wait until its ports are free so a restart can bind them again. `ManagedProcess` is also what
`server.fl_runner` uses for the SuperLink.

The SuperNode's node config points at the device folder and its data (`client.local_data.NodeData`); its Flower
state (the installed app bundles) lives in `<device-dir>/flwr` and its log in `<device-dir>/supernode.log`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

from client.local_data import NodeData
from shared.errors import RestnetError

HOST = "127.0.0.1"


def flower_executable(name: str) -> str:
    """A Flower command from this Python's environment (a venv's bin folder need not be on PATH)."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    raise RestnetError(f"{name} not found next to {sys.executable}", "install the project: pip install -e .")


def flower_env(extra: dict) -> dict:
    """The environment for a Flower process: ours, plus `extra`, with this environment's bin folder first on
    PATH (the SuperLink and SuperNode start `flower-superexec` by name)."""
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def node_config_arg(cfg: dict) -> str:
    """`key="value" n=3` as `flower-supernode --node-config` expects (strings quoted, TOML scalars otherwise)."""
    parts = []
    for key, value in cfg.items():
        if isinstance(value, str) and '"' in value:
            raise RestnetError(f"node config value of {key} may not contain a double quote: {value!r}")
        parts.append(f"{key}={json.dumps(value)}")
    return " ".join(parts)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class ManagedProcess:
    """A long-running Flower process in its own process group, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None,
                 ports: tuple[int, ...] = ()):
        self.name, self.cmd, self.log_path, self.ports = name, cmd, Path(log_path), ports
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        for port in self.ports:
            if not port_free(HOST, port):
                raise RestnetError(f"{self.name}: port {port} is in use", "stop what holds it or pick another port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=flower_env(self.env), start_new_session=True)

    def wait_ready(self, port: int, timeout: float = 60.0) -> None:
        """Wait until `port` accepts connections; if the process dies or times out, stop it and raise."""
        deadline = time.monotonic() + timeout
        while not port_open(HOST, port):
            if not self.running or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RestnetError(f"{self.name} did not come up on port {port}:\n{tail}")
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL) and wait until its ports are free."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        self._signal(pgid, signal.SIGTERM)
        if not self._wait_group(pgid, timeout):
            self._signal(pgid, signal.SIGKILL)
            self._wait_group(pgid, 10.0)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + timeout
        while any(not port_free(HOST, p) for p in self.ports) and time.monotonic() < deadline:
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the group at once, as a crash or power loss would (no goodbye to the SuperLink)."""
        if self.proc is not None:
            self._signal(self.proc.pid, signal.SIGKILL)
            self.stop(timeout=10.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _signal(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _wait_group(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()  # reap the leader so it does not linger as a zombie
            if not _group_alive(pgid):
                return True
            time.sleep(0.1)
        return False


class SuperNode:
    """A device's `flower-supernode`, connected to a SuperLink, running our ClientApp for its installed variant."""

    def __init__(self, node: NodeData, superlink: str, port: int | None = None,
                 root_certificates: str | None = None, auth_private_key: str | None = None):
        """`root_certificates`: the CA of a TLS SuperLink (plain HTTP without it); `auth_private_key`: this
        device's key when the SuperLink runs with --enable-supernode-auth (see docs/DEPLOY.md)."""
        self.node, self.superlink = node, superlink
        self.port = port or free_port()  # the node's local runtime API (its superexec talks to it)
        self.security = ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
        if auth_private_key:
            self.security += ["--auth-supernode-private-key", str(auth_private_key)]
        self.process: ManagedProcess | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self, wait: bool = True) -> "SuperNode":
        """Start the SuperNode; with `wait`, return once it is up (start many with wait=False, then wait_ready)."""
        device_dir = self.node.device_dir
        cmd = [flower_executable("flower-supernode"), *self.security, "--superlink", self.superlink,
               "--port", str(self.port), "--node-config", node_config_arg(self.node.to_node_config())]
        self.process = ManagedProcess(f"supernode {device_dir.name}", cmd, device_dir / "supernode.log",
                                      env={"FLWR_HOME": str(device_dir / "flwr")}, ports=(self.port,))
        self.process.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.process.wait_ready(self.port, timeout)

    def stop(self, timeout: float = 15.0) -> None:
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
    ClientApp reads the installed variant on every message). Use `on_installed` as the agent's hook."""

    def __init__(self, superlink: str, data, partition, partition_of: dict[str, int], num_partitions: int,
                 **supernode_options):
        """`partition_of[device id]` is the device's share of the dataset, out of `num_partitions`."""
        self.superlink, self.data, self.partition = superlink, data, partition
        self.partition_of, self.num_partitions = partition_of, num_partitions
        self.options = supernode_options
        self.nodes: dict[str, tuple[str, SuperNode]] = {}  # device id -> (variant id, its SuperNode)
        self.lock = threading.Lock()

    def on_installed(self, device_dir: Path) -> None:
        from client.fl_client import installed_variant

        device_dir = Path(device_dir)
        variant = installed_variant(device_dir)["variant-id"]
        with self.lock:
            known = self.nodes.get(device_dir.name)
            if known is not None and known[0] == variant:
                return
            node_data = NodeData(device_dir, self.data, self.partition_of[device_dir.name], self.num_partitions,
                                 self.partition)
            node = known[1].restart(node_data) if known else \
                SuperNode(node_data, self.superlink, **self.options).start(wait=False)
            self.nodes[device_dir.name] = (variant, node)

    def wait_ready(self) -> None:
        for _, node in list(self.nodes.values()):
            node.wait_ready()

    def stop(self) -> None:
        with self.lock:
            for _, node in self.nodes.values():
                node.stop()
            self.nodes.clear()

