"""A minimal dense flash-attention forward in Triton: the calibration point for locattn's kernels.

It does what a textbook Triton flash kernel does and nothing else: contiguous [B, H, S, D] tensors, S a
multiple of both tiles, D a power of two, pointer increments instead of computed addresses, no masks, no
plan. Whatever locattn's generic kernel (``locattn.codegen.triton_kernels.attn_fwd``) loses against it on the
same tile is the cost of its generality (gathered addressing, predicates, two loops, padding); whatever this
one loses against ``F.scaled_dot_product_attention`` is the gap of plain Triton on the GPU. It is a benchmark
instrument, not part of the package: ``gpu_attention.py --sweep`` times it next to the dense case.

    floor_forward(q, k, v, scale, block_m=128, block_n=64, num_warps=8, num_stages=3, tma=False, ws=False)
        -> out [B, H, S, D]

``tma=True``: the same loop with tensor descriptors (TMA bulk copies on sm_90) instead of pointer tiles, to
measure what TMA alone is worth; ``ws=True`` adds warp specialization to it (the two levers locattn's
``KernelConfig(tma=True, ws=True)`` forward uses on all-full plans).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _floor_fwd(Q, K, V, Out, S, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * S * D  # (batch, head) slab of a contiguous [B, H, S, D] tensor
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + rows[:, None] * D + offs_d[None, :])
    k_ptrs = K + base + offs_n[None, :] * D + offs_d[:, None]  # kᵀ tile [D, BLOCK_N]
    v_ptrs = V + base + offs_n[:, None] * D + offs_d[None, :]  # v tile [BLOCK_N, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for _ in range(0, S, BLOCK_N):
        s = tl.dot(q, tl.load(k_ptrs)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * D
        v_ptrs += BLOCK_N * D
    tl.store(Out + base + rows[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty))


@triton.jit
def _floor_fwd_tma(desc_q, desc_k, desc_v, Out, S, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, WS: tl.constexpr):
    """The same kernel with every input tile moved by tensor descriptors (TMA on sm_90) over [B * H * S, D]
    views; ``WS``: the loop asks for warp specialization (Triton 3.6 on Hopper: with 4 warps, a producer and
    two consumer warp groups; it needs the output stored through pointers, not a descriptor)."""
    base = tl.program_id(1) * S
    row = base + tl.program_id(0) * BLOCK_M
    q = desc_q.load([row, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in tl.range(0, S, BLOCK_N, warp_specialize=WS):
        s = tl.dot(q, desc_k.load([base + start, 0]).T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([base + start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    rows = (row + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(Out + rows[:, None] * D + tl.arange(0, D)[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty))


def floor_forward(q, k, v, scale: float, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
                  num_stages: int = 3, tma: bool = False, ws: bool = False):
    """Dense softmax attention of contiguous q, k, v [B, H, S, D] (S divisible by both tiles, D a power of
    two >= 16) -> out [B, H, S, D] in q's dtype."""
    import torch

    b, h, s, d = q.shape
    if s % block_m or s % block_n or d & (d - 1) or d < 16:
        raise ValueError(f"floor_forward needs S divisible by the tiles and D a power of two: S={s}, D={d}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    if tma or ws:  # tensor descriptors over [B * H * S, D]: TMA copies on sm_90
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(x, rows):
            return TensorDescriptor(x.view(-1, d), [b * h * s, d], [d, 1], [rows, d])
        _floor_fwd_tma[(s // block_m, b * h)](desc(q, block_m), desc(k, block_n), desc(v, block_n), out,
                                              s, scale * LOG2E, D=d, BLOCK_M=block_m, BLOCK_N=block_n, WS=ws,
                                              num_warps=num_warps, num_stages=num_stages)
        return out
    _floor_fwd[(s // block_m, b * h)](q, k, v, out, s, scale * LOG2E, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                      num_warps=num_warps, num_stages=num_stages)
    return out
