"""Ladders: a device with a storage budget holds several rungs and switches between them without the network.

Real processes where it matters: the coordinator with its embedded broker, SQLite and PostgreSQL registries, a
device agent downloading over HTTP, the memory limit read from cgroup-v2 files the test writes.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fleet_helpers import (DEVICES, MIB, _synthetic_catalog_template, embedded_broker_url, fleet_config,  # noqa: F401
                           fleet_coordinator, metric, registry_url, synthetic_catalog, wait_until)

from client.agent import DeviceAgent
from client.fl_client import installed_variant
from client.fleet_sim import settled
from client.ladder_store import read_ladder, running_manifest_bytes
from client.memory import MemorySource
from client.runtime import Runtime
from client.switching import RungSwitcher
from server.assignment import Assigner
from server.ladder import ladder
from shared.artifacts import BlobStore, Manifest, bytes_to_tensors, sha256_bytes
from shared.catalog import Catalog, VariantRecord
from shared.messages import Profile
from shared.signing import load_verifier
from shared.variants import load_variant

TOP, MID, SMALL = "syn.4_4", "syn.2_3", "syn.1_3"  # needs with the margin: 96, 38.4, 14.4 MiB
HOLD_S = 1.0
POLL_S = 0.05
SWITCH_BOUND_S = 2.0  # from the limit's file written to the coordinator knowing (benchmarks/ladder_bench.py)


# ---- which rungs ---------------------------------------------------------------------------------------------

def record(vid: str, memory_mib: float, accuracy: float) -> VariantRecord:
    return VariantRecord(vid, "a", "b", 1, 1, "slow_to_fast", accuracy, "conv", 1000, 10**7, int(memory_mib * MIB),
                         0, 10, 1.0, accuracy=accuracy)


def test_ladder_takes_frontier_rungs_whose_additional_blocks_fit():
    recs = [record("top", 90, 0.9), record("mid", 40, 0.8), record("worse", 30, 0.5), record("small", 10, 0.7),
            record("tiny", 5, 0.6)]
    blocks = {"top": {"F": 10 * MIB, "T": MIB}, "mid": {"F": 10 * MIB, "B": 10 * MIB, "M": MIB},
              "worse": {"W": MIB}, "small": {"F": 10 * MIB, "S": MIB}, "tiny": {"Y": 20 * MIB}}
    assigner = Assigner(recs, 0.0, {v: sum(b.values()) for v, b in blocks.items()})
    top = assigner.choose(Profile(100, 1, None, agent_version="t", storage_mb=100))
    assert top.id == "top"
    ids = lambda storage: [r.id for r in ladder(assigner, top, Profile(100, 1, None, agent_version="t",  # noqa: E731
                                                                           storage_mb=storage), blocks)]
    # 'worse' is never a rung (bigger than 'small' and less accurate); 'tiny' is on the frontier of its own.
    assert ids(100) == ["top", "mid", "small", "tiny"]
    assert ids(21.5) == ["top", "small"]  # top holds 11 MiB; mid would add 11, small adds 1 (it shares F)
    assert ids(11) == ["top"]
    # the memory-fitting variant that fits the storage is the top rung; none fits: a one-line refusal that says so
    assert assigner.choose(Profile(100, 1, None, agent_version="t", storage_mb=10.5)).id == "worse"
    refusal = assigner.choose(Profile(100, 1, None, agent_version="t", storage_mb=0.5))
    assert "MiB of storage" in refusal.message and "0.5 MiB of storage" in refusal.message


def test_switcher_goes_down_at_once_and_up_only_after_the_hold():
    s = RungSwitcher([96, 38.4, 14.4], hold_s=10.0)
    assert s.decide(200, 0.0) == 0
    assert s.decide(20, 1.0) == 2  # down at once
    assert s.decide(200, 2.0) == 2 and s.decide(200, 11.9) == 2  # free, but not for 10 s yet
    assert s.decide(30, 12.0) == 2 and s.decide(200, 12.5) == 2 and s.decide(200, 22.4) == 2  # a dip resets it
    assert s.decide(200, 22.5) == 0
    assert s.decide(5, 23.0) == 2  # nothing fits: the smallest


def test_memory_source_reads_the_cgroup_limit(tmp_path):
    (tmp_path / "memory.max").write_text("104857600\n")
    (tmp_path / "memory.current").write_text("41943040\n")
    assert MemorySource(tmp_path).available_mb() == 60.0
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the system's available memory
    assert MemorySource(tmp_path).available_mb() > 0


# ---- the fleet ---------------------------------------------------------------------------------------------

def set_limit(cgroup: Path, mib: float) -> float:
    (cgroup / "memory.max.tmp").write_text(str(int(mib * MIB)))
    (cgroup / "memory.max.tmp").replace(cgroup / "memory.max")
    return time.monotonic()


@pytest.fixture
def ladder_device(tmp_path):
    """Factory: a DeviceAgent of dev-large with a storage budget, its memory limit in files under tmp_path."""
    started = []

    def start(fleet, storage_mb: float | None, limit_mib: float = 200, device=DEVICES[2]) -> DeviceAgent:
        cgroup = tmp_path / f"cgroup-{device.id}"
        cgroup.mkdir(exist_ok=True)
        (cgroup / "memory.current").write_text("0")
        set_limit(cgroup, limit_mib)
        profile = Profile(device.memory_mb, device.compute, device.latency_ms, agent_version="test",
                          storage_mb=storage_mb)
        agent = DeviceAgent(device.id, fleet.broker, device.password, profile, tmp_path / "devices" / device.id,
                            enroll_retry_s=1.0, heartbeat_s=fleet.heartbeat_s, trusted=load_verifier(fleet.trusted_keys),
                            memory=MemorySource(cgroup), memory_poll_s=POLL_S, hold_s=HOLD_S).start()
        agent.cgroup = cgroup
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def whole_catalog_mib(catalog) -> float:
    sizes = {b.sha256: b.size for r in catalog.variants for b in catalog.manifest(r.id).blocks}
    return sum(sizes.values()) / MIB


def device_view(coordinator, device_id: str) -> dict:
    return next(d for d in coordinator.devices() if d["id"] == device_id)


def test_a_device_with_storage_holds_a_ladder_and_switches_without_the_network(
        tmp_path, embedded_broker_url, registry_url, synthetic_catalog, fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url, registry=registry_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01)
    assert agent.wait(lambda a: settled(a) and a.running == TOP, 30)
    assert [r.variant_id for r in agent.desired.rungs] == [TOP, MID, SMALL]
    assert [r.variant_id for r in read_ladder(agent.device_dir)] == [TOP, MID, SMALL]
    store = BlobStore(agent.device_dir / "blobs")
    for rung in agent.desired.rungs:  # every rung delivered and verified, blocks shared
        data = (agent.device_dir / "rungs" / f"{rung.manifest_sha256}.json").read_bytes()
        assert sha256_bytes(data) == rung.manifest_sha256
        for block in Manifest.from_bytes(data).blocks:
            store.read(block.sha256)
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == TOP)
    assert device_view(coordinator, "dev-large")["rungs"] == [TOP, MID, SMALL]
    rt = Runtime(agent.device_dir)
    assert rt.rung == TOP
    x = torch.randn(3, 1, 16, 16)
    for rung in agent.desired.rungs:  # each rung assembled from shared blocks computes what its manifest says
        data = (agent.device_dir / "rungs" / f"{rung.manifest_sha256}.json").read_bytes()
        expected = load_variant(Manifest.from_bytes(data), store)(x)
        (agent.device_dir / "running.json").write_text(json.dumps({"manifest_sha256": rung.manifest_sha256}))
        assert torch.equal(rt.predict(x), expected) and rt.rung == rung.variant_id
    (agent.device_dir / "running.json").write_text(json.dumps({"manifest_sha256": agent.desired.rungs[0].manifest_sha256}))
    blobs_before = metric(coordinator, "fleet_artifact_requests_total", kind="blob", code="200")
    manifests_before = metric(coordinator, "fleet_artifact_requests_total", kind="manifest", code="200")

    squeezed = set_limit(agent.cgroup, 20)  # only the smallest rung (14.4 MiB) fits
    assert agent.wait(lambda a: a.running == SMALL, SWITCH_BOUND_S)
    down_s = agent.switches[-1][0] - squeezed
    assert down_s < SWITCH_BOUND_S
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == SMALL, 10)
    assert rt.predict(x).shape == (3, 4) and rt.rung == SMALL
    from restnet.fleet_commands import _status_report

    line = next(r for r in _status_report(coordinator.public_url, None, False).splitlines() if "dev-large" in r)
    assert line.endswith(f"{SMALL} (3 of 3)")  # `restnet status`, as the status page shows it

    released = set_limit(agent.cgroup, 50)  # the middle rung fits again, but only after the hold
    assert agent.wait(lambda a: a.running == MID, HOLD_S + 10)
    assert agent.switches[-1][0] - released >= HOLD_S
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == MID, 10)
    set_limit(agent.cgroup, 200)
    assert agent.wait(lambda a: a.running == TOP, HOLD_S + 10)
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == TOP, 10)
    assert [v for _, v in agent.switches] == [TOP, SMALL, MID, TOP]
    assert metric(coordinator, "fleet_rung_switches_total") == 4
    assert metric(coordinator, "fleet_devices_running", variant=TOP) == 1
    # not one byte over the network for any switch
    assert metric(coordinator, "fleet_artifact_requests_total", kind="blob", code="200") == blobs_before
    assert metric(coordinator, "fleet_artifact_requests_total", kind="manifest", code="200") == manifests_before


def test_a_new_version_of_a_lower_rung_reaches_the_devices_that_hold_it(
        tmp_path, embedded_broker_url, registry_url, synthetic_catalog, fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url, registry=registry_url)
    fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01)
    assert agent.wait(settled, 30)
    other = Catalog.load(synthetic_catalog.root)  # another writer (`restnet stitch-train --save`), a lower rung
    old = other.manifest(SMALL)
    stitch = {k: v + 0.01 for k, v in bytes_to_tensors(other.store.read(old.stitch_block().sha256)).items()}
    new = other.publish_stitch(SMALL, stitch, 0.70, base_version=1)
    ok = agent.wait(lambda a: settled(a) and [r.variant_version for r in read_ladder(a.device_dir)] == [1, 1, 2], 30)
    assert ok, (agent.desired, agent.failure, agent.status, read_ladder(agent.device_dir))
    assert read_ladder(agent.device_dir)[2].manifest_sha256 == new.sha256


def test_fl_trains_the_rung_the_device_runs(tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator,
                                            ladder_device):
    """The ClientApp's query and training read the running rung (client/fl_client.py)."""
    from client.fl_client import TrainRequest, local_update
    from shared.config import DataConfig, PartitionConfig
    from shared.node_data import NodeData

    fleet = fleet_config(tmp_path, embedded_broker_url)
    fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01, limit_mib=20)
    assert agent.wait(lambda a: settled(a) and a.running == SMALL, 30)
    assert installed_variant(agent.device_dir) == {"variant-id": SMALL, "version": 1}
    node = NodeData(agent.device_dir, DataConfig(image_size=16, channels=1),
                    0, 1, PartitionConfig())
    stitch = {k: v.numpy() for k, v in bytes_to_tensors(
        synthetic_catalog.store.read(synthetic_catalog.manifest(SMALL).stitch_block().sha256)).items()}
    with pytest.raises(Exception, match="runs now"):
        local_update(node, TrainRequest(TOP, 1, 1, 1, 0.01, 8), stitch)


