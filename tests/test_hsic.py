"""shared/hsic.py, the pure math: Gram matrices, both HSIC estimators, against textbook float64 formulas."""
import numpy as np
import pytest
import torch

from shared.hsic import centered_grams, gram_linear, gram_terms, hsic_b_cross, hsic_b_self, hsic_u_cross, hsic_u_self
from tests.cka_reference import activations, hsic_unbiased, paper_hsic, u_center


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biased_hsic_is_the_papers_trace_with_the_centring_matrix(dtype):
    feats_a, feats_b = activations(29, seed=4)
    feats_a, feats_b = [f.to(dtype) for f in feats_a], [f.to(dtype) for f in feats_b]
    ka, kb = centered_grams(feats_a), centered_grams(feats_b)
    expected = np.array([[paper_hsic(fa.double().numpy(), fb.double().numpy()) for fb in feats_b] for fa in feats_a])
    np.testing.assert_allclose(hsic_b_cross(ka, kb), expected, rtol=1e-6)
    np.testing.assert_allclose(hsic_b_self(ka), [paper_hsic(f.double().numpy(), f.double().numpy()) for f in feats_a],
                               rtol=1e-6)
    np.testing.assert_allclose(ka.sum(axis=-1), 0.0, atol=1e-6 * np.abs(ka).max())  # H K H: rows sum to zero


def test_biased_hsic_of_constant_features_is_exactly_zero_and_needs_two_examples():
    k = centered_grams([torch.full((7, 5), 2.5)])
    assert not k.any() and hsic_b_self(k)[0] == 0.0
    with pytest.raises(ValueError, match="more than 1 example"):
        centered_grams([torch.randn(1, 4)])
