"""Flower with TLS and SuperNode authentication, on real processes: a SuperLink over TLS that admits registered
SuperNodes only (`--enable-supernode-auth`), keys made and registered by our own code. A registered node trains;
a node with an unknown key is refused and the round completes without it; a node over TLS without a key may not
register itself (what `--enable-supernode-auth` forbids: Flower 1.41 lets key-less nodes self-register otherwise,
while a node holding a key only ever activates a registered one); plaintext clients cannot connect."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fleet_helpers import (fleet_config, fleet_coordinator, device_agents, install_from_catalog,  # noqa: F401
                           mosquitto_broker)

from client.fl_client import HISTORY
from client.fleet_sim import describe, settled
from client.supernode import SuperNode, SuperNodeManager, generate_supernode_key
from server.fl_runner import SuperLink, SuperLinkTLS, _connect, _flwr_json, flwr_run, register_supernode
from server.assignment import Assigner
from server.run_config import run_config
from shared.artifacts import Manifest, bytes_to_tensors
from shared.catalog import Catalog
from shared.config import Config, DataConfig, DeviceConfig, FederatedConfig, PartitionConfig
from shared.errors import RestnetError
from shared.flower_link import INSECURE, LinkSecurity
from shared.node_data import NodeData
from shared.signing import generate_key, load_signer

pytestmark = pytest.mark.timeout(900)  # real Flower processes: minutes on a loaded 2-core machine

ROOT = Path(__file__).resolve().parents[1]
DATA = DataConfig(dataset="digits", image_size=32, channels=1)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    """A development CA and a SuperLink certificate for 127.0.0.1, by the kit's own tool."""
    out = tmp_path_factory.mktemp("flower-tls")
    subprocess.run([sys.executable, str(ROOT / "docker" / "tls" / "gen_certs.py"), "--out", str(out), "--host",
                    "superlink"], check=True, capture_output=True)
    return out


def history(device_dir: Path) -> list[dict]:
    path = device_dir / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_only_registered_supernodes_over_tls_take_part(tiny_catalog, tls_dir, tmp_path):
    link = SuperLink(tmp_path / "flower", tls=SuperLinkTLS.from_dir(tls_dir), node_auth=True).start()
    security = link.security
    assert security == LinkSecurity(str((tls_dir / "ca.crt").resolve()))
    vid = tiny_catalog.variants[0].id
    devices = {name: tmp_path / name for name in ("member", "stranger", "keyless", "plaintext")}
    nodes = []
    try:
        for i, (name, d) in enumerate(devices.items()):
            install_from_catalog(tiny_catalog, vid, d)
            data = NodeData(d, DATA, i, len(devices), PartitionConfig())
            if name == "plaintext":
                nodes.append(SuperNode(data, link.address, INSECURE))
                continue
            if name == "keyless":
                nodes.append(SuperNode(data, link.address, security))
                continue
            key = d / "supernode-key"
            public = generate_supernode_key(key)
            if name == "member":
                assert register_supernode(link.address, security, public, tmp_path / "operator") > 0
            nodes.append(SuperNode(data, link.address, security, auth_private_key=str(key)))
        for node in nodes:
            node.start(wait=False)
        listed = _flwr_json(["supernode", "list", "restnet"], _connect(tmp_path / "operator", link.address, security))
        assert len(listed["nodes"]) == 1  # the member's key alone is registered
        with pytest.raises(RestnetError, match="unavailable"):  # a plaintext client of the Control API gets nowhere
            _flwr_json(["supernode", "list", "restnet"], _connect(tmp_path / "plain", link.address, INSECURE))

        config = {"catalog": str(tiny_catalog.root), "output-dir": str(tmp_path / "out"), "num-server-rounds": 1,
                  "min-nodes": 1, "wait-nodes-timeout": 30.0, "query-timeout": 30.0, "round-timeout": 120.0,
                  "dataset": "digits", "image-size": 32, "channels": 1}
        outcome = flwr_run(link.address, config, tmp_path / "flwr-home", tmp_path / "run.log", security, 600)
        assert outcome.ok, (outcome, (tmp_path / "run.log").read_text()[-3000:])
    finally:
        for node in nodes:
            node.stop()
        link.stop()

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (round_1,) = results["rounds"]
    assert (round_1["num_nodes"], round_1["num_updates"], round_1["dropped"]) == (1, 1, 0)
    assert [e["round"] for e in history(devices["member"])] == [1]  # the registered node trained
    assert all(history(devices[name]) == [] for name in ("stranger", "keyless", "plaintext"))  # the others never did
    assert "Failed to activate SuperNode" in (devices["stranger"] / "supernode.log").read_text()  # refused
    assert '"POST /v1/fleet/register-node HTTP/1.1" 412' in (tmp_path / "flower" / "superlink.log").read_text()


