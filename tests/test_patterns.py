"""Pattern library: predicate == written definitions, analytic plans == brute force, exact counts."""

import random

import pytest
import torch

from golden import golden_mask
from locattn.patterns import (PATTERNS, Dense, Layout, Neighborhood, PatternError, ShiftedWindow, SlidingWindow,
                              Strided, Tiled, count_allowed, dense_mask)
from locattn.patterns.plan import build_plan, choose_tile, choose_tiles, count_pairs


def _random_case(rng: random.Random):
    ndim = rng.choice([1, 2, 3])
    grid = tuple(rng.randint(2, {1: 60, 2: 12, 3: 7}[ndim]) for _ in range(ndim))
    kind = rng.choice(sorted(k for k, c in PATTERNS.items() if not c.dynamic))  # static patterns
    ax = lambda lo, hi: tuple(rng.randint(lo, hi) for _ in range(ndim))
    causal = tuple(rng.random() < 0.3 for _ in range(ndim))
    if kind == "dense":
        params = {}
    elif kind == "sliding_window":
        params = dict(window=ax(0, 4), dilation=ax(1, 2), causal=causal)
    elif kind == "neighborhood":
        params = dict(kernel=ax(1, 4), dilation=ax(1, 2), causal=causal)
    elif kind == "strided":
        k = ax(1, 4)
        params = dict(kernel=k, stride=tuple(rng.randint(1, x) for x in k), dilation=ax(1, 2), causal=causal)
    elif kind == "tiled":
        params = dict(tile=ax(1, 4), window=ax(1, 3))
    else:
        w = ax(1, 5)
        params = dict(window=w, shift=tuple(rng.randint(0, x - 1) for x in w))
    layout = Layout(grid=grid, prefix=rng.choice([0, 0, 3]), suffix=rng.choice([0, 0, 5]),
                    sinks=rng.choice([0, 0, 2, 7]))
    return kind, params, layout


def _brute_plan(plan, mask, causal):
    qs, ks = plan.q_slots.view(plan.n_qblocks, -1), plan.k_slots.view(plan.n_kblocks, -1)
    out = set()
    for m in range(plan.n_qblocks):
        for n in range(plan.n_kblocks):
            q, k = qs[m][qs[m] >= 0], ks[n][ks[n] >= 0]
            if len(q) == 0 or len(k) == 0:
                continue
            sub = mask[q][:, k]
            if causal:
                sub = sub & (k[None, :] <= q[:, None])
            if sub.any():
                out.add((m, n, bool(sub.all()) and len(k) == plan.block_n and len(q) == plan.block_m))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_predicate_plan_and_count_match_brute_force(seed):
    rng = random.Random(seed)
    done = 0
    while done < 40:
        kind, params, layout = _random_case(rng)
        pattern = PATTERNS[kind](**params)
        try:
            pattern.validate(layout.grid)
        except PatternError:
            continue
        done += 1
        s = layout.seq_len
        gold = golden_mask(kind, params, layout.grid, s, layout.prefix, layout.suffix, layout.sinks)
        mask = dense_mask(pattern, layout, s, s)
        assert torch.equal(mask, gold), (kind, params, layout)
        assert count_allowed(pattern, layout, s, s) == int(gold.sum())
        bm, bn = rng.choice([(4, 4), (8, 4), (16, 16), (4, 8)])
        causal = rng.random() < 0.25
        plan = build_plan(pattern, layout, s, s, bm, bn, causal)
        got, exp = plan.pairs(), _brute_plan(plan, gold, causal)
        if causal:  # causal is combined per block: may visit blocks with no pair, never misses one
            assert {(a, b) for a, b, _ in exp} <= {(a, b) for a, b, _ in got}
            assert all((a, b, True) in exp for a, b, f in got if f), "a block marked full is not full"
        else:
            assert got == exp, (kind, params, layout, bm, bn)
        ref = gold & torch.ones(s, s, dtype=torch.bool).tril() if causal else gold
        assert count_pairs(plan, pattern, layout, causal) == int(ref.sum())
        # every token appears exactly once in the slot tables
        assert sorted(plan.q_slots[plan.q_slots >= 0].tolist()) == list(range(s))


