"""The paper's CNN settings (Table I, CIFAR-10 and CIFAR-100): its base models.

Counts need no data and no weights: the models are built on PyTorch's meta device (shapes only), so each test
takes a fraction of a second although ResNet34 and VGG19 have over 20M parameters.
"""
from functools import cache

import pytest
import timm
import torch
import torch.nn as nn

from shared.blocks import activation_specs, split_model
from shared.costs import count_params
from shared.errors import ModelError

# Table I's Params and FLOPs columns of the base models.
BASE = [
    (10, "cifar_vgg11", 9.76, 153.90), (10, "cifar_vgg19", 20.57, 399.87), (10, "cifar_resnet34", 21.28, 1163.51),
    (100, "cifar_vgg11", 9.80, 153.95), (100, "cifar_vgg19", 20.61, 399.92), (100, "cifar_resnet34", 21.33, 1163.55),
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
