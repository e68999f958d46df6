"""The paper's CNN settings (Table I, CIFAR-10 and CIFAR-100): its base models, and its variants with 3x3 stitches.

Counts need no data and no weights: the models are built on PyTorch's meta device (shapes only), so each test
takes a fraction of a second although ResNet34 and VGG19 have over 20M parameters.
"""
from bisect import bisect_left
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from shared.blocks import activation_specs, split_model
from shared.config import load_config
from shared.costs import count_macs, count_params
from shared.errors import ModelError
from shared.stitching import StitchedModel, StitchingLayer

META_INPUT = torch.zeros(1, 3, 32, 32, device="meta")

# Table I's Params and FLOPs columns of the base models.
BASE = [
    (10, "cifar_vgg11", 9.76, 153.90), (10, "cifar_vgg19", 20.57, 399.87), (10, "cifar_resnet34", 21.28, 1163.51),
    (100, "cifar_vgg11", 9.80, 153.95), (100, "cifar_vgg19", 20.61, 399.92), (100, "cifar_resnet34", 21.33, 1163.55),
]

# Table I's stitched rows (front -> VGG11): classes, front, front_cut, behind_cut, Params (M), Trainable (M).
# Where several block pairs give these counts (VGG repeats its 256/512-channel convs), the pair is the one whose
# multiply-accumulates also give the row's FLOPs (docs/CATALOG.md, "MACs and the paper's FLOPs column").
STITCHED = [
    (10, "cifar_vgg19", 5, 3, 10.53, 0.59),
    (10, "cifar_vgg19", 9, 6, 11.12, 2.36),  # the paper's Fig. 3: VGG19 layers 0-8, then VGG11 from layer 6
    (10, "cifar_vgg19", 13, 6, 20.56, 2.36),
    (10, "cifar_resnet34", 4, 2, 9.98, 0.07),
    (10, "cifar_resnet34", 9, 4, 11.64, 0.59),
    (10, "cifar_resnet34", 14, 7, 12.23, 1.18),
    (100, "cifar_vgg19", 3, 2, 9.99, 0.15),
    (100, "cifar_vgg19", 5, 3, 10.58, 0.59),
    (100, "cifar_vgg19", 6, 3, 11.17, 0.59),
    (100, "cifar_resnet34", 7, 2, 10.92, 0.15),
    (100, "cifar_resnet34", 9, 4, 11.69, 0.59),
    (100, "cifar_resnet34", 10, 4, 12.87, 0.59),
]
TABLE_PRECISION = 0.005  # Table I prints millions with two decimals


@cache
def blocked(name: str, classes: int):
    bm = split_model(timm.create_model(name, num_classes=classes, device="meta"), name)
    return bm, activation_specs(bm, (3, 32, 32))


@pytest.mark.parametrize("classes, name, params_m, flops_m", BASE, ids=[f"{n}-{c}" for c, n, _, _ in BASE])
def test_base_models_have_the_papers_parameter_counts(classes, name, params_m, flops_m):
    bm, _ = blocked(name, classes)
    assert abs(count_params(bm) / 1e6 - params_m) <= TABLE_PRECISION


@pytest.mark.parametrize("classes, front, front_cut, behind_cut, params_m, trainable_m", STITCHED,
                         ids=[f"{f}.{a}-vgg11.{b}-{c}" for c, f, a, b, _, _ in STITCHED])
def test_3x3_stitched_variants_have_the_papers_counts(classes, front, front_cut, behind_cut, params_m, trainable_m):
    """Equal at the table's precision: within 0.05% for Params and 1% for every Trainable count from 0.5M; the
    0.07M and 0.15M rows can only be matched to their two decimals (they are 9 x 64 x 128 and 9 x 128 x 128)."""
    f, f_specs = blocked(front, classes)
    b, b_specs = blocked("cifar_vgg11", classes)
    src, dst = f_specs[front_cut - 1], b_specs[behind_cut - 1]
    model = StitchedModel(list(f.blocks[:front_cut]), StitchingLayer(src, dst, kernel_size=3),
                          list(b.blocks[behind_cut:]))
    trainable = model.set_strategy("stitch")
    assert trainable == 9 * src.channels * dst.channels  # a 3x3 convolution without bias
    assert abs(trainable / 1e6 - trainable_m) <= TABLE_PRECISION
    assert abs(count_params(model) / 1e6 - params_m) <= TABLE_PRECISION


@pytest.mark.parametrize("classes, front", [(10, "cifar_vgg19"), (10, "cifar_resnet34"), (100, "cifar_vgg19"),
                                            (100, "cifar_resnet34")])
def test_paper_configs_have_the_papers_settings_and_a_budget_band_per_variant(classes, front):
    short = front.removeprefix("cifar_")
    cfg = load_config(Path(__file__).parent.parent / "fleet_configs" / f"cifar{classes}-{short}-vgg11.yaml")
    assert (cfg.large.name, cfg.small.name, cfg.num_classes) == (front, "cifar_vgg11", classes)
    assert cfg.data.dataset == f"cifar{classes}" and cfg.input_shape == (3, 32, 32)
    assert cfg.catalog.stitch_kernel_size == 3 and cfg.catalog.direction == "slow_to_fast"
    sizes = [p * 1e6 for c, f, _, _, p, _ in STITCHED if (c, f) == (classes, front)]
    bands = [bisect_left(sorted(cfg.catalog.budgets), size) for size in sizes]  # band i: (budget i-1, budget i]
    assert len(set(bands)) == len(sizes) and max(bands) < len(cfg.catalog.budgets)


def _thop_elementwise(model: nn.Module, x: torch.Tensor) -> int:
    """What the paper's profiler (thop) adds to multiply-accumulates: 4 operations per BatchNorm output element
    (2, doubled for the affine weight and bias) and (k + 1) per output of an adaptive average pool over k inputs."""
    ops = [0]

    def bn(m, i, o):
        ops[0] += 4 * o.numel()

    def pool(m, i, o):
        ops[0] += (i[0].numel() // o.numel() + 1) * o.numel()

    hooks = [m.register_forward_hook(bn) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks += [m.register_forward_hook(pool) for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return ops[0]


@pytest.mark.parametrize("classes, name, params_m, flops_m", BASE, ids=[f"{n}-{c}" for c, n, _, _ in BASE])
def test_macs_are_the_papers_flops_column_without_its_profilers_elementwise_operations(classes, name, params_m,
                                                                                         flops_m):
    bm, _ = blocked(name, classes)
    macs = count_macs(bm, META_INPUT)
    assert macs / 1e6 == pytest.approx(flops_m, rel=0.005)  # e.g. VGG11: 153.29M against the paper's 153.90M
    assert abs((macs + _thop_elementwise(bm, META_INPUT)) / 1e6 - flops_m) <= TABLE_PRECISION


def test_cifar_resnet_has_the_cifar_stem_and_splits_exactly():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet34", num_classes=10).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    bm = split_model(model, "cifar_resnet34")
    assert [s.grid for s in activation_specs(bm, (3, 32, 32))[:2]] == [(32, 32), (32, 32)]  # stem, layer1.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bm(x), model(x))
    assert timm.create_model("cifar_resnet18", num_classes=3, in_chans=1)(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(ModelError, match="no published pretrained weights"):
        timm.create_model("cifar_resnet34", pretrained=True)