@pytest.mark.parametrize("grid", [(84, 19), (5, 13, 11)], ids=["84x19", "5x13x11"])
def test_plan_non_divisible_grids(grid):
    dilation = (2,) + (1,) * (len(grid) - 1)
    pattern = Neighborhood(kernel=tuple(min(5, n // d) for n, d in zip(grid, dilation)), dilation=dilation)
    pattern.validate(grid)
    layout = Layout(grid=grid, prefix=7)
    s = layout.seq_len
    plan = build_plan(pattern, layout, s, s, 32, 32, False)
    gold = golden_mask("neighborhood", {"kernel": pattern.kernel, "dilation": pattern.dilation}, grid, s, prefix=7)
    assert plan.pairs() == _brute_plan(plan, gold, False)


def test_neighborhood_natten_hand_checked():
    # 1-D, n=6, kernel 3: border queries see shifted windows
    m = dense_mask(Neighborhood(kernel=3), Layout(grid=(6,)), 6, 6)
    assert [torch.nonzero(r).flatten().tolist() for r in m] == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4],
                                                                [3, 4, 5], [3, 4, 5]]
    # dilation 2 on n=7: groups {0,2,4,6} and {1,3,5}
    m = dense_mask(Neighborhood(kernel=3, dilation=2), Layout(grid=(7,)), 7, 7)
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 2, 4]
    assert torch.nonzero(m[6]).flatten().tolist() == [2, 4, 6]
    assert torch.nonzero(m[3]).flatten().tolist() == [1, 3, 5]
    # causal: the k positions ending at the query, clipped at 0
    m = dense_mask(Neighborhood(kernel=3, causal=True), Layout(grid=(5,)), 5, 5)
    assert torch.nonzero(m[0]).flatten().tolist() == [0]
    assert torch.nonzero(m[4]).flatten().tolist() == [2, 3, 4]
    # 2-D: every query sees exactly prod(kernel) keys
    m = dense_mask(Neighborhood(kernel=(3, 5)), Layout(grid=(7, 9)), 63, 63)
    assert (m.sum(1) == 15).all()
    # strided: stride = kernel is blocked attention
    m = dense_mask(Strided(kernel=3, stride=3), Layout(grid=(9,)), 9, 9)
    blocks = torch.block_diag(*[torch.ones(3, 3, dtype=torch.bool)] * 3)
    assert torch.equal(m, blocks)
    # strided stride 1 == neighborhood
    assert torch.equal(dense_mask(Strided(kernel=(3, 3), stride=1), Layout(grid=(5, 6)), 30, 30),
                       dense_mask(Neighborhood(kernel=(3, 3)), Layout(grid=(5, 6)), 30, 30))


def test_shifted_window_is_swin():
    # windows {0,1} {2..5} {6..9} for n=10, window 4, shift 2
    m = dense_mask(ShiftedWindow(window=4, shift=2), Layout(grid=(10,)), 10, 10)
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 1]
    assert torch.nonzero(m[5]).flatten().tolist() == [2, 3, 4, 5]
    assert torch.nonzero(m[9]).flatten().tolist() == [6, 7, 8, 9]


def test_tiled_is_block_sparse_when_tile_is_block():
    pattern = Tiled(tile=(4, 4), window=(3, 3))
    layout = Layout(grid=(16, 16))
    assert choose_tile(layout.grid, 16, pattern) == (4, 4)
    plan = build_plan(pattern, layout, 256, 256, 16, 16, False)
    assert plan.n_full == plan.nnz  # no partial block at all


