"""Plan-driven PyTorch implementation: exact attention over the block tables, on any device.

For each chunk of query blocks it gathers the key blocks the call's :class:`~locattn.patterns.tables.BlockTables`
list (per batch element and head for a ``dynamic`` pattern, shared otherwise), runs one batched masked attention
and scatters the result back to the model's token order. Memory is O(chunk * keys visited), never O(S^2)
(a site ``bias`` of shape [.., Sq, Sk] is the only S^2 object, and it is the user's).

The gather helpers here (:func:`setup`, :func:`chunk_keys`, :func:`chunk_keep`, :func:`gather_rows`,
:func:`site_terms`, :func:`scatter_add`) are shared with the CPU path's table executor
(:mod:`locattn.codegen.cpu_tables`), which runs the same chunks through ATen's fused kernel.

Glossary: BLOCK_M / BLOCK_N query / key slots per block; L the most key blocks any query block visits
(shorter rows are padded with masked blocks; for dynamic tables L is read from the device, one sync per call:
this is the portable fallback, not a GPU hot path); a "chunk" is a run of query blocks processed together;
X the number of tables (1 shared, or B * H); N = L * BLOCK_N key slots per query block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..patterns.base import allowed
from ..patterns.plan import build_plan
from ..patterns.tables import BlockTables, static_tables
from .reference import compute_dtype, expand_kv, keep_mask, masked_softmax, reduce_to, softcap_scores
from .registry import AttentionCall, Implementation, bias_scores, lse_dtype

#: scores of one chunk are kept below this many elements (fp32): bounds peak memory
CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class Gather:
    """Index tables of block tables: query rows of every query slot, and per table the key token and kind of
    every visited key slot, each row's entries in ascending key-block order.

    tok_q: [NQ, BM] query row (-1 padding); tok_k: [X, NQ, N] key token (-1 padding / unused entry);
    full / whole: [X, NQ, N] bool, the slot's entry is full / kept whole by a dynamic selection (None for
    static tables); keep: [NQ, BM, N] cached pattern & causal & valid (static tables of small plans)."""

    tok_q: torch.Tensor
    tok_k: torch.Tensor
    full: torch.Tensor | None
    whole: torch.Tensor | None
    keep: torch.Tensor | None


def call_tables(call: AttentionCall, block_m: int, block_n: int) -> BlockTables:
    """The block tables of ``call`` on its device: the static plan's (shared), or, for a ``dynamic`` pattern,
    the call's selection merged with its static part's plan (blocks = the pooling blocks, whatever
    ``block_m`` / ``block_n``)."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    dev = call.q.device
    p = call.pattern
    if not p.dynamic:
        plan = build_plan(p, call.layout, s_q, s_k, block_m, block_n, call.is_causal, call.q_offset)
        return static_tables(plan, dev)
    return call.dynamic_tables()


def _gather(tables: BlockTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tok_q, tok_k, full, whole) of :class:`Gather` from ``tables`` (entries re-sorted by key block, so a
    row's keys are summed in the same order whatever the tables' full-first order)."""
    plan = tables.plan
    nq, bm, bn = plan.n_qblocks, plan.block_m, plan.block_n
    dev = tables.kv_ptr.device
    ptr, split = tables.kv_ptr, tables.kv_split
    counts = ptr[:, 1:] - ptr[:, :-1]                                          # [X, NQ]
    L = max(1, int(counts.max()) if nq else 1)
    j = ptr[:, :-1, None] + torch.arange(L, device=dev)                        # [X, NQ, L]
    valid = torch.arange(L, device=dev) < counts[..., None]
    jc = j.clamp_max(tables.kv_idx.shape[1] - 1)
    blk = torch.gather(tables.kv_idx, 1, jc.view(j.shape[0], -1)).view(j.shape)
    full = j < split[..., None]
    whole = None
    if tables.kv_whole is not None:
        whole = torch.gather(tables.kv_whole, 1, jc.view(j.shape[0], -1)).view(j.shape) & valid
    big = plan.n_kblocks
    blk_s, order = torch.sort(torch.where(valid, blk, big), -1)               # ascending key blocks, unused last
    valid = blk_s < big
    full = torch.gather(full, -1, order) & valid
    if whole is not None:
        whole = torch.gather(whole, -1, order)
    k_slots = plan.k_slots.to(dev)
    kslot = blk_s.clamp_max(big - 1)[..., None] * bn + torch.arange(bn, device=dev)   # [X, NQ, L, BN]
    tok_k = torch.where(valid[..., None], k_slots[kslot], -1).flatten(-2)
    rep = lambda t: t[..., None].expand(*t.shape, bn).flatten(-2)
    return plan.q_slots.to(dev).view(nq, bm), tok_k, rep(full), rep(whole) if whole is not None else None


@functools.lru_cache(maxsize=64)
def _static_gather(tables: BlockTables, call_key) -> Gather:
    """A static plan's gather tables, made once (and its keep mask when it is small)."""
    tok_q, tok_k, _, _ = _gather(tables)
    keep = None
    nq, bm = tok_q.shape
    if nq * bm * tok_k.shape[-1] <= (1 << 28):
        keep = _static_keep(call_key, tok_q, tok_k[0])
    return Gather(tok_q, tok_k, None, None, keep)


