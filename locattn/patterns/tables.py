"""Block tables per (batch, head), on the device: the plan's currency that every implementation walks.

A static pattern's :class:`~locattn.patterns.plan.BlockPlan` is derived analytically once per (pattern,
layout, length) on the host; its tables are shared by every batch element and head (``X = 1``: stride 0 over
batch and head, no per-head memory). A ``dynamic`` pattern (:mod:`locattn.patterns.dynamic`) chooses key
blocks per (batch, head) on every call: its tables (``X = B * H``) are written on the device from the selection
and its static part's plan, with fixed shapes (no host synchronisation) and never an S x S tensor.

Glossary
--------
X            tables in the batch: 1 (shared), H (per head) or B * H (per batch and head); table ``x`` of
             (batch b, head h) is ``b * stride_b + h * stride_h`` (:meth:`BlockTables.strides`)
row          a query block of the plan; its entries are key blocks, full ones first, each part ascending
full         every (query, key) pair of the block pair is allowed and neither block has padding: no test
partial      the kernel tests the pairs: the static pattern's predicate, OR, for a ``whole`` entry, the
             dynamic selection's (every pair of the block pair, subject to the pattern's ``causal``)
CAP          capacity of one table's entries (a static upper bound, so shapes never depend on the data)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plan import BlockPlan


@dataclass(frozen=True, eq=False)
class BlockTables:
    """CSR block tables over ``X`` tables, on one device.

    kv_ptr: [X, NQ + 1] int64; kv_split: [X, NQ]; kv_idx: [X, CAP] int64 key block ids. Row m of table x visits
    ``kv_idx[x, kv_ptr[x, m]:kv_split[x, m]]`` (full) then ``kv_idx[x, kv_split[x, m]:kv_ptr[x, m + 1]]``
    (partial). kv_whole: [X, CAP] bool (None when no entry is whole): partial entries the dynamic selection
    keeps entirely. qb_ptr / qb_split / qb_idx / qb_whole: the transpose (query blocks of each key block).
    ``per``: ``"shared"``, ``"head"`` or ``"batch_head"`` (see the glossary)."""

    plan: BlockPlan
    kv_ptr: torch.Tensor
    kv_split: torch.Tensor
    kv_idx: torch.Tensor
    kv_whole: torch.Tensor | None
    qb_ptr: torch.Tensor
    qb_split: torch.Tensor
    qb_idx: torch.Tensor
    qb_whole: torch.Tensor | None
    per: str = "shared"
    #: [X] int64 allowed (query, key) pairs per table, pattern & site causal (dynamic tables; None otherwise)
    pairs: torch.Tensor | None = None

    @property
    def n_tables(self) -> int:
        return self.kv_ptr.shape[0]

    def strides(self, heads: int) -> tuple[int, int]:
        """(stride over batch, stride over heads) of the table index."""
        return {"shared": (0, 0), "head": (0, 1), "batch_head": (heads, 1)}[self.per]

    def table_of(self, b: int, h: int, heads: int) -> int:
        sb, sh = self.strides(heads)
        return b * sb + h * sh


# ----------------------------------------------------------------------------------------------------------
# static tables: one per plan, shared by every (batch, head)


def _csr_full_first(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, n_rows: int, n_cols: int):
    """CSR of (rows, cols) with each row's full entries first, each part ascending: (ptr, split, idx)."""
    key = (rows * 2 + (~full).long()) * n_cols + cols
    order = torch.argsort(key)
    ptr = torch.zeros(n_rows + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    split = ptr[:-1] + torch.bincount(rows[full], minlength=n_rows)
    return ptr, split, cols[order]


@functools.lru_cache(maxsize=128)
def static_tables(plan: BlockPlan, device: torch.device) -> BlockTables:
    """The tables of a static plan (``X = 1``), on ``device``."""
    nq, nk = plan.n_qblocks, plan.n_kblocks
    rows = torch.repeat_interleave(torch.arange(nq), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    kv = _csr_full_first(rows, plan.kv_idx, plan.kv_full, nq, nk)
    qb = _csr_full_first(plan.kv_idx, rows, plan.kv_full, nk, nq)
    d = lambda t: t.to(device)[None]
    return BlockTables(plan, *map(d, kv), None, *map(d, qb), None, "shared")


# ----------------------------------------------------------------------------------------------------------
# dynamic tables: written on the device from a selection


@dataclass(frozen=True, eq=False)
class _BlockFacts:
    """Per plan block (device tensors): the pooling block it holds (-1: global / padding block), token and row
    ranges, and whether it has padding slots."""

    q_blk: torch.Tensor
    k_blk: torch.Tensor
    q_tok_min: torch.Tensor
    q_tok_max: torch.Tensor
    q_row_min: torch.Tensor
    q_row_max: torch.Tensor
    q_pad: torch.Tensor
    k_tok_min: torch.Tensor
    k_tok_max: torch.Tensor
    k_pad: torch.Tensor
    static_full: torch.Tensor     # [NQ, NK] bool
    static_any: torch.Tensor      # [NQ, NK] bool
    # exact pair counts (explain's measured density): valid pairs of every block pair, the static part's allowed
    # pairs of its entries, and of the block pairs a selection keeps only partly (causal diagonals), the union's
    pairs_valid: torch.Tensor     # [NQ, NK] int64
    pairs_static: torch.Tensor    # [NQ, NK] int64
    straddle: torch.Tensor        # [NQ, NK] bool
    pairs_union: torch.Tensor     # [NQ, NK] int64 (where straddle)


def _tile_pairs(pattern, layout, q_offset: int, qs, ks, causal: bool, site_causal: bool, whole: bool):
    """Allowed pairs of block pairs (query rows ``qs [E, BM]``, key tokens ``ks [E, BN]``): the static part
    (``pattern``), OR'd with every pair (``whole``, subject to the dynamic ``causal``); site causal on rows."""
    from .base import allowed  # noqa: PLC0415

    out = torch.zeros(qs.shape[0], dtype=torch.long)
    step = max(1, (1 << 22) // max(1, qs.shape[1] * ks.shape[1]))
    for i in range(0, qs.shape[0], step):
        qi, kj = qs[i:i + step, :, None], ks[i:i + step, None, :]
        tq = qi.clamp_min(0) + q_offset
        ok = allowed(pattern, layout, tq, kj.clamp_min(0))
        if whole:
            ok = ok | ((kj <= tq) if causal else torch.ones_like(ok))
        if site_causal:
            ok = ok & (kj <= qi)
        out[i:i + step] = (ok & (qi >= 0) & (kj >= 0)).sum((1, 2))
    return out


@functools.lru_cache(maxsize=64)
def _block_facts(plan: BlockPlan, token_block: torch.Tensor, static, layout, causal: bool, site_causal: bool,
                 device: torch.device) -> _BlockFacts:
    big = torch.iinfo(torch.long).max
    nq, nk = plan.n_qblocks, plan.n_kblocks
    qs, ks = plan.q_slots.view(nq, plan.block_m), plan.k_slots.view(nk, plan.block_n)
    qt = torch.where(qs >= 0, qs + plan.q_offset, -1)

    def blk(tok):
        b = token_block[tok.clamp_min(0)]
        b = torch.where(tok >= 0, b, -1)
        return b.amax(1)  # every real token of a grid block is in the same pooling block

    def rng(t):
        return torch.where(t >= 0, t, big).amin(1), t.amax(1)

    rows = torch.repeat_interleave(torch.arange(nq), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    s_full = torch.zeros(nq, nk, dtype=torch.bool)
    s_any = torch.zeros(nq, nk, dtype=torch.bool)
    s_any[rows, plan.kv_idx] = True
    s_full[rows, plan.kv_idx] = plan.kv_full
    q_blk, k_blk = blk(qt), blk(ks)
    (qt_lo, qt_hi), (qr_lo, qr_hi), (kt_lo, kt_hi) = rng(qt), rng(qs), rng(ks)
    valid = (qs >= 0).sum(1)[:, None] * (ks >= 0).sum(1)[None, :]
    pairs_static = torch.where(s_full, valid, 0)
    part = s_any & ~s_full
    r, c = torch.nonzero(part, as_tuple=True)
    pairs_static[r, c] = _tile_pairs(static, layout, plan.q_offset, qs[r], ks[c], causal, site_causal, False)
    # block pairs a selection would keep only partly: causal diagonals between grid blocks
    straddle = torch.zeros(nq, nk, dtype=torch.bool)
    if causal:
        straddle |= kt_hi[None, :] > qt_lo[:, None]
    if site_causal:
        straddle |= kt_hi[None, :] > qr_lo[:, None]
    straddle &= (q_blk >= 0)[:, None] & (k_blk >= 0)[None, :]
    if causal:
        straddle &= kt_lo[None, :] <= qt_hi[:, None]
    if site_causal:
        straddle &= kt_lo[None, :] <= qr_hi[:, None]
    pairs_union = torch.zeros(nq, nk, dtype=torch.long)
    r, c = torch.nonzero(straddle, as_tuple=True)
    pairs_union[r, c] = _tile_pairs(static, layout, plan.q_offset, qs[r], ks[c], causal, site_causal, True)
    d = lambda t: t.to(device)
    return _BlockFacts(d(q_blk), d(k_blk), d(qt_lo), d(qt_hi), d(qr_lo), d(qr_hi), d((qs < 0).any(1)), d(kt_lo),
                       d(kt_hi), d((ks < 0).any(1)), d(s_full), d(s_any), d(valid), d(pairs_static), d(straddle),
                       d(pairs_union))


def _compact(full: torch.Tensor, any_: torch.Tensor, whole: torch.Tensor):
    """Rows of dense block relations ``[X, R, C]`` (bool) as CSR: full first, each part ascending.
    Fixed shapes: capacity ``R * C`` per table, no host synchronisation."""
    x, r, c = any_.shape
    dev = any_.device
    col = torch.arange(c, device=dev)
    rank = torch.where(full, 0, torch.where(any_, 1, 2))
    key = rank * c + col                                                  # [X, R, C]
    skey, order = torch.sort(key, -1)
    n_tot = any_.sum(-1)                                                  # [X, R]
    n_full = full.sum(-1)
    ptr = torch.zeros(x, r + 1, dtype=torch.long, device=dev)
    ptr[:, 1:] = torch.cumsum(n_tot, -1)
    split = ptr[:, :-1] + n_full
    pos = ptr[:, :-1, None] + torch.arange(c, device=dev)                 # destination of sorted entry j
    ok = torch.arange(c, device=dev) < n_tot[..., None]
    dump = r * c                                                          # one spare slot takes the rest
    pos = torch.where(ok, pos, dump).view(x, -1)
    idx = torch.zeros(x, r * c + 1, dtype=torch.long, device=dev).scatter_(1, pos, order.reshape(x, -1))
    w = torch.gather(whole, -1, order)
    wt = torch.zeros(x, r * c + 1, dtype=torch.bool, device=dev).scatter_(1, pos, w.reshape(x, -1))
    return ptr, split, idx, wt


def dynamic_tables(plan: BlockPlan, token_block: torch.Tensor, kept: torch.Tensor, static, layout, causal: bool,
                   site_causal: bool) -> BlockTables:
    """Tables of a ``dynamic`` call (``X = B * H``) on ``kept``'s device.

    plan: the static part's plan (pooling blocks as plan blocks); token_block: [S_k] pooling block of every
    token (-1 for globals), as from :func:`locattn.patterns.dynamic.token_blocks`; kept: [B, H, NB, NB] bool
    (:func:`~locattn.patterns.dynamic.select_blocks`); static / layout: the static part and its resolved layout;
    causal: the pattern's token causality (j <= i, tokens); site_causal: the site's ``is_causal`` (top-left on
    query rows). ``pairs`` of the result counts each table's allowed pairs exactly (site mask not counted)."""
    dev = kept.device
    f = _block_facts(plan, token_block, static, layout, causal, site_causal, dev)
    b, h, nb, _ = kept.shape
    qb, kb = f.q_blk, f.k_blk
    valid = (qb >= 0)[:, None] & (kb >= 0)[None, :]                     # [NQ, NK]
    flat = kept.reshape(b * h, nb * nb)
    sel = flat[:, (qb.clamp_min(0)[:, None] * nb + kb.clamp_min(0)[None, :]).reshape(-1)]
    sel = sel.view(b * h, *valid.shape) & valid
    reach = torch.ones_like(valid)
    whole_full = ~f.q_pad[:, None] & ~f.k_pad[None, :]
    if causal:
        reach = reach & (f.k_tok_min[None, :] <= f.q_tok_max[:, None])
        whole_full = whole_full & (f.k_tok_max[None, :] <= f.q_tok_min[:, None])
    if site_causal:
        reach = reach & (f.k_tok_min[None, :] <= f.q_row_max[:, None])
        whole_full = whole_full & (f.k_tok_max[None, :] <= f.q_row_min[:, None])
    sel = sel & reach
    full = f.static_full | (sel & whole_full)
    any_ = f.static_any | sel
    whole = sel & ~full
    kv_ptr, kv_split, kv_idx, kv_whole = _compact(full, any_, whole)
    t = lambda z: z.transpose(-1, -2)
    qb_ptr, qb_split, qb_idx, qb_whole = _compact(t(full), t(any_), t(whole))
    pairs = torch.where(full, f.pairs_valid, torch.where(whole, torch.where(f.straddle, f.pairs_union, f.pairs_valid),
                                                         torch.where(any_, f.pairs_static, 0))).sum((1, 2))
    return BlockTables(plan, kv_ptr, kv_split, kv_idx, kv_whole, qb_ptr, qb_split, qb_idx, qb_whole, "batch_head",
                       pairs)


def block_rows(tables: BlockTables, x: int, m: int) -> tuple[list[int], list[int], list[bool]]:
    """(full blocks, partial blocks, whole flags of the partial ones) of row ``m`` of table ``x`` (tests)."""
    p, s = tables.kv_ptr[x], tables.kv_split[x]
    lo, mid, hi = int(p[m]), int(s[m]), int(p[m + 1])
    idx = tables.kv_idx[x].tolist()
    w = tables.kv_whole[x].tolist() if tables.kv_whole is not None else [False] * len(idx)
    return idx[lo:mid], idx[mid:hi], w[mid:hi]
