"""The wire form of a stitching-layer update: the change to the weights the server sent, in float16.

A device answers a training request with `trained - received` rather than the trained weights. As a change
it can travel in float16 (half the bytes of float32) while its rounding error stays relative to the change,
which local fine-tuning keeps small, instead of to the weights themselves. The server adds the (averaged)
changes back to its float32 weights in float64.

`UPDATE_FORMAT` names this form. The server sends it with every training request and a device sends it back
with its answer, so a device and a server of different releases see that they disagree (and say so) instead of
misreading each other's tensors.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

WIRE_DTYPE = torch.float16
UPDATE_FORMAT = "delta-float16/1"  # change it whenever what a device sends back changes meaning or layout


def encode_delta(received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a device sends back: `trained - received` per tensor, in WIRE_DTYPE.

    A change beyond float16's range (65504) becomes inf, which the server refuses like any non-finite update.
    """
    return {k: (trained[k].double() - received[k].double()).to(WIRE_DTYPE).contiguous() for k in trained}


def apply_delta(current: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`current + delta` in float64, in the dtypes of `current` (delta: float16 off the wire, or an average)."""
    return {k: (v.double() + delta[k].double()).to(v.dtype) for k, v in current.items()}
