"""Triton linear and hybrid attention (``linear_triton``): the sums of :mod:`locattn.codegen.linear.common` as
Triton kernels (:mod:`locattn.codegen.linear.triton_kernels`); the hybrid's softmax part runs on ``triton``.

All keys: ``chunk_state`` (per-chunk ``fk^T v``, ``fk^T 1``; prefix-summed over chunks with ``torch.cumsum``:
O(S/C m Dv)), then ``chunk_out`` (``fq H[c]`` + the causal intra-chunk triangle). Backward: ``chunk_dq``, the
reverse states (``chunk_state`` over ``fq``, ``gn``, ``gd``, summed over the GQA group, reverse cumsum) and
``chunk_dkv``. Non-causal sites use the same kernels with one total state (chunk stride 0): one ``fk^T v`` per
head. The pattern's keys (hybrid): ``pattern_fwd`` / ``pattern_dq`` walk the pattern's block plan per query
block, ``pattern_dkv`` its transpose per key block, testing pattern & causal & padding in-kernel from per-slot
u-space intervals (:func:`pattern_tables`, O(S) on the host, cached per plan).

Feature maps (elu / relu / favor) run as PyTorch ops on the device before the kernels (O(S D m)); the kernels
read fp32 features. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import os

import torch

from ...patterns.base import Layout, Pattern, key_coords, query_bounds
from ...patterns.plan import BlockPlan, build_plan
from ..registry import AttentionCall
from .common import LinearImplementation, Sums

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 256


def _kernels():
    from . import triton_kernels
    return triton_kernels


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_kernels().chunk_out, InterpretedFunction)


@functools.lru_cache(maxsize=128)
def pattern_tables(plan: BlockPlan, pattern: Pattern, layout: Layout, device: torch.device) -> dict:
    """Device tables of a plan for the ``pattern_*`` kernels (see the kernel glossary)."""
    nq, nk = plan.n_qblocks, plan.n_kblocks
    rows = torch.repeat_interleave(torch.arange(nq), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    cols = plan.kv_idx
    order = torch.argsort(cols * max(1, nq) + rows)
    qb_idx = rows[order]
    qb_ptr = torch.zeros(nk + 1, dtype=torch.long)
    qb_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=nk), 0)
    nqs, nks = plan.q_slots.numel(), plan.k_slots.numel()
    q_lo = torch.zeros(3, nqs, dtype=torch.long)
    q_hi = torch.zeros(3, nqs, dtype=torch.long)
    k_u = torch.zeros(3, nks, dtype=torch.long)
    ndim, prefix, grid_end, sinks, glob = 0, 0, 0, 0, False
    if pattern.local:
        ndim = len(layout.grid)
        for a, (lo, hi) in enumerate(query_bounds(pattern, layout, plan.q_slots.clamp_min(0))):
            q_lo[a], q_hi[a] = lo, hi
        for a, u in enumerate(key_coords(pattern, layout, plan.k_slots.clamp_min(0))):
            k_u[a] = u
        prefix, grid_end, sinks = layout.prefix, layout.prefix + layout.n_grid, layout.sinks
        glob = bool(layout.prefix or layout.suffix or layout.sinks)

    def dev(t):
        return t.to(device=device, dtype=torch.int32).contiguous()

    return dict(q_slots=dev(plan.q_slots), k_slots=dev(plan.k_slots), kv_ptr=dev(plan.kv_ptr),
                kv_idx=dev(plan.kv_idx), qb_ptr=dev(qb_ptr), qb_idx=dev(qb_idx), q_lo=dev(q_lo), q_hi=dev(q_hi),
                k_u=dev(k_u), ndim=ndim, prefix=prefix, grid_end=grid_end, sinks=sinks, has_globals=glob)


class TritonSums(Sums):
    """``chunk``: rows per chunk (all keys); ``block``: query / key block of the pattern's plan. Defaults: 64,
    16 under the interpreter (its programs run serially in numpy)."""

    def __init__(self, chunk: int | None = None, block: int | None = None):
        self.chunk = chunk
        self.block = block

    def _sizes(self, t: torch.Tensor) -> tuple[int, int]:
        small = t.device.type != "cuda"
        return self.chunk or (16 if small else 64), self.block or (16 if small else 64)

    @staticmethod
    def _precision(v: torch.Tensor) -> str:
        return "ieee" if v.dtype == torch.float32 else "tf32"

    def _common(self, fq, fk, v):
        b, hq, s_q, nf = fq.shape
        hk, s_k, dv = fk.shape[1], fk.shape[2], v.shape[-1]
        return b, hq, hk, s_q, s_k, nf, dv, dict(BLOCK_F=_pow2(nf), BLOCK_DV=_pow2(dv), PRECISION=self._precision(v))

    def _states(self, a, bv, w, n, c, b, h, s, nf, dv, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Per chunk ``a^T bv`` [B*H, n, NF, DV] and ``a^T w`` [B*H, n, NF] (w = 1 when None)."""
        st = a.new_empty(b * h, n, nf, dv)
        zt = a.new_empty(b * h, n, nf)
        _kernels().chunk_state[(n, b * h)](a, bv, w if w is not None else zt, st, zt, s, nf, dv, n,
                                           HAS_W=w is not None, BLOCK_C=c, **meta)
        return st, zt

    def _forward_states(self, fk, v, causal, n, c, b, hk, s_k, nf, dv, meta):
        st, zt = self._states(fk, v, None, n, c, b, hk, s_k, nf, dv, meta)
        if causal:
            return torch.cumsum(st, 1) - st, torch.cumsum(zt, 1) - zt
        return st.sum(1, keepdim=True), zt.sum(1, keepdim=True)

    def all_keys(self, fq, fk, v, causal):
        b, hq, hk, s_q, s_k, nf, dv, meta = self._common(fq, fk, v)
        c, _ = self._sizes(fq)
        v = v.contiguous()
        n = _cdiv(max(s_q, s_k, 1), c)
        hs, zs = self._forward_states(fk, v, causal, n, c, b, hk, s_k, nf, dv, meta)
        num = fq.new_empty(b, hq, s_q, dv)
        den = fq.new_empty(b, hq, s_q)
        _kernels().chunk_out[(_cdiv(s_q, c), b * hq)](fq, fk, v, hs, zs, num, den, hq, s_q, s_k, nf, dv, n,
                                                      hs.shape[1], GROUP=hq // hk, CAUSAL=causal, BLOCK_C=c, **meta)
        return num, den

    def all_keys_backward(self, fq, fk, v, causal, gn, gd):
        b, hq, hk, s_q, s_k, nf, dv, meta = self._common(fq, fk, v)
        c, _ = self._sizes(fq)
        v, gn, gd = v.contiguous(), gn.contiguous(), gd.contiguous()
        n = _cdiv(max(s_q, s_k, 1), c)
        hs, zs = self._forward_states(fk, v, causal, n, c, b, hk, s_k, nf, dv, meta)
        group = hq // hk
        dfq = torch.empty_like(fq)
        _kernels().chunk_dq[(_cdiv(s_q, c), b * hq)](gn, gd, fk, v, hs, zs, dfq, hq, s_q, s_k, nf, dv, hs.shape[1],
                                                     GROUP=group, CAUSAL=causal, BLOCK_C=c, **meta)
        st, zt = self._states(fq, gn, gd, n, c, b, hq, s_q, nf, dv, meta)
        st = st.view(b * hk, group, n, nf, dv).sum(1)
        zt = zt.view(b * hk, group, n, nf).sum(1)
        if causal:  # reverse exclusive: the queries of later chunks
            dh = st.flip(1).cumsum(1).flip(1) - st
            dz = zt.flip(1).cumsum(1).flip(1) - zt
        else:
            dh, dz = st.sum(1, keepdim=True), zt.sum(1, keepdim=True)
        dfk = torch.empty_like(fk)
        dvv = fk.new_empty(b, hk, s_k, dv)
        _kernels().chunk_dkv[(_cdiv(s_k, c), b * hk)](fq, gn, gd, fk, v, dh, dz, dfk, dvv, hk, s_q, s_k, nf, dv,
                                                      dh.shape[1], GROUP=group, CAUSAL=causal, BLOCK_C=c, **meta)
        return dfq, dfk, dvv

    # -- the pattern's keys ----------------------------------------------------------------------------------
    def _tables(self, call: AttentionCall, t: torch.Tensor):
        _, blk = self._sizes(t)
        s = call.q.shape[-2]
        plan = build_plan(call.pattern, call.layout, s, s, blk, blk, call.is_causal)
        return plan, pattern_tables(plan, call.pattern, call.layout, t.device)

    def _pattern_meta(self, tab, blk, group, causal, meta):
        return dict(GROUP=group, NDIM=tab["ndim"], CAUSAL=causal, HAS_GLOBALS=tab["has_globals"], BLOCK_M=blk,
                    BLOCK_N=blk, **meta)

    def in_pattern(self, call, fq, fk, v):
        b, hq, hk, s, _, nf, dv, meta = self._common(fq, fk, v)
        plan, tab = self._tables(call, fq)
        v = v.contiguous()
        num = fq.new_empty(b, hq, s, dv)
        den = fq.new_empty(b, hq, s)
        _kernels().pattern_fwd[(plan.n_qblocks, b * hq)](
            fq, fk, v, num, den, tab["q_slots"], tab["k_slots"], tab["kv_ptr"], tab["kv_idx"], tab["q_lo"],
            tab["q_hi"], tab["k_u"], hq, s, nf, dv, plan.q_slots.numel(), plan.k_slots.numel(), tab["prefix"],
            tab["grid_end"], tab["sinks"], **self._pattern_meta(tab, plan.block_m, hq // hk, call.is_causal, meta))
        return num, den

    def in_pattern_backward(self, call, fq, fk, v, gn, gd):
        b, hq, hk, s, _, nf, dv, meta = self._common(fq, fk, v)
        plan, tab = self._tables(call, fq)
        v, gn, gd = v.contiguous(), gn.contiguous(), gd.contiguous()
        pm = self._pattern_meta(tab, plan.block_m, hq // hk, call.is_causal, meta)
        sizes = (nf, dv, plan.q_slots.numel(), plan.k_slots.numel(), tab["prefix"], tab["grid_end"], tab["sinks"])
        dfq = torch.empty_like(fq)
        _kernels().pattern_dq[(plan.n_qblocks, b * hq)](
            gn, gd, fk, v, dfq, tab["q_slots"], tab["k_slots"], tab["kv_ptr"], tab["kv_idx"], tab["q_lo"],
            tab["q_hi"], tab["k_u"], hq, s, *sizes, **pm)
        dfk = torch.empty_like(fk)
        dvv = fk.new_empty(b, hk, s, dv)
        _kernels().pattern_dkv[(plan.n_kblocks, b * hk)](
            fq, gn, gd, fk, v, dfk, dvv, tab["k_slots"], tab["q_slots"], tab["qb_ptr"], tab["qb_idx"], tab["q_lo"],
            tab["q_hi"], tab["k_u"], hk, s, *sizes, **pm)
        return dfq, dfk, dvv


class LinearTriton(LinearImplementation):
    """Linear / hybrid attention with Triton sums; the hybrid's softmax part runs on ``triton``."""

    name = "linear_triton"
    softmax_impls = ("triton",)

    def __init__(self, chunk: int | None = None, block: int | None = None):
        self.sums = TritonSums(chunk, block)

    def can_run(self, call):
        q, k, v = call.q, call.k, call.v
        if not (q.device == k.device == v.device):
            return False, "q, k and v are on different devices"
        if call.empty:
            return False, "empty tensor"
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        try:
            _kernels()
        except Exception as e:  # ImportError, or triton failing to initialise
            return False, f"triton is not importable ({type(e).__name__}: {e})"
        if q.device.type == "cpu" and not interpreted():
            return False, "TRITON_INTERPRET=1 was set after locattn's linear Triton kernels were built"
        if q.device.type not in ("cpu", "cuda"):
            return False, f"device {q.device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
        if q.dtype not in SUPPORTED_DTYPES or v.dtype not in SUPPORTED_DTYPES:
            return False, f"dtype {q.dtype} / {v.dtype} is not supported (fp16, bf16, fp32)"
        nf = call.mechanism.features if call.mechanism.feature_map == "favor" else q.shape[-1]
        if max(nf, v.shape[-1]) > MAX_DIM:
            return False, f"features / head dim {max(nf, v.shape[-1])} > {MAX_DIM}"
        if call.mask is not None and call.mask.device != q.device:
            return False, f"site mask on {call.mask.device}, q on {q.device}"
        if call.mechanism.kind == "hybrid" and call.pattern.local and len(call.layout.grid or ()) > 3:
            return False, f"grid of {len(call.layout.grid)} axes (at most 3)"
        ok, why = super().can_run(call)
        if ok and call.mechanism.kind == "hybrid":
            impl, why = self.softmax_impl(call, count=False)
            ok = impl is not None
        return ok, why
