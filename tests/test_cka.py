"""CKA and unbiased HSIC: agreement with an independent float64 reference, invariances, streaming, undefined values."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cka import CKAAccumulator, cka_matrix, linear_cka
from shared.hsic import gram_linear, gram_terms, hsic_u_cross, hsic_u_self, hsic_unbiased, u_center


def reference_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) eq. 5 written out with ones vectors, on raw (uncentred) float64 features."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    value = (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ l @ one)
    )
    return value / (n * (n - 3))


def reference_cka(batches_x: list, batches_y: list) -> float:
    """Minibatch CKA (Nguyen et al.): sums of per-batch HSIC_u, then the normalisation."""
    xy = sum(reference_hsic(x, y) for x, y in zip(batches_x, batches_y))
    xx = sum(reference_hsic(x, x) for x in batches_x)
    yy = sum(reference_hsic(y, y) for y in batches_y)
    return xy / np.sqrt(xx * yy)


def activations(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 features shaped like real blocks (conv maps, tokens, vectors), sharing a latent so CKA varies."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)

    def block(*shape: int, offset: float) -> torch.Tensor:
        d = int(np.prod(shape))
        w = torch.randn(8, d, generator=g)
        noise = torch.randn(n, d, generator=g) * torch.rand(1, generator=g) * 3
        return (z @ w + noise + offset).relu().reshape(n, *shape)

    feats_a = [block(4, 6, 6, offset=5.0), block(10, 16, offset=0.0), block(300, offset=20.0)]
    feats_b = [block(3, 8, 8, offset=1.0), block(64, offset=50.0)]
    return feats_a, feats_b


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
    with pytest.raises(ValueError, match="more than 3"):
        hsic_unbiased(np.eye(3), np.eye(3))


def test_rejects_mismatched_inputs():
    acc = CKAAccumulator(2, 1)
    with pytest.raises(ValueError, match="expected 2 blocks"):
        acc.update([torch.randn(8, 3)], [torch.randn(8, 3)])
    with pytest.raises(ValueError, match="same number of examples"):
        acc.update([torch.randn(8, 3), torch.randn(9, 3)], [torch.randn(8, 3)])


def test_gram_of_shifted_features_has_the_same_u_centering():
    x = torch.rand(12, 3, 7, dtype=torch.float64) + 4.0
    flat = x.reshape(12, -1).numpy()
    shifted = flat - flat[0]
    np.testing.assert_allclose(gram_linear(x), shifted @ shifted.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u_center(gram_linear(x)), u_center(flat @ flat.T), atol=1e-9)
    for constant in (torch.full((9, 40), 0.1), torch.full((9, 40), 0.1, dtype=torch.float64)):
        assert not gram_linear(constant).any()  # exactly zero, so constant blocks are detected exactly
    u = u_center(flat @ flat.T)
    np.testing.assert_allclose(np.diag(u), 0.0)
    np.testing.assert_allclose(u.sum(axis=0), 0.0, atol=1e-9)  # U-centred rows and columns sum to zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_gram_terms_give_the_u_centering_definition(dtype):
    feats_a, feats_b = activations(37, seed=11)
    feats_a, feats_b = [f.to(dtype) for f in feats_a], [f.to(dtype) for f in feats_b]
    ta, tb = gram_terms(feats_a), gram_terms(feats_b)
    ks, ls = [gram_linear(f) for f in feats_a], [gram_linear(f) for f in feats_b]
    for k, upper in zip(ks, ta.upper):  # only the strict upper triangle is kept
        np.testing.assert_array_equal(upper, np.triu(k, 1))
    expected = np.array([[hsic_unbiased(k, l) for l in ls] for k in ks])
    np.testing.assert_allclose(hsic_u_cross(ta, tb), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(hsic_u_self(ta), [hsic_unbiased(k, k) for k in ks], rtol=1e-9)
    np.testing.assert_allclose(hsic_u_self(tb), [hsic_unbiased(l, l) for l in ls], rtol=1e-9)


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
