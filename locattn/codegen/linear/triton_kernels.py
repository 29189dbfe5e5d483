"""Triton kernels of the linear sums (:mod:`locattn.codegen.linear.common`): chunked over all keys, and a walk
over a pattern's block plan for the hybrid's ``in_pattern`` part.

Glossary
--------
BLOCK_C      chunk length: the all-keys kernels cut the sequence into chunks of BLOCK_C rows; causal chunks
             add the intra-chunk triangle, every chunk reads the state of the chunks before it
BLOCK_F      feature count m padded to a power of two (>= 16); loads are masked with ``f < NF``
BLOCK_DV     head dim of v padded likewise
BLOCK_M/N    query / key slots per block of the pattern's plan (``in_pattern`` kernels)
state        ``H[c] = sum_{j in earlier chunks} fk_j v_j^T`` [m, Dv], ``Z[c] = sum fk_j`` [m]: computed per chunk
             by ``chunk_state`` and prefix-summed on the host (``torch.cumsum`` over chunks; non-causal: the
             total, read by every chunk through a chunk stride of 0)
CAUSAL       key j <= query i (top-left aligned); the intra-chunk triangle
GROUP        GQA group size Hq // Hk: query head h reads kv head h // GROUP; ``chunk_dkv`` / ``pattern_dkv``
             sum the group in registers (no atomics: deterministic)
PRECISION    ``tl.dot`` input precision: "ieee" for fp32 sites, "tf32" for fp16 / bf16 sites (features are
             fp32 either way)
q_lo/q_hi    int32 [3, n_q_slots]: per query slot and grid axis, the u-space key interval (inclusive)
k_u          int32 [3, n_k_slots]: per key slot and axis, the key's u-space coordinate
             (:func:`locattn.patterns.base.query_bounds` / ``key_coords``; padding slots hold -1 tokens)
HAS_GLOBALS  the layout has global tokens or sinks: a global query or key, or a sink key, is always allowed

Every tensor is contiguous ``[B, H, S, X]`` (the host wrapper makes it so); features and sums are fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

_SIZES = ["H", "HK", "S", "S_q", "S_k", "NF", "DV", "n_chunks", "prefix", "grid_end", "sinks", "n_q_slots",
          "n_k_slots"]


@triton.jit
def _rows(ptr, rows, valid, cols, ncols, BLOCK_X: tl.constexpr):
    """Load rows ``rows`` (masked by ``valid``) of a row-major [*, ncols] matrix as fp32 [len(rows), BLOCK_X]."""
    x = tl.load(ptr + rows[:, None] * ncols + cols[None, :], mask=valid[:, None] & (cols[None, :] < ncols),
                other=0.0)
    return x.to(tl.float32)


@triton.jit
def _kv_head(bh, H, GROUP: tl.constexpr):
    """The flat (batch, kv head) index of flat (batch, query head) ``bh``."""
    return (bh // H) * (H // GROUP) + (bh % H) // GROUP


@triton.jit
def _state(Hs, Zs, sbase, f, e, NF, DV):
    """State ``H`` [BLOCK_F, BLOCK_DV] and ``Z`` [BLOCK_F] number ``sbase`` (fp32, zero-padded)."""
    hs = tl.load(Hs + sbase * NF * DV + f[:, None] * DV + e[None, :], mask=(f[:, None] < NF) & (e[None, :] < DV),
                 other=0.0)
    zs = tl.load(Zs + sbase * NF + f, mask=f < NF, other=0.0)
    return hs, zs


@triton.jit(do_not_specialize=_SIZES)
def chunk_state(A, Bv, W, St, Zt, S, NF, DV, n_chunks, HAS_W: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk: ``St[bh, c] = A_c^T Bv_c`` [NF, DV] and ``Zt[bh, c] = A_c^T w_c`` [NF] (w = 1 without W).
    Grid (n_chunks, BH)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = rows < S
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    a = _rows(A + bh * S * NF, rows, valid, f, NF, BLOCK_F)                       # [C, F]
    bv = _rows(Bv + bh * S * DV, rows, valid, e, DV, BLOCK_DV)                     # [C, DV]
    st = tl.dot(tl.trans(a), bv, input_precision=PRECISION)                        # [F, DV]
    if HAS_W:
        w = tl.load(W + bh * S + rows, mask=valid, other=0.0)
        z = tl.sum(a * w[:, None], 0)
    else:
        z = tl.sum(a, 0)
    base = bh * n_chunks + c
    tl.store(St + base * NF * DV + f[:, None] * DV + e[None, :], st, mask=(f[:, None] < NF) & (e[None, :] < DV))
    tl.store(Zt + base * NF + f, z, mask=f < NF)


@triton.jit(do_not_specialize=_SIZES)
def chunk_out(FQ, FK, V, Hs, Zs, Num, Den, H, S_q, S_k, NF, DV, n_chunks, state_chunks, GROUP: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr):
    """``num = fq_c H[c] (+ tril(fq_c fk_c^T) v_c)``, ``den`` likewise, per query chunk. Grid (n_q_chunks, B*H).
    ``state_chunks`` = n_chunks (causal) or 1 (non-causal: the total, for every chunk)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = _kv_head(bh, H, GROUP)
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    qv = rows < S_q
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    fq = _rows(FQ + bh * S_q * NF, rows, qv, f, NF, BLOCK_F)
    hs, zs = _state(Hs, Zs, bhk * state_chunks + (c if CAUSAL else 0), f, e, NF, DV)
    num = tl.dot(fq, hs, input_precision=PRECISION)
    den = tl.sum(fq * zs[None, :], 1)
    if CAUSAL:
        kv = rows < S_k
        fk = _rows(FK + bhk * S_k * NF, rows, kv, f, NF, BLOCK_F)
        v = _rows(V + bhk * S_k * DV, rows, kv, e, DV, BLOCK_DV)
        a = tl.dot(fq, tl.trans(fk), input_precision=PRECISION)
        tri = rows[:, None] >= rows[None, :]
        a = tl.where(tri, a, 0.0)
        num += tl.dot(a, v, input_precision=PRECISION)
        den += tl.sum(a, 1)
    tl.store(Num + bh * S_q * DV + rows[:, None] * DV + e[None, :], num, mask=qv[:, None] & (e[None, :] < DV))
    tl.store(Den + bh * S_q + rows, den, mask=qv)


