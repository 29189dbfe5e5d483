"""``neighborhood``: NATTEN's neighborhood attention (na1d / na2d / na3d semantics).

Per axis, tokens split into ``dilation`` interleaved groups (``c % d``); inside its group (position
``p = c // d`` of ``n`` positions) a query sees exactly ``kernel`` positions: the window centred on it,
shifted inward at the borders, ``start = clamp(p - kernel // 2, 0, n - kernel)``. With ``causal`` the
window is the ``kernel`` positions ending at the query, ``[max(p - kernel + 1, 0), p]`` (border queries
see fewer keys). Every non-causal query therefore sees exactly ``prod(kernel)`` keys.

Example (1-D, n=6, kernel=3): query 0 -> {0,1,2}; query 3 -> {2,3,4}; query 5 -> {3,4,5}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, PatternError, fit_range


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """``kernel`` per axis (positions seen), ``dilation`` per axis, ``causal`` per axis."""

    kernel: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False

    name: ClassVar[str] = "neighborhood"
    params: ClassVar[dict] = {"kernel": (int, True, 1), "dilation": (int, True, 1), "causal": (bool, True, None)}

    def dilation_of(self, axis, ndim):
        return self.axis_param("dilation", ndim)[axis]

    def validate(self, grid):
        super().validate(grid)
        ks, ds = self.axis_param("kernel", len(grid)), self.axis_param("dilation", len(grid))
        for a, n in enumerate(grid):
            if ks[a] * ds[a] > n:
                raise PatternError(
                    f"kernel {ks[a]} x dilation {ds[a]} = {ks[a] * ds[a]} on axis {a} exceeds the axis size {n}")

    def _stride(self, axis: int, ndim: int) -> int:
        return 1

    def reach(self, axis, ndim):
        # a query's window is placed by its stride group's leader L (the query itself at stride 1), which lies
        # within s - 1 - s // 2 before (centre leader) / s // 2 after it, or up to s - 1 after it (causal: the
        # group's last query); windows shifted inward at a border need min_extent and a cut reaching that border
        k, d = self.axis_param("kernel", ndim)[axis], self.dilation_of(axis, ndim)
        s = self._stride(axis, ndim)
        if self.axis_param("causal", ndim)[axis]:
            return (k - 1) * d, (s - 1) * d
        return (k // 2 + s - 1 - s // 2) * d, (s // 2 + k - 1 - k // 2) * d

    def halo(self, axis, ndim, n, r0, r1):
        # stride groups are counted from position 0 of each dilation group: a cut must start on a boundary of
        # them in every dilation group (a multiple of stride x dilation), or their leaders move
        left, right = self.reach(axis, ndim)
        s, d = self._stride(axis, ndim), self.dilation_of(axis, ndim)
        return fit_range(n, r0 - left, r1 + right, s * d if s > 1 else 1, 1, self.min_extent(axis, ndim))

    def align(self, axis, ndim):
        s = self._stride(axis, ndim)
        return (s * self.dilation_of(axis, ndim), 0) if s > 1 else (1, 0)

    def min_extent(self, axis, ndim):
        return self.axis_param("kernel", ndim)[axis] * self.dilation_of(axis, ndim)

    def key_interval(self, axis, ndim, p, n):
        k = self.axis_param("kernel", ndim)[axis]
        return na_window(p, n, k, 1, self.axis_param("causal", ndim)[axis])


def na_window(p: torch.Tensor, n, kernel: int, stride: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NATTEN/GNA key interval (inclusive group positions) of queries at group positions ``p``.

    Queries of one stride group (``p // stride``) share the window of their leader: the group's centre
    (right-hand centre for even strides) for non-causal axes, its last query for causal ones, capped at
    ``n - 1``. Non-causal: ``start = clamp(L - kernel // 2, 0, n - kernel)``, ``kernel`` positions. Causal:
    ``[max(L - kernel + 1, 0), p]``. This is NATTEN's ``mask.hpp`` reference, stride 1 being plain NA.
    """
    n = n + torch.zeros_like(p)
    if causal:
        leader = torch.minimum((p // stride) * stride + stride - 1, n - 1)
        return (leader - kernel + 1).clamp_min(0), p
    leader = torch.minimum((p // stride) * stride + stride // 2, n - 1)
    start = torch.minimum((leader - kernel // 2).clamp_min(0), n - kernel)
    return start, start + kernel - 1
