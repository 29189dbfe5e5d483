"""Counters of every rewrite, fallback and kernel dispatch, and the ``locattn`` logger.

``locattn.counters()`` returns a copy: ``{"rewrite": {...}, "fallback": {...}, "dispatch": {...}}`` where
each inner dict maps a reason or name to a count. Nothing is printed; logging goes to the ``locattn`` logger.
"""

from __future__ import annotations

import collections
import copy
import logging

log = logging.getLogger("locattn")

_COUNTERS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def bump(kind: str, key: str, n: int = 1) -> None:
    _COUNTERS[kind][key] += n


def counters() -> dict[str, dict[str, int]]:
    """Snapshot of all counters (kind -> key -> count)."""
    return {k: dict(v) for k, v in copy.deepcopy(_COUNTERS).items()}


def reset_counters() -> None:
    _COUNTERS.clear()
