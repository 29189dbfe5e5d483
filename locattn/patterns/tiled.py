"""``tiled``: sliding tile attention (STA).

Each axis is cut into tiles of ``tile`` tokens (the last one may be shorter); a query's tile attends the
``window`` key tiles of a neighborhood on the tile grid centred on its tile and shifted inward at the
borders like ``neighborhood``: ``start = clamp(t - window // 2, 0, n_tiles - window)``. All queries of a
tile see the same keys, so the pattern is perfectly block-sparse when a tile is one kernel block.

Example (1-D, n=10, tile=2, window=3): tokens 0-1 (tile 0) see tiles 0..2 = keys 0..5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, PatternError, fit_range


@dataclass(frozen=True)
class Tiled(Pattern):
    """``tile`` size per axis (tokens), ``window`` per axis counted in tiles."""

    tile: int | tuple[int, ...] = 1
    window: int | tuple[int, ...] = 1

    name: ClassVar[str] = "tiled"
    params: ClassVar[dict] = {"tile": (int, True, 1), "window": (int, True, 1)}

    def validate(self, grid):
        super().validate(grid)
        ts, ws = self.axis_param("tile", len(grid)), self.axis_param("window", len(grid))
        for a, n in enumerate(grid):
            n_tiles = -(-n // ts[a])
            if ws[a] > n_tiles:
                raise PatternError(f"window of {ws[a]} tiles on axis {a} exceeds the {n_tiles} tiles of size {ts[a]} "
                                   f"on an axis of {n}")

    def reach(self, axis, ndim):
        t, w = self.axis_param("tile", ndim)[axis], self.axis_param("window", ndim)[axis]
        return (w // 2 + 1) * t - 1, (w - w // 2) * t - 1

    def halo(self, axis, ndim, n, r0, r1):
        # neighborhood attention of kernel `window` on the tile axis: the cut starts and ends on tile boundaries
        # (counted from position 0; the last, partial tile only at the axis end) and holds `window` tiles
        t, w = self.axis_param("tile", ndim)[axis], self.axis_param("window", ndim)[axis]
        return fit_range(n, (r0 // t - w // 2) * t, (-(-r1 // t) + w - 1 - w // 2) * t, t, t,
                         self.min_extent(axis, ndim), end_from_border=False)

    def align(self, axis, ndim):
        return self.axis_param("tile", ndim)[axis], 0

    def min_extent(self, axis, ndim):
        return self.axis_param("tile", ndim)[axis] * self.axis_param("window", ndim)[axis]

    def key_interval(self, axis, ndim, p, n):
        t = self.axis_param("tile", ndim)[axis]
        w = self.axis_param("window", ndim)[axis]
        n = n + torch.zeros_like(p)
        n_tiles = (n + t - 1) // t
        start = torch.minimum((p // t - w // 2).clamp_min(0), n_tiles - w)
        return start * t, torch.minimum((start + w) * t, n) - 1