@triton.jit(do_not_specialize=_SIZES)
def chunk_dq(GN, GD, FK, V, Hs, Zs, dFQ, H, S_q, S_k, NF, DV, state_chunks, GROUP: tl.constexpr,
             CAUSAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
             PRECISION: tl.constexpr):
    """``dfq = gn H[c]^T + gd Z[c]^T (+ tril(gn v^T + gd) fk)`` per query chunk. Grid (n_q_chunks, B*H)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = _kv_head(bh, H, GROUP)
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    qv = rows < S_q
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    gn = _rows(GN + bh * S_q * DV, rows, qv, e, DV, BLOCK_DV)
    gd = tl.load(GD + bh * S_q + rows, mask=qv, other=0.0)
    hs, zs = _state(Hs, Zs, bhk * state_chunks + (c if CAUSAL else 0), f, e, NF, DV)
    dfq = tl.dot(gn, tl.trans(hs), input_precision=PRECISION) + gd[:, None] * zs[None, :]
    if CAUSAL:
        kv = rows < S_k
        fk = _rows(FK + bhk * S_k * NF, rows, kv, f, NF, BLOCK_F)
        v = _rows(V + bhk * S_k * DV, rows, kv, e, DV, BLOCK_DV)
        da = tl.dot(gn, tl.trans(v), input_precision=PRECISION) + gd[:, None]
        da = tl.where(rows[:, None] >= rows[None, :], da, 0.0)
        dfq += tl.dot(da, fk, input_precision=PRECISION)
    tl.store(dFQ + bh * S_q * NF + rows[:, None] * NF + f[None, :], dfq, mask=qv[:, None] & (f[None, :] < NF))


@triton.jit(do_not_specialize=_SIZES)
def chunk_dkv(FQ, GN, GD, FK, V, dHs, dZs, dFK, dV, HK, S_q, S_k, NF, DV, state_chunks, GROUP: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr):
    """Per key chunk and kv head: ``dfk = v dH[c]^T + dZ[c] (+ sum_group tril(gn v^T + gd)^T fq)`` and
    ``dv = fk dH[c] (+ sum_group tril(fq fk^T)^T gn)``; dH / dZ are the reverse states of the later chunks
    (non-causal: of every query), summed over the GQA group. Grid (n_k_chunks, B*HK)."""
    c = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HK
    hk = bhk % HK
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    kv = rows < S_k
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    fk = _rows(FK + bhk * S_k * NF, rows, kv, f, NF, BLOCK_F)
    v = _rows(V + bhk * S_k * DV, rows, kv, e, DV, BLOCK_DV)
    dh, dz = _state(dHs, dZs, bhk * state_chunks + (c if CAUSAL else 0), f, e, NF, DV)
    dfk = tl.dot(v, tl.trans(dh), input_precision=PRECISION) + dz[None, :]
    dvv = tl.dot(fk, dh, input_precision=PRECISION)
    if CAUSAL:
        qv = rows < S_q
        tri_t = rows[:, None] <= rows[None, :]                       # [key j, query i]: j <= i
        for g in range(GROUP):
            bh = (b * HK + hk) * GROUP + g
            fq = _rows(FQ + bh * S_q * NF, rows, qv, f, NF, BLOCK_F)
            gn = _rows(GN + bh * S_q * DV, rows, qv, e, DV, BLOCK_DV)
            gd = tl.load(GD + bh * S_q + rows, mask=qv, other=0.0)
            at = tl.where(tri_t, tl.dot(fk, tl.trans(fq), input_precision=PRECISION), 0.0)          # [Ck, Cq]
            dat = tl.dot(v, tl.trans(gn), input_precision=PRECISION) + gd[None, :]
            dat = tl.where(tri_t, dat, 0.0)
            dfk += tl.dot(dat, fq, input_precision=PRECISION)
            dvv += tl.dot(at, gn, input_precision=PRECISION)
    dfk = tl.where(kv[:, None], dfk, 0.0)
    dvv = tl.where(kv[:, None], dvv, 0.0)
    tl.store(dFK + bhk * S_k * NF + rows[:, None] * NF + f[None, :], dfk, mask=kv[:, None] & (f[None, :] < NF))
    tl.store(dV + bhk * S_k * DV + rows[:, None] * DV + e[None, :], dvv, mask=kv[:, None] & (e[None, :] < DV))


# ----------------------------------------------------------------------------------------------------------
# the pattern's keys: a walk over the block plan


@triton.jit
def _allowed(qt, kt, q_lo, q_hi, k_u, qslot, kslot, n_q_slots, n_k_slots, prefix, grid_end, sinks,
             NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr):
    """pattern & causal & padding for query slots ``qslot`` (tokens ``qt``) x key slots ``kslot`` (``kt``)."""
    keep = (qt[:, None] >= 0) & (kt[None, :] >= 0)
    if NDIM > 0:
        win = keep
        for a in tl.static_range(NDIM):
            lo = tl.load(q_lo + a * n_q_slots + qslot)
            hi = tl.load(q_hi + a * n_q_slots + qslot)
            u = tl.load(k_u + a * n_k_slots + kslot)
            win = win & (u[None, :] >= lo[:, None]) & (u[None, :] <= hi[:, None])
        if HAS_GLOBALS:
            glob = ((qt < prefix) | (qt >= grid_end))[:, None] | \
                ((kt < prefix) | (kt >= grid_end) | (kt < sinks))[None, :]
            win = win | (glob & keep)
        keep = win
    if CAUSAL:
        keep = keep & (kt[None, :] <= qt[:, None])
    return keep


@triton.jit(do_not_specialize=_SIZES)
def pattern_fwd(FQ, FK, V, Num, Den, q_slots, k_slots, kv_ptr, kv_idx, q_lo, q_hi, k_u,
                H, S, NF, DV, n_q_slots, n_k_slots, prefix, grid_end, sinks, GROUP: tl.constexpr,
                NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """``num_i = sum_{j in P(i)} (fq_i . fk_j) v_j``, ``den_i`` likewise, over the plan's key blocks of each
    query block. Grid (n_qblocks, B*H)."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = _kv_head(bh, H, GROUP)
    qslot = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qt = tl.load(q_slots + qslot)
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    fq = _rows(FQ + bh * S * NF, qt, qt >= 0, f, NF, BLOCK_F)
    num = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for i in range(tl.load(kv_ptr + m), tl.load(kv_ptr + m + 1)):
        n = tl.load(kv_idx + i)
        kslot = n * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(k_slots + kslot)
        fk = _rows(FK + bhk * S * NF, kt, kt >= 0, f, NF, BLOCK_F)
        v = _rows(V + bhk * S * DV, kt, kt >= 0, e, DV, BLOCK_DV)
        keep = _allowed(qt, kt, q_lo, q_hi, k_u, qslot, kslot, n_q_slots, n_k_slots, prefix, grid_end, sinks,
                        NDIM, CAUSAL, HAS_GLOBALS)
        kap = tl.where(keep, tl.dot(fq, tl.trans(fk), input_precision=PRECISION), 0.0)
        num += tl.dot(kap, v, input_precision=PRECISION)
        den += tl.sum(kap, 1)
    qv = qt >= 0
    tl.store(Num + bh * S * DV + qt[:, None] * DV + e[None, :], num, mask=qv[:, None] & (e[None, :] < DV))
    tl.store(Den + bh * S + qt, den, mask=qv)


