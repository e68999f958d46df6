"""Pure math for linear CKA: Gram matrices and the two HSIC estimators (float64).

- The unbiased estimator (Song et al. 2012), for many blocks at once: `gram_terms` keeps of each Gram matrix K
  (diagonal set to zero) only what the estimator needs, its strict upper triangle and its row sums, and
  `hsic_u_cross` / `hsic_u_self` evaluate [tr(K L) + (1'K1)(1'L1) / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))
  for every pair with one matrix product. Needs n > 3.
- The biased estimator the ReStNet paper writes (its eq. 6): HSIC(K, L) = tr(K H L H) / (n-1)^2 with the
  centring matrix H = I - 11'/n. `centered_grams` forms H K H once per block (from `gram_linear`) and
  `hsic_b_cross` / `hsic_b_self` give every pair's value, since tr(K H L H) = <HKH, HLH>. Needs n > 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

# Features per chunk in the Gram products (8 MB of float32): wide features (d ~ 200k) need no full shifted copy.
_CHUNK_ELEMENTS = 2**21


@cache
def _blas_threads() -> ThreadpoolController:
    """Finds the loaded BLAS libraries once (a scan of the process's mapped libraries, milliseconds)."""
    return ThreadpoolController()


def _same_threads_as_torch():
    """BLAS runs with as many threads as torch, so one thread budget covers the models and the CKA."""
    return _blas_threads().limit(limits=torch.get_num_threads(), user_api="blas")


def _check_n(n: int) -> None:
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 examples, got n={n}")


def _shifted_gram_upper(x: torch.Tensor | np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write into `out` (n, n) float64 the upper triangle, diagonal included, of the Gram matrix of the
    features of `x` (n, ...) minus those of its first example; the strict lower triangle is left zero.

    Subtracting one vector from every example's features changes X Xᵀ only by terms a_i + a_j + c, which the
    unbiased estimator removes exactly, so every HSIC_u value is unchanged. It matters numerically: activations
    share a large common component (e.g. after ReLU) that would otherwise cancel catastrophically. The difference
    of two float32 values that close is exact, so the products can run in float32 (twice as fast as float64)
    and stay within 1e-6 of float64; features that do not vary across examples become exactly zero. Float64
    input stays float64. Each chunk's product is a BLAS syrk (half the multiply-adds of a general product, the
    Gram matrix being symmetric), summed over chunks in float64; a chunk stays in cache from shift to product.
    """
    x = torch.as_tensor(x).detach().cpu()
    x = (x if x.dtype == torch.float64 else x.float()).reshape(x.shape[0], -1).numpy()
    n, d = x.shape
    syrk = blas.dsyrk if x.dtype == np.float64 else blas.ssyrk
    step = max(1, _CHUNK_ELEMENTS // n)
    buffers = {}  # chunk width -> reused C-ordered buffer (fresh pages cost as much as the subtraction)
    out.fill(0.0)
    for start in range(0, d, step):
        width = min(step, d - start)
        chunk = buffers.setdefault(width, np.empty((n, width), dtype=x.dtype))
        np.subtract(x[:, start:start + width], x[0, start:start + width], out=chunk)
        # (n, w) C-ordered is (w, n) Fortran-ordered: no copy in. The lower triangle of the Fortran-ordered
        # result, transposed, is the upper triangle in C order: a contiguous sum into `out`.
        out += syrk(1.0, chunk.T, trans=1, lower=1).T
    return out


def gram_linear(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Linear-kernel Gram matrix (n, n), float64, of the features of `x` (n, ...) minus those of its first
    example (the same HSIC_u values as the raw features, without their cancellation)."""
    n = int(torch.as_tensor(x).shape[0])
    with _same_threads_as_torch():
        upper = _shifted_gram_upper(x, np.empty((n, n)))
    return upper + np.triu(upper, 1).T


@dataclass(frozen=True)
class GramTerms:
    """Of p Gram matrices K (n, n) with their diagonals set to zero, what the unbiased estimator needs."""

    upper: np.ndarray  # (p, n, n): strict upper triangles, zero elsewhere
    rows: np.ndarray  # (p, n): row sums

    @property
    def n(self) -> int:
        return self.rows.shape[1]

    @property
    def totals(self) -> np.ndarray:
        return self.rows.sum(axis=1)


def gram_terms(feats: Sequence[torch.Tensor | np.ndarray]) -> GramTerms:
    """GramTerms of every feature tensor (n, ...) of `feats`, all for the same n examples."""
    n = int(torch.as_tensor(feats[0]).shape[0])
    upper = np.empty((len(feats), n, n))
    rows = np.empty((len(feats), n))
    with _same_threads_as_torch():
        for k, f in enumerate(feats):
            _shifted_gram_upper(f, upper[k])
            np.fill_diagonal(upper[k], 0.0)
            rows[k] = upper[k].sum(axis=1) + upper[k].sum(axis=0)
    return GramTerms(upper, rows)


def hsic_u_cross(a: GramTerms, b: GramTerms) -> np.ndarray:
    """HSIC_u of every pair (i, j) of a's and b's Gram matrices: (p, q). tr(K L) = 2 <upper(K), upper(L)>."""
    n = a.n
    _check_n(n)
    # The same BLAS as the Gram products (one thread pool); the transposes are Fortran-ordered: no copies.
    flat_a, flat_b = a.upper.reshape(len(a.upper), -1), b.upper.reshape(len(b.upper), -1)
    with _same_threads_as_torch():
        trace = 2.0 * blas.dgemm(1.0, flat_a.T, flat_b.T, trans_a=1)
    value = trace + np.outer(a.totals, b.totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (a.rows @ b.rows.T)
    return value / (n * (n - 3))


def hsic_u_self(a: GramTerms) -> np.ndarray:
    """HSIC_u(K_i, K_i) of each of a's Gram matrices: (p,). Exactly 0 for features that do not vary."""
    n = a.n
    _check_n(n)
    flat = a.upper.reshape(len(a.upper), -1)
    trace = 2.0 * np.einsum("ij,ij->i", flat, flat)
    value = trace + a.totals**2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * np.einsum("ij,ij->i", a.rows, a.rows)
    return value / (n * (n - 3))


def _check_n_biased(n: int) -> None:
    if n <= 1:
        raise ValueError(f"biased HSIC needs more than 1 example, got n={n}")


def centered_grams(feats: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
    """H K H (p, n, n) for the Gram matrix K of every feature tensor (n, ...) of `feats`. Centring removes the
    first example's shift `gram_linear` applies, so the result is that of the raw features."""
    grams = np.stack([gram_linear(f) for f in feats])
    _check_n_biased(grams.shape[-1])
    grams -= grams.mean(axis=-1, keepdims=True)
    grams -= grams.mean(axis=-2, keepdims=True)
    return grams


def hsic_b_cross(k: np.ndarray, l: np.ndarray) -> np.ndarray:
    """Biased HSIC of every pair (i, j) of centred Gram matrices k (p, n, n) and l (q, n, n): (p, q)."""
    n = k.shape[-1]
    _check_n_biased(n)
    with _same_threads_as_torch():
        trace = k.reshape(len(k), -1) @ l.reshape(len(l), -1).T
    return trace / (n - 1) ** 2


def hsic_b_self(k: np.ndarray) -> np.ndarray:
    """Biased HSIC(K_i, K_i) of each centred Gram matrix (p,). Exactly 0 for features that do not vary."""
    n = k.shape[-1]
    _check_n_biased(n)
    flat = k.reshape(len(k), -1)
    return np.einsum("ij,ij->i", flat, flat) / (n - 1) ** 2
