"""Linear CKA between every block of model A and every block of model B, streamed over minibatches.

Two estimators (`data.calibration.estimator`, names in `shared.vocabulary.CKA_ESTIMATORS`):

`unbiased` (the default), minibatch CKA (Nguyen et al. 2021): over calibration batches k,
    CKA(a, b) = sum_k HSIC_u(K_ak, L_bk) / sqrt(sum_k HSIC_u(K_ak, K_ak) * sum_k HSIC_u(L_bk, L_bk))
with the unbiased HSIC estimator. Each block's Gram matrix is computed once per batch (not once per pair)
and all cross terms come from one matrix product. Values are never clamped: the unbiased estimator can
give (small) negative CKA, and undefined entries are NaN with a reason in `undefined_reasons()`.

`paper`, as the ReStNet paper computes it: biased HSIC with the centring matrix H (its eq. 6), CKA per
calibration batch (eq. 7), averaged over the M batches. Its values lie in [0, 1] and are biased upwards for
wide features and few examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.vocabulary import CKA_ESTIMATORS
from shared.hsic import centered_grams, gram_terms, hsic_b_cross, hsic_b_self, hsic_u_cross, hsic_u_self


class CKAAccumulator:
    """Accumulates, in float64, the HSIC_u terms of all (a, b) block pairs over repeated `update()` calls."""

    min_examples = 4  # unbiased HSIC needs n > 3

    def __init__(self, n_a: int, n_b: int):
        self.n_a = n_a
        self.n_b = n_b
        self.cross = np.zeros((n_a, n_b))
        self.self_a = np.zeros(n_a)
        self.self_b = np.zeros(n_b)
        self.batches = 0
        self.examples = 0
        self.skipped_batches = 0  # minibatches too small for an estimate, left out and counted

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
        if n < self.min_examples:
            self.skipped_batches += 1
            return
        self._add(feats_a, feats_b)
        self.batches += 1
        self.examples += n

    def _add(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
        ta, tb = gram_terms(feats_a), gram_terms(feats_b)
        self.cross += hsic_u_cross(ta, tb)
        self.self_a += hsic_u_self(ta)
        self.self_b += hsic_u_self(tb)

    def _combined(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.cross / np.sqrt(np.outer(self.self_a, self.self_b))

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
        cka = self._combined()
        cka[bad_a, :] = np.nan
        cka[:, bad_b] = np.nan
        return cka

    def undefined_reasons(self) -> dict[tuple[int, int], str]:
        """Why each NaN entry (a, b) of `result()` is undefined; empty when every entry is defined."""
        if self.batches == 0:
            why = (
                f"no minibatch with at least {self.min_examples} examples ({self.skipped_batches} skipped): "
                f"the estimator needs n > {self.min_examples - 1}"
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


class PaperCKAAccumulator(CKAAccumulator):
    """The paper's estimator: the mean over batches of each batch's biased-HSIC CKA. A block that does not vary
    in some batch leaves its entries undefined (NaN), as in `CKAAccumulator`."""

    min_examples = 2

    def __init__(self, n_a: int, n_b: int):
        super().__init__(n_a, n_b)
        self.cka_sum = np.zeros((n_a, n_b))
        self.constant_a = np.zeros(n_a, dtype=bool)
        self.constant_b = np.zeros(n_b, dtype=bool)

    def _add(self, feats_a, feats_b) -> None:
        ka, kb = centered_grams(feats_a), centered_grams(feats_b)
        self_a, self_b = hsic_b_self(ka), hsic_b_self(kb)
        self.constant_a |= self_a <= 0.0
        self.constant_b |= self_b <= 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            self.cka_sum += hsic_b_cross(ka, kb) / np.sqrt(np.outer(self_a, self_b))
        self.self_a += self_a  # kept for the reasons of undefined entries
        self.self_b += self_b

    def _degenerate(self) -> tuple[np.ndarray, np.ndarray]:
        return self.constant_a, self.constant_b

    def _combined(self) -> np.ndarray:
        return self.cka_sum / self.batches


def cka_accumulator(estimator: str, n_a: int, n_b: int) -> CKAAccumulator:
    """The accumulator of a `CKA_ESTIMATORS` name."""
    if estimator not in CKA_ESTIMATORS:
        raise ValueError(f"unknown CKA estimator {estimator!r}; expected one of {CKA_ESTIMATORS}")
    return (PaperCKAAccumulator if estimator == "paper" else CKAAccumulator)(n_a, n_b)
