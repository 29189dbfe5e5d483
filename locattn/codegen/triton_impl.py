"""Fused Triton flash attention over a block plan: the ``triton`` entry of the implementation registry.

Forward: one program per (query block, batch x head) runs an online softmax over exactly the plan's key
blocks — full blocks first (no mask arithmetic), then partial ones (pattern / causal / padding evaluated
in-kernel from per-slot u-space intervals). Backward: per query row lse in log2 units and
``delta = rowsum(dO * O)``, interleaved (``attn_bwd_preprocess``), a dQ kernel over its plan,
and a dK/dV kernel over the transposed CSR of its own plan (dQ and dK/dV tile differently) that also sums
the GQA group in registers: the backward is deterministic, no atomics. dBias is stored pair by pair into a
zeroed fp32 [B, H, Sq, Sk] buffer, then reduced to the bias's shape. Glossary:
:mod:`locattn.codegen.triton_kernels`.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` in the
environment, and already set when the kernels were imported; tests only — it is slow).

Example::

    impl = Triton()
    out, lse = impl.forward(AttentionCall(q, k, v, None, None, 0.125, False, SlidingWindow(window=64),
                                          Layout().resolve(q.shape[-2])))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..counters import bump, log
from ..patterns.base import Layout, Pattern, key_coords, query_bounds
from ..patterns.plan import BlockPlan, build_plan, choose_tiles
from .reference import reduce_to
from .registry import AttentionCall, Implementation

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (forward, dQ or dK/dV).

    ``tma`` (forward only; the backward kernels ignore it): plans whose blocks are all full, without site
    mask or bias and with computed addressing, run ``attn_fwd_tma``, which moves every tile with a tensor
    descriptor (TMA on sm_90); other calls run the generic kernel on the same tile (counted,
    ``triton_tma_unfit``). ``ws`` (implies ``tma``): that kernel's loop asks Triton for warp specialization
    (Hopper with Triton 3.6: ``num_warps`` per consumer group, two consumer groups plus a producer group;
    where the compiler refuses it the same kernel runs without, counted ``triton_ws_failed``).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False
    ws: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name}={v} must be a power of two >= 16 (tl.dot tile)")
        if self.ws and not self.tma:
            raise ValueError("KernelConfig(ws=True) needs tma=True (warp specialization is over TMA copies)")


#: the last resort of the untuned default (fits 99 KB of shared memory for every kernel, dtype and head dim)
SMALLEST_CONFIG = KernelConfig(32, 32, 4, 1)

#: fixed tiles under the interpreter: small blocks keep the (serial, numpy) programs cheap
INTERPRET_CONFIG = KernelConfig(16, 16, 1, 1)

#: candidate configs per (kernel, head-dim bucket). For dK/dV, block_n is the key block a program owns and
#: block_m the query blocks it walks. Order = preference: the first entry the GPU can launch is the untuned
#: default (``_first_that_fits``); every list holds a tile that fits 99 KB of shared memory (consumer GPUs), at
#: the latest in last place. The order for head dims 64 and 128 is the H200 sweep of 2026-11-28 (bf16;
#: benchmarks/RESULTS.md, ``gpu_attention.py --sweep``): its per-kernel winners first, so other Hopper GPUs
#: start from them; an H200 reads its measured tiles from ``tuned/NVIDIA_H200.json`` instead. Head dim 256 is
#: unmeasured (tiles chosen from the sm_90 compile: no spills, shared memory within limits). The 64-row forward
#: tiles at 4 warps are unmeasured candidates for neighborhoods: smaller query tiles raise the plan's ceiling
#: (``gpu_attention.py --ceilings``: na2d-128x128 0.40 at 128x64, 0.51 at 64x32); the one 64-row tile swept so
#: far, 64x64/8w/2s, was the slowest forward in every case (8 warps split a 64-row tile over two warp groups),
#: 4 warps keep it in one.
CONFIG_SPACE: dict[tuple[str, int], list[KernelConfig]] = {
    ("fwd", 64): [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 4, 3),
                  KernelConfig(128, 64, 8, 2), KernelConfig(128, 128, 8, 2), KernelConfig(64, 64, 4, 3),
                  KernelConfig(64, 32, 4, 3)],
    ("fwd", 128): [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 4), KernelConfig(128, 64, 8, 3),
                   KernelConfig(128, 128, 8, 2), KernelConfig(128, 64, 8, 2), KernelConfig(64, 64, 8, 2),
                   KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 3)],
    ("fwd", 256): [KernelConfig(64, 32, 8, 2), KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2),
                   KernelConfig(32, 32, 4, 2)],
    ("dq", 64): [KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 4, 4), KernelConfig(64, 64, 4, 2),
                 KernelConfig(128, 32, 4, 2), KernelConfig(128, 64, 8, 2)],
    ("dq", 128): [KernelConfig(64, 32, 4, 3), KernelConfig(128, 32, 8, 3), KernelConfig(64, 64, 8, 2),
                  KernelConfig(64, 32, 8, 2), KernelConfig(32, 64, 8, 2)],
    ("dq", 256): [KernelConfig(32, 32, 4, 1), KernelConfig(64, 32, 8, 1), KernelConfig(32, 64, 8, 1)],
    # dK/dV computes transposed tiles (the key block is the MMA's M dimension): 128-key blocks win
    ("dkdv", 64): [KernelConfig(32, 128, 4, 2), KernelConfig(32, 128, 4, 4), KernelConfig(32, 64, 4, 2),
                   KernelConfig(32, 128, 8, 3), KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 2)],
    ("dkdv", 128): [KernelConfig(64, 128, 8, 2), KernelConfig(32, 128, 8, 3), KernelConfig(32, 64, 8, 2),
                    KernelConfig(64, 64, 8, 2), KernelConfig(32, 128, 4, 3), KernelConfig(32, 32, 4, 2)],
    ("dkdv", 256): [KernelConfig(32, 32, 4, 1), KernelConfig(32, 64, 8, 1), KernelConfig(64, 32, 8, 1)],
}

#: forward candidates with TMA / warp specialization (``KernelConfig.tma`` / ``ws``), appended to the forward
#: lists so that autotuning and the sweep try them, never an untuned default (they come last). Unmeasured on a
#: GPU so far: compiled offline for sm_90 with Triton 3.6 (``tools/compile_sm90.py --tma [--ws]``), where
#: warp specialization applies to LINEAR plans (dense, 1-D tiled) at 4 warps (12 warps launched, 168
#: registers at d=128) and the 2-D/3-D spatial tiles get TMA without it.
TMA_CANDIDATES: dict[int, list[KernelConfig]] = {
    64: [KernelConfig(128, 128, 8, 3, tma=True), KernelConfig(128, 64, 8, 3, tma=True),
         KernelConfig(128, 128, 4, 2, tma=True, ws=True), KernelConfig(128, 128, 4, 3, tma=True, ws=True),
         KernelConfig(128, 64, 4, 3, tma=True, ws=True)],
    128: [KernelConfig(128, 128, 8, 3, tma=True), KernelConfig(128, 64, 8, 3, tma=True),
          KernelConfig(128, 128, 4, 2, tma=True, ws=True), KernelConfig(128, 64, 4, 3, tma=True, ws=True),
          KernelConfig(128, 64, 4, 2, tma=True, ws=True)],
}
for _d, _cands in TMA_CANDIDATES.items():
    CONFIG_SPACE[("fwd", _d)] = CONFIG_SPACE[("fwd", _d)] + _cands

#: autotuning results: (family, head-dim bucket, seq bucket, pattern kind, dtype, device index) -> config
_TUNED: dict[tuple, KernelConfig] = {}
#: untuned defaults: (tuning key, padded head dims) -> the first CONFIG_SPACE tile that launched (``_first_that_fits``)
_FITS: dict[tuple, KernelConfig] = {}
#: per CUDA device index, the results persisted by earlier processes (key string -> config), read once
_PERSISTED: dict[int, dict[str, KernelConfig]] = {}


def _slug(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name).strip("_") or "device"


def packaged_tuning_file(device_name: str) -> Path:
    """Tiles measured for one GPU model and shipped with locattn (``locattn/codegen/tuned/<device>.json``,
    written by ``benchmarks/gpu_attention.py --sweep --emit-tuned``)."""
    return Path(__file__).parent / "tuned" / f"{_slug(device_name)}.json"


def persisted_configs(device_name: str) -> dict[str, KernelConfig]:
    """The shipped tiles of this GPU model, overridden by the user's own autotuning results."""
    return {**load_tuned(packaged_tuning_file(device_name)), **load_tuned(tuning_file(device_name))}


