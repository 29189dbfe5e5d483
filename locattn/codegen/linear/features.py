"""Feature maps of the linear and hybrid mechanisms: ``phi(q)``, ``phi(k)`` and their backward.

Shapes: q [B, Hq, Sq, D], k [B, Hk, Sk, D] -> features ``fq`` [B, Hq, Sq, m], ``fk`` [B, Hk', Sk, m] in the
compute dtype (fp32, fp64 for fp64 inputs); ``m = D`` for elu / relu, ``m = features`` for favor. ``Hk' = Hk``
unless the site mask differs per query head under GQA (then k is repeated to ``Hq`` heads: ``expanded``).

The kernel of two features is ``kappa_ij = exp(cq_i + ck) * (fq_i . fk_j)``: ``cq`` [B, Hq, Sq] and ``ck``
[B, Hk', 1] are log-scales that keep favor's exponentials in range (0 for elu / relu):

* favor, keys: ``h = W y - |y|^2 / 2``, ``mk_r = max_j h_jr`` per feature over the unmasked keys of the head,
  ``fk = exp(h - mk) / sqrt(m)``;
* favor, queries: ``h = W x - |x|^2 / 2``, ``cq = max_r (h_r + mk_r)`` per row (the key stabiliser moved to the
  query side, feature by feature), ``fq = exp(h + mk - cq) / sqrt(m)``; ``ck = 0``.

So ``fq`` and ``fk`` lie in ``[0, 1 / sqrt(m)]`` and ``kappa = phi(x) . phi(y)`` exactly. A per-feature key
stabiliser (Performer uses one maximum over every key and feature) matters in fp32: with one global maximum,
a key whose features all sit ~90 below it underflows to 0 although its kernel with some query is not small;
per feature, a key underflows only where another key's term in that feature is e^87 times larger. The
log-scales are constants of the backward: ``exp(c) * exp(h - c)`` does not depend on ``c``, so
differentiating the features with ``c`` held fixed is exact. Masked keys (bool key-padding mask False) get
``fk = 0``: they drop out of every sum.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...patterns.mechanism import Mechanism


@functools.lru_cache(maxsize=64)
def favor_matrix(d: int, m: int, seed: int) -> torch.Tensor:
    """Performer's orthogonal random features ``W`` [m, d], fp64 on the CPU, a pure function of (d, m, seed):
    ceil(m / d) blocks of d orthonormal rows (QR of a Gaussian matrix, signs fixed by R's diagonal so LAPACK's
    choice does not matter), each row rescaled to the norm of an independent Gaussian vector (so every row is
    marginally N(0, I), as the unbiased estimator needs)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qm, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        qm = qm * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)[None, :]
        blocks.append(qm.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


@functools.lru_cache(maxsize=64)
def _favor_on(d: int, m: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``favor_matrix`` on ``device``, copied once per (device, dtype) and kept (no host copy per call)."""
    return favor_matrix(d, m, seed).to(device=device, dtype=dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def n_features(mech: Mechanism, head_dim: int) -> int:
    return mech.features if mech.feature_map == "favor" else head_dim


def favor_factor(scale: float, query: bool) -> float:
    """favor's inputs are ``x = a q`` and ``y = b k`` with ``a b = scale``: ``b = sqrt|scale|``, ``a = ±b``."""
    b = math.sqrt(abs(scale))
    return (b if scale >= 0 else -b) if query else b


def key_mask(mask: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """A key-padding mask (bool, broadcastable to [B, H, 1, Sk]) as [Bm, Hm, Sk, 1] (None: no mask)."""
    if mask is None:
        return None
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    assert m4.shape[-2] == 1, "linear mechanisms take key-padding masks only"
    return m4[:, :, 0, :, None]


@dataclass
class Features:
    """``fq`` [B, Hq, Sq, m], ``fk`` [B, Hk', Sk, m] (masked keys 0), log-scales ``cq`` [B, Hq, Sq] and ``ck``
    [B, Hk', 1] (None for elu / relu: 0), and what the backward needs (``hq``: favor's ``h - c`` is not kept,
    ``fq`` itself is)."""

    fq: torch.Tensor
    fk: torch.Tensor
    cq: torch.Tensor | None
    ck: torch.Tensor | None
    expanded: bool  # k / v were repeated to Hq heads for a per-query-head mask

    def log_scale(self, hq: int) -> torch.Tensor | None:
        """``cq_i + ck`` per query row: [B, Hq, Sq] (None: 0)."""
        if self.cq is None:
            return None
        ck = self.ck
        if ck.shape[1] != hq:
            ck = ck.repeat_interleave(hq // ck.shape[1], dim=1)
        return self.cq + ck


def _phi(x: torch.Tensor, mech: Mechanism, query: bool, scale: float, mask: torch.Tensor | None,
         key_max: torch.Tensor | None = None):
    """Features of one side: ``(f, c)`` (favor keys: ``c`` = the per-feature maxima ``mk`` [B, H, 1, m]; favor
    queries, given ``key_max`` broadcastable to them: ``c = cq`` [B, H, S]); ``x`` already in the compute dtype.
    Few passes over the [.., S, m] output (memory-bound on CPU): one GEMM with the norm term as its bias, the
    max, one fused exp. In place unless autograd records ``x`` (the reference's forward is differentiated in
    tests)."""
    grad = x.requires_grad and torch.is_grad_enabled()
    if mech.feature_map == "elu":
        f = F.elu(x) + 1 if grad else F.elu(x).add_(1)
    elif mech.feature_map == "relu":
        f = F.relu(x)
    else:
        m = mech.features
        a = favor_factor(scale, query)
        w = _favor_on(x.shape[-1], m, mech.seed, x.device, x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if grad:
            sq = (x2 * x2).sum(-1, keepdim=True) * (-0.5 * a * a)
        else:  # no [rows, D] temporary
            sq = torch.linalg.vector_norm(x2, dim=-1, keepdim=True).square_().mul_(-0.5 * a * a)
        h = torch.addmm(sq, x2, w.T, alpha=a).view(*lead, m)                   # W (a x) - |a x|^2 / 2
        if query:
            h = h + key_max if grad else h.add_(key_max)
            c = h.amax(-1)                                                      # [B, H, S]
            shift = c[..., None]
        else:
            if mask is not None:
                h = h.masked_fill(~mask, float("-inf")) if grad else h.masked_fill_(~mask, float("-inf"))
            c = h.amax(-2, keepdim=True)                                        # [B, H, 1, m]
            c = torch.where(torch.isinf(c), torch.zeros_like(c), c)             # every key masked
            shift = c
        shift = shift + 0.5 * math.log(m)                                       # exp(h - c) / sqrt(m)
        f = torch.exp(h - shift) if grad else h.sub_(shift).exp_()
        return f, c
    return (f if mask is None else f * mask), None


def features(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, mech: Mechanism
             ) -> Features:
    """Features of a call's q, k (and key-padding ``mask``, bool broadcastable to [B, Hq, 1, Sk])."""
    ct = compute_dtype(q.dtype)
    hq, hk = q.shape[1], k.shape[1]
    km = key_mask(mask, hq)
    expanded = km is not None and km.shape[1] not in (1, hk)
    if expanded:  # a mask per query head under GQA: the key features differ per query head
        k = k.repeat_interleave(hq // hk, dim=1)
    fk, mk = _phi(k.to(ct), mech, False, scale, km)
    if mk is None:
        fq, _ = _phi(q.to(ct), mech, True, scale, None)
        return Features(fq, fk, None, None, expanded)
    if mk.shape[0] != q.shape[0]:
        mk = mk.expand(q.shape[0], *mk.shape[1:])
    mq = mk if mk.shape[1] == hq else mk.repeat_interleave(hq // mk.shape[1], dim=1)    # [B, Hq, 1, m]
    fq, cq = _phi(q.to(ct), mech, True, scale, None, mq)
    return Features(fq, fk, cq, cq.new_zeros(cq.shape[0], fk.shape[1], 1), expanded)


def _phi_backward(x: torch.Tensor, f: torch.Tensor, df: torch.Tensor, mech: Mechanism, query: bool,
                  scale: float) -> torch.Tensor:
    """d(loss)/dx from d(loss)/df for ``f = phi(x)`` (log-scale held fixed; masked features have df's share
    already zeroed by ``f == 0`` for favor, by the caller's mask otherwise)."""
    if mech.feature_map == "elu":  # d(elu(x) + 1)/dx = 1 for x > 0, else exp(x) = f (masked keys: df = 0)
        return df * torch.where(x > 0, 1.0, f)
    if mech.feature_map == "relu":
        return df * (x > 0).to(x.dtype)
    w = _favor_on(x.shape[-1], mech.features, mech.seed, x.device, x.dtype)
    a = favor_factor(scale, query)
    gf = df * f                                           # d/dh of exp(h - c)
    # dh/dxs = w_r - xs, xs = a x: dx = a (gf w) - a^2 x sum_r gf_r (in place: one [rows, D] result)
    return torch.mm(gf.reshape(-1, gf.shape[-1]), w).view(*gf.shape[:-1], w.shape[-1]).mul_(a).addcmul_(
        x, gf.sum(-1, keepdim=True), value=-a * a)


def features_backward(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, mech: Mechanism,
                      feats: Features, dfq: torch.Tensor, dfk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dq`` [B, Hq, Sq, D] and ``dk`` [B, Hk, Sk, D] (compute dtype) from the features' gradients."""
    ct = feats.fq.dtype
    hq, hk = q.shape[1], k.shape[1]
    km = key_mask(mask, hq)
    kx = k.repeat_interleave(hq // hk, dim=1) if feats.expanded else k
    if km is not None:
        dfk = dfk * km
    dq = _phi_backward(q.to(ct), feats.fq, dfq, mech, True, scale)
    dk = _phi_backward(kx.to(ct), feats.fk, dfk, mech, False, scale)
    if feats.expanded:
        dk = dk.reshape(dk.shape[0], hk, hq // hk, *dk.shape[2:]).sum(2)
    return dq, dk
