"""``strided``: strided neighborhood attention (Generalized Neighborhood Attention, GNA).

Per axis and inside each dilation group, queries are grouped by ``p // stride``; every query of a group
uses the neighborhood of the group's leader (its centre query, the right-hand one for even strides,
capped at the last position; for ``causal`` axes the group's last query, and each query still sees no key
after itself). ``stride = 1`` is ``neighborhood``; ``stride = kernel`` is blocked (non-overlapping tile)
attention. Formulas follow NATTEN's reference mask (see :func:`locattn.patterns.neighborhood.na_window`).

Example (1-D, n=8, kernel=4, stride=2): queries 0,1 (leader 1) -> {0..3}; queries 4,5 (leader 5) -> {3..6}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import PatternError
from .neighborhood import Neighborhood, na_window


@dataclass(frozen=True)
class Strided(Neighborhood):
    """``kernel``, ``stride`` (``1 <= stride <= kernel``), ``dilation`` and ``causal``, each per axis."""

    stride: int | tuple[int, ...] = 1

    name: ClassVar[str] = "strided"
    params: ClassVar[dict] = {**Neighborhood.params, "stride": (int, True, 1)}

    def validate(self, grid):
        super().validate(grid)
        ks, ss = self.axis_param("kernel", len(grid)), self.axis_param("stride", len(grid))
        for a in range(len(grid)):
            if ss[a] > ks[a]:
                raise PatternError(f"stride {ss[a]} on axis {a} exceeds the kernel {ks[a]}")

    def _stride(self, axis, ndim):
        return self.axis_param("stride", ndim)[axis]

    def key_interval(self, axis, ndim, p, n):
        return na_window(p, n, self.axis_param("kernel", ndim)[axis], self.axis_param("stride", ndim)[axis],
                         self.axis_param("causal", ndim)[axis])
