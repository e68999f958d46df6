"""CIFAR-style VGG and ResNet (the paper's VGG11/VGG19/ResNet34 base models), registered in timm's registry.

timm's own `vgg*` carry an ImageNet head (4096-wide ConvMlp, ~130M parameters). The CIFAR variant used by the
paper is a Conv3x3+BN+ReLU stack with five max-pools and a small 512-wide MLP classifier: 9.76M parameters for
VGG11 and 20.57M for VGG19 at 10 classes. Each conv unit is its own module (with the max-pool that follows it)
so that `shared.blocks` can split the network one unit per block.

timm's `resnet*` start with a 7x7 stride-2 conv and a max-pool: at 32 px that leaves an 8x8 map after the stem,
a different network from the CIFAR ResNet of the paper (3x3 stride-1 stem, no max-pool: 32x32 into layer1,
21.28M parameters for ResNet34 at 10 classes). `cifar_resnet*` are timm `ResNet` instances with that stem, so
timm's and our ResNet code (block splitting) handle them as any other ResNet.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet

from shared.errors import ModelError

# Classic VGG configurations: channel counts, "M" = 2x2 max-pool.
CFGS = {
    "cifar_vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "cifar_vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "cifar_vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "cifar_vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                    512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG for small images: `features` holds one Sequential(conv, bn, relu[, pool]) per conv layer."""

    def __init__(self, cfg: list, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 drop_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        units, chans = [], in_chans
        for i, item in enumerate(cfg):
            if item == "M":
                continue
            out = max(1, round(item * width))
            layers = [("conv", nn.Conv2d(chans, out, 3, padding=1, **dd)), ("bn", nn.BatchNorm2d(out, **dd)),
                      ("act", nn.ReLU(inplace=True))]
            if i + 1 < len(cfg) and cfg[i + 1] == "M":
                layers.append(("pool", nn.MaxPool2d(2, 2, ceil_mode=True)))  # ceil: inputs < 32 px still work
            units.append(nn.Sequential(OrderedDict(layers)))
            chans = out
        self.features = nn.Sequential(*units)
        self.num_features = self.head_hidden_size = chans
        # Adaptive pool: 1x1 already at 32x32 input (a no-op there), and other input sizes still work.
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = self._make_classifier(num_classes, **dd)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _make_classifier(self, num_classes: int, device=None, dtype=None) -> nn.Sequential:
        c, dd = self.num_features, {"device": device, "dtype": dtype}
        return nn.Sequential(
            nn.Linear(c, c, **dd), nn.ReLU(inplace=True), nn.Dropout(self.drop_rate),
            nn.Linear(c, c, **dd), nn.ReLU(inplace=True), nn.Dropout(self.drop_rate),
            nn.Linear(c, num_classes, **dd),
        )

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# BasicBlock counts per stage of the CIFAR ResNets.
RESNET_LAYERS = {"cifar_resnet18": (2, 2, 2, 2), "cifar_resnet34": (3, 4, 6, 3)}


def _cfg(first_conv: str, classifier: str, pool_size: tuple[int, int]) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": pool_size, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": first_conv, "classifier": classifier}


default_cfgs = generate_default_cfgs({
    **{name: _cfg("features.0.conv", "classifier.6", (1, 1)) for name in CFGS},
    **{name: _cfg("conv1", "fc", (4, 4)) for name in RESNET_LAYERS},
})


def _no_pretrained(variant: str, pretrained: bool) -> None:
    if pretrained:
        raise ModelError(f"{variant} has no published pretrained weights",
                         "train it locally and load the safetensors checkpoint instead")


def _create(variant: str, pretrained: bool, **kwargs) -> CifarVGG:
    _no_pretrained(variant, pretrained)
    return build_model_with_cfg(CifarVGG, variant, False, cfg=CFGS[variant], **kwargs)


def _create_resnet(variant: str, pretrained: bool, **kwargs) -> ResNet:
    """timm's ResNet with the CIFAR stem: a 3x3 stride-1 conv, and an identity where the max-pool was."""
    _no_pretrained(variant, pretrained)
    model = build_model_with_cfg(ResNet, variant, False, block=BasicBlock, layers=RESNET_LAYERS[variant], **kwargs)
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False,
                            device=old.weight.device, dtype=old.weight.dtype)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's init_weights
    model.maxpool = nn.Identity()
    for info in model.feature_info:  # the stem no longer downsamples 4x
        info["reduction"] = max(1, info["reduction"] // 4)
    return model


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg11", pretrained, **kwargs)


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg13", pretrained, **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg16", pretrained, **kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg19", pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("cifar_resnet18", pretrained, **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    return _create_resnet("cifar_resnet34", pretrained, **kwargs)
