"""Counters of every rewrite, fallback and kernel dispatch, and the ``locattn`` logger.

``locattn.counters()`` returns a copy: ``{"rewrite": {...}, "fallback": {...}, "dispatch": {...}}`` where
each inner dict maps a reason or name to a count. Nothing is printed; logging goes to the ``locattn`` logger.

``densities()`` returns the *measured* density of every site whose pattern is chosen per call (``dynamic``):
per site, the fraction of (query, key) pairs attended, averaged over calls and batch elements per head, with
its mean, min and max over heads. It is accumulated on the tensors' device (no synchronisation per call) and
read (synchronised) only when asked.
"""

from __future__ import annotations

import collections
import copy
import functools
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
    _DENSITY.clear()


#: site -> [per-head sum of densities (device tensor [H]), per-head count of samples (device tensor [H])]
_DENSITY: dict[str, list] = {}


def record_density(site: str, n_heads: int, heads, density) -> None:
    """Add the densities ``[B, len(heads)]`` (fraction of pairs attended per batch element and head; ``heads``
    None = all ``n_heads``) of one call of ``site``, on the tensor's device."""
    import torch  # noqa: PLC0415

    acc = _DENSITY.get(site)
    if acc is None or acc[0].device != density.device or acc[0].numel() != n_heads:
        acc = _DENSITY[site] = [torch.zeros(n_heads, dtype=torch.float64, device=density.device),
                                torch.zeros(n_heads, dtype=torch.float64, device=density.device)]
    idx = slice(None) if heads is None else _index(tuple(heads), density.device)
    acc[0][idx] += density.sum(0).to(torch.float64)
    acc[1][idx] += density.shape[0]


@functools.lru_cache(maxsize=256)
def _index(heads: tuple, device):
    import torch  # noqa: PLC0415
    return torch.tensor(heads, device=device)


def densities() -> dict[str, dict[str, float]]:
    """``{site: {"mean", "min", "max", "samples"}}`` over heads of the per-head mean measured density."""
    out = {}
    for site, (total, n) in _DENSITY.items():
        seen = n > 0
        if not bool(seen.any()):
            continue
        per_head = (total[seen] / n[seen]).cpu()
        out[site] = {"mean": float(per_head.mean()), "min": float(per_head.min()), "max": float(per_head.max()),
                     "samples": int(n.max())}
    return out
