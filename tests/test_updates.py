"""The float16 change a device sends back instead of its trained stitching weights."""
from __future__ import annotations

import torch

from shared.updates import WIRE_DTYPE, apply_delta, encode_delta


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": 3 * torch.randn(64, 32, 1, 1, generator=g), "proj.bias": torch.randn(64, generator=g)}


def test_a_small_change_survives_float16_far_better_than_the_weights_would():
    received = weights(0)
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in received.items()}
    delta = encode_delta(received, trained)
    assert all(d.dtype == WIRE_DTYPE and d.shape == trained[k].shape for k, d in delta.items())
    restored = apply_delta(received, delta)
    for key, value in trained.items():
        assert restored[key].dtype == torch.float32
        change_error = (restored[key] - value).abs().max()
        weight_error = (value.half().float() - value).abs().max()  # what sending the weights in float16 costs
        assert change_error <= 2e-6 + 1e-3 * (value - received[key]).abs().max()  # float16: 11-bit mantissa
        assert change_error < weight_error / 50


def test_half_the_bytes_of_the_float32_weights():
    received = weights(0)
    trained = {k: v + 0.01 for k, v in received.items()}
    delta = encode_delta(received, trained)
    assert sum(d.numel() * d.element_size() for d in delta.values()) * 2 == \
        sum(t.numel() * t.element_size() for t in trained.values())


def test_a_change_beyond_float16_range_becomes_inf_not_a_wrong_number():
    received = weights(0)
    trained = dict(received, **{"proj.bias": received["proj.bias"] + 1e6})
    delta = encode_delta(received, trained)
    assert torch.isinf(delta["proj.bias"]).all()
    assert torch.isfinite(delta["proj.weight"]).all() and not delta["proj.weight"].any()
