"""``dense``: every query attends every key (exact softmax attention; the site's own mask still applies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Pattern


@dataclass(frozen=True)
class Dense(Pattern):
    """Exact attention. The only pattern that accepts cross-attention (S_q != S_k)."""

    name: ClassVar[str] = "dense"
    params: ClassVar[dict] = {}
    local: ClassVar[bool] = False

    def key_interval(self, axis, ndim, p, n):  # pragma: no cover - never called for a non-local pattern
        raise AssertionError("dense has no window")
