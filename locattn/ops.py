"""The ``torch.ops.locattn`` custom ops every rewritten site calls.

``locattn::attention(q, k, v, mask, bias, scale, is_causal, spec, backend) -> (out, lse)``

  q: [B, Hq, Sq, D]   k: [B, Hk, Sk, D]   v: [B, Hk, Sk, Dv]   (Hq % Hk == 0: GQA without repeating k/v)
  mask: bool broadcastable to [B, Hq, Sq, Sk] (True = attend) or None
  bias: float broadcastable to [B, Hq, Sq, Sk], added to the scaled scores, or None (differentiable)
  scale: float; is_causal: top-left aligned causal mask on token indices (SDPA's convention)
  spec: the site's pattern per head group (and its ``softcap``), :meth:`locattn.patterns.spec.SiteSpec.to_json`
  backend: "" / "auto" for registry order, or an implementation name that must run
  out: [B, Hq, Sq, Dv] in SDPA's memory layout ([B, Sq, Hq, Dv] contiguous, transposed), q's dtype
  lse: [B, Hq, Sq] float32 (float64 for fp64 q; -inf where a row has no key)

The op attends exactly the pairs the pattern allows AND the site's mask / causal allow. A query row left
with no allowed key outputs zeros. The backward is a second op, ``locattn::attention_backward``.

Example::

    out, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.125, False, spec.to_json(), "")
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .codegen import registry
from .codegen.registry import AttentionCall, lse_dtype
from .counters import bump, record_density
from .patterns.base import PatternError
from .patterns.spec import HeadGroup, SiteSpec, head_ranges, parse_spec


def _as4d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.dim() >= 4:
        return t
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


@functools.lru_cache(maxsize=256)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``heads`` as an int64 tensor on ``device``, made once: a host-to-device copy per call would be illegal
    while a CUDA graph is being captured (``torch.compile`` with ``triton.cudagraphs``)."""
    return torch.tensor(heads, dtype=torch.long, device=device)


def _take_heads(t: Optional[torch.Tensor], heads: list[int]) -> Optional[torch.Tensor]:
    """``t``'s heads ``heads`` (dim 1): a view when they are one ascending run, else a copy; ``t`` itself when it
    is None or has one head (a mask / bias broadcast over heads; k / v under MQA, where every query head reads
    kv head 0)."""
    if t is None or t.shape[1] == 1:
        return t
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return t.narrow(1, heads[0], len(heads))
    return t.index_select(1, _head_index(tuple(heads), t.device))


def _new_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op's output: ``[B, Hq, Sq, Dv]`` stored as ``[B, Sq, Hq, Dv]``, like SDPA's CPU/CUDA kernels, so the
    model's usual ``out.transpose(1, 2).reshape(B, S, Hq * Dv)`` is a free view."""
    b, hq, s_q, _ = q.shape
    return q.new_empty(b, s_q, hq, v.shape[-1]).transpose(1, 2)


def _sdpa_layout(o: torch.Tensor) -> torch.Tensor:
    if o.transpose(1, 2).is_contiguous():
        return o
    out = o.new_empty(o.shape[0], o.shape[2], o.shape[1], o.shape[3]).transpose(1, 2)
    return out.copy_(o)


