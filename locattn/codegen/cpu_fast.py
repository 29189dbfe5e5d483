"""Fast CPU implementation (``"cpu"``): ATen's fused CPU flash-attention kernel run over local key windows.

Every call goes through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (forward: out + logsumexp) and
its ``_backward``: one fused, multithreaded kernel per batch of blocks, no S x S or S x keys score matrix.
The kernel takes 4-D ``[batch, heads, seq, dim]`` operands with arbitrary strides, so a batch of query blocks
whose key windows are equally spaced in memory is *one* call on an overlapping strided view of K/V:
no gather of keys along the first grid axis.

Glossary
--------
u-space      per-axis order with dilation groups made contiguous (:mod:`locattn.patterns.base`)
segment      a run of ``<= t`` consecutive u positions of one axis inside one dilation group; its key
             window is ``[kstart, kstart + R)`` (u-space), the union of its queries' intervals padded to R
block        product of one segment per axis: ``M = prod(t)`` query rows, ``N = prod(R)`` key rows
class        segments with the same relative mask ``[t, R]``; blocks of one class share one mask
run          segments of one axis-0 class whose ``kstart`` is an arithmetic progression: one kernel call
inner        the grid axes after the first (2-D/3-D). ``strips[i]`` holds, for inner block ``i``, the keys
             of its inner window for *every* axis-0 row: ``[BH, n0, R_inner, E]``; a block's keys are then
             the contiguous rows ``kstart0 .. kstart0 + R0`` of its strip (1-D: the strip is K itself)
BH           batch x query heads (GQA kv heads are repeated); E = max(D, Dv) (the kernel needs D == Dv)
parts        a local site's keys are the disjoint union of the grid window, the global keys and the sink
             keys outside the window; global query rows are dense rows. Parts run separately and merge by
             logsumexp; the backward runs each part with the merged ``out``/``lse``.

The kernel returns ``lse = 0`` and ``out = 0`` for a row whose mask is all ``-inf``; rows that can be empty
(site mask / bias / extra-key parts) are detected from the mask and given ``lse = -inf``.
Bias gradients are delegated to the ``blocked`` implementation (the kernel's backward has no dS output).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..patterns.base import Layout, Pattern, allowed, dilation_groups, u_to_coord
from .blocked import Blocked
from .reference import reduce_to
from .registry import AttentionCall, Implementation

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: elements of one materialised per-call mask / per-call key gradient (bounds peak memory)
CHUNK_ELEMS = 1 << 24
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# per-axis plan


@dataclass(frozen=True, eq=False)
class AxisPlan:
    """Segments of one grid axis. ``rel_lo/rel_hi [nseg, t]``: allowed keys of each query row relative to the
    segment's ``kstart`` (``rel_lo > rel_hi`` for padding rows); ``cls [nseg]`` class id; ``masks [ncls, t, R]``."""

    n: int
    t: int
    R: int
    qs: torch.Tensor
    qlen: torch.Tensor
    kstart: torch.Tensor
    cls: torch.Tensor
    masks: torch.Tensor
    coord: torch.Tensor  # u -> grid coordinate

    @property
    def nseg(self) -> int:
        return self.qs.numel()


def _segment_ids(pattern: Pattern, grid, a: int, t: int, aligned: bool, lo, hi) -> torch.Tensor:
    n = grid[a]
    d = pattern.dilation_of(a, len(grid))
    u = torch.arange(n)
    _, _, p, _ = dilation_groups(u_to_coord(u, n, d), n, d)
    brk = p == 0
    if aligned and n > 1:  # start a segment where the key interval jumps (tile / window boundaries)
        jump = torch.zeros(n, dtype=torch.bool)
        dlo, dhi = lo[1:] - lo[:-1], hi[1:] - hi[:-1]
        jump[1:] = (dlo > 1) | (dhi > 1) | (dlo < 0) | (dhi < 0)
        brk = brk | jump
    piece_start = torch.cummax(torch.where(brk, u, torch.zeros_like(u)), 0).values
    new = (u - piece_start) % t == 0
    return torch.cumsum(new.long(), 0) - 1


