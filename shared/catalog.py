"""The catalog: one record per stitched variant, plus the two base models it was built from.

`catalog.json` (schema `restnet.catalog/1`, documented in docs/CATALOG.md) is plain data; the model is only
rebuilt from a record's architecture when needed (`shared.variants`).

Several writers may hold the same catalog folder (the coordinator, a federated run, `restnet stitch-train`), so
a new version of a variant is made in one place only, `Catalog.publish_stitch`: under the folder's lock, against
catalog.json as it is on disk, refusing a writer whose update was made from a version that is no longer current.
"""
from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from shared.artifacts import BlobStore, Manifest, atomic_write, bytes_to_tensors, with_new_stitch
from shared.errors import ConfigError, IntegrityError, RestnetError

CATALOG_SCHEMA = "restnet.catalog/1"
LOCK_FILE = ".lock"


class StaleVersion(RestnetError):
    """A new version was made from a version of the variant that another writer has replaced meanwhile."""


def manifest_path(variant_id: str, version: int) -> str:
    """Where a variant version's manifest lives, relative to the catalog folder (and to the coordinator's URL)."""
    return f"manifests/{variant_id}/v{version}.json"


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

    def manifest_record(self) -> dict:
        """The record as a manifest of this version carries it (without the fields that point at the manifest)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("manifest", "manifest_sha256")}

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
        rel = manifest_path(manifest.variant_id, manifest.version)
        atomic_write(self.root / rel, manifest.to_bytes())
        rec.version, rec.manifest, rec.manifest_sha256 = manifest.version, rel, manifest.sha256

    def publish_stitch(self, variant_id: str, stitch: Mapping[str, torch.Tensor], accuracy: float | None,
                       base_version: int) -> Manifest:
        """Make `stitch` the next version of a variant whose current version is `base_version`; return its manifest.

        Under the catalog folder's lock and against catalog.json as it is on disk (this object's copy may be
        old): an update made from a version that is no longer current is refused with StaleVersion, weights that
        do not fit the variant's stitch with IntegrityError. The manifest's record carries the new version and
        accuracy; then catalog.json is replaced. This object then holds the catalog as written, other writers'
        versions included."""
        with locked(self.root):
            disk = Catalog.load(self.root)
            try:
                rec = disk.get(variant_id)
            except KeyError:
                raise RestnetError(f"no variant {variant_id!r} in {self.root}") from None
            if rec.version != base_version:
                raise StaleVersion(f"{variant_id} is at version {rec.version} in the catalog; this update was made "
                                   f"from version {base_version}", "train again from the current version")
            manifest = disk.manifest(variant_id)
            _check_same_layout(bytes_to_tensors(disk.store.read(manifest.stitch_block().sha256)), stitch)
            if accuracy is not None:
                rec.accuracy = accuracy
            rec.version += 1
            new = with_new_stitch(manifest, stitch, disk.store, rec.manifest_record())
            disk.add_manifest(rec, new)
            disk.save()
        self.variants = disk.variants
        return new

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


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """An exclusive lock on a catalog folder, across processes (flock on `<root>/.lock`)."""
    with open(Path(root) / LOCK_FILE, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_same_layout(current: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    """New stitch weights must have the variant's tensors: the same names, shapes and dtypes, finite values."""
    if set(current) != set(new):
        raise IntegrityError(f"stitch tensors {sorted(new)[:8]} differ from the variant's {sorted(current)[:8]}")
    for name, t in new.items():
        ref = current[name]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            raise IntegrityError(f"stitch tensor {name}: {getattr(t, 'dtype', type(t).__name__)}"
                                 f"{list(getattr(t, 'shape', []))}, expected {ref.dtype}{list(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IntegrityError(f"stitch tensor {name} has non-finite values")


def _finite(obj):
    """JSON has no NaN: undefined numbers (e.g. CKA of a constant block) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
