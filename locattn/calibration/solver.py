"""Choosing a candidate per (site, head): a multiple-choice knapsack, and the search for its error budget.

:func:`solve` minimises ``Σ_i cost[i, c_i]`` subject to ``Σ_i err[i, c_i] <= budget`` exactly, by dynamic
programming over the error quantised into ``resolution`` steps (each error rounded *up*, so the choice is
feasible for the true errors; optimal for the quantised ones, hence exactly optimal when the errors are
multiples of ``budget / resolution``). Work: O(items x resolution x candidates), vectorised per item:
30 sites x 9 heads x 40 candidates at 4096 steps is ~40M min-operations.

The per-head errors are a proxy (each head's share of its site's relative squared output error); the
end-to-end metric is some increasing function of their sum. :class:`BudgetSearch` finds the error budget
``E`` whose solution's *measured* metric lands just under the target, assuming ``metric ≈ a · E^α`` through
the last two measurements (a secant step in log-log space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

INF = float("inf")


def solve(cost: torch.Tensor, err: torch.Tensor, budget: float, resolution: int = 4096) -> torch.Tensor:
    """Per item (row), the column minimising total cost with total error ``<= budget``.

    cost, err: [N, C] (``inf`` cost = not available); column 0 must have error 0 (dense). Returns [N] int64.
    """
    n, c = cost.shape
    cost = cost.double()
    err = err.double().clamp_min(0)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if budget <= 0:
        units = torch.where(err > 0, resolution + 1, 0)
    else:
        units = torch.ceil(err / budget * resolution - 1e-9).clamp_min(0)
        units = torch.where(units > resolution, resolution + 1, units).long()
    # dp[u]: least cost with total error units <= u (non-decreasing in u)
    dp = torch.zeros(resolution + 1, dtype=torch.float64)
    choice = torch.empty(n, resolution + 1, dtype=torch.int16 if c < 32767 else torch.int32)
    pad = torch.full((resolution + 1,), INF, dtype=torch.float64)
    for i in range(n):
        best = torch.full((resolution + 1,), INF, dtype=torch.float64)
        arg = torch.zeros(resolution + 1, dtype=torch.long)
        for j in range(c):
            u, w = int(units[i, j]), float(cost[i, j])
            if u > resolution or w == INF:
                continue
            cand = torch.cat([pad[:u], dp[:resolution + 1 - u]]) + w
            better = cand < best
            best = torch.where(better, cand, best)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        dp = best
        choice[i] = arg.to(choice.dtype)
    if dp[resolution] == INF:
        raise ValueError("solve: no feasible choice (column 0 must have error 0 and finite cost)")
    out = torch.empty(n, dtype=torch.long)
    u = resolution
    for i in range(n - 1, -1, -1):
        j = int(choice[i, u])
        out[i] = j
        u -= int(units[i, j])
    return out


def cheapest(cost: torch.Tensor) -> torch.Tensor:
    """[N] the cheapest column per item (ties: the lower column)."""
    return cost.double().argmin(1)


@dataclass
class BudgetSearch:
    """Finds the largest proxy error budget ``E`` whose measured metric is ``<= target``.

    Call :meth:`next` for the next ``E`` to try, then :meth:`tell` its measured metric. ``e_max`` is the proxy
    error of the all-cheapest choice (tried first: if it meets the target, it is the answer).
    """

    target: float
    e_max: float
    max_evals: int = 5
    #: stop when a feasible point lies within this fraction below the target
    tolerance: float = 0.25
    tried: list[tuple[float, float]] = field(default_factory=list)

    def best(self) -> float | None:
        ok = [e for e, m in self.tried if m <= self.target]
        return max(ok) if ok else None

    def done(self) -> bool:
        if not self.tried:
            return False
        if len(self.tried) >= self.max_evals:
            return True
        b = self.best()
        if b is not None and b >= self.e_max:
            return True
        return any(e == b and m >= (1 - self.tolerance) * self.target for e, m in self.tried)

    def next(self) -> float:
        if not self.tried:
            return self.e_max
        ok = [(e, m) for e, m in self.tried if m <= self.target]
        bad = [(e, m) for e, m in self.tried if m > self.target]
        lo = max(ok) if ok else None          # feasible, largest E
        hi = min(bad) if bad else None        # infeasible, smallest E
        # a power law through the two points nearest the target, else a linear one through the last point
        near = sorted(self.tried, key=lambda p: abs(math.log(max(p[1], 1e-300) / self.target)))[:2]
        alpha = 1.0
        if len(near) == 2 and near[0][0] != near[1][0] and min(near[0][1], near[1][1]) > 0:
            (e0, m0), (e1, m1) = near
            alpha = math.log(m1 / m0) / math.log(e1 / e0)
            alpha = min(4.0, max(0.25, alpha)) if math.isfinite(alpha) else 1.0
        e_ref, m_ref = near[0]
        goal = 0.9 * self.target
        e = e_ref * (goal / m_ref) ** (1 / alpha) if m_ref > 0 else e_ref * 4
        # stay strictly inside the bracket
        if lo is not None and e <= lo[0]:
            e = lo[0] * 1.5 if hi is None else math.sqrt(lo[0] * hi[0])
        if hi is not None and e >= hi[0]:
            e = hi[0] / 4 if lo is None else math.sqrt(lo[0] * hi[0])
        return min(e, self.e_max)

    def tell(self, e: float, metric: float) -> None:
        self.tried.append((e, metric))
