"""The one publish path of a catalog (`Catalog.publish_stitch`): writers that race, writers that hold an old copy."""
from __future__ import annotations

import multiprocessing
import shutil
import time

import pytest
import torch

from shared.artifacts import Manifest, bytes_to_tensors, sha256_bytes, tensors_to_bytes
from shared.catalog import Catalog, StaleVersion
from shared.errors import IntegrityError


@pytest.fixture
def catalog(tiny_catalog, tmp_path) -> Catalog:
    shutil.copytree(tiny_catalog.root, tmp_path / "catalog")
    return Catalog.load(tmp_path / "catalog")


def current_stitch(catalog: Catalog, variant_id: str) -> dict[str, torch.Tensor]:
    manifest = catalog.manifest(variant_id)
    return bytes_to_tensors(catalog.store.read(manifest.stitch_block().sha256))


def shifted(stitch: dict, by: float) -> dict:
    return {k: v + by for k, v in stitch.items()}


def _writer(root, variant_id, by, start, results):
    """A writer in its own process. Reading the manifest takes a second here: both writers read version 1 before
    either writes, so only the catalog's lock can keep them apart."""
    original = Catalog.manifest

    def slow_manifest(self, vid):
        time.sleep(1.0)
        return original(self, vid)

    Catalog.manifest = slow_manifest
    catalog = Catalog.load(root)
    stitch = shifted(bytes_to_tensors(catalog.store.read(original(catalog, variant_id).stitch_block().sha256)), by)
    start.wait()
    try:
        manifest = catalog.publish_stitch(variant_id, stitch, 0.5 + by, base_version=1)
        results.put(("won", by, manifest.version, sha256_bytes(tensors_to_bytes(stitch))))
    except StaleVersion as exc:
        results.put(("stale", by, str(exc), ""))


def test_two_writers_of_one_variant_exactly_one_wins(catalog):
    vid = catalog.variants[0].id
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(catalog.root, vid, by, start, results)) for by in (0.1, 0.2)]
    for w in writers:
        w.start()
    time.sleep(0.5)
    start.set()
    outcomes = sorted(results.get(timeout=120) for _ in writers)
    for w in writers:
        w.join(30)
    assert [o[0] for o in outcomes] == ["stale", "won"], outcomes
    (_, _, message, _), (_, winner, version, winner_sha) = outcomes
    assert version == 2 and f"{vid} is at version 2" in message and "made from version 1" in message

    after = Catalog.load(catalog.root)
    rec = after.get(vid)
    manifest = after.manifest(vid)  # its sha256 is the catalog's
    assert rec.version == manifest.version == 2 and rec.accuracy == pytest.approx(0.5 + winner)
    assert manifest.stitch_block().sha256 == winner_sha  # the winner's weights, not a mix
    assert manifest.record["version"] == 2 and manifest.record["accuracy"] == pytest.approx(0.5 + winner)
    assert Manifest.from_bytes((catalog.root / f"manifests/{vid}/v1.json").read_bytes()).version == 1  # kept


def test_a_writer_with_an_old_copy_does_not_undo_another_writers_version(catalog):
    first, second = catalog.variants[0].id, catalog.variants[1].id
    old_copy = Catalog.load(catalog.root)  # e.g. the coordinator, loaded at start
    other = Catalog.load(catalog.root)  # e.g. `restnet stitch-train --save` meanwhile
    other.publish_stitch(second, shifted(current_stitch(other, second), 0.3), 0.9, base_version=1)

    old_copy.publish_stitch(first, shifted(current_stitch(old_copy, first), 0.1), 0.8, base_version=1)

    after = Catalog.load(catalog.root)
    assert (after.get(first).version, after.get(second).version) == (2, 2)  # nothing lost
    assert after.get(second).accuracy == pytest.approx(0.9)
    assert old_copy.get(second).version == 2  # the writer now sees the catalog as written
    with pytest.raises(StaleVersion):  # and a second update made from version 1 is refused
        other.publish_stitch(first, current_stitch(other, first), 0.7, base_version=1)


def test_weights_that_do_not_fit_change_nothing(catalog):
    vid = catalog.variants[0].id
    before = (catalog.root / "catalog.json").read_bytes()
    stitch = current_stitch(catalog, vid)
    bad = [{k: torch.zeros(3) for k in stitch}, {k: torch.full_like(v, float("nan")) for k, v in stitch.items()},
           {**stitch, "extra": torch.zeros(1)}, {k: v.double() for k, v in stitch.items()}]
    for weights in bad:
        with pytest.raises(IntegrityError):
            catalog.publish_stitch(vid, weights, 0.9, base_version=1)
    assert (catalog.root / "catalog.json").read_bytes() == before
    assert not (catalog.root / f"manifests/{vid}/v2.json").exists()
