"""The wire form of a stitching-layer update: the change to the weights the server sent, in few bits.

A device answers a training request with `trained - received` rather than the trained weights. As a change its
rounding error is relative to the change, which local fine-tuning keeps small, instead of to the weights
themselves, so it can travel in fewer bits. Two encodings, named by an update format that the server puts in
every training request and the device repeats in its reply (so a device and a server of different releases see
that they disagree instead of misreading each other's tensors):

- `delta-float16/1` (default): each tensor in float16; half the bytes of float32.
- `delta-int8/1`: each tensor as int8 with one float32 scale per output row (`<key>#scale`, the row's largest
  magnitude / 127; one scale for a whole bias), rounded stochastically so the decoded change is unbiased: averaging over devices cancels the
  rounding noise. A quarter of the bytes of float32; for paper-scale stitches (34x fewer parameters than the
  whole variant at worst) it keeps every upload over 100x smaller than the variant.

The server decodes a change against the weights it sent (`decode_delta`: keys, dtypes and shapes checked, a
`WireError` names what is wrong) and adds the (combined) changes back to its float32 weights in float64.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from shared.vocabulary import FLOAT16, INT8, UPDATE_FORMATS

SCALE = "#scale"  # suffix of an int8 tensor's row scales (PyTorch parameter names never hold '#')


class WireError(ValueError):
    """An update whose tensors do not decode against the current weights; `reason` is the rejection counter's
    label (wrong_keys, wrong_dtype, wrong_shape, incompatible)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _rows(t: torch.Tensor) -> int:
    """Rows of a tensor's int8 scales: its first dimension (output channels) for a weight matrix or kernel, one
    row for a bias or scalar (a scale per element would cost more than float32)."""
    return t.shape[0] if t.dim() >= 2 else 1


def _int8(change: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`change` as int8 values and float32 row scales, stochastically rounded. A non-finite change gives a
    non-finite scale, which decodes to non-finite values that the server refuses."""
    flat = change.double().reshape(_rows(change), -1)
    scale = (flat.abs().amax(dim=1) / 127.0).float()
    steps = flat / scale.double().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    noise = torch.rand(steps.shape, generator=generator, dtype=torch.float64)
    q = torch.floor(steps + noise).clamp_(-127, 127)
    return q.to(torch.int8).reshape(change.shape).contiguous(), scale


def encode_delta(received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], fmt: str = FLOAT16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """What a device sends back: `trained - received` per tensor, encoded in `fmt`. `seed` makes int8's
    stochastic rounding repeatable (a device passes one per round).

    In float16 a change beyond its range (65504) becomes inf, which the server refuses like any non-finite update.
    """
    changes = {k: trained[k].double() - received[k].double() for k in trained}
    if fmt == FLOAT16:
        return {k: c.to(torch.float16).contiguous() for k, c in changes.items()}
    if fmt == INT8:
        g = torch.Generator().manual_seed(seed)
        wire = {}
        for key, change in changes.items():
            wire[key], wire[key + SCALE] = _int8(change, g)
        return wire
    raise WireError("incompatible", f"unknown update format {fmt!r}; known: {', '.join(UPDATE_FORMATS.values())}")


def _expect(wire: Mapping, key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    value = wire[key]
    if not isinstance(value, torch.Tensor) or value.dtype != dtype:
        raise WireError("wrong_dtype", f"{key}: expected {dtype}, got {getattr(value, 'dtype', type(value))}")
    if tuple(value.shape) != tuple(shape):
        raise WireError("wrong_shape", f"{key}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def decode_delta(wire: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
                 fmt: str = FLOAT16) -> dict[str, torch.Tensor]:
    """The change an update carries, checked against the current weights: one float tensor per key of `current`
    (float16 as it arrived, or float32 decoded from int8). Raises WireError for anything that does not fit."""
    if fmt == FLOAT16:
        expected = set(current)
    elif fmt == INT8:
        expected = set(current) | {k + SCALE for k in current}
    else:
        raise WireError("incompatible", f"unknown update format {fmt!r}")
    if set(wire) != expected:
        raise WireError("wrong_keys", f"keys {sorted(set(wire) ^ expected)} differ from the expected ones")
    if fmt == FLOAT16:
        return {k: _expect(wire, k, torch.float16, ref.shape) for k, ref in current.items()}
    out = {}
    for key, ref in current.items():
        q = _expect(wire, key, torch.int8, ref.shape)
        scale = _expect(wire, key + SCALE, torch.float32, (_rows(ref),))
        out[key] = (q.reshape(_rows(ref), -1).float() * scale[:, None]).reshape(ref.shape)
    return out


def apply_delta(current: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`current + delta` in float64, in the dtypes of `current` (delta: decoded off the wire, or an average)."""
    return {k: (v.double() + delta[k].double()).to(v.dtype) for k, v in current.items()}