def test_a_rung_that_fails_verification_changes_nothing_and_no_budget_means_version_1(
        tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=None)  # as before ladders
    assert agent.wait(settled, 30)
    desired = json.loads(coordinator.registry.device("dev-large").desired)
    assert desired["v"] == 1 and "rungs" not in desired and "storage_mb" not in json.dumps(desired)
    current = (agent.device_dir / "current.json").read_bytes()
    assert json.loads(current)["variant_id"] == TOP

    top_blobs = {b.sha256 for b in synthetic_catalog.manifest(TOP).blocks}
    own = next(b.sha256 for b in synthetic_catalog.manifest(SMALL).blocks if b.sha256 not in top_blobs)
    path = synthetic_catalog.store.path(own)
    path.write_bytes(b"\0" + path.read_bytes()[1:])  # the smallest rung's own block, tampered on the server
    agent.update_profile(replace(agent.profile, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01))
    assert agent.wait(lambda a: a.desired.rungs is not None and a.failure is not None, 30)
    assert "sha256" in agent.failure
    assert wait_until(lambda: device_view(coordinator, "dev-large")["state"] == "failed")
    assert (agent.device_dir / "current.json").read_bytes() == current  # keeps what it ran
    assert not (agent.device_dir / "ladder.json").exists() and agent.running is None
    assert running_manifest_bytes(agent.device_dir) == current


