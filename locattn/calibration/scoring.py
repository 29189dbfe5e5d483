"""Scoring candidates from one recorded site call, on sampled query rows.

For sampled rows ``R`` of a site call (q ``[B, Hq, Sq, D]``, k / v ``[B, Hk, Sk, D/Dv]``), the dense attention
``p = softmax(scale · q_R kᵀ + bias | mask, causal)`` and ``o = p v`` are computed once; a candidate that keeps
keys ``A`` (``[.., R, Sk]``) then has, per row,

* attention mass kept ``m = Σ_j p_ij A_ij = exp(lse_candidate − lse_dense)`` (1 on a row the site leaves
  empty),
* output ``o_c = (p ⊙ A) v / m`` (0 where ``m = 0``: the op's empty row),

and the accumulated statistics per (head, candidate) are the squared output error ``Σ ||o_c − o||²``, the mass
kept and the fraction of the site's allowed scores the candidate keeps. The error of head ``h`` is reported as
its share of the site's relative squared output error, ``Σ_rows ||o_c,h − o_h||² / Σ_rows Σ_h' ||o_h'||²``:
summed over heads it is the site's ``||Δo||² / ||o||²``, which is what the solver adds up over sites (the
``output`` proxy). The ``gradient`` proxy weighs each row's error by the metric's gradient at the site's output,
``Σ (g · Δo)²`` (one scale across sites: a site the metric is insensitive to costs little error).

Cost: ``B · Hq · R · Sk · (D + C · Dv)`` for ``C`` candidates; rows are chunked to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..codegen.reference import expand_kv, masked_softmax, softcap_scores
from ..codegen.registry import bias_scores
from ..codegen.registry import AttentionCall
from .candidates import Candidate

#: elements of one [B, Hq, rows, Sk] score chunk
CHUNK_ELEMS = 1 << 23


def sample_rows(s_q: int, n: int, seed: int) -> torch.Tensor:
    """``n`` query rows spread evenly over ``[0, s_q)`` with a seeded random offset (all rows if ``n >= s_q``)."""
    if n >= s_q:
        return torch.arange(s_q)
    step = s_q / n
    off = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() * step
    return (torch.arange(n, dtype=torch.float64) * step + off).long().clamp_max(s_q - 1)


def _rows_of(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """A mask / bias broadcastable to [B, H, Sq, Sk], restricted to query ``rows`` (dim -2)."""
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    return t if t.shape[-2] == 1 else t.index_select(-2, rows.to(t.device))


@dataclass
class SiteStats:
    """Accumulated statistics of one site over its candidates (``C``) and query heads (``H``)."""

    heads: int
    n_cands: int
    sq_err: torch.Tensor = field(init=False)     # [H, C] Σ ||o_c - o||² over sampled rows
    grad_sq: torch.Tensor = field(init=False)    # [H, C] Σ (g · (o_c - o))² over sampled rows (gradient proxy)
    mass: torch.Tensor = field(init=False)       # [H, C] Σ mass kept over sampled rows
    kept: torch.Tensor = field(init=False)       # [H, C] allowed scores the candidate keeps
    allowed: torch.Tensor = field(init=False)    # [H] scores the site allows (mask, causal)
    ref_sq: float = 0.0                          # Σ ||o||² over rows and heads
    rows: int = 0                                # sampled (batch, row) pairs, per head
    calls: int = 0

    def __post_init__(self):
        z = torch.zeros(self.heads, self.n_cands, dtype=torch.float64)
        self.sq_err, self.mass, self.kept, self.grad_sq = z.clone(), z.clone(), z.clone(), z.clone()
        self.allowed = torch.zeros(self.heads, dtype=torch.float64)

    def error(self) -> torch.Tensor:
        """[H, C] each head's share of the site's relative squared output error."""
        return self.sq_err / max(self.ref_sq, 1e-300)

    def grad_error(self) -> torch.Tensor:
        """[H, C] the gradient proxy: Σ_rows (g · (o_c − o))², g = d(metric)/d(site output) at the row — the
        second-order (Fisher) estimate of the metric's change, on one scale for every site."""
        return self.grad_sq.clone()

    def mass_kept(self) -> torch.Tensor:
        """[H, C] mean attention mass kept per sampled row."""
        return self.mass / max(self.rows, 1)

    def kept_fraction(self) -> torch.Tensor:
        """[H, C] fraction of the site's allowed scores (its mask and causality) the candidate keeps."""
        return self.kept / self.allowed.clamp_min(1)[:, None]


