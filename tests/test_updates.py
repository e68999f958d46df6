"""The change a device sends back instead of its trained stitching weights, in float16 or int8."""
from __future__ import annotations

import pytest
import torch

from shared.updates import SCALE, WireError, apply_delta, decode_delta, encode_delta
from shared.vocabulary import FLOAT16, INT8


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": 3 * torch.randn(64, 32, 1, 1, generator=g), "proj.bias": torch.randn(64, generator=g)}


def trained_from(received: dict, scale: float, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in received.items()}


def wire_bytes(wire: dict) -> int:
    return sum(t.numel() * t.element_size() for t in wire.values())


def test_a_small_change_survives_float16_far_better_than_the_weights_would():
    received = weights(0)
    trained = trained_from(received, 1e-3)
    delta = encode_delta(received, trained)
    assert all(d.dtype == torch.float16 and d.shape == trained[k].shape for k, d in delta.items())
    restored = apply_delta(received, decode_delta(delta, received))
    for key, value in trained.items():
        assert restored[key].dtype == torch.float32
        change_error = (restored[key] - value).abs().max()
        weight_error = (value.half().float() - value).abs().max()  # what sending the weights in float16 costs
        assert change_error <= 2e-6 + 1e-3 * (value - received[key]).abs().max()  # float16: 11-bit mantissa
        assert change_error < weight_error / 50


def test_float16_is_half_and_int8_about_a_quarter_of_the_float32_bytes():
    received = weights(0)
    trained = trained_from(received, 0.01)
    float32 = wire_bytes(trained)
    assert wire_bytes(encode_delta(received, trained, FLOAT16)) * 2 == float32
    int8 = encode_delta(received, trained, INT8)
    rows = received["proj.weight"].shape[0] + 1
    assert wire_bytes(int8) == float32 // 4 + 4 * rows  # one float32 scale per output row, one for the bias
    assert set(int8) == set(received) | {k + SCALE for k in received}


def test_int8_error_is_within_one_step_of_each_rows_scale():
    received = weights(0)
    trained = trained_from(received, 1e-2)
    wire = encode_delta(received, trained, INT8, seed=3)
    change = decode_delta(wire, received, INT8)
    for key, value in trained.items():
        exact = (value.double() - received[key].double())
        rows = exact.reshape(exact.shape[0] if exact.dim() >= 2 else 1, -1)
        step = rows.abs().amax(dim=1, keepdim=True) / 127
        error = (change[key].double() - exact).reshape(rows.shape).abs()
        assert (error <= step * (1 + 1e-5)).all()


def test_int8_rounding_is_unbiased_so_averaging_devices_cancels_it():
    """Stochastic rounding: the mean of many encodings of one change converges on the change itself, while
    round-to-nearest would keep its bias however many devices are averaged."""
    received = weights(0)
    trained = trained_from(received, 1e-2)
    exact = {k: trained[k].double() - received[k].double() for k in received}
    n = 400
    mean = {k: torch.zeros_like(v) for k, v in exact.items()}
    for seed in range(n):
        for k, v in decode_delta(encode_delta(received, trained, INT8, seed=seed), received, INT8).items():
            mean[k] += v.double() / n
    for key, value in exact.items():
        step = value.abs().max() / 127  # the largest row's
        one = (decode_delta(encode_delta(received, trained, INT8, seed=0), received, INT8)[key].double() - value)
        assert (mean[key] - value).abs().max() < 0.25 * step  # one step's noise / sqrt(400), with margin
        assert (mean[key] - value).abs().mean() < one.abs().mean() / 5


def test_int8_encoding_is_repeatable_per_seed():
    received = weights(0)
    trained = trained_from(received, 1e-2)
    a, b, c = (encode_delta(received, trained, INT8, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_zero_change_is_exact_in_int8():
    received = weights(0)
    change = decode_delta(encode_delta(received, received, INT8), received, INT8)
    assert all(not v.any() for v in change.values())


def test_a_change_beyond_float16_range_becomes_inf_not_a_wrong_number():
    received = weights(0)
    trained = dict(received, **{"proj.bias": received["proj.bias"] + 1e6})
    delta = encode_delta(received, trained)
    assert torch.isinf(delta["proj.bias"]).all()
    assert torch.isfinite(delta["proj.weight"]).all() and not delta["proj.weight"].any()


def test_a_non_finite_change_decodes_non_finite_in_int8():
    """The server refuses non-finite changes: int8 must not turn them into plausible numbers."""
    received = weights(0)
    for bad in (float("nan"), float("inf")):
        trained = {k: v.clone() for k, v in received.items()}
        trained["proj.weight"][3, 0, 0, 0] = bad
        change = decode_delta(encode_delta(received, trained, INT8), received, INT8)
        assert not torch.isfinite(change["proj.weight"][3]).all()
        assert torch.isfinite(change["proj.weight"][4]).all() and torch.isfinite(change["proj.bias"]).all()


@pytest.mark.parametrize("fmt", [FLOAT16, INT8])
def test_decoding_names_what_does_not_fit(fmt):
    received = weights(0)
    wire = encode_delta(received, trained_from(received, 1e-2), fmt)
    key = "proj.weight"
    cases = {
        "wrong_keys": {k: v for k, v in wire.items() if k != key},
        "wrong_dtype": {**wire, key: wire[key].float()},
        "wrong_shape": {**wire, key: wire[key].reshape(32, 64, 1, 1)},
    }
    if fmt == INT8:
        cases["wrong_dtype_scale"] = {**wire, key + SCALE: wire[key + SCALE].double()}
        cases["wrong_shape_scale"] = {**wire, key + SCALE: wire[key + SCALE][:-1]}
        assert wire["proj.bias" + SCALE].shape == (1,)
    for name, bad in cases.items():
        with pytest.raises(WireError) as err:
            decode_delta(bad, received, fmt)
        assert err.value.reason == name.removesuffix("_scale"), name


def test_unknown_formats_are_incompatible():
    received = weights(0)
    with pytest.raises(WireError) as err:
        decode_delta(encode_delta(received, received), received, "delta-float8/1")
    assert err.value.reason == "incompatible"
    with pytest.raises(WireError):
        encode_delta(received, received, "delta-float8/1")

