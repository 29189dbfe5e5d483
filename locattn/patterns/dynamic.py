"""``dynamic``: content-dependent block sparsity (MoBA / XAttention / SpargeAttn-style top-p block selection).

Tokens of the grid part are grouped into **blocks**: ``block`` consecutive tokens on a 1-D sequence, or spatial
``tile`` s on a grid (tiles row-major over the tile grid, tokens row-major inside a tile; border tiles are cut
by the grid). Global tokens (prefix / suffix) belong to no block.

Per (batch, query head), on every call:

* ``q̄_I`` / ``k̄_J`` are the means of q / k over the tokens of block I / J present in the call (GQA: ``k̄`` of
  the query head's kv head); ``s_IJ = scale · q̄_I · k̄_J`` over the key blocks allowed for I (``causal``:
  blocks J holding a key token ``<=`` some query token of I; else all), ``P_I = softmax_J(s_IJ)``;
* query block I keeps the smallest set of allowed key blocks, in decreasing ``P_I`` order (ties: lower J
  first), whose mass reaches ``top_p`` (``top_p >= 1``: every allowed block), clamped to at least
  ``min_blocks`` and at most ``max_blocks`` (and to the allowed count); its own block (the diagonal) is
  always kept as well, even when it lies past ``max_blocks`` in that order.

Query i attends key j iff block(j) is kept for block(i) (and ``j <= i`` when ``causal``), or ``base`` allows
(i, j), or j is a sink, or i or j is a global token — and the site's own mask and causality allow it.
``base`` is a static pattern on the same layout (e.g. a sliding window) with its own parameters. The
selection is not differentiated: gradients flow through the attention over the selected keys only.

The selection costs ``O((S / block)^2 · D)`` per head, computed batched on the tensors' device, with no
host synchronisation and no ``S x S`` tensor (:func:`select_blocks`).

Example: ``block = 64, top_p = 0.9`` on a 1-D sequence of 4096 tokens: 64 blocks, each query block keeps the
few key blocks holding 90 % of its pooled attention mass, plus its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Layout, Pattern, PatternError


@dataclass(frozen=True)
class Empty(Pattern):
    """The static part of a ``dynamic`` pattern without ``base``: no grid pair (sinks and globals still apply)."""

    name: ClassVar[str] = "empty"
    params: ClassVar[dict] = {}

    def key_interval(self, axis, ndim, p, n):
        return torch.ones_like(p), torch.zeros_like(p)  # lo > hi: the empty interval


@dataclass(frozen=True)
class Dynamic(Pattern):
    """``block`` (1-D pooling block, tokens), ``tile`` (grid pooling tile per axis; default: a power-of-two
    tile of ``block`` tokens), ``top_p`` in (0, 1], ``min_blocks``, ``max_blocks`` (0 = no cap), ``base``
    (a static pattern always kept, or None) and ``causal``."""

    block: int = 64
    tile: int | tuple[int, ...] = 0
    top_p: float = 0.9
    min_blocks: int = 1
    max_blocks: int = 0
    base: Pattern | None = None
    causal: bool = False

    name: ClassVar[str] = "dynamic"
    params: ClassVar[dict] = {"block": (int, False, 1), "tile": (int, True, 0), "top_p": (float, False, None),
                              "min_blocks": (int, False, 1), "max_blocks": (int, False, 0),
                              "base": (Pattern, False, None), "causal": (bool, False, None)}
    dynamic: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.top_p <= 1.0:
            raise PatternError(f"dynamic: 'top_p' must be in (0, 1], got {self.top_p}", key="top_p")
        if self.max_blocks and self.min_blocks > self.max_blocks:
            raise PatternError(f"dynamic: 'min_blocks' {self.min_blocks} exceeds 'max_blocks' {self.max_blocks}",
                               key="min_blocks")
        if self.base is not None and (not self.base.local or getattr(self.base, "dynamic", False)):
            raise PatternError(f"dynamic: 'base' must be a static local pattern, got {self.base.name!r}", key="base")

    @property
    def static(self) -> Pattern:
        """The part of the pattern that does not depend on the content: ``base`` or :class:`Empty`."""
        return self.base if self.base is not None else Empty()

    def tile_for(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The pooling tile on ``grid``: ``(block,)`` on 1-D, else ``tile`` or a power-of-two tile of ``block``
        tokens grown from the last axis (like the kernels' spatial tiles)."""
        if len(grid) == 1:
            t = self.axis_param("tile", 1)[0]
            return (t if t else self.block,)
        t = self.axis_param("tile", len(grid))
        if all(t):
            return tuple(t)
        from .plan import choose_tile  # noqa: PLC0415 (plan imports patterns)
        return choose_tile(grid, self.block)

    def block_tokens(self, grid: tuple[int, ...]) -> int:
        return math.prod(self.tile_for(grid))

    def dilation_of(self, axis, ndim):
        return 1

    def validate(self, grid):
        if self.causal and len(grid) > 1:
            raise PatternError("dynamic: 'causal' needs a 1-D sequence (a grid's tiles have no token order)",
                               key="causal")
        t = self.axis_param("tile", len(grid))
        if any(t) and not all(t):
            raise PatternError(f"dynamic: 'tile' needs a size for every axis of the grid {list(grid)}, got {list(t)}")
        for a, n in enumerate(grid):
            if t[a] > n:
                raise PatternError(f"dynamic: tile {t[a]} on axis {a} exceeds the axis size {n}")
        if self.base is not None:
            self.base.validate(grid)

    def key_interval(self, axis, ndim, p, n):  # pragma: no cover - the content decides
        raise AssertionError("dynamic has no static window; use .static")

    def to_params(self) -> dict:
        d = super().to_params()
        d["base"] = None if self.base is None else {"pattern": self.base.name, **self.base.to_params()}
        return d

    def describe(self) -> str:
        t = self.tile if isinstance(self.tile, tuple) else (self.tile,)
        ps = [f"tile={'x'.join(map(str, t))}" if any(t) else f"block={self.block}"]
        ps.append(f"top_p={self.top_p:g}")
        if self.min_blocks != 1:
            ps.append(f"min_blocks={self.min_blocks}")
        if self.max_blocks:
            ps.append(f"max_blocks={self.max_blocks}")
        if self.causal:
            ps.append("causal=True")
        if self.base is not None:
            ps.append(f"base={self.base.describe()}")
        return f"dynamic({', '.join(ps)})"


