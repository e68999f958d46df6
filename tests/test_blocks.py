"""Block splitting: exact composition per family, sensible names and counts, correct activation specs, and the
generic splitter's decisions (layout of ambiguous maps, blocks that would overwrite their input).

The IoT families (MobileNetV3, EfficientNet, ConvNeXt, RegNet, MobileViT, FastViT, EfficientFormer, ResNet50) are
in test_families.py."""
import functools

import pytest
import timm
import torch
import torch.nn as nn

from shared.blocks import activation_specs, block_outputs, split_model
from shared.errors import ModelError
from shared.specs import ActivationSpec

# (timm name, kwargs, input size): small inputs keep every model fast on a shared CPU.
MODELS = {
    "resnet18": ("resnet18", {}, 32),
    "resnet34": ("resnet34", {}, 32),
    "vgg11": ("cifar_vgg11", {}, 32),
    "vgg19": ("cifar_vgg19", {}, 32),
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64),
}


@functools.cache
def make(key: str):
    """(model, BlockedModel, input size), split once per session: tests that change a model's mode use `fresh`."""
    return fresh(key)


def fresh(key: str):
    name, kwargs, size = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    return model, split_model(model, name), size


@pytest.mark.parametrize("key", list(MODELS))
def test_blocks_in_order_reproduce_the_model_exactly(key):
    model, bm, size = make(key)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        outputs = block_outputs(bm, x)
        assert torch.equal(bm(x), expected)
    assert torch.equal(outputs[-1], expected)
    assert len(outputs) == len(bm.blocks) == len(bm.block_names)
    # Blocks share the model's parameters: nothing copied, nothing left out.
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in bm.parameters())
    assert sum(p.numel() for b in bm.blocks for p in b.parameters()) == sum(p.numel() for p in model.parameters())


def test_block_outputs_match_running_each_prefix_of_blocks():
    _, bm, size = make("resnet18")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outputs = block_outputs(bm, x)
        for k in (0, 4, 8):
            assert torch.equal(outputs[k], nn.Sequential(*bm.blocks[: k + 1])(x))