def _check_inputs(q, k, v, mask, bias, scale: float, spec: SiteSpec) -> None:
    """The op's contract (module docstring), checked before any implementation runs: a clear error instead of a
    shape error deep inside one, or of unwritten output heads."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"locattn: q, k, v must be 4-D [B, H, S, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"locattn: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"locattn: k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"locattn: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if not math.isfinite(scale):
        raise ValueError(f"locattn: scale must be finite, got {scale}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"locattn: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"locattn: mask must be bool (True = attend), got {mask.dtype}; pass a float mask as bias")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"locattn: bias must be floating point, got {bias.dtype}")
    for g in spec.groups:
        if not g.mechanism.is_softmax:
            if bias is not None:
                raise ValueError(f"locattn: mechanism {g.mechanism.kind} cannot take a float bias (linear attention "
                                 "has no scores to add it to)")
            if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
                raise ValueError(f"locattn: mechanism {g.mechanism.kind} takes a key-padding mask ([..., 1, Sk]) only, "
                                 f"got a mask of shape {tuple(mask.shape)}")
    hq = q.shape[1]
    heads = [h for g in spec.groups for h in (range(hq) if g.heads is None else g.heads)]
    if sorted(heads) != list(range(hq)):
        raise ValueError(f"locattn: the spec's head groups must cover heads 0..{hq - 1} once each, got "
                         f"{spec.describe()!r}")


def _group_calls(q, k, v, mask, bias, scale, is_causal, spec: SiteSpec, backend: str = ""):
    """Split one op call into per-head-group :class:`AttentionCall` s: ``([(q_heads, kv_heads, call)], impl)``,
    both heads None for a group of all heads. ``q_heads`` (tuple) are the group's query heads, ``kv_heads``
    (tuple) the key/value heads its call reads, in the call's head order. ``impl``: an implementation that runs
    several head groups at once (one kernel launch, ``registry.select_multi``); then the list holds that one
    call (``AttentionCall.head_groups``) and no head is gathered.

    GQA (``Hq = rep x Hk``): a group whose query heads take the same number ``r`` of heads from each kv head they
    use keeps GQA (its call reads each of those kv heads once, ``r`` query heads per kv head; views when the
    heads are one run): whole GQA groups, one head per kv head, any subset under MQA. Any other group reads one
    kv head per query head (k / v heads repeated: a copy, counted as ``kv_repeated``)."""
    _check_inputs(q, k, v, mask, bias, scale, spec)
    hq, hk = q.shape[1], k.shape[1]
    mask, bias = _as4d(mask), _as4d(bias)
    s_q, s_k = q.shape[-2], k.shape[-2]
    rep = hq // hk
    resolved = []
    for g in spec.groups:
        layout, q_offset = g.layout, 0
        if g.pattern.local:
            if s_q != s_k:
                if not (g.pattern.causal_rule and s_q < s_k):
                    raise PatternError(f"pattern {g.pattern.name} needs self-attention (or a causal rule with "
                                       f"S_q < S_k) but Sq={s_q} != Sk={s_k}")
                q_offset = s_k - s_q
            layout = layout.resolve(s_k)
            g.pattern.validate(layout.grid)
            if q_offset and not g.mechanism.is_softmax:
                raise PatternError(f"mechanism {g.mechanism.kind}: queries at an offset (S_q={s_q} < S_k={s_k}) "
                                   f"are not supported; only softmax groups take a causal rule's offset")
            if q_offset and len(layout.grid) != 1:
                raise PatternError(f"pattern {g.pattern.name}: queries at an offset (S_q={s_q} < S_k={s_k}) need a "
                                   f"1-D layout, got grid {list(layout.grid)}")
        resolved.append((g, layout, q_offset))
    if len(resolved) > 1 and not any(g.pattern.dynamic or not g.mechanism.is_softmax for g, _, _ in resolved):
        local = [r for r in resolved if r[0].pattern.local]
        g0, lay0, off0 = local[0] if local else resolved[0]
        multi = AttentionCall(q, k, v, mask, bias, scale, is_causal, g0.pattern, lay0, q_offset=off0,
                              head_groups=tuple((tuple(sorted(g.heads)), g.pattern, lay) for g, lay, _ in resolved),
                              softcap=spec.softcap)
        impl = registry.select_multi(multi, backend)
        if impl is not None:
            return [(None, None, multi)], impl
    out = []
    for g, layout, q_offset in resolved:
        if g.heads is None:
            out.append((None, None, AttentionCall(q, k, v, mask, bias, scale, is_causal, g.pattern, layout,
                                                  q_offset=q_offset, softcap=spec.softcap, mechanism=g.mechanism)))
            continue
        heads = sorted(g.heads)
        owners = [h // rep for h in heads]  # non-decreasing
        kv = sorted(set(owners))
        r = len(heads) // len(kv)
        if owners != [j for j in kv for _ in range(r)]:
            kv = owners
            bump("kv_repeated", f"query heads {head_ranges(tuple(heads))} take unequal shares of GQA groups of {rep}")
        call = AttentionCall(_take_heads(q, heads), _take_heads(k, kv), _take_heads(v, kv), _take_heads(mask, heads),
                             _take_heads(bias, heads), scale, is_causal, g.pattern, layout, q_offset=q_offset,
                             softcap=spec.softcap, mechanism=g.mechanism)
        out.append((tuple(heads), tuple(kv), call))
    return out, None


def _sum_repeated(grads: tuple[torch.Tensor, ...], kv: tuple[int, ...]):
    """Gradients of a call whose heads repeat kv heads (``kv`` lists one per call head) summed per kv head, in
    a fixed order: ``index_add_`` with repeated indices would accumulate them by atomics on CUDA (run-to-run
    bits would differ). Returns the reduced gradients and their kv heads."""
    uniq = tuple(sorted(set(kv)))
    if len(uniq) == len(kv):
        return grads, kv
    pos = [[i for i, x in enumerate(kv) if x == j] for j in uniq]
    return tuple(torch.stack([g[:, p].sum(1) for p in pos], 1) for g in grads), uniq


@torch.library.custom_op("locattn::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], scale: float, is_causal: bool, spec: str,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    site_spec = parse_spec(spec)
    groups, impl = _group_calls(q, k, v, mask, bias, scale, is_causal, site_spec, backend)
    b, hq, s_q, _ = q.shape
    if len(groups) == 1 and groups[0][0] is None:  # one call: all heads, or every head group at once
        call = groups[0][2]
        o, lse = (impl or registry.select(call, backend)).forward(call)
        _record_density(site_spec, call, None, hq)
        return _sdpa_layout(o), lse.contiguous()
    out = _new_out(q, v)
    lse_out = q.new_empty(b, hq, s_q, dtype=lse_dtype(q.dtype))
    for heads, _, call in groups:
        o, lse = registry.select(call, backend).forward(call)
        _record_density(site_spec, call, heads, hq)
        idx = _head_index(heads, q.device)
        out.index_copy_(1, idx, o.to(out.dtype))
        lse_out.index_copy_(1, idx, lse)
    return out, lse_out


def _record_density(spec: SiteSpec, call: AttentionCall, heads, n_heads: int) -> None:
    """A ``dynamic`` group's measured density, per batch element and head (``locattn.densities()``)."""
    if not call.pattern.dynamic:
        return
    b, h = call.q.shape[:2]
    pairs = call.dynamic_tables().pairs.view(b, h)
    record_density(spec.site or "<unnamed>", n_heads, heads, pairs / float(call.q.shape[-2] * call.k.shape[-2]))


