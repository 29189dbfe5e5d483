"""Block plans: which key blocks each query block visits, derived analytically from a pattern.

Glossary
--------
slot        position in the kernel's blocked token order; ``slots[s]`` is a token index or -1 (padding)
BLOCK_M/N   query / key slots per block
tile        the spatial shape (in u-space, see :mod:`locattn.patterns.base`) of one grid block;
            ``prod(tile) <= BLOCK``. 1-D grids use ``tile = (BLOCK,)``: slots are the model's token order.
full block  every (query, key) pair of the block pair is allowed by the pattern and neither block has
            padding: no per-element mask and no masked load needed (the dK/dV kernel walks query blocks)
partial     some pairs are allowed, some not (or padding): the kernel evaluates the predicate

Layout of slots: ``[prefix globals][grid tiles, row-major over the tile grid][suffix globals]``, each part
padded to whole blocks. Queries of global blocks visit every key block; every query block visits the global
key blocks and the blocks holding attention sinks.

Cost: per axis O(n_axis * tile) work, then O(blocks visited) for the product over axes — never an S x S
mask. Measured at 2^20 tokens, 64 x 64 blocks (2-core machine at load 4.5): 2-D neighborhood 13x13 on 1024x1024
44 ms, 3-D 3x7x9 on 64x128x128 0.14 s, 1-D sliding window 512 1.3 s (its per-axis step is O(S x blocks per row
x BLOCK)); a dense plan lists all (S/64)^2 blocks (minutes at 2^20 tokens).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .base import Layout, Pattern, allowed, u_to_coord


@dataclass(frozen=True, eq=False)  # identity hash: plans are cached objects holding tensors
class BlockPlan:
    """CSR block plan. ``kv_idx[kv_ptr[m]:kv_ptr[m+1]]`` are the key blocks of query block ``m``.

    q_slots: [n_qblocks * block_m] int64 query rows (-1 = padding; token = row + q_offset); k_slots: key token
    indices likewise.
    kv_full: [nnz] bool. q_tile/k_tile: spatial tile shape of grid blocks (u-space), None for 1-D token order.
    """

    block_m: int
    block_n: int
    q_slots: torch.Tensor
    k_slots: torch.Tensor
    kv_ptr: torch.Tensor
    kv_idx: torch.Tensor
    kv_full: torch.Tensor
    q_tile: tuple[int, ...]
    k_tile: tuple[int, ...]
    #: query slots hold query *rows*; row r is token ``r + q_offset`` of the layout (0 unless the site's queries
    #: are the last S_q of S_k positions, see :func:`build_plan`)
    q_offset: int = 0

    @property
    def n_qblocks(self) -> int:
        return self.q_slots.numel() // self.block_m

    @property
    def n_kblocks(self) -> int:
        return self.k_slots.numel() // self.block_n

    @property
    def nnz(self) -> int:
        return self.kv_idx.numel()

    @property
    def n_full(self) -> int:
        return int(self.kv_full.sum())

    @property
    def max_kv_blocks(self) -> int:
        return int((self.kv_ptr[1:] - self.kv_ptr[:-1]).max()) if self.n_qblocks else 0

    @property
    def block_density(self) -> float:
        """Visited block pairs / all block pairs."""
        return self.nnz / max(1, self.n_qblocks * self.n_kblocks)

    def pairs(self) -> set[tuple[int, int, bool]]:
        """Set of ``(q_block, k_block, full)`` (tests and pictures)."""
        rows = torch.repeat_interleave(torch.arange(self.n_qblocks), self.kv_ptr[1:] - self.kv_ptr[:-1])
        return set(zip(rows.tolist(), self.kv_idx.tolist(), self.kv_full.tolist()))


def choose_tile(grid: tuple[int, ...], block: int, pattern: Pattern | None = None) -> tuple[int, ...]:
    """Spatial tile of ``block`` slots for ``grid``: powers of two grown round-robin from the last axis.

    ``tiled`` patterns whose tile has exactly ``block`` tokens use that tile (perfectly block-sparse).
    """
    if len(grid) == 1:
        return (block,)
    if pattern is not None and getattr(pattern, "name", "") == "tiled":
        t = pattern.axis_param("tile", len(grid))
        if math.prod(t) == block:
            return tuple(t)
    t = [1] * len(grid)
    grown = True
    while math.prod(t) < block and grown:
        grown = False
        for a in reversed(range(len(grid))):
            if math.prod(t) < block and t[a] < grid[a]:
                t[a] *= 2
                grown = True
    return tuple(t)


#: cost of a partial block relative to a full one in the tile search: on the H200 (benchmarks/RESULTS.md) the
#: Triton kernels compute partial blocks at about half the rate of full ones (na2d ~65 vs tiled2d ~127 TF/s)
PARTIAL_BLOCK_COST = 2.0


def _pow2_tiles(grid: tuple[int, ...], block: int) -> list[tuple[int, ...]]:
    """Power-of-two tiles of exactly ``block`` slots whose sides do not exceed the grid's (rounded up to a
    power of two)."""
    caps = [1 << max(0, (n - 1).bit_length()) for n in grid]
    out: list[tuple[int, ...]] = []

    def rec(prefix: tuple[int, ...], left: int):
        a = len(prefix)
        if a == len(grid):
            if left == 1:
                out.append(prefix)
            return
        t = 1
        while t <= min(left, caps[a]):
            rec(prefix + (t,), left // t)
            t *= 2

    rec((), block)
    return out


@functools.lru_cache(maxsize=1024)
def axis_bounds_u(pattern: Pattern, grid: tuple[int, ...], a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-axis relation every plan is derived from: the u-space key interval ``[lo, hi]`` of the query at
    each u-space position of axis ``a`` (``[n]`` each, cached). The block plan here and the CPU path's window
    schedule (:func:`locattn.codegen.cpu_fast.window_plan`) both start from it."""
    n = grid[a]
    lo, hi = pattern.axis_bounds(a, grid, u_to_coord(torch.arange(n), n, pattern.dilation_of(a, len(grid))))
    return lo, hi


