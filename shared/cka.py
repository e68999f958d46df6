"""Linear CKA between every block of model A and every block of model B, streamed over minibatches.

Minibatch CKA (Nguyen et al. 2021): over calibration batches k,
    CKA(a, b) = sum_k HSIC_u(K_ak, L_bk) / sqrt(sum_k HSIC_u(K_ak, K_ak) * sum_k HSIC_u(L_bk, L_bk))
with the unbiased HSIC estimator. Each block's Gram matrix is computed once per batch (not once per pair)
and all cross terms come from one matrix product. Values are never clamped: the unbiased estimator can
give (small) negative CKA, and undefined entries are NaN with a reason in `undefined_reasons()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.hsic import gram_terms, hsic_u_cross, hsic_u_self


class CKAAccumulator:
    """Accumulates, in float64, the HSIC_u terms of all (a, b) block pairs over repeated `update()` calls."""

    def __init__(self, n_a: int, n_b: int):
        self.n_a = n_a
        self.n_b = n_b
        self.cross = np.zeros((n_a, n_b))
        self.self_a = np.zeros(n_a)
        self.self_b = np.zeros(n_b)
        self.batches = 0
        self.examples = 0
        self.skipped_batches = 0  # minibatches with n <= 3: no unbiased estimate, left out and counted

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: every block's output of model A and of model B for the same n examples.

        Each feature tensor is (n, ...) and is flattened per example.
        """
        if len(feats_a) != self.n_a or len(feats_b) != self.n_b:
            raise ValueError(
                f"expected {self.n_a} blocks of model A and {self.n_b} of model B, "
                f"got {len(feats_a)} and {len(feats_b)}"
            )
        sizes = {int(f.shape[0]) for f in (*feats_a, *feats_b)}
        if len(sizes) != 1:
            raise ValueError(
                f"all features of one minibatch must have the same number of examples, got {sorted(sizes)}"
            )
        n = sizes.pop()
        if n <= 3:
            self.skipped_batches += 1
            return
        ta, tb = gram_terms(feats_a), gram_terms(feats_b)
        self.cross += hsic_u_cross(ta, tb)
        self.self_a += hsic_u_self(ta)
        self.self_b += hsic_u_self(tb)
        self.batches += 1
        self.examples += n

    def _degenerate(self) -> tuple[np.ndarray, np.ndarray]:
        """Blocks whose features do not vary across examples: K = 0, so self-HSIC = 0.

        `gram_terms` makes such features exactly zero, so the test is exact, not a tolerance.
        """
        return self.self_a <= 0.0, self.self_b <= 0.0

    def result(self) -> np.ndarray:
        """CKA matrix (n_a, n_b) float64; NaN where undefined (see `undefined_reasons`)."""
        if self.batches == 0:
            return np.full((self.n_a, self.n_b), np.nan)
        bad_a, bad_b = self._degenerate()
        with np.errstate(invalid="ignore", divide="ignore"):
            cka = self.cross / np.sqrt(np.outer(self.self_a, self.self_b))
        cka[bad_a, :] = np.nan
        cka[:, bad_b] = np.nan
        return cka

    def undefined_reasons(self) -> dict[tuple[int, int], str]:
        """Why each NaN entry (a, b) of `result()` is undefined; empty when every entry is defined."""
        if self.batches == 0:
            why = (
                f"no minibatch with more than 3 examples ({self.skipped_batches} skipped): "
                "unbiased HSIC needs n > 3"
            )
            return {(a, b): why for a in range(self.n_a) for b in range(self.n_b)}
        bad_a, bad_b = self._degenerate()

        def constant(model: str, block: int, value: float) -> str:
            return (
                f"block {block} of model {model} does not vary across the {self.examples} examples "
                f"(self-HSIC {value:.3g})"
            )

        reasons = {}
        for a in range(self.n_a):
            for b in range(self.n_b):
                parts = ([constant("A", a, self.self_a[a])] if bad_a[a] else []) + (
                    [constant("B", b, self.self_b[b])] if bad_b[b] else []
                )
                if parts:
                    reasons[(a, b)] = "; ".join(parts)
        return reasons


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> np.ndarray:
    """CKA of every block pair on one batch; NaN where undefined (use CKAAccumulator for the reasons)."""
    acc = CKAAccumulator(len(feats_a), len(feats_b))
    acc.update(feats_a, feats_b)
    return acc.result()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased linear CKA of two feature tensors (n, ...) for the same n examples."""
    return float(cka_matrix([x], [y])[0, 0])
