"""``shifted_window``: Swin / HiDiffusion window attention, non-cyclic.

Per axis, windows of ``window`` tokens start at ``shift + m * window``; tokens before ``shift`` form a
leading partial window and the last window may be partial. Query i attends key j iff they share a window
on every axis. With ``shift = 0`` this is plain (Swin W-MSA) window attention; ``shift = window // 2`` is
Swin's SW-MSA with its attention mask (no wrap-around mixing).

Example (1-D, n=10, window=4, shift=2): windows {0,1} {2..5} {6..9}.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, PatternError


@dataclass(frozen=True)
class ShiftedWindow(Pattern):
    """``window`` size per axis, ``shift`` per axis (``0 <= shift < window``)."""

    window: int | tuple[int, ...] = 1
    shift: int | tuple[int, ...] = 0

    name: ClassVar[str] = "shifted_window"
    params: ClassVar[dict] = {"window": (int, True, 1), "shift": (int, True, 0)}

    def validate(self, grid):
        super().validate(grid)
        ws, ss = self.axis_param("window", len(grid)), self.axis_param("shift", len(grid))
        for a in range(len(grid)):
            if ss[a] >= ws[a]:
                raise PatternError(f"shift {ss[a]} on axis {a} must be smaller than the window {ws[a]}")

    def reach(self, axis, ndim):
        w = self.axis_param("window", ndim)[axis]
        return w - 1, w - 1

    def halo(self, axis, ndim, n, r0, r1):
        # whole windows: from the start of r0's window to the end of (r1 - 1)'s
        w, s = self.axis_param("window", ndim)[axis], self.axis_param("shift", ndim)[axis]
        return max((r0 - s) // w * w + s, 0), min((r1 - 1 - s) // w * w + s + w, n)

    def align(self, axis, ndim):
        return self.axis_param("window", ndim)[axis], self.axis_param("shift", ndim)[axis]

    def on_subrange(self, axis, ndim, e0):
        # windows stay where they were: the cut's first full window starts (shift - e0) mod window after it
        w, shifts = self.axis_param("window", ndim)[axis], list(self.axis_param("shift", ndim))
        shifts[axis] = (shifts[axis] - e0) % w
        return dataclasses.replace(self, shift=tuple(shifts))

    def key_interval(self, axis, ndim, p, n):
        w = self.axis_param("window", ndim)[axis]
        s = self.axis_param("shift", ndim)[axis]
        n = n + torch.zeros_like(p)
        start = torch.div(p - s, w, rounding_mode="floor") * w + s
        return start.clamp_min(0), torch.minimum(start + w - 1, n - 1)
