"""What the fast linear / hybrid implementations share: the mechanism's algebra over a family of sum kernels.

A kernel family (:class:`Sums`: chunked PyTorch, Triton) computes, for features ``fq`` [B, Hq, Sq, m], ``fk``
[B, Hk, Sk, m] (GQA: query head h reads kv head h // (Hq / Hk)) and values ``v`` [B, Hk, Sk, Dv], the
unnormalised linear sums of every query row, in the compute dtype::

    num_i = sum_j (fq_i . fk_j) v_j,   den_i = sum_j fq_i . fk_j

over ``all_keys`` (every key, or ``j <= i`` when causal) or ``in_pattern`` (the keys of the pattern & causal:
``P(i)`` without the site mask, which is already in ``fk``), and their backward: given ``gn`` [B, Hq, Sq, Dv]
and ``gd`` [B, Hq, Sq] (the loss's gradients w.r.t. ``num`` and ``den``), the gradients w.r.t. ``fq``, ``fk``
and ``v``.

:class:`LinearImplementation` turns them into the op's ``(out, lse)`` and gradients:

* linear: ``out = num / den``, ``lse = c + log den`` (c: the features' log-scale);
* hybrid: the softmax part ``(o_s, lse_s)`` over ``P(i)`` comes from a softmax implementation whose backward
  normalises by the lse it is given (``cpu``, ``triton``); the linear part is ``all_keys - in_pattern`` (the
  keys of ``A(i) \\ P(i)``, O(S m Dv) plus the pattern's own keys), merged in one normalisation::

      r = max(lse_s, c);  den = e^{lse_s - r} + e^{c - r} den_L;  out = (e^{lse_s - r} o_s + e^{c - r} num_L) / den
      lse = r + log den

  Backward: the softmax implementation's backward run with the *merged* ``out`` and ``lse`` gives exactly the
  softmax part's gradients (its weights ``exp(s - lse)`` and ``delta = dO . out`` are the merged ones), and
  the linear part's weights ``e^{c - lse} kappa~`` give ``gn = e^{c - lse} dO``, ``gd = -e^{c - lse} dO . out``.
"""

from __future__ import annotations

import dataclasses

import torch

from ...counters import bump
from ...patterns.mechanism import SOFTMAX
from .. import registry
from ..registry import AttentionCall, Implementation, lse_dtype
from .features import Features, compute_dtype, features, features_backward
from .naive import check_call

NEG_INF = float("-inf")