def test_an_impossible_storage_budget_is_a_one_line_refusal(tmp_path, embedded_broker_url, synthetic_catalog,
                                                             fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url)
    fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=0.001)  # 1 KiB: not even the smallest variant's blocks
    assert agent.wait(lambda a: a.answered and a.desired is not None, 30)
    refusal = agent.desired.refusal
    assert refusal is not None and "\n" not in refusal.message
    assert "MiB of storage" in refusal.message and "0.001 MiB of storage" in refusal.message
    assert not (agent.device_dir / "current.json").exists()


# ---- the rules of a ladder on the wire -------------------------------------------------------------------

def signed_ladder(signer) -> dict:
    from shared.messages import Assignment, Desired, Rung, encode

    urls = {v: f"http://h/manifests/{v}/v1.json" for v in (TOP, MID, SMALL)}
    sha = {TOP: "a" * 64, MID: "b" * 64, SMALL: "c" * 64}
    rungs = [Rung(v, 1, urls[v], sha[v], 100, m) for v, m in ((TOP, 96.0), (MID, 38.4), (SMALL, 14.4))]
    a = Assignment(TOP, 1, urls[TOP], sha[TOP], 100)
    return json.loads(encode(Desired("dev-large", 3, "aid", "rid", a, None, rungs), signer))