# ----------------------------------------------------------------------------------------------------------
# the selection


@dataclass(frozen=True, eq=False)
class Blocking:
    """How a resolved layout's grid part splits into pooling blocks, as tensors on the host.

    tokens: [n_blocks, T] token index of every slot of every block (T = tokens per block; -1 past a cut tile),
    blocks in row-major order over the tile grid. tok_min / tok_max: [n_blocks] smallest / largest token."""

    tile: tuple[int, ...]
    tokens: torch.Tensor
    tok_min: torch.Tensor
    tok_max: torch.Tensor
    token_block: torch.Tensor  # [seq_len] block id of every token, -1 for global tokens

    @property
    def n_blocks(self) -> int:
        return self.tokens.shape[0]


_BLOCKINGS: dict = {}


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host table ``t`` (from a cached :class:`Blocking`) on ``device``, copied once: the per-call path does no
    host-to-device copy (legal inside a CUDA-graph capture, no synchronisation)."""
    device = torch.device(device)
    if t.device == device:
        return t
    key = ("dev", id(t), device)
    hit = _BLOCKINGS.get(key)
    if hit is None or hit[0] is not t:
        hit = _BLOCKINGS[key] = (t, t.to(device))
    return hit[1]


def blocking(pattern: Dynamic, layout: Layout) -> Blocking:
    """The pooling blocks of ``layout``'s grid part (cached). ``layout`` must be resolved."""
    key = (pattern.tile_for(layout.grid), layout.grid, layout.prefix, layout.suffix)
    hit = _BLOCKINGS.get(key)
    if hit is not None:
        return hit
    tile, grid = key[0], layout.grid
    n_tiles = [-(-n // t) for n, t in zip(grid, tile)]
    tok = torch.zeros(*n_tiles, *tile, dtype=torch.long)
    valid = torch.ones(*n_tiles, *tile, dtype=torch.bool)
    nd, stride = len(grid), 1
    for a in reversed(range(nd)):
        c = torch.arange(n_tiles[a])[:, None] * tile[a] + torch.arange(tile[a])[None, :]  # [nt, t]
        view = [1] * (2 * nd)
        view[a], view[nd + a] = n_tiles[a], tile[a]
        tok = tok + c.view(view) * stride
        valid = valid & (c < grid[a]).view(view)
        stride *= grid[a]
    tok = torch.where(valid, tok + layout.prefix, -1).reshape(math.prod(n_tiles), math.prod(tile))
    big = torch.iinfo(torch.long).max
    token_block = torch.full((layout.seq_len,), -1, dtype=torch.long)
    valid = tok >= 0
    token_block[tok[valid]] = torch.arange(tok.shape[0])[:, None].expand_as(tok)[valid]
    out = Blocking(tile, tok, torch.where(valid, tok, big).amin(1), tok.amax(1), token_block)
    if len(_BLOCKINGS) > 256:
        _BLOCKINGS.clear()
    _BLOCKINGS[key] = out
    return out


def pooled(x: torch.Tensor, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Means of ``x [B, H, S, D]`` over the tokens of each block (``tokens [NB, T]``, -1 = none; row
    ``t - offset`` holds token t, rows outside ``[0, S)`` are absent): ``[B, H, NB, D]`` in fp32 (fp64 for fp64
    ``x``). A block with no token present pools to 0."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    nb, t = tokens.shape
    if offset == 0 and tokens[0, 0] >= 0 and nb * t == x.shape[2] - int(tokens[0, 0]) and \
            torch.equal(tokens.flatten(), torch.arange(int(tokens[0, 0]), x.shape[2])):
        # consecutive blocks filling the end of the sequence: a view (1-D sequences)
        return x[:, :, int(tokens[0, 0]):].reshape(*x.shape[:2], nb, t, x.shape[-1]).to(ct).mean(3)
    rows = on_device(tokens, x.device) - offset
    present = (rows >= 0) & (rows < x.shape[2])  # a padding token (-1) lands below 0
    g = x.index_select(2, rows.clamp(0, max(x.shape[2] - 1, 0)).reshape(-1)).to(ct)
    g = g.view(*x.shape[:2], *rows.shape, x.shape[-1]) * present[..., None].to(ct)
    cnt = present.sum(1).clamp_min(1).to(ct)
    return g.sum(3) / cnt[:, None]


def select_blocks(pattern: Dynamic, layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float,
                  q_offset: int = 0) -> torch.Tensor:
    """The kept key blocks of every query block: bool ``[B, Hq, NB, NB]`` (``kept[b, h, I, J]``), on q's device.

    q: [B, Hq, S_q, D] whose row r is token ``q_offset + r`` of ``layout`` (resolved over the keys' length);
    k: [B, Hk, S_k, D] (Hq % Hk == 0). Batched, no host synchronisation, no S x S tensor."""
    bl = blocking(pattern, layout)
    b, hq, _, d = q.shape
    hk = k.shape[1]
    dev = q.device
    qb = pooled(q, bl.tokens, q_offset)                                   # [B, Hq, NB, D]
    kb = pooled(k, bl.tokens)                                             # [B, Hk, NB, D]
    nb = bl.n_blocks
    s = (qb.view(b, hk, hq // hk, nb, d) @ kb.view(b, hk, 1, nb, d).transpose(-2, -1)).view(b, hq, nb, nb) * scale
    allowed = torch.ones(nb, nb, dtype=torch.bool, device=dev)
    if pattern.causal:
        allowed = on_device(bl.tok_min, dev)[None, :] <= on_device(bl.tok_max, dev)[:, None]
    diag = torch.eye(nb, dtype=torch.bool, device=dev)
    if pattern.top_p >= 1.0 and pattern.max_blocks == 0:
        return (allowed | diag).expand(b, hq, nb, nb).clone()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ps, -1) - ps                                    # mass of the blocks ranked before
    n = (before < pattern.top_p).sum(-1, keepdim=True) if pattern.top_p < 1.0 else \
        torch.full_like(before[..., :1], nb, dtype=torch.long)
    n_allowed = allowed.sum(-1, keepdim=True)
    n = torch.minimum(n.clamp_min(pattern.min_blocks), n_allowed)
    if pattern.max_blocks:
        n = n.clamp_max(pattern.max_blocks)
    take = torch.arange(nb, device=dev) < n                               # in sorted order
    kept = torch.zeros_like(take).scatter_(-1, order, take)
    return (kept & allowed) | diag


def block_pairs_allowed(pattern: Dynamic, layout: Layout, kept: torch.Tensor, qi: torch.Tensor,
                        kj: torch.Tensor) -> torch.Tensor:
    """The dynamic part of the predicate for token indices ``qi [..., M, 1]`` / ``kj [..., 1, N]`` (global
    tokens belong to no block: False) given ``kept [B, H, NB, NB]``: ``[B, H, ..., M, N]`` bool."""
    blk = token_blocks(pattern, layout, kept.device)
    bq, bk = blk[qi.clamp(0, blk.numel() - 1)], blk[kj.clamp(0, blk.numel() - 1)]
    ok = (bq >= 0) & (bk >= 0)
    nb = kept.shape[-1]
    flat = kept.reshape(*kept.shape[:2], nb * nb)
    idx = (bq.clamp_min(0) * nb + bk.clamp_min(0))
    shape = torch.broadcast_shapes(idx.shape)
    sel = flat[:, :, idx.reshape(-1)].reshape(*kept.shape[:2], *shape) & ok
    if pattern.causal:
        sel = sel & (kj <= qi)
    return sel


def token_blocks(pattern: Dynamic, layout: Layout, device=None) -> torch.Tensor:
    """Block id of every token of the sequence (``[layout.seq_len]``, -1 for global tokens), cached per device."""
    bl = blocking(pattern, layout)
    return bl.token_block if device is None else on_device(bl.token_block, device)
