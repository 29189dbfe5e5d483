"""Plan-driven PyTorch implementation: exact attention over the block plan, on any device.

For each chunk of query blocks it gathers the plan's key blocks, runs one batched masked attention and
scatters the result back to the model's token order. Memory is O(chunk * keys visited), never O(S^2)
(a site ``bias`` of shape [.., Sq, Sk] is the only S^2 object, and it is the user's).

Glossary: BLOCK_M / BLOCK_N query / key slots per block; L the most key blocks any query block visits
(shorter rows are padded with masked blocks); a "chunk" is a run of query blocks processed together.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..patterns.plan import BlockPlan, build_plan
from .reference import compute_dtype, expand_kv, keep_mask, masked_softmax, reduce_to, softcap_scores
from .registry import AttentionCall, Implementation, bias_scores, lse_dtype

#: scores of one chunk are kept below this many elements (fp32): bounds peak memory
CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class Gather:
    """Index tables of a plan: token of every query slot / visited key slot, and the keep mask."""

    tok_q: torch.Tensor   # [nq, BM]     token index, -1 for padding
    tok_k: torch.Tensor   # [nq, L * BN] token index, -1 for padding / unused block
    keep: torch.Tensor | None  # [nq, BM, L * BN] pattern & causal & valid, None if computed per chunk


@functools.lru_cache(maxsize=64)
def _gather_tables(plan: BlockPlan, call_key) -> Gather:
    pattern, layout, is_causal = call_key
    nq, bm, bn = plan.n_qblocks, plan.block_m, plan.block_n
    counts = plan.kv_ptr[1:] - plan.kv_ptr[:-1]
    L = max(1, int(counts.max()) if nq else 1)
    col = torch.arange(L)[None, :]
    valid_blk = col < counts[:, None]
    flat = (plan.kv_ptr[:-1, None] + col).clamp_max(max(plan.nnz - 1, 0))
    blk = plan.kv_idx[flat] if plan.nnz else torch.zeros(nq, L, dtype=torch.long)
    kslot = blk[:, :, None] * bn + torch.arange(bn)[None, None, :]           # [nq, L, BN]
    tok_k = torch.where(valid_blk[:, :, None], plan.k_slots[kslot], -1).view(nq, L * bn)
    tok_q = plan.q_slots.view(nq, bm)
    keep = None
    if nq * bm * L * bn <= (1 << 28):
        keep = _keep(pattern, layout, is_causal, tok_q, tok_k)
    return Gather(tok_q, tok_k, keep)


def _keep(pattern, layout, is_causal, tok_q, tok_k) -> torch.Tensor:
    qi, kj = tok_q[:, :, None], tok_k[:, None, :]
    call = AttentionCall(None, None, None, None, None, 1.0, is_causal, pattern, layout)  # type: ignore[arg-type]
    keep = keep_mask(call, qi.clamp_min(0), kj.clamp_min(0))
    return keep & (qi >= 0) & (kj >= 0)


class Blocked(Implementation):
    """Runs on every device; the default wherever no specialised kernel can run."""

    name = "blocked"
    block_m = 64
    block_n = 64

    def can_run(self, call: AttentionCall) -> tuple[bool, str]:
        if call.k.shape[-2] == 0:
            return False, "no keys (S_k = 0)"
        return True, ""

    def _setup(self, call: AttentionCall):
        s_q, s_k = call.q.shape[-2], call.k.shape[-2]
        plan = build_plan(call.pattern, call.layout, s_q, s_k, self.block_m, self.block_n, call.is_causal)
        tables = _gather_tables(plan, (call.pattern, call.layout, call.is_causal))
        dev = call.q.device
        tq, tk = tables.tok_q.to(dev), tables.tok_k.to(dev)
        keep = tables.keep.to(dev) if tables.keep is not None else None
        b, h = call.q.shape[:2]
        per_block = b * h * plan.block_m * tk.shape[1]
        chunk = max(1, min(plan.n_qblocks, CHUNK_ELEMS // max(1, per_block)))
        return plan, tq, tk, keep, chunk

    def _site_terms(self, call, tq_c, tk_c):
        """bias / mask gathered at (query token, key token) of a chunk: [Bb, Hb, c, BM, L*BN] or None."""
        s_q, s_k = call.q.shape[-2], call.k.shape[-2]
        qi, kj = tq_c.clamp_min(0)[:, :, None], tk_c.clamp_min(0)[:, None, :]
        out = []
        for t in (call.bias, call.mask):
            if t is None:
                out.append(None)
                continue
            t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
            t4 = t4.expand(*t4.shape[:2], s_q, s_k)
            out.append(t4[:, :, qi, kj])
        return out

    def _chunk_scores(self, call, ct, q_flat, k_flat, tq_c, tk_c, keep_c):
        b, h, _, d = q_flat.shape
        c, bm = tq_c.shape
        n = tk_c.shape[1]
        qb = q_flat.index_select(2, tq_c.clamp_min(0).flatten()).view(b, h, c, bm, d).to(ct)
        kb = k_flat.index_select(2, tk_c.clamp_min(0).flatten()).view(b, h, c, n, d).to(ct)
        s, dcap = softcap_scores((qb @ kb.transpose(-2, -1)) * call.scale, call.softcap)
        bias_c, mask_c = self._site_terms(call, tq_c, tk_c)
        if bias_c is not None:
            s = s + bias_scores(bias_c, ct)
        if keep_c is None:
            keep_c = _keep(call.pattern, call.layout, call.is_causal, tq_c, tk_c)
        keep = keep_c if mask_c is None else keep_c & mask_c
        return s.masked_fill(~keep, float("-inf")), qb, kb, dcap

    def forward(self, call):
        plan, tq, tk, keep, chunk = self._setup(call)
        ct = compute_dtype(call.q, call.k, call.v)
        b, hq, s_q, _ = call.q.shape
        k = expand_kv(call.k, hq)
        v = expand_kv(call.v, hq)
        dv_ = v.shape[-1]
        out = torch.zeros(b, hq, s_q, dv_, dtype=call.q.dtype, device=call.q.device)
        lse_out = torch.full((b, hq, s_q), float("-inf"), dtype=lse_dtype(call.q.dtype), device=call.q.device)
        for m0 in range(0, plan.n_qblocks, chunk):
            sl = slice(m0, m0 + chunk)
            tq_c, tk_c = tq[sl], tk[sl]
            s = self._chunk_scores(call, ct, call.q, k, tq_c, tk_c, keep[sl] if keep is not None else None)[0]
            c, bm = tq_c.shape
            vb = v.index_select(2, tk_c.clamp_min(0).flatten()).view(b, hq, c, -1, dv_).to(ct)
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
        plan, tq, tk, keep, chunk = self._setup(call)
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
        for m0 in range(0, plan.n_qblocks, chunk):
            sl = slice(m0, m0 + chunk)
            tq_c, tk_c = tq[sl], tk[sl]
            c, bm = tq_c.shape
            s, qb, kb, dcap = self._chunk_scores(call, ct, call.q, k, tq_c, tk_c,
                                                 keep[sl] if keep is not None else None)
            qidx = tq_c.clamp_min(0).flatten()
            p, _ = masked_softmax(s)  # a chunk holds whole rows: exact, not normalised by the stored lse
            do = grad_out.index_select(2, qidx).view(b, hq, c, bm, dv_).to(ct)
            do = do * (tq_c >= 0).view(1, 1, c, bm, 1)
            delta = delta_all.index_select(2, qidx).view(b, hq, c, bm, 1)
            vb = v.index_select(2, tk_c.clamp_min(0).flatten()).view(b, hq, c, -1, dv_).to(ct)
            kidx = tk_c.clamp_min(0).flatten()
            dv.index_add_(2, kidx, (p.transpose(-2, -1) @ do).reshape(b, hq, -1, dv_))
            ds = p * (do @ vb.transpose(-2, -1) - delta)   # d loss / d scores (the bias's gradient)
            ds_qk = ds if dcap is None else ds * dcap       # through the soft cap
            dk.index_add_(2, kidx, (ds_qk.transpose(-2, -1) @ qb).reshape(b, hq, -1, d) * call.scale)
            dq_c = (ds_qk @ kb) * call.scale
            valid = (tq_c >= 0).flatten()
            dq.index_copy_(2, tq_c.flatten()[valid], dq_c.reshape(b, hq, c * bm, d)[:, :, valid])
            if dbias is not None:
                qi = tq_c.clamp_min(0)[:, :, None].expand(c, bm, tk_c.shape[1])
                kj = tk_c.clamp_min(0)[:, None, :].expand(c, bm, tk_c.shape[1])
                flat = (qi * s_k + kj).flatten()
                dbias.view(b, hq, -1).index_add_(2, flat, ds.reshape(b, hq, -1))
        if hk != hq:
            dk = dk.view(b, hk, hq // hk, s_k, d).sum(2)
            dv = dv.view(b, hk, hq // hk, s_k, dv_).sum(2)
        if dbias is not None:
            dbias = reduce_to(dbias, call.bias.shape)
        return dq, dk, dv, dbias
