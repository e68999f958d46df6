"""Child processes are stopped with everything they started: detached descendants (as the SuperLink's
`flower-superexec`), children that ignore SIGTERM, and SuperNodes that an install would start during shutdown."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fleet_helpers import install_from_catalog
from shared.node_data import NodeData
from shared.processes import ManagedProcess, descendants, process_table
from client.supernode import SuperNodeManager
from server.fl_runner import SuperLink
from shared.config import DataConfig, PartitionConfig

# A parent that starts a child in a new session (out of its process group, as flower-superlink starts its
# superexec) which ignores SIGTERM, writes the child's pid, then waits forever.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
        start_new_session=True)
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for its (new) parent to reap it."""
    return pid in process_table()


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return path.read_text()


def test_process_table_sees_a_child_and_its_start_time(tmp_path):
    proc = ManagedProcess("parent", [sys.executable, "-c", PARENT, str(tmp_path / "pid")], tmp_path / "log")
    proc.start()
    try:
        child = int(wait_for_file(tmp_path / "pid"))
        table = process_table()
        found = descendants(table, {proc.proc.pid})
        assert (child, table[child][2]) in found
        assert table[child][1] != proc.proc.pid  # in its own process group: a group kill would miss it
    finally:
        proc.stop(timeout=2.0)


def test_stop_reaches_a_detached_descendant_that_ignores_sigterm(tmp_path):
    proc = ManagedProcess("parent", [sys.executable, "-c", PARENT, str(tmp_path / "pid")], tmp_path / "log")
    proc.start()
    child = int(wait_for_file(tmp_path / "pid"))
    started = time.monotonic()
    proc.stop(timeout=2.0)
    assert not alive(child), "the detached child outlived stop()"
    assert proc.proc is None and time.monotonic() - started < 15


def test_stop_leaves_unrelated_processes_alone(tmp_path):
    """Only the tree below our process is signalled: a sibling started beside it keeps running."""
    bystander = ManagedProcess("bystander", [sys.executable, "-c", "import time; time.sleep(600)"],
                               tmp_path / "b.log")
    proc = ManagedProcess("parent", [sys.executable, "-c", PARENT, str(tmp_path / "pid")], tmp_path / "log")
    bystander.start()
    proc.start()
    try:
        wait_for_file(tmp_path / "pid")
        proc.stop(timeout=2.0)
        assert bystander.running
    finally:
        bystander.stop(timeout=2.0)


@pytest.fixture
def superlink(tmp_path):
    link = SuperLink(tmp_path / "superlink").start()
    yield link
    link.stop()


def supernode_tree(manager: SuperNodeManager, device: str) -> set[int]:
    """The pids of a device's SuperNode and everything below it."""
    pid = manager.nodes[device][1].process.proc.pid
    return {pid} | {p for p, _ in descendants(process_table(), {pid})}


@pytest.mark.slow
def test_supernode_manager_starts_restarts_and_stops_nodes(tiny_catalog, superlink, tmp_path):
    first, second = [v.id for v in tiny_catalog.variants[:2]]
    device = tmp_path / "cam-01"
    manager = SuperNodeManager(superlink.address, superlink.security,
                               DataConfig(dataset="digits", image_size=32, channels=1), PartitionConfig(),
                               {"cam-01": 0}, 2)
    try:
        install_from_catalog(tiny_catalog, first, device)
        manager.on_installed(device)
        manager.wait_ready()
        node = manager.nodes["cam-01"][1]
        pid = node.process.proc.pid
        manager.on_installed(device)  # the same variant again (a new version): the node keeps running
        assert manager.nodes["cam-01"][1].process.proc.pid == pid

        install_from_catalog(tiny_catalog, second, device)
        manager.on_installed(device)  # re-assigned: a new node config, so a new process
        manager.wait_ready()
        assert manager.nodes["cam-01"][0] == second
        assert manager.nodes["cam-01"][1].process.proc.pid != pid
        assert not alive(pid)
        assert NodeData.from_node_config(manager.nodes["cam-01"][1].node.to_node_config()).device_dir == device

        tree = supernode_tree(manager, "cam-01")
        manager.stop()
        assert not any(alive(p) for p in tree), "a SuperNode process outlived stop()"

        manager.on_installed(device)  # an install finishing during shutdown starts nothing
        assert manager.nodes == {}
    finally:
        manager.stop()


def test_an_exited_but_unreaped_child_counts_as_gone():
    """A zombie holds no resources but its pid: stop() must not wait for it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert child.pid not in process_table()
    finally:
        child.wait()


def test_a_server_whose_free_port_was_taken_meanwhile_moves_to_another(tmp_path, monkeypatch):
    """free_port() can only release the port it found: another process may bind it before ours does."""
    import socket

    from shared import processes

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    offered = iter([taken, processes.free_port()])
    monkeypatch.setattr(processes, "free_port", lambda: next(offered))

    def http_server(port: int) -> ManagedProcess:
        return ManagedProcess("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              tmp_path / f"http-{port}.log", ports=(port,))

    try:
        process, port = processes.start_server(http_server, None, timeout=30)
        assert port != taken and process.running
        process.stop()
        with pytest.raises(processes.PortTaken):  # a port the caller chose is not changed behind its back
            processes.start_server(http_server, taken, timeout=30)
    finally:
        squatter.close()