@pytest.mark.parametrize("mangle, says", [
    (lambda d: d["rungs"].reverse(), "first rung must be the assignment"),
    (lambda d: d["rungs"].__setitem__(2, {**d["rungs"][1], "memory_mb": 10.0}), "appears twice"),
    (lambda d: d["rungs"][2].__setitem__("memory_mb", 38.4), "strictly less memory"),
    (lambda d: d.__setitem__("rungs", []), "1 to 8 rungs"),
    (lambda d: d.__setitem__("rungs", d["rungs"] + [{**d["rungs"][2], "variant_id": f"x{i}",
                                                     "memory_mb": 14.0 - i} for i in range(6)]), "1 to 8 rungs"),
    (lambda d: d.update(assignment=None, refusal={"message": "no", "smallest": {}}), "1 to 8 rungs"),
    (lambda d: d.__setitem__("v", 1), "has no 'rungs'"),
    (lambda d: d.pop("rungs"), "requires 'rungs'"),
])
def test_malformed_rungs_are_refused_with_one_line(mangle, says):
    from shared.messages import MessageError, decode_desired

    d = signed_ladder(None)
    assert decode_desired("dev-large", json.dumps(d).encode()).rungs[2].variant_id == SMALL
    mangle(d)
    with pytest.raises(MessageError) as err:
        decode_desired("dev-large", json.dumps(d).encode())
    assert err.value.code == "schema" and says in err.value.message and "\n" not in err.value.message


def test_the_signature_covers_the_rungs(tmp_path):
    from shared.messages import decode_desired
    from shared.signing import SignatureError, generate_key, load_signer

    generate_key(tmp_path / "k.key", tmp_path / "k.pub")
    signer = load_signer(str(tmp_path / "k.key"))
    verifier = load_verifier([str(tmp_path / "k.pub")])
    d = signed_ladder(signer)
    assert decode_desired("dev-large", json.dumps(d).encode(), verifier).rungs[1].memory_mb == 38.4
    d["rungs"][1]["memory_mb"] = 30.0  # a broker-side edit: keep the bigger rung longer
    with pytest.raises(SignatureError):
        decode_desired("dev-large", json.dumps(d).encode(), verifier)


def test_a_switched_status_names_its_rung_and_a_budget_is_in_range():
    from shared.messages import MessageError, decode

    status = {"v": 2, "device_id": "d", "assignment_id": "a1", "state": "SWITCHED", "variant_id": SMALL}
    assert decode("status", "d", json.dumps(status).encode()).variant_id == SMALL
    for bad, says in (({**status, "variant_id": None}, "must name the rung"), ({**status, "v": 1}, "has no state")):
        with pytest.raises(MessageError, match=says):
            decode("status", "d", json.dumps(bad).encode())
    enroll = {"v": 2, "device_id": "d", "request_id": "r1",
              "profile": {"memory_mb": 50, "compute": 1, "latency_ms": None, "agent_version": "t", "storage_mb": 4}}
    assert decode("enroll", "d", json.dumps(enroll).encode()).profile.storage_mb == 4
    for storage in (0, -1, 1e10, True, "4"):
        enroll["profile"]["storage_mb"] = storage
        with pytest.raises(MessageError, match="storage_mb"):
            decode("enroll", "d", json.dumps(enroll).encode())


def test_a_configured_storage_budget_out_of_range_is_a_one_line_error(tmp_path):
    from conftest import tiny_config_dict
    from shared.config import parse_config
    from shared.errors import ConfigError

    cfg = tiny_config_dict()
    cfg["fleet"] = {"devices": [{"id": "d1", "memory_mb": 10, "storage_mb": 4}]}
    assert parse_config(cfg, "t").fleet.devices[0].storage_mb == 4
    cfg["fleet"]["devices"][0]["storage_mb"] = -1
    with pytest.raises(ConfigError, match="storage_mb must be in"):
        parse_config(cfg, "t")


