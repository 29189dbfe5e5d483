"""The pattern vocabulary: one module per pattern, each a separable per-axis interval predicate.

``PATTERNS`` maps policy names to pattern classes, in the order the README's table lists them.
"""

from .base import Layout, Pattern, PatternError, allowed, count_allowed, dense_mask
from .dense import Dense
from .dynamic import Dynamic
from .neighborhood import Neighborhood
from .shifted_window import ShiftedWindow
from .sliding_window import SlidingWindow
from .strided import Strided
from .tiled import Tiled

PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (Dense, SlidingWindow, Neighborhood, Strided, Tiled, ShiftedWindow, Dynamic)
}

__all__ = [
    "PATTERNS", "Layout", "Pattern", "PatternError", "allowed", "count_allowed", "dense_mask",
    "Dense", "Dynamic", "SlidingWindow", "Neighborhood", "Strided", "Tiled", "ShiftedWindow",
]