def lookup_tuned(entries: dict[str, KernelConfig], key: tuple, autotune: bool) -> KernelConfig | None:
    """The persisted tile for ``key``: its exact entry; else, unless autotuning (which then times the exact
    key), the pattern's default ``family|d<D>|*|<pattern>|dtype`` (tiles suit patterns: on the H200 the
    neighborhood forward prefers 64-key blocks, dense and tiled 128), then the kernel's default
    ``family|d<D>|*|*|dtype``."""
    cfg = entries.get(_key_str(key))
    if cfg is None and not autotune:
        cfg = entries.get(_key_str(key, wildcard=True, keep_pattern=True)) or entries.get(_key_str(key, wildcard=True))
    return cfg


def tuning_file(device_name: str) -> Path | None:
    """Where autotuning results for one GPU model and Triton version persist: ``$LOCATTN_CACHE_DIR`` (default
    ``~/.cache/locattn``) / ``triton-<version>-<device>.json``; None when ``LOCATTN_CACHE_DIR`` is set empty."""
    import triton

    root = os.environ.get("LOCATTN_CACHE_DIR")
    if root == "":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "locattn"
    return base / f"triton-{triton.__version__}-{_slug(device_name)}.json"


def _key_str(key: tuple, wildcard: bool = False, keep_pattern: bool = False) -> str:
    """``family|d<D>|s<S bucket>|pattern|dtype`` of a tuning key; ``wildcard``: ``family|d<D>|*|*|dtype``, or
    with ``keep_pattern`` ``family|d<D>|*|pattern|dtype``."""
    family, d, s_bucket, pattern, dtype = key[:5]
    dt = str(dtype).replace("torch.", "")
    if wildcard:
        return f"{family}|d{d}|*|{pattern if keep_pattern else '*'}|{dt}"
    return f"{family}|d{d}|s{s_bucket}|{pattern}|{dt}"


def load_tuned(path: Path | None) -> dict[str, KernelConfig]:
    """Persisted results (key string -> config); an unreadable file or a malformed entry is skipped, logged."""
    if path is None or not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("locattn triton: ignoring the autotuning cache %s (%s)", path, e)
        return {}
    out = {}
    for k, v in (raw.items() if isinstance(raw, dict) else ()):
        try:
            out[k] = KernelConfig(**v)
        except (TypeError, ValueError) as e:
            log.warning("locattn triton: ignoring autotuning entry %s in %s (%s)", k, path, e)
    return out


