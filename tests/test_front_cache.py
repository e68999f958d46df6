"""The device's front-output cache: a round after the first skips the front, a tampered or foreign cache file is
recomputed, and the key changes with anything the outputs depend on. Real variants of the tiny catalog, real
training (`client.fl_client.local_update`, what the ClientApp runs for a train message)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import save as st_save

from client import fl_client
from client.fl_client import HISTORY, TrainRequest, local_update
from fleet_helpers import install_from_catalog
from shared.artifacts import BlobStore, sha256_bytes
from shared.config import DataConfig, PartitionConfig
from shared.front_cache import CACHE_DIR, FORMAT, FrontCache, front_key
from shared.node_data import NodeData

DATA = DataConfig(dataset="digits", image_size=32, channels=1)


@pytest.fixture
def device(tiny_catalog, tmp_path):
    """A device folder with the catalog's first variant installed, and its NodeData (partition 1 of 4)."""
    variant = tiny_catalog.variants[0]
    manifest = install_from_catalog(tiny_catalog, variant.id, tmp_path / "dev")
    node = NodeData(tmp_path / "dev", DATA, 1, 4, PartitionConfig("iid"))
    fl_client._LOADED.clear()  # every test starts like a fresh ClientApp process
    yield node, manifest
    fl_client._LOADED.clear()


def _train(node, manifest, rnd: int):
    from shared.artifacts import bytes_to_tensors

    stitch = bytes_to_tensors(BlobStore(node.device_dir / "blobs").read(manifest.stitch_block().sha256))
    req = TrainRequest(manifest.variant_id, manifest.version, rnd, 1, 0.05, 32)
    delta, _ = local_update(node, req, {k: v.numpy() for k, v in stitch.items()})
    return delta, json.loads((node.device_dir / HISTORY).read_text().splitlines()[-1])


