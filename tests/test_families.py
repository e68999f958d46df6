"""The generic splitter on the IoT families a fleet arrives with, besides the paper's four.

Per family: the blocks in order reproduce the model bit for bit, `block_outputs` equals running each prefix of
blocks, every block restores from its own state_dict onto a freshly created model (what a device does with a
variant's artifacts), and heterogeneous pairs stitch and train with gradients in the stitching layer only.
Small inputs and narrow widths keep each model well under a second.
"""
import copy
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from fleet_helpers import (MARGIN, MIB, assert_assignment_ok, device_agents, embedded_broker_url,  # noqa: F401
                           fleet_config, fleet_coordinator, profile_of)

from client.fleet_sim import settled
from shared.artifacts import BlobStore
from shared.blocks import activation_specs, block_outputs, split_model
from shared.build import build_catalog
from shared.config import DeviceConfig, parse_config
from shared.datasets import load_splits
from shared.errors import ModelError
from shared.models import create_model
from shared.stitching import StitchedModel, StitchingLayer
from shared.training import evaluate
from shared.variants import load_variant

ROOT = Path(__file__).resolve().parent.parent

# key: (timm name, kwargs, input size, family). Widths/depths are overridden where timm allows it (its entry
# points merge user kwargs over their own), and EfficientFormer's last-stage attention is built for a 7x7 grid,
# so it needs 224 px.
FAMILIES = {
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64, "mobilenetv3"),
    "efficientnet": ("efficientnet_b0", {}, 64, "efficientnet"),
    "convnext": ("convnext_atto", {"depths": (1, 1, 2, 1)}, 64, "convnext"),
    "regnet": ("regnetx_002", {}, 64, "regnet"),
    "mobilevit": ("mobilevit_xxs", {}, 64, "mobilevit"),
    "fastvit": ("fastvit_t8", {"layers": (1, 1, 2, 1)}, 64, "fastvit"),
    "efficientformer": ("efficientformer_l1", {"depths": (1, 1, 2, 2), "embed_dims": (16, 24, 32, 48)}, 224,
                        "efficientformer"),
    "resnet50": ("resnet50", {}, 32, "resnet"),
    "resnet18": ("resnet18", {}, 32, "resnet"),
    "vgg11": ("cifar_vgg11", {"width": 0.25}, 32, "cifar_models"),
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 4}, 32, "deit"),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "depths": (1, 1, 2, 1)}, 64,
                  "swin_transformer"),
}
_cache = {}


def create(key: str, seed: int = 0) -> nn.Module:
    name, kwargs, _, _ = FAMILIES[key]
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def blocked(key: str):
    """(model, BlockedModel, specs at the family's input size), built once per session."""
    if key not in _cache:
        name, _, size, _ = FAMILIES[key]
        model = create(key)
        bm = split_model(model, name)
        _cache[key] = model, bm, activation_specs(bm, (3, size, size))
    return _cache[key]


def image(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", list(FAMILIES))
def test_blocks_reproduce_the_model_exactly_and_restore_from_their_state_dicts(key):
    model, bm, specs = blocked(key)
    name, _, size, family = FAMILIES[key]
    x = image(size)
    with torch.no_grad():
        expected = model(x)
        outputs = block_outputs(bm, x)
        assert torch.equal(outputs[-1], expected)
        for k in (0, len(outputs) // 2, len(outputs) - 2):  # no block overwrites the output of the one before
            assert torch.equal(outputs[k], nn.Sequential(*bm.blocks[: k + 1])(x))
    assert bm.family == family and bm.block_names[-1] == "head" and len(bm.blocks) >= 4
    assert len(set(bm.block_names)) == len(bm.blocks)
    # Blocks reference the model's parameters, each exactly once: nothing copied, nothing left out.
    ids = [id(p) for block in bm.blocks for p in block.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    # A device rebuilds the architecture from its name and loads each block's own state_dict.
    other = create(key, seed=1)
    fresh = split_model(other, name)
    assert fresh.block_names == bm.block_names
    for src, dst in zip(bm.blocks, fresh.blocks):
        dst.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    # Every non-head boundary is a stitchable activation whose spec describes the real tensor.
    for spec, out in zip(specs[:-1], outputs[:-1]):
        c, (h, w), p = spec.channels, spec.grid, spec.prefix_tokens
        assert tuple(out.shape) == {"nchw": (2, c, h, w), "nhwc": (2, h, w, c), "tokens": (2, p + h * w, c)}[
            spec.layout]
    assert specs[-1].layout == "logits" and specs[-1].channels == 10


def test_efficientformer_ends_in_tokens_and_mobilevit_hides_its_unfolded_patches():
    """EfficientFormer's last stage runs on (N, 49, C) tokens; MobileViT's transformers run on patches folded into
    the batch, which no stitching layer can take: those are not boundaries, the whole MobileViT block is one."""
    *_, specs = blocked("efficientformer")
    assert [s.layout for s in specs[-3:]] == ["tokens", "tokens", "logits"]
    assert specs[-2].grid == (7, 7) and specs[-2].prefix_tokens == 0
    _, bm, specs = blocked("mobilevit")
    assert all(s.layout == "nchw" for s in specs[:-1])
    assert "stages.2.1" in bm.block_names and not any(n.startswith("stages.2.1.") for n in bm.block_names)


# (front, behind, input size): every IoT family in front and behind, next to a family of another kind; the size
# is the one a fixed-size model of the pair needs (the others take any size).
PAIRS = [
    ("efficientnet", "mobilenetv3", 64),
    ("convnext", "mobilenetv3", 64),
    ("resnet50", "regnet", 64),
    ("regnet", "fastvit", 64),
    ("fastvit", "mobilevit", 64),
    ("mobilevit", "efficientnet", 64),
    ("mobilenetv3", "resnet50", 64),
    ("efficientformer", "convnext", 224),
    ("mobilenetv3", "efficientformer", 224),
    ("swin_tiny", "convnext", 64),
    ("deit_tiny", "efficientnet", 32),
    ("efficientnet", "deit_tiny", 32),
]


@pytest.mark.parametrize("front_key, behind_key, size", PAIRS, ids=[f"{a}-{b}" for a, b, _ in PAIRS])
def test_heterogeneous_pairs_train_only_the_stitching_layer(front_key, behind_key, size):
    (f_bm, f_specs), (b_bm, b_specs) = (_private(k, size) for k in (front_key, behind_key))
    a = len(f_specs) - 2 if front_key == "efficientformer" else (len(f_specs) - 2) // 2  # its last token boundary
    b = (len(b_specs) - 2) // 2
    stitch = StitchingLayer(f_specs[a], b_specs[b])
    model = StitchedModel(list(f_bm.blocks[: a + 1]), stitch, list(b_bm.blocks[b + 1:]))
    x = image(size, 4)
    model.train()
    logits = model(x)
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    stitch_ids = {id(p) for p in stitch.parameters()}
    for p in model.parameters():
        if id(p) in stitch_ids:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None and not p.requires_grad
    assert any(p.grad.abs().sum() > 0 for p in stitch.parameters())


def _private(key: str, size: int):
    """A (BlockedModel, specs at `size`) of its own: stitching freezes blocks, the cached models stay untouched."""
    _, bm, specs = blocked(key)
    bm = copy.deepcopy(bm)
    return bm, specs if size == FAMILIES[key][2] else activation_specs(bm, (3, size, size))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace this
            x = -x
        return self.blocks(x).mean((2, 3))


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)),
     "no block boundary"),
    (_Untraceable(), "torch.fx cannot trace it"),
], ids=["no-boundary", "untraceable"])
def test_a_model_that_cannot_be_split_gets_one_clear_error(model, reason):
    with pytest.raises(ModelError) as info:
        split_model(model, "mystery")
    assert info.value.message.startswith("cannot split mystery") and reason in info.value.message
    assert "torch.fx" in info.value.hint and "timm" in info.value.hint


