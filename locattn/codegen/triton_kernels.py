"""Fused Triton flash-attention kernels driven by a :class:`~locattn.patterns.plan.BlockPlan`.

Glossary
--------
BLOCK_M      query slots per program tile (rows of the score tile)
BLOCK_N      key slots per program tile (columns of the score tile)
BLOCK_D      head dim of q/k padded to a power of two (>= 16); loads are masked with ``d < D``
BLOCK_DV     head dim of v/out padded likewise (``DV`` may differ from ``D``)
slot         position in the plan's blocked order; ``q_slots[slot]`` / ``k_slots[slot]`` is the token index
             (-1 = padding). Rows are *gathered* by token index inside the kernel: no permuted copy of q/k/v.
kv_ptr/kv_split/kv_idx
             the plan's CSR, reordered so each query block lists its full key blocks first:
             ``kv_idx[kv_ptr[m]:kv_split[m]]`` are full, ``kv_idx[kv_split[m]:kv_ptr[m+1]]`` partial.
qb_ptr/qb_split/qb_idx
             the transposed CSR (query blocks of each key block, full first) for the dK/dV kernel.
q_iv         int64 [3, n_q_slots]: per query slot and axis, the u-space key interval [lo, lo + w] packed as
             ``lo | w << 32`` (one load per axis; empty intervals are (2**30, 0)), tested as one unsigned compare
             ``u - lo <= w``
k_u          int32 [3, n_k_slots]: per key slot and axis, the key's u-space coordinate
NDIM         grid rank of the pattern (0 = dense: no interval test), at most 3
prefix/grid_end/sinks
             global tokens are ``t < prefix`` or ``t >= grid_end``; keys ``t < sinks`` are sinks
QADDR/KADDR  how query / key slots map to tokens: 0 = the slot tables; 1 = LINEAR, slot i holds token i
             (tokens >= seq_q / seq_k are padding: dense and plain 1-D plans); otherwise GRID = GRID_BIT | log2
             of the tile side per axis (4 bits each): 2-D/3-D blocks are spatial tiles of the g0 x g1 (x g2)
             grid, tokens and key u-coordinates computed by index arithmetic (block index divided by the
             tile-grid extents in fp32, ``_divmod``; the host mirror proves it exact for the plan). Computed modes
             read no table
RANGES       every query block's key blocks form one contiguous range with its full blocks contiguous inside
             (dense, 1-D windows): ``kv_rng[m] = (lo, full_lo, full_hi, hi)`` is read once per program and the
             loops run ``n = lo ..`` directly, with no index load on the critical path. Likewise ``qb_rng`` per
             key block for dK/dV. Otherwise the CSR below is walked
IS_FULL      the loop walks full blocks: no pattern / causal / padding arithmetic at all, and (full blocks
             have no padding keys) K/V tiles load unmasked unless the head dim is not a power of two
FOLD         forward and dQ without site bias and with scale >= 1e-30: scores stay unscaled (the predicate masks
             them unscaled) and ``qk_scale`` is folded into the forward's row max and the exp2 argument (one FMA
             per score instead of a multiply and a subtract; on partial blocks the select sat between the two).
             dK/dV gets the same FMA by masking the exp2 argument instead of the score
HAS_PARTIAL  the plan has partial blocks; without them (dense, exactly tiled plans) the predicate loop is not
             compiled at all
HAS_GLOBALS  the layout has global tokens or sinks (prefix > 0, grid_end < S or sinks > 0): without them the
             partial-block predicate skips the global tests
WINDOW_ONLY  partial blocks of a local pattern without globals whose query windows lie inside the grid: the
             window test alone, no padding test. A padding key's u-coordinate lies outside every window (``k_u``
             holds ``PAD_U`` for padding slots; GRID keys past the grid are past every window); padding query
             rows are never stored (forward, dQ) and contribute nothing to dK/dV (their lse loads as +inf: p = 0).
             Each term of a conjunction costs one select per score (sm_90 SASS), so dropping the two padding
             terms halves the partial loop's selects
NOPAD        bit 0 (1): no query slot of the plan is padding; bit 1 (2): no key slot is
             (LINEAR: the sequence is a multiple of the block; GRID: the tiles divide the grid and fill their
             blocks). Partial blocks then load their gathered rows — K/V in the forward and dQ, q / dO / lse /
             delta in dK/dV — without a row mask, and the predicate drops that side's padding test; the row
             masks' validity arithmetic is gone from the loop (sm_90: the dK/dV partial loop's largest cost)
LD           the backward's per query row inputs, fp32 [B, H, S_q, 2]: (lse2 = lse in log2 units with empty rows
             at +inf, delta = rowsum(dO * O)), read as one int64 word per row (``_row_stats``)
CAUSAL       the site's ``is_causal``: key token <= query token (partial blocks only; the plan drops
             blocks entirely above the diagonal and marks straddling blocks partial)
HAS_MASK     site bool mask (uint8 view), applied on every visited block; strides 0 on broadcast dims
HAS_BIAS     site float bias, added to the scaled scores on every visited block; same stride convention
GROUP        GQA group size Hq // Hk: query head h reads kv head h // GROUP
VISIT        instrumented mode: every visit adds 1 (full) or 16 (partial) to ``Visits[bh, m, n]``
PRECISION    ``tl.dot`` input precision: "ieee" for fp32 inputs (matches eager fp32), "tf32" otherwise
             (ignored for fp16/bf16 operands)
UPCAST       interpreter + bf16 only: multiply exact fp32 copies (the interpreter's bf16 ``tl.dot`` is wrong)
PER_BH       the tables are per (batch, head) or per head group: head h reads group ``g = head_map[h]``, table
             ``x = b * tab_sb + g`` at ``kv_ptr + x * ptr_st`` / ``kv_split + x * ptr_st`` / ``kv_idx + x * idx_st``
             (likewise qb_*) and its query intervals at ``q_iv + g * iv_st``. ``dynamic``: g = h, tab_sb = H,
             iv_st = 0 (one static part); per-head rules of one site in one launch: g = the head's rule group,
             tab_sb = 0. Shared tables (a single static plan) skip all of it
DYN          ``dynamic``: a partial entry's block id carries the WHOLE bit (``1 << 30``): the selection keeps the
             whole block pair, so its pairs pass the predicate OR'd with the static part's (base, sinks,
             globals); ``DYN_CAUSAL``: those pairs also need key token <= query token
q_off        query row r is token ``r + q_off`` for the pattern (a causal rule's queries at the end of the keys:
             LM decoding); the site's mask, bias and CAUSAL stay on rows (SDPA's meaning)
SOFTCAP      the site's soft cap c (0.0: none; a constexpr, so uncapped kernels are compiled exactly as before):
             scaled scores become ``c * tanh(s / c)`` before the site bias / mask (computed in log2 units with
             ``c * log2(e)``); the backward multiplies dS by ``1 - tanh^2`` for dQ / dK (dBias takes dS itself).
             FOLD is off with it (the cap needs the scaled score)
WS           ``attn_fwd_tma`` only (the forward of all-full plans whose q/k/v tiles are tensor-descriptor boxes):
             the key-block loop asks Triton for warp specialization

Scores are kept in log2 units (``qk * scale * log2(e)``) so the softmax uses ``exp2``; ``lse`` is stored
in natural-log units. A row with no allowed key ends with ``l == 0``: it stores ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .registry import BIAS_MASK_BELOW as _BIAS_MASK_BELOW

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units (exp2)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
#: a site bias below it masks its key (the op's rule)
BIAS_MASK_BELOW: tl.constexpr = tl.constexpr(_BIAS_MASK_BELOW)

#: problem-size integers are not specialised on (value 1 / divisibility by 16): one compile per config, not
#: one per sequence length or layout (names absent from a signature are ignored)
_SIZES = ["H", "HK", "GROUP", "S", "S_q", "seq_q", "seq_k", "g0", "g1", "g2", "n_q_slots", "n_k_slots", "n_qblocks",
          "n_kblocks", "prefix", "grid_end", "sinks", "q_off", "tab_sb", "ptr_st", "idx_st", "iv_st"]

#: the WHOLE bit of a ``dynamic`` table entry (see PER_BH / DYN in the glossary)
WHOLE_BIT: tl.constexpr = tl.constexpr(1 << 30)


@triton.jit
def _divmod(x, n):
    """``(x // n, x % n)`` for a block index ``x >= 0`` and a tile-grid extent ``n``, in fp32 instead of an
    integer division (~20 instructions each, per loop iteration): ``trunc((x + 0.5) * rn(1 / n))``. Exact while
    ``x < 2**20``; the host mirror (``grid_slot_tokens``) computes the same fp32 expression and GRID addressing
    is only chosen where it reproduces the plan's tables."""
    q = ((x.to(tl.float32) + 0.5) * tl.math.div_rn(1.0, n.to(tl.float32))).to(tl.int32)
    return q, x - q * n


@triton.jit
def _tile_corner(blk, g1, g2, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """Grid coordinates of the first slot of block ``blk`` when blocks are spatial tiles (``ADDR`` =
    GRID_BIT | log2 tile sides, 4 bits per axis): the tiles are row-major over the tile grid. Returns (c0, c1,
    c2); c2 = 0 for 2-D grids."""
    L0 = ADDR & 15  # constexpr arithmetic: folded at compile time
    L1 = (ADDR >> 4) & 15
    L2 = (ADDR >> 8) & 15
    nt1 = (g1 + (1 << L1) - 1) >> L1  # tiles along axis 1
    if NDIM == 2:
        b0, b1 = _divmod(blk, nt1)
        c2 = blk * 0
    else:
        q2, b2 = _divmod(blk, (g2 + (1 << L2) - 1) >> L2)
        b0, b1 = _divmod(q2, nt1)
        c2 = b2 << L2
    return b0 << L0, b1 << L1, c2


@triton.jit
def _tile_offsets(offs, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """Per-axis offsets of slots ``offs`` inside their spatial tile (row-major in the tile; o0 reaches past the
    tile for slots past its size). Returns (o0, o1, o2); o2 = 0 for 2-D grids."""
    L1 = (ADDR >> 4) & 15
    L2 = (ADDR >> 8) & 15
    if NDIM == 2:
        o1 = offs & ((1 << L1) - 1)
        o0 = offs >> L1
        o2 = offs * 0
    else:
        o0 = offs >> (L1 + L2)
        o1 = (offs >> L2) & ((1 << L1) - 1)
        o2 = offs & ((1 << L2) - 1)
    return o0, o1, o2


@triton.jit
def _row_major(c0, c1, c2, g1, g2, NDIM: tl.constexpr):
    """Row-major token of grid coordinates (or token offset of coordinate offsets)."""
    if NDIM == 2:
        t = c0 * g1 + c1
    else:
        t = (c0 * g1 + c1) * g2 + c2
    return t


@triton.jit
def _grid_coords(blk, offs, g0, g1, g2, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """Grid coordinates of the slots ``offs`` of block ``blk`` when blocks are spatial tiles (``ADDR`` =
    GRID_BIT | log2 tile sides, 4 bits per axis): the block's tile is row-major over the tile grid, the slot
    row-major inside the tile, slots past the tile or the grid are padding. Returns (c0, c1, c2, valid).
    Spelled out rather than ``_tile_corner`` + ``_tile_offsets``: that composition is one SASS instruction longer
    in the 2-D partial-block loops (sm_90, triton 3.6; ``tools/compile_sm90.py --loops``)."""
    L0 = ADDR & 15  # constexpr arithmetic: folded at compile time
    L1 = (ADDR >> 4) & 15
    L2 = (ADDR >> 8) & 15
    if NDIM == 2:
        nt1 = (g1 + (1 << L1) - 1) >> L1
        b0, b1 = _divmod(blk, nt1)
        o1 = offs & ((1 << L1) - 1)
        o0 = offs >> L1
        c0 = (b0 << L0) + o0
        c1 = (b1 << L1) + o1
        c2 = offs * 0
        valid = (o0 < (1 << L0)) & (c0 < g0) & (c1 < g1)
    else:
        nt1 = (g1 + (1 << L1) - 1) >> L1
        nt2 = (g2 + (1 << L2) - 1) >> L2
        q2, b2 = _divmod(blk, nt2)
        b0, b1 = _divmod(q2, nt1)
        o2 = offs & ((1 << L2) - 1)
        o1 = (offs >> L2) & ((1 << L1) - 1)
        o0 = offs >> (L1 + L2)
        c0 = (b0 << L0) + o0
        c1 = (b1 << L1) + o1
        c2 = (b2 << L2) + o2
        valid = (o0 < (1 << L0)) & (c0 < g0) & (c1 < g1) & (c2 < g2)
    return c0, c1, c2, valid


@triton.jit
def _tokens(slots, blk, offs, seq, g0, g1, g2, BLOCK: tl.constexpr, ADDR: tl.constexpr, NDIM: tl.constexpr,
            ALL_VALID: tl.constexpr = False):
    """Token index of the slots ``offs`` of block ``blk`` (-1 = padding): computed for LINEAR (ADDR == 1) and
    GRID plans, else read from the slot table (ADDR == 0). ``ALL_VALID``: the block has no padding (a full
    block's keys), so computed tokens skip the padding test."""
    slot = blk * BLOCK + offs
    if ADDR == 1:
        if ALL_VALID:
            t = slot
        else:
            t = tl.where(slot < seq, slot, -1)
    elif ADDR != 0:
        t, valid = _grid_token(blk, offs, g0, g1, g2, ADDR, NDIM)
        if not ALL_VALID:
            t = tl.where(valid, t, -1)
    else:
        t = tl.load(slots + slot)
    return t


@triton.jit
def _block_rows(slots, blk, offs, seq, g0, g1, g2, BLOCK: tl.constexpr, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """The rows of a program's own block (the forward / dQ query block, the dK/dV key block): each slot's token
    (-1 = padding), whether it is real, and the int64 row it loads and stores (0 for padding, masked off)."""
    t = _tokens(slots, blk, offs, seq, g0, g1, g2, BLOCK, ADDR, NDIM)
    valid = t >= 0
    return t, valid, tl.where(valid, t, 0).to(tl.int64)


@triton.jit
def _grid_token(blk, offs, g0, g1, g2, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """(row-major token of each GRID slot, whether the slot is inside its tile and the grid); padding slots get
    the token their coordinates would have (past the grid, never a real token's)."""
    c0, c1, c2, valid = _grid_coords(blk, offs, g0, g1, g2, ADDR, NDIM)
    return _row_major(c0, c1, c2, g1, g2, NDIM), valid


@triton.jit
def _row_index(t, blk, offs, g0, g1, g2, BLOCK: tl.constexpr, ADDR: tl.constexpr, NDIM: tl.constexpr):
    """int64 row index for the addresses of a gathered tile whose padding rows are masked off: the token for
    real slots. Computed modes (LINEAR, GRID) keep it affine in the block index — per-thread offsets the
    compiler hoists out of the loop plus one scalar per block — by not zeroing the padding rows (their
    out-of-range addresses are never read under the mask); table slots zero them (``t = -1``)."""
    if ADDR == 1:
        i = blk * BLOCK + offs
    elif ADDR != 0:
        i, valid = _grid_token(blk, offs, g0, g1, g2, ADDR, NDIM)
    else:
        i = tl.where(t >= 0, t, 0)
    return i.to(tl.int64)


@triton.jit
def _key_u(k_u, n_k_slots, blk, offs, g0, g1, g2, BLOCK: tl.constexpr, ADDR: tl.constexpr,
           NDIM: tl.constexpr):
    """u-space coordinates of key slots: the grid coordinates for GRID plans (dilation 1), else the table."""
    if ADDR > 1:
        ku0, ku1, ku2, valid = _grid_coords(blk, offs, g0, g1, g2, ADDR, NDIM)
    else:
        ku0, ku1, ku2 = _load_ku(k_u, n_k_slots, blk * BLOCK + offs, NDIM)
    return ku0, ku1, ku2


@triton.jit
def _block_id(kv_idx, i, jump, gap, DIRECT: tl.constexpr):
    """Block of loop step ``i``: for RANGES plans computed, ``i``, or ``i + gap`` from ``i >= jump`` on (one
    loop walks the partial blocks on both sides of the full run); else the CSR entry ``kv_idx[i]``."""
    if DIRECT:
        n = tl.where(i >= jump, i + gap, i)
    else:
        n = tl.load(kv_idx + i)
    return n


@triton.jit
def _entry(raw, DYN: tl.constexpr):
    """(block id, WHOLE flag) of a table entry; without DYN the entry is the block id."""
    if DYN:
        n = raw & (WHOLE_BIT - 1)
        whole = raw >= WHOLE_BIT
    else:
        n = raw
        whole = False
    return n, whole


@triton.jit
def _loop_bounds(ptr, split_ptr, rng, row, RANGES: tl.constexpr):
    """(start, end, jump, gap) of the full-block loop and of the partial-block loop of plan row ``row``."""
    if RANGES:  # rng[row] = (lo, full_lo, full_hi, hi): full [full_lo, full_hi), partial the rest of [lo, hi)
        lo = tl.load(rng + 4 * row)
        f_lo = tl.load(rng + 4 * row + 1)
        f_hi = tl.load(rng + 4 * row + 2)
        hi = tl.load(rng + 4 * row + 3)
        s0, e0, j0, gap0 = f_lo, f_hi, f_hi, f_hi * 0
        s1, e1, j1, gap1 = lo, hi - (f_hi - f_lo), f_lo, f_hi - f_lo
    else:  # CSR: full entries [ptr[row], split[row]), partial [split[row], ptr[row + 1])
        start = tl.load(ptr + row)
        split = tl.load(split_ptr + row)
        end = tl.load(ptr + row + 1)
        s0, e0, j0, gap0 = start, split, split, start * 0
        s1, e1, j1, gap1 = split, end, end, start * 0
    return s0, e0, j0, gap0, s1, e1, j1, gap1


@triton.jit
def _inside(u, lo, w, TRANS: tl.constexpr):
    """``lo <= u <= lo + w`` for [1, N] keys and [M, 1] queries ([N, 1] and [1, M] when ``TRANS``), as one
    unsigned compare per element."""
    if TRANS:
        r = (u[:, None] - lo[None, :]).to(tl.uint32, bitcast=True) <= w[None, :].to(tl.uint32, bitcast=True)
    else:
        r = (u[None, :] - lo[:, None]).to(tl.uint32, bitcast=True) <= w[:, None].to(tl.uint32, bitcast=True)
    return r


@triton.jit
def _outer(qx, kx, TRANS: tl.constexpr):
    """Broadcast a per-query and a per-key vector to the tile's axes: ([M, 1], [1, N]), or ([1, M], [N, 1])
    for the transposed [BLOCK_N, BLOCK_M] tiles of the dK/dV kernel."""
    if TRANS:
        a, b = qx[None, :], kx[:, None]
    else:
        a, b = qx[:, None], kx[None, :]
    return a, b


@triton.jit
def _keep(qt, kt, qlo0, qw0, qlo1, qw1, qlo2, qw2, ku0, ku1, ku2, prefix, grid_end, sinks,
          NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, TRANS: tl.constexpr = False,
          WINDOW_ONLY: tl.constexpr = False, NOPAD: tl.constexpr = 0, q_off=0, whole=False,
          DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False):
    """Pattern & causal & padding for one [BLOCK_M, BLOCK_N] tile (``locattn.patterns.base.allowed``), or its
    transpose [BLOCK_N, BLOCK_M] when ``TRANS``. ``WINDOW_ONLY`` (NDIM > 0, no globals; see the glossary): the
    window test alone excludes padding; ``NOPAD``: the side(s) without padding slots skip their padding test."""
    q2, k2 = _outer(qt, kt, TRANS)
    if NDIM > 0:
        win = _inside(ku0, qlo0, qw0, TRANS)
        if NDIM > 1:
            win = win & _inside(ku1, qlo1, qw1, TRANS)
        if NDIM > 2:
            win = win & _inside(ku2, qlo2, qw2, TRANS)
        if HAS_GLOBALS:
            q_glob, k_glob = _outer((qt + q_off < prefix) | (qt + q_off >= grid_end),
                                    (kt < prefix) | (kt >= grid_end) | (kt < sinks), TRANS)
            win = win | q_glob | k_glob
        if DYN:  # a block pair the selection keeps whole
            if DYN_CAUSAL:
                win = win | (whole & (k2 <= q2 + q_off))
            else:
                win = win | whole
        keep = win
        if not WINDOW_ONLY:
            keep = _real(keep, q2, k2, NOPAD)
        if CAUSAL:
            keep = keep & (k2 <= q2)
    elif CAUSAL:
        keep = _real(k2 <= q2, q2, k2, NOPAD)
    else:  # padding alone (a plan without padding has no partial block here)
        keep = (q2 >= 0) & (k2 >= 0)
    return keep


@triton.jit
def _real(keep, q2, k2, NOPAD: tl.constexpr):
    """``keep`` and the query and key are real tokens, testing only a side that has padding slots."""
    if (NOPAD & 1) == 0:
        keep = keep & (q2 >= 0)
    if (NOPAD & 2) == 0:
        keep = keep & (k2 >= 0)
    return keep


@triton.jit
def _load_bounds(q_iv, n_q_slots, qslot, NDIM: tl.constexpr, WIDE: tl.constexpr = False):
    """Per query slot u-space intervals ``(lo, w)`` of up to three axes (unused axes give dummies) from ``q_iv``
    (lo in the low, w in the high 32 bits). ``WIDE``: one 8-byte load per axis, halves split in registers (the
    dK/dV loop, which loads them every iteration: fewer loads); else two 4-byte loads (the forward / dQ
    prologues: an int64 vector kept there cost the 1-D forward's partial loop 66 SASS instructions, sm_90)."""
    zero = qslot * 0
    qlo0 = zero
    qw0 = zero
    qlo1 = zero
    qw1 = zero
    qlo2 = zero
    qw2 = zero
    if NDIM > 0:
        qlo0, qw0 = _interval(q_iv, qslot, WIDE)
    if NDIM > 1:
        qlo1, qw1 = _interval(q_iv + n_q_slots, qslot, WIDE)
    if NDIM > 2:
        qlo2, qw2 = _interval(q_iv + 2 * n_q_slots, qslot, WIDE)
    return qlo0, qw0, qlo1, qw1, qlo2, qw2


@triton.jit
def _interval(iv, slot, WIDE: tl.constexpr):
    """(lo, w) int32 of the packed intervals ``iv[slot]`` (little-endian: lo is the first word)."""
    if WIDE:
        x = tl.load(iv + slot)
        lo, w = x.to(tl.int32), (x >> 32).to(tl.int32)
    else:
        words = iv.to(tl.pointer_type(tl.int32))
        lo, w = tl.load(words + 2 * slot), tl.load(words + 2 * slot + 1)
    return lo, w


@triton.jit
def _load_ku(k_u, n_k_slots, kslot, NDIM: tl.constexpr):
    zero = kslot * 0
    ku0 = zero
    ku1 = zero
    ku2 = zero
    if NDIM > 0:
        ku0 = tl.load(k_u + kslot)
    if NDIM > 1:
        ku1 = tl.load(k_u + n_k_slots + kslot)
    if NDIM > 2:
        ku2 = tl.load(k_u + 2 * n_k_slots + kslot)
    return ku0, ku1, ku2


@triton.jit
def _site_terms(s, qt, kt, M_bh, B_bh, stride_mq, stride_mk, stride_bq, stride_bk,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, TRANS: tl.constexpr = False):
    """Add the site bias (log2 units) and apply the site mask to log2-scores ``s`` [BLOCK_M, BLOCK_N]
    ([BLOCK_N, BLOCK_M] when ``TRANS``). A bias below ``BIAS_MASK_BELOW`` masks its key (the op's rule)."""
    qv = qt >= 0
    kv = kt >= 0
    qi, kj = _outer(tl.where(qv, qt, 0).to(tl.int64), tl.where(kv, kt, 0).to(tl.int64), TRANS)
    qv2, kv2 = _outer(qv, kv, TRANS)
    io = qv2 & kv2
    if HAS_BIAS:
        b = tl.load(B_bh + qi * stride_bq + kj * stride_bk, mask=io, other=0.0).to(tl.float32)
        s = s + tl.where(b < BIAS_MASK_BELOW, float("-inf"), b * LOG2E)
    if HAS_MASK:
        mk = tl.load(M_bh + qi * stride_mq + kj * stride_mk, mask=io, other=0)
        s = tl.where(mk != 0, s, float("-inf"))
    return s


@triton.jit
def _tile_ptrs(base, idx, blk, offs, offs_c, stride_s, stride_c, g1, g2, BLOCK: tl.constexpr, ADDR: tl.constexpr,
               NDIM: tl.constexpr, TRANS: tl.constexpr):
    """Pointers of the gathered [rows, cols] tile of block ``blk`` ([cols, rows] when ``TRANS``): rows ``idx``
    (int64: ``_row_index``, used for table slots), columns ``offs_c``. Computed rows (LINEAR, GRID) are split
    into the block's first token (one scalar per iteration) plus the slot's offset from it (per thread,
    loop-invariant: the compiler hoists it instead of recomputing a 64-bit address per element and iteration);
    the same tokens ``_row_index`` gives, padding rows included (masked by the caller)."""
    if ADDR != 0:
        if ADDR == 1:
            first, rel = blk * BLOCK, offs
        else:  # GRID: token = (the tile's corner token: one scalar) + (the slot's offset in the tile: per thread)
            k0, k1, k2 = _tile_corner(blk, g1, g2, ADDR, NDIM)
            o0, o1, o2 = _tile_offsets(offs, ADDR, NDIM)
            first = _row_major(k0, k1, k2, g1, g2, NDIM)
            rel = _row_major(o0, o1, o2, g1, g2, NDIM)
        start = base + first.to(tl.int64) * stride_s
        if TRANS:
            p = start + (rel[None, :] * stride_s + offs_c[:, None] * stride_c)
        else:
            p = start + (rel[:, None] * stride_s + offs_c[None, :] * stride_c)
    elif TRANS:
        p = base + idx[None, :] * stride_s + offs_c[:, None] * stride_c
    else:
        p = base + idx[:, None] * stride_s + offs_c[None, :] * stride_c
    return p


@triton.jit
def _load_kv(ptrs, kmask, dmask, IS_FULL: tl.constexpr, D_EXACT: tl.constexpr):
    """A gathered tile of the block a loop walks — K or V in the forward and dQ, Q or dO in dK/dV — in either
    orientation: ``kmask`` marks the valid rows, ``dmask`` the head-dim columns. A full block has no padding
    rows, so it is loaded without ``kmask``, and without any mask at all when the head dim is a power of two
    (``D_EXACT``)."""
    if IS_FULL and D_EXACT:
        x = tl.load(ptrs)
    elif IS_FULL:
        x = tl.load(ptrs, mask=dmask, other=0.0)
    else:
        x = tl.load(ptrs, mask=kmask & dmask, other=0.0)
    return x


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (``a @ b`` when ``acc`` is None) with fp32 accumulation: the accumulator goes into the
    MMA itself (no second accumulator tile and add). UPCAST (interpreter + bf16 only): the interpreter's
    ``tl.dot`` multiplies bf16 bit patterns as integers, so exact fp32 copies are multiplied instead."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PRECISION)
    return c


@triton.jit
def _block_scores(n, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, M_bh, B_bh, k_slots, k_u,
                  stride_ks, stride_kd, stride_mq, stride_mk, stride_bq, stride_bk, n_k_slots, seq_k, g0, g1, g2,
                  D: tl.constexpr, qk_scale, prefix, grid_end, sinks, NDIM: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_GLOBALS: tl.constexpr,
                  HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FULL: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, KADDR: tl.constexpr,
                  FOLD: tl.constexpr = False, WINDOW_ONLY: tl.constexpr = False, NOPAD: tl.constexpr = 0, q_off=0,
                  whole=False, DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False,
                  SOFTCAP: tl.constexpr = 0.0):
    """Scores of the query block against key block ``n`` (log2 units): loads kᵀ through the slot table, caps
    them (``SOFTCAP``), adds the site's mask/bias, and on partial blocks (``IS_FULL`` False) applies the pattern
    predicate; the key tile of a block without padding keys (full, or NOPAD bit 1) loads without a row mask.
    ``FOLD`` (no bias, no cap, scale > 0): the scores stay unscaled, the caller folds ``qk_scale`` into its exp2
    argument. Returns ``(s [BLOCK_M, BLOCK_N], kT [BLOCK_D, BLOCK_N], key tokens (int64, 0 for padding), key
    valid, t)``: ``t`` the cap's tanh (``s`` itself without a cap: unused)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    real = IS_FULL or (NOPAD & 2) != 0  # no padding key in this block
    kt = _tokens(k_slots, n, offs_n, seq_k, g0, g1, g2, BLOCK_N, KADDR, NDIM, real)
    kv = kt >= 0  # all true without padding keys: the loads drop this mask
    if real:
        kj = kt.to(tl.int64)
    else:
        kj = _row_index(kt, n, offs_n, g0, g1, g2, BLOCK_N, KADDR, NDIM)
    k_ptrs = _tile_ptrs(K_bh, kj, n, offs_n, offs_d, stride_ks, stride_kd, g1, g2, BLOCK_N, KADDR, NDIM, True)
    kT = _load_kv(k_ptrs, kv[None, :], offs_d[:, None] < D, real, D == BLOCK_D)
    s = _mma(q, kT, None, PRECISION, UPCAST)
    if not FOLD:
        s = s * qk_scale
    t = s
    if SOFTCAP > 0:
        s, t = _softcap(s, SOFTCAP)
    if HAS_MASK or HAS_BIAS:
        s = _site_terms(s, qt, kt, M_bh, B_bh, stride_mq, stride_mk, stride_bq, stride_bk, HAS_MASK, HAS_BIAS)
    if not IS_FULL:
        ku0, ku1, ku2 = _key_u(k_u, n_k_slots, n, offs_n, g0, g1, g2, BLOCK_N, KADDR, NDIM)
        keep = _keep(qt, kt, qlo0, qw0, qlo1, qw1, qlo2, qw2, ku0, ku1, ku2, prefix, grid_end, sinks,
                     NDIM, CAUSAL, HAS_GLOBALS, False, WINDOW_ONLY, NOPAD, q_off, whole, DYN, DYN_CAUSAL)
        s = tl.where(keep, s, float("-inf"))
    return s, kT, kj, kv, t


@triton.jit
def _tanh(x):
    """tanh from one exp2 (no tanh in ``tl.math``; libdevice's has no interpreter implementation): absolute error
    ~1e-7 in fp32, like ``torch.tanh``'s."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)   # exp(-2|x|) = exp2(-2 log2(e) |x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softcap(s, SOFTCAP: tl.constexpr):
    """Soft-capped log2 scores ``cl * tanh(s / cl)`` with ``cl = SOFTCAP * log2(e)`` (the cap in log2 units) and
    the tanh itself (the backward's ``1 - t^2``)."""
    t = _tanh(s * (1.0 / (SOFTCAP * LOG2E)))
    return t * (SOFTCAP * LOG2E), t


@triton.jit
def _record_visit(ptr, IS_FULL: tl.constexpr):
    """Instrumented mode: a full visit adds 1, a partial one 16 (atomics catch double visits)."""
    if IS_FULL:
        tl.atomic_add(ptr, 1)
    else:
        tl.atomic_add(ptr, 16)


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2,
               K_bh, V_bh, M_bh, B_bh, k_slots, k_u, kv_idx, start, end, jump, gap, Visit_row,
               stride_ks, stride_kd, stride_vs, stride_vd, stride_mq, stride_mk, stride_bq, stride_bk,
               n_k_slots, seq_k, g0, g1, g2, D: tl.constexpr, DV: tl.constexpr, qk_scale, prefix, grid_end, sinks,
               NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr,
               IS_FULL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, VISIT: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, KADDR: tl.constexpr, DIRECT: tl.constexpr, FOLD: tl.constexpr,
               WINDOW_ONLY: tl.constexpr, NOPAD: tl.constexpr, q_off=0, DYN: tl.constexpr = False,
               DYN_CAUSAL: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0):
    offs_dv = tl.arange(0, BLOCK_DV)
    for i in range(start, end):
        n, whole = _entry(_block_id(kv_idx, i, jump, gap, DIRECT), DYN)
        s, kT, kj, kv, _ = _block_scores(n, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, M_bh, B_bh, k_slots,
                                      k_u, stride_ks, stride_kd, stride_mq, stride_mk, stride_bq, stride_bk,
                                      n_k_slots, seq_k, g0, g1, g2, D, qk_scale, prefix, grid_end, sinks, NDIM,
                                      CAUSAL, HAS_GLOBALS,
                                      HAS_MASK, HAS_BIAS, IS_FULL, BLOCK_N, BLOCK_D, PRECISION, UPCAST, KADDR, FOLD,
                                      WINDOW_ONLY, NOPAD, q_off, whole, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
        if FOLD:  # max(s) * c == max(s * c) for c > 0; the exp2 argument is one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if IS_FULL and not HAS_MASK and not HAS_BIAS:
            m_use = m_new  # every score is finite: no empty-row guard needed
        else:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD:
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(_tile_ptrs(V_bh, kj, n, tl.arange(0, BLOCK_N), offs_dv, stride_vs, stride_vd, g1, g2, BLOCK_N,
                                KADDR, NDIM, False), kv[:, None],
                     offs_dv[None, :] < DV, IS_FULL or (NOPAD & 2) != 0, DV == BLOCK_DV)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
        if VISIT:
            _record_visit(Visit_row + n, IS_FULL)
    return acc, l_i, m_i


@triton.jit
def _softmax_start(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax's state before any key block: row max -inf, row sum 0, accumulator 0 (fp32)."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, BLOCK_DV], tl.float32))


@triton.jit
def _fwd_store(acc, l_i, m_i, Out_bh, LSE_bh, qi, qv, stride_os, stride_od, stride_ls, DV: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """Normalise and store the forward's rows ``qi`` (valid where ``qv``) of one (batch, head): ``out`` and the
    natural-log ``lse``; a row that saw no allowed key (``l == 0``) stores 0 and -inf."""
    offs_dv = tl.arange(0, BLOCK_DV)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(Out_bh + qi[:, None] * stride_os + offs_dv[None, :] * stride_od, out.to(Out_bh.dtype.element_ty),
             mask=qv[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_bh + qi * stride_ls, lse, mask=qv)


@triton.jit(do_not_specialize=_SIZES)
def attn_fwd(Q, K, V, Out, LSE, Mask, Bias,
             q_slots, k_slots, q_iv, k_u, kv_ptr, kv_split, kv_idx, kv_rng, Visits,
             stride_qb, stride_qh, stride_qs, stride_qd,
             stride_kb, stride_kh, stride_ks, stride_kd,
             stride_vb, stride_vh, stride_vs, stride_vd,
             stride_ob, stride_oh, stride_os, stride_od,
             stride_lb, stride_lh, stride_ls,
             stride_mb, stride_mh, stride_mq, stride_mk,
             stride_bb, stride_bh, stride_bq, stride_bk,
             H, GROUP, D: tl.constexpr, DV: tl.constexpr, seq_q, seq_k, g0, g1, g2, n_q_slots, n_k_slots, n_qblocks,
             n_kblocks, sm_scale, prefix, grid_end, sinks, q_off, head_map, tab_sb, ptr_st, idx_st, iv_st,
             NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, HAS_MASK: tl.constexpr,
             HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             VISIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, QADDR: tl.constexpr,
             KADDR: tl.constexpr,
             RANGES: tl.constexpr, HAS_PARTIAL: tl.constexpr, FOLD: tl.constexpr,
             WINDOW_ONLY: tl.constexpr = False, NOPAD: tl.constexpr = 0, PER_BH: tl.constexpr = False,
             DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0):
    """One program: query block ``program_id(0)`` of (batch, head) ``program_id(1)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qslot = pid_m * BLOCK_M + offs_m
    qt, qv, qi = _block_rows(q_slots, pid_m, offs_m, seq_q, g0, g1, g2, BLOCK_M, QADDR, NDIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=qv[:, None] & (offs_d[None, :] < D), other=0.0)
    if PER_BH:  # this head's own tables and query intervals
        grp = tl.load(head_map + h).to(tl.int64)
        x = b * tab_sb + grp
        kv_ptr += x * ptr_st
        kv_split += x * ptr_st
        kv_idx += x * idx_st
        q_iv += grp * iv_st
    qlo0, qw0, qlo1, qw1, qlo2, qw2 = _load_bounds(q_iv, n_q_slots, qslot, NDIM)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    M_bh = Mask + b * stride_mb + h * stride_mh
    B_bh = Bias + b * stride_bb + h * stride_bh
    Visit_row = Visits + (pid_bh * n_qblocks + pid_m).to(tl.int64) * n_kblocks
    qk_scale = sm_scale * LOG2E

    m_i, l_i, acc = _softmax_start(BLOCK_M, BLOCK_DV)
    s0, e0, j0, gap0, s1, e1, j1, gap1 = _loop_bounds(kv_ptr, kv_split, kv_rng, pid_m, RANGES)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, V_bh, M_bh, B_bh, k_slots,
                               k_u, kv_idx, s0, e0, j0, gap0, Visit_row, stride_ks, stride_kd, stride_vs, stride_vd,
                               stride_mq, stride_mk, stride_bq, stride_bk, n_k_slots, seq_k, g0, g1, g2, D, DV,
                               qk_scale, prefix, grid_end, sinks, NDIM, CAUSAL, HAS_GLOBALS, HAS_MASK, HAS_BIAS, True,
                               BLOCK_N, BLOCK_D, BLOCK_DV, VISIT, PRECISION, UPCAST, KADDR, RANGES, FOLD, False,
                               NOPAD, q_off, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
    if HAS_PARTIAL:  # partial blocks exist: the predicate loop
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, V_bh, M_bh, B_bh,
                                   k_slots, k_u, kv_idx, s1, e1, j1, gap1, Visit_row, stride_ks, stride_kd, stride_vs,
                                   stride_vd, stride_mq, stride_mk, stride_bq, stride_bk, n_k_slots, seq_k, g0, g1, g2,
                                   D, DV, qk_scale, prefix, grid_end, sinks, NDIM, CAUSAL, HAS_GLOBALS, HAS_MASK,
                                   HAS_BIAS, False, BLOCK_N, BLOCK_D, BLOCK_DV, VISIT, PRECISION, UPCAST, KADDR, RANGES,
                                   FOLD, WINDOW_ONLY, NOPAD, q_off, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
    _fwd_store(acc, l_i, m_i, Out + b * stride_ob + h * stride_oh, LSE + b * stride_lb + h * stride_lh, qi, qv,
               stride_os, stride_od, stride_ls, DV, BLOCK_DV)


@triton.jit
def _tma_tile(desc, b, h, nh, blk, g1, g2, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ADDR: tl.constexpr,
              NDIM: tl.constexpr):
    """Rows ``blk * BLOCK ...`` of one head as a [BLOCK, BLOCK_D] tile moved by a tensor descriptor (TMA on
    sm_90; out-of-bounds rows and head-dim columns read as zero). Descriptor shapes (``_tma_descriptor`` on
    the host): LINEAR ``[B, H, S, D]``; GRID 2-D ``[B, H, g0, g1, D]``; GRID 3-D ``[B * H, g0, g1, g2, D]``
    (``nh`` = H merges batch and head: a descriptor has at most 5 axes)."""
    if ADDR == 1:
        x = desc.load([b, h, blk * BLOCK, 0])
    else:
        c0, c1, c2 = _tile_corner(blk, g1, g2, ADDR, NDIM)
        if NDIM == 2:
            x = desc.load([b, h, c0, c1, 0])
        else:
            x = desc.load([b * nh + h, c0, c1, c2, 0])
    return x.reshape(BLOCK, BLOCK_D)


@triton.jit(do_not_specialize=_SIZES)
def attn_fwd_tma(desc_q, desc_k, desc_v, Out, LSE, kv_ptr, kv_split, kv_idx, kv_rng, Visits,
                 stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
                 H, HK, GROUP, DV: tl.constexpr, seq_q, g0, g1, g2, n_qblocks, n_kblocks, sm_scale,
                 NDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, VISIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 QADDR: tl.constexpr, KADDR: tl.constexpr, RANGES: tl.constexpr, WS: tl.constexpr):
    """The forward of a plan whose blocks are all full, with every q/k/v tile moved by a tensor descriptor
    (TMA): one loop, no predicate, no masks, the scale folded (FOLD), no site mask or bias. Addressing is
    computed (QADDR/KADDR LINEAR or GRID: a tile is a box of the tensor). ``WS``: the loop asks Triton for
    warp specialization (on Hopper, Triton 3.6: a producer warp group issuing the TMA copies and two
    consumer warp groups of ``num_warps`` each, one per 64-row half of the query tile). Same outputs as
    ``attn_fwd`` on such plans."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q = _tma_tile(desc_q, b, h, H, pid_m, g1, g2, BLOCK_M, BLOCK_D, QADDR, NDIM)
    Visit_row = Visits + (pid_bh * n_qblocks + pid_m).to(tl.int64) * n_kblocks
    qk_scale = sm_scale * LOG2E
    m_i, l_i, acc = _softmax_start(BLOCK_M, BLOCK_DV)
    start, end, jump, gap, s1, e1, j1, gap1 = _loop_bounds(kv_ptr, kv_split, kv_rng, pid_m, RANGES)
    for i in tl.range(start, end, warp_specialize=WS):
        n = _block_id(kv_idx, i, jump, gap, RANGES)
        kT = _tma_tile(desc_k, b, hk, HK, n, g1, g2, BLOCK_N, BLOCK_D, KADDR, NDIM).T
        s = _mma(q, kT, None, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tma_tile(desc_v, b, hk, HK, n, g1, g2, BLOCK_N, BLOCK_DV, KADDR, NDIM)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
        if VISIT:
            _record_visit(Visit_row + n, True)
    offs_m = tl.arange(0, BLOCK_M)
    qt, qv, qi = _block_rows(Out, pid_m, offs_m, seq_q, g0, g1, g2, BLOCK_M, QADDR, NDIM)  # computed: Out unused
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    _fwd_store(acc, l_i, m_i, Out + b64 * stride_ob + h64 * stride_oh, LSE + b64 * stride_lb + h64 * stride_lh, qi, qv,
               stride_os, stride_od, stride_ls, DV, BLOCK_DV)


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=_SIZES)
def attn_bwd_preprocess(Out, dO, LD, LSE, stride_ob, stride_oh, stride_os, stride_od,
                        stride_gb, stride_gh, stride_gs, stride_gd, H, S, DV: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The backward's per-row inputs ``LD`` (fp32 contiguous [B, H, S, 2], rows in token order): ``LD[..., 0]``
    = lse2, the forward's lse in log2 units, +inf for an empty row (so that its p = exp2(s - lse2) is 0);
    ``LD[..., 1]`` = delta = sum_d dO * O. The dK/dV loop holds each query block's pair replicated across its
    threads: interleaved, it is one 8-byte load per replica (``_row_stats``), and in log2 units it needs no
    per-element conversion (that had cost ~4 instructions per replica every iteration)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    io = (rows[:, None] < S) & (offs_dv[None, :] < DV)
    r = rows.to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + r[:, None] * stride_os + offs_dv[None, :] * stride_od,
                mask=io, other=0.0).to(tl.float32)
    do = tl.load(dO + b * stride_gb + h * stride_gh + r[:, None] * stride_gs + offs_dv[None, :] * stride_gd,
                 mask=io, other=0.0).to(tl.float32)
    row = pid_bh.to(tl.int64) * S + r
    lse = tl.load(LSE + row, mask=rows < S, other=0.0)
    tl.store(LD + 2 * row, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=rows < S)
    tl.store(LD + 2 * row + 1, tl.sum(o * do, 1), mask=rows < S)


#: ``_row_stats`` of a padding row: lse2 = +inf (its p = 0; the fp32 bits 0x7F800000 in the low word), delta = 0
LD_PAD: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def _row_stats(ld, rows, valid, MASKED: tl.constexpr):
    """(lse2, delta) of query ``rows`` from ``ld``, the (batch, head)'s ``LD`` rows as int64 words (lse2 the low,
    delta the high 32 bits: one 8-byte load per row); ``MASKED``: rows not ``valid`` read as (+inf, 0)."""
    if MASKED:
        x = tl.load(ld + rows, mask=valid, other=LD_PAD)
    else:
        x = tl.load(ld + rows)
    return x.to(tl.int32).to(tl.float32, bitcast=True), (x >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2,
              K_bh, V_bh, M_bh, B_bh, k_slots, k_u, kv_idx, start, end, jump, gap, Visit_row,
              stride_ks, stride_kd, stride_vs, stride_vd, stride_mq, stride_mk, stride_bq, stride_bk,
              n_k_slots, seq_k, g0, g1, g2, D: tl.constexpr, DV: tl.constexpr, qk_scale, prefix, grid_end, sinks,
              NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr,
              IS_FULL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, VISIT: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, KADDR: tl.constexpr, DIRECT: tl.constexpr, WINDOW_ONLY: tl.constexpr,
              NOPAD: tl.constexpr, FOLD: tl.constexpr, q_off=0, DYN: tl.constexpr = False,
              DYN_CAUSAL: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0):
    offs_dv = tl.arange(0, BLOCK_DV)
    for i in range(start, end):
        n, whole = _entry(_block_id(kv_idx, i, jump, gap, DIRECT), DYN)
        s, kT, kj, kv, t = _block_scores(n, q, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, M_bh, B_bh, k_slots,
                                      k_u, stride_ks, stride_kd, stride_mq, stride_mk, stride_bq, stride_bk,
                                      n_k_slots, seq_k, g0, g1, g2, D, qk_scale, prefix, grid_end, sinks, NDIM,
                                      CAUSAL, HAS_GLOBALS,
                                      HAS_MASK, HAS_BIAS, IS_FULL, BLOCK_N, BLOCK_D, PRECISION, UPCAST, KADDR,
                                      FOLD, WINDOW_ONLY, NOPAD, q_off, whole, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
        vT = _load_kv(_tile_ptrs(V_bh, kj, n, tl.arange(0, BLOCK_N), offs_dv, stride_vs, stride_vd, g1, g2, BLOCK_N,
                                 KADDR, NDIM, True), kv[None, :],
                      offs_dv[:, None] < DV, IS_FULL or (NOPAD & 2) != 0, DV == BLOCK_DV)
        if FOLD:  # unscaled scores, masked: the exp2 argument is one FMA per score
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
        else:
            p = tl.math.exp2(s - lse2[:, None])
        dp = _mma(do, vT, None, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if SOFTCAP > 0:  # through the cap: d(c tanh(x / c)) / dx = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION, UPCAST)
        if VISIT:
            _record_visit(Visit_row + n, IS_FULL)
    return dq


@triton.jit(do_not_specialize=_SIZES)
def attn_bwd_dq(Q, K, V, dO, LD, dQ, Mask, Bias,
                q_slots, k_slots, q_iv, k_u, kv_ptr, kv_split, kv_idx, kv_rng, Visits,
                stride_qb, stride_qh, stride_qs, stride_qd,
                stride_kb, stride_kh, stride_ks, stride_kd,
                stride_vb, stride_vh, stride_vs, stride_vd,
                stride_gb, stride_gh, stride_gs, stride_gd,
                stride_dqb, stride_dqh, stride_dqs, stride_dqd,
                stride_mb, stride_mh, stride_mq, stride_mk,
                stride_bb, stride_bh, stride_bq, stride_bk,
                H, GROUP, S_q, D: tl.constexpr, DV: tl.constexpr, seq_q, seq_k, g0, g1, g2, n_q_slots, n_k_slots,
                n_qblocks, n_kblocks, sm_scale, prefix, grid_end, sinks, q_off, head_map, tab_sb, ptr_st, idx_st, iv_st,
                NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                VISIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, QADDR: tl.constexpr,
                KADDR: tl.constexpr,
                RANGES: tl.constexpr, HAS_PARTIAL: tl.constexpr, WINDOW_ONLY: tl.constexpr = False,
                NOPAD: tl.constexpr = 0, FOLD: tl.constexpr = False, PER_BH: tl.constexpr = False,
                DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False, SOFTCAP: tl.constexpr = 0.0):
    """dQ of query block ``program_id(0)``, (batch, head) ``program_id(1)``; ``LD`` holds (lse2, delta) per
    query row (``attn_bwd_preprocess``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qslot = pid_m * BLOCK_M + offs_m
    qt, qv, qi = _block_rows(q_slots, pid_m, offs_m, seq_q, g0, g1, g2, BLOCK_M, QADDR, NDIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=qv[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(dO + b * stride_gb + h * stride_gh + qi[:, None] * stride_gs + offs_dv[None, :] * stride_gd,
                 mask=qv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row = pid_bh.to(tl.int64) * S_q + qi
    # lse2 in log2 units, empty rows already +inf (attn_bwd_preprocess); padding rows +inf: every p = 0
    lse2, delta = _row_stats(LD.to(tl.pointer_type(tl.int64)), row, qv, True)
    if PER_BH:  # this head's own tables and query intervals
        grp = tl.load(head_map + h).to(tl.int64)
        x = b * tab_sb + grp
        kv_ptr += x * ptr_st
        kv_split += x * ptr_st
        kv_idx += x * idx_st
        q_iv += grp * iv_st
    qlo0, qw0, qlo1, qw1, qlo2, qw2 = _load_bounds(q_iv, n_q_slots, qslot, NDIM)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    M_bh = Mask + b * stride_mb + h * stride_mh
    B_bh = Bias + b * stride_bb + h * stride_bh
    Visit_row = Visits + (pid_bh * n_qblocks + pid_m).to(tl.int64) * n_kblocks
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    s0, e0, j0, gap0, s1, e1, j1, gap1 = _loop_bounds(kv_ptr, kv_split, kv_rng, pid_m, RANGES)
    dq = _dq_inner(dq, q, do, lse2, delta, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, V_bh, M_bh, B_bh, k_slots, k_u,
                   kv_idx, s0, e0, j0, gap0, Visit_row, stride_ks, stride_kd, stride_vs, stride_vd, stride_mq,
                   stride_mk, stride_bq, stride_bk, n_k_slots, seq_k, g0, g1, g2, D, DV, qk_scale, prefix, grid_end,
                   sinks, NDIM, CAUSAL, HAS_GLOBALS, HAS_MASK, HAS_BIAS, True, BLOCK_N, BLOCK_D, BLOCK_DV, VISIT,
                   PRECISION, UPCAST, KADDR, RANGES, False, NOPAD, FOLD, q_off, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
    if HAS_PARTIAL:  # partial blocks exist: the predicate loop
        dq = _dq_inner(dq, q, do, lse2, delta, qt, qlo0, qw0, qlo1, qw1, qlo2, qw2, K_bh, V_bh, M_bh, B_bh, k_slots,
                       k_u, kv_idx, s1, e1, j1, gap1, Visit_row, stride_ks, stride_kd, stride_vs, stride_vd, stride_mq,
                       stride_mk, stride_bq, stride_bk, n_k_slots, seq_k, g0, g1, g2, D, DV, qk_scale, prefix, grid_end,
                       sinks, NDIM, CAUSAL, HAS_GLOBALS, HAS_MASK, HAS_BIAS, False, BLOCK_N, BLOCK_D, BLOCK_DV, VISIT,
                       PRECISION, UPCAST, KADDR, RANGES, WINDOW_ONLY, NOPAD, FOLD, q_off, DYN, DYN_CAUSAL,
                       SOFTCAP=SOFTCAP)
    tl.store(dQ + b * stride_dqb + h * stride_dqh + qi[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=qv[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_inner(dk, dv, k, v, kt, ku0, ku1, ku2, Q_bh, dO_bh, LD_bh, M_bh, B_bh, dB_bh,
                q_slots, q_iv, qb_idx, start, end, jump, gap, Visits_h, n_kblocks, pid_n,
                stride_qs, stride_qd, stride_gs, stride_gd, stride_mq, stride_mk, stride_bq, stride_bk,
                stride_dbq, stride_dbk, n_q_slots, seq_q, g0, g1, g2, D: tl.constexpr, DV: tl.constexpr, qk_scale,
                prefix, grid_end, sinks, NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, IS_FULL: tl.constexpr,
                BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VISIT: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, QADDR: tl.constexpr, DIRECT: tl.constexpr, WINDOW_ONLY: tl.constexpr,
                NOPAD: tl.constexpr, q_off=0, DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False,
                SOFTCAP: tl.constexpr = 0.0):
    offs_m = tl.arange(0, BLOCK_M)
    real = IS_FULL or (NOPAD & 1) != 0  # no padding query in a visited block
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for i in range(start, end):
        m, whole = _entry(_block_id(qb_idx, i, jump, gap, DIRECT), DYN)
        qslot = m * BLOCK_M + offs_m
        qt = _tokens(q_slots, m, offs_m, seq_q, g0, g1, g2, BLOCK_M, QADDR, NDIM, real)
        qv = qt >= 0
        qi = _row_index(qt, m, offs_m, g0, g1, g2, BLOCK_M, QADDR, NDIM)
        # transposed tiles [BLOCK_N, BLOCK_M]: the key block is the MMA's M dimension (64-128 rows, wgmma
        # on Hopper) whatever BLOCK_M is; qᵀ comes straight from memory, q / dOᵀ as register transposes
        q_ptrs = _tile_ptrs(Q_bh, qi, m, offs_m, offs_d, stride_qs, stride_qd, g1, g2, BLOCK_M, QADDR, NDIM, True)
        qT = _load_kv(q_ptrs, qv[None, :], offs_d[:, None] < D, real, D == BLOCK_D)
        do_ptrs = _tile_ptrs(dO_bh, qi, m, offs_m, offs_dv, stride_gs, stride_gd, g1, g2, BLOCK_M, QADDR, NDIM, False)
        do = _load_kv(do_ptrs, qv[:, None], offs_dv[None, :] < DV, real, DV == BLOCK_DV)
        # no padding query (real): no masked loads (the loop's largest saving); else padding rows get p = 0
        lse2, delta = _row_stats(LD_bh, qi, qv, not real)
        sT = _mma(k, qT, None, PRECISION, UPCAST) * qk_scale
        tT = sT
        if SOFTCAP > 0:
            sT, tT = _softcap(sT, SOFTCAP)
        if HAS_MASK or HAS_BIAS:
            sT = _site_terms(sT, qt, kt, M_bh, B_bh, stride_mq, stride_mk, stride_bq, stride_bk, HAS_MASK, HAS_BIAS,
                             True)
        xT = sT - lse2[None, :]  # the exp2 argument: one FMA with the scale (the predicate masks it, not sT)
        if not IS_FULL:
            qlo0, qw0, qlo1, qw1, qlo2, qw2 = _load_bounds(q_iv, n_q_slots, qslot, NDIM, True)
            keep = _keep(qt, kt, qlo0, qw0, qlo1, qw1, qlo2, qw2, ku0, ku1, ku2, prefix, grid_end, sinks,
                         NDIM, CAUSAL, HAS_GLOBALS, True, WINDOW_ONLY, NOPAD, q_off, whole, DYN, DYN_CAUSAL)
            xT = tl.where(keep, xT, float("-inf"))
        pT = tl.math.exp2(xT)                                     # [BLOCK_N, BLOCK_M]
        dv = _mma(pT.to(do.dtype), do, dv, PRECISION, UPCAST)
        dpT = _mma(v, tl.trans(do), None, PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP > 0:  # dK through the cap; dBias below takes dS itself
            dk = _mma((dsT * (1.0 - tT * tT)).to(qT.dtype), tl.trans(qT), dk, PRECISION, UPCAST)
        else:
            dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION, UPCAST)
        if NEED_DBIAS:
            kv = kt >= 0
            kj = tl.where(kv, kt, 0).to(tl.int64)
            tl.store(dB_bh + qi[None, :] * stride_dbq + kj[:, None] * stride_dbk, dsT,
                     mask=qv[None, :] & kv[:, None])
        if VISIT:
            _record_visit(Visits_h + m.to(tl.int64) * n_kblocks + pid_n, IS_FULL)
    return dk, dv


@triton.jit(do_not_specialize=_SIZES)
def attn_bwd_dkdv(Q, K, V, dO, LD, dK, dV, dBias, Mask, Bias,
                  q_slots, k_slots, q_iv, k_u, qb_ptr, qb_split, qb_idx, qb_rng, Visits,
                  stride_qb, stride_qh, stride_qs, stride_qd,
                  stride_kb, stride_kh, stride_ks, stride_kd,
                  stride_vb, stride_vh, stride_vs, stride_vd,
                  stride_gb, stride_gh, stride_gs, stride_gd,
                  stride_mb, stride_mh, stride_mq, stride_mk,
                  stride_bb, stride_bh, stride_bq, stride_bk,
                  stride_dkb, stride_dkh, stride_dks, stride_dkd,
                  stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                  stride_dbb, stride_dbh, stride_dbq, stride_dbk,
                  H, HK, GROUP, S_q, D: tl.constexpr, DV: tl.constexpr, seq_q, seq_k, g0, g1, g2, n_q_slots, n_k_slots,
                  n_qblocks, n_kblocks, sm_scale, prefix, grid_end, sinks, q_off, head_map, tab_sb, ptr_st, idx_st, iv_st,
                  NDIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_GLOBALS: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_BIAS: tl.constexpr,
                  NEED_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, VISIT: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, QADDR: tl.constexpr, KADDR: tl.constexpr, RANGES: tl.constexpr,
                  HAS_PARTIAL: tl.constexpr, WINDOW_ONLY: tl.constexpr = False, NOPAD: tl.constexpr = 0,
                  PER_BH: tl.constexpr = False, DYN: tl.constexpr = False, DYN_CAUSAL: tl.constexpr = False,
                  SOFTCAP: tl.constexpr = 0.0):
    """dK/dV of key block ``program_id(0)`` for (batch, kv head) ``program_id(1)``.

    Loops over the GROUP query heads of the kv head and, per head, the key block's query blocks (the
    transposed plan): the GQA sum happens in registers, so the result is deterministic without atomics.
    Score tiles are computed transposed, ``sᵀ = k qᵀ`` [BLOCK_N, BLOCK_M], so that the key block is every MMA's
    M dimension (sm_90 wgmma needs 64 rows per warpgroup; query blocks of 32 rows would not get it).
    dBias (fp32 [B, H, S_q, S_k]) receives ``ds`` of every visited pair.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = (pid_bh % HK).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt, kv, kj = _block_rows(k_slots, pid_n, offs_n, seq_k, g0, g1, g2, BLOCK_N, KADDR, NDIM)
    k = tl.load(K + b * stride_kb + hk * stride_kh + kj[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + kj[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    ku0, ku1, ku2 = _key_u(k_u, n_k_slots, pid_n, offs_n, g0, g1, g2, BLOCK_N, KADDR, NDIM)
    qk_scale = sm_scale * LOG2E
    s0, e0, j0, gap0, s1, e1, j1, gap1 = _loop_bounds(qb_ptr, qb_split, qb_rng, pid_n, RANGES)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        Q_bh = Q + b * stride_qb + h * stride_qh
        dO_bh = dO + b * stride_gb + h * stride_gh
        LD_bh = LD.to(tl.pointer_type(tl.int64)) + (b * H + h) * S_q
        M_bh = Mask + b * stride_mb + h * stride_mh
        B_bh = Bias + b * stride_bb + h * stride_bh
        dB_bh = dBias + b * stride_dbb + h * stride_dbh
        Visits_h = Visits + (b * H + h) * n_qblocks * n_kblocks
        if PER_BH:  # this query head's own transposed tables and query intervals
            grp = tl.load(head_map + h).to(tl.int64)
            x = b * tab_sb + grp
            t0, t1, t2, t3, t4, t5, t6, t7 = _loop_bounds(qb_ptr + x * ptr_st, qb_split + x * ptr_st, qb_rng,
                                                          pid_n, RANGES)
            idx_h = qb_idx + x * idx_st
            iv_h = q_iv + grp * iv_st
        else:
            t0, t1, t2, t3, t4, t5, t6, t7 = s0, e0, j0, gap0, s1, e1, j1, gap1
            idx_h = qb_idx
            iv_h = q_iv
        dk, dv = _dkdv_inner(dk, dv, k, v, kt, ku0, ku1, ku2, Q_bh, dO_bh, LD_bh, M_bh, B_bh, dB_bh,
                             q_slots, iv_h, idx_h, t0, t1, t2, t3, Visits_h, n_kblocks, pid_n, stride_qs,
                             stride_qd, stride_gs, stride_gd, stride_mq, stride_mk, stride_bq, stride_bk, stride_dbq,
                             stride_dbk, n_q_slots, seq_q, g0, g1, g2, D, DV, qk_scale, prefix, grid_end, sinks, NDIM,
                             CAUSAL, HAS_GLOBALS, HAS_MASK, HAS_BIAS, NEED_DBIAS, True, BLOCK_M, BLOCK_D, BLOCK_DV,
                             VISIT, PRECISION, UPCAST, QADDR, RANGES, False, NOPAD, q_off, DYN, DYN_CAUSAL,
                             SOFTCAP=SOFTCAP)
        if HAS_PARTIAL:  # partial blocks exist: the predicate loop
            dk, dv = _dkdv_inner(dk, dv, k, v, kt, ku0, ku1, ku2, Q_bh, dO_bh, LD_bh, M_bh, B_bh, dB_bh,
                                 q_slots, iv_h, idx_h, t4, t5, t6, t7, Visits_h, n_kblocks, pid_n, stride_qs,
                                 stride_qd, stride_gs, stride_gd, stride_mq, stride_mk, stride_bq, stride_bk,
                                 stride_dbq, stride_dbk, n_q_slots, seq_q, g0, g1, g2, D, DV, qk_scale, prefix,
                                 grid_end, sinks, NDIM, CAUSAL, HAS_GLOBALS, HAS_MASK, HAS_BIAS, NEED_DBIAS, False,
                                 BLOCK_M, BLOCK_D, BLOCK_DV, VISIT, PRECISION, UPCAST, QADDR, RANGES,
                                 WINDOW_ONLY, NOPAD, q_off, DYN, DYN_CAUSAL, SOFTCAP=SOFTCAP)
    offs_nd = kj[:, None]
    tl.store(dK + b * stride_dkb + hk * stride_dkh + offs_nd * stride_dks + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dK.dtype.element_ty), mask=kv[:, None] & (offs_d[None, :] < D))
    tl.store(dV + b * stride_dvb + hk * stride_dvh + offs_nd * stride_dvs + offs_dv[None, :] * stride_dvd,
             dv.to(dV.dtype.element_ty), mask=kv[:, None] & (offs_dv[None, :] < DV))