@attention.register_fake
def _(q, k, v, mask, bias, scale, is_causal, spec, backend):
    b, hq, s_q, _ = q.shape
    return _new_out(q, v), q.new_empty(b, hq, s_q, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("locattn::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], scale: float, is_causal: bool, spec: str, backend: str,
                       need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` (shapes of q, k, v) and ``dbias`` (bias's shape; empty if not needed)."""
    # grad_out as autograd hands it over (the model's layout, often [B, Sq, Hq, Dv] in memory, or an expanded
    # stride-0 tensor): every implementation reads it through its strides or copies it itself
    groups, impl = _group_calls(q, k, v, mask, bias, scale, is_causal, parse_spec(spec), backend)
    want_dbias = need_dbias and bias is not None
    if len(groups) == 1 and groups[0][0] is None:  # one call: its gradients are the op's, nothing to scatter
        call = groups[0][2]
        gq, gk, gv, gb = (impl or registry.select(call, backend)).backward(call, grad_out, out, lse, need_dbias)
        dbias = gb.to(bias.dtype).reshape(bias.shape).contiguous() if want_dbias else q.new_empty(0)
        return gq.to(q.dtype).contiguous(), gk.to(k.dtype).contiguous(), gv.to(v.dtype).contiguous(), dbias
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = torch.zeros_like(bias) if want_dbias else q.new_empty(0)
    for heads, kv, call in groups:
        idx = _head_index(heads, q.device)
        g_o, o, l = grad_out.index_select(1, idx), out.index_select(1, idx), lse.index_select(1, idx)
        gq, gk, gv, gb = registry.select(call, backend).backward(call, g_o, o, l, need_dbias)
        dq.index_add_(1, idx, gq.to(q.dtype))
        (gk, gv), kv = _sum_repeated((gk, gv), kv)
        kv_idx = _head_index(kv, q.device)
        dk.index_add_(1, kv_idx, gk.to(k.dtype))
        dv.index_add_(1, kv_idx, gv.to(v.dtype))
        if gb is not None:
            if bias.dim() >= 4 and bias.shape[-3] != 1:
                dbias.view(-1, *bias.shape[-3:]).index_add_(1, idx, gb.reshape(-1, *gb.shape[-3:]).to(dbias.dtype))
            else:
                dbias += gb.to(dbias.dtype).reshape(dbias.shape)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous()


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, bias, scale, is_causal, spec, backend, need_dbias):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if (need_dbias and bias is not None) \
        else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, scale, is_causal, spec, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, bias)
    ctx.meta = (scale, is_causal, spec, backend)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, bias = ctx.saved_tensors
    scale, is_causal, spec, backend = ctx.meta
    dq, dk, dv, dbias = attention_backward(grad_out, q, k, v, out, lse, mask, bias, scale, is_causal, spec,
                                           backend, ctx.bias_grad)
    return dq, dk, dv, None, (dbias if ctx.bias_grad else None), None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)

#: keeps the autocast registrations alive
_AUTOCAST_LIB = torch.library.Library("locattn", "IMPL")


def _register_autocast(device_type: str) -> None:
    """Under ``torch.autocast(device_type)`` the op casts q, k and v (not fp64) to the autocast dtype, as autocast
    does for the ``F.scaled_dot_product_attention`` it replaces: without it, a rewritten site under autocast
    would see what SDPA never sees (e.g. fp32 q / k after a norm beside a bf16 v) and leave the fused kernels
    (mixed dtypes) for the blocked fallback. A float bias stays as it is: every implementation adds it in fp32,
    as a hand-written ``scores + bias`` does under autocast (autocast would round SDPA's to bf16). The dtype is
    read at each call (``torch.autocast(dtype=...)``), unlike ``torch.library.register_autocast``'s fixed one."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(t):
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
        return t.to(torch.get_autocast_dtype(device_type)) if ok and t.dtype != torch.float64 else t

    def kernel(_keys, q, k, v, mask, bias, scale, is_causal, spec, backend):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.locattn.attention.default(cast(q), cast(k), cast(v), mask, bias, scale, is_causal,
                                                       spec, backend)

    _AUTOCAST_LIB.impl("attention", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


def _register_implementations() -> None:
    from .codegen.blocked import Blocked
    from .codegen.reference import Reference
    from .codegen.cpu_fast import CpuFast
    from .codegen.triton_impl import Triton

    # order = preference: the first entry whose can_run() accepts a call runs it
    registry.register(CpuFast())     # CPU tensors
    registry.register(Triton())      # CUDA tensors (CPU only under TRITON_INTERPRET=1, when forced)
    registry.register(Blocked())     # any device
    registry.register(Reference())   # any device, O(S^2): the semantic definition
    _register_linear()


def _register_linear() -> None:
    """The linear / hybrid mechanisms (``locattn/codegen/linear``): every softmax implementation above declines
    them, and these decline softmax calls (``Implementation.mechanisms``)."""
    from .codegen.linear.chunked import LinearChunked
    from .codegen.linear.naive import LinearReference
    from .codegen.linear.triton import LinearTriton

    registry.register(LinearChunked())    # CPU tensors
    registry.register(LinearTriton())     # CUDA tensors (CPU only under TRITON_INTERPRET=1, when forced)
    registry.register(LinearReference())  # any device, O(S^2): the definition


_register_implementations()

__all__ = ["attention", "attention_backward", "HeadGroup", "SiteSpec"]