def test_tile_search_makes_sta_subtiles_exact():
    """An STA tile larger than the block: the search picks a sub-tile, so every block is full and no
    computed entry is wasted (the generic power-of-two tile spans two frames: partial blocks)."""
    import math

    pattern = Tiled(tile=(1, 8, 8), window=(1, 1, 3))
    layout = Layout(grid=(2, 8, 24))
    pattern.validate(layout.grid)
    s = math.prod(layout.grid)
    assert choose_tile(layout.grid, 16, pattern) == (2, 2, 4)  # generic: spans two frames, partial blocks
    tq, tk = choose_tiles(pattern, layout.grid, 16, 16)
    assert all(t % q == 0 and t % k == 0 for t, q, k in zip((1, 8, 8), tq, tk))  # sub-tiles of the STA tile
    plan = build_plan(pattern, layout.resolve(s), s, s, 16, 16, False)
    assert plan.n_full == plan.nnz
    assert plan.nnz * 16 * 16 == count_allowed(pattern, layout.resolve(s), s, s)


@pytest.mark.parametrize("pattern,grid,bm,bn", [
    (Neighborhood(kernel=(5, 7)), (24, 40), 64, 32),
    (Neighborhood(kernel=(3, 5, 5), dilation=(1, 2, 1)), (6, 20, 12), 32, 32),
    (Strided(kernel=(5, 5), stride=(2, 3)), (18, 30), 32, 16),
    (Tiled(tile=(2, 8, 8), window=(3, 3, 5)), (6, 24, 40), 64, 32),
])
def test_tile_search_cost_is_exact_and_no_worse(pattern, grid, bm, bn):
    """The search's per-axis product formula equals the real plan's block counts, its O(n) per-axis counts equal
    the exact per-axis relation, and its choice costs no more than choose_tile's default (full +
    PARTIAL_BLOCK_COST x partial, measured on the built plans)."""
    import math

    import locattn.patterns.plan as plan_mod

    pattern.validate(grid)
    layout = Layout(grid=grid).resolve(math.prod(grid))
    s = math.prod(grid)

    def plan_cost(tiles):
        orig = plan_mod.choose_tiles
        plan_mod.choose_tiles = lambda *a: tiles
        try:
            plan = build_plan.__wrapped__(pattern, layout, s, s, bm, bn, False)
        finally:
            plan_mod.choose_tiles = orig
        partial = plan.nnz - plan.n_full
        return plan.n_full + plan_mod.PARTIAL_BLOCK_COST * partial, plan

    base = (choose_tile(grid, bm, pattern), choose_tile(grid, bn, pattern))
    best = choose_tiles(pattern, grid, bm, bn)
    c_best, plan = plan_cost(best)
    c_base, _ = plan_cost(base)
    assert c_best <= c_base
    # the product formula (per-axis touched tile pairs) is the plan's block count
    touched = 1
    for a in range(len(grid)):
        touched *= int(plan_mod._axis_pairs(pattern, grid, a, best[0][a], best[1][a])[1].sum())
    assert touched == plan.nnz
    # the search's O(n) per-axis counts equal the exact per-axis relation for every tile pair it considers
    for a in range(len(grid)):
        for tq in {t[a] for t in plan_mod._pow2_tiles(grid, bm)}:
            for tk in {t[a] for t in plan_mod._pow2_tiles(grid, bn)}:
                _, t_exact, f_exact = plan_mod._axis_pairs(pattern, grid, a, tq, tk)
                assert plan_mod._axis_counts(pattern, grid, a, tq, tk) == (int(t_exact.sum()),
                                                                           int(f_exact.sum())), (a, tq, tk)


def test_validation_errors():
    with pytest.raises(PatternError, match="exceeds the axis size"):
        Neighborhood(kernel=(3, 9)).validate((5, 7))
    with pytest.raises(PatternError, match="2 entries but the grid has 3 axes"):
        SlidingWindow(window=(1, 2)).validate((3, 4, 5))
    with pytest.raises(PatternError, match="stride 4 on axis 0 exceeds the kernel 3"):
        Strided(kernel=3, stride=4).validate((10,))
    with pytest.raises(PatternError, match="but the sequence has 50 tokens"):
        Layout(grid=(6, 8), prefix=1).resolve(50)


def test_dense_plan_cross_attention():
    plan = build_plan(Dense(), Layout(), 70, 30, 16, 16, False)
    assert plan.n_qblocks == 5 and plan.n_kblocks == 2 and plan.nnz == 10
