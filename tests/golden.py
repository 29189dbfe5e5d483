"""Independent goldens: pattern masks written straight from their definitions (Python loops, no locattn code),
and plain fp64 masked attention. Slow on purpose; only for small sizes."""

from __future__ import annotations

import itertools
import math

import torch


def _axis_ok(kind, p, a, ci, cj, n):
    """Does query coordinate ci see key coordinate cj on axis a (length n)?"""
    get = lambda k, default=None: (p.get(k, default)[a] if isinstance(p.get(k, default), (list, tuple))
                                   else p.get(k, default))
    if kind == "sliding_window":
        w, d, causal = get("window"), get("dilation", 1), get("causal", False)
        return abs(ci - cj) <= w and (ci - cj) % d == 0 and (not causal or cj <= ci)
    if kind in ("neighborhood", "strided"):
        k, d, causal, s = get("kernel"), get("dilation", 1), get("causal", False), get("stride", 1)
        if ci % d != cj % d:
            return False
        group = [c for c in range(n) if c % d == ci % d]       # the query's dilation group, in order
        pi, pj, ng = group.index(ci), group.index(cj), len(group)
        if causal:
            leader = min((pi // s) * s + s - 1, ng - 1)
            return max(leader - k + 1, 0) <= pj <= pi
        leader = min((pi // s) * s + s // 2, ng - 1)
        start = min(max(leader - k // 2, 0), ng - k)
        return start <= pj < start + k
    if kind == "tiled":
        t, w = get("tile"), get("window")
        n_tiles = math.ceil(n / t)
        start = min(max(ci // t - w // 2, 0), n_tiles - w)
        return start <= cj // t < start + w
    if kind == "shifted_window":
        w, s = get("window"), get("shift", 0)
        return (ci - s) // w == (cj - s) // w
    raise ValueError(kind)


def golden_mask(kind: str, params: dict, grid, s: int, prefix=0, suffix=0, sinks=0) -> torch.Tensor:
    """[S, S] bool mask of a pattern from its written definition."""
    if kind == "dense":
        return torch.ones(s, s, dtype=torch.bool)
    coords = torch.tensor(list(itertools.product(*[range(n) for n in grid])))  # [n_grid, ndim], row-major
    n_grid = coords.shape[0]
    assert prefix + n_grid + suffix == s
    # per axis, the [n, n] relation from the definition; the grid relation is their AND (loops stay O(n^2))
    g = torch.ones(n_grid, n_grid, dtype=torch.bool)
    for a, n in enumerate(grid):
        rel = torch.tensor([[_axis_ok(kind, params, a, ci, cj, n) for cj in range(n)] for ci in range(n)])
        g &= rel[coords[:, a][:, None], coords[:, a][None, :]]
    m = torch.ones(s, s, dtype=torch.bool)
    m[prefix:prefix + n_grid, prefix:prefix + n_grid] = g
    m[:, :sinks] = True
    return m


def golden_attention(q, k, v, allowed, scale, bias=None):
    """fp64 masked attention; rows with no allowed key give 0. q [B,H,Sq,D], k/v [B,Hk,Sk,*] (GQA repeated)."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, 1)
    v = v.double().repeat_interleave(rep, 1)
    s = q.double() @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = allowed.expand_as(s)
    has_key = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)  # empty rows: finite, zeroed below
    p = torch.softmax(s, -1) * has_key
    return p @ v
