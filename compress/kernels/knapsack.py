"""Exact multiple-choice knapsack by dynamic programming over a discretised size axis.

Items (layers) each offer choices (settings) with a size and a loss; pick exactly one choice per item so that the
summed size stays within the budget and the summed loss is least (the multiple-choice knapsack problem, MCKP;
Sinha & Zoltners 1979; the DP is Dudzinski & Walukiewicz 1987, Sec. 4: f_k(c) = min_j f_{k-1}(c - w_kj) + l_kj).

Sizes are integers (bits or bytes). The DP runs over units of `unit` size: every choice's size is rounded UP to whole
units, so a plan the DP accepts never exceeds the budget in true size. When every size is a multiple of one unit
(their gcd) and the budget holds at most `max_units` of them, the discretisation is exact and the plan is the true
optimum; otherwise the unit is budget / max_units and the plan is optimal for the rounded-up sizes (`exact` says which).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from compress.core.errors import ConfigError


class BudgetError(ConfigError):
    """The budget is below the smallest possible plan."""


@dataclass(frozen=True)
class KnapsackResult:
    choice: list[int]  # index of the chosen option per item
    size: int  # summed true size of the chosen options
    loss: float  # summed loss
    unit: int  # size of one DP unit
    exact: bool  # True when the discretisation lost nothing (every size a multiple of unit)


def minimum_size(sizes: list[list[int]]) -> int:
    return sum(min(s) for s in sizes)


def multiple_choice_knapsack(sizes: list[list[int]], losses: list[list[float]], budget: int, *,
                             max_units: int = 1 << 17, what: str = "size") -> KnapsackResult:
    """One choice per item minimising the summed loss with summed size <= budget. Raises BudgetError (one line naming
    the minimum) when even the smallest choice of every item does not fit."""
    if len(sizes) != len(losses) or any(len(s) != len(l) or not s for s, l in zip(sizes, losses)):
        raise ValueError("sizes and losses need the same non-empty choices per item")
    sizes = [[int(x) for x in s] for s in sizes]
    if any(x < 0 for s in sizes for x in s):
        raise ValueError("sizes must be >= 0")
    budget = int(budget)
    smallest = minimum_size(sizes)
    if smallest > budget:
        raise BudgetError(f"the budget {budget} ({what}) is below the smallest possible plan: {smallest} ({what})")
    g = reduce(math.gcd, (x for s in sizes for x in s if x), 0) or 1
    if budget // g <= max_units:
        unit, exact = g, True
    else:
        unit, exact = math.ceil(budget / max_units), False
    cap = budget // unit
    w = [np.array([-(-x // unit) for x in s], dtype=np.int64) for s in sizes]  # rounded up
    if sum(int(x.min()) for x in w) > cap:
        raise BudgetError(f"the budget {budget} ({what}) is within the discretisation ({unit} per unit) of the "
                          f"smallest possible plan, {smallest} ({what}); raise the budget slightly")
    inf = np.inf
    f = np.full(cap + 1, inf)
    f[0] = 0.0
    back = np.zeros((len(sizes), cap + 1), dtype=np.int16)
    for k, (wk, lk) in enumerate(zip(w, losses)):
        best = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for j, (wj, lj) in enumerate(zip(wk.tolist(), lk)):
            if wj > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wj:] = f[: cap + 1 - wj] + float(lj)
            better = cand < best
            best[better] = cand[better]
            arg[better] = j
        f, back[k] = best, arg
    c = int(np.argmin(f))  # f[c]: least loss with rounded size exactly c units
    choice = [0] * len(sizes)
    for k in range(len(sizes) - 1, -1, -1):
        j = int(back[k, c])
        choice[k] = j
        c -= int(w[k][j])
    size = sum(s[j] for s, j in zip(sizes, choice))
    loss = float(sum(l[j] for l, j in zip(losses, choice)))
    assert size <= budget
    return KnapsackResult(choice, size, loss, unit, exact)
