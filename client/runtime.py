"""What the device's application runs: the model of the rung the agent chose, switched without the network.

    rt = Runtime(device_dir)
    y = rt.predict(x)          # on the rung running now (it follows the agent's choice before every call)
    rt.rung, rt.model          # the rung's variant id, its torch module

The runtime loads every block of the ladder once (each verified against its sha256) and keeps them by sha256;
each rung is assembled from those blocks when the runtime starts (the rungs of one catalog share the front blocks
of the large model and the behind blocks of the small one, so a rung adds only a wrapper and its own blocks), and
a switch builds nothing and reads no weights: it checks the small `running.json` and takes the other rung. A
device without a ladder has one rung: `current.json`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from client.ladder_store import CURRENT, read_ladder, rung_manifest_bytes, running_manifest_bytes
from shared.artifacts import BlobStore, Manifest, bytes_to_tensors, sha256_bytes
from shared.errors import IntegrityError
from shared.stitching import StitchedModel
from shared.variants import build_stitched_model


class Runtime:
    def __init__(self, device_dir: Path | str):
        self.device_dir = Path(device_dir)
        store = BlobStore(self.device_dir / "blobs")
        ladder = read_ladder(self.device_dir)
        manifests = [Manifest.from_bytes(rung_manifest_bytes(self.device_dir, r)) for r in ladder] or \
            [Manifest.from_bytes((self.device_dir / CURRENT).read_bytes())]
        self.blocks: dict[str, torch.nn.Module] = {}  # sha256 -> the loaded block, shared by every rung holding it
        self._manifests = {m.sha256: m for m in manifests}
        self._rungs = {m.sha256: self._assemble(m, store) for m in manifests}
        self.rung: str | None = None
        self.model: StitchedModel | None = None
        self._running: str | None = None  # manifest sha256 of the rung assembled
        self.follow()

    def _assemble(self, manifest: Manifest, store: BlobStore) -> StitchedModel:
        """One rung's model, from blocks already loaded and the ones it is the first to need."""
        fresh = build_stitched_model(manifest.architecture)  # the module shapes; only unseen blocks are kept
        modules = {**{("front", i): m for i, m in enumerate(fresh.front)},
                   ("stitch", manifest.stitch_block().index): fresh.stitch,
                   **{("behind", manifest.architecture["behind_cut"] + k): m for k, m in enumerate(fresh.behind)}}
        refs = {(b.role, b.index): b.sha256 for b in manifest.blocks}
        if set(refs) != set(modules):
            raise IntegrityError(f"manifest of {manifest.variant_id} lists blocks that do not match its architecture")
        for key, module in modules.items():
            sha = refs[key]
            if sha not in self.blocks:
                module.load_state_dict(bytes_to_tensors(store.read(sha)), strict=True)  # read() verifies sha256
                self.blocks[sha] = module.eval()
        order = sorted(refs, key=lambda k: ({"front": 0, "stitch": 1, "behind": 2}[k[0]], k[1]))
        front = [self.blocks[refs[k]] for k in order if k[0] == "front"]
        behind = [self.blocks[refs[k]] for k in order if k[0] == "behind"]
        return StitchedModel(front, self.blocks[refs[("stitch", manifest.stitch_block().index)]], behind).eval()

    def follow(self) -> bool:
        """Take the rung the agent chose, if it changed; returns whether it did."""
        data = running_manifest_bytes(self.device_dir)
        if data is None:
            raise IntegrityError(f"no variant is installed in {self.device_dir}", "enroll the device first")
        sha = sha256_bytes(data)
        if sha == self._running:
            return False
        if sha not in self._rungs:
            raise IntegrityError(f"the device runs a rung this runtime did not load ({sha[:12]})",
                                 "the ladder changed: make a new Runtime")
        self.model, self.rung, self._running = self._rungs[sha], self._manifests[sha].variant_id, sha
        return True

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.follow()
        return self.model(x)

