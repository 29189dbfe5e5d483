"""``sliding_window``: query i attends key j iff ``|c_i - c_j| <= window`` on every axis.

Options per axis: ``dilation`` d also requires ``(c_i - c_j) mod d == 0``; ``causal`` also requires
``c_j <= c_i``. At the borders the window is clipped (border queries see fewer keys), unlike
``neighborhood`` which shifts it inward.

Example (1-D, window=1): query 0 sees keys {0, 1}; query 5 sees {4, 5, 6}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, PatternError


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """``window``: radius per axis (int or one per axis); ``dilation``; ``causal`` (bool per axis)."""

    window: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False

    name: ClassVar[str] = "sliding_window"
    params: ClassVar[dict] = {"window": (int, True, 0), "dilation": (int, True, 1), "causal": (bool, True, None)}

    def dilation_of(self, axis, ndim):
        return self.axis_param("dilation", ndim)[axis]

    def validate(self, grid):
        super().validate(grid)
        for a, n in enumerate(grid):
            if self.dilation_of(a, len(grid)) > n:
                raise PatternError(f"dilation {self.dilation_of(a, len(grid))} on axis {a} exceeds the axis size {n}")

    def reach(self, axis, ndim):
        # |c_i - c_j| <= (window // d) * d; translation-invariant and clipped (never shifted) at the borders
        r = self.axis_param("window", ndim)[axis] // self.dilation_of(axis, ndim) * self.dilation_of(axis, ndim)
        return r, 0 if self.axis_param("causal", ndim)[axis] else r

    def min_extent(self, axis, ndim):
        return self.dilation_of(axis, ndim)

    def key_interval(self, axis, ndim, p, n):
        # |c_i - c_j| <= w with c_j = c_i (mod d)  <=>  |p_i - p_j| <= w // d inside the dilation group
        r = self.axis_param("window", ndim)[axis] // self.dilation_of(axis, ndim)
        lo = (p - r).clamp_min(0)
        hi = p if self.axis_param("causal", ndim)[axis] else torch.minimum(p + r, n - 1 + torch.zeros_like(p))
        return lo, hi