@pytest.mark.slow
def test_the_loop_closes_through_real_processes(tiny_catalog, tls_dir, tmp_path, mosquitto_broker,
                                               fleet_coordinator, device_agents):
    """A federated round on a TLS SuperLink with registered SuperNodes; its ServerApp reports to a real coordinator
    behind Mosquitto with passwords and ACL; the coordinator signs the new stitch version and pushes it; the devices
    verify (signature, hashes) and install it; the next run trains that version."""
    shutil.copytree(tiny_catalog.root, tmp_path / "catalog")
    catalog = Catalog.load(tmp_path / "catalog")
    # The devices' memory fits one variant only, so they stay on it whatever its accuracy becomes.
    smallest, second = sorted(Assigner(catalog.variants, 0.2).needs.values(), key=lambda n: n.memory_mb)[:2]
    vid, memory = smallest.variant_id, (smallest.memory_mb + second.memory_mb) / 2
    devices = [DeviceConfig(f"dev-{i}", memory_mb=memory, compute=1.0, password=f"pw-{i}") for i in range(2)]
    stitch = bytes_to_tensors(catalog.store.read(catalog.manifest(vid).stitch_block().sha256))
    torch.manual_seed(0)
    catalog.publish_stitch(vid, {k: torch.randn_like(v) * v.std() for k, v in stitch.items()}, None, base_version=1)

    generate_key(tmp_path / "keys" / "c.key", tmp_path / "keys" / "c.pub")
    fleet = replace(fleet_config(tmp_path, "mqtt://unused"), devices=devices, api_token="t0ken",
                    signing_key=str(tmp_path / "keys" / "c.key"), trusted_keys=[str(tmp_path / "keys" / "c.pub")])
    fleet = replace(fleet, broker=replace(fleet.broker, url=mosquitto_broker(fleet).url))
    coordinator = fleet_coordinator(fleet, catalog)
    link = SuperLink(tmp_path / "flower", tls=SuperLinkTLS.from_dir(tls_dir), node_auth=True).start()
    manager = SuperNodeManager(link.address, link.security, DATA, PartitionConfig(), {d.id: i for i, d in
                                                                                    enumerate(devices)}, 2,
                               auth_key_of=lambda device_dir: device_dir / "supernode-key")
    try:
        for d in devices:
            key = tmp_path / "devices" / d.id / "supernode-key"
            register_supernode(link.address, link.security, generate_supernode_key(key), tmp_path / "operator")
        agents = [device_agents(fleet, d, on_installed=manager.on_installed) for d in devices]
        for a in agents:
            assert a.wait(lambda a: settled(a) and a.installed.version == 2, 60), describe(a)
        assert {a.installed.variant_id for a in agents} == {vid}
        manager.wait_ready()

        def run(n: int) -> dict:
            cfg = Config(data=DATA, fleet=fleet, federated=FederatedConfig(rounds=1, lr=0.05))
            config = run_config(cfg, catalog.root, tmp_path / f"run{n}", coordinator.public_url, min_nodes=2)
            outcome = flwr_run(link.address, config, tmp_path / f"flwr{n}", tmp_path / f"run{n}.log", link.security,
                               600)
            assert outcome.ok, (outcome, (tmp_path / f"run{n}.log").read_text()[-3000:])
            return json.loads((tmp_path / f"run{n}" / "results.json").read_text())

        first = run(1)["variants"][vid]
        assert first["base_version"] == 2 and first["improved"]  # a fresh random stitch: training helps
        for a in agents:
            assert a.wait(lambda a: settled(a) and a.installed.version == 3, 60), describe(a)
        for a in agents:  # what they installed is what the coordinator signed
            manifest = Manifest.from_bytes((a.device_dir / "current.json").read_bytes())
            assert manifest.stitch_block().sha256 == first["stitch_sha256"]
        assert json.loads(coordinator.registry.device(devices[0].id).desired)["key_id"] == \
            load_signer(fleet.signing_key).key_id

        second = run(2)["variants"][vid]
        assert second["base_version"] == 3
        for a in agents:
            last = history(a.device_dir)[-1]
            assert (last["installed_version"], last["server_version"]) == (3, 3)  # the next run trained it
    finally:
        manager.stop()
        link.stop()
