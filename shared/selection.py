"""Algorithm 1 of the paper: walk block pairs from most to least similar, take the first that fits the budget.

Pure functions over two matrices of the same shape: `cka[a, b]` (similarity of front block a and behind block
b) and `cost[a, b]` (the stitched model's cost in the budget's metric when cutting there). Undefined CKA values
(NaN) are never chosen.
"""
from __future__ import annotations

import numpy as np

from shared.errors import BudgetError


def rank_pairs(cka: np.ndarray, cost: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All defined pairs, highest CKA first; ties go to the cheaper pair."""
    a_idx, b_idx = np.nonzero(np.isfinite(cka))
    tie = cost[a_idx, b_idx] if cost is not None else np.zeros(len(a_idx))
    order = np.lexsort((tie, -cka[a_idx, b_idx]))
    return [(int(a_idx[k]), int(b_idx[k])) for k in order]


def select(cka: np.ndarray, cost: np.ndarray, budget: float) -> tuple[int, int] | None:
    """The highest-CKA pair whose cost is within `budget`, or None when nothing fits."""
    for a, b in rank_pairs(cka, cost):
        if cost[a, b] <= budget:
            return a, b
    return None


def default_budgets(cka: np.ndarray, cost: np.ndarray, count: int) -> list[float]:
    """`count` budgets evenly spaced from the cheapest defined pair to the most expensive one."""
    defined = cost[np.isfinite(cka)]
    if defined.size == 0:
        raise BudgetError("no block pair has a defined CKA value", "use more calibration examples")
    lo, hi = float(defined.min()), float(defined.max())
    return [lo] if count == 1 or lo == hi else [float(v) for v in np.linspace(lo, hi, count)]


def sweep(cka: np.ndarray, cost: np.ndarray, budgets: list[float]) -> dict[tuple[int, int], list[float]]:
    """Each chosen pair with the budgets that chose it (several budgets may pick the same pair)."""
    chosen: dict[tuple[int, int], list[float]] = {}
    for budget in sorted(budgets):
        pair = select(cka, cost, budget)
        if pair is not None:
            chosen.setdefault(pair, []).append(budget)
    if not chosen:
        cheapest = float(np.nanmin(np.where(np.isfinite(cka), cost, np.nan)))
        raise BudgetError(f"no stitched variant fits any budget (largest {max(budgets):g}); "
                          f"the cheapest needs {cheapest:g}", "raise catalog.budgets")
    return chosen