def _heads_sum(x: torch.Tensor, b: int, hq: int) -> torch.Tensor:
    """[b?, h?, ...] summed to [Hq] (float64, on the CPU), broadcasting size-1 batch / head axes."""
    x = x.sum(tuple(range(2, x.dim()))).double().cpu()         # [b?, h?]
    return x.expand(b, hq).sum(0) if x.shape[0] == 1 else x.sum(0).expand(hq) if x.shape[1] == 1 else x.sum(0)


@torch.no_grad()
def score(rec: AttentionCall, cands: list[Candidate], stats: SiteStats, rows: torch.Tensor,
          keep_cache: dict | None = None, weights: torch.Tensor | None = None) -> None:
    """Add one site call's statistics for query ``rows`` to ``stats``. ``keep_cache`` shares the candidates'
    key sets between the sites of one sample (they depend on the candidate, the rows and the length only);
    ``weights`` ``[B, Hq, R, Dv]``: the metric's gradient at the site's output rows (gradient proxy)."""
    q, k, v = rec.q, rec.k, rec.v
    b, hq, s_q, _ = q.shape
    s_k = k.shape[-2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = expand_kv(k, hq).to(ct)
    vv = expand_kv(v, hq).to(ct)
    vv1 = torch.cat([vv, vv.new_ones(*vv.shape[:-1], 1)], -1)   # one matmul gives the output and the mass
    rows = rows.to(q.device)
    step = max(1, CHUNK_ELEMS // max(1, b * hq * s_k))
    cache = keep_cache if keep_cache is not None else {}
    for i in range(0, rows.numel(), step):
        r = rows[i:i + step]
        g = weights[:, :, i:i + step].to(ct) if weights is not None else None
        s = (q.index_select(2, r).to(ct) @ kk.transpose(-2, -1)) * rec.scale  # [B, H, R, Sk]
        s = softcap_scores(s, rec.softcap)[0]                                    # the site's score modifier
        bias = _rows_of(rec.bias, r)
        if bias is not None:
            s = s + bias_scores(bias, ct)
        keep = torch.ones(r.numel(), s_k, dtype=torch.bool, device=q.device)
        if rec.is_causal:
            keep = keep & (torch.arange(s_k, device=q.device)[None, :] <= r[:, None])
        mask = _rows_of(rec.mask, r)
        keep = (keep & mask) if mask is not None else keep[None, None]          # [b?, h?, R, Sk]
        s = s.masked_fill(~keep, float("-inf"))
        if bias is not None:
            keep = keep & ~torch.isneginf(s)
        p, lse = masked_softmax(s)
        empty = torch.isneginf(lse)                                             # rows with no key: nothing to lose
        o = (p @ vv1)[..., :-1]                                                 # [B, H, R, Dv]
        stats.ref_sq += float((o.double() ** 2).sum())
        n_allowed = _heads_sum(keep, b, hq)
        stats.allowed += n_allowed
        ckey = (r.numel(), int(r[0]), int(r[-1]), int(r.sum()), s_k)
        for c, cand in enumerate(cands):
            if cand.is_dense:  # exact by definition (its recomputed output differs from o by rounding only)
                stats.mass[:, c] += b * r.numel()
                stats.kept[:, c] += n_allowed
                continue
            a = cache.get((cand, ckey)) if cand.static else None
            if a is None:
                a = cand.keep(rec, r)
                if cand.static:
                    cache[(cand, ckey)] = a
            res = (p * a) @ vv1
            m = res[..., -1]                                                    # [B, H, R] mass kept
            oc = res[..., :-1] / torch.where(m > 0, m, torch.ones_like(m))[..., None]
            stats.sq_err[:, c] += ((oc - o).double() ** 2).sum((0, 2, 3)).cpu()
            if g is not None:
                stats.grad_sq[:, c] += ((g * (oc - o)).sum(-1).double() ** 2).sum((0, 2)).cpu()
            stats.mass[:, c] += torch.where(empty, torch.ones_like(m), m).double().sum((0, 2)).cpu()
            stats.kept[:, c] += _heads_sum(keep & a, b, hq)
    stats.rows += b * rows.numel()
    stats.calls += 1
