"""The frozen front's outputs on a device's data, kept on disk between federated rounds.

Stitch-only training never changes the front blocks, so their outputs on a device's partition are the same every
round: the first round computes them, later rounds read them back. The cache is keyed by everything the outputs
depend on (`front_key`: the front blocks' sha256s and architecture, the data settings, the partition), stored as
safetensors (never pickle) with the key in its metadata, and next to it the sha256 of the file's bytes. A file
whose digest, key or tensors do not check out is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import TensorDataset

from shared.artifacts import Manifest, atomic_write, sha256_bytes

FORMAT = "restnet.front-cache/1"
CACHE_DIR = "front-cache"


def front_key(manifest: Manifest, data_description: dict) -> str:
    """What the front's outputs on a dataset depend on: the front blocks (by content), how they are assembled,
    and the exact examples (`data_description`: dataset settings, split, partition)."""
    arch = manifest.architecture
    fronts = sorted((b.index, b.sha256) for b in manifest.blocks if b.role == "front")
    what = {"format": FORMAT, "front": arch["front"], "front_cut": arch["front_cut"], "blocks": fronts,
            "data": data_description}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class FrontCache:
    """A folder of cached front outputs (`<key>.safetensors` + `<key>.sha256`)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.sha256"

    def load(self, key: str) -> TensorDataset | None:
        """The cached outputs for `key`, or None when missing or not verifiable (then the caller recomputes)."""
        data_path, digest_path = self.paths(key)
        try:
            data, digest = data_path.read_bytes(), digest_path.read_text().strip()
        except OSError:
            return None
        if sha256_bytes(data) != digest:
            return None
        try:
            tensors = st_load(data)
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        except (SafetensorError, ValueError, RuntimeError):
            return None
        if meta.get("key") != key or meta.get("format") != FORMAT or set(tensors) != {"front", "labels"}:
            return None
        front, labels = tensors["front"], tensors["labels"]
        if len(front) != len(labels) or labels.dtype != torch.int64:
            return None
        return TensorDataset(front, labels)

    def store(self, key: str, outputs: TensorDataset) -> None:
        front, labels = outputs.tensors
        data = st_save({"front": front.contiguous(), "labels": labels.contiguous()},
                       metadata={"key": key, "format": FORMAT})
        data_path, digest_path = self.paths(key)
        atomic_write(data_path, data)
        atomic_write(digest_path, sha256_bytes(data).encode())

    def get_or_compute(self, key: str, compute: Callable[[], TensorDataset]) -> tuple[TensorDataset, bool]:
        """(outputs, True if they came from the cache)."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        outputs = compute()
        self.store(key, outputs)
        return outputs, False