def _axis_plan(pattern: Pattern, grid, a: int, t: int, aligned: bool, causal_u: bool) -> AxisPlan:
    n = grid[a]
    d = pattern.dilation_of(a, len(grid))
    u = torch.arange(n)
    coord = u_to_coord(u, n, d)
    lo, hi = pattern.axis_bounds(a, grid, coord)
    if causal_u:  # 1-D site causal: keys of a window share the query's dilation group, so u-order = token order
        hi = torch.minimum(hi, u)
    seg = _segment_ids(pattern, grid, a, t, aligned, lo, hi)
    nseg = int(seg[-1]) + 1
    big = torch.iinfo(torch.long).max
    qs = torch.full((nseg,), big).scatter_reduce(0, seg, u, "amin")
    qlen = torch.bincount(seg, minlength=nseg)
    lo_s = torch.full((nseg,), big).scatter_reduce(0, seg, lo, "amin")
    hi_s = torch.full((nseg,), -1).scatter_reduce(0, seg, hi, "amax")
    R = int((hi_s - lo_s + 1).max())
    t_eff = int(qlen.max())
    kstart = torch.minimum(lo_s, torch.full_like(lo_s, n - R))
    r = torch.arange(t_eff)
    valid = r[None, :] < qlen[:, None]
    uq = (qs[:, None] + r[None, :]).clamp_max(n - 1)
    rel_lo = torch.where(valid, lo[uq] - kstart[:, None], R)
    rel_hi = torch.where(valid, hi[uq] - kstart[:, None], -1)
    key = torch.stack([rel_lo, rel_hi], -1).view(nseg, -1)
    uniq, cls = torch.unique(key, dim=0, return_inverse=True)
    c = torch.arange(R)
    ulo, uhi = uniq.view(-1, t_eff, 2)[..., 0], uniq.view(-1, t_eff, 2)[..., 1]
    masks = (c[None, None, :] >= ulo[..., None]) & (c[None, None, :] <= uhi[..., None])
    return AxisPlan(n, t_eff, R, qs, qlen, kstart, cls, masks, coord)


def _runs(seg_ids: list[int], kstart: list[int]) -> list[tuple[int, int, int, int, int]]:
    """Split sorted segment ids into arithmetic progressions of (segment, kstart):
    ``(first_seg, seg_step, count, first_kstart, kstart_step)``."""
    out = []
    i = 0
    while i < len(seg_ids):
        j = i + 1
        if j < len(seg_ids):
            ds, dk = seg_ids[j] - seg_ids[i], kstart[j] - kstart[i]
            while j + 1 < len(seg_ids) and seg_ids[j + 1] - seg_ids[j] == ds and kstart[j + 1] - kstart[j] == dk:
                j += 1
            j += 1
        else:
            ds, dk = 1, 0
        out.append((seg_ids[i], ds, j - i, kstart[i], dk))
        i = j
    return out


# ----------------------------------------------------------------------------------------------------------
# the window plan of a grid (cost model picks the segment size per axis)

#: measured kernel throughput (GFLOP/s per core, fp32, D=64) by rows per block; blocks of < 192 rows run as
#: units of 32 rows sharing the block's keys in cache, >= 192 rows as units of 64
_EFF = ((16, 31.0), (32, 45.0), (64, 55.0), (191, 60.0), (767, 65.0), (1 << 30, 70.0))
#: cost of copying one key row into a strip, in score elements of kernel time (D=64: ~5 ns vs ~85 ns)
_STRIP_ROW_COST = 17.0


def _eff(m: int) -> float:
    for lim, e in _EFF:
        if m <= lim:
            return e
    return _EFF[-1][1]


def _rows(m: int) -> int:
    unit = 32 if m < 192 else 64 if m < 768 else 256
    return m if m <= unit else -(-m // unit) * unit


@dataclass(eq=False)
class WindowPlan:
    """How the grid part of a local site runs. See the module glossary.

    q_tok: [nseg0, ninner, M] token index of every query row (-1 padding); inner order is sorted by class.
    inner_seg: [ninner, ndim-1] segment id per inner axis; inner_ranges: [(i0, i1, class tuple)].
    runs: axis-0 runs ``(first_seg, seg_step, count, first_kstart, kstart_step, class)``.
    k_tok0: [nseg0, R0] token offset of each key row on axis 0; k_tok_inner: [ninner, R_inner].
    u_tok: [n_grid] token of each u-order grid position (None when u-order is token order).
    """

    axes: tuple[AxisPlan, ...]
    prefix: int
    M: int
    N: int
    R_inner: int
    q_tok: torch.Tensor
    inner_seg: torch.Tensor
    inner_ranges: list
    runs: list
    k_tok0: torch.Tensor
    k_tok_inner: torch.Tensor
    u_tok: torch.Tensor | None
    _masks: dict = field(default_factory=dict)

    @property
    def nseg0(self) -> int:
        return self.axes[0].nseg

    @property
    def ninner(self) -> int:
        return self.inner_seg.shape[0]

    def mask(self, c0: int, ci: tuple, dtype) -> torch.Tensor | None:
        """Additive ``[M, N]`` mask of a (axis-0 class, inner class) pair; None if every pair is allowed."""
        key = (c0, ci, dtype)
        if key not in self._masks:
            m = self.axes[0].masks[c0]
            for a, c in zip(self.axes[1:], ci):
                ma = a.masks[c]
                m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(m.shape[0] * ma.shape[0], -1)
            self._masks[key] = None if bool(m.all()) else \
                torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, NEG_INF)
        return self._masks[key]

    def bool_mask(self, c0: int, ci: tuple) -> torch.Tensor:
        m = self.axes[0].masks[c0]
        for a, c in zip(self.axes[1:], ci):
            ma = a.masks[c]
            m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(m.shape[0] * ma.shape[0], -1)
        return m


