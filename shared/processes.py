"""Long-running child processes (Flower's SuperLink and SuperNodes) that are stopped with everything they started.

Flower processes spawn children of their own: each SuperNode a `flower-superexec` that starts one
`flwr-clientapp` per run, the SuperLink a `flower-superexec` **in a new session** that starts `flwr-serverapp`.
A kill of the parent does not reach them: the SuperNode's children share its process group, the SuperLink's do
not. So every `ManagedProcess` starts in its own session (= process group) and, when stopped, follows its whole
process tree, detached sessions included: SIGTERM to the group and to every descendant (the SuperNode then tells
the SuperLink it is leaving), SIGKILL to whatever outlives a grace period, then wait until its ports are free so
a restart can bind them again. A descendant is recognised by pid *and* start time, so a recycled pid is never
signalled.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import RestnetError

HOST = "127.0.0.1"
PROC = Path("/proc")


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


class PortTaken(RestnetError):
    """A server process found its port taken (another process bound it after `free_port` chose it)."""


_ADDRESS_IN_USE = re.compile(r"address already in use|errno 98", re.IGNORECASE)


def start_server(make: Callable[[int], "ManagedProcess"], port: int | None, timeout: float = 60.0,
                 attempts: int = 3) -> tuple["ManagedProcess", int]:
    """Start the process `make(port)` builds and wait until it serves `port`. Without a given port it takes a free
    one, and another if that one was taken before the process could bind it (free_port() can only release it)."""
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        process = make(chosen)
        try:
            process.start()
            process.wait_ready(chosen, timeout)
            return process, chosen
        except PortTaken:
            if port is not None or attempt == attempts:
                raise
    raise AssertionError("unreachable")


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


# ---- the process table ----------------------------------------------------------------------------------

ProcessKey = tuple[int, int]  # (pid, start time in clock ticks since boot): unique even when pids are recycled


def process_table() -> dict[int, tuple[int, int, int]]:
    """Every live process: pid -> (parent pid, process group, start time). Zombies are left out: they have exited
    and only wait to be reaped. Empty where there is no /proc (then only groups are followed)."""
    table = {}
    if not PROC.is_dir():
        return table
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited while we looked
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
        state, ppid, pgid, start = fields[0], int(fields[1]), int(fields[2]), int(fields[19])
        if state != "Z":
            table[int(stat.parent.name)] = (ppid, pgid, start)
    return table


def descendants(table: dict, roots: set[int]) -> set[ProcessKey]:
    """The processes below `roots` in `table` (any session or group), as (pid, start time)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add((child, table[child][2]))
            todo.append(child)
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal_process(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


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
                raise PortTaken(f"{self.name}: port {port} is in use", "stop what holds it or pick another port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=flower_env(self.env), start_new_session=True)

    def wait_ready(self, port: int, timeout: float = 60.0) -> None:
        """Wait until `port` accepts connections; if the process dies or times out, stop it and raise (PortTaken
        when it could not bind the port)."""
        deadline = time.monotonic() + timeout
        while not (port_open(HOST, port) and self.running):
            if not self.running or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                error = PortTaken if _ADDRESS_IN_USE.search(tail) else RestnetError
                raise error(f"{self.name} did not come up on port {port}:\n{tail}")
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Stop the process and everything it started (`sig`, then SIGKILL after `timeout` seconds) and wait
        until its ports are free."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        tracked = descendants(process_table(), {pgid})  # before any signal: orphans lose their place in the tree
        _signal_group(pgid, sig)
        for pid, _ in tracked:
            _signal_process(pid, sig)
        left = self._wait_gone(pgid, tracked, timeout)
        if left:
            _signal_group(pgid, signal.SIGKILL)
            for pid in left:
                _signal_process(pid, signal.SIGKILL)
            self._wait_gone(pgid, tracked, 10.0)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + timeout
        while any(not port_free(HOST, p) for p in self.ports) and time.monotonic() < deadline:
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the process and everything it started at once, as a crash or power loss would (no goodbye to
        the SuperLink)."""
        self.stop(timeout=10.0, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_gone(self, pgid: int, tracked: set[ProcessKey], timeout: float) -> set[int]:
        """Wait until the group and every tracked process has exited (children they start meanwhile are
        signalled and tracked too); returns the pids still alive after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()  # reap the leader so it does not linger as a zombie
            table = process_table()
            if not PROC.is_dir():  # follow the group only
                try:
                    os.killpg(pgid, 0)
                    alive = {pgid}
                except ProcessLookupError:
                    alive = set()
            else:
                alive = {pid for pid, start in tracked if table.get(pid, (0, 0, None))[2] == start}
                leader = {pgid} if self.proc.returncode is None else set()
                started = descendants(table, alive | leader) - tracked
                for pid, _ in started:  # children started while we wait get the same signal first
                    _signal_process(pid, signal.SIGTERM)
                tracked |= started
                alive |= {pid for pid, _ in started}
                alive |= {pid for pid, (_, group, _) in table.items() if group == pgid}
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)
