"""CKA and unbiased HSIC: agreement with an independent float64 reference, invariances, streaming, undefined values."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cka import CKAAccumulator, PaperCKAAccumulator, cka_accumulator
from shared.hsic import gram_linear
from tests.cka_reference import activations, hsic_unbiased, paper_cka, reference_cka


def cka_matrix(feats_a, feats_b, estimator: str = "unbiased") -> np.ndarray:
    """CKA of every block pair on one batch."""
    acc = cka_accumulator(estimator, len(feats_a), len(feats_b))
    acc.update(feats_a, feats_b)
    return acc.result()


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "unbiased") -> float:
    """CKA of two feature tensors (n, ...) for the same n examples."""
    return float(cka_matrix([x], [y], estimator)[0, 0])


def test_agrees_with_float64_reference_over_batches():
    acc = CKAAccumulator(3, 2)
    batches = [activations(n, seed) for seed, n in enumerate([40, 33, 50])]
    for feats_a, feats_b in batches:
        acc.update(feats_a, feats_b)
    block_a = [[fa[a].numpy() for fa, _ in batches] for a in range(3)]
    block_b = [[fb[b].numpy() for _, fb in batches] for b in range(2)]
    expected = np.array([[reference_cka(block_a[a], block_b[b]) for b in range(2)] for a in range(3)])
    np.testing.assert_allclose(acc.result(), expected, rtol=0, atol=1e-6)
    assert acc.result().dtype == np.float64
    assert (acc.batches, acc.examples, acc.undefined_reasons()) == (3, 123, {})


def test_streaming_equals_formula_on_hsic_terms():
    """Several update() calls give sum_k HSIC(K_k, L_k) / sqrt(sum_k HSIC(K_k, K_k) * sum_k HSIC(L_k, L_k))."""
    batches = [activations(24, seed) for seed in range(4)]
    acc = CKAAccumulator(3, 2)
    for feats_a, feats_b in batches:
        acc.update(feats_a, feats_b)
    ks = [np.stack([gram_linear(f) for f in fa]) for fa, _ in batches]
    ls = [np.stack([gram_linear(f) for f in fb]) for _, fb in batches]
    cross = sum(np.array([[hsic_unbiased(ki, li) for li in l] for ki in k]) for k, l in zip(ks, ls))
    self_a = sum(hsic_unbiased(k, k) for k in ks)
    self_b = sum(hsic_unbiased(l, l) for l in ls)
    np.testing.assert_allclose(acc.result(), cross / np.sqrt(np.outer(self_a, self_b)), rtol=1e-12)
    # One big batch is a different estimator than four small ones: streaming is not concatenation.
    one_batch = cka_matrix([torch.cat([fa[a] for fa, _ in batches]) for a in range(3)],
                           [torch.cat([fb[b] for _, fb in batches]) for b in range(2)])
    assert not np.allclose(one_batch, acc.result(), atol=1e-9)


def test_all_pairs_at_once_equals_pair_by_pair():
    feats_a, feats_b = activations(30, seed=7)
    matrix = cka_matrix(feats_a, feats_b)
    assert matrix.shape == (3, 2)
    for a, fa in enumerate(feats_a):
        for b, fb in enumerate(feats_b):
            assert matrix[a, b] == pytest.approx(linear_cka(fa, fb), abs=1e-12)


def test_self_similarity_is_one():
    feats_a, _ = activations(20, seed=3)
    for f in feats_a:
        assert linear_cka(f, f) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(np.diag(cka_matrix(feats_a, feats_a)), 1.0, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), n=st.integers(6, 30))
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(seed, scale, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = torch.randn(n, 9, generator=g, dtype=torch.float64) + x[:, :9]
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert linear_cka(scale * x, y) == pytest.approx(base, abs=1e-9)


def test_negative_values_are_kept():
    """Independent features with few examples give negative unbiased CKA: no clamping to 0."""
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(20):
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
        values.append((linear_cka(x, y), reference_cka([x.numpy()], [y.numpy()])))
    negatives = [(ours, ref) for ours, ref in values if ref < 0]
    assert negatives
    for ours, ref in negatives:
        assert ours == pytest.approx(ref, abs=1e-9)


def test_constant_features_are_nan_and_reported():
    feats_a, feats_b = activations(16, seed=1)
    feats_a[1] = torch.full((16, 5, 5), 0.7)
    feats_b[0] = torch.full((16, 64), 3.1, dtype=torch.float64)
    acc = CKAAccumulator(3, 2)
    acc.update(feats_a, feats_b)
    result = acc.result()
    nan = {(a, b) for a in range(3) for b in range(2) if np.isnan(result[a, b])}
    assert nan == {(1, 0), (1, 1), (0, 0), (2, 0)}
    reasons = acc.undefined_reasons()
    assert set(reasons) == nan
    assert "block 1 of model A does not vary" in reasons[(1, 1)]
    assert "block 0 of model B does not vary" in reasons[(0, 0)]
    assert np.isfinite(result[0, 1]) and np.isfinite(result[2, 1])


def test_too_few_examples_are_reported():
    acc = CKAAccumulator(1, 1)
    acc.update([torch.randn(3, 4)], [torch.randn(3, 4)])
    assert np.isnan(acc.result()).all()
    assert acc.skipped_batches == 1
    assert "n > 3" in acc.undefined_reasons()[(0, 0)]
    # A later usable batch defines the value; the skipped one stays counted.
    acc.update([torch.randn(10, 4)], [torch.randn(10, 4)])
    assert np.isfinite(acc.result()).all() and acc.undefined_reasons() == {}
    assert (acc.batches, acc.skipped_batches) == (1, 1)


def test_rejects_mismatched_inputs():
    acc = CKAAccumulator(2, 1)
    with pytest.raises(ValueError, match="expected 2 blocks"):
        acc.update([torch.randn(8, 3)], [torch.randn(8, 3)])
    with pytest.raises(ValueError, match="same number of examples"):
        acc.update([torch.randn(8, 3), torch.randn(9, 3)], [torch.randn(8, 3)])


def test_float32_gram_is_accurate_on_large_offsets():
    """Features varying by 1e-5 of their magnitude: float32 products of centred features stay within 1e-6.

    The reference centres in float64 first: on raw features even the float64 formula cancels away the
    signal here (it returns about 0.01 instead of about 1).
    """
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 4, generator=g)
    x = (z @ torch.randn(4, 20000, generator=g) + torch.randn(64, 20000, generator=g)) * 0.01 + 1000.0
    y = z @ torch.randn(4, 3000, generator=g) + torch.randn(64, 3000, generator=g)
    x64, y64 = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    expected = reference_cka([x64 - x64.mean(axis=0)], [y64 - y64.mean(axis=0)])
    assert expected > 0.5
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-6)


def test_paper_estimator_is_the_mean_over_repeats_of_each_batchs_biased_cka():
    acc = PaperCKAAccumulator(3, 2)
    batches = [activations(n, seed) for seed, n in enumerate([40, 33, 50])]
    for feats_a, feats_b in batches:
        acc.update(feats_a, feats_b)
    expected = np.array([[paper_cka([fa[a].numpy() for fa, _ in batches], [fb[b].numpy() for _, fb in batches])
                          for b in range(2)] for a in range(3)])
    np.testing.assert_allclose(acc.result(), expected, rtol=0, atol=1e-6)
    assert (acc.result() >= 0).all() and (acc.result() <= 1 + 1e-9).all()


def test_paper_estimator_is_biased_upwards_on_independent_features():
    """Independent wide features, few examples: the unbiased CKA is near 0, the paper's well above it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 300, generator=g, dtype=torch.float64)
    y = torch.randn(12, 200, generator=g, dtype=torch.float64)
    assert abs(linear_cka(x, y)) < 0.15
    assert linear_cka(x, y, "paper") > 0.5


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), n=st.integers(4, 30))
def test_paper_estimator_is_invariant_to_orthogonal_transform_and_isotropic_scaling(seed, scale, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = torch.randn(n, 9, generator=g, dtype=torch.float64) + x[:, :9]
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = linear_cka(x, y, "paper")
    assert linear_cka(x @ q, y, "paper") == pytest.approx(base, abs=1e-9)
    assert linear_cka(scale * x, y, "paper") == pytest.approx(base, abs=1e-9)
    assert linear_cka(x, x, "paper") == pytest.approx(1.0, abs=1e-9)


def test_paper_estimator_reports_constant_blocks_and_tiny_batches():
    feats_a, feats_b = activations(16, seed=1)
    feats_a[1] = torch.full((16, 5, 5), 0.7)
    acc = cka_accumulator("paper", 3, 2)
    acc.update(feats_a, feats_b)
    result = acc.result()
    assert np.isnan(result[1]).all() and np.isfinite(result[[0, 2]]).all()
    assert set(acc.undefined_reasons()) == {(1, 0), (1, 1)}
    small = cka_accumulator("paper", 1, 1)
    small.update([torch.randn(1, 4)], [torch.randn(1, 4)])
    assert small.skipped_batches == 1 and np.isnan(small.result()).all()
    small.update([torch.randn(3, 4)], [torch.randn(3, 4)])  # n = 3 is enough for the biased estimator
    assert np.isfinite(small.result()).all()
    with pytest.raises(ValueError, match="unknown CKA estimator"):
        cka_accumulator("biased", 1, 1)
