"""The CPU path's table executor: ATen's fused CPU flash kernel over the key blocks of the block tables.

:mod:`locattn.codegen.cpu_fast` runs static local patterns through its window schedule (overlapping strided
views of K/V, no gather). Calls that schedule cannot express run here instead: ``dynamic`` patterns (key
blocks chosen per batch element and head on every call) and queries at an offset (a causal rule's last S_q of
S_k positions). Both walk the same :class:`~locattn.patterns.tables.BlockTables` as ``blocked`` (its gather
helpers are shared): per chunk of query blocks, the visited key blocks of every (batch, head) are gathered
into ``[c, B*H, N, E]`` and one fused flash call computes the chunk with an additive mask for partial entries
and unused slots (none when every slot of the chunk is allowed).

Glossary: c query blocks per chunk, BM query slots per block, N = L * BN key slots per query block, E the
padded head dim (:func:`locattn.codegen.cpu_fast._prep`).
"""

from __future__ import annotations

import torch

from .blocked import chunk_keep, chunk_keys, gather_rows, scatter_add, setup, site_terms
from .registry import AttentionCall, bias_scores

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")
#: elements of one chunk's gathered keys plus mask (bounds peak memory)
CHUNK_ELEMS = 1 << 24
BLOCK = 64


def _blocks(call: AttentionCall):
    """(tables, gather, chunk) with chunks bounded by CHUNK_ELEMS of mask + keys."""
    return setup(call, BLOCK, BLOCK, CHUNK_ELEMS)


def _chunk_mask(call: AttentionCall, tables, g, sl, tk_c, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive mask ``[c, BH or 1, BM, N]`` of a chunk (None when every pair is allowed) and its empty rows."""
    tq_c = g.tok_q[sl]
    keep = chunk_keep(call, tables, g, sl)                                     # [c, BM, N] or [B, H, c, BM, N]
    bias, mask = site_terms(call, tq_c, tk_c)
    if mask is not None:
        keep = keep & mask
    if bias is None and bool(keep.all()):
        return None, None
    if bias is not None and dtype in (torch.float16, torch.bfloat16) and bias.dtype != dtype:
        dtype = torch.float32
    add = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, NEG_INF)
    if bias is not None:
        add = add + bias_scores(bias, dtype)
    if add.dim() == 3:
        add = add[:, None]
    else:  # [Bm, Hm, c, BM, N] -> [c, 1 or B * H, BM, N]
        b, h = call.q.shape[:2]
        if tuple(add.shape[:2]) not in ((1, 1), (b, h)):
            add = add.expand(b, h, *add.shape[2:])
        add = add.permute(2, 0, 1, 3, 4).flatten(1, 2)
    return add, torch.isneginf(add).all(-1)


def _rows(t: torch.Tensor, tq_c: torch.Tensor) -> torch.Tensor:
    """Query rows ``tq_c [c, BM]`` of ``t [B, H, S, *]`` as ``[c, B * H, BM, *]`` (padding rows read row 0)."""
    b, h = t.shape[:2]
    c, bm = tq_c.shape
    g = t.index_select(2, tq_c.clamp_min(0).flatten()).view(b * h, c, bm, *t.shape[3:])
    return g.transpose(0, 1)


def _keys(t: torch.Tensor, tk_c: torch.Tensor) -> torch.Tensor:
    """Key rows of a chunk as ``[c, B * H, N, E]``."""
    g = gather_rows(t, tk_c)                                                   # [B, H, c, N, E]
    return g.flatten(0, 1).transpose(0, 1)


def forward(call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, S, E] (kv heads repeated, head dims padded). Returns out [B, H, S_q, E], lse [B, H, S_q]."""
    b, h, s_q, e = q.shape
    tables, g, chunk = _blocks(call)
    out = q.new_zeros(b, h, s_q, e)
    lse = torch.full((b, h, s_q), NEG_INF, dtype=acc)
    for m0 in range(0, tables.plan.n_qblocks, chunk):
        sl = slice(m0, m0 + chunk)
        tq_c = g.tok_q[sl]
        tk_c = chunk_keys(call, tables, g, sl)
        mask, empty = _chunk_mask(call, tables, g, sl, tk_c, q.dtype)
        o, l = _FLASH(_rows(q, tq_c), _keys(k, tk_c), _keys(v, tk_c), 0.0, False, attn_mask=mask, scale=call.scale)
        if empty is not None:
            l = l.masked_fill(empty.expand_as(l), NEG_INF)
        _store(out, o, tq_c)
        _store(lse, l, tq_c)
    return out, lse


def backward(call: AttentionCall, q, k, v, go, o, l, acc: torch.dtype):
    """All [B, H, S, E] (``l``: the kernel normaliser [B, H, S_q], empty rows 0). Returns dq, dk, dv in ``acc``."""
    b, h, s_q, e = q.shape
    tables, g, chunk = _blocks(call)
    dq = torch.zeros(b, h, s_q, e, dtype=acc)
    dk = torch.zeros(b, h, k.shape[2], e, dtype=acc)
    dv = torch.zeros(b, h, k.shape[2], e, dtype=acc)
    for m0 in range(0, tables.plan.n_qblocks, chunk):
        sl = slice(m0, m0 + chunk)
        tq_c = g.tok_q[sl]
        tk_c = chunk_keys(call, tables, g, sl)
        mask, _ = _chunk_mask(call, tables, g, sl, tk_c, q.dtype)
        gq, gk, gv = _FLASH_BWD(_rows(go, tq_c), _rows(q, tq_c), _keys(k, tk_c), _keys(v, tk_c), _rows(o, tq_c),
                                _rows(l, tq_c), 0.0, False, attn_mask=mask, scale=call.scale)
        _store(dq, gq, tq_c)
        c = tq_c.shape[0]
        for src, dst in ((gk, dk), (gv, dv)):
            vals = src.transpose(0, 1).reshape(b, h, c, -1, e).to(acc)
            scatter_add(dst, tk_c, vals)
    return dq, dk, dv


def _store(dst: torch.Tensor, blocks: torch.Tensor, tq_c: torch.Tensor) -> None:
    """Write chunk rows ``blocks [c, B * H, BM, *]`` into ``dst [B, H, S, *]`` at query rows ``tq_c``."""
    b, h = dst.shape[:2]
    c, bm = tq_c.shape
    flat = blocks.transpose(0, 1).reshape(b, h, c * bm, *blocks.shape[3:])
    valid = (tq_c >= 0).flatten()
    dst.index_copy_(2, tq_c.flatten()[valid], flat[:, :, valid].to(dst.dtype))
