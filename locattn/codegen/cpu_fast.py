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
class        segments with the same relative mask ``[t, R]``; blocks of one class share one ``[M, N]`` mask
run          consecutive axis-0 segments whose ``kstart`` is an arithmetic progression
call         one kernel launch: blocks on the kernel's batch dim, BH on its heads dim. 1-D: a run (3 calls
             for a sliding window: top border, interior, bottom border); 2-D/3-D: one axis-0 segment x
             every inner block
inner        the grid axes after the first (2-D/3-D). ``strips[i]`` holds, for inner block ``i``, the keys
             of its inner window for *every* axis-0 row: ``[BH, n0, R_inner, E]``; a block's keys are then
             the contiguous rows ``kstart0 .. kstart0 + R0`` of its strip (1-D: the strip is K itself)
BH           batch x query heads (GQA kv heads are repeated); E = max(D, Dv) (the kernel needs D == Dv)
parts        a local site's keys are the disjoint union of the grid window, the global keys and the sink
             keys outside the window; global query rows are dense rows. Parts run separately and merge by
             logsumexp; the backward runs each part with the merged ``out``/``lse``.

The segment sizes come from a small cost model (kernel throughput by block rows, window waste, strip copies;
the backward prefers larger blocks). Masks are ``0 / -inf`` additive tensors in q's dtype (the kernel's
requirement). The kernel returns ``lse = 0`` and ``out = 0`` for a row whose mask is all ``-inf``; rows that
can be empty (site mask / bias / extra-key parts) are detected from the mask and given ``lse = -inf``.
Bias gradients are delegated to the ``blocked`` implementation (the kernel's backward has no dS output), counted as
``dispatch["blocked: cpu backward with a bias gradient"]``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..counters import bump
from ..patterns.base import Layout, Pattern, allowed, dilation_groups, u_to_coord
from ..patterns.plan import axis_bounds_u
from . import cpu_tables
from .blocked import Blocked
from .registry import AttentionCall, Implementation, lse_dtype, site_scores
from .workspace import clear_workspace, workspace as _workspace  # noqa: F401  (clear_workspace: public here)

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
    """Segments of one grid axis: query start ``qs``, length ``qlen`` and key start ``kstart`` per segment
    (``[nseg]``, u-space), class id ``cls [nseg]`` and the class masks ``masks [ncls, t, R]`` (bool; rows past
    ``qlen`` are padding and all False)."""

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
    lo, hi = axis_bounds_u(pattern, grid, a)  # the block planner's per-axis relation
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


def _runs(kstart: list[int]) -> list[tuple[int, int, int, int]]:
    """Split consecutive axis-0 segments into runs whose ``kstart`` is an arithmetic progression with a
    non-negative step: ``(first_seg, count, first_kstart, kstart_step)``."""
    out, i, n = [], 0, len(kstart)
    while i < n:
        j = i + 1
        step = kstart[j] - kstart[i] if j < n else 0
        if step < 0:
            step = 0
        else:
            while j < n and kstart[j] - kstart[j - 1] == step:
                j += 1
        out.append((i, j - i, kstart[i], step))
        i = j
    return out


@dataclass(frozen=True)
class Call:
    """One kernel call over ``nb`` blocks: block j is axis-0 segment ``seg + j*ds``, inner block
    ``inner + j*di``, key window ``[kf + j*kst, + R0)`` on axis 0."""

    nb: int
    seg: int
    ds: int
    inner: int
    di: int
    kf: int
    kst: int


# ----------------------------------------------------------------------------------------------------------
# the window plan of a grid (cost model picks the segment size per axis)

#: measured kernel throughput (GFLOP/s per core, fp32, D=64) by rows per block; blocks of < 192 rows run as
#: units of 32 rows sharing the block's keys in cache, >= 192 rows as units of 64
_EFF = ((16, 35.0), (32, 55.0), (64, 62.0), (191, 70.0), (767, 70.0), (1 << 30, 75.0))
#: cost of copying one key row into a strip, in score elements of kernel time (D=64: ~5 ns vs ~85 ns)
_STRIP_ROW_COST = 17.0
#: cost of one kernel call (fork/join, Python), in score elements
_CALL_COST = 50.0
#: the backward kernel costs ~2.5x the forward per score element; each block's key gradients
#: ([N, E] for K and V) are folded back, at about the cost of a strip row
_BWD_FACTOR = 2.5
#: masks of a plan kept for reuse, in elements
_MASK_CACHE_ELEMS = 1 << 23


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

    q_tok: [nseg0, ninner, M] token index of every query row (-1 padding).
    inner_seg / inner_kstart: [ninner, ndim-1] segment id / key start per inner axis.
    inner_mask: [ninner, M_inner, R_inner] bool; inner_cls: [ninner] id of distinct inner masks.
    calls: the kernel calls (all blocks, each once). identity: 1-D blocks are plain views of the sequence.
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
    inner_kstart: torch.Tensor
    inner_mask: torch.Tensor
    inner_cls: torch.Tensor
    calls: list
    identity: bool
    k_tok0: torch.Tensor
    k_tok_inner: torch.Tensor
    u_tok: torch.Tensor | None
    _masks: dict = field(default_factory=dict)
    _cached: list = field(default_factory=lambda: [0])

    @property
    def nseg0(self) -> int:
        return self.axes[0].nseg

    @property
    def ninner(self) -> int:
        return self.inner_seg.shape[0]

    def blocks(self, c: Call, j0: int = 0, j1: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.arange(j0, c.nb if j1 is None else j1)
        return c.seg + j * c.ds, c.inner + j * c.di

    def bool_mask(self, segs: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """[nb, M, N] pattern mask (incl. padding) of blocks (segs[j], inner[j])."""
        m0 = self.axes[0].masks[self.axes[0].cls[segs]]                       # [nb, t0, R0]
        mi = self.inner_mask[inner]                                             # [nb, Mi, Ri]
        nb = segs.numel()
        return (m0[:, :, None, :, None] & mi[:, None, :, None, :]).reshape(nb, self.M, self.N)

    def call_mask(self, c: Call, dtype, j0: int = 0, j1: int | None = None) -> torch.Tensor | None:
        """Additive pattern mask of blocks j0..j1 of a call: [1, 1, M, N] when they share it (None if it
        allows everything), else [nb, 1, M, N]. Cached up to _MASK_CACHE_ELEMS per plan."""
        segs, inner = self.blocks(c, j0, j1)
        c0, ci = self.axes[0].cls[segs], self.inner_cls[inner]
        uniform = bool((c0 == c0[0]).all() and (ci == ci[0]).all())
        key = (int(c0[0]), int(ci[0]), dtype) if uniform else (tuple(c0.tolist()), tuple(ci.tolist()), dtype)
        hit = self._masks.get(key)
        if hit is not None or key in self._masks:
            return hit
        m = self.bool_mask(segs[:1], inner[:1]) if uniform else self.bool_mask(segs, inner)
        out = None if (uniform and bool(m.all())) else \
            site_scores(m, dtype).unsqueeze(1)
        if self._cached[0] + m.numel() <= _MASK_CACHE_ELEMS:
            self._masks[key] = out
            self._cached[0] += m.numel()
        return out


def _axis_candidates(pattern, grid, a, causal_u) -> list[AxisPlan]:
    n = grid[a]
    out, seen = [], set()
    t = 1 if len(grid) > 1 else min(16, n)  # 1-D blocks under 16 rows are never cheaper
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


def _cost(axes: tuple[AxisPlan, ...], backward: bool = False) -> float:
    m = math.prod(a.t for a in axes)
    n = math.prod(a.R for a in axes)
    nblk = math.prod(a.nseg for a in axes)
    cost = nblk * _rows(m) * n / _eff(m)
    if backward:
        cost = cost * _BWD_FACTOR + 2 * nblk * n * _STRIP_ROW_COST / 50.0
    if len(axes) > 1:
        strip_rows = axes[0].n * math.prod(a.nseg * a.R for a in axes[1:])
        cost += 2 * strip_rows * _STRIP_ROW_COST / 50.0
        cost += _CALL_COST * axes[0].nseg
    return cost


@functools.lru_cache(maxsize=32)
def window_plan(pattern: Pattern, layout: Layout, causal_1d: bool, tiles: tuple | None = None,
                backward: bool = False) -> WindowPlan:
    """Plan of the grid x grid part (``layout`` without globals' suffix/sinks). ``tiles``: force the segment
    length per axis (tests / tuning); ``backward``: cost the backward kernel (it prefers larger blocks)."""
    grid = layout.grid
    nd = len(grid)
    causal_u = causal_1d and nd == 1
    if tiles is not None:
        axes = tuple(_axis_plan(pattern, grid, a, min(tiles[a], grid[a]), False, causal_u) for a in range(nd))
    else:
        cands = [_axis_candidates(pattern, grid, a, causal_u) for a in range(nd)]
        axes = min(itertools.product(*cands), key=lambda ax: _cost(ax, backward))
    a0, inner = axes[0], axes[1:]
    strides = [math.prod(grid[a + 1:]) for a in range(nd)]
    # inner blocks: product of the inner axes' segments (row-major)
    if inner:
        segs = torch.cartesian_prod(*[torch.arange(ax.nseg) for ax in inner]).view(-1, len(inner))
    else:
        segs = torch.zeros(1, 0, dtype=torch.long)
    ninner = segs.shape[0]

    def rows_tok(ax: AxisPlan, stride: int, seg: torch.Tensor):
        r = torch.arange(ax.t)
        u = ax.qs[seg][:, None] + r[None, :]
        ok = r[None, :] < ax.qlen[seg][:, None]
        return ax.coord[u.clamp_max(ax.n - 1)] * stride, ok

    tok0, ok0 = rows_tok(a0, strides[0], torch.arange(a0.nseg))            # [nseg0, t0]
    tok_i = torch.zeros(ninner, 1, dtype=torch.long)
    ok_i = torch.ones(ninner, 1, dtype=torch.bool)
    ktok_i = torch.zeros(ninner, 1, dtype=torch.long)
    mask_i = torch.ones(ninner, 1, 1, dtype=torch.bool)
    kstart_i = torch.zeros(ninner, len(inner), dtype=torch.long)
    for j, ax in enumerate(inner):
        tj, oj = rows_tok(ax, strides[j + 1], segs[:, j])                  # [ninner, t_j]
        tok_i = (tok_i[:, :, None] + tj[:, None, :]).reshape(ninner, -1)
        ok_i = (ok_i[:, :, None] & oj[:, None, :]).reshape(ninner, -1)
        kstart_i[:, j] = ax.kstart[segs[:, j]]
        kj = ax.coord[kstart_i[:, j][:, None] + torch.arange(ax.R)[None, :]] * strides[j + 1]
        ktok_i = (ktok_i[:, :, None] + kj[:, None, :]).reshape(ninner, -1)
        mj = ax.masks[ax.cls[segs[:, j]]]                                   # [ninner, t_j, R_j]
        mask_i = (mask_i[:, :, None, :, None] & mj[:, None, :, None, :]).reshape(
            ninner, mask_i.shape[1] * mj.shape[1], -1)
    inner_cls = torch.unique(mask_i.reshape(ninner, -1), dim=0, return_inverse=True)[1] if inner \
        else torch.zeros(1, dtype=torch.long)
    q_tok = tok0[:, None, :, None] + tok_i[None, :, None, :] + layout.prefix
    q_ok = ok0[:, None, :, None] & ok_i[None, :, None, :]
    q_tok = torch.where(q_ok, q_tok, -1).reshape(a0.nseg, ninner, -1)
    k_tok0 = a0.coord[a0.kstart[:, None] + torch.arange(a0.R)[None, :]] * strides[0]
    # kernel calls: 1-D (or when cheaper) runs along axis 0 per inner block; else one call per axis-0 segment
    # over every inner block
    runs = _runs(a0.kstart.tolist())
    if inner and a0.nseg <= len(runs) * ninner:
        ks0 = a0.kstart.tolist()
        calls = [Call(ninner, s, 0, 0, 1, ks0[s], 0) for s in range(a0.nseg)]
    else:
        calls = [Call(cnt, first, 1, i, 0, kf, kst) for i in range(ninner) for first, cnt, kf, kst in runs]
    dilated = any(pattern.dilation_of(a, nd) > 1 for a in range(nd))
    identity = nd == 1 and not dilated and a0.n % a0.t == 0 and bool((a0.qlen == a0.t).all())
    u_tok = None
    if dilated:
        t = torch.zeros(1, dtype=torch.long)
        for a in range(nd):
            t = (t[:, None] + axes[a].coord[None, :] * strides[a]).reshape(-1)
        u_tok = t + layout.prefix
    return WindowPlan(axes, layout.prefix, q_tok.shape[-1], a0.R * math.prod(a.R for a in inner),
                      math.prod(a.R for a in inner), q_tok, segs, kstart_i, mask_i, inner_cls, calls, identity,
                      k_tok0, ktok_i, u_tok)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _site_additive(call: AttentionCall, qi: torch.Tensor | None, kj: torch.Tensor | None, dtype
                   ) -> torch.Tensor | None:
    """Site bias + mask (-inf) at token pairs ``qi [..., 1]`` x ``kj [..., N]`` -> ``[Bm, Hm, *pairs]``, in
    ``dtype``, or in fp32 when a wider bias would be rounded to a half ``dtype`` (ATen's flash kernels take an
    fp32 mask beside half q / k / v; the other implementations add the bias in fp32 too). ``qi`` / ``kj`` None (a
    dense call): the terms in their own broadcast 4-D shape (a key-padding mask stays ``[B, 1, 1, Sk]``: ATen's
    flash kernel broadcasts it), never expanded to ``Sq x Sk``."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    if call.bias is not None and dtype in (torch.float16, torch.bfloat16) and call.bias.dtype != dtype:
        dtype = torch.float32
    out = None
    for t in (call.bias, call.mask):
        if t is None:
            continue
        g = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
        if qi is not None:
            g = g.expand(*g.shape[:2], s_q, s_k)[:, :, qi, kj]
        g = site_scores(g, dtype)
        out = g if out is None else out + g
    return out


def _dense_empty_rows(add: torch.Tensor, s_q: int, causal: bool) -> torch.Tensor:
    """Query rows with no allowed key under the additive mask ``add [Bm, Hm, Lm, Sk]`` (``Lm`` is 1 or ``s_q``) and
    the top-left causal mask: ``[Bm, Hm, Lm or s_q]`` bool, in O(mask size) — the causal mask is not built. Under
    causal, row ``i`` is empty iff its first allowed key lies after ``i``."""
    ok = ~torch.isneginf(add)
    if not causal:
        return ~ok.any(-1)
    first = torch.where(ok.any(-1), ok.to(torch.uint8).argmax(-1), s_q)   # argmax: the first maximal entry
    rows = torch.arange(s_q) if add.shape[-2] == s_q else torch.arange(s_q)[None, None, :]
    return first > rows


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
        if call.empty:
            return False, "empty tensor"
        if call.softcap:
            return False, "softcap: ATen's flash kernel takes no score modifier"
        if call.is_causal and call.scale <= 0 and not call.pattern.local:
            return False, "causal with scale <= 0 (ATen's CPU flash kernel returns NaN rows)"
        return True, ""

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, call):
        q, k, v, e = _prep(call)
        dv = call.v.shape[-1]
        if call.pattern.dynamic or call.q_offset:  # per-call block tables, or queries at an offset
            o, l = cpu_tables.forward(call, q, k, v, _acc_dtype(q.dtype))
        elif not call.pattern.local:
            o, l = self._dense_fwd(call, q, k, v)
        else:
            o, l = self._local_fwd(call, q, k, v)
        return o[..., :dv].to(call.q.dtype), l.to(lse_dtype(call.q.dtype))

    def _dense_fwd(self, call, q, k, v):
        add = _site_additive(call, None, None, q.dtype)
        o, l = _FLASH(q, k, v, 0.0, call.is_causal, attn_mask=add, scale=call.scale)
        if add is not None:
            l = l.masked_fill(_dense_empty_rows(add, q.shape[-2], call.is_causal).expand_as(l), NEG_INF)
        return o, l

    def _local_fwd(self, call, q, k, v):
        b, h, s, e = q.shape
        bh = b * h
        lay = call.layout
        acc = _acc_dtype(q.dtype)
        out = q.new_empty(b, h, s, e)
        lse = torch.empty(b, h, s, dtype=acc)
        self._window_fwd(call, q.reshape(bh, s, e), k.reshape(bh, s, e), v.reshape(bh, s, e), out.view(bh, s, e),
                         lse.view(bh, s))
        g0, g1 = lay.prefix, lay.prefix + lay.n_grid
        extra = self._extra_keys(call)
        if extra is not None:
            mask = self._extra_mask(call, extra, q.dtype)
            oe, le = _FLASH(q[:, :, g0:g1], k[:, :, extra], v[:, :, extra], 0.0, False, attn_mask=mask,
                            scale=call.scale)
            if mask is not None:
                le = le.masked_fill(_empty_rows(mask).expand_as(le), NEG_INF)
            ow, lw = _merge(out[:, :, g0:g1].to(acc), lse[:, :, g0:g1], oe.to(acc), le.to(acc))
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
    def _plan(self, call, backward: bool = False) -> WindowPlan:
        nd = len(call.layout.grid)
        return window_plan(call.pattern, Layout(call.layout.grid, call.layout.prefix), call.is_causal and nd == 1,
                           self.tiles, backward)

    def _site_terms(self, call) -> bool:
        """Per-call masks must be materialised (site mask / bias, or causal on a 2-D/3-D grid)."""
        return call.mask is not None or call.bias is not None or (call.is_causal and len(call.layout.grid) > 1)

    @staticmethod
    def _kgrid(plan: WindowPlan, t: torch.Tensor, lay: Layout) -> torch.Tensor:
        """[BH, S, E] -> grid part in u-order [BH, n0, ..., E] (a view when undilated)."""
        bh, _, e = t.shape
        if plan.u_tok is None:
            g = t[:, lay.prefix:lay.prefix + lay.n_grid]
        else:
            g = t.index_select(1, plan.u_tok)
        return g.reshape(bh, *lay.grid, e)

    @staticmethod
    def _strips(plan: WindowPlan, kg: torch.Tensor, tag: str) -> torch.Tensor:
        """u-order grid [BH, n0, n1(, n2), E] -> strips [ninner, BH, n0, R_inner, E] (1-D: a view of K)."""
        bh, n0 = kg.shape[:2]
        e = kg.shape[-1]
        if len(plan.axes) == 1:
            return kg.unsqueeze(0).unsqueeze(3)
        out = _workspace(tag, (plan.ninner, bh, n0, *[a.R for a in plan.axes[1:]], e), kg.dtype)
        for i, st in enumerate(plan.inner_kstart.tolist()):
            src = kg
            for j, a in enumerate(plan.axes[1:]):
                src = src.narrow(2 + j, st[j], a.R)
            out[i].copy_(src)
        return out.view(plan.ninner, bh, n0, plan.R_inner, e)

    @staticmethod
    def _unstrip(plan: WindowPlan, strips: torch.Tensor, bh: int, e: int) -> torch.Tensor:
        """Adjoint of :meth:`_strips`: [ninner, BH, n0, R_inner, E] -> [BH, n_grid (u-order), E]."""
        n0 = plan.axes[0].n
        if len(plan.axes) == 1:
            return strips[0, :, :, 0]
        out = strips.new_zeros(bh, n0, *[a.n for a in plan.axes[1:]], e)
        st = strips.view(plan.ninner, bh, n0, *[a.R for a in plan.axes[1:]], e)
        for i, s in enumerate(plan.inner_kstart.tolist()):
            dst = out
            for j, a in enumerate(plan.axes[1:]):
                dst = dst.narrow(2 + j, s[j], a.R)
            dst.add_(st[i])
        return out.reshape(bh, -1, e)

    @staticmethod
    def _kview(strips: torch.Tensor, plan: WindowPlan, c: Call, j0: int, j1: int) -> torch.Tensor:
        """Keys of blocks j0..j1 of a call: [nb, BH, N, E], a strided (overlapping) view of the strips."""
        _, bh, _, ri, e = strips.shape
        s_i, s_b, s_r, s_c, _ = strips.stride()
        assert ri == 1 or s_r == ri * s_c, "strips rows must be contiguous runs of R_inner keys"
        return torch.as_strided(strips, (j1 - j0, bh, plan.N, e),
                                (c.di * s_i + c.kst * s_r, s_b, s_r if ri == 1 else s_c, 1),
                                strips.storage_offset() + (c.inner + j0 * c.di) * s_i + (c.kf + j0 * c.kst) * s_r)

    @staticmethod
    def _qview(blocks: torch.Tensor, c: Call, j0: int, j1: int) -> torch.Tensor:
        """Rows of blocks j0..j1 of a call from a block tensor [nseg0, ninner, BH, M, *]: [nb, BH, M, *]."""
        st = blocks.stride()
        return torch.as_strided(blocks, (j1 - j0, *blocks.shape[2:]), (c.ds * st[0] + c.di * st[1], *st[2:]),
                                blocks.storage_offset() + (c.seg + j0 * c.ds) * st[0] + (c.inner + j0 * c.di) * st[1])

    def _blocks(self, plan: WindowPlan, t: torch.Tensor, tag: str) -> torch.Tensor:
        """Token-order rows [BH, S, *] -> blocks [nseg0, ninner, BH, M, *]: a view for 1-D identity plans
        (writes land in ``t``), else a gathered copy (padding rows read token 0)."""
        bh, rest = t.shape[0], t.shape[2:]
        if plan.identity:
            n0 = plan.axes[0].n
            g = t[:, plan.prefix:plan.prefix + n0].unflatten(1, (plan.nseg0, plan.M))
            return g.transpose(0, 1).unsqueeze(1)
        idx = plan.q_tok.clamp_min(0).reshape(-1)
        g = torch.index_select(t, 1, idx, out=_workspace(tag + "_g", (bh, idx.numel(), *rest), t.dtype))
        g = g.view(bh, plan.nseg0, plan.ninner, plan.M, *rest).permute(1, 2, 0, 3, *range(4, g.dim() + 2))
        out = _workspace(tag, g.shape, t.dtype)
        out.copy_(g)
        return out

    def _unblock_into(self, plan: WindowPlan, blocks: torch.Tensor, dst: torch.Tensor) -> None:
        """Write blocks [nseg0, ninner, BH, M, *] into token-order rows ``dst [BH, S, *]``."""
        if plan.identity:
            return  # the blocks were views of dst
        bh, rest = blocks.shape[2], blocks.shape[4:]
        flat = blocks.permute(2, 0, 1, 3, *range(4, blocks.dim())).reshape(bh, -1, *rest)
        tok = plan.q_tok.reshape(-1)
        valid = tok >= 0
        if not bool(valid.all()):
            flat, tok = flat[:, valid], tok[valid]
        dst.index_copy_(1, tok, flat.to(dst.dtype))

    def _site_mask(self, call, plan: WindowPlan, c: Call, j0: int, j1: int, dtype) -> torch.Tensor:
        """Pattern + site terms (mask, bias, 2-D/3-D causal) of blocks j0..j1: [nb, BH or 1, M, N]."""
        b, h = call.q.shape[:2]
        segs, inner = plan.blocks(c, j0, j1)
        nb = segs.numel()
        qi = plan.q_tok[segs, inner].clamp_min(0)[:, :, None]                   # [nb, M, 1]
        kj = (plan.k_tok0[segs][:, :, None] + plan.k_tok_inner[inner][:, None, :]).reshape(nb, 1, -1) + plan.prefix
        keep = plan.bool_mask(segs, inner)
        if call.is_causal:
            keep = keep & (kj <= qi)
        m = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, NEG_INF)[:, None]   # [nb, 1, M, N]
        add = _site_additive(call, qi, kj, dtype)                               # [Bm, Hm, nb, M, N]
        if add is not None:
            bm, hm = add.shape[:2]
            m = m + add.permute(2, 0, 1, 3, 4).reshape(nb, bm * hm, plan.M, plan.N) if (bm, hm) in ((1, 1), (b, h)) \
                else m + add.permute(2, 0, 1, 3, 4).expand(nb, b, h, plan.M, plan.N).reshape(nb, b * h, plan.M, plan.N)
        return m

    def _chunks(self, call, plan: WindowPlan, bh: int, e: int, grads: bool):
        """(call, j0, j1) pieces whose materialised mask / key gradients stay under CHUNK_ELEMS."""
        per = (plan.M * plan.N * (bh if (call.mask is not None or call.bias is not None) else 1)
               if self._site_terms(call) else 0)
        if grads:
            per += 2 * bh * plan.N * e
        step = max(1, CHUNK_ELEMS // max(1, per))
        for c in plan.calls:
            for j0 in range(0, c.nb, step):
                yield c, j0, min(c.nb, j0 + step)

    def _window_fwd(self, call, q, k, v, out, lse):
        """Grid rows of ``out [BH, S, E]`` / ``lse [BH, S]``."""
        bh, s, e = q.shape
        lay = call.layout
        plan = self._plan(call)
        site = self._site_terms(call)
        qb = self._blocks(plan, q, "q")
        ks = self._strips(plan, self._kgrid(plan, k, lay), "k")
        vs = self._strips(plan, self._kgrid(plan, v, lay), "v")
        ob = self._blocks(plan, out, "") if plan.identity else _workspace("o", qb.shape, qb.dtype)
        lb = self._blocks(plan, lse, "") if plan.identity else _workspace("l", qb.shape[:-1], lse.dtype)
        for c, j0, j1 in self._chunks(call, plan, bh, e, False):
            mask = self._site_mask(call, plan, c, j0, j1, q.dtype) if site else plan.call_mask(c, q.dtype, j0, j1)
            o, l = _FLASH(self._qview(qb, c, j0, j1), self._kview(ks, plan, c, j0, j1),
                          self._kview(vs, plan, c, j0, j1), 0.0, False, attn_mask=mask, scale=call.scale)
            if site:
                l = l.masked_fill(_empty_rows(mask).expand_as(l), NEG_INF)
            self._qview(ob, c, j0, j1).copy_(o)
            self._qview(lb, c, j0, j1).copy_(l)
        self._unblock_into(plan, ob, out)
        self._unblock_into(plan, lb, lse)

    # -- backward --------------------------------------------------------------------------------------------
    def backward(self, call, grad_out, out, lse, need_dbias):
        if need_dbias and call.bias is not None:  # ATen's backward returns no dS: the bias gradient needs blocked
            bump("dispatch", "blocked: cpu backward with a bias gradient")
            return Blocked().backward(call, grad_out, out, lse, need_dbias)
        q, k, v, e = _prep(call)
        dt = q.dtype
        go = _pad_last(grad_out.to(dt), e)
        o = _pad_last(out.to(dt), e)
        l = _bwd_lse(lse, dt)
        if call.pattern.dynamic or call.q_offset:
            dq, dk, dv = cpu_tables.backward(call, q, k, v, go, o, l, _acc_dtype(dt))
        elif not call.pattern.local:
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
        add = _site_additive(call, None, None, q.dtype)
        return _FLASH_BWD(go, q, k, v, o, l, 0.0, call.is_causal, attn_mask=add, scale=call.scale)

    def _local_bwd(self, call, q, k, v, go, o, l):
        b, h, s, e = q.shape
        bh = b * h
        lay = call.layout
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(b, h, s, e, dtype=acc)
        dk = torch.zeros(b, h, s, e, dtype=acc)
        dv = torch.zeros(b, h, s, e, dtype=acc)
        flat = lambda t: t.reshape(bh, s, *t.shape[3:])
        self._window_bwd(call, flat(q), flat(k), flat(v), flat(go), flat(o), flat(l), flat(dq), flat(dk), flat(dv))
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
    def _fold(dst: torch.Tensor, g: torch.Tensor, plan: WindowPlan, c: Call, j0: int, j1: int) -> None:
        """``dst`` strips [ninner, BH, n0, R_inner, E] += key gradients ``g [nb, BH, N, E]`` of blocks j0..j1.
        Windows of a run overlap; they are added in phases of ``kst`` rows, each a non-overlapping view."""
        nb = j1 - j0
        _, bh, _, ri, e = dst.shape
        r0 = plan.axes[0].R
        g = g.reshape(nb, bh, r0, ri, e)
        kf, i = c.kf + j0 * c.kst, c.inner + j0 * c.di
        if c.di:  # one window per strip (kst == 0)
            dst[i:i + nb, :, kf:kf + r0] += g
            return
        d = dst[i]
        if c.kst == 0 or nb == 1:
            d[:, kf:kf + r0] += g.sum(0)
            return
        s_b, s_r, s_c, _ = d.stride()
        g = g.transpose(0, 1)
        for p0 in range(0, r0, c.kst):
            ln = min(c.kst, r0 - p0)
            view = torch.as_strided(d, (bh, nb, ln, ri, e), (s_b, c.kst * s_r, s_r, s_c, 1),
                                    d.storage_offset() + (kf + p0) * s_r)
            view.add_(g[:, :, p0:p0 + ln])

    def _window_bwd(self, call, q, k, v, go, o, l, dq, dk, dv):
        """All [BH, S, *]; adds the window part's gradients into dq/dk/dv (zeros on entry)."""
        bh, s, e = q.shape
        lay = call.layout
        plan = self._plan(call, backward=True)
        site = self._site_terms(call)
        acc = dq.dtype
        qb, gob, obk, lb = (self._blocks(plan, t, tag) for t, tag in ((q, "q"), (go, "go"), (o, "o"), (l, "l")))
        ks = self._strips(plan, self._kgrid(plan, k, lay), "k")
        vs = self._strips(plan, self._kgrid(plan, v, lay), "v")
        dks = _workspace("dk", ks.shape, acc, zero=True)
        dvs = _workspace("dv", vs.shape, acc, zero=True)
        dqb = self._blocks(plan, dq, "") if plan.identity else _workspace("dq", qb.shape, acc)
        for c, j0, j1 in self._chunks(call, plan, bh, e, True):
            mask = self._site_mask(call, plan, c, j0, j1, q.dtype) if site else plan.call_mask(c, q.dtype, j0, j1)
            qv = lambda t: self._qview(t, c, j0, j1)
            gq, gk, gv = _FLASH_BWD(qv(gob), qv(qb), self._kview(ks, plan, c, j0, j1),
                                    self._kview(vs, plan, c, j0, j1), qv(obk), qv(lb), 0.0, False,
                                    attn_mask=mask, scale=call.scale)
            qv(dqb).copy_(gq)
            self._fold(dks, gk, plan, c, j0, j1)
            self._fold(dvs, gv, plan, c, j0, j1)
        self._unblock_into(plan, dqb, dq)
        g0, g1 = lay.prefix, lay.prefix + lay.n_grid
        for src, dst in ((dks, dk), (dvs, dv)):
            grid_u = self._unstrip(plan, src, bh, e)                            # [BH, n_grid (u-order), E]
            if plan.u_tok is None:
                dst[:, g0:g1] += grid_u
            else:
                dst.index_add_(1, plan.u_tok, grid_u)