@triton.jit(do_not_specialize=_SIZES)
def pattern_dq(GN, GD, FK, V, dFQ, q_slots, k_slots, kv_ptr, kv_idx, q_lo, q_hi, k_u,
               H, S, NF, DV, n_q_slots, n_k_slots, prefix, grid_end, sinks, GROUP: tl.constexpr,
               NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """``dfq_i = sum_{j in P(i)} (gn_i . v_j + gd_i) fk_j``. Grid (n_qblocks, B*H)."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = _kv_head(bh, H, GROUP)
    qslot = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qt = tl.load(q_slots + qslot)
    qv = qt >= 0
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    gn = _rows(GN + bh * S * DV, qt, qv, e, DV, BLOCK_DV)
    gd = tl.load(GD + bh * S + qt, mask=qv, other=0.0)
    dfq = tl.zeros([BLOCK_M, BLOCK_F], tl.float32)
    for i in range(tl.load(kv_ptr + m), tl.load(kv_ptr + m + 1)):
        n = tl.load(kv_idx + i)
        kslot = n * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(k_slots + kslot)
        fk = _rows(FK + bhk * S * NF, kt, kt >= 0, f, NF, BLOCK_F)
        v = _rows(V + bhk * S * DV, kt, kt >= 0, e, DV, BLOCK_DV)
        keep = _allowed(qt, kt, q_lo, q_hi, k_u, qslot, kslot, n_q_slots, n_k_slots, prefix, grid_end, sinks,
                        NDIM, CAUSAL, HAS_GLOBALS)
        dk = tl.where(keep, tl.dot(gn, tl.trans(v), input_precision=PRECISION) + gd[:, None], 0.0)
        dfq += tl.dot(dk, fk, input_precision=PRECISION)
    tl.store(dFQ + bh * S * NF + qt[:, None] * NF + f[None, :], dfq, mask=qv[:, None] & (f[None, :] < NF))


@triton.jit(do_not_specialize=_SIZES)
def pattern_dkv(FQ, GN, GD, FK, V, dFK, dV, k_slots, q_slots, qb_ptr, qb_idx, q_lo, q_hi, k_u,
                HK, S, NF, DV, n_q_slots, n_k_slots, prefix, grid_end, sinks, GROUP: tl.constexpr,
                NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Per key block and kv head, over the query blocks that visit it (transposed CSR) and the GQA group:
    ``dfk_j = sum_{i: j in P(i)} (gn_i . v_j + gd_i) fq_i``, ``dv_j = sum (fq_i . fk_j) gn_i``.
    Grid (n_kblocks, B*HK)."""
    n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    kslot = n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = tl.load(k_slots + kslot)
    kv = kt >= 0
    f = tl.arange(0, BLOCK_F)
    e = tl.arange(0, BLOCK_DV)
    fk = _rows(FK + bhk * S * NF, kt, kv, f, NF, BLOCK_F)
    v = _rows(V + bhk * S * DV, kt, kv, e, DV, BLOCK_DV)
    dfk = tl.zeros([BLOCK_N, BLOCK_F], tl.float32)
    dvv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(GROUP):
        bh = bhk * GROUP + g
        for i in range(tl.load(qb_ptr + n), tl.load(qb_ptr + n + 1)):
            m = tl.load(qb_idx + i)
            qslot = m * BLOCK_M + tl.arange(0, BLOCK_M)
            qt = tl.load(q_slots + qslot)
            qv = qt >= 0
            fq = _rows(FQ + bh * S * NF, qt, qv, f, NF, BLOCK_F)
            gn = _rows(GN + bh * S * DV, qt, qv, e, DV, BLOCK_DV)
            gd = tl.load(GD + bh * S + qt, mask=qv, other=0.0)
            keep = tl.trans(_allowed(qt, kt, q_lo, q_hi, k_u, qslot, kslot, n_q_slots, n_k_slots, prefix,
                                     grid_end, sinks, NDIM, CAUSAL, HAS_GLOBALS))             # [N, M]
            kap_t = tl.where(keep, tl.dot(fk, tl.trans(fq), input_precision=PRECISION), 0.0)
            dk_t = tl.where(keep, tl.dot(v, tl.trans(gn), input_precision=PRECISION) + gd[None, :], 0.0)
            dfk += tl.dot(dk_t, fq, input_precision=PRECISION)
            dvv += tl.dot(kap_t, gn, input_precision=PRECISION)
    tl.store(dFK + bhk * S * NF + kt[:, None] * NF + f[None, :], dfk, mask=kv[:, None] & (f[None, :] < NF))
    tl.store(dV + bhk * S * DV + kt[:, None] * DV + e[None, :], dvv, mask=kv[:, None] & (e[None, :] < DV))