def _axis_candidates(pattern, grid, a, causal_u) -> list[AxisPlan]:
    n = grid[a]
    out, seen = [], set()
    t = 1
    while True:
        for aligned in (False, True):
            ap = _axis_plan(pattern, grid, a, min(t, n), aligned, causal_u)
            sig = (ap.nseg, ap.t, ap.R, tuple(ap.qs.tolist()) if ap.nseg < 4096 else ap.nseg)
            if sig not in seen:
                seen.add(sig)
                out.append(ap)
        if t >= n or t >= 512:
            break
        t *= 2
    return out


def _cost(axes: tuple[AxisPlan, ...]) -> float:
    m = math.prod(a.t for a in axes)
    n = math.prod(a.R for a in axes)
    nblk = math.prod(a.nseg for a in axes)
    cost = nblk * _rows(m) * n / _eff(m)
    if len(axes) > 1:
        strip_rows = axes[0].n * math.prod(a.nseg * a.R for a in axes[1:])
        cost += 2 * strip_rows * _STRIP_ROW_COST / 50.0
    return cost


@functools.lru_cache(maxsize=64)
def window_plan(pattern: Pattern, layout: Layout, causal_1d: bool, tiles: tuple | None = None) -> WindowPlan:
    """Plan of the grid x grid part. ``tiles``: force the segment length per axis (tests / tuning)."""
    grid = layout.grid
    nd = len(grid)
    if tiles is not None:
        axes = tuple(_axis_plan(pattern, grid, a, min(tiles[a], grid[a]), False, causal_1d and nd == 1)
                     for a in range(nd))
    else:
        cands = [_axis_candidates(pattern, grid, a, causal_1d and nd == 1) for a in range(nd)]
        axes = min(itertools.product(*cands), key=_cost)
    a0, inner = axes[0], axes[1:]
    strides = [math.prod(grid[a + 1:]) for a in range(nd)]
    # inner blocks: product of inner segments, sorted by class tuple
    if inner:
        segs = torch.cartesian_prod(*[torch.arange(ax.nseg) for ax in inner]).view(-1, len(inner))
        cls = torch.stack([ax.cls[segs[:, j]] for j, ax in enumerate(inner)], 1)
        order = sorted(range(segs.shape[0]), key=lambda i: tuple(cls[i].tolist()))
        segs, cls = segs[order], cls[order]
    else:
        segs = torch.zeros(1, 0, dtype=torch.long)
        cls = torch.zeros(1, 0, dtype=torch.long)
    ninner = segs.shape[0]
    ranges, i0 = [], 0
    cl = [tuple(r) for r in cls.tolist()]
    for i in range(1, ninner + 1):
        if i == ninner or cl[i] != cl[i0]:
            ranges.append((i0, i, cl[i0]))
            i0 = i
    # query tokens of every block row: [nseg0, ninner, M]
    def rows_tok(ax: AxisPlan, stride: int, seg: torch.Tensor):
        r = torch.arange(ax.t)
        u = ax.qs[seg][:, None] + r[None, :]
        ok = r[None, :] < ax.qlen[seg][:, None]
        return ax.coord[u.clamp_max(ax.n - 1)] * stride, ok

    tok0, ok0 = rows_tok(a0, strides[0], torch.arange(a0.nseg))            # [nseg0, t0]
    tok_i = torch.zeros(ninner, 1, dtype=torch.long)
    ok_i = torch.ones(ninner, 1, dtype=torch.bool)
    ktok_i = torch.zeros(ninner, 1, dtype=torch.long)
    for j, ax in enumerate(inner):
        tj, oj = rows_tok(ax, strides[j + 1], segs[:, j])                  # [ninner, t_j]
        tok_i = (tok_i[:, :, None] + tj[:, None, :]).reshape(ninner, -1)
        ok_i = (ok_i[:, :, None] & oj[:, None, :]).reshape(ninner, -1)
        kj = ax.coord[ax.kstart[segs[:, j]][:, None] + torch.arange(ax.R)[None, :]] * strides[j + 1]
        ktok_i = (ktok_i[:, :, None] + kj[:, None, :]).reshape(ninner, -1)
    q_tok = tok0[:, None, :, None] + tok_i[None, :, None, :] + layout.prefix
    q_ok = ok0[:, None, :, None] & ok_i[None, :, None, :]
    q_tok = torch.where(q_ok, q_tok, -1).reshape(a0.nseg, ninner, -1)
    k_tok0 = a0.coord[a0.kstart[:, None] + torch.arange(a0.R)[None, :]] * strides[0]
    # axis-0 runs
    runs = []
    ks = a0.kstart.tolist()
    for c0 in range(a0.masks.shape[0]):
        members = torch.nonzero(a0.cls == c0).flatten().tolist()
        for first, step, count, kfirst, kstep in _runs(members, [ks[m] for m in members]):
            runs.append((first, step, count, kfirst, kstep, c0))
    # u-order -> token (None when every axis is undilated: u-order is the grid's own order)
    u_tok = None
    if any(pattern.dilation_of(a, nd) > 1 for a in range(nd)):
        t = torch.zeros(1, dtype=torch.long)
        for a in range(nd):
            t = (t[:, None] + axes[a].coord[None, :] * strides[a]).reshape(-1)
        u_tok = t + layout.prefix
    return WindowPlan(axes, layout.prefix, q_tok.shape[-1], a0.R * math.prod(a.R for a in inner),
                      math.prod(a.R for a in inner), q_tok, segs, ranges, runs, k_tok0, ktok_i, u_tok)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _site_additive(call: AttentionCall, qi: torch.Tensor, kj: torch.Tensor, dtype) -> torch.Tensor | None:
    """Site bias + mask (-inf) at token pairs ``qi [..., 1]`` x ``kj [..., N]`` -> ``[Bm, Hm, *pairs]``."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    out = None
    for t in (call.bias, call.mask):
        if t is None:
            continue
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
        g = t4.expand(*t4.shape[:2], s_q, s_k)[:, :, qi, kj]
        if t.dtype == torch.bool:
            g = torch.zeros(g.shape, dtype=dtype).masked_fill_(~g, NEG_INF)
        else:
            g = g.to(dtype)
        out = g if out is None else out + g
    return out


def _flash_mask(add: torch.Tensor | None, causal: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if causal is not None:
        c = torch.zeros(causal.shape, dtype=dtype).masked_fill_(~causal, NEG_INF)
        add = c if add is None else add + c
    return add


def _empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else torch.isneginf(mask).all(-1)


def _prep(call: AttentionCall):
    """q, k, v as [B, Hq, S, E] (GQA repeated, head dims zero-padded to E = max(D, Dv), last dim contiguous)."""
    q, k, v = call.q, call.k, call.v
    hq, hk = q.shape[1], k.shape[1]
    e = max(q.shape[-1], v.shape[-1])
    if hk != hq:
        k = k.repeat_interleave(hq // hk, 1)
        v = v.repeat_interleave(hq // hk, 1)
    if q.shape[-1] < e:
        q, k = F.pad(q, (0, e - q.shape[-1])), F.pad(k, (0, e - k.shape[-1]))
    if v.shape[-1] < e:
        v = F.pad(v, (0, e - v.shape[-1]))
    fix = lambda t: t if t.stride(-1) == 1 else t.contiguous()
    return fix(q), fix(k), fix(v), e


def _pad_last(t: torch.Tensor, e: int) -> torch.Tensor:
    t = t if t.shape[-1] == e else F.pad(t, (0, e - t.shape[-1]))
    return t if t.stride(-1) == 1 else t.contiguous()


def _acc_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _bwd_lse(lse: torch.Tensor, dt) -> torch.Tensor:
    """Kernel normaliser: -inf (empty row) -> 0, whose probabilities are exp(-inf) = 0 anyway."""
    lse = lse.to(_acc_dtype(dt))
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _merge(o1, l1, o2, l2):
    """Logsumexp merge of two partial attentions (out [..., S, E] fp32/64, lse [..., S])."""
    l = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isneginf(l), torch.zeros_like(l), l)
    w1 = torch.exp(l1 - safe)[..., None]
    w2 = torch.exp(l2 - safe)[..., None]
    return o1 * w1 + o2 * w2, l


# ----------------------------------------------------------------------------------------------------------
# the implementation


class CpuFast(Implementation):
    """The fastest CPU path: ATen's fused flash kernel over dense rows or local key windows."""

    name = "cpu"
    #: forced per-axis segment sizes (None = cost model); tests use it to reach odd segmentations
    tiles: tuple | None = None

    def can_run(self, call):
        for t in (call.q, call.k, call.v):
            if t.device.type != "cpu":
                return False, f"tensors on {t.device.type}, not cpu"
        if call.q.dtype not in _DTYPES:
            return False, f"dtype {call.q.dtype} not supported"
        if call.k.dtype != call.q.dtype or call.v.dtype != call.q.dtype:
            return False, "q, k, v dtypes differ"
        for t in (call.mask, call.bias):
            if t is not None and t.device.type != "cpu":
                return False, "mask/bias not on cpu"
        if call.mask is not None and call.mask.dtype != torch.bool:
            return False, "site mask is not bool"
        if min(call.q.shape[-2], call.k.shape[-2], call.q.shape[0], call.q.shape[1]) == 0:
            return False, "empty tensor"
        return True, ""

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, call):
        q, k, v, e = _prep(call)
        dv = call.v.shape[-1]
        if not call.pattern.local:
            o, l = self._dense_fwd(call, q, k, v)
        else:
            o, l = self._local_fwd(call, q, k, v)
        return o[..., :dv].to(call.q.dtype), l.float()

    def _dense_fwd(self, call, q, k, v):
        s_q, s_k = q.shape[-2], k.shape[-2]
        add = None
        if call.mask is not None or call.bias is not None:
            add = _site_additive(call, torch.arange(s_q)[:, None], torch.arange(s_k)[None, :], q.dtype)
        o, l = _FLASH(q, k, v, 0.0, call.is_causal, attn_mask=add, scale=call.scale)
        if add is not None:
            ninf = torch.isneginf(add)
            if call.is_causal:
                ninf = ninf | torch.ones(s_q, s_k, dtype=torch.bool).triu(1)
            l = l.masked_fill(ninf.all(-1).expand_as(l), NEG_INF)
        return o, l

    def _local_fwd(self, call, q, k, v):
        b, h, s, e = q.shape
        lay = call.layout
        acc = _acc_dtype(q.dtype)
        out = q.new_empty(b, h, s, e)
        lse = torch.empty(b, h, s, dtype=acc)
        g0, g1 = lay.prefix, lay.prefix + lay.n_grid
        ow, lw = self._window_fwd(call, q, k, v)                 # [B, H, n_grid, E], [B, H, n_grid]
        extra = self._extra_keys(call)
        if extra is not None:
            qg = q[:, :, g0:g1]
            mask = self._extra_mask(call, extra, q.dtype)
            oe, le = _FLASH(qg, k[:, :, extra], v[:, :, extra], 0.0, False, attn_mask=mask, scale=call.scale)
            le = le.masked_fill(_empty_rows(mask).expand_as(le), NEG_INF)
            ow, lw = _merge(ow.to(acc), lw.to(acc), oe.to(acc), le.to(acc))
        out[:, :, g0:g1] = ow.to(out.dtype)
        lse[:, :, g0:g1] = lw
        glob = self._global_rows(lay, s)
        if glob is not None:
            og, lg = self._global_fwd(call, q, k, v, glob)
            out[:, :, glob] = og.to(out.dtype)
            lse[:, :, glob] = lg.to(acc)
        return out, lse

    # -- parts -----------------------------------------------------------------------------------------------
    @staticmethod
    def _global_rows(lay: Layout, s: int) -> torch.Tensor | None:
        if not (lay.prefix or lay.suffix):
            return None
        return torch.cat([torch.arange(lay.prefix), torch.arange(lay.prefix + lay.n_grid, s)])

    @staticmethod
    def _extra_keys(call) -> torch.Tensor | None:
        lay = call.layout
        s = call.q.shape[-2]
        n_sink = max(0, min(lay.sinks, lay.prefix + lay.n_grid) - lay.prefix)
        keys = [torch.arange(lay.prefix), torch.arange(lay.prefix, lay.prefix + n_sink),
                torch.arange(lay.prefix + lay.n_grid, s)]
        keys = torch.cat(keys)
        return keys if keys.numel() else None

    def _extra_mask(self, call, extra, dtype) -> torch.Tensor | None:
        """[Bm, Hm, n_grid, n_extra] additive: grid sinks already in the window are not counted twice."""
        lay = call.layout
        qi = torch.arange(lay.prefix, lay.prefix + lay.n_grid)[:, None]
        kj = extra[None, :]
        is_sink = (kj >= lay.prefix) & (kj < lay.prefix + lay.n_grid)
        keep = torch.ones(qi.shape[0], kj.shape[1], dtype=torch.bool)
        if bool(is_sink.any()):
            nosink = Layout(lay.grid, lay.prefix, lay.suffix, 0)
            keep = ~(is_sink & allowed(call.pattern, nosink, qi, kj))
        if call.is_causal:
            keep = keep & (kj <= qi)
        add = _site_additive(call, qi, kj, dtype)
        if bool(keep.all()):
            return add if add is not None else None
        c = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, NEG_INF)
        return c if add is None else add + c

    def _global_mask(self, call, glob, dtype):
        s_k = call.k.shape[-2]
        qi, kj = glob[:, None], torch.arange(s_k)[None, :]
        add = _site_additive(call, qi, kj, dtype)
        causal = (kj <= qi) if call.is_causal else None
        return _flash_mask(add, causal, dtype)

    def _global_fwd(self, call, q, k, v, glob):
        mask = self._global_mask(call, glob, q.dtype)
        o, l = _FLASH(q[:, :, glob], k, v, 0.0, False, attn_mask=mask, scale=call.scale)
        if mask is not None:
            l = l.masked_fill(_empty_rows(mask).expand_as(l), NEG_INF)
        return o, l

    # -- the grid window part --------------------------------------------------------------------------------
    def _plan(self, call) -> WindowPlan:
        nd = len(call.layout.grid)
        return window_plan(call.pattern, Layout(call.layout.grid, call.layout.prefix), call.is_causal and nd == 1,
                           self.tiles)

    def _site_terms(self, call) -> bool:
        """Per-call masks must be materialised (site mask / bias, or causal on a 2-D/3-D grid)."""
        return call.mask is not None or call.bias is not None or (call.is_causal and len(call.layout.grid) > 1)

    @staticmethod
    def _kgrid(plan: WindowPlan, t: torch.Tensor, lay: Layout) -> torch.Tensor:
        """[BH, S, E] -> grid part in u-order [BH, n0, ..., E] (a view when undilated)."""
        bh, _, e = t.shape
        grid = lay.grid
        if plan.u_tok is None:
            g = t[:, lay.prefix:lay.prefix + lay.n_grid]
        else:
            g = t.index_select(1, plan.u_tok)
        return g.reshape(bh, *grid, e)

    @staticmethod
    def _strips(plan: WindowPlan, kg: torch.Tensor) -> torch.Tensor:
        """u-order grid [BH, n0, n1(, n2), E] -> strips [ninner, BH, n0, R_inner, E] (1-D: a view of K)."""
        bh, n0 = kg.shape[:2]
        e = kg.shape[-1]
        if len(plan.axes) == 1:
            return kg.unsqueeze(0).unsqueeze(3)
        out = kg.new_empty(plan.ninner, bh, n0, *[a.R for a in plan.axes[1:]], e)
        starts = torch.stack([a.kstart[plan.inner_seg[:, j]] for j, a in enumerate(plan.axes[1:])], 1).tolist()
        for i, st in enumerate(starts):
            src = kg
            for j, a in enumerate(plan.axes[1:]):
                src = src.narrow(2 + j, st[j], a.R)
            out[i].copy_(src)
        return out.view(plan.ninner, bh, n0, plan.R_inner, e)

    @staticmethod
    def _unstrip(plan: WindowPlan, strips: torch.Tensor, bh: int, e: int) -> torch.Tensor:
        n0 = plan.axes[0].n
        if len(plan.axes) == 1:
            return strips[0, :, :, 0]
        dims = [a.n for a in plan.axes[1:]]
        out = strips.new_zeros(bh, n0, *dims, e)
        st = strips.view(plan.ninner, bh, n0, *[a.R for a in plan.axes[1:]], e)
        starts = torch.stack([a.kstart[plan.inner_seg[:, j]] for j, a in enumerate(plan.axes[1:])], 1).tolist()
        for i, s in enumerate(starts):
            dst = out
            for j, a in enumerate(plan.axes[1:]):
                dst = dst.narrow(2 + j, s[j], a.R)
            dst.add_(st[i])
        return out.reshape(bh, -1, e)

    @staticmethod
    def _kview(strips: torch.Tensor, plan: WindowPlan, kfirst, kstep, count, i0, i1) -> torch.Tensor:
        """Keys of ``count`` blocks of a run x inner blocks [i0, i1): [count, (i1-i0)*BH, N, E] strided view."""
        ni, bh, n0, ri, e = strips.shape
        s_i, s_b, s_r, s_c, _ = strips.stride()
        if i1 - i0 > 1:
            assert s_i == bh * s_b
        return torch.as_strided(strips, (count, (i1 - i0) * bh, plan.axes[0].R * ri, e),
                                (kstep * s_r, s_b, s_c, 1),
                                strips.storage_offset() + i0 * s_i + kfirst * s_r)

    def _call_mask(self, call, plan, dtype, seg_ids, i0, i1, c0, ci, bh):
        """Mask of one kernel call: [1, 1, M, N] shared, or [count, (i1-i0)*BH, M, N] with site terms."""
        base = plan.mask(c0, ci, dtype)
        if not self._site_terms(call):
            return None if base is None else base.view(1, 1, plan.M, plan.N), False
        b, h = call.q.shape[0], call.q.shape[1]
        qt = plan.q_tok[seg_ids][:, i0:i1]                                      # [c, ni, M]
        kt = plan.k_tok0[seg_ids][:, None, :, None] + plan.k_tok_inner[None, i0:i1, None, :]
        kt = kt.reshape(len(seg_ids), i1 - i0, -1) + plan.prefix                # [c, ni, N]
        qi, kj = qt.clamp_min(0)[..., :, None], kt[..., None, :]
        m = torch.zeros(plan.M, plan.N, dtype=dtype) if base is None else base
        m = m.expand(len(seg_ids), i1 - i0, plan.M, plan.N)
        if call.is_causal:
            m = m.masked_fill(kj > qi, NEG_INF)
        add = _site_additive(call, qi, kj, dtype)                               # [Bm, Hm, c, ni, M, N]
        if add is not None:
            m = m[:, :, None, None] + add.permute(2, 3, 0, 1, 4, 5)
        m = m.reshape(len(seg_ids), i1 - i0, -1, plan.M, plan.N) if m.dim() == 6 else m[:, :, None]
        m = m.expand(len(seg_ids), i1 - i0, b * h // 1, plan.M, plan.N) if m.shape[2] == 1 else \
            m.expand(len(seg_ids), i1 - i0, b, h, plan.M, plan.N).reshape(len(seg_ids), i1 - i0, b * h, plan.M, plan.N) \
            if m.shape[2] != b * h else m
        return m.reshape(len(seg_ids), (i1 - i0) * bh, plan.M, plan.N).contiguous(), True

    def _calls(self, call, plan: WindowPlan, bh: int, per_block_elems: int):
        """Kernel calls: (seg_ids, first_seg, seg_step, count, kfirst, kstep, i0, i1, c0, ci), chunked so a
        materialised mask / key gradient stays under CHUNK_ELEMS."""
        for first, step, count, kfirst, kstep, c0 in plan.runs:
            for i0, i1, ci in plan.inner_ranges:
                per = max(1, (i1 - i0) * bh * per_block_elems)
                chunk = max(1, CHUNK_ELEMS // per)
                for j0 in range(0, count, chunk):
                    c = min(chunk, count - j0)
                    s0 = first + j0 * step
                    yield (list(range(s0, s0 + c * step, step)), s0, step, c, kfirst + j0 * kstep, kstep,
                           i0, i1, c0, ci)

    def _qblocks(self, plan: WindowPlan, t: torch.Tensor) -> torch.Tensor:
        """[BH, S, E] -> [nseg0, ninner, BH, M, E] (padding rows read token 0)."""
        bh, _, e = t.shape
        idx = plan.q_tok.clamp_min(0).reshape(-1)
        g = t.index_select(1, idx).view(bh, plan.nseg0, plan.ninner, plan.M, e)
        return g.permute(1, 2, 0, 3, 4).contiguous()

    @staticmethod
    def _qview(blocks: torch.Tensor, s0, step, count, i0, i1) -> torch.Tensor:
        n0, ni, bh = blocks.shape[:3]
        rest = blocks.shape[3:]
        st = blocks.stride()
        return torch.as_strided(blocks, (count, (i1 - i0) * bh, *rest), (step * st[0], st[2], *st[3:]),
                                blocks.storage_offset() + s0 * st[0] + i0 * st[1])

    def _unblock(self, plan: WindowPlan, blocks: torch.Tensor, n_tok: int) -> torch.Tensor:
        """[nseg0, ninner, BH, M, *] -> token order [BH, n_tok, *] (rows of tokens no block holds: garbage)."""
        bh = blocks.shape[2]
        rest = blocks.shape[4:]
        flat = blocks.permute(2, 0, 1, 3, *range(4, blocks.dim())).reshape(bh, -1, *rest)
        tok = plan.q_tok.reshape(-1)
        dst = blocks.new_empty(bh, n_tok + 1, *rest)
        dst.index_copy_(1, torch.where(tok >= 0, tok, n_tok), flat)
        return dst[:, :n_tok]

    def _window_fwd(self, call, q, k, v):
        b, h, s, e = q.shape
        bh = b * h
        lay = call.layout
        plan = self._plan(call)
        qb = self._qblocks(plan, q.reshape(bh, s, e))
        ks = self._strips(plan, self._kgrid(plan, k.reshape(bh, s, e), lay))
        vs = self._strips(plan, self._kgrid(plan, v.reshape(bh, s, e), lay))
        acc = _acc_dtype(q.dtype)
        ob = torch.empty_like(qb)
        lb = torch.empty(qb.shape[:-1], dtype=acc)
        per_block = plan.M * plan.N if self._site_terms(call) else 0
        for seg_ids, s0, step, c, kf, kst, i0, i1, c0, ci in self._calls(call, plan, bh, per_block):
            mask, site = self._call_mask(call, plan, q.dtype, seg_ids, i0, i1, c0, ci, bh)
            o, l = _FLASH(self._qview(qb, s0, step, c, i0, i1), self._kview(ks, plan, kf, kst, c, i0, i1),
                          self._kview(vs, plan, kf, kst, c, i0, i1), 0.0, False, attn_mask=mask, scale=call.scale)
            if site:
                l = l.masked_fill(_empty_rows(mask), NEG_INF)
            self._qview(ob, s0, step, c, i0, i1).copy_(o)
            self._qview(lb, s0, step, c, i0, i1).copy_(l)
        n_end = lay.prefix + lay.n_grid
        o = self._unblock(plan, ob, n_end)[:, lay.prefix:]
        l = self._unblock(plan, lb, n_end)[:, lay.prefix:]
        return o.view(b, h, lay.n_grid, e), l.view(b, h, lay.n_grid)

    # -- backward --------------------------------------------------------------------------------------------
    def backward(self, call, grad_out, out, lse, need_dbias):
        if need_dbias and call.bias is not None:
            return Blocked().backward(call, grad_out, out, lse, need_dbias)
        q, k, v, e = _prep(call)
        dt = q.dtype
        go = _pad_last(grad_out.to(dt), e)
        o = _pad_last(out.to(dt), e)
        l = _bwd_lse(lse, dt)
        if not call.pattern.local:
            dq, dk, dv = self._dense_bwd(call, q, k, v, go, o, l)
        else:
            dq, dk, dv = self._local_bwd(call, q, k, v, go, o, l)
        hq, hk = call.q.shape[1], call.k.shape[1]
        if hk != hq:
            b, _, s_k, _ = dk.shape
            dk = dk.reshape(b, hk, hq // hk, s_k, e).sum(2)
            dv = dv.reshape(b, hk, hq // hk, s_k, e).sum(2)
        d, dvd = call.q.shape[-1], call.v.shape[-1]
        return dq[..., :d], dk[..., :d], dv[..., :dvd], None

    def _dense_bwd(self, call, q, k, v, go, o, l):
        s_q, s_k = q.shape[-2], k.shape[-2]
        add = None
        if call.mask is not None or call.bias is not None:
            add = _site_additive(call, torch.arange(s_q)[:, None], torch.arange(s_k)[None, :], q.dtype)
        return _FLASH_BWD(go, q, k, v, o, l, 0.0, call.is_causal, attn_mask=add, scale=call.scale)

    def _local_bwd(self, call, q, k, v, go, o, l):
        b, h, s, e = q.shape
        lay = call.layout
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(b, h, s, e, dtype=acc)
        dk = torch.zeros(b, h, s, e, dtype=acc)
        dv = torch.zeros(b, h, s, e, dtype=acc)
        self._window_bwd(call, q, k, v, go, o, l, dq, dk, dv)
        g0, g1 = lay.prefix, lay.prefix + lay.n_grid
        extra = self._extra_keys(call)
        if extra is not None:
            mask = self._extra_mask(call, extra, q.dtype)
            gq, gk, gv = _FLASH_BWD(go[:, :, g0:g1], q[:, :, g0:g1], k[:, :, extra], v[:, :, extra],
                                    o[:, :, g0:g1], l[:, :, g0:g1], 0.0, False, attn_mask=mask, scale=call.scale)
            dq[:, :, g0:g1] += gq
            dk.index_add_(2, extra, gk.to(acc))
            dv.index_add_(2, extra, gv.to(acc))
        glob = self._global_rows(lay, s)
        if glob is not None:
            mask = self._global_mask(call, glob, q.dtype)
            gq, gk, gv = _FLASH_BWD(go[:, :, glob], q[:, :, glob], k, v, o[:, :, glob], l[:, :, glob], 0.0, False,
                                    attn_mask=mask, scale=call.scale)
            dq[:, :, glob] += gq
            dk += gk
            dv += gv
        return dq, dk, dv

    @staticmethod
    def _fold(dst: torch.Tensor, g: torch.Tensor, plan: WindowPlan, kfirst, kstep, count, i0, i1):
        """Add key gradients ``g [count, (i1-i0)*BH, N, E]`` of overlapping windows into strips ``dst``."""
        ni, bh, n0, ri, e = dst.shape
        r0 = plan.axes[0].R
        g = g.reshape(count, i1 - i0, bh, r0, ri, e).permute(1, 2, 0, 3, 4, 5)   # [ni, BH, c, R0, Ri, E]
        d = dst[i0:i1]
        if kstep == 0 or count == 1:
            d.narrow(2, kfirst, r0).add_(g.sum(2))
            return
        s_i, s_b, s_r, s_c, _ = d.stride()
        for p0 in range(0, r0, kstep):
            ln = min(kstep, r0 - p0)
            view = torch.as_strided(d, (i1 - i0, bh, count, ln, ri, e), (s_i, s_b, kstep * s_r, s_r, s_c, 1),
                                    d.storage_offset() + (kfirst + p0) * s_r)
            view.add_(g[:, :, :, p0:p0 + ln])

    def _window_bwd(self, call, q, k, v, go, o, l, dq, dk, dv):
        b, h, s, e = q.shape
        bh = b * h
        lay = call.layout
        plan = self._plan(call)
        acc = dq.dtype
        qb = self._qblocks(plan, q.reshape(bh, s, e))
        gob = self._qblocks(plan, go.reshape(bh, s, e))
        obk = self._qblocks(plan, o.reshape(bh, s, e))
        lb = self._qblocks(plan, l.reshape(bh, s, 1))[..., 0]
        ks = self._strips(plan, self._kgrid(plan, k.reshape(bh, s, e), lay))
        vs = self._strips(plan, self._kgrid(plan, v.reshape(bh, s, e), lay))
        dks = torch.zeros(ks.shape, dtype=acc)
        dvs = torch.zeros(vs.shape, dtype=acc)
        dqb = torch.empty(qb.shape, dtype=acc)
        per_block = plan.N * e + (plan.M * plan.N if self._site_terms(call) else 0)
        for seg_ids, s0, step, c, kf, kst, i0, i1, c0, ci in self._calls(call, plan, bh, per_block):
            mask, _ = self._call_mask(call, plan, q.dtype, seg_ids, i0, i1, c0, ci, bh)
            qv = lambda t: self._qview(t, s0, step, c, i0, i1)
            gq, gk, gv = _FLASH_BWD(qv(gob), qv(qb), self._kview(ks, plan, kf, kst, c, i0, i1),
                                    self._kview(vs, plan, kf, kst, c, i0, i1), qv(obk), qv(lb), 0.0, False,
                                    attn_mask=mask, scale=call.scale)
            qv(dqb).copy_(gq)
            self._fold(dks, gk, plan, kf, kst, c, i0, i1)
            self._fold(dvs, gv, plan, kf, kst, c, i0, i1)
        g0, g1 = lay.prefix, lay.prefix + lay.n_grid
        dq.view(bh, s, e)[:, g0:g1] += self._unblock(plan, dqb, g1)[:, g0:]
        for src, dst in ((dks, dk), (dvs, dv)):
            grid_u = self._unstrip(plan, src, bh, e)                            # [BH, n_grid(u-order), E]
            dflat = dst.view(bh, s, e)
            if plan.u_tok is None:
                dflat[:, g0:g1] += grid_u
            else:
                dflat.index_add_(1, plan.u_tok, grid_u)
