"""Federated fine-tuning on Flower's real deployment engine: one flower-superlink and four flower-supernode
processes on loopback, started by our own launchers, two variants, two rounds, one node killed mid-round.
The run asks for int8 updates (the demo's end-to-end test runs the float16 default)."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from flwr.app import ArrayRecord

from client.fl_client import HISTORY
from fleet_helpers import install_from_catalog
from shared.node_data import NodeData
from shared.processes import HOST, port_free
from client.supernode import SuperNode, write_node_config
from server.fl_runner import SuperLink, commit_results, flwr_run
from shared.artifacts import BlobStore, Manifest, bytes_to_tensors
from shared.variants import load_variant
from shared.catalog import Catalog
from shared.config import DataConfig, PartitionConfig
from shared.errors import ConfigError
from shared.updates import encode_delta
from shared.vocabulary import INT8

DATA = DataConfig(dataset="digits", image_size=32, channels=1)
pytestmark = pytest.mark.timeout(900)  # real Flower processes: minutes on a loaded 2-core machine


def _events(out) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _history(device_dir) -> dict[int, dict]:
    path = device_dir / HISTORY
    return {e["round"]: e for e in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


def test_node_config_survives_flowers_own_parser(tmp_path):
    from flwr.common.config import parse_config_args  # what flower-supernode applies to --node-config

    node = NodeData(tmp_path / "dev 1", DataConfig(dataset="imagefolder", root=str(tmp_path / 'my "quoted" images')),
                    2, 5, PartitionConfig("dirichlet", 0.3, 7))
    parsed = parse_config_args([str(write_node_config(node))])
    assert parsed == node.to_node_config()
    assert NodeData.from_node_config(parsed) == node


def test_node_config_errors_name_the_problem(tmp_path):
    cfg = NodeData(tmp_path, DATA, 0, 2, PartitionConfig()).to_node_config()
    with pytest.raises(ConfigError, match="partition-id 2 is outside 0..1"):
        NodeData.from_node_config({**cfg, "partition-id": 2})
    with pytest.raises(ConfigError, match="lacks the data settings channels"):
        NodeData.from_node_config({k: v for k, v in cfg.items() if k != "channels"})


@pytest.mark.slow
def test_two_variants_two_rounds_with_a_node_killed_mid_round(tiny_catalog, tmp_path):
    catalog_dir = tmp_path / "catalog"
    shutil.copytree(tiny_catalog.root, catalog_dir)  # the session's catalog stays untouched
    catalog = Catalog.load(catalog_dir)
    variants = [v.id for v in catalog.variants[:2]]
    first_stitch = {vid: catalog.manifest(vid).stitch_block().sha256 for vid in variants}
    devices = [tmp_path / f"dev{i}" for i in range(4)]
    assigned = {d: variants[i % 2] for i, d in enumerate(devices)}
    for d, vid in assigned.items():
        install_from_catalog(catalog, vid, d)

    out = tmp_path / "out"
    link = SuperLink(tmp_path / "flower").start()
    nodes = [SuperNode(NodeData(d, DATA, i, len(devices), PartitionConfig("dirichlet", 0.5, 0)), link.address,
                       link.security) for i, d in enumerate(devices)]
    outcome: dict = {}
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
        config = {"catalog": str(catalog_dir), "output-dir": str(out), "num-server-rounds": 2, "min-nodes": 4,
                  "local-epochs": 1, "learning-rate": 0.02, "dataset": "digits", "image-size": 32, "channels": 1,
                  "update-format": INT8,
                  # A killed node is declared offline by the SuperLink within 60 s (missed heartbeats), which
                  # ends the round before this timeout; the margin is for a loaded 2-core machine.
                  "round-timeout": 120.0, "query-timeout": 30.0}

        def submit():
            try:
                outcome["run"] = flwr_run(link.address, config, tmp_path / "flwr-home", tmp_path / "run.log",
                                          link.security, 360)
            except BaseException as exc:  # surfaced by the main thread
                outcome["error"] = exc

        runner = threading.Thread(target=submit)
        runner.start()
        # Kill a node of variants[0] as soon as round 1's training requests are out: its reply never comes.
        _wait_for(lambda: any(e["event"] == "train_sent" and e["round"] == 1 for e in _events(out)), 180,
                  "round 1 training requests")
        victim = nodes[0]
        victim.process.kill()
        victim.start()  # back (with a new node id) before round 2
        runner.join(360)
        assert not runner.is_alive(), "the run did not finish"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["run"].ok, (outcome["run"], (tmp_path / "run.log").read_text()[-3000:])
    finally:
        for node in nodes:
            node.stop()
        link.stop()
    assert all(port_free(HOST, p) for p in [link.port] + [n.port for n in nodes])

    results = json.loads((out / "results.json").read_text())
    rounds = {(r["round"], r["variant_id"]): r for r in results["rounds"]}
    assert set(rounds) == {(r, v) for r in (1, 2) for v in variants}

    # Round 1 completed from the others; round 2 included the restarted node again.
    assert rounds[1, variants[0]]["num_updates"] == 1 and rounds[1, variants[0]]["dropped"] == 1
    assert rounds[1, variants[1]]["num_updates"] == 2
    for vid in variants:
        assert rounds[2, vid]["num_updates"] == 2 and rounds[2, vid]["num_nodes"] == 2
    # The killed node's round-1 reply never reached the server (its training, hosted in this process, may have
    # finished: the reply had no SuperNode to go through); the restarted node took part in round 2.
    assert 2 in _history(devices[0])

    for (rnd, vid), rec in rounds.items():
        assert rec["rejected"] == {} and rec["failed"] == 0
        assert 0.0 <= rec["accuracy"] <= 1.0  # per-variant accuracy, every round
        # Only stitching-layer tensors travel: each update is exactly the variant's stitch, as an int8 change.
        stitch = bytes_to_tensors(catalog.store.read(first_stitch[vid]))
        wire = encode_delta(stitch, stitch, INT8)
        assert rec["update_bytes"] == rec["num_updates"] * ArrayRecord(wire).count_bytes()

    # Every node received its own variant's current weights: the catalog's in round 1, round 1's aggregate in 2.
    for d, vid in assigned.items():
        for rnd, entry in _history(d).items():
            assert entry["variant_id"] == vid
            expected = first_stitch[vid] if rnd == 1 else rounds[1, vid]["stitch_sha256"]
            assert entry["received_sha256"] == expected

    # Closing the loop: new versions in the catalog; delivering one to a device adds only the stitch blob.
    committed, refused = commit_results(catalog_dir, out)
    assert dict(committed) == {vid: 2 for vid in variants} and refused == []
    catalog = Catalog.load(catalog_dir)
    for d, vid in assigned.items():
        before = set(p.name for p in (d / "blobs").iterdir())
        manifest = install_from_catalog(catalog, vid, d)
        added = set(p.name for p in (d / "blobs").iterdir()) - before
        assert added == {manifest.stitch_block().sha256} == {results["variants"][vid]["stitch_sha256"]}
        installed = Manifest.from_bytes((d / "current.json").read_bytes())
        assert installed.version == 2 and installed.stitch_block().sha256 == results["variants"][vid]["stitch_sha256"]
        load_variant(installed, BlobStore(d / "blobs"))  # every hash verified
        assert catalog.get(vid).accuracy == pytest.approx(results["variants"][vid]["accuracy"])
