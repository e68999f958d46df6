"""A variant as plain data and as a model: the architecture record every manifest carries, the untrained
`StitchedModel` it describes, and that model with its verified weights loaded from a blob store.

The catalog and the manifests stay plain data (JSON + content-addressed safetensors); only this module turns
them into torch modules, on the operator's machine, the server and the devices alike.
"""
from __future__ import annotations

from shared.artifacts import BlobStore, Manifest, bytes_to_tensors
from shared.catalog import ModelInfo
from shared.blocks import split_model
from shared.errors import IntegrityError
from shared.models import create_model
from shared.specs import ActivationSpec
from shared.stitching import StitchedModel, StitchingLayer


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
    a = architecture
    front = split_model(create_model(a["front"]["name"], a["front"]["kwargs"]), a["front"]["name"])
    behind = split_model(create_model(a["behind"]["name"], a["behind"]["kwargs"]), a["behind"]["name"])
    stitch = StitchingLayer(ActivationSpec.from_dict(a["stitch"]["src"]), ActivationSpec.from_dict(a["stitch"]["dst"]),
                            int(a["stitch"].get("kernel_size", 1)))  # manifests before kernel sizes: 1x1
    return StitchedModel(list(front.blocks[: a["front_cut"]]), stitch, list(behind.blocks[a["behind_cut"]:]))


def load_variant(manifest: Manifest, store: BlobStore):
    """Rebuild the StitchedModel a manifest describes, verifying every block's hash first."""
    states = {(b.role, b.index): bytes_to_tensors(store.read(b.sha256)) for b in manifest.blocks}
    model = build_stitched_model(manifest.architecture)
    front = {("front", i): m for i, m in enumerate(model.front)}
    behind = {("behind", manifest.architecture["behind_cut"] + k): m for k, m in enumerate(model.behind)}
    modules = {**front, ("stitch", manifest.stitch_block().index): model.stitch, **behind}
    if set(modules) != set(states):
        raise IntegrityError(f"manifest of {manifest.variant_id} lists blocks that do not match its architecture")
    for key, module in modules.items():
        try:
            module.load_state_dict(states[key], strict=True)
        except RuntimeError as exc:
            raise IntegrityError(f"block {key} of {manifest.variant_id} has the wrong tensors: {exc}") from exc
    return model.eval()
