"""Split a model into an ordered list of stitchable blocks, one interface over every supported family.

Callers see only `BlockedModel`: blocks in order, their names, and the layout of each block's output. The
family adapters below mirror timm's own `forward_features`/`forward_head` (timm 1.0.x) so that running the
blocks in order reproduces `model(x)` exactly. Blocks reuse the model's modules and parameters (no copies), and
each block registers every parameter it uses, so a block's state_dict is all that is needed to restore it.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import global_pool_nlc, resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from shared.cifar_models import CifarVGG  # importing it also registers cifar_vgg* in timm
from shared.errors import ModelError
from shared.specs import ActivationSpec

SUPPORTED = "timm ResNet (resnet*), CIFAR VGG (cifar_vgg*), timm VisionTransformer/DeiT (vit_*, deit_*), " \
            "timm SwinTransformer (swin_*)"


class BlockedModel(nn.Module):
    """A model as an ordered list of blocks; the last block is the classifier head (outputs logits)."""

    def __init__(self, name: str, family: str, named_blocks: list[tuple[str, nn.Module, str]],
                 prefix_tokens: int = 0, patch_size: tuple[int, int] | None = None):
        super().__init__()
        self.name = name
        self.family = family
        self.blocks = nn.ModuleList([m for _, m, _ in named_blocks])
        self.block_names = [n for n, _, _ in named_blocks]
        self.layouts = [layout for _, _, layout in named_blocks]  # output layout of each block
        self.prefix_tokens = prefix_tokens  # class/distillation/register tokens of `tokens` outputs
        self.patch_size = patch_size  # to recover the patch grid of `tokens` outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def split_model(model: nn.Module, name: str = "") -> BlockedModel:
    """Split `model` into blocks sharing its parameters; unsupported families raise ModelError."""
    adapter = _ADAPTERS.get(type(model))
    if adapter is None:
        raise ModelError(f"cannot split {name or type(model).__name__} ({type(model).__name__}) into blocks",
                         f"supported families: {SUPPORTED}")
    return adapter(model, name or type(model).__name__)


def block_outputs(bm: BlockedModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output in one pass (the caller chooses no_grad and train/eval mode)."""
    outputs = []
    for block in bm.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def activation_specs(bm: BlockedModel, input_shape: tuple[int, int, int]) -> list[ActivationSpec]:
    """The ActivationSpec of each block's output, from one batch-1 dummy forward in eval mode."""
    param = next(bm.parameters())
    x = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    modes = {m: m.training for m in bm.modules()}
    bm.eval()  # batch-1 BatchNorm in train mode fails, and running statistics must not move
    try:
        with torch.no_grad():
            outputs = block_outputs(bm, x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [_spec(bm, layout, out, input_shape) for layout, out in zip(bm.layouts, outputs)]


def _spec(bm: BlockedModel, layout: str, out: torch.Tensor, input_shape: tuple[int, int, int]) -> ActivationSpec:
    if layout == "nchw":
        return ActivationSpec("nchw", out.shape[1], (out.shape[2], out.shape[3]))
    if layout == "nhwc":
        return ActivationSpec("nhwc", out.shape[3], (out.shape[1], out.shape[2]))
    if layout == "tokens":
        grid = (input_shape[1] // bm.patch_size[0], input_shape[2] // bm.patch_size[1])
        if bm.prefix_tokens + grid[0] * grid[1] != out.shape[1]:
            raise ValueError(f"{bm.name}: {out.shape[1]} tokens do not form {bm.prefix_tokens} prefix tokens "
                             f"plus a {grid} patch grid")
        return ActivationSpec("tokens", out.shape[2], grid, bm.prefix_tokens)
    return ActivationSpec("logits", out.shape[1])


# --- ResNet ---------------------------------------------------------------------------------------------------

class _ResNetHead(nn.Module):
    """timm ResNet.forward_head; dropout follows this block's own train/eval mode."""

    def __init__(self, model: ResNet):
        super().__init__()
        self.global_pool = model.global_pool
        self.drop_rate = model.drop_rate
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return self.fc(x)


def _split_resnet(model: ResNet, name: str) -> BlockedModel:
    stem = nn.Sequential(OrderedDict(conv1=model.conv1, bn1=model.bn1, act1=model.act1, maxpool=model.maxpool))
    named = [("stem", stem, "nchw")]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        named += [(f"{layer}.{i}", block, "nchw") for i, block in enumerate(getattr(model, layer))]
    named.append(("head", _ResNetHead(model), "logits"))
    return BlockedModel(name, "resnet", named)


# --- CIFAR VGG ------------------------------------------------------------------------------------------------

def _split_vgg(model: CifarVGG, name: str) -> BlockedModel:
    named = [(f"features.{i}", unit, "nchw") for i, unit in enumerate(model.features)]
    head = nn.Sequential(OrderedDict(global_pool=model.global_pool, flatten=nn.Flatten(1),
                                     classifier=model.classifier))
    named.append(("head", head, "logits"))
    return BlockedModel(name, "vgg", named)


# --- ViT / DeiT -----------------------------------------------------------------------------------------------

class _ViTEmbed(nn.Module):
    """patch_embed -> _pos_embed -> patch_drop -> norm_pre of timm VisionTransformer(Distilled).

    Prefix tokens go in timm's order: class, distillation (DeiT distilled), registers.
    """

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.dist_token = getattr(model, "dist_token", None)
        self.reg_token = model.reg_token
        self.pos_embed = model.pos_embed
        self.pos_drop = model.pos_drop
        self.patch_drop = model.patch_drop
        self.norm_pre = model.norm_pre
        self.no_embed_class = model.no_embed_class
        self.dynamic_img_size = model.dynamic_img_size
        self.num_prefix_tokens = model.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.pos_embed is None:
            return torch.cat(prefix + [x.view(x.shape[0], -1, x.shape[-1])], dim=1)
        if self.dynamic_img_size:
            b, h, w, c = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.view(b, -1, c)
        else:
            pos_embed = self.pos_embed
        if self.no_embed_class:  # position embedding covers the patches only: add, then concatenate
            x = x + pos_embed
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
        else:  # position embedding covers the prefix tokens too: concatenate, then add
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            x = x + pos_embed
        return self.pos_drop(x)


class _ViTHead(nn.Module):
    """norm -> forward_head (pool, fc_norm, head_drop, head) of timm VisionTransformer."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.norm = model.norm
        self.attn_pool = model.attn_pool
        self.fc_norm = model.fc_norm
        self.head_drop = model.head_drop
        self.head = model.head
        self.global_pool = model.global_pool
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pool_include_prefix = model.pool_include_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens:]
            x = self.attn_pool(x)
        else:
            x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                                reduce_include_prefix=self.pool_include_prefix)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)


class _DistilledHead(nn.Module):
    """norm -> forward_head of timm VisionTransformerDistilled: the mean of the class and distillation heads.

    (timm returns both heads separately only in `distilled_training` mode, which stitching never uses.)
    """

    def __init__(self, model: VisionTransformerDistilled):
        super().__init__()
        self.norm = model.norm
        self.head_drop = model.head_drop
        self.head = model.head
        self.head_dist = model.head_dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        return (self.head(x) + self.head_dist(x_dist)) / 2


def _split_vit(model: VisionTransformer, name: str) -> BlockedModel:
    named = [("embed", _ViTEmbed(model), "tokens")]
    named += [(f"blocks.{i}", block, "tokens") for i, block in enumerate(model.blocks)]
    head = _DistilledHead(model) if isinstance(model, VisionTransformerDistilled) else _ViTHead(model)
    named.append(("head", head, "logits"))
    return BlockedModel(name, "vit", named, prefix_tokens=model.num_prefix_tokens,
                        patch_size=tuple(model.patch_embed.patch_size))


# --- Swin -----------------------------------------------------------------------------------------------------

def _split_swin(model: SwinTransformer, name: str) -> BlockedModel:
    """Swin is channels-last (NHWC) throughout; each stage transition (patch merging) is a block of its own."""
    named = [("embed", model.patch_embed, "nhwc")]
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            named.append((f"layers.{i}.downsample", stage.downsample, "nhwc"))
        named += [(f"layers.{i}.blocks.{j}", block, "nhwc") for j, block in enumerate(stage.blocks)]
    named.append(("head", nn.Sequential(OrderedDict(norm=model.norm, head=model.head)), "logits"))
    return BlockedModel(name, "swin", named)


# Exact types: a subclass may override forward, and then these adapters would no longer be exact.
_ADAPTERS = {
    ResNet: _split_resnet,
    CifarVGG: _split_vgg,
    VisionTransformer: _split_vit,
    VisionTransformerDistilled: _split_vit,
    SwinTransformer: _split_swin,
}
