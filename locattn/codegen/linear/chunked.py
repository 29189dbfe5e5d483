"""Chunked PyTorch linear sums (``linear_chunked``): the CPU path of the linear and hybrid mechanisms.

Glossary
--------
C            chunk length (``CHUNK``): causal sums split the sequence into chunks of C tokens
state        ``H_c = sum_{j < cC} fk_j v_j^T`` [m, Dv] and ``Z_c = sum_{j < cC} fk_j`` [m]: the keys of every
             earlier chunk, an exclusive cumulative sum over per-chunk states
intra        inside a chunk, the causal part ``tril(fq fk^T) v`` (C x C, one batched matmul)
rep          GQA group size Hq / Hk: query heads are viewed as [B, Hk, rep, ...] against their kv head
plan walk    ``in_pattern`` for 2-D / 3-D grids and global tokens: the pattern's block plan
             (:mod:`locattn.patterns.plan`), per chunk of query blocks the visited key blocks gathered,
             ``kappa = fq fk^T`` masked by pattern & causal & padding. 1-D grids take prefix sums over each
             query's key interval instead (:mod:`locattn.codegen.linear.intervals`): O(S m Dv + S C (m + Dv))

Non-causal: ``num = fq (fk^T v)``, ``den = fq (fk^T 1)``: O(S m Dv). Causal: ``num_i = fq_i H_c + intra``:
O(S m Dv + S C (m + Dv)). Backward (fla's chunk form): ``dfq = dA fk + gn H^T + gd Z^T`` with
``dA = tril(gn v^T + gd)``; the reverse states ``dH_c = sum_{c' > c} fq_c'^T gn_c'`` give ``dfk`` and ``dv``.
Sequences of different lengths (Sq != Sk, causal: top-left aligned) are padded with zero features to a common
multiple of C. Runs on any device; registered for CPU tensors.
"""

from __future__ import annotations

import torch

from ...patterns.plan import build_plan
from ..reference import keep_mask
from ..registry import AttentionCall
from . import intervals
from .common import LinearImplementation, Sums

CHUNK = 64
#: query rows (x heads) per slice of the linear part (:attr:`LinearImplementation.slice_rows`): [16K, 64] fp32
#: temporaries are 4 MB
SLICE_ROWS = 1 << 14
#: elements of one chunk of the plan walk's kappa matrix (bounds peak memory)
WALK_ELEMS = 1 << 23


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hk, rep, ...] (a view)."""
    return x.view(x.shape[0], hk, x.shape[1] // hk, *x.shape[2:])


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim 2 (sequence) of x with zeros to n."""
    if x.shape[2] == n:
        return x
    pad = x.new_zeros(*x.shape[:2], n - x.shape[2], *x.shape[3:])
    return torch.cat([x, pad], 2)