def _static_keep(call_key, tok_q, tok_k) -> torch.Tensor:
    """Pattern & causal & valid of a static pattern: [c, BM, N] for query rows ``tok_q [c, BM]`` and key tokens
    ``tok_k [c, N]``."""
    pattern, layout, is_causal, q_offset = call_key
    qi, kj = tok_q[:, :, None], tok_k[:, None, :]
    call = AttentionCall(None, None, None, None, None, 1.0, is_causal, pattern, layout,  # type: ignore[arg-type]
                         q_offset)
    keep = keep_mask(call, qi.clamp_min(0), kj.clamp_min(0))
    return keep & (qi >= 0) & (kj >= 0)


def setup(call: AttentionCall, block_m: int, block_n: int, elems: int = CHUNK_ELEMS):
    """(tables, gather, query blocks per chunk) of a call; a chunk's scores stay under ``elems``."""
    tables = call_tables(call, block_m, block_n)
    if call.pattern.dynamic:
        g = Gather(*_gather(tables), None)
    else:
        g = _static_gather(tables, (call.pattern, call.layout, call.is_causal, call.q_offset))
    b, h = call.q.shape[:2]
    per_block = b * h * tables.plan.block_m * g.tok_k.shape[-1]
    chunk = max(1, min(tables.plan.n_qblocks, elems // max(1, per_block)))
    return tables, g, chunk


def table_index(tables: BlockTables, b: int, h: int, device) -> torch.Tensor:
    """Table of every (batch, head), flattened: [B * H] int64."""
    sb, sh = tables.strides(h)
    return (torch.arange(b, device=device)[:, None] * sb + torch.arange(h, device=device)[None, :] * sh).flatten()


def chunk_keys(call, tables: BlockTables, g: Gather, sl: slice) -> torch.Tensor:
    """Key tokens of a chunk of query blocks: [c, N] (shared tables) or [B, H, c, N]."""
    if not call.pattern.dynamic:
        return g.tok_k[0, sl]
    b, h = call.q.shape[:2]
    return g.tok_k[table_index(tables, b, h, g.tok_k.device), sl].view(b, h, -1, g.tok_k.shape[-1])


def chunk_keep(call, tables: BlockTables, g: Gather, sl: slice) -> torch.Tensor:
    """Pattern & site causal & valid of a chunk of query blocks: [c, BM, N] (static) or [B, H, c, BM, N]."""
    tq_c = g.tok_q[sl]
    if not call.pattern.dynamic:
        return g.keep[sl] if g.keep is not None else \
            _static_keep((call.pattern, call.layout, call.is_causal, call.q_offset), tq_c, g.tok_k[0, sl])
    b, h = call.q.shape[:2]
    x = table_index(tables, b, h, tq_c.device)
    kj = g.tok_k[x, sl][:, :, None, :]                                        # [BH, c, 1, N]
    qi = tq_c[None, :, :, None]                                               # [1, c, BM, 1]
    tq = qi.clamp_min(0) + call.q_offset
    p = call.pattern
    keep = allowed(p.static, call.layout, tq, kj.clamp_min(0))
    sel = g.whole[x, sl][:, :, None, :]
    if p.causal:
        sel = sel & (kj <= tq)
    keep = keep | g.full[x, sl][:, :, None, :] | sel
    if call.is_causal:
        keep = keep & (kj <= qi)
    keep = keep & (qi >= 0) & (kj >= 0)
    return keep.view(b, h, *keep.shape[1:])


def site_terms(call, tq_c: torch.Tensor, tk_c: torch.Tensor):
    """(bias, mask) of the site gathered at (query row, key token) of a chunk: [Bb, Hb, c, BM, N] or None each.
    ``tk_c`` is [c, N] (shared tables) or [B, H, c, N]."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    out = []
    for t in (call.bias, call.mask):
        if t is None:
            out.append(None)
            continue
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
        t4 = t4.expand(*t4.shape[:2], s_q, s_k)
        if tk_c.dim() == 2:
            qi, kj = tq_c.clamp_min(0)[:, :, None], tk_c.clamp_min(0)[:, None, :]
            out.append(t4[:, :, qi, kj])
            continue
        b, h = tk_c.shape[:2]
        t4 = t4.expand(b, h, s_q, s_k)
        bi = torch.arange(b, device=t4.device)[:, None, None, None, None]
        hi = torch.arange(h, device=t4.device)[None, :, None, None, None]
        out.append(t4[bi, hi, tq_c.clamp_min(0)[None, None, :, :, None], tk_c.clamp_min(0)[:, :, :, None, :]])
    return out


def gather_rows(x: torch.Tensor, tk_c: torch.Tensor, ct=None) -> torch.Tensor:
    """Rows ``tk_c`` ([c, N] shared, or [B, H, c, N]) of ``x [B, H, S, E]``: [B, H, c, N, E] (in ``ct``)."""
    b, h, _, e = x.shape
    if tk_c.dim() == 2:
        c, n = tk_c.shape
        out = x.index_select(2, tk_c.clamp_min(0).flatten()).view(b, h, c, n, e)
    else:
        flat = x.reshape(b * h, -1, e)
        xi = torch.arange(b * h, device=x.device)[:, None, None]
        out = flat[xi, tk_c.clamp_min(0).reshape(b * h, *tk_c.shape[2:])].view(b, h, *tk_c.shape[2:], e)
    return out if ct is None else out.to(ct)


def scatter_add(dst: torch.Tensor, tk_c: torch.Tensor, vals: torch.Tensor) -> None:
    """``dst [B, H, S, E]`` += ``vals [B, H, c, N, E]`` at key tokens ``tk_c`` ([c, N] shared or [B, H, c, N])."""
    b, h, _, e = dst.shape
    if tk_c.dim() == 2:
        dst.index_add_(2, tk_c.clamp_min(0).flatten(), vals.reshape(b, h, -1, e))
        return
    off = torch.arange(b * h, device=dst.device)[:, None] * dst.shape[2]
    dst.view(-1, e).index_add_(0, (tk_c.clamp_min(0).reshape(b * h, -1) + off).flatten(), vals.reshape(-1, e))


class Blocked(Implementation):
    """Runs on every device; the default wherever no specialised kernel can run."""

    name = "blocked"
    block_m = 64
    block_n = 64

    def can_run(self, call: AttentionCall) -> tuple[bool, str]:
        if call.k.shape[-2] == 0:
            return False, "no keys (S_k = 0)"
        return True, ""

    def _chunk_scores(self, call, ct, k, tables, g, sl):
        tq_c = g.tok_q[sl]
        tk_c = chunk_keys(call, tables, g, sl)
        b, h, _, d = call.q.shape
        c, bm = tq_c.shape
        qb = call.q.index_select(2, tq_c.clamp_min(0).flatten()).view(b, h, c, bm, d).to(ct)
        kb = gather_rows(k, tk_c, ct)
        s, dcap = softcap_scores((qb @ kb.transpose(-2, -1)) * call.scale, call.softcap)
        bias_c, mask_c = site_terms(call, tq_c, tk_c)
        if bias_c is not None:
            s = s + bias_scores(bias_c, ct)
        keep = chunk_keep(call, tables, g, sl)
        keep = keep if mask_c is None else keep & mask_c
        return s.masked_fill(~keep, float("-inf")), qb, kb, tk_c, dcap

    def forward(self, call):
        tables, g, chunk = setup(call, self.block_m, self.block_n)
        ct = compute_dtype(call.q, call.k, call.v)
        b, hq, s_q, _ = call.q.shape
        k = expand_kv(call.k, hq)
        v = expand_kv(call.v, hq)
        dv_ = v.shape[-1]
        out = torch.zeros(b, hq, s_q, dv_, dtype=call.q.dtype, device=call.q.device)
        lse_out = torch.full((b, hq, s_q), float("-inf"), dtype=lse_dtype(call.q.dtype), device=call.q.device)
        for m0 in range(0, tables.plan.n_qblocks, chunk):
            sl = slice(m0, m0 + chunk)
            tq_c = g.tok_q[sl]
            s, _, _, tk_c, _ = self._chunk_scores(call, ct, k, tables, g, sl)
            c, bm = tq_c.shape
            vb = gather_rows(v, tk_c, ct)
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
            p = torch.exp(s - mx)
            l = p.sum(-1, keepdim=True)
            o = (p @ vb) / torch.where(l == 0, torch.ones_like(l), l)
            lse = (mx + torch.log(l)).squeeze(-1)
            valid = (tq_c >= 0).flatten()
            idx = tq_c.flatten()[valid]
            out.index_copy_(2, idx, o.reshape(b, hq, c * bm, dv_)[:, :, valid].to(out.dtype))
            lse_out.index_copy_(2, idx, lse.reshape(b, hq, c * bm)[:, :, valid].to(lse_out.dtype))
        return out, lse_out

    def backward(self, call, grad_out, out, lse, need_dbias):
        tables, g, chunk = setup(call, self.block_m, self.block_n)
        ct = compute_dtype(call.q, call.k, call.v)
        b, hq, s_q, d = call.q.shape
        hk, s_k = call.k.shape[1], call.k.shape[2]
        k = expand_kv(call.k, hq)
        v = expand_kv(call.v, hq)
        dv_ = v.shape[-1]
        dq = torch.zeros(b, hq, s_q, d, dtype=ct, device=call.q.device)
        dk = torch.zeros(b, hq, s_k, d, dtype=ct, device=call.q.device)
        dv = torch.zeros(b, hq, s_k, dv_, dtype=ct, device=call.q.device)
        dbias = None
        if need_dbias and call.bias is not None:
            dbias = torch.zeros(b, hq, s_q, s_k, dtype=ct, device=call.q.device)
        delta_all = (grad_out.to(ct) * out.to(ct)).sum(-1)  # [B, H, Sq]
        for m0 in range(0, tables.plan.n_qblocks, chunk):
            sl = slice(m0, m0 + chunk)
            tq_c = g.tok_q[sl]
            c, bm = tq_c.shape
            s, qb, kb, tk_c, dcap = self._chunk_scores(call, ct, k, tables, g, sl)
            qidx = tq_c.clamp_min(0).flatten()
            p, _ = masked_softmax(s)  # a chunk holds whole rows: exact, not normalised by the stored lse
            do = grad_out.index_select(2, qidx).view(b, hq, c, bm, dv_).to(ct)
            do = do * (tq_c >= 0).view(1, 1, c, bm, 1)
            delta = delta_all.index_select(2, qidx).view(b, hq, c, bm, 1)
            vb = gather_rows(v, tk_c, ct)
            ds = p * (do @ vb.transpose(-2, -1) - delta)   # d loss / d scores (the bias's gradient)
            ds_qk = ds if dcap is None else ds * dcap       # through the soft cap
            scatter_add(dv, tk_c, p.transpose(-2, -1) @ do)
            scatter_add(dk, tk_c, (ds_qk.transpose(-2, -1) @ qb) * call.scale)
            dq_c = (ds_qk @ kb) * call.scale
            valid = (tq_c >= 0).flatten()
            dq.index_copy_(2, tq_c.flatten()[valid], dq_c.reshape(b, hq, c * bm, d)[:, :, valid])
            if dbias is not None:
                _add_dbias(dbias, tq_c, tk_c, ds)
        if hk != hq:
            dk = dk.view(b, hk, hq // hk, s_k, d).sum(2)
            dv = dv.view(b, hk, hq // hk, s_k, dv_).sum(2)
        if dbias is not None:
            dbias = reduce_to(dbias, call.bias.shape)
        return dq, dk, dv, dbias


def _add_dbias(dbias: torch.Tensor, tq_c: torch.Tensor, tk_c: torch.Tensor, ds: torch.Tensor) -> None:
    """``dbias [B, H, Sq, Sk]`` += the chunk's score gradients ``ds [B, H, c, BM, N]`` at (row, key token)."""
    b, h, s_q, s_k = dbias.shape
    c, bm = tq_c.shape
    qi = tq_c.clamp_min(0)[:, :, None]
    kj = tk_c.clamp_min(0)[..., None, :]
    flat = qi * s_k + kj                                                      # [c, BM, N] or [B, H, c, BM, N]
    if flat.dim() == 3:
        dbias.view(b, h, -1).index_add_(2, flat.flatten(), ds.reshape(b, h, -1))
    else:
        off = torch.arange(b * h, device=ds.device)[:, None] * (s_q * s_k)
        dbias.view(-1).index_add_(0, (flat.reshape(b * h, -1) + off).flatten(), ds.reshape(-1))