def _front_calls(node, manifest) -> list:
    """Count the front blocks' real forward calls on the model the ClientApp process holds."""
    model = fl_client._LOADED[(str(node.device_dir), manifest.sha256)]
    calls = []
    model.front[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def _cache_file(node, entry):
    return FrontCache(node.device_dir / CACHE_DIR).paths(entry["front_key"])[0]


def test_a_round_after_the_first_skips_the_front(device):
    node, manifest = device
    delta1, first = _train(node, manifest, 1)
    assert first["front_cached"] is False
    path = _cache_file(node, first)
    written = path.stat().st_mtime_ns
    calls = _front_calls(node, manifest)
    delta2, second = _train(node, manifest, 1)  # same round again: same seed, so the same update is expected
    assert second["front_cached"] is True and calls == []  # the front did not run at all
    assert path.stat().st_mtime_ns == written
    assert all((delta1[k] == delta2[k]).all() for k in delta1)  # trained on the same outputs
    fl_client._LOADED.clear()  # a new ClientApp process (Flower starts one per message) reads the file too
    _, third = _train(node, manifest, 2)
    assert third["front_cached"] is True


def test_a_tampered_cache_file_is_recomputed(device):
    node, manifest = device
    delta1, first = _train(node, manifest, 1)
    path = _cache_file(node, first)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one bit pattern in the last tensor's data: still parses as safetensors
    path.write_bytes(bytes(data))
    calls = _front_calls(node, manifest)
    delta2, second = _train(node, manifest, 1)
    assert second["front_cached"] is False and calls  # the front ran again
    assert all((delta1[k] == delta2[k]).all() for k in delta1)
    assert FrontCache(path.parent).load(first["front_key"]) is not None  # rewritten, verifiable again


@pytest.mark.parametrize("forge", [
    lambda key, front, labels: ({"front": front, "labels": labels}, {"key": "0" * 64, "format": FORMAT}),
    lambda key, front, labels: ({"front": front, "labels": labels}, {"key": key, "format": "restnet.front-cache/0"}),
    lambda key, front, labels: ({"front": front}, {"key": key, "format": FORMAT}),
    lambda key, front, labels: ({"front": front, "labels": labels[:-1]}, {"key": key, "format": FORMAT}),
    lambda key, front, labels: ({"front": front, "labels": labels.float()}, {"key": key, "format": FORMAT}),
], ids=["another key", "another format", "no labels", "labels short", "float labels"])
def test_a_consistent_file_that_does_not_fit_is_not_trusted(device, forge):
    """A file whose digest matches but that was made for other data, by another release, or is incomplete is
    recomputed."""
    node, manifest = device
    _, first = _train(node, manifest, 1)
    cache = FrontCache(node.device_dir / CACHE_DIR)
    good = cache.load(first["front_key"])
    tensors, metadata = forge(first["front_key"], good.tensors[0] * 0, good.tensors[1])
    data = st_save(tensors, metadata=metadata)
    data_path, digest_path = cache.paths(first["front_key"])
    data_path.write_bytes(data)
    digest_path.write_text(sha256_bytes(data))
    assert cache.load(first["front_key"]) is None
    _, second = _train(node, manifest, 1)
    assert second["front_cached"] is False


def test_the_key_follows_what_the_outputs_depend_on(tiny_catalog, tmp_path):
    a, b = tiny_catalog.variants[0], tiny_catalog.variants[1]
    ma, mb = tiny_catalog.manifest(a.id), tiny_catalog.manifest(b.id)
    node = NodeData(tmp_path, DATA, 1, 4, PartitionConfig("iid"))
    base = front_key(ma, node.train_partition_description())
    assert base == front_key(ma, NodeData(tmp_path / "x", DATA, 1, 4, PartitionConfig("iid"))
                             .train_partition_description())  # the folder is not part of the data
    others = [NodeData(tmp_path, DATA, 2, 4, PartitionConfig("iid")),  # another partition
              NodeData(tmp_path, DATA, 1, 5, PartitionConfig("iid")),  # another split into parts
              NodeData(tmp_path, DATA, 1, 4, PartitionConfig("dirichlet", 0.5)),
              NodeData(tmp_path, DataConfig(dataset="digits", image_size=28, channels=1), 1, 4, PartitionConfig("iid")),
              NodeData(tmp_path, DataConfig(dataset="digits", image_size=32, channels=1, seed=1), 1, 4,
                       PartitionConfig("iid"))]
    keys = {front_key(ma, n.train_partition_description()) for n in others}
    assert base not in keys and len(keys) == len(others)
    assert front_key(ma, {**node.train_partition_description(), "split": "val"}) != base
    if [x.sha256 for x in ma.blocks if x.role == "front"] != [x.sha256 for x in mb.blocks if x.role == "front"]:
        assert front_key(mb, node.train_partition_description()) != base  # other front blocks
    retrained = ma.blocks[0].__class__(ma.blocks[0].role, ma.blocks[0].index, "f" * 64, ma.blocks[0].size)
    changed = ma.__class__(ma.variant_id, ma.version, ma.architecture, [retrained, *ma.blocks[1:]], ma.record)
    assert front_key(changed, node.train_partition_description()) != base  # a front block with new weights


def test_devices_of_one_process_train_at_once_without_interfering(tiny_catalog, tmp_path):
    """An agent process hosting several devices (`client.clientapp_host`; the demo hosts six) gets their training
    requests at the same moment: device 0 trains for a while (forward passes) as the others load (torch.fx-trace)
    their variants. Every request must succeed and give what it gives alone."""
    import threading

    from shared.artifacts import bytes_to_tensors

    variants = tiny_catalog.variants[:2]
    devices = []
    for i in range(6):
        manifest = install_from_catalog(tiny_catalog, variants[i % 2].id, tmp_path / f"dev{i}")
        devices.append((NodeData(tmp_path / f"dev{i}", DATA, i % 2, 2, PartitionConfig("iid")), manifest))

    def request(node, manifest, epochs=1):
        stitch = bytes_to_tensors(BlobStore(node.device_dir / "blobs").read(manifest.stitch_block().sha256))
        return TrainRequest(manifest.variant_id, manifest.version, 1, epochs, 0.05, 32), \
            {k: v.numpy() for k, v in stitch.items()}

    def train(i, node, manifest, results, errors, start):
        req, arrays = request(node, manifest, epochs=20 if i == 0 else 1)
        start.wait()
        try:
            results[i] = local_update(node, req, arrays)[0]
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"device {i}: {exc!r}")

    for attempt in range(3):  # a race: three chances to overlap the loads with device 0's training
        fl_client._LOADED.clear()
        local_update(devices[0][0], *request(*devices[0]))  # device 0's variant loaded and its front cached
        results, errors, start = {}, [], threading.Barrier(len(devices))
        threads = [threading.Thread(target=train, args=(i, *d, results, errors, start)) for i, d in enumerate(devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == [] and len(results) == len(devices), f"attempt {attempt}"
        # devices 1, 3, 5 and 2, 4 share variant and partition: the same training, the same change, however they ran
        for i, j in ((1, 3), (3, 5), (2, 4)):
            assert all((results[i][k] == results[j][k]).all() for k in results[i])
    fl_client._LOADED.clear()
