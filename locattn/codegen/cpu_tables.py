"""The CPU path's table executor: ATen's fused CPU flash kernel over the key blocks of the block tables.

:mod:`locattn.codegen.cpu_fast` runs static local patterns through its window schedule (overlapping strided
views of K/V, no gather). Calls that schedule cannot express run here instead: ``dynamic`` patterns (key
blocks chosen per batch element and head on every call) and queries at an offset (a causal rule's last S_q of
S_k positions). Both walk the same :class:`~locattn.patterns.tables.BlockTables` as ``blocked`` and Triton.

Each query block's entries split into its **full** part (every pair allowed: no mask at all) and its
**partial** part (the pattern's predicate, masked). Rows are bucketed by how many entries a part has; one fused
flash call runs a bucket: its rows on the kernel's batch axis, their key blocks gathered into one contiguous
run. The full and partial results of a row merge by log-sum-exp; the backward runs each bucket again with the
merged ``out`` / ``lse`` (the flash backward only needs the row's normaliser) and adds the gradients.

Glossary: X tables (1 shared: a bucket's rows carry every (batch, head) on the kernel's head axis; B * H: one
(batch, head) per row, head axis 1); BM / BN query / key slots per block; E the padded head dim
(:func:`locattn.codegen.cpu_fast._prep`); "blocked" tensors are ``[BH, n_blocks, BLOCK, E]``, a view of the
model's tensor when slot i is token i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns.base import allowed
from .blocked import call_tables
from .registry import AttentionCall, site_scores
from .workspace import workspace

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")
BLOCK = 64
#: elements of one bucket call's gathered keys (rows x keys x E): bounds peak memory. 16 MB of fp32 keeps the
#: flash backward's fresh key-gradient tensors under glibc's largest mmap threshold (32 MB), so the allocator
#: recycles them instead of page-faulting new ones on every call (measured: 64 MB calls spent ~1/10 of the
#: backward zero-filling fresh pages)
CALL_ELEMS = 1 << 22


@dataclass
class Bucket:
    """Rows of one part with the same number ``c`` of entries: table ``xs [n]`` (None when shared), query
    block ``ms [n]``, key blocks ``idx [n, c]`` and, for partial parts, whole flags ``whole [n, c]``."""

    xs: torch.Tensor | None
    ms: torch.Tensor
    idx: torch.Tensor
    whole: torch.Tensor | None
    full: bool


def _buckets(call: AttentionCall, tables, bh: int, e: int):
    """The buckets of both parts, each split so a call's gathered keys stay under CALL_ELEMS."""
    x_n = tables.n_tables
    plan = tables.plan
    ptr, split, idx = tables.kv_ptr.cpu(), tables.kv_split.cpu(), tables.kv_idx.cpu()
    whole = tables.kv_whole.cpu() if tables.kv_whole is not None else None
    starts = {True: ptr[:, :-1], False: split}
    ends = {True: split, False: ptr[:, 1:]}
    heads = bh if x_n == 1 else 1
    out = []
    for full in (True, False):
        cnt = ends[full] - starts[full]                                        # [X, NQ]
        for c in torch.unique(cnt).tolist():
            if c == 0:
                continue
            xs, ms = torch.nonzero(cnt == c, as_tuple=True)
            j = starts[full][xs, ms][:, None] + torch.arange(c)
            ix = idx[xs[:, None], j]
            wh = whole[xs[:, None], j] if (whole is not None and not full) else None
            step = max(1, CALL_ELEMS // max(1, c * plan.block_n * e * heads))
            for r0 in range(0, xs.numel(), step):
                sl = slice(r0, r0 + step)
                out.append(Bucket(xs[sl] if x_n > 1 else None, ms[sl], ix[sl], wh[sl] if wh is not None else None,
                                  full))
    return out


def _blocked(t: torch.Tensor, slots: torch.Tensor, block: int) -> torch.Tensor:
    """``t [BH, S, E]`` as ``[BH, n_blocks, block, E]`` in slot order (padding slots read row 0): a view when
    slot i is row i (the sequence a multiple of the block), else a gathered copy."""
    n = slots.numel()
    if n == t.shape[1] and torch.equal(slots, torch.arange(n)):
        return t.view(t.shape[0], n // block, block, t.shape[-1])
    return t.index_select(1, slots.clamp_min(0)).view(t.shape[0], n // block, block, t.shape[-1])


def _rows(tb: torch.Tensor, bk: Bucket) -> torch.Tensor:
    """Query rows of a bucket: ``[n, heads, BM, E]`` (shared tables: every (batch, head) on the heads axis)."""
    if bk.xs is None:
        return tb[:, bk.ms].transpose(0, 1)
    return tb[bk.xs, bk.ms].unsqueeze(1)


def _keys(tb: torch.Tensor, bk: Bucket, tag: str) -> torch.Tensor:
    """Key rows of a bucket: ``[n, heads, c * BN, E]``, each row's key blocks gathered into one run (in the
    per-thread ``tag`` workspace: valid until the next bucket)."""
    n, c = bk.idx.shape
    bh, nk, bn, e = tb.shape
    if bk.xs is None:
        g = torch.index_select(tb, 1, bk.idx.flatten(), out=workspace(tag, (bh, n * c, bn, e), tb.dtype))
        return g.view(bh, n, c * bn, e).transpose(0, 1)
    flat = (bk.xs[:, None] * nk + bk.idx).flatten()
    g = torch.index_select(tb.reshape(bh * nk, bn, e), 0, flat, out=workspace(tag, (n * c, bn, e), tb.dtype))
    return g.view(n, 1, c * bn, e)


def _mask(call: AttentionCall, tables, bk: Bucket, b: int, h: int, dtype) -> torch.Tensor | None:
    """Additive mask ``[n, 1 or heads, BM, c * BN]`` of a bucket: the pattern's predicate (partial parts), the
    site's causality, mask and bias; None when every pair is allowed (full parts without site terms)."""
    terms = [t for t in (call.mask, call.bias) if t is not None]
    if bk.full and not terms and not call.is_causal:
        return None  # a full entry: every pair allowed (the plan dropped causal entries it could not keep whole)
    plan = tables.plan
    bm, bn = plan.block_m, plan.block_n
    q_slots, k_slots = plan.q_slots, plan.k_slots
    qi = q_slots.view(-1, bm)[bk.ms][:, None, :, None]                         # [n, 1, BM, 1] query rows
    kj = k_slots.view(-1, bn)[bk.idx].reshape(bk.idx.shape[0], 1, 1, -1)      # [n, 1, 1, N] key tokens
    keep = None
    if not bk.full:
        tq = qi.clamp_min(0) + call.q_offset
        p = call.pattern
        static = p.static if p.dynamic else p
        keep = allowed(static, call.layout, tq, kj.clamp_min(0))
        if bk.whole is not None:
            w = bk.whole[:, None, None, :].repeat_interleave(bn, -1)
            keep = keep | ((w & (kj <= tq)) if p.causal else w)
        keep = keep & (qi >= 0) & (kj >= 0)
        if call.is_causal:
            keep = keep & (kj <= qi)
    if keep is not None and not terms and bool(keep.all()):
        return None
    add = None
    if terms:
        add = _site_terms(call, bk, qi[:, 0, :, 0], kj[:, 0, 0, :], b, h, dtype)
    if keep is not None:
        k_add = torch.zeros(keep.shape, dtype=add.dtype if add is not None else dtype).masked_fill_(~keep, NEG_INF)
        add = k_add if add is None else add + k_add
    return add


def _site_terms(call: AttentionCall, bk: Bucket, qi: torch.Tensor, kj: torch.Tensor, b: int, h: int, dtype):
    """Site mask / bias at (row, key token) of a bucket: additive ``[n, heads or 1, BM, N]``."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    if call.bias is not None and dtype in (torch.float16, torch.bfloat16) and call.bias.dtype != dtype:
        dtype = torch.float32  # a wider bias is added in fp32, as by every implementation
    out = None
    for t in (call.bias, call.mask):
        if t is None:
            continue
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
        t4 = t4.expand(b, h, s_q, s_k).reshape(b * h, s_q, s_k)
        qc, kc = qi.clamp_min(0), kj.clamp_min(0)
        if bk.xs is None:                                                       # [BH, n, BM, N] -> [n, BH, ..]
            g = t4[:, qc[:, :, None], kc[:, None, :]].transpose(0, 1)
        else:
            g = t4[bk.xs[:, None, None], qc[:, :, None], kc[:, None, :]].unsqueeze(1)
        g = site_scores(g, dtype)
        out = g if out is None else out + g
    return out


def _put(dst: torch.Tensor, bk: Bucket, val: torch.Tensor) -> None:
    """Store bucket rows ``val [n, heads, BM, *]`` into blocked ``dst [BH, NQ, BM, *]``."""
    if bk.xs is None:
        dst[:, bk.ms] = val.transpose(0, 1).to(dst.dtype)
    else:
        dst[bk.xs, bk.ms] = val[:, 0].to(dst.dtype)


def _take(src: torch.Tensor, bk: Bucket) -> torch.Tensor:
    """Bucket rows ``[n, heads, BM, *]`` of blocked ``src [BH, NQ, BM, *]``."""
    if bk.xs is None:
        return src[:, bk.ms].transpose(0, 1)
    return src[bk.xs, bk.ms].unsqueeze(1)


def _merge(o1, l1, o2, l2):
    """Logsumexp merge of two partial attentions over disjoint keys (out [..., E] fp32/64, lse [...])."""
    l = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isneginf(l), torch.zeros_like(l), l)
    return o1 * torch.exp(l1 - safe)[..., None] + o2 * torch.exp(l2 - safe)[..., None], l


def _unblock(blocked: torch.Tensor, slots: torch.Tensor, rows: int) -> torch.Tensor:
    """Blocked ``[BH, NQ, BM, *]`` back to ``[BH, rows, *]`` (padding slots dropped)."""
    flat = blocked.reshape(blocked.shape[0], -1, *blocked.shape[3:])
    if slots.numel() == rows and torch.equal(slots, torch.arange(rows)):
        return flat
    valid = slots >= 0
    out = flat.new_zeros(flat.shape[0], rows, *flat.shape[2:])
    out[:, slots[valid]] = flat[:, valid]
    return out


def forward(call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, S, E] (kv heads repeated, head dims padded). Returns out [B, H, S_q, E], lse [B, H, S_q]."""
    b, h, s_q, e = q.shape
    bh = b * h
    tables = call_tables(call, BLOCK, BLOCK)
    plan = tables.plan
    qb = _blocked(q.reshape(bh, s_q, e), plan.q_slots, plan.block_m)
    kb = _blocked(k.reshape(bh, -1, e), plan.k_slots, plan.block_n)
    vb = _blocked(v.reshape(bh, -1, e), plan.k_slots, plan.block_n)
    nq, bm = qb.shape[1], plan.block_m
    out = torch.zeros(bh, nq, bm, e, dtype=acc)
    lse = torch.full((bh, nq, bm), NEG_INF, dtype=acc)
    for bk in _buckets(call, tables, bh, e):
        mask = _mask(call, tables, bk, b, h, q.dtype)
        o, l = _FLASH(_rows(qb, bk), _keys(kb, bk, "tk"), _keys(vb, bk, "tv"), 0.0, False, attn_mask=mask,
                    scale=call.scale)
        if mask is not None:
            l = l.masked_fill(torch.isneginf(mask).all(-1).expand_as(l), NEG_INF)
        if not bk.full:  # a row's full part ran first (its own bucket): merge with it
            o, l = _merge(_take(out, bk), _take(lse, bk), o.to(acc), l.to(acc))
        _put(out, bk, o)
        _put(lse, bk, l)
    return _unblock(out.to(q.dtype), plan.q_slots, s_q).view(b, h, s_q, e), \
        _unblock(lse, plan.q_slots, s_q).view(b, h, s_q)


def backward(call: AttentionCall, q, k, v, go, o, l, acc: torch.dtype):
    """All [B, H, S, E] (``l``: the kernel normaliser [B, H, S_q], empty rows 0). Returns dq, dk, dv in ``acc``."""
    b, h, s_q, e = q.shape
    s_k = k.shape[2]
    bh = b * h
    tables = call_tables(call, BLOCK, BLOCK)
    plan = tables.plan
    qs, ks = plan.q_slots, plan.k_slots
    qb = _blocked(q.reshape(bh, s_q, e), qs, plan.block_m)
    gob = _blocked(go.reshape(bh, s_q, e), qs, plan.block_m)
    ob = _blocked(o.reshape(bh, s_q, e), qs, plan.block_m)
    lb = _blocked(l.reshape(bh, s_q, 1), qs, plan.block_m)[..., 0]
    kb = _blocked(k.reshape(bh, s_k, e), ks, plan.block_n)
    vb = _blocked(v.reshape(bh, s_k, e), ks, plan.block_n)
    dqb = torch.zeros(qb.shape, dtype=acc)
    dkb = torch.zeros(kb.shape, dtype=acc)
    dvb = torch.zeros(vb.shape, dtype=acc)
    for bk in _buckets(call, tables, bh, e):
        mask = _mask(call, tables, bk, b, h, q.dtype)
        gq, gk, gv = _FLASH_BWD(_rows(gob, bk), _rows(qb, bk), _keys(kb, bk, "tk"), _keys(vb, bk, "tv"),
                                _rows(ob, bk),
                                _rows(lb[..., None], bk)[..., 0], 0.0, False, attn_mask=mask, scale=call.scale)
        _put(dqb, bk, _take(dqb, bk) + gq.to(acc))
        n, c = bk.idx.shape
        for g, dst in ((gk, dkb), (gv, dvb)):
            g = g.to(acc).reshape(n, -1, c, plan.block_n, e)                    # [n, heads, c, BN, E]
            if bk.xs is None:
                dst.index_add_(1, bk.idx.flatten(), g.permute(1, 0, 2, 3, 4).reshape(bh, n * c, plan.block_n, e))
            else:  # index_add_ over whole blocks (16x faster here than index_put_ with accumulate)
                nk = dst.shape[1]
                dst.view(bh * nk, -1).index_add_(0, (bk.xs[:, None] * nk + bk.idx).flatten(), g.reshape(n * c, -1))
    dq = _unblock(dqb, qs, s_q).view(b, h, s_q, e)
    dk = _scatter_keys(dkb, ks, s_k).view(b, h, s_k, e)
    dv = _scatter_keys(dvb, ks, s_k).view(b, h, s_k, e)
    return dq, dk, dv


def _scatter_keys(blocked: torch.Tensor, slots: torch.Tensor, rows: int) -> torch.Tensor:
    """Key gradients ``[BH, NK, BN, E]`` back to ``[BH, rows, E]``; padding slots dropped."""
    return _unblock(blocked, slots, rows)
