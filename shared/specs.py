"""What flows across a block boundary: the shape facts a stitching layer needs.

Three layouts cover every supported family:
- ``nchw``   CNN feature maps (ResNet, VGG), shape (N, C, H, W)
- ``nhwc``   Swin's channels-last token grid, shape (N, H, W, C)
- ``tokens`` ViT/DeiT sequences, shape (N, prefix_tokens + H*W, C), prefix = class/distillation tokens
- ``logits`` a classifier output, shape (N, classes); never a stitching boundary
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LAYOUTS = ("nchw", "nhwc", "tokens", "logits")


@dataclass(frozen=True)
class ActivationSpec:
    layout: str
    channels: int
    grid: tuple[int, int] = (1, 1)
    prefix_tokens: int = 0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")

    @property
    def family_kind(self) -> str:
        """'cnn' for feature maps, 'tokens' for transformer activations (nhwc or tokens)."""
        return {"nchw": "cnn", "nhwc": "tokens", "tokens": "tokens", "logits": "logits"}[self.layout]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationSpec":
        return cls(d["layout"], int(d["channels"]), tuple(d.get("grid", (1, 1))), int(d.get("prefix_tokens", 0)))
