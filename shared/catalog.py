"""The catalog: one record per stitched variant, plus the two base models it was built from.

`catalog.json` (schema `restnet.catalog/1`, documented in docs/CATALOG.md) is plain data; the model is only
rebuilt from a record's architecture when needed (`build_stitched_model`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shared.artifacts import BlobStore, Manifest, atomic_write
from shared.errors import ConfigError, IntegrityError

CATALOG_SCHEMA = "restnet.catalog/1"


@dataclass
class VariantRecord:
    id: str
    front_model: str
    behind_model: str
    front_cut: int  # number of front blocks kept
    behind_cut: int  # index of the first behind block used
    direction: str
    cka: float
    stitch_kind: str
    params: int
    flops: int
    memory_bytes: int  # measured peak inference memory, batch 1
    finetune_memory_bytes: int  # measured peak of one stitch-only training step on cached front outputs
    trainable_params: int
    latency_ms: float | None
    budgets: list[float] = field(default_factory=list)  # the budgets this variant was selected for
    accuracy: float | None = None  # after fine-tuning (the latest version's)
    accuracy_init: float | None = None  # with the least-squares (or random) initialised stitch only
    version: int = 1
    manifest: str = ""  # path of the current manifest, relative to the catalog folder
    manifest_sha256: str = ""
    macs: int | None = None  # multiply-accumulates per example, the paper's unit (None: from flops)

    def __post_init__(self):
        if self.macs is None:  # a catalog from before MACs were recorded: FlopCounterMode counts a MAC as 2
            self.macs = self.flops // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VariantRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def expected_accuracy(self) -> float:
        """Measured accuracy when known; otherwise CKA stands in (the paper: CKA tracks accuracy)."""
        if self.accuracy is not None:
            return self.accuracy
        return self.accuracy_init if self.accuracy_init is not None else self.cka


@dataclass
class ModelInfo:
    name: str
    kwargs: dict
    family: str
    block_names: list[str]
    params: int
    flops: int
    accuracy: float | None = None
    checkpoint: str | None = None
    macs: int | None = None  # as VariantRecord.macs

    def __post_init__(self):
        if self.macs is None:
            self.macs = self.flops // 2


@dataclass
class Catalog:
    front: ModelInfo
    behind: ModelInfo
    direction: str
    budget_metric: str
    input_shape: list[int]
    num_classes: int
    dataset: str
    variants: list[VariantRecord]
    cka_file: str = "cka.json"
    schema: str = CATALOG_SCHEMA
    root: Path | None = None  # the folder it lives in; not serialised

    def get(self, variant_id: str) -> VariantRecord:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    @property
    def store(self) -> BlobStore:
        return BlobStore(self.root / "blobs")

    def manifest(self, variant_id: str) -> Manifest:
        rec = self.get(variant_id)
        data = (self.root / rec.manifest).read_bytes()
        manifest = Manifest.from_bytes(data)
        if manifest.sha256 != rec.manifest_sha256:
            raise IntegrityError(f"manifest of {variant_id} does not match the catalog's sha256")
        return manifest

    def add_manifest(self, rec: VariantRecord, manifest: Manifest) -> None:
        """Write a variant's manifest and point its record at it (record.version follows the manifest)."""
        rel = f"manifests/{manifest.variant_id}/v{manifest.version}.json"
        atomic_write(self.root / rel, manifest.to_bytes())
        rec.version, rec.manifest, rec.manifest_sha256 = manifest.version, rel, manifest.sha256

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("root", "variants")}
        d["front"], d["behind"] = asdict(self.front), asdict(self.behind)
        d["variants"] = [v.to_dict() for v in self.variants]
        return d

    def save(self, root: Path | str | None = None) -> Path:
        self.root = Path(root) if root is not None else self.root
        path = self.root / "catalog.json"
        atomic_write(path, json.dumps(_finite(self.to_dict()), indent=2).encode())
        return path

    @classmethod
    def load(cls, root: Path | str) -> "Catalog":
        root = Path(root)
        path = root / "catalog.json" if root.is_dir() else root
        if not path.is_file():
            raise ConfigError(f"no catalog at {path}", "build one with `restnet catalog build --config ... --out DIR`")
        try:
            d = json.loads(path.read_text())
            if d.get("schema") != CATALOG_SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {CATALOG_SCHEMA}")
            cat = cls(
                front=ModelInfo(**d["front"]), behind=ModelInfo(**d["behind"]), direction=d["direction"],
                budget_metric=d["budget_metric"], input_shape=list(d["input_shape"]), num_classes=d["num_classes"],
                dataset=d["dataset"], variants=[VariantRecord.from_dict(v) for v in d["variants"]],
                cka_file=d.get("cka_file", "cka.json"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid catalog: {exc}") from exc
        cat.root = path.parent
        return cat

    def load_cka(self) -> dict:
        return json.loads((self.root / self.cka_file).read_text())


def _finite(obj):
    """JSON has no NaN: undefined numbers (e.g. CKA of a constant block) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def architecture_of(front: ModelInfo, behind: ModelInfo, front_cut: int, behind_cut: int, src_spec, dst_spec,
                    kernel_size: int = 1) -> dict:
    """The plain-data description `build_stitched_model` needs (stored in every manifest)."""
    return {
        "front": {"name": front.name, "kwargs": front.kwargs},
        "behind": {"name": behind.name, "kwargs": behind.kwargs},
        "front_cut": front_cut,
        "behind_cut": behind_cut,
        "stitch": {"src": src_spec.to_dict(), "dst": dst_spec.to_dict(), "kernel_size": kernel_size},
    }


def build_stitched_model(architecture: dict):
    """An untrained StitchedModel with the architecture's shape; weights are loaded by the caller."""
    from shared.blocks import split_model
    from shared.models import create_model
    from shared.specs import ActivationSpec
    from shared.stitching import StitchedModel, StitchingLayer

    a = architecture
    front = split_model(create_model(a["front"]["name"], a["front"]["kwargs"]), a["front"]["name"])
    behind = split_model(create_model(a["behind"]["name"], a["behind"]["kwargs"]), a["behind"]["name"])
    stitch = StitchingLayer(ActivationSpec.from_dict(a["stitch"]["src"]), ActivationSpec.from_dict(a["stitch"]["dst"]),
                            int(a["stitch"].get("kernel_size", 1)))  # manifests before kernel sizes: 1x1
    return StitchedModel(list(front.blocks[: a["front_cut"]]), stitch, list(behind.blocks[a["behind_cut"]:]))