def save_tuned(path: Path | None, key: str, cfg: KernelConfig) -> None:
    """Add one result to the file (read, update, write to a temporary file, rename: concurrent writers lose at
    most an entry, never the file)."""
    if path is None:
        return
    entries = {k: dataclasses.asdict(v) for k, v in load_tuned(path).items()}
    entries[key] = dataclasses.asdict(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("locattn triton: could not write the autotuning cache %s (%s)", path, e)


def _kernels():
    """The kernel module, imported on first use (keeps ``import locattn`` working without triton)."""
    from . import triton_kernels
    return triton_kernels


def triton_available() -> tuple[bool, str]:
    try:
        _kernels()
    except Exception as e:  # ImportError, or triton failing to initialise
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, ""


def interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at their import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_kernels().attn_fwd, InterpretedFunction)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def head_dim_bucket(d: int) -> int:
    """The :data:`CONFIG_SPACE` / tuning-key head-dim bucket of head dim ``d`` (64, 128 or 256)."""
    return min(_pow2(d, 64), MAX_HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------
# Device tables derived from a plan (cached per plan object and device)


@dataclass(frozen=True, eq=False)
class KernelTables:
    """Int32 device copies of a plan, reordered for the kernels (see the triton_kernels glossary)."""

    plan: BlockPlan
    q_slots: torch.Tensor
    k_slots: torch.Tensor
    q_iv: torch.Tensor    # int64 [3, n_q_slots]: u-space key interval (lo, w = hi - lo) packed ``lo | w << 32``;
                          # empty intervals are (EMPTY_LO, 0)
    k_u: torch.Tensor     # [3, n_k_slots]
    kv_ptr: torch.Tensor
    kv_split: torch.Tensor
    kv_idx: torch.Tensor
    qb_ptr: torch.Tensor
    qb_split: torch.Tensor
    qb_idx: torch.Tensor
    kv_rng: torch.Tensor  # [n_qblocks, 4] (lo, full_lo, full_hi, hi) when ``ranges``
    qb_rng: torch.Tensor  # [n_kblocks, 4] likewise for the transposed plan
    q_addr: int           # QADDR: 0 slot table, 1 linear (slot i is token i), GRID_BIT | tile code (see glossary)
    k_addr: int           # KADDR likewise for keys
    grid: tuple[int, int, int]  # g0, g1, g2 (1-padded) for GRID addressing
    ranges: bool          # every row of the plan and of its transpose is one contiguous run (see glossary)
    has_globals: bool     # global tokens or sinks exist (HAS_GLOBALS)
    has_partial: bool     # the plan has partial blocks (HAS_PARTIAL: else the partial-block loops are not compiled)
    window_only: bool     # partial blocks test the window alone (WINDOW_ONLY, kernel glossary)
    nopad: int            # NOPAD bits (kernel glossary): 1 no padding query slot, 2 no padding key slot
    ndim: int
    prefix: int
    grid_end: int
    sinks: int
    q_off: int = 0        # query row r is token r + q_off for the pattern (the plan's q_offset)
    # per-(batch, head) or per-head-group tables (PER_BH): head h reads group g = head_map[h], table
    # b * tab_sb + g, query intervals q_iv + g * iv_st; kv / qb strides per table
    per_bh: bool = False
    head_map: torch.Tensor | None = None
    tab_sb: int = 0
    iv_st: int = 0
    kv_st: tuple[int, int] = (0, 0)   # (ptr / split stride, idx stride) of the kv tables
    qb_st: tuple[int, int] = (0, 0)   # likewise of the transposed tables
    dyn: bool = False                 # entries carry the WHOLE bit (DYN)
    dyn_causal: bool = False

    @property
    def computed(self) -> bool:
        """Whether any table-free addressing applies (what ``tables_only`` turns off)."""
        return bool(self.q_addr or self.k_addr or self.ranges)


def _slot_coords(pattern: Pattern, layout: Layout, slots: torch.Tensor, query: bool) -> list[torch.Tensor]:
    """Per slot and axis: u-space interval bounds (queries) or u-space coordinate (keys).

    Global and padding slots get clamped garbage: the kernel tests globals from token indices and padding
    from ``slot < 0``, exactly like :func:`locattn.patterns.base.allowed`.
    """
    t = slots.clamp_min(0)
    return query_bounds(pattern, layout, t) if query else key_coords(pattern, layout, t)


#: marks a GRID addressing code (QADDR / KADDR): bits 4a..4a+3 hold log2 of the tile side on axis a
GRID_BIT = 1 << 12

#: ``lo`` of an empty query interval (its width is 0): past every key's u-coordinate, ``PAD_U`` included
EMPTY_LO = 1 << 30

#: u-coordinate of padding key slots in ``k_u``: past every window (windows lie in [0, grid extent) or are
#: empty, stored as lo = EMPTY_LO), so the window test alone excludes padding keys (WINDOW_ONLY)
PAD_U = 1 << 29


def grid_slot_tokens(n_slots: int, block: int, tile: tuple[int, ...], grid: tuple[int, ...]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token and grid coordinates of every slot when blocks are spatial tiles, exactly as the kernels compute
    them for GRID addressing (``_grid_coords``): block tiles row-major over the tile grid, slots row-major in
    the tile, padding (-1) past the tile or the grid. Returns (tokens [n_slots], coords per axis)."""
    s = torch.arange(n_slots)
    blk, off = s // block, s % block
    nt = [-(-g // t) for g, t in zip(grid, tile)]
    valid = torch.ones(n_slots, dtype=torch.bool)
    coords = [None] * len(grid)
    for a in reversed(range(len(grid))):
        if a:  # the kernel's fp32 divmod (_divmod), not exact integer division: mirrored, so checked
            q = ((blk.float() + 0.5) * (torch.tensor(1.0) / torch.tensor(float(nt[a])))).long()
            coords[a] = (blk - q * nt[a]) * tile[a] + off % tile[a]
            blk = q
        else:  # the outermost axis takes the rest of the block index (no modulo): blocks past the grid are padding
            coords[a] = blk * tile[a] + off % tile[a]
        off = off // tile[a]
        valid &= coords[a] < grid[a]
    valid &= off == 0  # slots past the tile's own size
    tok = torch.zeros(n_slots, dtype=torch.long)
    for a in range(len(grid)):
        tok = tok * grid[a] + coords[a]
    return torch.where(valid, tok, -1), coords


def _grid_addr(slots: torch.Tensor, block: int, tile: tuple[int, ...] | None, layout: Layout,
               k_u: torch.Tensor | None = None) -> int:
    """The GRID addressing code of a plan side if the kernels' tile arithmetic reproduces its slot table (and,
    for keys, its u-space coordinates: dilation 1), else 0."""
    grid = layout.grid
    if not grid or len(grid) not in (2, 3) or tile is None or len(tile) != len(grid):
        return 0
    if any(t & (t - 1) or t > 1 << 15 for t in tile):
        return 0
    tok, coords = grid_slot_tokens(slots.numel(), block, tile, grid)
    if not torch.equal(tok, slots):
        return 0
    if k_u is not None:
        ok = slots >= 0
        if not all(torch.equal(k_u[a][ok], coords[a][ok]) for a in range(len(grid))):
            return 0
    return grid_code(tile)


def grid_code(tile: tuple[int, ...]) -> int:
    """QADDR / KADDR of GRID addressing with power-of-two spatial tile ``tile`` (see the kernel glossary)."""
    code = GRID_BIT
    for a, t in enumerate(tile):
        code |= (t.bit_length() - 1) << (4 * a)
    return code


def _is_linear(slots: torch.Tensor, seq: int) -> bool:
    """Whether slot i holds token i for every token, padding (-1) after the sequence."""
    n = slots.numel()
    return n >= seq and torch.equal(slots[:seq], torch.arange(seq)) and bool((slots[seq:] < 0).all())


def _runs(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, n_rows: int) -> torch.Tensor | None:
    """Per row, ``(lo, full_lo, full_hi, hi)`` if the row's columns are the contiguous run ``[lo, hi)`` with
    its full columns the contiguous run ``[full_lo, full_hi)`` inside it; None if any row is not.

    Rows without full columns get ``full_lo = full_hi = lo``; empty rows ``(0, 0, 0, 0)``."""
    big = torch.iinfo(torch.long).max

    def seg(op, vals, sel, init):
        out = torch.full((n_rows,), init, dtype=torch.long)
        return out.scatter_reduce_(0, rows[sel], vals[sel], op) if bool(sel.any()) else out

    every = torch.ones_like(full)
    count = torch.bincount(rows, minlength=n_rows)
    n_full = torch.bincount(rows[full], minlength=n_rows)
    lo, hi = seg("amin", cols, every, big), seg("amax", cols, every, -1) + 1
    f_lo, f_hi = seg("amin", cols, full, big), seg("amax", cols, full, -1) + 1
    empty, no_full = count == 0, n_full == 0
    lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
    f_lo, f_hi = torch.where(no_full, lo, f_lo), torch.where(no_full, lo, f_hi)
    if not (bool(((hi - lo) == count).all()) and bool(((f_hi - f_lo) == n_full).all())):
        return None
    return torch.stack([lo, f_lo, f_hi, hi], 1)


def _csr(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, n_rows: int, n_cols: int):
    """CSR of (rows, cols) with each row's full entries first: (ptr, split, idx)."""
    key = (rows * 2 + (~full).long()) * n_cols + cols
    order = torch.argsort(key)
    idx = cols[order]
    ptr = torch.zeros(n_rows + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    split = ptr[:-1] + torch.bincount(rows[full], minlength=n_rows)
    return ptr, split, idx


@functools.lru_cache(maxsize=128)
def kernel_tables(plan: BlockPlan, pattern: Pattern, layout: Layout, device: torch.device) -> KernelTables:
    nq, nk = plan.n_qblocks, plan.n_kblocks
    rows = torch.repeat_interleave(torch.arange(nq), plan.kv_ptr[1:] - plan.kv_ptr[:-1])
    cols, full = plan.kv_idx, plan.kv_full
    kv_ptr, kv_split, kv_idx = _csr(rows, cols, full, nq, nk)
    qb_ptr, qb_split, qb_idx = _csr(cols, rows, full, nk, nq)
    kv_rng, qb_rng = _runs(rows, cols, full, nq), _runs(cols, rows, full, nk)
    ranges = kv_rng is not None and qb_rng is not None
    if not ranges:
        kv_rng = qb_rng = torch.zeros(1, 4, dtype=torch.long)
    s_q = int((plan.q_slots.max() + 1).clamp_min(0))
    s_k = int((plan.k_slots.max() + 1).clamp_min(0))
    linear = _is_linear(plan.q_slots, s_q) and _is_linear(plan.k_slots, s_k)
    q_addr = k_addr = 1 if linear else 0
    g = (1, 1, 1)
    nqs, nks = plan.q_slots.numel(), plan.k_slots.numel()
    q_lo = torch.zeros(3, nqs, dtype=torch.long)
    q_w = torch.zeros(3, nqs, dtype=torch.long)
    k_u = torch.zeros(3, nks, dtype=torch.long)
    ndim, prefix, grid_end, sinks = 0, 0, 0, 0
    if pattern.local:
        ndim = len(layout.grid)
        if ndim > 3:
            raise ValueError(f"the Triton kernels support grids of up to 3 axes, got {ndim}")
        q_tok = torch.where(plan.q_slots >= 0, plan.q_slots + plan.q_offset, -1)  # slots hold query rows
        for a, (lo, hi) in enumerate(_slot_coords(pattern, layout, q_tok, True)):
            empty = hi < lo
            q_lo[a] = torch.where(empty, EMPTY_LO, lo)
            q_w[a] = torch.where(empty, 0, hi - lo)
        for a, u in enumerate(_slot_coords(pattern, layout, plan.k_slots, False)):
            k_u[a] = torch.where(plan.k_slots >= 0, u, PAD_U)  # padding keys: outside every window
        prefix, grid_end, sinks = layout.prefix, layout.prefix + layout.n_grid, layout.sinks
        if not linear:
            q_addr = _grid_addr(plan.q_slots, plan.block_m, plan.q_tile, layout)
            k_addr = _grid_addr(plan.k_slots, plan.block_n, plan.k_tile, layout, k_u[:ndim])
            g = tuple(layout.grid) + (1,) * (3 - ndim)
    has_globals = bool(pattern.local and (layout.prefix or layout.suffix or layout.sinks))
    has_partial = bool((~plan.kv_full).any())
    window_only = (pattern.local and not has_globals
                   and _windows_exclude_padding(plan, layout.grid, q_lo[:ndim], q_w[:ndim], k_addr))

    def dev(t):
        return t.to(device=device, dtype=torch.int32).contiguous()

    nopad = int(bool((plan.q_slots >= 0).all())) | 2 * int(bool((plan.k_slots >= 0).all()))
    q_iv = (q_w << 32) | (q_lo & 0xFFFFFFFF)  # int32 halves: grid coordinates, or EMPTY_LO for empty intervals
    return KernelTables(plan, dev(plan.q_slots), dev(plan.k_slots), q_iv.to(device).contiguous(), dev(k_u),
                        dev(kv_ptr), dev(kv_split), dev(kv_idx), dev(qb_ptr), dev(qb_split), dev(qb_idx),
                        dev(kv_rng), dev(qb_rng), q_addr, k_addr, g, ranges, has_globals, has_partial, window_only,
                        nopad, ndim, prefix, grid_end, sinks, plan.q_offset)


def dynamic_kernel_tables(call: AttentionCall) -> KernelTables:
    """The kernel tables of a ``dynamic`` call: its static part's slots, intervals and addressing
    (:func:`kernel_tables`, cached) with the call's per-(batch, head) block tables (the WHOLE bit marks the
    entries the selection keeps whole; see the kernel glossary)."""
    bt = call.dynamic_tables()
    plan = bt.plan
    base = kernel_tables(plan, call.pattern.static, call.layout, call.q.device)
    whole_bit = 1 << 30

    def csr(ptr, split, idx, whole):
        split = torch.cat([split, split[:, -1:]], 1)  # one column more: the same stride as ptr
        idx = idx | (whole.long() << 30) if whole is not None else idx
        assert plan.n_kblocks < whole_bit and plan.n_qblocks < whole_bit
        return (ptr.to(torch.int32).contiguous(), split.to(torch.int32).contiguous(),
                idx.to(torch.int32).contiguous())

    kv = csr(bt.kv_ptr, bt.kv_split, bt.kv_idx, bt.kv_whole)
    qb = csr(bt.qb_ptr, bt.qb_split, bt.qb_idx, bt.qb_whole)
    hq = call.q.shape[1]
    return dataclasses.replace(base, kv_ptr=kv[0], kv_split=kv[1], kv_idx=kv[2], qb_ptr=qb[0], qb_split=qb[1],
                               qb_idx=qb[2], ranges=False, has_partial=True, window_only=False, per_bh=True,
                               head_map=_arange32(hq, call.q.device), tab_sb=hq,
                               kv_st=(kv[0].shape[1], kv[2].shape[1]), qb_st=(qb[0].shape[1], qb[2].shape[1]),
                               dyn=True, dyn_causal=call.pattern.causal)


def multi_reason(call: AttentionCall) -> str | None:
    """Why the per-head groups of ``call`` cannot share one launch (None: they can): the kernels' slots, key
    coordinates, global tokens and sinks are one set per launch, so every local group must have the same
    layout and dilation; ``dynamic`` groups choose their own tables per call."""
    groups = call.head_groups
    local = [(p, lay) for _, p, lay in groups if p.local]
    if not local:
        return "no local group"
    if any(p.dynamic for _, p, _ in groups):
        return "a dynamic group"
    p0, lay0 = local[0]
    nd = len(lay0.grid)
    for p, lay in local[1:]:
        if lay != lay0:
            return f"head groups on different layouts ({lay0} vs {lay})"
        if any(p.dilation_of(a, nd) != p0.dilation_of(a, nd) for a in range(nd)):
            return "head groups with different dilations"
    return None


def _every_key(layout: Layout) -> Pattern:
    """A local pattern allowing every pair of ``layout`` (a dense head group among local ones, on their slots)."""
    from ..patterns import SlidingWindow  # noqa: PLC0415
    return SlidingWindow(window=max(layout.grid))


@functools.lru_cache(maxsize=64)
def _group_map(groups_heads: tuple, n_heads: int, device: torch.device) -> torch.Tensor:
    """int32 [H]: the head group of every head (made once per site shape and device)."""
    m = torch.empty(n_heads, dtype=torch.int32)
    for g, heads in enumerate(groups_heads):
        m[list(heads)] = g
    return m.to(device)


def multi_kernel_tables(call: AttentionCall, block_m: int, block_n: int) -> KernelTables:
    """One launch for a site's per-head groups: every group's plan on common spatial tiles (those of the group
    with the most heads; a dense group becomes a window covering the grid), its CSR stacked per group and its
    query intervals per group; heads find their group through ``head_map`` (PER_BH with ``tab_sb = 0``)."""
    s_q, s_k = call.q.shape[-2], call.k.shape[-2]
    layout, dev = call.layout, call.q.device
    pats = [p if p.local else _every_key(layout) for _, p, _ in call.head_groups]
    main = max(range(len(pats)), key=lambda i: len(call.head_groups[i][0]))
    tiles = choose_tiles(pats[main], layout.grid, block_m, block_n)
    tabs = [kernel_tables(build_plan(p, layout, s_q, s_k, block_m, block_n, call.is_causal, call.q_offset, tiles),
                          p, layout, dev) for p in pats]
    t0 = tabs[0]

    def stack(ts):
        width = max(t.numel() for t in ts)
        return torch.stack([torch.cat([t, t.new_zeros(width - t.numel())]) for t in ts]).contiguous()

    kv_ptr, kv_idx = stack([t.kv_ptr for t in tabs]), stack([t.kv_idx for t in tabs])
    kv_split = stack([torch.cat([t.kv_split, t.kv_split[-1:]]) for t in tabs])
    qb_ptr, qb_idx = stack([t.qb_ptr for t in tabs]), stack([t.qb_idx for t in tabs])
    qb_split = stack([torch.cat([t.qb_split, t.qb_split[-1:]]) for t in tabs])
    q_iv = torch.stack([t.q_iv for t in tabs]).contiguous()
    same = lambda f: all(getattr(t, f) == getattr(t0, f) for t in tabs)
    return dataclasses.replace(
        t0, kv_ptr=kv_ptr, kv_split=kv_split, kv_idx=kv_idx, qb_ptr=qb_ptr, qb_split=qb_split, qb_idx=qb_idx,
        q_iv=q_iv, q_addr=t0.q_addr if same("q_addr") else 0, k_addr=t0.k_addr if same("k_addr") else 0,
        ranges=False, has_partial=any(t.has_partial for t in tabs), window_only=all(t.window_only for t in tabs),
        nopad=min(t.nopad for t in tabs), has_globals=any(t.has_globals for t in tabs), per_bh=True,
        head_map=_group_map(tuple(h for h, _, _ in call.head_groups), call.q.shape[1], dev), tab_sb=0,
        iv_st=t0.q_iv.numel(), kv_st=(kv_ptr.shape[1], kv_idx.shape[1]), qb_st=(qb_ptr.shape[1], qb_idx.shape[1]))


@functools.lru_cache(maxsize=64)
def _arange32(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` as int32 on ``device``, made once (no host-to-device copy per call: CUDA-graph safe)."""
    return torch.arange(n, dtype=torch.int32, device=device)


def _windows_exclude_padding(plan: BlockPlan, grid: tuple[int, ...], q_lo: torch.Tensor, q_w: torch.Tensor,
                             k_addr: int) -> bool:
    """Whether the window test alone excludes every padding key (WINDOW_ONLY): each real query's window is empty
    or inside the grid on every axis; table keys carry ``PAD_U``, and GRID keys have no padding inside a tile
    (the tile fills the block), so a padding GRID key lies past the grid on some axis."""
    if k_addr > 1 and _tile_size(k_addr, len(grid)) != plan.block_n:
        return False
    real = plan.q_slots >= 0
    for a in range(len(grid)):
        lo, w = q_lo[a][real], q_w[a][real]
        empty = (w == 0) & (lo == EMPTY_LO)
        if not bool((empty | ((lo >= 0) & (lo + w <= grid[a] - 1))).all()):
            return False
    return True


def _site_tensor(t: torch.Tensor | None, shape, dummy: torch.Tensor):
    """Site mask/bias expanded (a view, stride 0 on broadcast dims) to ``shape`` = [B, H, Sq, Sk]."""
    if t is None:
        return dummy, (0, 0, 0, 0)
    if t.dim() < 4:
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype == torch.float64:
        t = t.float()
    t = t.expand(*shape)
    return t, tuple(t.stride())


# ----------------------------------------------------------------------------------------------------------


class Triton(Implementation):
    """Fused block-sparse flash attention (forward + backward) in Triton.

    ``config``: fixed tiles for all three kernels; ``configs``: fixed tiles per kernel family (``"fwd"``,
    ``"dq"``, ``"dkdv"``), taking precedence over ``config``. Default: :data:`INTERPRET_CONFIG` under the interpreter;
    on CUDA the tiles persisted for this GPU model (the user's autotuning cache, then the shipped
    ``tuned/<device>.json``: exact key, the pattern's default, the kernel's default), else the first entry of
    :data:`CONFIG_SPACE` the GPU can launch (:func:`_untuned_default`); with ``autotune=True`` (default: the
    environment variable ``LOCATTN_AUTOTUNE=1``) the fastest entry, timed once per (kernel, head dim, sequence
    bucket, pattern kind, dtype, GPU model) and cached in ``_TUNED`` and on disk (:func:`tuning_file`), so a
    later process reuses it without timing.
    Debug flags (tests): ``nan_fill`` fills fresh outputs with NaN so unwritten memory shows up;
    ``record_visits`` makes every kernel count the block pairs it visits into ``self.visits`` (keys
    ``"fwd"``, ``"dq"``, ``"dkdv"``: int32 [B * Hq, n_qblocks, n_kblocks], 1 per full visit, 16 per partial
    visit) and keeps the plans used in ``self.plans``. ``self.compiled[family]`` is the last compiled kernel
    launched per family (Triton's ``CompiledKernel``: ``n_regs``, ``n_spills``, ``metadata.shared``), and
    ``self.launched["fwd"]`` which forward ran: ``attn_fwd``, ``attn_fwd_tma`` or ``attn_fwd_tma+ws``
    (``self.last_tma_unfit``: why the last TMA config ran ``attn_fwd``).
    ``tables_only`` turns off the table-free addressing (LINEAR / RANGES in the kernel glossary) so the two
    can be compared; results are identical. ``window_only=False`` turns off WINDOW_ONLY (partial blocks then
    test padding too; results are identical), and ``nopad=False`` NOPAD (partial blocks of a plan without
    padding slots then mask their row loads and test padding anyway; results are identical), for the same kind
    of A/B.
    """

    name = "triton"
    multi_group = True

    def __init__(self, config: KernelConfig | None = None, *, configs: dict[str, KernelConfig] | None = None,
                 autotune: bool | None = None, nan_fill: bool = False, record_visits: bool = False,
                 tables_only: bool = False, window_only: bool = True, nopad: bool = True):
        self.config = config
        self.tables_only = tables_only
        self.window_only = window_only
        self.nopad = nopad
        self.configs = dict(configs or {})
        unknown = set(self.configs) - {"fwd", "dq", "dkdv"}
        if unknown:
            raise ValueError(f"Triton(configs=...): unknown kernel families {sorted(unknown)} "
                             "(expected 'fwd', 'dq', 'dkdv')")
        self.compiled: dict[str, object] = {}
        self.launched: dict[str, str] = {}
        self.last_tma_unfit: str | None = None
        self.autotune = autotune
        self.nan_fill = nan_fill
        self.record_visits = record_visits
        self.visits: dict[str, torch.Tensor] = {}
        self.plans: dict[str, BlockPlan] = {}

    # -- dispatch -------------------------------------------------------------------------------------------
    def can_run(self, call: AttentionCall) -> tuple[bool, str]:
        q, k, v = call.q, call.k, call.v
        if not (q.device == k.device == v.device):
            return False, "q, k and v are on different devices"
        for name, t in (("mask", call.mask), ("bias", call.bias)):
            if t is not None and t.device != q.device:
                return False, f"site {name} on {t.device}, q on {q.device}"
        if call.empty:
            return False, "empty tensor"
        # device first: on CPU without the interpreter, never pay for importing triton
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        ok, why = triton_available()
        if not ok:
            return False, why
        if q.device.type == "cpu":
            if not interpreted():
                return False, "TRITON_INTERPRET=1 was set after locattn's Triton kernels were built"
        elif q.device.type != "cuda":
            return False, f"device {q.device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
        if not (q.dtype == k.dtype == v.dtype):
            return False, f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
        if q.dtype not in SUPPORTED_DTYPES:
            return False, f"dtype {q.dtype} is not supported (fp16, bf16, fp32)"
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return False, f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
        if call.pattern.local and q.shape[-2] != k.shape[-2] and not call.q_offset:
            return False, f"pattern {call.pattern.name} needs S_q == S_k"
        if call.pattern.dynamic:
            bt = call.pattern.block_tokens(call.layout.grid)
            if bt < 16 or bt > 128 or bt & (bt - 1):
                return False, (f"dynamic pooling block of {bt} tokens (the kernels need a power of two in "
                               f"16..128: it is their tile)")
        if call.pattern.local and len(call.layout.grid or ()) > 3:
            return False, f"grid of {len(call.layout.grid)} axes (at most 3)"
        if call.mask is not None and call.mask.dtype != torch.bool:
            return False, f"mask dtype {call.mask.dtype} (bool expected)"
        if call.bias is not None and not call.bias.is_floating_point():
            return False, f"bias dtype {call.bias.dtype} (floating point expected)"
        if call.head_groups is not None:
            why = multi_reason(call)
            if why is not None:
                return False, f"per-head groups in one launch: {why}"
        return True, ""

    # -- configs ----------------------------------------------------------------------------------------------
    def _tune_key(self, call: AttentionCall, family: str) -> tuple:
        d = head_dim_bucket(max(call.q.shape[-1], call.v.shape[-1]))
        s_bucket = _pow2(call.q.shape[-2], 1024)
        dev = call.q.device.index if call.q.device.type == "cuda" else -1
        return (family, d, s_bucket, call.pattern.name, call.q.dtype, dev)

    def _config(self, call: AttentionCall, family: str, run) -> KernelConfig:
        cfg = self._config_for(call, family, run)
        if call.pattern.dynamic:  # the tables are per pooling block: that is the tile
            bt = call.pattern.block_tokens(call.layout.grid)
            cfg = dataclasses.replace(cfg, block_m=bt, block_n=bt, tma=False, ws=False)
        return cfg

    def _config_for(self, call: AttentionCall, family: str, run) -> KernelConfig:
        if family in self.configs:
            return self.configs[family]
        if self.config is not None:
            return self.config
        if interpreted() or call.q.device.type != "cuda":
            return INTERPRET_CONFIG
        key = self._tune_key(call, family)
        dev = key[-1]
        if key in _TUNED:
            return _TUNED[key]
        if dev not in _PERSISTED:  # shipped tiles of this GPU model, and what earlier processes tuned on it
            _PERSISTED[dev] = persisted_configs(torch.cuda.get_device_name(dev))
        autotune = self.autotune if self.autotune is not None else os.environ.get("LOCATTN_AUTOTUNE") == "1"
        persisted = lookup_tuned(_PERSISTED[dev], key, autotune)
        if persisted is not None:
            _TUNED[key] = persisted
            return persisted
        space = CONFIG_SPACE[(family, key[1])]
        capturing = torch.cuda.is_current_stream_capturing()
        if not autotune:
            # what fits depends on both padded head dims and the dtype (shared memory), not only on the key's bucket
            return _untuned_default(space, run, key + (_pow2(call.q.shape[-1]), _pow2(call.v.shape[-1])), capturing)
        if capturing:
            return SMALLEST_CONFIG
        best, best_t = space[0], math.inf
        for cfg in space:
            try:
                run(cfg)  # compile + warm up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    run(cfg)
                end.record()
                torch.cuda.synchronize()
                t = start.elapsed_time(end)
            except Exception as e:  # out of shared memory / registers for this tile: skip it
                log.debug("locattn triton: config %s failed: %s", cfg, e)
                continue
            if t < best_t:
                best, best_t = cfg, t
        _TUNED[key] = best
        save_tuned(tuning_file(torch.cuda.get_device_name(dev)), _key_str(key), best)
        bump("triton_autotune", f"{key[0]} d{key[1]} s{key[2]} {key[3]} -> {best}")
        return best

    def _tables(self, call: AttentionCall, cfg: KernelConfig) -> KernelTables:
        if call.head_groups is not None:
            return multi_kernel_tables(call, cfg.block_m, cfg.block_n)
        if call.pattern.dynamic:
            return dynamic_kernel_tables(call)
        s_q, s_k = call.q.shape[-2], call.k.shape[-2]
        plan = build_plan(call.pattern, call.layout, s_q, s_k, cfg.block_m, cfg.block_n, call.is_causal,
                          call.q_offset)
        return kernel_tables(plan, call.pattern, call.layout, call.q.device)

    def _empty(self, *shape, dtype, device) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if self.nan_fill else t

    def _visits(self, kind: str, tab: KernelTables, bh: int, device) -> torch.Tensor:
        if not self.record_visits:
            return torch.empty(1, dtype=torch.int32, device=device)
        self.plans[kind] = tab.plan
        self.visits[kind] = torch.zeros(bh, tab.plan.n_qblocks, tab.plan.n_kblocks, dtype=torch.int32,
                                        device=device)
        return self.visits[kind]

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        with _on_device(call.q.device):
            cfg = self._config(call, "fwd", lambda c: self._forward(call, c, record=False))
            return self._forward(call, cfg, record=self.record_visits)

    def _forward(self, call: AttentionCall, cfg: KernelConfig, record: bool):
        kern = _kernels()
        q, k, v = call.q, call.k, call.v
        b, hq, s_q, d = q.shape
        hk, s_k, dv = k.shape[1], k.shape[2], v.shape[-1]
        tab = self._tables(call, cfg)
        # SDPA's layout ([B, Sq, Hq, Dv] in memory), the op's output: the kernels store through strides, so the op
        # returns it without a transposing copy
        out = self._empty(b, s_q, hq, dv, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = self._empty(b, hq, s_q, dtype=torch.float32, device=q.device)
        full = (b, hq, s_q, s_k)
        mask, ms = _site_tensor(call.mask, full, tab.q_slots)
        bias, bs = _site_tensor(call.bias, full, tab.q_slots)
        visits = self._visits("fwd", tab, b * hq, q.device) if record else tab.q_slots
        plan = tab.plan
        if cfg.tma:
            unfit = self.last_tma_unfit = self._tma_unfit(call, tab)
            if unfit is None:
                self._forward_tma(call, cfg, tab, out, lse, visits, record)
                return out, lse
            bump("triton_tma_unfit", unfit)
        self.launched["fwd"] = "attn_fwd"
        bump("triton_launch", "fwd")
        self.compiled["fwd"] = kern.attn_fwd[(plan.n_qblocks, b * hq)](
            q, k, v, out, lse, mask, bias,
            tab.q_slots, tab.k_slots, tab.q_iv, tab.k_u, tab.kv_ptr, tab.kv_split, tab.kv_idx,
            tab.kv_rng, visits,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *ms, *bs,
            hq, hq // hk, d, dv, s_q, s_k, *tab.grid, plan.q_slots.numel(), plan.k_slots.numel(), plan.n_qblocks,
            plan.n_kblocks, float(call.scale), tab.prefix, tab.grid_end, tab.sinks, *self._table_args(tab, "kv"),
            NDIM=tab.ndim, CAUSAL=bool(call.is_causal), HAS_MASK=call.mask is not None,
            HAS_BIAS=call.bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_pow2(d),
            BLOCK_DV=_pow2(dv), VISIT=record, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
            FOLD=_can_fold(call), **self._addressing(tab), **_softcap(call), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return out, lse

    def _tma_unfit(self, call: AttentionCall, tab: KernelTables) -> str | None:
        """Why ``attn_fwd_tma`` cannot run this call (None: it can)."""
        if tab.has_partial:  # all full: no padding in any block, so every spatial tile fills its block
            return "the plan has partial blocks"
        if tab.per_bh:
            return "per-head tables"
        if call.mask is not None or call.bias is not None:
            return "site mask or bias"
        if call.softcap:
            return "softcap (score modifier)"
        if not _can_fold(call):
            return f"scale {call.scale} (FOLD needs >= 1e-30)"
        if self.tables_only or not tab.q_addr or not tab.k_addr:
            return "slot tables (TMA needs computed addressing)"
        if call.q.device.type == "cuda" and torch.cuda.get_device_capability(call.q.device)[0] < 9:
            return "no TMA before sm_90"
        for name, x in (("q", call.q), ("k", call.k), ("v", call.v)):
            if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * x.element_size() % 16 for st in x.stride()[:-1]):
                return f"{name} is not TMA-aligned (last stride 1, other strides and base 16-byte multiples)"
            if tab.ndim == 3 and x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1):
                return f"{name}'s batch and head axes do not merge (a 3-D grid descriptor has 5 axes at most)"
        return None

    def _forward_tma(self, call: AttentionCall, cfg: KernelConfig, tab: KernelTables, out, lse, visits,
                     record: bool) -> None:
        q, k, v = call.q, call.k, call.v
        b, hq, s_q, d = q.shape
        hk, dv = k.shape[1], v.shape[-1]
        plan = tab.plan
        bd, bdv = _pow2(d), _pow2(dv)
        bump("triton_launch", "fwd")
        descs = (_tma_descriptor(q, tab.q_addr, tab.ndim, tab.grid, cfg.block_m, bd),
                 _tma_descriptor(k, tab.k_addr, tab.ndim, tab.grid, cfg.block_n, bd),
                 _tma_descriptor(v, tab.k_addr, tab.ndim, tab.grid, cfg.block_n, bdv))
        ws_key = (q.dtype, d, dv, tab.q_addr, tab.k_addr, tab.ndim, tab.ranges, cfg, _device_key(q.device))

        def launch(ws: bool):
            return _kernels().attn_fwd_tma[(plan.n_qblocks, b * hq)](
                *descs, out, lse, tab.kv_ptr, tab.kv_split, tab.kv_idx, tab.kv_rng, visits,
                *out.stride(), *lse.stride(), hq, hk, hq // hk, dv, s_q, *tab.grid, plan.n_qblocks,
                plan.n_kblocks, float(call.scale), NDIM=tab.ndim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_D=bd, BLOCK_DV=bdv, VISIT=record, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
                QADDR=tab.q_addr, KADDR=tab.k_addr, RANGES=tab.ranges, WS=ws, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)

        if cfg.ws and ws_key not in _WS_REFUSED:
            try:
                self.compiled["fwd"] = launch(True)
                self.launched["fwd"] = "attn_fwd_tma+ws"
                return
            except Exception as e:  # the compiler's warp specialization refuses the loop (version-dependent)
                _WS_REFUSED.add(ws_key)
                bump("triton_ws_failed", f"{type(e).__name__}: {str(e)[:80]}")
                log.info("locattn triton: warp specialization refused for %s (%s); running without", cfg, e)
        self.compiled["fwd"] = launch(False)
        self.launched["fwd"] = "attn_fwd_tma"

    # -- backward ---------------------------------------------------------------------------------------------
    def backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 need_dbias: bool):
        with _on_device(call.q.device):
            return self._backward(call, grad_out, out, lse, need_dbias)

    def _backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  need_dbias: bool):
        grad_out = grad_out.to(call.q.dtype)
        ld = self.backward_inputs(call, grad_out, out, lse)
        want_dbias = need_dbias and call.bias is not None
        args = (call, grad_out, ld)
        # dQ and dK/dV are independent kernels over their own plans: each gets its own tiles
        cfg = self._config(call, "dq", lambda c: self._dq(*args, c, False))
        dq = self._dq(*args, cfg, self.record_visits)
        cfg = self._config(call, "dkdv", lambda c: self._dkdv(*args, want_dbias, c, False))
        dk, dvv, dbias = self._dkdv(*args, want_dbias, cfg, self.record_visits)
        db = reduce_to(dbias, call.bias.shape).to(call.bias.dtype) if want_dbias else None
        return dq, dk, dvv, db

    def backward_inputs(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
                        ) -> torch.Tensor:
        """What the dQ and dK/dV kernels read besides q/k/v/dO: ``ld`` fp32 [B, H, S_q, 2], per query row
        ``ld[..., 0]`` = lse2, the forward's lse in log2 units with empty rows at +inf, and ``ld[..., 1]`` =
        delta = rowsum(dO * O) (``attn_bwd_preprocess``). ``grad_out`` in the inputs' dtype."""
        b, hq, s_q, _ = call.q.shape
        dv = call.v.shape[-1]
        lse = lse.float().contiguous()
        ld = self._empty(b, hq, s_q, 2, dtype=torch.float32, device=lse.device)
        pre_m = 32 if interpreted() else 64
        _kernels().attn_bwd_preprocess[(triton_cdiv(s_q, pre_m), b * hq)](
            out, grad_out, ld, lse, *out.stride(), *grad_out.stride(), hq, s_q, dv,
            BLOCK_M=pre_m, BLOCK_DV=_pow2(dv))
        return ld

    def _addressing(self, tab: KernelTables) -> dict:
        off = self.tables_only
        return dict(QADDR=0 if off else tab.q_addr, KADDR=0 if off else tab.k_addr,
                    RANGES=tab.ranges and not off, HAS_GLOBALS=tab.has_globals, HAS_PARTIAL=tab.has_partial,
                    WINDOW_ONLY=tab.window_only and self.window_only, NOPAD=tab.nopad if self.nopad else 0,
                    PER_BH=tab.per_bh, DYN=tab.dyn, DYN_CAUSAL=tab.dyn_causal)

    @staticmethod
    def _table_args(tab: KernelTables, side: str) -> tuple:
        """``q_off, head_map, tab_sb, ptr_st, idx_st, iv_st`` of a launch walking the ``"kv"`` or ``"qb"``
        tables (a dummy head map when the tables are shared)."""
        st = tab.kv_st if side == "kv" else tab.qb_st
        hm = tab.head_map if tab.head_map is not None else tab.q_slots
        return tab.q_off, hm, tab.tab_sb, st[0], st[1], tab.iv_st

    def _bwd_common(self, call, tab: KernelTables, cfg: KernelConfig, record: bool) -> dict:
        d, dv = call.q.shape[-1], call.v.shape[-1]
        return dict(NDIM=tab.ndim, CAUSAL=bool(call.is_causal), HAS_MASK=call.mask is not None,
                    HAS_BIAS=call.bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), VISIT=record, PRECISION=_precision(call.q.dtype),
                    UPCAST=_upcast(call.q.dtype), **self._addressing(tab), **_softcap(call), num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)

    def _dq(self, call, grad_out, ld, cfg: KernelConfig, record: bool) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        b, hq, s_q, d = q.shape
        hk, s_k, dv = k.shape[1], k.shape[2], v.shape[-1]
        tab = self._tables(call, cfg)
        plan = tab.plan
        full = (b, hq, s_q, s_k)
        mask, ms = _site_tensor(call.mask, full, tab.q_slots)
        bias, bs = _site_tensor(call.bias, full, tab.q_slots)
        dq = self._empty(b, hq, s_q, d, dtype=q.dtype, device=q.device)
        visits = self._visits("dq", tab, b * hq, q.device) if record else tab.q_slots
        bump("triton_launch", "dq")
        self.compiled["dq"] = _kernels().attn_bwd_dq[(plan.n_qblocks, b * hq)](
            q, k, v, grad_out, ld, dq, mask, bias,
            tab.q_slots, tab.k_slots, tab.q_iv, tab.k_u, tab.kv_ptr, tab.kv_split, tab.kv_idx,
            tab.kv_rng, visits,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *ms, *bs,
            hq, hq // hk, s_q, d, dv, s_q, s_k, *tab.grid, plan.q_slots.numel(), plan.k_slots.numel(),
            plan.n_qblocks, plan.n_kblocks, float(call.scale), tab.prefix, tab.grid_end, tab.sinks,
            *self._table_args(tab, "kv"), FOLD=_can_fold(call), **self._bwd_common(call, tab, cfg, record))
        return dq

    def _dkdv(self, call, grad_out, ld, want_dbias: bool, cfg: KernelConfig, record: bool):
        q, k, v = call.q, call.k, call.v
        b, hq, s_q, d = q.shape
        hk, s_k, dv = k.shape[1], k.shape[2], v.shape[-1]
        dev = q.device
        tab = self._tables(call, cfg)
        plan = tab.plan
        full = (b, hq, s_q, s_k)
        mask, ms = _site_tensor(call.mask, full, tab.q_slots)
        bias, bs = _site_tensor(call.bias, full, tab.q_slots)
        # every visited (q, k) pair is stored exactly once; unvisited pairs must read as zero
        dbias = torch.zeros(full if want_dbias else (1, 1, 1, 1), dtype=torch.float32, device=dev)
        dk = self._empty(b, hk, s_k, d, dtype=k.dtype, device=dev)
        dvv = self._empty(b, hk, s_k, dv, dtype=v.dtype, device=dev)
        visits = self._visits("dkdv", tab, b * hq, dev) if record else tab.q_slots
        bump("triton_launch", "dkdv")
        self.compiled["dkdv"] = _kernels().attn_bwd_dkdv[(plan.n_kblocks, b * hk)](
            q, k, v, grad_out, ld, dk, dvv, dbias, mask, bias,
            tab.q_slots, tab.k_slots, tab.q_iv, tab.k_u, tab.qb_ptr, tab.qb_split, tab.qb_idx,
            tab.qb_rng, visits,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *ms, *bs, *dk.stride(), *dvv.stride(),
            *dbias.stride(),
            hq, hk, hq // hk, s_q, d, dv, s_q, s_k, *tab.grid, plan.q_slots.numel(), plan.k_slots.numel(),
            plan.n_qblocks, plan.n_kblocks, float(call.scale), tab.prefix, tab.grid_end, tab.sinks,
            *self._table_args(tab, "qb"), NEED_DBIAS=want_dbias, **self._bwd_common(call, tab, cfg, record))
        return dk, dvv, dbias


def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device and stream: make it the tensors' device (tensors on cuda:1
    while cuda:0 is current would otherwise be read by a kernel on cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: (dtype, head dims, addressing, config, device) whose warp-specialized TMA forward the compiler refused
_WS_REFUSED: set[tuple] = set()


def _device_key(device: torch.device) -> tuple:
    return ("cuda", torch.cuda.get_device_capability(device)) if device.type == "cuda" else (device.type,)


def grid_tile(addr: int, ndim: int) -> tuple[int, ...]:
    """The spatial tile of a GRID addressing code (the inverse of :func:`grid_code`)."""
    return tuple(1 << ((addr >> (4 * a)) & 15) for a in range(ndim))


def _tile_size(addr: int, ndim: int) -> int:
    """Slots of the spatial tile of a GRID addressing code."""
    return math.prod(grid_tile(addr, ndim))


def _tma_descriptor(x: torch.Tensor, addr: int, ndim: int, grid: tuple[int, int, int], block: int, block_d: int):
    """Tensor descriptor over ``x`` [B, H, S, D] whose [block, block_d] tiles are the kernel's blocks
    (``triton_kernels._tma_tile``): LINEAR ``[B, H, S, D]`` in runs of ``block`` tokens; GRID 2-D
    ``[B, H, g0, g1, D]`` and GRID 3-D ``[B * H, g0, g1, g2, D]`` in spatial tiles (the tile sides are in
    ``addr``). Out-of-bounds rows and columns read as zero."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bsz, h, s, d = x.shape
    sb, sh, ss, sd = x.stride()
    if addr == 1:
        return TensorDescriptor(x, [bsz, h, s, d], [sb, sh, ss, sd], [1, 1, block, block_d])
    tile = list(grid_tile(addr, ndim))
    g = list(grid[:ndim])
    gs = [ss * math.prod(g[a + 1:]) for a in range(ndim)]  # row-major token strides of the grid axes
    if ndim == 2:
        return TensorDescriptor(x, [bsz, h, *g, d], [sb, sh, *gs, sd], [1, 1, *tile, block_d])
    return TensorDescriptor(x, [bsz * h, *g, d], [sh, *gs, sd], [1, *tile, block_d])


def _can_fold(call: AttentionCall) -> bool:
    """FOLD (forward): no site bias, no soft cap (it needs the scaled score), and a scale that stays a normal
    positive fp32 number in the kernel (a scale that underflows to 0 would turn the masked scores' -inf x 0 into
    NaN; the plain path handles it)."""
    return call.bias is None and not call.softcap and call.scale >= 1e-30


def _softcap(call: AttentionCall) -> dict:
    """The ``SOFTCAP`` constexpr, passed only when the call has a cap: uncapped launches keep the exact constexpr
    set (and cache entries) they had."""
    return {"SOFTCAP": float(call.softcap)} if call.softcap else {}


def _untuned_default(space: list[KernelConfig], run, fit_key: tuple, capturing: bool) -> KernelConfig:
    """The tile of a kernel without tuned tiles: the first of ``space`` that launches on this GPU, probed once per
    ``fit_key`` (tuning key + padded head dims) and kept in ``_FITS``. While a CUDA graph is being captured
    nothing may launch outside it, so an unprobed key gets ``SMALLEST_CONFIG`` (it fits any GPU), counted, and is
    probed at its first call outside a capture."""
    if fit_key in _FITS:
        return _FITS[fit_key]
    if capturing:
        bump("triton_capture_default", f"{fit_key[0]} d{fit_key[1]} {fit_key[4]}")
        return SMALLEST_CONFIG
    _FITS[fit_key] = _first_that_fits(space, run, fit_key)
    return _FITS[fit_key]


def _first_that_fits(space: list[KernelConfig], run, key: tuple) -> KernelConfig:
    """The untuned default: the first tile of ``space`` this GPU can launch. Larger tiles come first (they
    suit H100/H200-class shared memory); a GPU with less shared memory per block (consumer cards, 99 KB)
    refuses them at launch with Triton's ``OutOfResources``, counted, and takes the next one. Each probe runs
    the kernel once, at the first call per tuning key only. The result is kept for the process (not on disk).
    """
    from triton.runtime.errors import OutOfResources, PTXASError

    for cfg in [*space, SMALLEST_CONFIG]:  # the smallest tile last: fp32 at head dim 256 on a 99 KB GPU
        try:
            run(cfg)
            return cfg
        except (OutOfResources, PTXASError) as e:
            bump("triton_tile_too_large", f"{key[0]} d{key[1]} {key[4]} {cfg}")
            log.info("locattn triton: %s does not fit this GPU (%s), trying the next tile", cfg, e)
            err = e
    raise err


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow eager matmuls: exact fp32 unless the user allowed TF32; fp16/bf16 ignore the argument
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot multiplies bf16 storage (uint16) as integers: give it fp32 copies
    return dtype == torch.bfloat16 and interpreted()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Triton", "KernelConfig", "KernelTables", "kernel_tables", "CONFIG_SPACE", "INTERPRET_CONFIG"]