def test_an_iot_pair_builds_its_catalog_offline_and_devices_rebuild_the_variants(tmp_path, embedded_broker_url,
                                                                                 fleet_coordinator, device_agents):
    """fleet_configs/iot-convnext-atto-mobilenetv3-large.yaml offline: random init at 32 px, digits data; then the
    catalog goes through a coordinator and the embedded broker to a device, which runs what the build measured."""
    config = ROOT / "fleet_configs" / "iot-convnext-atto-mobilenetv3-large.yaml"
    cfg_dict = yaml.safe_load(config.read_text())
    for role in ("large", "small"):  # no hub: keep the random init (0 epochs), saved as the base checkpoint
        cfg_dict[role].update(pretrained=False, train={"epochs": 0})
    cfg_dict["data"] = {"dataset": "digits", "image_size": 32, "channels": 3,
                        "calibration": {"examples": 32, "repeats": 1}}
    cfg_dict["catalog"].update(sweep=2, finetune={"epochs": 0}, measure_latency=False)
    cfg = parse_config(cfg_dict, "iot")
    catalog = build_catalog(cfg, tmp_path, progress=False, log=lambda m: None).catalog
    assert (catalog.front.family, catalog.behind.family) == ("convnext", "mobilenetv3")
    assert catalog.variants
    _, val = load_splits(cfg.data)
    bases = {}
    for role, info in (("large", catalog.front), ("small", catalog.behind)):
        model = create_model(info.name, info.kwargs, checkpoint=tmp_path / "checkpoints" / f"{role}.safetensors")
        bases[role] = split_model(model.eval(), info.name)
        assert bases[role].block_names == info.block_names
    x = val.tensors[0][:8]
    for rec in catalog.variants:
        variant = load_variant(catalog.manifest(rec.id), catalog.store)
        assert evaluate(variant, val) == rec.accuracy  # the model the build measured, rebuilt from its blobs
        again = StitchedModel(list(bases["large"].blocks[: rec.front_cut]), variant.stitch,
                              list(bases["small"].blocks[rec.behind_cut:])).eval()
        with torch.no_grad():
            assert torch.equal(variant(x), again(x))

    fleet = fleet_config(tmp_path, embedded_broker_url)
    largest = max(catalog.variants, key=lambda r: r.memory_bytes + r.finetune_memory_bytes)
    need_mb = (largest.memory_bytes + largest.finetune_memory_bytes) * (1 + MARGIN) / MIB
    device = DeviceConfig("cam-iot", memory_mb=round(need_mb + 1, 3), compute=1.0, latency_ms=None, password="pw")
    fleet = replace(fleet, devices=[device])
    fleet_coordinator(fleet, catalog)
    agent = device_agents(fleet, device)
    assert agent.wait(settled, 120), agent.failure
    assert_assignment_ok(catalog, profile_of(device), agent.installed.variant_id)
    on_device = load_variant(agent.installed, BlobStore(agent.device_dir / "blobs")).eval()
    rec = next(r for r in catalog.variants if r.id == agent.installed.variant_id)
    assert evaluate(on_device, val) == rec.accuracy