# The paper's boundaries: ResNet stem + every residual block, one VGG conv unit per block, the ViT embedding +
# every transformer block, Swin's embedding + every patch merging and Swin block; the head last.
@pytest.mark.parametrize("key, count, family, names", [
    ("resnet18", 10, "resnet", ["stem", "layer1.0", "layer1.1", "layer2.0"]),
    ("resnet34", 18, "resnet", ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0"]),
    ("vgg11", 9, "cifar_models", ["features.0", "features.1"]),
    ("vgg19", 17, "cifar_models", ["features.0", "features.1"]),
    ("deit_tiny", 14, "deit", ["stem", "blocks.0", "blocks.1"]),
    ("swin_tiny", 17, "swin_transformer", ["stem", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                                           "layers.1.blocks.0"]),
])
def test_block_counts_and_names(key, count, family, names):
    _, bm, _ = make(key)
    assert len(bm.blocks) == count
    assert bm.family == family
    assert bm.block_names[: len(names)] == names
    assert bm.block_names[-1] == "head"
    assert len(set(bm.block_names)) == count


def test_resnet_specs():
    _, bm, size = make("resnet18")
    specs = activation_specs(bm, (3, size, size))
    by_name = dict(zip(bm.block_names, specs))
    assert by_name["stem"] == ActivationSpec("nchw", 64, (8, 8))
    assert by_name["layer2.0"] == ActivationSpec("nchw", 128, (4, 4))
    assert by_name["layer4.1"] == ActivationSpec("nchw", 512, (1, 1))
    assert by_name["head"] == ActivationSpec("logits", 10)


def test_vgg_specs_fold_the_pool_into_the_preceding_conv():
    _, bm, size = make("vgg11")
    specs = activation_specs(bm, (3, size, size))
    assert specs[0] == ActivationSpec("nchw", 64, (16, 16))  # conv 64 then pool
    assert specs[2] == ActivationSpec("nchw", 256, (8, 8))  # conv 256, no pool
    assert specs[3] == ActivationSpec("nchw", 256, (4, 4))  # conv 256 then pool
    assert specs[-1] == ActivationSpec("logits", 10)


@pytest.mark.parametrize("key, prefix", [("deit_tiny", 1), ("deit_tiny_distilled", 2)])
def test_vit_specs_are_tokens_with_prefix_and_patch_grid(key, prefix):
    _, bm, size = make(key)
    specs = activation_specs(bm, (3, size, size))
    assert all(s == ActivationSpec("tokens", 192, (8, 8), prefix) for s in specs[:-1])
    assert specs[-1] == ActivationSpec("logits", 10)


def test_swin_specs_are_channels_last_grids_per_stage():
    _, bm, size = make("swin_tiny")
    by_name = dict(zip(bm.block_names, activation_specs(bm, (3, size, size))))
    assert by_name["stem"] == ActivationSpec("nhwc", 96, (16, 16))
    assert by_name["layers.1.downsample"] == ActivationSpec("nhwc", 192, (8, 8))
    assert by_name["layers.3.blocks.1"] == ActivationSpec("nhwc", 768, (2, 2))
    assert by_name["head"] == ActivationSpec("logits", 10)


@pytest.mark.parametrize("key", ["resnet18", "vgg11", "deit_tiny", "swin_tiny"])
def test_specs_describe_the_real_outputs(key):
    _, bm, size = make(key)
    specs = activation_specs(bm, (3, size, size))
    with torch.no_grad():
        outputs = block_outputs(bm, torch.randn(3, 3, size, size))
    for spec, out in zip(specs, outputs):
        c, (h, w), p = spec.channels, spec.grid, spec.prefix_tokens
        shape = {"nchw": (3, c, h, w), "nhwc": (3, h, w, c), "tokens": (3, p + h * w, c), "logits": (3, c)}
        assert tuple(out.shape) == shape[spec.layout]


def test_activation_specs_keeps_train_mode_and_batchnorm_statistics():
    model, bm, size = fresh("resnet18")
    bm.train()
    before = model.bn1.running_mean.clone()
    activation_specs(bm, (3, size, size))
    assert bm.training and model.bn1.training
    assert torch.equal(model.bn1.running_mean, before)


class _Grid(nn.Module):
    """A 4x4 grid at its 16 px probe: with 4 channels the shape alone cannot tell NCHW from NHWC."""

    img_size = 16

    def __init__(self, channels_last: bool, c: int = 4, inplace_start: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        unit = _TokenUnit if channels_last else (_InplaceUnit if inplace_start else _ConvUnit)
        self.blocks = nn.Sequential(*[(_TokenUnit if channels_last else _ConvUnit)(c), unit(c), unit(c)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x.permute(0, 2, 3, 1) if self.channels_last else x)
        return self.head(x.mean((1, 2)) if self.channels_last else x.mean((2, 3)))


class _ConvUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class _TokenUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return torch.relu(self.fc(self.norm(x)))


class _InplaceUnit(_ConvUnit):
    def __init__(self, c: int):
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.conv(self.act(x))  # overwrites its input: the previous block's output


@pytest.mark.parametrize("channels_last, layout", [(False, "nchw"), (True, "nhwc")])
def test_a_map_whose_shape_reads_both_ways_takes_the_layout_its_consumer_expects(channels_last, layout):
    torch.manual_seed(0)
    model = _Grid(channels_last).eval()
    bm = split_model(model, "grid")
    # blocks.2's output only meets a mean over two dims, which says nothing: not a boundary, it joins the head.
    assert bm.block_names == ["stem", "blocks.0", "blocks.1", "head"]
    assert bm.layouts == [layout, layout, layout, "logits"]  # the stem ends with the permute to NHWC
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bm(x), model(x))


def test_a_block_that_overwrites_its_input_merges_with_the_one_before():
    """block_outputs keeps every block's output for CKA: a block that modifies its input in place would change the
    previous output after the fact, so no boundary is put before it."""
    torch.manual_seed(0)
    model = _Grid(channels_last=False, c=8, inplace_start=True).eval()
    bm = split_model(model, "inplace")
    assert bm.block_names == ["stem", "blocks", "head"]  # blocks.1 and blocks.2 would overwrite their input
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outputs = block_outputs(bm, x)
        assert torch.equal(outputs[0], bm.blocks[0](x)) and torch.equal(outputs[-1], model(x))


@pytest.mark.parametrize("name, paper_params", [("cifar_vgg11", 9.76e6), ("cifar_vgg19", 20.56e6)])
def test_cifar_vgg_param_counts_match_the_paper(name, paper_params):
    params = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
    assert abs(params - paper_params) / paper_params < 0.01


def test_cifar_vgg_options():
    assert all(timm.is_model(f"cifar_vgg{d}") for d in (11, 13, 16, 19))
    model = timm.create_model("cifar_vgg16", num_classes=3, in_chans=1, width=0.25, drop_rate=0.1).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)  # small inputs survive the five pools
    assert model.features[0].conv.out_channels == 16
    with pytest.raises(ModelError):
        timm.create_model("cifar_vgg11", pretrained=True)
