"""The catalog a coordinator serves, kept current: what each variant's assignment says, and new versions.

New versions come from two places: a federated run that hands the coordinator an aggregated stitch (`publish`,
through the catalog's one publish path, `Catalog.publish_stitch`), and other writers of the same catalog folder
(`restnet stitch-train --save`, `restnet fl run` without a coordinator, another coordinator) noticed by `refresh`.
Either way the caller then moves the devices on a changed variant to its new version.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from server.assignment import Assigner
from shared.artifacts import Manifest, atomic_write
from shared.catalog import Catalog, manifest_path
from shared.messages import Assignment, Rung
from shared.signing import Signer

log = logging.getLogger("restnet.coordinator")


class VariantVersions:
    def __init__(self, catalog: Catalog, memory_margin: float, public_url: str = "", signer: Signer | None = None):
        self.memory_margin, self.public_url, self.signer = memory_margin, public_url, signer
        self._adopt(catalog)

    def _adopt(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.blocks = {r.id: {b.sha256: b.size for b in catalog.manifest(r.id).blocks} for r in catalog.variants}
        self.assigner = Assigner(catalog.variants, self.memory_margin,
                                 {vid: sum(sizes.values()) for vid, sizes in self.blocks.items()})
        self._assignments: dict[str, Assignment] = {}
        self._stamp = _stamp(catalog.root)
        self._sign_manifests()

    def _sign_manifests(self) -> None:
        """Every manifest of the catalog signed by our key, beside it (`<manifest>.sig`): new versions, however
        they were published, and all of them after a key rotation."""
        if self.signer is None:
            return
        for rec in self.catalog.variants:
            for version in range(1, rec.version + 1):
                path = self.catalog.root / manifest_path(rec.id, version)
                sig = Path(f"{path}.sig")
                if not path.is_file() or (sig.is_file() and json.loads(sig.read_bytes()).get("key_id")
                                          == self.signer.key_id):
                    continue
                atomic_write(sig, json.dumps(self.signer.sign(path.read_bytes())).encode())

    def assignment(self, variant_id: str) -> Assignment:
        """What a desired state says about the variant's current version: where its manifest is, its sha256."""
        if variant_id not in self._assignments:
            m = self.catalog.manifest(variant_id)
            url = f"{self.public_url}/{manifest_path(variant_id, m.version)}"
            self._assignments[variant_id] = Assignment(variant_id, m.version, url, m.sha256, m.total_bytes)
        return self._assignments[variant_id]

    def rung(self, variant_id: str) -> Rung:
        """A ladder's rung: the variant's assignment and the memory the device needs to run it."""
        a = self.assignment(variant_id)
        need = round(self.assigner.needs[variant_id].memory_mb, 3)
        return Rung(a.variant_id, a.variant_version, a.manifest_url, a.manifest_sha256, a.total_bytes, need)

    def accuracies(self) -> dict[str, float]:
        return {r.id: r.accuracy for r in self.catalog.variants if r.accuracy is not None and math.isfinite(r.accuracy)}

    def publish(self, variant_id: str, stitch: Mapping[str, torch.Tensor], accuracy: float,
                base_version: int) -> tuple[Manifest, set[str]]:
        """A variant's next version from aggregated stitch weights trained from `base_version`. Returns its
        manifest and every variant whose version moved (other writers' included). Raises StaleVersion when the
        catalog has moved on, IntegrityError for weights that do not fit."""
        before = self._versions()
        manifest = self.catalog.publish_stitch(variant_id, stitch, accuracy, base_version)
        self._adopt(self.catalog)
        log.info("%s: version %d published (accuracy %.4f)", variant_id, manifest.version, accuracy)
        return manifest, self._moved_since(before)

    def refresh(self) -> set[str]:
        """Reload the catalog if another writer changed it; returns the variants whose version moved."""
        if _stamp(self.catalog.root) == self._stamp:
            return set()
        before = self._versions()
        self._adopt(Catalog.load(self.catalog.root))
        moved = self._moved_since(before)
        if moved:
            log.info("the catalog changed on disk: new versions of %s", ", ".join(sorted(moved)))
        return moved

    def _moved_since(self, before: dict[str, int]) -> set[str]:
        return {v for v, n in self._versions().items() if before.get(v) != n}

    def _versions(self) -> dict[str, int]:
        return {r.id: r.version for r in self.catalog.variants}


def _stamp(root: Path) -> tuple:
    """What changes whenever catalog.json is replaced (every write renames a new file over it)."""
    st = (Path(root) / "catalog.json").stat()
    return st.st_ino, st.st_mtime_ns, st.st_size
