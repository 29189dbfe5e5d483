"""The fp64-capable reference of the linear and hybrid mechanisms: the definition, materialised.

Builds the ``[Sq, Sk]`` weight matrix of :mod:`locattn.patterns.mechanism` directly (O(S^2) memory: tests
and tiny sites only), in fp32, or fp64 for fp64 inputs::

    A = site-allowed keys (causal & key-padding mask);  P = A & pattern (hybrid)
    r_i = max(m_i, c_i)          m_i = max_{j in P(i)} s_ij (hybrid; -inf if P(i) is empty), c_i the
                                 features' log-scale (0 for elu / relu), so every exponent below is <= 0-ish
    W_ij = exp(s_ij - r_i)                    j in P(i)
         = exp(c_i - r_i) (fq_i . fk_j)       j in A(i) \\ P(i)     (linear: P is empty)
    out_i = sum_j W_ij v_j / sum_j W_ij   (0 if the sum is 0);   lse_i = r_i + log sum_j W_ij

``naive_forward`` is plain differentiable PyTorch (tests take its autograd gradients as the golden of the
explicit backward, which the custom op needs: autograd is off inside it).
"""

from __future__ import annotations

import torch

from ..reference import expand_kv, keep_mask
from ..registry import AttentionCall, Implementation, lse_dtype
from .features import Features, features, features_backward, key_mask


def _masks(call: AttentionCall):
    """``A`` (site-allowed) and ``P`` (pattern & A; None for linear), bool broadcastable to [B, Hq, Sq, Sk]."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    dev = call.q.device
    qi, kj = torch.arange(s_q, device=dev)[:, None], torch.arange(s_k, device=dev)[None, :]
    a = (kj <= qi) if call.is_causal else torch.ones(s_q, s_k, dtype=torch.bool, device=dev)
    km = key_mask(call.mask, call.q.shape[1])
    if km is not None:
        a = a & km.transpose(-2, -1)                                   # [Bm, Hm, 1, Sk]
    p = None
    if call.mechanism.kind == "hybrid":
        p = a & keep_mask(call, qi, kj)
    return a, p


def _weights(call: AttentionCall, feats: Features):
    """``W`` [B, Hq, Sq, Sk] (compute dtype), the row log-scale ``r`` [B, Hq, Sq] and, for the backward,
    ``(A, P, s_w, l_w)``: which entries are softmax / linear and their factors."""
    ct = feats.fq.dtype
    hq = call.q.shape[1]
    a, p = _masks(call)
    fk = expand_kv(feats.fk, hq)
    kap = feats.fq @ fk.transpose(-2, -1)                                 # fq . fk
    c = feats.log_scale(hq)
    c = torch.zeros(kap.shape[:-1], dtype=ct, device=kap.device) if c is None else c
    if p is None:
        r = c
        lin = a
        w = torch.where(lin, kap, torch.zeros_like(kap))
        return w, r, (a, None, None, kap, c, r)
    s = (call.q.to(ct) @ expand_kv(call.k, hq).to(ct).transpose(-2, -1)) * call.scale
    s = torch.where(p, s, torch.full_like(s, float("-inf")))
    m = s.amax(-1)
    r = torch.maximum(m, c)
    e_s = torch.exp(s - r[..., None])                                     # 0 off P
    lin = a & ~p
    w = torch.where(lin, torch.exp(c - r)[..., None] * kap, e_s)
    return w, r, (a, p, e_s, kap, c, r)


def naive_forward(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` [B, Hq, Sq, Dv] (compute dtype) and ``lse`` [B, Hq, Sq]; differentiable."""
    feats = features(call.q, call.k, call.mask, call.scale, call.mechanism)
    return _from_weights(call, *_weights(call, feats)[:2])


def _from_weights(call, w, r):
    ct = w.dtype
    den = w.sum(-1)
    v = expand_kv(call.v, call.q.shape[1]).to(ct)
    pos = den > 0
    safe = torch.where(pos, den, torch.ones_like(den))
    out = torch.where(pos[..., None], (w @ v) / safe[..., None], torch.zeros((), dtype=ct, device=w.device))
    lse = torch.where(pos, r + torch.log(safe), torch.full_like(den, float("-inf")))
    return out, lse


class LinearReference(Implementation):
    """Linear / hybrid attention by the materialised definition; any device; O(S^2) memory."""

    name = "linear_reference"
    mechanisms = frozenset({"linear", "hybrid"})

    def can_run(self, call):
        return check_call(call)

    def forward(self, call):
        out, lse = naive_forward(call)
        return out.to(call.q.dtype), lse.to(lse_dtype(call.q.dtype))

    def backward(self, call, grad_out, out, lse, need_dbias):
        hq, hk = call.q.shape[1], call.k.shape[1]
        mech = call.mechanism
        feats = features(call.q, call.k, call.mask, call.scale, mech)
        ct = feats.fq.dtype
        w, r, (a, p, e_s, kap, c, _) = _weights(call, feats)
        den = w.sum(-1)
        pos = den > 0
        inv = torch.where(pos, 1 / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(den))
        g = grad_out.to(ct)
        v = expand_kv(call.v, hq).to(ct)
        o = out.to(ct)
        prob = w * inv[..., None]
        dv = prob.transpose(-2, -1) @ g
        dw = ((g @ v.transpose(-2, -1)) - (g * o).sum(-1, keepdim=True)) * inv[..., None]   # d loss / d W
        lin = a if p is None else a & ~p
        dkap = torch.where(lin, dw * torch.exp(c - r)[..., None], torch.zeros_like(dw))
        fk = expand_kv(feats.fk, hq)
        dfq = dkap @ fk
        dfk = dkap.transpose(-2, -1) @ feats.fq
        if not feats.expanded and hk != hq:
            dfk = dfk.view(dfk.shape[0], hk, hq // hk, *dfk.shape[2:]).sum(2)
        dq, dk = features_backward(call.q, call.k, call.mask, call.scale, mech, feats, dfq, dfk)
        if p is not None:
            ds = torch.where(p, dw * e_s, torch.zeros_like(dw))
            k = expand_kv(call.k, hq).to(ct)
            dq = dq + (ds @ k) * call.scale
            dks = (ds.transpose(-2, -1) @ call.q.to(ct)) * call.scale
            if hk != hq:
                dks = dks.view(dks.shape[0], hk, hq // hk, *dks.shape[2:]).sum(2)
            dk = dk + dks
        if hk != hq:
            dv = dv.view(dv.shape[0], hk, hq // hk, *dv.shape[2:]).sum(2)
        return dq, dk, dv, None


def check_call(call: AttentionCall) -> tuple[bool, str]:
    """What every linear / hybrid implementation requires of a call (the op checks it first with an error;
    the rewrite refuses such sites at compile time)."""
    if call.bias is not None:
        return False, "a float bias (linear attention has no scores to add it to)"
    if call.mask is not None and call.mask.dim() >= 2 and call.mask.shape[-2] != 1:
        return False, f"a mask of shape {tuple(call.mask.shape)} that is not a key-padding mask ([..., 1, Sk])"
    if call.mechanism.kind == "hybrid" and call.pattern.local and call.q.shape[-2] != call.k.shape[-2]:
        return False, "a local pattern needs S_q == S_k"
    return True, ""
