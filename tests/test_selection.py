"""Algorithm 1 against brute force."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import BudgetError
from shared.selection import default_budgets, rank_pairs, select, sweep


def brute_force(cka, cost, budget):
    best = None
    for a in range(cka.shape[0]):
        for b in range(cka.shape[1]):
            if np.isfinite(cka[a, b]) and cost[a, b] <= budget:
                key = (cka[a, b], -cost[a, b])
                if best is None or key > best[0]:
                    best = (key, (a, b))
    return None if best is None else best[1]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**31 - 1), st.floats(0.0, 1.2))
def test_select_is_the_highest_cka_pair_within_budget(na, nb, seed, budget_frac):
    rng = np.random.default_rng(seed)
    cka = rng.uniform(-0.1, 1.0, (na, nb)).round(2)  # rounding creates ties
    cka[rng.uniform(size=(na, nb)) < 0.1] = np.nan
    cost = rng.integers(1, 100, (na, nb)).astype(float)
    budget = budget_frac * 100
    assert select(cka, cost, budget) == brute_force(cka, cost, budget)


def test_undefined_pairs_are_never_ranked():
    cka = np.array([[np.nan, 0.2], [0.9, np.nan]])
    assert rank_pairs(cka) == [(1, 0), (0, 1)]


def test_budget_below_every_pair_selects_nothing_and_sweep_says_why():
    cka = np.array([[0.5, 0.7]])
    cost = np.array([[10.0, 20.0]])
    assert select(cka, cost, 5.0) is None
    with pytest.raises(BudgetError, match="cheapest needs 10"):
        sweep(cka, cost, [1.0, 5.0])


def test_sweep_picks_the_best_pair_within_each_band():
    cka = np.array([[0.3, 0.9], [0.6, 0.1]])
    cost = np.array([[1.0, 10.0], [5.0, 2.0]])
    # bands (-inf, 1], (1, 4], (4, 6], (6, 12]: (0,0); (1,1) is the only pair in (1,4]; (1,0); (0,1)
    assert sweep(cka, cost, [1.0, 4.0, 6.0, 12.0]) == {(0, 0): [1.0], (1, 1): [4.0], (1, 0): [6.0], (0, 1): [12.0]}
    # a floor drops everything at or below it; an empty band is skipped
    assert sweep(cka, cost, [4.0, 4.5, 12.0], floor=2.0) == {(0, 1): [12.0]}


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_sweep_matches_brute_force_per_band(na, nb, seed):
    rng = np.random.default_rng(seed)
    cka = rng.uniform(0, 1, (na, nb))
    cost = rng.uniform(1, 100, (na, nb))
    budgets = sorted(rng.uniform(1, 100, 4).tolist())
    try:
        chosen = sweep(cka, cost, budgets, floor=0.0)
    except BudgetError:
        chosen = {}
    lower = 0.0
    for budget in budgets:
        band = np.where(cost > lower, cost, np.inf)
        expected = brute_force(cka, band, budget)
        assert (expected is None) or budget in chosen[expected]
        lower = budget


def test_default_budgets_span_the_two_base_models():
    assert default_budgets(1.0, 5.0, 4) == [2.0, 3.0, 4.0, 5.0]
    with pytest.raises(BudgetError):
        default_budgets(5.0, 1.0, 3)
