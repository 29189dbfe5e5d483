"""Reference implementation: dense masked softmax attention in fp32 (fp64 for fp64 inputs).

Builds the full ``[Sq, Sk]`` pattern mask from the pattern's predicate, so it costs O(S^2) memory: it is
the semantic definition every faster implementation is tested against, and it runs on any device.

Semantics shared by every implementation:
  scores = scale * q @ k^T + bias;  allowed = pattern & mask & (causal: j <= i, top-left aligned)
  (the pattern sees query row i as token i + q_offset: a causal rule's queries are the last S_q keys; a
  ``dynamic`` pattern's pairs come from its per-(batch, head) block selection of this call)
  (with ``softcap`` c > 0: scores = c * tanh(scale * q @ k^T / c) + bias)
  (a bias value below ``registry.BIAS_MASK_BELOW`` = -2**14, e.g. ``finfo.min`` or -1e9 masks, is -inf)
  out    = softmax(scores over allowed keys) @ v;  lse = logsumexp(scores over allowed keys)
  A query row with no allowed key gets ``out = 0`` and ``lse = -inf`` (SDPA would give NaN).
"""

from __future__ import annotations

import torch

from ..patterns.base import allowed
from ..patterns.dynamic import block_pairs_allowed
from .registry import AttentionCall, Implementation, bias_scores, lse_dtype


def compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hk, S, D] -> [B, Hq, S, D] by repeating each kv head Hq // Hk times (GQA)."""
    hk = x.shape[1]
    return x if hk == hq else x.repeat_interleave(hq // hk, dim=1)


def keep_mask(call: AttentionCall, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """Pattern & site causal for query rows ``qi [..., M, 1]`` and key tokens ``kj [..., 1, N]`` (the site mask
    not included): ``[..., M, N]``, or ``[B, H, ..., M, N]`` for a ``dynamic`` pattern (its selection is per
    batch element and head). Query row r is token ``r + call.q_offset`` for the pattern; the site's causality
    is SDPA's (top-left, on rows)."""
    tq = qi + call.q_offset if call.q_offset else qi
    if call.pattern.dynamic:
        keep = allowed(call.pattern.static, call.layout, tq, kj) | \
            block_pairs_allowed(call.pattern, call.layout, call.kept(), tq, kj)
    else:
        keep = allowed(call.pattern, call.layout, tq, kj)
    if call.is_causal:
        keep = keep & (kj <= qi)
    return keep


def reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a [B, H, Sq, Sk] gradient down to the broadcast shape of the tensor it belongs to."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def softcap_scores(s: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c * tanh(s / c), 1 - tanh(s / c)^2)`` for ``softcap`` c > 0 (scaled scores ``s``), else ``(s, None)``."""
    if not softcap:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, 1 - t * t


def masked_softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax ``p`` of scores ``s`` (-inf = not allowed) and the row logsumexp ``lse`` (last dim dropped).
    A row with no allowed key gets ``p = 0`` and ``lse = -inf``.

    Normalised by the row's max and sum rather than as ``exp(s - lse)``: when a row's scores all lie far from 0,
    ``lse`` keeps ``log(sum)`` only to its ulp (~1e-3 at -1e4 in fp32; all of it at -1e9, where ``exp(s - lse)``
    summed to the number of keys), while ``s - max`` is exact."""
    if s.shape[-1] == 0:  # no keys at all
        return s, s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0)  # empty rows: exp(-inf - 0) = 0
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    return p, (m + torch.log(l)).squeeze(-1)


class Reference(Implementation):
    name = "reference"

    def _scores(self, call: AttentionCall, ct: torch.dtype):
        """``(scores with -inf where not allowed, keep, dcap)``; ``dcap`` = d(capped)/d(scaled q·k) = 1 - tanh²
        under ``softcap``, else None."""
        q, k = call.q.to(ct), expand_kv(call.k, call.q.shape[1]).to(ct)
        s_q, s_k = q.shape[-2], k.shape[-2]
        s, dcap = softcap_scores((q @ k.transpose(-2, -1)) * call.scale, call.softcap)
        if call.bias is not None:
            s = s + bias_scores(call.bias, ct)
        dev = q.device
        keep = keep_mask(call, torch.arange(s_q, device=dev)[:, None], torch.arange(s_k, device=dev)[None, :])
        if call.mask is not None:
            keep = keep & call.mask
        keep = keep.expand_as(s)
        return s.masked_fill(~keep, float("-inf")), keep, dcap

    def forward(self, call):
        ct = compute_dtype(call.q, call.k, call.v)
        s, keep, _ = self._scores(call, ct)
        p, lse = masked_softmax(s)
        out = p @ expand_kv(call.v, call.q.shape[1]).to(ct)
        return out.to(call.q.dtype), lse.to(lse_dtype(call.q.dtype))

    def backward(self, call, grad_out, out, lse, need_dbias):
        ct = compute_dtype(call.q, call.k, call.v)
        hq, hk = call.q.shape[1], call.k.shape[1]
        s, keep, dcap = self._scores(call, ct)
        p, _ = masked_softmax(s)  # recomputed from the scores, not from the forward's lse (see masked_softmax)
        do = grad_out.to(ct)
        v = expand_kv(call.v, hq).to(ct)
        k = expand_kv(call.k, hq).to(ct)
        dv = p.transpose(-2, -1) @ do
        dp = do @ v.transpose(-2, -1)
        delta = (do * out.to(ct)).sum(-1, keepdim=True)
        ds = p * (dp - delta)                         # d loss / d scores (the bias's gradient)
        ds_qk = ds if dcap is None else ds * dcap     # through the soft cap
        dq = (ds_qk @ k) * call.scale
        dk = (ds_qk.transpose(-2, -1) @ call.q.to(ct)) * call.scale
        if hk != hq:  # sum the repeated heads back onto their kv head
            b, _, s_k, _ = dk.shape
            dk = dk.view(b, hk, hq // hk, s_k, -1).sum(2)
            dv = dv.view(b, hk, hq // hk, s_k, -1).sum(2)
        dbias = reduce_to(ds, call.bias.shape) if need_dbias and call.bias is not None else None
        return dq, dk, dv, dbias