class Sums:
    """A kernel family of the linear sums (see the module docstring). Every method takes and returns tensors
    in the compute dtype, except ``v`` (the call's dtype)."""

    def all_keys(self, fq, fk, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def all_keys_backward(self, fq, fk, v, causal: bool, gn, gd):
        raise NotImplementedError

    def in_pattern(self, call: AttentionCall, fq, fk, v) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def in_pattern_backward(self, call: AttentionCall, fq, fk, v, gn, gd):
        raise NotImplementedError

    def outside_pattern(self, call: AttentionCall, fq, fk, v) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sums over ``A(i) \\ P(i)`` directly, where a family can do better than ``all_keys - in_pattern``
        (None: it cannot for this call)."""
        return None

    def outside_pattern_backward(self, call: AttentionCall, fq, fk, v, gn, gd):
        return None


def _kv(call: AttentionCall, feats: Features) -> torch.Tensor:
    """v as the sums read it: repeated to the query heads when the features were (a per-query-head mask)."""
    hq, hk = call.q.shape[1], call.v.shape[1]
    return call.v.repeat_interleave(hq // hk, dim=1) if feats.expanded else call.v


def _fold_kv(g: torch.Tensor, call: AttentionCall, feats: Features) -> torch.Tensor:
    if not feats.expanded:
        return g
    hq, hk = call.q.shape[1], call.v.shape[1]
    return g.reshape(g.shape[0], hk, hq // hk, *g.shape[2:]).sum(2)


def _safe(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = den > 0
    return pos, torch.where(pos, den, torch.ones_like(den))


class LinearImplementation(Implementation):
    """Linear and hybrid attention over a :class:`Sums` family; the hybrid's softmax part runs on the first of
    ``softmax_impls`` (registry names) that can run it."""

    mechanisms = frozenset({"linear", "hybrid"})
    sums: Sums
    softmax_impls: tuple[str, ...] = ()

    def can_run(self, call):
        return check_call(call)

    def softmax_impl(self, call: AttentionCall, count: bool = True) -> tuple[Implementation | None, str]:
        """The implementation of the hybrid's softmax part (its backward must normalise by the given lse); a
        use is counted in ``counters()["dispatch"]`` as ``"<name> (hybrid softmax part)"``."""
        sc = dataclasses.replace(call, mechanism=SOFTMAX)
        why = []
        for name in self.softmax_impls:
            try:
                impl = registry.get(name)
            except registry.BackendUnavailable:
                why.append(f"{name}: not registered")
                continue
            ok, reason = impl.supports(sc)
            if ok:
                if count:
                    bump("dispatch", f"{name} (hybrid softmax part)")
                return impl, ""
            why.append(f"{name}: {reason}")
        return None, "the softmax part cannot run (" + "; ".join(why) + ")"

    #: split the linear part into calls of whole (batch, kv-head group) slices of about this many query rows
    #: (rows x heads; None: one call). On CPU, a [B, H, S, 64] fp32 temporary at S = 16384, H = 8 is 32 MB:
    #: glibc mmaps every allocation of >= 32 MB and unmaps it when freed, so each such temporary pays its page
    #: faults again (~20 ms per 32 MB measured on the sandbox), and it does not stay in the caches. Slices of
    #: <= 4 MB temporaries are recycled by the allocator and stay in L2 / L3.
    slice_rows: int | None = None

    def _slices(self, call: AttentionCall):
        """``(sub-call, (batch slice, query-head slice))`` per slice of ``slice_rows`` (one slice: the call)."""
        b, hq, s_q = call.q.shape[:3]
        hk = call.k.shape[1]
        rep = hq // hk
        per = max(1, self.slice_rows // max(1, s_q * rep)) if self.slice_rows else hk
        if per >= hk and (b == 1 or not self.slice_rows):
            yield call, (slice(None), slice(None))
            return
        per = min(per, hk)
        mask = call.mask
        if mask is not None and mask.dim() < 4:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        for bi in range(b):
            for h0 in range(0, hk, per):
                bs, ks, qs = slice(bi, bi + 1), slice(h0, min(hk, h0 + per)), slice(h0 * rep, min(hk, h0 + per) * rep)
                m = None
                if mask is not None:
                    m = mask[bs if mask.shape[0] > 1 else slice(None), qs if mask.shape[1] > 1 else slice(None)]
                yield (dataclasses.replace(call, q=call.q[bs, qs], k=call.k[bs, ks], v=call.v[bs, ks], mask=m),
                       (bs, qs))

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, call):
        soft = None
        if call.mechanism.kind == "hybrid":
            impl, why = self.softmax_impl(call)
            assert impl is not None, why
            soft = impl.forward(dataclasses.replace(call, mechanism=SOFTMAX))
        parts = list(self._slices(call))
        if len(parts) == 1:
            return self._forward_part(call, soft)
        b, hq, s_q = call.q.shape[:3]
        if soft is not None and soft[0].dtype == call.q.dtype and soft[1].dtype == lse_dtype(call.q.dtype):
            out, lse = soft   # merged in place, slice by slice (each slice reads its part before writing it)
        else:
            out = call.q.new_empty(b, hq, s_q, call.v.shape[-1])
            lse = torch.empty(b, hq, s_q, dtype=lse_dtype(call.q.dtype), device=call.q.device)
        for sub, idx in parts:
            o, l_ = self._forward_part(sub, None if soft is None else (soft[0][idx], soft[1][idx]))
            out[idx], lse[idx] = o, l_
        return out, lse

    def _forward_part(self, call, soft):
        feats = features(call.q, call.k, call.mask, call.scale, call.mechanism)
        hq = call.q.shape[1]
        c = feats.log_scale(hq)
        v = _kv(call, feats)
        if soft is not None:
            return self._hybrid_forward(call, feats, c, v, soft)
        num, den = self.sums.all_keys(feats.fq, feats.fk, v, call.is_causal)
        pos, safe = _safe(den)
        out = num.mul_((pos / safe)[..., None])                        # a zero denominator: 0 (in place: one pass)
        lse = torch.where(pos, torch.log(safe) + (0 if c is None else c), torch.full_like(den, NEG_INF))
        return out.to(call.q.dtype), lse.to(lse_dtype(call.q.dtype))

    def _outside(self, call, feats, v):
        """The hybrid's linear part: sums over ``A \\ P`` = all - P (a dense pattern's P is all of A: nothing)."""
        fq, fk = feats.fq, feats.fk
        if not call.pattern.local:
            b, hq, s_q, _ = fq.shape
            return fq.new_zeros(b, hq, s_q, v.shape[-1]), fq.new_zeros(b, hq, s_q)
        direct = self.sums.outside_pattern(call, fq, fk, v)
        if direct is not None:
            return direct
        num, den = self.sums.all_keys(fq, fk, v, call.is_causal)
        num_p, den_p = self.sums.in_pattern(call, fq, fk, v)
        return num.sub_(num_p), den.sub_(den_p)

    def _outside_backward(self, call, feats, v, gn, gd):
        fq, fk = feats.fq, feats.fk
        if not call.pattern.local:
            return torch.zeros_like(fq), torch.zeros_like(fk), fk.new_zeros(*fk.shape[:-1], v.shape[-1])
        direct = self.sums.outside_pattern_backward(call, fq, fk, v, gn, gd)
        if direct is not None:
            return direct
        dfq, dfk, dv = self.sums.all_keys_backward(fq, fk, v, call.is_causal, gn, gd)
        pq, pk, pv = self.sums.in_pattern_backward(call, fq, fk, v, gn, gd)
        return dfq.sub_(pq), dfk.sub_(pk), dv.sub_(pv)

    def _hybrid_forward(self, call, feats, c, v, soft):
        o_s, lse_s = soft
        num, den = self._outside(call, feats, v)
        ct = num.dtype
        lse_s = lse_s.to(ct)
        c = torch.zeros_like(lse_s) if c is None else c
        r = torch.maximum(lse_s, c)
        w_s = torch.exp(lse_s - r)
        w_l = torch.exp(c - r)
        tot = w_s + w_l * den
        pos, safe = _safe(tot)
        f = pos / safe                                                  # 0 for an empty row
        out = num.mul_((w_l * f)[..., None]).addcmul_(o_s.to(ct), (w_s * f)[..., None])
        lse = torch.where(pos, r + torch.log(safe), torch.full_like(tot, NEG_INF))
        return out.to(call.q.dtype), lse.to(lse_dtype(call.q.dtype))

    # -- backward ------------------------------------------------------------------------------------------
    def backward(self, call, grad_out, out, lse, need_dbias):
        ct = compute_dtype(call.q.dtype)
        soft = None
        if call.mechanism.kind == "hybrid":  # the softmax part first: its gradients take the linear part's in place
            impl, why = self.softmax_impl(call)
            assert impl is not None, why
            live = ~torch.isneginf(lse)
            if grad_out.device.type == "cpu" and bool(live.all()):   # (a host sync: CPU only)
                g_s = grad_out
            else:
                g_s = grad_out * live[..., None].to(grad_out.dtype)   # empty merged rows: no gradient at all
            soft = impl.backward(dataclasses.replace(call, mechanism=SOFTMAX), g_s, out, lse, False)[:3]
        parts = list(self._slices(call))
        if len(parts) == 1:
            dq, dk, dv = self._backward_part(call, grad_out, out, lse)
            if soft is not None:
                dq, dk, dv = dq.add_(soft[0]), dk.add_(soft[1]), dv.add_(soft[2])
            return dq, dk, dv, None
        # the softmax part's fresh gradients in the compute dtype accumulate the slices (no full-size buffers)
        acc = soft is not None and all(t.dtype == ct for t in soft)
        if acc:
            dq, dk, dv = soft
        else:
            dq = torch.empty(call.q.shape, dtype=ct, device=call.q.device)
            dk = torch.empty(call.k.shape, dtype=ct, device=call.k.device)
            dv = torch.empty(call.v.shape, dtype=ct, device=call.v.device)
        rep = call.q.shape[1] // call.k.shape[1]
        for sub, (bs, qs) in parts:
            ks = slice(qs.start // rep, qs.start // rep + sub.k.shape[1])
            part = self._backward_part(sub, grad_out[bs, qs], out[bs, qs], lse[bs, qs])
            for full, idx, g in ((dq, (bs, qs), part[0]), (dk, (bs, ks), part[1]), (dv, (bs, ks), part[2])):
                if acc:
                    full[idx] += g
                else:
                    full[idx] = g
        if soft is not None and not acc:
            dq, dk, dv = dq.add_(soft[0]), dk.add_(soft[1]), dv.add_(soft[2])
        return dq, dk, dv, None

    def _backward_part(self, call, grad_out, out, lse):
        """The linear part's gradients (compute dtype) of one slice."""
        mech = call.mechanism
        feats = features(call.q, call.k, call.mask, call.scale, mech)
        ct = feats.fq.dtype
        hq = call.q.shape[1]
        c = feats.log_scale(hq)
        c = torch.zeros(lse.shape, dtype=ct, device=lse.device) if c is None else c
        lse_c = lse.to(ct)
        live = ~torch.isneginf(lse_c)
        g = grad_out.to(ct) * live[..., None]
        o = out.to(ct)
        # weights of the linear terms are e^{c - lse} kappa~: gn / gd are d loss / d (num, den) in kappa~ units
        f = torch.where(live, torch.exp(c - torch.where(live, lse_c, torch.zeros_like(lse_c))), torch.zeros_like(c))
        gn = g * f[..., None]
        gd = -(g * o).sum(-1) * f
        v = _kv(call, feats)
        if mech.kind == "hybrid":
            dfq, dfk, dv = self._outside_backward(call, feats, v, gn, gd)
        else:
            dfq, dfk, dv = self.sums.all_keys_backward(feats.fq, feats.fk, v, call.is_causal, gn, gd)
        dq, dk = features_backward(call.q, call.k, call.mask, call.scale, mech, feats, dfq, dfk)
        return dq, dk, _fold_kv(dv, call, feats)
