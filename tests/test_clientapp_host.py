"""The ClientApp hosted in the agent's process (`client.clientapp_host`) against Flower's real SuperLink and
SuperNodes on loopback: every message of a run is served in this process (no ClientApp process per message, no
`flower-superexec`), the variant loaded once, the rung a device runs trained, and a run of another app release
refused without training."""
from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest

from client import clientapp_host, fl_client
from client.clientapp_host import check_app_bundle
from client.fl_client import HISTORY
from client.supernode import SuperNode
from fleet_helpers import install_from_catalog, install_ladder_from_catalog
from server.fl_runner import SuperLink, flwr_run
from shared.catalog import Catalog
from shared.config import DataConfig, PartitionConfig
from shared.errors import RestnetError
from shared.node_data import NodeData

DATA = DataConfig(dataset="digits", image_size=32, channels=1)
pytestmark = pytest.mark.timeout(900)  # real Flower processes


def _history(device_dir) -> list[dict]:
    path = device_dir / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _run(catalog, tmp_path, rounds: int, devices: int = 2, prepare=None):
    """A SuperLink and `devices` hosted SuperNodes, each device folder made by `prepare(i, folder)` (default: the
    catalog's first variant installed); returns (the run's outcome, the device folders, the names of every process
    the SuperNodes started)."""
    prepare = prepare or (lambda i, folder: install_from_catalog(catalog, catalog.variants[0].id, folder))
    dirs = [tmp_path / f"dev{i}" for i in range(devices)]
    for i, d in enumerate(dirs):
        prepare(i, d)
    link = SuperLink(tmp_path / "flower").start()
    nodes = [SuperNode(NodeData(d, DATA, i, devices, PartitionConfig("iid")), link.address, link.security)
             for i, d in enumerate(dirs)]
    children: set[str] = set()
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
        config = {"catalog": str(catalog.root), "output-dir": str(tmp_path / "out"), "num-server-rounds": rounds,
                  "min-nodes": devices, "local-epochs": 1, "learning-rate": 0.02, "dataset": "digits",
                  "image-size": 32, "channels": 1, "round-timeout": 120.0, "query-timeout": 30.0}
        outcome = flwr_run(link.address, config, tmp_path / "flwr-home", tmp_path / "run.log", link.security, 600)
        for node in nodes:
            children |= {p.name() for p in psutil.Process(node.process.proc.pid).children(recursive=True)}
    finally:
        for node in nodes:
            node.stop()
        link.stop()
    return outcome, dirs, children


@pytest.mark.slow
def test_every_round_is_served_in_the_agents_process_with_the_variant_loaded_once(tiny_catalog, tmp_path):
    catalog_dir = tmp_path / "catalog"
    shutil.copytree(tiny_catalog.root, catalog_dir)
    fl_client._LOADED.clear()
    outcome, dirs, children = _run(Catalog.load(catalog_dir), tmp_path, rounds=2)
    assert outcome.ok, (outcome, (tmp_path / "run.log").read_text()[-3000:])
    assert not any("superexec" in name or "clientapp" in name for name in children), children
    for d in dirs:
        entries = _history(d)
        assert [e["round"] for e in entries] == [1, 2]
        assert all(e["pid"] == os.getpid() and e["hosted"] for e in entries)
        assert [e["front_cached"] for e in entries] == [False, True]
    # one verified model per device, reused by round 2 (a new process would have loaded it again)
    assert sorted(key[0] for key in fl_client._LOADED) == sorted(str(d) for d in dirs)


@pytest.mark.slow
def test_a_round_trains_the_rung_each_device_runs(tiny_catalog, tmp_path):
    """Device 0 holds a ladder (the two largest variants) and runs its lower rung; device 1 has the largest variant
    installed. The server's query sees the running rung, sends that rung's stitch, and its change comes back."""
    catalog_dir = tmp_path / "catalog"
    shutil.copytree(tiny_catalog.root, catalog_dir)
    catalog = Catalog.load(catalog_dir)
    top, lower = sorted(catalog.variants, key=lambda v: -v.params)[:2]

    def prepare(i, folder):
        if i == 0:
            install_ladder_from_catalog(catalog, [top.id, lower.id], folder, running=1)
        else:
            install_from_catalog(catalog, top.id, folder)

    outcome, dirs, _ = _run(catalog, tmp_path, rounds=1, prepare=prepare)
    assert outcome.ok, (outcome, (tmp_path / "run.log").read_text()[-3000:])
    assert [e["variant_id"] for e in _history(dirs[0])] == [lower.id]
    assert [e["variant_id"] for e in _history(dirs[1])] == [top.id]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    updates = {r["variant_id"]: r["num_updates"] for r in results["rounds"]}
    assert updates == {lower.id: 1, top.id: 1}
    assert _history(dirs[0])[0]["received_sha256"] == catalog.manifest(lower.id).stitch_block().sha256


@pytest.mark.slow
def test_a_run_of_another_release_is_refused_and_nothing_is_trained(tiny_catalog, tmp_path, monkeypatch):
    catalog_dir = tmp_path / "catalog"
    shutil.copytree(tiny_catalog.root, catalog_dir)
    monkeypatch.setattr(clientapp_host, "version", lambda name: "0.0.0-other")  # this "device" runs another release
    outcome, dirs, _ = _run(Catalog.load(catalog_dir), tmp_path, rounds=1, devices=1)
    assert all(_history(d) == [] for d in dirs)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(r["num_updates"] == 0 and r["failed"] == 1 for r in results["rounds"]), results["rounds"]


def test_the_app_bundle_must_be_this_release_of_ours():
    from importlib.metadata import version

    ours = version("restnet-fleet")
    check_app_bundle("restnet-fleet/restnet-fleet", ours)
    with pytest.raises(RestnetError, match="this device runs restnet-fleet"):
        check_app_bundle("someone/other-app", ours)
    with pytest.raises(RestnetError, match="same restnet-fleet release"):
        check_app_bundle("restnet-fleet/restnet-fleet", ours + ".post1")
