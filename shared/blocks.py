"""Split a model into an ordered list of stitchable blocks, one interface over every traceable model.

Callers see only `BlockedModel`: blocks in order, their names, and the layout of each block's output. The split
itself is generic (`shared.fx_split`: trace with torch.fx, cut where a single tensor carries the state), so any
timm model it can trace works, not a list of families. Running the blocks in order reproduces `model(x)` exactly
(eval mode); blocks reuse the model's modules and parameters (no copies), and each block's state_dict holds every
parameter it uses, under the model's own names, so a block's state_dict is all that is needed to restore it.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

import shared.cifar_models  # noqa: F401  registers cifar_vgg* in timm, so they split like any timm model
from shared.fx_split import split_pieces, token_grid
from shared.specs import ActivationSpec

SUPPORTED = ("supported: models torch.fx can trace with timm's settings, whose forward takes one image and that "
             "have block boundaries where one NCHW/NHWC map or token sequence carries all the state: 86 of the 89 "
             "timm families measured by benchmarks/model_coverage.py, see docs/BRING_YOUR_OWN.md")


class BlockedModel(nn.Module):
    """A model as an ordered list of blocks; the last block is the classifier head (outputs logits)."""

    def __init__(self, name: str, family: str, named_blocks: list[tuple[str, nn.Module, str]],
                 prefixes: list[int] | None = None, patch_size: tuple[int, int] | None = None):
        super().__init__()
        self.name = name
        self.family = family
        self.blocks = nn.ModuleList([m for _, m, _ in named_blocks])
        self.block_names = [n for n, _, _ in named_blocks]
        self.layouts = [layout for _, _, layout in named_blocks]  # output layout of each block
        self.prefixes = prefixes or [0] * len(named_blocks)  # class/distillation/register tokens of each output
        self.prefix_tokens = max(self.prefixes)
        self.patch_size = patch_size  # input pixels per token of the first `tokens` output, if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def split_model(model: nn.Module, name: str = "") -> BlockedModel:
    """Split `model` into blocks sharing its parameters; a model that cannot be split raises ModelError."""
    name = name or type(model).__name__
    pieces = split_pieces(model, name, SUPPORTED)
    tokens = [p.stride for p in pieces if p.layout == "tokens"]
    return BlockedModel(name, _family(model, name), [(p.name, p.module, p.layout) for p in pieces],
                        [p.prefix_tokens for p in pieces], (tokens[0], tokens[0]) if tokens else None)


def _family(model: nn.Module, name: str) -> str:
    """The timm module that defines the model (resnet, efficientnet, convnext, ...), as timm groups families."""
    module = timm.models.model_entrypoint(name).__module__ if timm.is_model(name) else type(model).__module__
    return module.rpartition(".")[2]


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
    return [_spec(bm, layout, prefix, out, input_shape)
            for layout, prefix, out in zip(bm.layouts, bm.prefixes, outputs)]


def _spec(bm: BlockedModel, layout: str, prefix: int, out: torch.Tensor,
          input_shape: tuple[int, int, int]) -> ActivationSpec:
    if layout == "nchw":
        return ActivationSpec("nchw", out.shape[1], (out.shape[2], out.shape[3]))
    if layout == "nhwc":
        return ActivationSpec("nhwc", out.shape[3], (out.shape[1], out.shape[2]))
    if layout == "tokens":
        grid = token_grid(out.shape[1] - prefix, input_shape[1], input_shape[2])
        if grid is None:
            raise ValueError(f"{bm.name}: {out.shape[1]} tokens do not form {prefix} prefix tokens plus a patch "
                             f"grid of a {input_shape[1]}x{input_shape[2]} image")
        return ActivationSpec("tokens", out.shape[2], grid, prefix)
    return ActivationSpec("logits", out.shape[1])
