"""Halo rules of every pattern (``Pattern.halo``): the cut grid reproduces each local query's key set exactly.

Single process, no communication: the rules are checked against :func:`subrange_exact` on random cases, the
checker is shown to catch a wrong cut, and the op itself run on a cut grid (globals included) equals the rows
of the whole-grid result, as sequence parallelism uses it.
"""

import random

import pytest
import torch

from locattn.patterns import (Dense, Layout, Neighborhood, PatternError, ShiftedWindow, SlidingWindow, Strided,
                              Tiled)
from locattn.patterns.base import fit_range, subrange_exact
from locattn.patterns.spec import HeadGroup, SiteSpec


def _random_pattern(rng: random.Random, ndim: int):
    ax = lambda lo, hi: tuple(rng.randint(lo, hi) for _ in range(ndim))
    causal = tuple(rng.random() < 0.3 for _ in range(ndim))
    kind = rng.choice(["sliding_window", "neighborhood", "strided", "tiled", "shifted_window"])
    if kind == "sliding_window":
        return SlidingWindow(window=ax(0, 7), dilation=ax(1, 3), causal=causal)
    if kind == "neighborhood":
        return Neighborhood(kernel=ax(1, 7), dilation=ax(1, 3), causal=causal)
    if kind == "strided":
        k = ax(1, 7)
        return Strided(kernel=k, stride=tuple(rng.randint(1, x) for x in k), dilation=ax(1, 3), causal=causal)
    if kind == "tiled":
        return Tiled(tile=ax(1, 5), window=ax(1, 4))
    w = ax(1, 7)
    return ShiftedWindow(window=w, shift=tuple(rng.randint(0, x - 1) for x in w))


@pytest.mark.parametrize("seed", range(3))
def test_halo_rules_are_exact_on_random_cuts(seed):
    rng = random.Random(seed)
    done = 0
    while done < 700:
        ndim = rng.choice([1, 2, 3])
        grid = tuple(rng.randint(1, {1: 48, 2: 20, 3: 12}[ndim]) for _ in range(ndim))
        pattern = _random_pattern(rng, ndim)
        try:
            pattern.validate(grid)
        except PatternError:
            continue
        axis = rng.randrange(ndim)
        n = grid[axis]
        r0 = rng.randrange(n)
        r1 = rng.randint(r0 + 1, n)
        e0, e1 = pattern.halo(axis, ndim, n, r0, r1)
        assert subrange_exact(pattern, grid, axis, e0, e1, r0, r1) == ""
        left, right = pattern.reach(axis, ndim)
        assert left >= 0 and right >= 0
        done += 1


def test_dense_halo_is_the_whole_axis():
    assert Dense().reach(0, 1) is None
    assert Dense().halo(0, 1, 17, 5, 9) == (0, 17)


@pytest.mark.parametrize("pattern, cut", [
    (Tiled(tile=3, window=3), lambda e0, e1: (e0 + 1, e1)),            # a cut off the tile boundary
    (SlidingWindow(window=3), lambda e0, e1: (e0 + 1, e1)),            # a halo one short
    (Strided(kernel=4, stride=2), lambda e0, e1: (e0 + 1, e1)),        # off the stride groups
    (Neighborhood(kernel=5, dilation=2), lambda e0, e1: (e0, e1 - 1)),
    (ShiftedWindow(window=4, shift=1), lambda e0, e1: (e0 + 1, e1)),
])
def test_the_checker_catches_a_wrong_cut(pattern, cut):
    n, r0, r1 = 30, 12, 17
    e0, e1 = pattern.halo(0, 1, n, r0, r1)
    assert subrange_exact(pattern, (n,), 0, e0, e1, r0, r1) == ""
    assert "sees" in subrange_exact(pattern, (n,), 0, *cut(e0, e1), r0, r1)


def test_shifted_window_moves_its_anchor_on_a_cut():
    p = ShiftedWindow(window=4, shift=1)
    assert p.halo(0, 1, 20, 6, 9) == (5, 9)
    assert p.on_subrange(0, 1, 5).shift == (0,)
    assert p.on_subrange(0, 1, 0).shift == (1,)


def test_fit_range_widens_to_the_minimum():
    assert fit_range(10, 8, 12, min_len=5) == (5, 10)
    assert fit_range(10, -3, 2, min_len=5) == (0, 5)
    assert fit_range(10, 3, 7, 3, 4, end_from_border=False) == (3, 8)


@pytest.mark.parametrize("pattern, grid, axis, rows, globals_", [
    (Neighborhood(kernel=(3, 5), dilation=(2, 1)), (13, 9), 0, (4, 8), (2, 3)),
    (Tiled(tile=(2, 3), window=(3, 2)), (11, 8), 1, (3, 5), (0, 4)),
    (Strided(kernel=(5, 3, 3), stride=(2, 1, 3), causal=(True, False, False)), (12, 4, 5), 0, (5, 9), (1, 0)),
    (ShiftedWindow(window=(4, 3), shift=(2, 1)), (10, 7), 0, (3, 6), (0, 0)),
    (SlidingWindow(window=6, dilation=2, causal=True), (41,), 0, (17, 29), (0, 0)),
])
def test_the_op_on_a_cut_grid_equals_the_whole_grid_rows(pattern, grid, axis, rows, globals_):
    """The hint sequence parallelism builds on: rows [r0, r1) of the whole-grid result equal the same rows of the
    op run on the grid cut to ``pattern.halo``, with the globals kept."""
    torch.manual_seed(0)
    prefix, suffix = globals_
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix)
    s = layout.seq_len
    q, k, v = (torch.randn(1, 2, s, 8, dtype=torch.float64) for _ in range(3))
    full, _ = torch.ops.locattn.attention(q, k, v, None, None, 0.3, False,
                                          SiteSpec((HeadGroup(None, pattern, layout),)).to_json(), "reference")
    r0, r1 = rows
    e0, e1 = pattern.halo(axis, len(grid), grid[axis], r0, r1)
    cut_grid = grid[:axis] + (e1 - e0,) + grid[axis + 1:]

    def cut(t, lo, hi, g):
        body = t[:, :, prefix:prefix + g_numel(g)].unflatten(2, g).narrow(2 + axis, lo, hi - lo).flatten(2, 1 + len(g))
        return torch.cat([t[:, :, :prefix], body, t[:, :, s - suffix:]], 2)

    def g_numel(g):
        out = 1
        for x in g:
            out *= x
        return out

    sub = pattern.on_subrange(axis, len(grid), e0)
    spec = SiteSpec((HeadGroup(None, sub, Layout(grid=cut_grid, prefix=prefix, suffix=suffix)),)).to_json()
    part, _ = torch.ops.locattn.attention(cut(q, e0, e1, grid), cut(k, e0, e1, grid), cut(v, e0, e1, grid), None,
                                          None, 0.3, False, spec, "reference")
    mine = cut(part, r0 - e0, r1 - e0, cut_grid)
    want = cut(full, r0, r1, grid)
    n_body = want.shape[2] - prefix - suffix
    torch.testing.assert_close(mine[:, :, prefix:prefix + n_body], want[:, :, prefix:prefix + n_body])
