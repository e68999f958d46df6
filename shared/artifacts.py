"""Variant artifacts: content-addressed safetensors blocks plus a manifest that lists them.

A variant's weights are split the way the model is: one safetensors file per front block, one for the
stitching layer, one per behind block. Each file is named by its sha256, so variants that share a block share
its bytes, a device downloads only the blocks it lacks, and a new version of a variant changes only the stitch
blob. Nothing here unpickles: weights are safetensors, manifests are JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import IntegrityError
from shared.vocabulary import valid_sha256

MANIFEST_SCHEMA = "restnet.artifact/2"  # /2: blocks hold the model's full parameter names (generic splitting)
ROLES = ("front", "stitch", "behind")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialise a state dict to safetensors bytes (deterministic for equal tensors)."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in sorted(state.items())})


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything malformed is an IntegrityError, never a crash or an unpickle."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise IntegrityError(f"not a valid safetensors block: {exc}", "re-download the block") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file. The file is
    readable by its owner only (mkstemp's mode 0600) until someone widens it: fit for secrets too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlobStore:
    """A folder of immutable blobs named by their sha256."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not valid_sha256(sha256):
            raise IntegrityError(f"not a sha256 digest: {sha256[:80]!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has(digest):
            atomic_write(self.path(digest), data)
        return digest

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, verified against its name."""
        path = self.path(sha256)
        if not path.is_file():
            raise IntegrityError(f"blob {sha256[:12]} is missing from {self.root}", "download it again")
        data = path.read_bytes()
        if sha256_bytes(data) != sha256:
            raise IntegrityError(f"blob {sha256[:12]} does not match its sha256", "delete it and download again")
        return data


@dataclass(frozen=True)
class BlockRef:
    role: str
    index: int
    sha256: str
    size: int


@dataclass
class Manifest:
    """Everything a device needs to rebuild and verify a variant."""

    variant_id: str
    version: int
    architecture: dict
    blocks: list[BlockRef]
    record: dict = field(default_factory=dict)
    schema: str = MANIFEST_SCHEMA

    def to_bytes(self) -> bytes:
        d = asdict(self)
        return json.dumps(d, sort_keys=True, indent=1).encode()

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.to_bytes())

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blocks)

    def stitch_block(self) -> BlockRef:
        return next(b for b in self.blocks if b.role == "stitch")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        try:
            d = json.loads(data)
            if d.get("schema") != MANIFEST_SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
            blocks = [BlockRef(str(b["role"]), int(b["index"]), str(b["sha256"]), int(b["size"])) for b in d["blocks"]]
            if any(b.role not in ROLES for b in blocks) or sum(b.role == "stitch" for b in blocks) != 1:
                raise ValueError("blocks must have roles front/stitch/behind with exactly one stitch")
            return cls(str(d["variant_id"]), int(d["version"]), dict(d["architecture"]), blocks, dict(d.get("record", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"malformed manifest: {exc}") from exc


def export_variant(model, variant_id: str, version: int, architecture: dict, store: BlobStore,
                   record: dict | None = None) -> Manifest:
    """Store each block of a StitchedModel as a blob and return the manifest that lists them."""
    front_cut, behind_cut = architecture["front_cut"], architecture["behind_cut"]
    parts = [("front", i, blk) for i, blk in enumerate(model.front)]
    parts.append(("stitch", front_cut, model.stitch))
    parts += [("behind", behind_cut + k, blk) for k, blk in enumerate(model.behind)]
    blocks = []
    for role, index, module in parts:
        data = tensors_to_bytes(module.state_dict())
        blocks.append(BlockRef(role, index, store.put(data), len(data)))
    return Manifest(variant_id, version, architecture, blocks, dict(record or {}))


def with_new_stitch(manifest: Manifest, stitch_state: dict[str, torch.Tensor], store: BlobStore,
                    record: dict) -> Manifest:
    """The next version of a variant: same blocks, a new stitching-layer blob, the new version's `record`.
    Catalogs publish through `Catalog.publish_stitch`, which checks versions and weights first."""
    data = tensors_to_bytes(stitch_state)
    old = manifest.stitch_block()
    new = BlockRef("stitch", old.index, store.put(data), len(data))
    blocks = [new if b.role == "stitch" else b for b in manifest.blocks]
    return Manifest(manifest.variant_id, manifest.version + 1, manifest.architecture, blocks,
                    dict(record))