def test_the_registry_records_only_a_rung_the_device_holds(registry_url):
    from server.registry import open_registry
    from server.registry_base import DeviceRow

    registry = open_registry(registry_url)
    try:
        row = DeviceRow("d1", Profile(200, 1, None, agent_version="t", storage_mb=4), "r1", 1, "a1", TOP, 1, b"{}",
                        "installed", None, 1.0, 1.0, ("r1",), (f"{TOP}@1", f"{MID}@1", f"{SMALL}@1"))
        with registry.transaction():
            registry.put(row)
            assert not registry.set_running("d1", "a1", "syn.9_9")  # not a rung of its ladder
            assert not registry.set_running("d1", "a0", SMALL)  # about an assignment that is not current
            assert registry.set_running("d1", "a1", SMALL)
        dev = registry.device("d1")
        assert dev.running == SMALL and dev.profile.storage_mb == 4 and dev.holds(MID) == 1
        assert registry.count_by_running() == {SMALL: 1}
        with registry.transaction():
            assert [d.id for d in registry.on_variant(MID)] == ["d1"]
            assert registry.on_variant("syn_2_3") == []  # LIKE's '_' matches the '.' of syn.2_3: filtered out
    finally:
        registry.close()


def test_the_runtime_refuses_an_altered_device_folder(tmp_path, embedded_broker_url, synthetic_catalog,
                                                       fleet_coordinator, ladder_device):
    from shared.errors import IntegrityError

    fleet = fleet_config(tmp_path, embedded_broker_url)
    fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01)
    assert agent.wait(lambda a: settled(a) and a.running == TOP, 30)
    agent.stop()
    folder = agent.device_dir
    ladder_json = json.loads((folder / "ladder.json").read_text())
    rung_file = folder / "rungs" / f"{ladder_json[0]['manifest_sha256']}.json"
    manifest = json.loads(rung_file.read_text())
    rung_file.write_text(json.dumps({**manifest, "version": 7}))  # the manifest no longer matches its sha256
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        Runtime(folder)
    manifest["blocks"] = manifest["blocks"][:-1]  # a block missing, consistently re-hashed: the shape check
    data = json.dumps(manifest).encode()
    (folder / "rungs" / f"{sha256_bytes(data)}.json").write_bytes(data)
    ladder_json[0]["manifest_sha256"] = sha256_bytes(data)
    (folder / "ladder.json").write_text(json.dumps(ladder_json))
    with pytest.raises(IntegrityError, match="do not match its architecture"):
        Runtime(folder)


def test_a_rung_whose_manifest_signature_fails_is_refused_with_the_whole_ladder(
        tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator, ladder_device):
    from shared.signing import generate_key, load_signer

    for name in ("c", "stranger"):
        generate_key(tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub")
    fleet = fleet_config(tmp_path, embedded_broker_url, signing_key=str(tmp_path / "keys" / "c.key"),
                         trusted_keys=[str(tmp_path / "keys" / "c.pub")])
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    manifest = synthetic_catalog.root / f"manifests/{SMALL}/v1.json"
    stranger = load_signer(tmp_path / "keys" / "stranger.key")
    Path(f"{manifest}.sig").write_text(json.dumps(stranger.sign(manifest.read_bytes())))  # only the lowest rung's
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01)
    assert agent.wait(lambda a: a.failure is not None, 30)
    assert "does not trust" in agent.failure
    assert not (agent.device_dir / "current.json").exists() and not (agent.device_dir / "ladder.json").exists()
    assert wait_until(lambda: device_view(coordinator, "dev-large")["state"] == "failed")


