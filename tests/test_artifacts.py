"""Artifacts: a variant survives export/load bit for bit; any flipped byte or hostile blob is refused."""
import pytest
import torch

from shared.artifacts import BlobStore, Manifest, bytes_to_tensors, tensors_to_bytes, with_new_stitch
from shared.variants import load_variant
from shared.errors import IntegrityError


def test_round_trip_reproduces_the_variant(tiny_catalog):
    rec = tiny_catalog.variants[0]
    manifest = tiny_catalog.manifest(rec.id)
    model = load_variant(manifest, tiny_catalog.store)
    again = load_variant(Manifest.from_bytes(manifest.to_bytes()), tiny_catalog.store)
    x = torch.randn(3, *tiny_catalog.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    roles = [b.role for b in manifest.blocks]
    assert roles.count("stitch") == 1 and roles.count("front") == rec.front_cut
    assert manifest.sha256 == rec.manifest_sha256


def test_variants_share_identical_blocks(tiny_catalog):
    m0, m1 = (tiny_catalog.manifest(v.id) for v in tiny_catalog.variants[:2])
    first_front = {b.sha256 for b in m0.blocks if b.role == "front" and b.index == 0}
    assert first_front <= {b.sha256 for b in m1.blocks}  # the stem is the same blob in every variant


def copy_store(catalog, tmp_path):
    store = BlobStore(tmp_path / "blobs")
    for p in catalog.store.root.iterdir():
        (store.root).mkdir(exist_ok=True)
        (store.root / p.name).write_bytes(p.read_bytes())
    return store


def test_a_single_flipped_byte_in_any_block_is_refused(tiny_catalog, tmp_path):
    manifest = tiny_catalog.manifest(tiny_catalog.variants[0].id)
    store = copy_store(tiny_catalog, tmp_path)
    for block in manifest.blocks:
        path = store.path(block.sha256)
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError, match="does not match"):
            load_variant(manifest, store)
        path.write_bytes(original)
    load_variant(manifest, store)  # intact again


def test_missing_block_and_tampered_manifest_are_refused(tiny_catalog, tmp_path):
    manifest = tiny_catalog.manifest(tiny_catalog.variants[0].id)
    store = copy_store(tiny_catalog, tmp_path)
    store.path(manifest.stitch_block().sha256).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_variant(manifest, store)
    with pytest.raises(IntegrityError, match="malformed manifest"):
        Manifest.from_bytes(manifest.to_bytes().replace(b'"stitch"', b'"pickle"'))


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, b"\xff" * 64, b"{\"a\": 1}", b"\x80\x04\x95" + b"x" * 40])
def test_hostile_bytes_are_not_weights(data):
    with pytest.raises(IntegrityError):
        bytes_to_tensors(data)


def test_new_version_changes_only_the_stitch_blob(tiny_catalog, tmp_path):
    manifest = tiny_catalog.manifest(tiny_catalog.variants[0].id)
    store = copy_store(tiny_catalog, tmp_path)
    model = load_variant(manifest, store)
    state = {k: v + 0.01 for k, v in model.stitch_state().items()}
    new = with_new_stitch(manifest, state, store, {**manifest.record, "version": manifest.version + 1})
    assert new.version == manifest.version + 1
    changed = [(a.role, a.sha256 != b.sha256) for a, b in zip(manifest.blocks, new.blocks)]
    assert [r for r, diff in changed if diff] == ["stitch"]
    loaded = load_variant(new, store)
    for k, v in loaded.stitch_state().items():
        assert torch.equal(v, state[k])
    assert tensors_to_bytes(state) == store.read(new.stitch_block().sha256)