def _axis_counts(pattern: Pattern, grid: tuple[int, ...], a: int, tq: int, tk: int) -> tuple[int, int]:
    """(touched, full) tile pairs of axis ``a`` for query tile ``tq`` and key tile ``tk``, in O(n).

    Per query tile, the key tiles from the one holding its smallest ``lo`` to the one holding its largest
    ``hi`` (equal to :func:`_axis_pairs`'s count when the tile's key intervals overlap or touch, as they do for
    every pattern here) and the full ones: key tiles inside every query's interval, without padding."""
    n = grid[a]
    lo, hi = axis_bounds_u(pattern, grid, a)
    nq = -(-n // tq)
    pad = nq * tq - n
    big = torch.iinfo(torch.long).max // 4
    lo_t = torch.cat([lo, torch.full((pad,), big)]).view(nq, tq)
    hi_t = torch.cat([hi, torch.full((pad,), -big)]).view(nq, tq)
    lo_min = lo_t.amin(1)
    hi_max = hi_t.amax(1)
    first = torch.div(lo_min.clamp(0, n - 1), tk, rounding_mode="floor")
    last = torch.div(hi_max.clamp(0, n - 1), tk, rounding_mode="floor")
    touched = torch.where((hi_max >= 0) & (lo_min <= n - 1) & (hi_max >= lo_min), last - first + 1, 0)
    # full: key tiles [ks, ks + tk) with ks >= max lo and ks + tk - 1 <= min hi, inside the axis (no padding),
    # for query tiles inside the axis (no padding either)
    lo_max = torch.cat([lo, torch.full((pad,), -big)]).view(nq, tq).amax(1)
    hi_min = torch.cat([hi, torch.full((pad,), big)]).view(nq, tq).amin(1)
    f_first = torch.div(lo_max.clamp_min(0) + tk - 1, tk, rounding_mode="floor")
    f_last = torch.minimum(torch.div(hi_min + 1, tk, rounding_mode="floor") - 1,
                           torch.tensor(n // tk - 1))
    full = (f_last - f_first + 1).clamp_min(0)
    if pad:
        full[-1] = 0
    return int(touched.sum()), int(full.sum())


def choose_tiles(pattern: Pattern, grid: tuple[int, ...], block_m: int, block_n: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Query and key tiles for a grid pattern: the pair of power-of-two tiles (``block_m`` / ``block_n`` slots)
    that minimises the plan's work, ``full blocks + PARTIAL_BLOCK_COST x partial blocks`` over the grid part.

    Cheap because the plan is a product over axes: the number of touched (full) block pairs is the product over
    axes of the per-axis touched (full) tile pairs (:func:`_axis_counts`, O(axis length) each). Ties keep
    :func:`choose_tile`'s choice. A ``tiled`` (STA) pattern gets a tile that divides its own tile whenever one
    exists: every block full, no key wasted. Falls back to :func:`choose_tile` when no tile of exactly
    ``block`` slots fits the grid.
    """
    base = choose_tile(grid, block_m, pattern), choose_tile(grid, block_n, pattern)
    cand_q, cand_k = _pow2_tiles(grid, block_m), _pow2_tiles(grid, block_n)
    if len(grid) == 1 or not cand_q or not cand_k:
        return base
    axis_cache: dict[tuple[int, int, int], tuple[int, int]] = {}

    def axis_counts(a: int, tq: int, tk: int) -> tuple[int, int]:
        key = (a, tq, tk)
        if key not in axis_cache:
            axis_cache[key] = _axis_counts(pattern, grid, a, tq, tk)
        return axis_cache[key]

    def cost(tq, tk) -> float:
        touched, full = 1, 1
        for a in range(len(grid)):
            t, f = axis_counts(a, tq[a], tk[a])
            touched, full = touched * t, full * f
        return full + PARTIAL_BLOCK_COST * (touched - full)

    best, best_cost = base, cost(*base) if base[0] in cand_q and base[1] in cand_k else math.inf
    for tq in cand_q:
        for tk in cand_k:
            c = cost(tq, tk)
            if c < best_cost:
                best, best_cost = (tq, tk), c
    return best


def _grid_slots(layout: Layout, pattern: Pattern, tile: tuple[int, ...], block: int) -> torch.Tensor:
    """Token index of every slot of the grid part: tiles row-major over the tile grid, padded to ``block``."""
    grid = layout.grid
    assert grid is not None
    ndim = len(grid)
    n_tiles = [-(-n // t) for n, t in zip(grid, tile)]
    # u-space coordinate of (tile index, offset in tile) per axis, then back to grid coordinates
    per_axis = []
    for a in range(ndim):
        u = torch.arange(n_tiles[a])[:, None] * tile[a] + torch.arange(tile[a])[None, :]  # [nt, t]
        valid = u < grid[a]
        c = u_to_coord(u.clamp_max(grid[a] - 1), grid[a], pattern.dilation_of(a, ndim))
        per_axis.append((c, valid))
    # broadcast to [nt_0, ..., nt_{d-1}, t_0, ..., t_{d-1}]
    shape = n_tiles + list(tile)
    tok = torch.zeros(shape, dtype=torch.long)
    valid = torch.ones(shape, dtype=torch.bool)
    stride = 1
    for a in reversed(range(ndim)):
        view = [1] * (2 * ndim)
        view[a], view[ndim + a] = n_tiles[a], tile[a]
        c, v = per_axis[a]
        tok = tok + c.view(view) * stride
        valid = valid & v.view(view)
        stride *= grid[a]
    tok = torch.where(valid, tok + layout.prefix, torch.full_like(tok, -1))
    tok = tok.reshape(math.prod(n_tiles), math.prod(tile))
    pad = block - tok.shape[1]
    if pad:
        tok = torch.cat([tok, torch.full((tok.shape[0], pad), -1, dtype=torch.long)], 1)
    return tok.reshape(-1)


def _pad_range(start: int, stop: int, block: int) -> torch.Tensor:
    n = stop - start
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    t = torch.arange(start, stop)
    pad = (-n) % block
    return torch.cat([t, torch.full((pad,), -1, dtype=torch.long)]) if pad else t


def _axis_pairs(pattern: Pattern, grid, a: int, tq: int, tk: int):
    """Per-axis block relation: for each query tile, the touched key tiles and whether each is full.

    Returns (idx [nq, m] int64, valid [nq, m] bool, full [nq, m] bool).
    """
    n = grid[a]
    ndim = len(grid)
    d = pattern.dilation_of(a, ndim)
    u = torch.arange(n)
    lo, hi = pattern.axis_bounds(a, grid, u_to_coord(u, n, d))  # u-space bounds of query at u
    nq, nk = -(-n // tq), -(-n // tk)
    qpad = nq * tq - n
    big = torch.iinfo(torch.long).max // 4
    lo_t = torch.cat([lo, torch.full((qpad,), big)]).view(nq, tq)   # padded queries touch nothing
    hi_t = torch.cat([hi, torch.full((qpad,), -big)]).view(nq, tq)
    valid_q = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(qpad, dtype=torch.bool)]).view(nq, tq)
    k_first = torch.div(lo_t.amin(1), tk, rounding_mode="floor").clamp(0, nk - 1)
    k_last = torch.div(hi_t.amax(1), tk, rounding_mode="floor").clamp(0, nk - 1)
    m = int((k_last - k_first).max()) + 1
    cand = k_first[:, None] + torch.arange(m)[None, :]                    # [nq, m]
    in_range = cand <= k_last[:, None]
    ks, ke = cand * tk, torch.minimum((cand + 1) * tk, torch.tensor(n)) - 1  # key tile u-range
    hit = (lo_t[:, None, :] <= ke[:, :, None]) & (hi_t[:, None, :] >= ks[:, :, None])  # [nq, m, tq]
    touched = hit.any(2) & in_range
    cover = (lo_t[:, None, :] <= ks[:, :, None]) & (hi_t[:, None, :] >= ke[:, :, None])
    full = cover.all(2) & valid_q.all(1)[:, None] & touched & ((cand + 1) * tk <= n)
    return cand, touched, full


@functools.lru_cache(maxsize=256)
def build_plan(pattern: Pattern, layout: Layout, s_q: int, s_k: int, block_m: int, block_n: int,
               causal: bool = False, q_offset: int = 0, tiles: tuple | None = None) -> BlockPlan:
    """Block plan of ``pattern`` on ``layout`` (resolved over the keys, or ignored for dense).

    ``causal``: the site's own ``is_causal`` (top-left aligned on query rows and key tokens, SDPA's convention):
    blocks entirely above the diagonal are dropped, blocks straddling it are partial.
    ``q_offset``: the queries are tokens ``q_offset .. q_offset + s_q - 1`` of the layout (a causal LM decoding
    with a KV cache: the last ``s_q`` of ``s_k`` positions); query blocks stay aligned to the layout's blocks
    (slots before ``q_offset`` are padding), so a query block holds the same tokens as at ``q_offset = 0``.
    Supported on 1-D layouts. ``tiles``: force the (query, key) spatial tiles instead of :func:`choose_tiles`.
    """
    if not pattern.local:
        return _dense_plan(s_q, s_k, block_m, block_n, causal)
    assert layout.grid is not None and layout.seq_len == s_k
    if q_offset or s_q != s_k:
        if len(layout.grid) != 1 or q_offset + s_q != s_k:
            raise ValueError(f"queries at an offset need a 1-D layout and q_offset + S_q == S_k, got grid "
                             f"{layout.grid}, q_offset {q_offset}, S_q {s_q}, S_k {s_k}")
        full = build_plan(pattern, layout, s_k, s_k, block_m, block_n, False, 0, tiles)
        return _offset_plan(full, s_q, q_offset, causal)
    grid = layout.grid
    ndim = len(grid)
    tq, tk = tiles if tiles is not None else choose_tiles(pattern, grid, block_m, block_n)

    # --- slots
    pre_q, pre_k = _pad_range(0, layout.prefix, block_m), _pad_range(0, layout.prefix, block_n)
    suf_lo = layout.prefix + layout.n_grid
    suf_q, suf_k = _pad_range(suf_lo, s_q, block_m), _pad_range(suf_lo, s_k, block_n)
    grid_q, grid_k = _grid_slots(layout, pattern, tq, block_m), _grid_slots(layout, pattern, tk, block_n)
    q_slots = torch.cat([pre_q, grid_q, suf_q])
    k_slots = torch.cat([pre_k, grid_k, suf_k])
    nq_pre, nk_pre = pre_q.numel() // block_m, pre_k.numel() // block_n
    nq_grid, nk_grid = grid_q.numel() // block_m, grid_k.numel() // block_n
    nq, nk = q_slots.numel() // block_m, k_slots.numel() // block_n
    k_has_pad = (k_slots.view(nk, block_n) < 0).any(1)

    # --- grid x grid: product of per-axis relations
    axes = [_axis_pairs(pattern, grid, a, tq[a], tk[a]) for a in range(ndim)]
    nqt = [ax[0].shape[0] for ax in axes]
    nkt = [-(-grid[a] // tk[a]) for a in range(ndim)]
    # query tile multi-index of each grid query block (row-major over the tile grid)
    qb = torch.arange(nq_grid)
    q_multi = []
    rem = qb
    for a in reversed(range(ndim)):
        q_multi.append(rem % nqt[a])
        rem = rem // nqt[a]
    q_multi = q_multi[::-1]
    kidx = torch.zeros(nq_grid, *[1] * ndim, dtype=torch.long)
    touched = torch.ones(nq_grid, *[1] * ndim, dtype=torch.bool)
    full = torch.ones(nq_grid, *[1] * ndim, dtype=torch.bool)
    stride = 1
    for a in reversed(range(ndim)):
        cand, t, f = (x[q_multi[a]] for x in axes[a])  # [nq_grid, m_a]
        view = [nq_grid] + [1] * ndim
        view[1 + a] = cand.shape[1]
        kidx = kidx + cand.view(view) * stride
        touched = touched & t.view(view)
        full = full & f.view(view)
        stride *= nkt[a]
    rows = (qb + nq_pre).view(-1, *[1] * ndim).expand_as(touched)
    rows, cols, fulls = rows[touched], kidx.expand_as(touched)[touched] + nk_pre, full.expand_as(touched)[touched]
    fulls = fulls & ~k_has_pad[cols]

    parts_r, parts_c = [rows], [cols]
    # --- global query blocks see every key block; every query block sees the global key blocks
    glob_q = torch.cat([torch.arange(nq_pre), torch.arange(nq_pre + nq_grid, nq)])
    glob_k = torch.cat([torch.arange(nk_pre), torch.arange(nk_pre + nk_grid, nk)])
    if glob_q.numel():
        parts_r.append(glob_q.repeat_interleave(nk))
        parts_c.append(torch.arange(nk).repeat(glob_q.numel()))
    if glob_k.numel():
        parts_r.append(torch.arange(nq).repeat_interleave(glob_k.numel()))
        parts_c.append(glob_k.repeat(nq))
    extra_full = [fulls]
    for r, c in zip(parts_r[1:], parts_c[1:]):
        extra_full.append(~k_has_pad[c])
    # --- sinks: key blocks holding tokens < sinks (grid part only; prefix sinks are already global)
    if layout.sinks > layout.prefix:
        sink_blocks = torch.unique(torch.nonzero((k_slots >= 0) & (k_slots < layout.sinks)).flatten() // block_n)
        sink_blocks = sink_blocks[(sink_blocks >= nk_pre) & (sink_blocks < nk_pre + nk_grid)]
        if sink_blocks.numel():
            parts_r.append(torch.arange(nq).repeat_interleave(sink_blocks.numel()))
            parts_c.append(sink_blocks.repeat(nq))
            # full iff every pair is allowed (sink or window) and the key block has no padding: evaluated
            # exactly, O(S * block_n * sink blocks)
            qs = q_slots.view(nq, block_m)
            ks = k_slots.view(nk, block_n)[sink_blocks]
            ok = allowed(pattern, layout, qs[:, None, :, None], ks[None, :, None, :])
            ok = ok | (qs < 0)[:, None, :, None]
            all_ok = ok.all(-1).all(-1) & (ks >= 0).all(1)[None, :]
            extra_full.append(all_ok.reshape(-1))
    rows, cols, fulls = torch.cat(parts_r), torch.cat(parts_c), torch.cat(extra_full)
    return _finish(rows, cols, fulls, q_slots, k_slots, block_m, block_n, tq, tk, causal)


def _dense_plan(s_q, s_k, block_m, block_n, causal) -> BlockPlan:
    q_slots, k_slots = _pad_range(0, s_q, block_m), _pad_range(0, s_k, block_n)
    nq, nk = q_slots.numel() // block_m, k_slots.numel() // block_n
    rows = torch.arange(nq).repeat_interleave(nk)
    cols = torch.arange(nk).repeat(nq)
    full = ~(k_slots.view(nk, block_n) < 0).any(1)[cols]
    return _finish(rows, cols, full, q_slots, k_slots, block_m, block_n, (block_m,), (block_n,), causal)


def _offset_plan(full: BlockPlan, s_q: int, q_offset: int, causal: bool) -> BlockPlan:
    """The plan of queries at tokens ``q_offset ..`` from the plan of every query (1-D): the query blocks that
    hold them, their slots turned into rows (earlier tokens are padding), full blocks re-checked."""
    nq = full.n_qblocks
    rows = full.q_slots - q_offset
    rows = torch.where((full.q_slots >= 0) & (rows >= 0), rows, -1)
    keep_blk = (rows.view(nq, full.block_m) >= 0).any(1)
    first = int(keep_blk.to(torch.int8).argmax()) if bool(keep_blk.any()) else nq
    q_slots = rows[first * full.block_m:]
    r = torch.repeat_interleave(torch.arange(nq), full.kv_ptr[1:] - full.kv_ptr[:-1])
    sel = r >= first
    return _finish(r[sel] - first, full.kv_idx[sel], full.kv_full[sel], q_slots, full.k_slots, full.block_m,
                   full.block_n, full.q_tile, full.k_tile, causal, q_offset)


def _finish(rows, cols, fulls, q_slots, k_slots, block_m, block_n, tq, tk, causal, q_offset: int = 0) -> BlockPlan:
    nq, nk = q_slots.numel() // block_m, k_slots.numel() // block_n
    fulls = fulls & ~(q_slots.view(nq, block_m) < 0).any(1)[rows]  # a full block has no padding query either
    if causal:
        big = torch.iinfo(torch.long).max
        qs, ks = q_slots.view(nq, block_m), k_slots.view(nk, block_n)
        q_min = torch.where(qs >= 0, qs, big).amin(1)
        q_max = qs.amax(1)
        k_min = torch.where(ks >= 0, ks, big).amin(1)
        k_max = ks.amax(1)
        keep = k_min[cols] <= q_max[rows]
        fulls = fulls & (k_max[cols] <= q_min[rows])
        rows, cols, fulls = rows[keep], cols[keep], fulls[keep]
    # union of duplicate (row, col) entries: full if any source says full; sort by (row, col)
    key = rows * nk + cols
    uniq, inv = torch.unique(key, return_inverse=True)
    full_u = torch.zeros(uniq.numel(), dtype=torch.int8).scatter_reduce_(0, inv, fulls.to(torch.int8), "amax").bool()
    r_u, c_u = uniq // nk, uniq % nk
    counts = torch.bincount(r_u, minlength=nq)
    kv_ptr = torch.zeros(nq + 1, dtype=torch.long)
    kv_ptr[1:] = torch.cumsum(counts, 0)
    return BlockPlan(block_m, block_n, q_slots, k_slots, kv_ptr, c_u.contiguous(), full_u.contiguous(),
                     tuple(tq), tuple(tk), q_offset)


def count_pairs(plan: BlockPlan, pattern: Pattern, layout: Layout, causal: bool) -> int:
    """Exact number of allowed (query, key) pairs, pattern & causal (site, on query rows), by walking the plan.

    Full blocks count their valid slots; partial blocks evaluate the predicate (cost O(partial blocks x
    BLOCK_M x BLOCK_N), chunked): a check of plans (tests); ``explain`` counts analytically
    (:func:`locattn.patterns.base.count_allowed`).
    """
    nq = plan.n_qblocks
    rows = torch.repeat_interleave(torch.arange(nq), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    qs = plan.q_slots.view(nq, plan.block_m)
    ks = plan.k_slots.view(plan.n_kblocks, plan.block_n)
    q_valid = (qs >= 0).sum(1)
    k_valid = (ks >= 0).sum(1)
    full = plan.kv_full
    total = int((q_valid[rows[full]] * k_valid[plan.kv_idx[full]]).sum())
    pr, pc = rows[~full], plan.kv_idx[~full]
    step = max(1, (1 << 22) // (plan.block_m * plan.block_n))
    for i in range(0, pr.numel(), step):
        qi = qs[pr[i:i + step]][:, :, None]
        kj = ks[pc[i:i + step]][:, None, :]
        ok = allowed(pattern, layout, qi.clamp_min(0) + plan.q_offset, kj.clamp_min(0)) & (qi >= 0) & (kj >= 0)
        if causal:
            ok = ok & (kj <= qi)
        total += int(ok.sum())
    return total
