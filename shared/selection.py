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


def default_budgets(low: float, high: float, count: int) -> list[float]:
    """`count` budgets evenly spaced above `low` up to `high` (by default: the smaller and the larger base
    model's cost, the range the paper's variants span)."""
    if not high > low:
        raise BudgetError(f"cannot sweep budgets from {low:g} to {high:g}", "give catalog.budgets explicitly")
    return [float(v) for v in np.linspace(low, high, count + 1)[1:]]


def sweep(cka: np.ndarray, cost: np.ndarray, budgets: list[float],
          floor: float = -np.inf) -> dict[tuple[int, int], list[float]]:
    """One variant per budget band, so a catalog spans the whole range.

    Plain Algorithm 1 under a growing budget keeps choosing the same cheap, very similar pair; a sweep
    instead applies it within each band (previous budget, budget], the first band starting at `floor`.
    Returns each chosen pair with the budget(s) that chose it; bands with no defined pair are skipped.
    """
    chosen: dict[tuple[int, int], list[float]] = {}
    lower = floor
    for budget in sorted(budgets):
        in_band = np.where(cost > lower, cost, np.inf)
        pair = select(cka, in_band, budget)
        if pair is not None:
            chosen.setdefault(pair, []).append(budget)
        lower = budget
    if not chosen:
        defined = cost[np.isfinite(cka)]
        cheapest = float(defined.min()) if defined.size else float("nan")
        raise BudgetError(f"no stitched variant fits any budget (largest {max(budgets):g}); "
                          f"the cheapest needs {cheapest:g}", "raise catalog.budgets")
    return chosen
