"""Compile-time planning of sequence parallelism: the row split, each site's cut per rank, and the bytes.

``make_sharding`` splits the grid; ``plan_attention`` decides how one site runs (halo exchange of a local
pattern, or all-gather for a dense site) and *checks* the cut of every rank with ``subrange_exact`` before
anything runs (the same check on every rank: a failure raises everywhere, never one rank alone).
``site_traffic`` counts the bytes one rank sends for a site, next to what all-gather, ring and Ulysses
attention would send.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..patterns.base import subrange_exact
from ..patterns.spec import SiteSpec
from .sharding import AttentionPlan, SequenceParallelError, Sharding, split_rows


def make_sharding(grid: tuple[int, ...], axis: int, world: int, group: str = "", rank: int = 0,
                  align: tuple[int, int] = (1, 0)) -> Sharding:
    """Rows of ``grid[axis]`` split over ``world`` ranks (at ``align = (unit, offset)`` boundaries when that keeps
    the load within 25%, see :func:`split_rows`); a group larger than the axis is an error."""
    if not -len(grid) <= axis < len(grid):
        raise SequenceParallelError(f"sequence_parallel: axis {axis} does not exist on the {len(grid)}-D token grid "
                                    f"{'x'.join(map(str, grid))}")
    axis %= len(grid)
    if world > grid[axis]:
        raise SequenceParallelError(
            f"sequence_parallel: the group has {world} ranks but axis {axis} of the token grid "
            f"{'x'.join(map(str, grid))} has only {grid[axis]} rows to shard; use a group of at most {grid[axis]} "
            f"ranks or another axis")
    return Sharding(tuple(grid), axis, split_rows(grid[axis], world, *align), group, rank)


def common_alignment(specs, ndim: int, axis: int) -> tuple[int, int]:
    """The ``Pattern.align`` every local head group of ``specs`` shares on ``axis`` (``(1, 0)`` if they differ)."""
    found = {g.pattern.align(axis % ndim, ndim) for spec in specs for g in spec.groups if g.pattern.local}
    return found.pop() if len(found) == 1 else (1, 0)


def _union_cut(spec: SiteSpec, sh: Sharding, r0: int, r1: int) -> tuple[int, int]:
    """One cut for every head group of a site (they share q, k, v): the union of their cuts, widened to the whole
    axis on a side where a group is not exact on the union (patterns anchored differently, rare)."""
    ndim, n = len(sh.grid), sh.grid[sh.axis]
    cuts = [g.pattern.halo(sh.axis, ndim, n, r0, r1) for g in spec.groups]
    e0, e1 = min(c[0] for c in cuts), max(c[1] for c in cuts)
    for cand in ((e0, e1), (0, e1), (e0, n), (0, n)):
        if all(not subrange_exact(g.pattern, sh.grid, sh.axis, *cand, r0, r1) for g in spec.groups):
            return cand
    return 0, n


def plan_attention(spec: SiteSpec, sh: Sharding, prefix: int, suffix: int, overlap: bool = False,
                   label: str = "") -> AttentionPlan | str:
    """The plan of one self-attention site whose tokens are ``[prefix][grid][suffix]``, or why it cannot run
    sharded. Local head groups exchange a halo, an all-dense site all-gathers k / v."""
    if any(not g.mechanism.is_softmax for g in spec.groups):
        kinds = sorted({g.mechanism.kind for g in spec.groups if not g.mechanism.is_softmax})
        return (f"a {'/'.join(kinds)} mechanism sums over every key of the site (a shard holds its halo only): "
                f"not sharded")
    if spec.is_dense:
        return AttentionPlan(sh, prefix, suffix, tuple((0, sh.grid[sh.axis]) for _ in sh.rows), dense=True,
                             label=label)
    if any(not g.pattern.local for g in spec.groups):
        return "the site mixes dense and local head groups (one would need every key, the other a halo)"
    if any(g.pattern.dynamic for g in spec.groups):
        return ("a dynamic pattern chooses key blocks from every query of a block (a shard's halo rows carry no "
                "queries): not sharded")
    layouts = {(g.layout.prefix, g.layout.suffix, g.layout.sinks) for g in spec.groups}
    if len(layouts) != 1:
        return "its head groups have different globals or sinks"
    lay = spec.groups[0].layout
    if (lay.prefix, lay.suffix) != (prefix, suffix):
        return (f"the site's globals (prefix {lay.prefix}, suffix {lay.suffix}) are not the tokens its inputs carry "
                f"around the grid (prefix {prefix}, suffix {suffix})")
    for g in spec.groups:
        grid = g.layout.grid if g.layout.grid is not None else (sh.n_grid,)
        if tuple(grid) != sh.grid:
            return (f"its grid {'x'.join(map(str, grid))} is not the sharded grid {'x'.join(map(str, sh.grid))} "
                    f"(every sharded site must share one grid)")
    sink_grid = max(0, lay.sinks - prefix)
    if sink_grid > sh.row_tokens:
        return (f"{sink_grid} sink tokens of the grid span more than the first row of axis {sh.axis} "
                f"({sh.row_tokens} tokens): only rank 0 could hold them all")
    ext, parts = [], []
    for r0, r1 in sh.rows:
        ext.append(_union_cut(spec, sh, r0, r1))
    for rank, (r0, r1) in enumerate(sh.rows):
        for g in spec.groups:  # the check sequence parallelism rests on, for every rank (no rank may differ)
            why = subrange_exact(g.pattern, sh.grid, sh.axis, *ext[rank], r0, r1)
            if why:
                raise SequenceParallelError(f"internal: the halo rule of {g.pattern.describe()} is not exact for rank "
                                            f"{rank} ({why}); please report")
        parts.append(_overlap_pieces(spec, sh, r0, r1, ext[rank]) if overlap and not (sink_grid and ext[rank][0])
                     else ())
    return AttentionPlan(sh, prefix, suffix, tuple(ext), sink_grid=sink_grid, parts=tuple(parts), label=label)


def _overlap_pieces(spec: SiteSpec, sh: Sharding, r0: int, r1: int, ext: tuple[int, int]):
    """``(q0, q1, a0, a1, after_halo)`` pieces: the interior rows (their cut inside ``[r0, r1)``) first, then the
    two boundary strips on their own cuts. ``()`` (one piece) when no row is interior."""
    cuts = {x: _union_cut(spec, sh, x, x + 1) for x in range(r0, r1)}
    inner = [x for x, (a0, a1) in cuts.items() if r0 <= a0 and a1 <= r1]
    if not inner:
        return ()
    i0, i1 = inner[0], inner[-1] + 1
    a0, a1 = _union_cut(spec, sh, i0, i1)
    if a0 < r0 or a1 > r1:
        return ()
    pieces = [(i0, i1, a0, a1, False)]
    for q0, q1 in ((r0, i0), (i1, r1)):
        if q0 < q1:
            pieces.append((q0, q1, *_union_cut(spec, sh, q0, q1), True))
    return tuple(pieces)


# ---------------------------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Traffic:
    """Bytes a rank sends for one site's forward (the backward mirrors it), by scheme."""

    halo: int            # this plan: halo rows (or all rows for a dense site) + the global queries' merge
    all_gather: int      # all-gather k / v
    ring: int            # ring attention: k / v passed P - 1 times
    ulysses: int | None  # all-to-all of q, k, v and out (None: heads not divisible by the group)
    halo_ranks: int      # how many ranks away the farthest rank a rank exchanges rows with is (1: neighbours)


