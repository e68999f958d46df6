"""Costs: exact parameter counts, closed-form FLOPs, measured inference and training peak memory, latency."""

import math

import pytest
import torch
from torch import nn

from shared.costs import (
    count_flops,
    count_macs,
    count_params,
    inference_peak_bytes,
    latency_ms,
    state_bytes,
    training_peak_bytes,
)

F32 = 4


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1000, 4000), nn.ReLU(), nn.Linear(4000, 500), nn.ReLU(), nn.Linear(500, 10))


def test_params_exact_and_shared_counted_once():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    expected = (3 * 8 * 9 + 8) + (8 + 8) + (288 * 10 + 10)
    assert count_params(model) == expected
    shared = nn.Linear(16, 16)
    tied = nn.Sequential(shared, nn.ReLU(), shared)  # the same layer used twice
    assert count_params(tied) == 16 * 16 + 16
    other = nn.Linear(16, 16)
    other.weight = shared.weight  # tied weight, separate bias
    assert count_params(nn.ModuleList([shared, other])) == 16 * 16 + 2 * 16
    model[0].requires_grad_(False)
    assert count_params(model) == expected  # frozen parameters are parameters too


def test_flops_match_closed_form():
    assert count_flops(nn.Linear(64, 32), torch.randn(1, 64)) == 2 * 1 * 32 * 64
    # Conv: 2 * output elements * (in_channels * kernel area)
    assert count_flops(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16)) == 2 * (8 * 16 * 16) * (3 * 3 * 3)
    assert count_flops(lambda x: x @ x.T, torch.randn(5, 7)) == 2 * 5 * 5 * 7
    assert count_flops(chain(), torch.randn(1, 1000)) == 2 * (1000 * 4000 + 4000 * 500 + 500 * 10)


def test_macs_are_multiply_accumulates():
    """The paper's unit: one per multiply-add, so half of FlopCounterMode's FLOPs."""
    assert count_macs(nn.Linear(64, 32), torch.randn(1, 64)) == 32 * 64
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.randn(1, 3, 16, 16)) == (8 * 16 * 16) * 27
    assert count_macs(chain(), torch.randn(1, 1000)) == count_flops(chain(), torch.randn(1, 1000)) // 2


def test_flops_leave_train_mode_and_statistics_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = model[1].running_mean.clone()
    count_flops(model, torch.randn(3, 4) + 5)
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_inference_peak_matches_hand_computed_peak():
    model = chain()
    x = torch.randn(1, 1000)
    # Live during the first ReLU: the input (1000), the first Linear's output (4000) and the ReLU's (4000).
    hand_peak = (1000 + 4000 + 4000) * F32
    peak = inference_peak_bytes(model, x)
    assert state_bytes(model) == count_params(model) * F32
    assert peak >= state_bytes(model)
    assert peak - state_bytes(model) == pytest.approx(hand_peak, rel=0.1)


def test_inference_peak_grows_with_activations():
    """Batch 64 keeps the same weights but 64x the activations."""
    model = chain()
    one = inference_peak_bytes(model, torch.randn(1, 1000)) - state_bytes(model)
    many = inference_peak_bytes(model, torch.randn(64, 1000)) - state_bytes(model)
    assert many == pytest.approx(64 * one, rel=0.1)


def test_training_peak_exceeds_inference_and_freezing_reduces_it():
    model = chain()
    x, y = torch.randn(8, 1000), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = training_peak_bytes(model, model, x, y)
    assert full > inference_peak_bytes(model, x[:1])
    # Weights, gradients and momentum of every parameter are all live at the optimizer step.
    assert full >= 3 * state_bytes(model)
    model[0].requires_grad_(False)
    frozen = training_peak_bytes(model, model, x, y)
    assert frozen < full - 2 * count_params(model[0]) * F32 * 0.9
    # Measuring does not train: weights and gradients are as they were.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_training_peak_with_a_partial_forward():
    """Training on cached front outputs: the frozen front is neither run nor held, only its output is."""
    model = chain()
    model[:2].requires_grad_(False)
    x, y = torch.randn(8, 1000), torch.randint(0, 10, (8,))
    front_out = model[:2](x).detach()
    behind = model[2:]
    partial = training_peak_bytes(behind, behind, front_out, y)
    full = training_peak_bytes(model, model, x, y)
    # Same trainable layers, so the same gradients and momentum; the front's weights and input are gone.
    front_weights, in_bytes, out_bytes = state_bytes(model[:2]), x.numel() * F32, front_out.numel() * F32
    assert full - partial == pytest.approx(front_weights + in_bytes - out_bytes, rel=0.01)
    with pytest.raises(ValueError, match="nothing to train"):
        training_peak_bytes(model, model.requires_grad_(False), x, y)


def test_latency_is_measured_and_keeps_the_mode():
    model = chain().train()
    ms = latency_ms(model, torch.randn(1, 1000), warmup=1, repeats=3)
    assert 0 < ms < 1000 and math.isfinite(ms)
    assert model.training