def test_fl_trains_the_running_rung_of_a_real_catalog(tiny_catalog, tmp_path):
    """The ClientApp's training (client/fl_client.local_update) on the rung the device runs: a ladder of two
    variants of the session's real catalog (digits), placed as the agent places it."""
    from client.fl_client import HISTORY, TrainRequest, local_update
    from client.ladder_store import set_running
    from fleet_helpers import install_ladder_from_catalog
    from shared.config import DataConfig, PartitionConfig
    from shared.node_data import NodeData

    top, lower = sorted(tiny_catalog.variants, key=lambda v: -v.params)[:2]
    folder = tmp_path / "dev"
    rungs = install_ladder_from_catalog(tiny_catalog, [top.id, lower.id], folder, running=0)
    assert installed_variant(folder)["variant-id"] == top.id
    set_running(folder, rungs[1])
    assert installed_variant(folder) == {"variant-id": lower.id, "version": 1}

    node = NodeData(folder, DataConfig(dataset="digits", image_size=32, channels=1), 0, 4, PartitionConfig())
    stitch = bytes_to_tensors(tiny_catalog.store.read(tiny_catalog.manifest(lower.id).stitch_block().sha256))
    delta, metrics = local_update(node, TrainRequest(lower.id, 1, 1, 1, 0.01, 32), {k: v.numpy() for k, v in
                                                                                    stitch.items()})
    assert set(delta) == set(stitch) and metrics["num-examples"] > 0
    assert any(float(abs(v.float()).max()) > 0 for v in delta.values())  # it trained
    history = [json.loads(line) for line in (folder / HISTORY).read_text().splitlines()]
    assert history[-1]["variant_id"] == lower.id
    top_stitch = bytes_to_tensors(tiny_catalog.store.read(tiny_catalog.manifest(top.id).stitch_block().sha256))
    with pytest.raises(Exception, match="runs now"):
        local_update(node, TrainRequest(top.id, 1, 1, 1, 0.01, 32), {k: v.numpy() for k, v in top_stitch.items()})


def test_a_restarted_device_reports_the_rung_it_chose_before_its_desired_state_arrived(
        tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    storage = whole_catalog_mib(synthetic_catalog) * 1.01
    first = ladder_device(fleet, storage_mb=storage)
    assert first.wait(lambda a: settled(a) and a.running == TOP, 30)
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == TOP)
    first.stop()
    again = ladder_device(fleet, storage_mb=storage, limit_mib=20)  # squeezed while it was down: smallest rung
    assert again.wait(lambda a: a.running == SMALL, 30)
    assert wait_until(lambda: device_view(coordinator, "dev-large")["running"] == SMALL, 10)


def test_a_device_that_drops_its_storage_budget_goes_back_to_one_variant(
        tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator, ladder_device):
    fleet = fleet_config(tmp_path, embedded_broker_url)
    coordinator = fleet_coordinator(fleet, synthetic_catalog)
    agent = ladder_device(fleet, storage_mb=whole_catalog_mib(synthetic_catalog) * 1.01, limit_mib=20)
    assert agent.wait(lambda a: settled(a) and a.running == SMALL, 30)
    blobs = metric(coordinator, "fleet_artifact_requests_total", kind="blob", code="200")
    agent.update_profile(replace(agent.profile, storage_mb=None))
    assert agent.wait(lambda a: settled(a) and a.desired.rungs is None and not a.ladder, 30)
    assert json.loads(coordinator.registry.device("dev-large").desired)["v"] == 1
    assert not (agent.device_dir / "ladder.json").exists() and not (agent.device_dir / "running.json").exists()
    assert installed_variant(agent.device_dir) == {"variant-id": TOP, "version": 1}  # current.json again
    assert Runtime(agent.device_dir).rung == TOP
    assert metric(coordinator, "fleet_artifact_requests_total", kind="blob", code="200") == blobs  # nothing fetched
    assert wait_until(lambda: device_view(coordinator, "dev-large")["rungs"] == [])
    assert device_view(coordinator, "dev-large")["running"] == TOP


def test_the_clientapps_query_stays_torch_free_with_a_ladder(tmp_path):
    """Flower starts a ClientApp process per message: the query must not pay torch's import (seconds), or slow
    nodes miss the query timeout and sit a round out."""
    import subprocess
    import sys

    from client.ladder_store import RUNGS_DIR, set_running, write_ladder
    from types import SimpleNamespace

    data = json.dumps({"variant_id": SMALL, "version": 3}).encode()
    (tmp_path / RUNGS_DIR).mkdir()
    (tmp_path / RUNGS_DIR / f"{sha256_bytes(data)}.json").write_bytes(data)
    write_ladder(tmp_path, [SimpleNamespace(variant_id=SMALL, variant_version=3, manifest_sha256=sha256_bytes(data),
                                            memory_mb=1.0)])
    set_running(tmp_path, read_ladder(tmp_path)[0])
    code = ("import sys; from client.fl_client import installed_variant; "
            f"print(installed_variant(__import__('pathlib').Path({str(tmp_path)!r}))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str({"variant-id": SMALL, "version": 3}) and out[1] == "False"