def site_traffic(plan: AttentionPlan, batch: int, heads: int, kv_heads: int, head_dim: int, v_dim: int,
                 itemsize: int, rank: int | None = None) -> Traffic:
    """Bytes one rank sends (``rank``, or for each scheme the most any rank sends)."""
    sh = plan.sharding
    ranks = range(sh.world) if rank is None else [rank]
    kv = batch * kv_heads * (head_dim + v_dim) * itemsize          # one token of k and v
    qo = batch * heads * (head_dim + v_dim) * itemsize              # one token of q and out
    p = sh.world
    uly_ok = heads % p == 0 and (kv_heads % p == 0 or kv_heads < p)
    halo = max(plan.tokens_sent(r) * kv for r in ranks) + merge_bytes(plan, batch, heads, v_dim, itemsize)
    local = max(sh.local_tokens(r) for r in ranks)                   # globals are replicated: never sent
    hops = max([abs(s - r) for r in ranks for s in plan.peers(r)[0] + plan.peers(r)[1]], default=0)
    return Traffic(halo, (p - 1) * local * kv, (p - 1) * local * kv,
                   (p - 1) * local * (qo + kv) // p if uly_ok else None, hops)


def merge_bytes(plan: AttentionPlan, batch: int, heads: int, v_dim: int, itemsize: int) -> int:
    """Bytes a rank sends to merge the global queries (two ring all-reduces: the row max, then the weighted
    outputs with their weights, in the lse dtype)."""
    g = 0 if plan.dense else plan.prefix + plan.suffix
    if not g:
        return 0
    p, lse_item = plan.sharding.world, 8 if itemsize == 8 else 4
    return sum(2 * (p - 1) * n // p for n in (batch * heads * g * lse_item, batch * heads * g * (v_dim + 1) * lse_item))


def describe_plan(plan: AttentionPlan) -> str:
    """One line: the cut of each rank and whom it exchanges with."""
    if plan.dense:
        return f"dense: all-gather k/v over {plan.sharding.world} ranks"
    out = []
    for r, (r0, r1) in enumerate(plan.sharding.rows):
        e0, e1 = plan.ext[r]
        recv = plan.peers(r)[0]
        out.append(f"r{r} rows {r0}-{r1} halo -{r0 - e0}/+{e1 - r1}" + (f" from {recv}" if recv else ""))
    return "; ".join(out)