def _chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """[B, H, S, *] -> [B, H, n // c, c, *] padded with zeros."""
    x = _pad_to(x, n)
    return x.view(*x.shape[:2], n // c, c, *x.shape[3:])


def _exclusive_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    return intervals.prefix_sum_(x.clone(), dim, reverse).sub_(x)


class ChunkedSums(Sums):
    """The sums of :mod:`locattn.codegen.linear.common` in plain PyTorch."""

    def __init__(self, chunk: int = CHUNK, intervals: bool = True, outside: bool = True):
        self.chunk = chunk
        self.intervals = intervals
        self.outside = outside  # non-causal 1-D: A \ P directly (False: all keys - P, kept for the tests)

    def _intervals(self, call) -> intervals.IntervalSums | None:
        if self.intervals and intervals.supported(call.pattern, call.layout):
            return intervals.IntervalSums(self.chunk)
        return None

    # -- all keys ------------------------------------------------------------------------------------------
    def all_keys(self, fq, fk, v, causal):
        ct = fq.dtype
        b, hq, s_q, m = fq.shape
        hk, dv = fk.shape[1], v.shape[-1]
        v = v.to(ct)
        if not causal:
            kv = fk.transpose(-2, -1) @ v                                   # [B, Hk, m, Dv]
            z = fk.sum(-2)                                                  # [B, Hk, m]
            g = _grouped(fq, hk)                                            # [B, Hk, rep, Sq, m]
            num = g @ kv[:, :, None]
            den = (g @ z[:, :, None, :, None])[..., 0]
            return num.reshape(b, hq, s_q, dv), den.reshape(b, hq, s_q)
        c = self.chunk
        n = -(-max(s_q, fk.shape[2]) // c) * c
        kc, vc = _chunks(fk, n, c), _chunks(v, n, c)                        # [B, Hk, n/C, C, *]
        h = _exclusive_cumsum(kc.transpose(-2, -1) @ vc, 2)                  # [B, Hk, n/C, m, Dv]
        z = _exclusive_cumsum(kc.sum(-2), 2)                                 # [B, Hk, n/C, m]
        qc = _grouped(_chunks(fq, n, c), hk)                                 # [B, Hk, rep, n/C, C, m]
        a = (qc @ kc[:, :, None].transpose(-2, -1)).tril()                   # [B, Hk, rep, n/C, C, C]
        num = qc @ h[:, :, None] + a @ vc[:, :, None]
        den = (qc @ z[:, :, None, :, :, None])[..., 0] + a.sum(-1)
        return num.reshape(b, hq, n, dv)[:, :, :s_q], den.reshape(b, hq, n)[:, :, :s_q]

    def all_keys_backward(self, fq, fk, v, causal, gn, gd):
        ct = fq.dtype
        b, hq, s_q, m = fq.shape
        hk, s_k, dv = fk.shape[1], fk.shape[2], v.shape[-1]
        v = v.to(ct)
        if not causal:
            kv = fk.transpose(-2, -1) @ v
            z = fk.sum(-2)
            g, gng, gdg = _grouped(fq, hk), _grouped(gn, hk), _grouped(gd, hk)
            dfq = gng @ kv.transpose(-2, -1)[:, :, None] + gdg[..., None] * z[:, :, None, None, :]
            dkv = (g.transpose(-2, -1) @ gng).sum(2)                         # [B, Hk, m, Dv]
            dz = (g * gdg[..., None]).sum((2, 3))                            # [B, Hk, m]
            dfk = v @ dkv.transpose(-2, -1) + dz[:, :, None, :]
            dvv = fk @ dkv
            return dfq.reshape(b, hq, s_q, m), dfk, dvv
        c = self.chunk
        n = -(-max(s_q, s_k) // c) * c
        kc, vc = _chunks(fk, n, c), _chunks(v, n, c)                         # [B, Hk, N, C, *]
        h = _exclusive_cumsum(kc.transpose(-2, -1) @ vc, 2)
        z = _exclusive_cumsum(kc.sum(-2), 2)
        qc = _grouped(_chunks(fq, n, c), hk)                                 # [B, Hk, rep, N, C, m]
        gnc = _grouped(_chunks(gn, n, c), hk)                                # [B, Hk, rep, N, C, Dv]
        gdc = _grouped(_chunks(gd, n, c), hk)                                # [B, Hk, rep, N, C]
        kc_, vc_ = kc[:, :, None], vc[:, :, None]
        da = (gnc @ vc_.transpose(-2, -1) + gdc[..., None]).tril()           # [B, Hk, rep, N, C, C]
        dfq = da @ kc_ + gnc @ h[:, :, None].transpose(-2, -1) + gdc[..., None] * z[:, :, None, :, None, :]
        dh = _exclusive_cumsum((qc.transpose(-2, -1) @ gnc).sum(2), 2, reverse=True)   # [B, Hk, N, m, Dv]
        dz = _exclusive_cumsum((qc * gdc[..., None]).sum((2, 4)), 2, reverse=True)     # [B, Hk, N, m]
        a = (qc @ kc_.transpose(-2, -1)).tril()
        dfk = (da.transpose(-2, -1) @ qc).sum(2) + vc @ dh.transpose(-2, -1) + dz[:, :, :, None, :]
        dvv = (a.transpose(-2, -1) @ gnc).sum(2) + kc @ dh
        return (dfq.reshape(b, hq, n, m)[:, :, :s_q], dfk.reshape(b, hk, n, m)[:, :, :s_k],
                dvv.reshape(b, hk, n, dv)[:, :, :s_k])

    # -- the pattern's keys: a walk over the block plan ----------------------------------------------------
    def _walk(self, call: AttentionCall, fq, fk, v):
        """Per chunk of query blocks: (query tokens [c*BM], key tokens [c, N], keep [c, BM, N], gathered
        fq [B, Hk, rep, c, BM, m], fk [B, Hk, 1, c, N, m], v [B, Hk, 1, c, N, Dv])."""
        s = call.q.shape[-2]
        bm = bn = 64
        plan = build_plan(call.pattern, call.layout, s, s, bm, bn, call.is_causal)
        counts = plan.kv_ptr[1:] - plan.kv_ptr[:-1]
        nq = plan.n_qblocks
        width = max(1, int(counts.max()) if nq else 1)
        col = torch.arange(width)[None, :]
        used = col < counts[:, None]
        flat = (plan.kv_ptr[:-1, None] + col).clamp_max(max(plan.nnz - 1, 0))
        blk = plan.kv_idx[flat] if plan.nnz else torch.zeros(nq, width, dtype=torch.long)
        kslot = blk[:, :, None] * bn + torch.arange(bn)[None, None, :]
        tok_k = torch.where(used[:, :, None], plan.k_slots[kslot], -1).view(nq, width * bn)
        tok_q = plan.q_slots.view(nq, bm)
        b, hq, _, m = fq.shape
        hk = fk.shape[1]
        dev = fq.device
        per = b * hq * bm * width * bn
        step = max(1, WALK_ELEMS // max(1, per))
        for m0 in range(0, nq, step):
            tq, tk = tok_q[m0:m0 + step], tok_k[m0:m0 + step]
            qi, kj = tq[:, :, None], tk[:, None, :]
            keep = keep_mask(call, qi.clamp_min(0), kj.clamp_min(0)) & (qi >= 0) & (kj >= 0)
            tq, tk, keep = tq.to(dev), tk.to(dev), keep.to(dev)
            nc = tq.shape[0]
            iq, ik = tq.clamp_min(0).flatten(), tk.clamp_min(0).flatten()
            fqb = _grouped(fq.index_select(2, iq).view(b, hq, nc, bm, m), hk)
            fkb = fk.index_select(2, ik).view(b, hk, 1, nc, -1, m)
            vb = v.index_select(2, ik).view(b, hk, 1, nc, -1, v.shape[-1]).to(fq.dtype)
            yield tq, tk, keep, fqb, fkb, vb

    def _direct(self, call) -> tuple[intervals.IntervalSums | None, str]:
        """How ``A \\ P`` is summed directly on a 1-D pattern, if it is: ``"before"`` for causal windows ending at
        their query (the prefix before each window: no all-keys sum, no cancellation), ``"outside"`` for
        non-causal ones without an empty interval (every key but the window: one state product per row instead
        of three); otherwise ``(None, "")``: all keys minus the pattern's."""
        fast = self._intervals(call)
        if fast is None:
            return None, ""
        if intervals.tables(call.pattern, call.layout, call.is_causal, self.chunk).ends_at_query:
            return fast, "before"
        if self.outside and intervals.outside_supported(call.pattern, call.layout, call.is_causal, self.chunk):
            return fast, "outside"
        return None, ""

    def outside_pattern(self, call, fq, fk, v):
        fast, how = self._direct(call)
        return None if fast is None else fast.forward(call, fq, fk, v, **{how: True})

    def outside_pattern_backward(self, call, fq, fk, v, gn, gd):
        fast, how = self._direct(call)
        return None if fast is None else fast.backward(call, fq, fk, v, gn, gd, **{how: True})

    def in_pattern(self, call, fq, fk, v):
        fast = self._intervals(call)
        if fast is not None:
            return fast.forward(call, fq, fk, v)
        b, hq, s, _ = fq.shape
        dv = v.shape[-1]
        num = fq.new_zeros(b, hq, s, dv)
        den = fq.new_zeros(b, hq, s)
        for tq, _, keep, fqb, fkb, vb in self._walk(call, fq, fk, v):
            kap = (fqb @ fkb.transpose(-2, -1)) * keep                      # [B, Hk, rep, c, BM, N]
            valid = (tq >= 0).flatten()
            idx = tq.flatten()[valid]
            num.index_copy_(2, idx, (kap @ vb).reshape(b, hq, -1, dv)[:, :, valid])
            den.index_copy_(2, idx, kap.sum(-1).reshape(b, hq, -1)[:, :, valid])
        return num, den

    def in_pattern_backward(self, call, fq, fk, v, gn, gd):
        fast = self._intervals(call)
        if fast is not None:
            return fast.backward(call, fq, fk, v, gn, gd)
        b, hq, s, m = fq.shape
        hk, dv = fk.shape[1], v.shape[-1]
        dfq, dfk, dvv = torch.zeros_like(fq), torch.zeros_like(fk), fk.new_zeros(b, hk, s, dv)
        for tq, tk, keep, fqb, fkb, vb in self._walk(call, fq, fk, v):
            nc, bm = tq.shape
            iq = tq.clamp_min(0).flatten()
            gnb = _grouped(gn.index_select(2, iq).view(b, hq, nc, bm, dv), hk)
            gdb = _grouped(gd.index_select(2, iq).view(b, hq, nc, bm), hk)
            kap = (fqb @ fkb.transpose(-2, -1)) * keep
            dk_ = (gnb @ vb.transpose(-2, -1) + gdb[..., None]) * keep       # d loss / d kappa
            valid = (tq >= 0).flatten()
            dfq.index_copy_(2, tq.flatten()[valid], (dk_ @ fkb).reshape(b, hq, -1, m)[:, :, valid])
            ik = tk.clamp_min(0).flatten()
            dfk.index_add_(2, ik, (dk_.transpose(-2, -1) @ fqb).sum(2).reshape(b, hk, -1, m))
            dvv.index_add_(2, ik, (kap.transpose(-2, -1) @ gnb).sum(2).reshape(b, hk, -1, dv))
        return dfq, dfk, dvv


class LinearChunked(LinearImplementation):
    """Linear / hybrid attention in chunked PyTorch; the hybrid's softmax part runs on ``cpu``."""

    name = "linear_chunked"
    softmax_impls = ("cpu",)
    slice_rows = SLICE_ROWS

    def __init__(self, chunk: int = CHUNK, intervals: bool = True, outside: bool = True):
        self.sums = ChunkedSums(chunk, intervals, outside)

    def can_run(self, call):
        for t in (call.q, call.k, call.v):
            if t.device.type != "cpu":
                return False, f"tensors on {t.device.type}, not cpu"
        ok, why = super().can_run(call)
        if ok and call.mechanism.kind == "hybrid":
            impl, why = self.softmax_impl(call, count=False)
            ok = impl is not None
        return ok, why
