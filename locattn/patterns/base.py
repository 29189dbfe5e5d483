"""What a pattern is: a separable, per-axis interval predicate over token coordinates.

Every local pattern of locattn is *separable*: query ``i`` may attend key ``j`` iff on every grid axis the
key's coordinate lies in an interval that depends only on the query's coordinate on that axis. Dilation is
folded in by re-ordering each axis into its dilation groups ("u-space"): coordinate ``c`` with dilation ``d``
lives in group ``g = c % d`` at position ``p = c // d``, and u-space lists group 0, then group 1, ...
In u-space every pattern's key set is one closed interval ``[lo(u), hi(u)]`` per axis, which is what lets
the block plan (:mod:`locattn.patterns.plan`) be derived analytically, the density be counted in O(S), and
the kernels test membership with two comparisons.

A pattern module defines one :class:`Pattern` subclass with

* typed parameters (dataclass fields; per-axis ones are tuples, one entry per grid axis),
* ``key_interval(axis, ndim, p, n) -> (lo, hi)``: the group-local key interval (inclusive) for group positions
  ``p`` on a group of ``n`` positions — the whole meaning of the pattern,
* ``dilation_of(axis)`` (1 unless the pattern dilates) and ``validate(grid)``.

Modifiers shared by all patterns live in :class:`Layout`: the token ``grid`` (row-major), ``prefix`` /
``suffix`` global tokens (attend to and are attended by everything) and ``sinks`` (the first N keys are
attended by every query).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class PatternError(ValueError):
    """A pattern's parameters are invalid, or do not fit a site's token layout. ``key``: the parameter at fault
    (the policy loader names it with the file and line), when known."""

    def __init__(self, msg: str, key: str | None = None):
        super().__init__(msg)
        self.key = key


# ----------------------------------------------------------------------------------------------------------
# Layout: how a sequence is split into global tokens and a row-major grid


@dataclass(frozen=True)
class Layout:
    """Token layout of one self-attention sequence: ``[prefix globals][row-major grid][suffix globals]``.

    ``grid`` is ``None`` for a 1-D pattern over the whole non-global sequence; :meth:`resolve` fixes it from
    the runtime length. ``sinks`` counts keys ``0..sinks-1`` (token indices) that every query attends.
    """

    grid: tuple[int, ...] | None = None
    prefix: int = 0
    suffix: int = 0
    sinks: int = 0

    def __post_init__(self):
        for name in ("prefix", "suffix", "sinks"):
            if getattr(self, name) < 0:
                raise PatternError(f"layout {name} must be >= 0, got {getattr(self, name)}")
        if self.grid is not None and any(g < 1 for g in self.grid):
            raise PatternError(f"layout grid sizes must be >= 1, got {self.grid}")

    def resolve(self, seq_len: int) -> "Layout":
        """Return the layout with a concrete grid for a sequence of ``seq_len`` tokens (checks the sizes)."""
        n_grid = seq_len - self.prefix - self.suffix
        if n_grid < 1:
            raise PatternError(
                f"sequence of {seq_len} tokens is too short for {self.prefix} prefix + {self.suffix} suffix globals")
        if self.grid is None:
            return dataclasses.replace(self, grid=(n_grid,))
        prod = 1
        for n in self.grid:
            prod *= n
        if prod != n_grid:
            raise PatternError(
                f"grid {'x'.join(map(str, self.grid))} has {prod} tokens (+{self.prefix + self.suffix} globals = "
                f"{prod + self.prefix + self.suffix}) but the sequence has {seq_len} tokens")
        return self

    @property
    def n_grid(self) -> int:
        assert self.grid is not None, "resolve() the layout first"
        prod = 1
        for n in self.grid:
            prod *= n
        return prod

    @property
    def seq_len(self) -> int:
        return self.prefix + self.n_grid + self.suffix


# ----------------------------------------------------------------------------------------------------------
# Dilation groups ("u-space") of one axis


def dilation_groups(c: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split axis coordinates ``c`` (int64, values in ``[0, n)``) into dilation groups.

    Returns ``(offset, p, n_g)``-style tensors ``(u, offset, p, n_g)``: the u-space position, the u-space
    offset of the coordinate's group, its position inside the group and the group's size. Groups
    ``0 .. n % d - 1`` hold ``n // d + 1`` positions, the others ``n // d``.
    """
    if d == 1:
        zero = torch.zeros_like(c)
        return c, zero, c, torch.full_like(c, n)
    q, r = divmod(n, d)
    g = c % d
    p = c // d
    n_g = q + (g < r).to(c.dtype)
    offset = g * q + torch.minimum(g, torch.full_like(g, r))
    return offset + p, offset, p, n_g


def u_to_coord(u: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Inverse of :func:`dilation_groups`: u-space positions back to axis coordinates."""
    if d == 1:
        return u
    q, r = divmod(n, d)
    big = r * (q + 1)
    in_big = u < big
    g_big, p_big = u // (q + 1), u % (q + 1)
    if q > 0:
        g_small, p_small = r + (u - big) // q, (u - big) % q
    else:  # n < d: every group has one position and all are "big"
        g_small, p_small = g_big, p_big
    g = torch.where(in_big, g_big, g_small)
    p = torch.where(in_big, p_big, p_small)
    return g + p * d


# ----------------------------------------------------------------------------------------------------------
# Patterns


def _per_axis(value: Any, ndim: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise PatternError(f"'{name}' has {len(value)} entries but the grid has {ndim} axes")
        return tuple(value)
    return (value,) * ndim


@dataclass(frozen=True)
class Pattern:
    """Base of all patterns. Subclasses are frozen dataclasses whose fields are the pattern's parameters.

    Per-axis parameters are stored as given (an int/bool or a tuple); :meth:`axis_param` broadcasts them to
    the grid's rank. ``name`` is the key used in policy files.
    """

    name: ClassVar[str] = ""
    #: parameter name -> (python type of one entry, per-axis?, minimum value or None)
    params: ClassVar[dict[str, tuple[type, bool, int | None]]] = {}
    #: False for ``dense`` only: a local pattern needs a self-attention site (S_q == S_k) and a grid
    local: ClassVar[bool] = True
    #: True for content-dependent patterns (``dynamic``): the allowed pairs depend on q and k, chosen per call
    dynamic: ClassVar[bool] = False

    def __post_init__(self):
        """The minimum of every parameter (``params``), checked at construction: the policy checks it with file
        and line, this guards patterns built in code or parsed from an op's spec."""
        for name, (_, _, minimum) in self.params.items():
            value = getattr(self, name)
            for x in value if isinstance(value, (list, tuple)) else (value,):
                if minimum is not None and not isinstance(x, bool) and isinstance(x, int) and x < minimum:
                    raise PatternError(f"{self.name}: '{name}' must be >= {minimum}, got {value}", key=name)

    @property
    def causal_rule(self) -> bool:
        """Whether the pattern is causal on every axis (``causal = true``): on a 1-D site whose queries are fewer
        than its keys (an LM decoding with a KV cache), the queries are then the last S_q of the S_k positions
        (bottom-right alignment, FlashAttention's convention) rather than a cross-attention."""
        c = getattr(self, "causal", False)
        return all(c) if isinstance(c, tuple) else bool(c)

    # -- per-axis helpers ----------------------------------------------------------------------------------
    def axis_param(self, name: str, ndim: int) -> tuple:
        return _per_axis(getattr(self, name), ndim, name)

    def dilation_of(self, axis: int, ndim: int) -> int:
        return 1

    def validate(self, grid: tuple[int, ...]) -> None:
        """Raise :class:`PatternError` if the pattern does not fit ``grid`` (arity, sizes)."""
        for name, (_, per_axis, _) in self.params.items():
            if per_axis:
                self.axis_param(name, len(grid))

    def key_interval(self, axis: int, ndim: int, p: torch.Tensor, n: torch.Tensor | int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusive key interval ``[lo, hi]`` (group positions) seen by queries at group positions ``p``.

        ``n`` is the size of each query's dilation group (a tensor like ``p`` or an int).
        """
        raise NotImplementedError

    # -- derived: u-space bounds of one axis -----------------------------------------------------------------
    def axis_bounds(self, axis: int, grid: tuple[int, ...], c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u-space key interval ``[lo, hi]`` for query coordinates ``c`` on ``axis`` (``c``: int64 tensor)."""
        d = self.dilation_of(axis, len(grid))
        _, offset, p, n_g = dilation_groups(c, grid[axis], d)
        lo, hi = self.key_interval(axis, len(grid), p, n_g)
        return offset + lo, offset + hi

    # -- sequence parallelism: exact sub-ranges of one axis (locattn.parallel) --------------------------------
    def reach(self, axis: int, ndim: int) -> tuple[int, int] | None:
        """``(left, right)``: how many positions before / after a query on ``axis`` its keys can lie, windows
        shifted inward at the borders aside (those are covered by :meth:`halo`); ``None``: anywhere (dense)."""
        return None

    def halo(self, axis: int, ndim: int, n: int, r0: int, r1: int) -> tuple[int, int]:
        """``[e0, e1) ⊇ [r0, r1)``: positions of ``axis`` (of ``n``) on which this pattern, run alone on the grid
        cut to them (with :meth:`on_subrange`), gives every query of ``[r0, r1)`` exactly the keys it has on the
        whole axis. The queries of the added positions (the halo) are computed and discarded.

        The default (any pattern with a :meth:`reach`): the reach, clipped to the axis and widened to at least
        :meth:`min_extent` positions, so that a window shifted inward at a border (which a query near it has
        only when the cut reaches that border) stays inside. Dilation needs no alignment: a cut keeps each
        dilation group a contiguous run of it, and a window clamped at a group's first (last) position can
        only be a query's whose reach already spans that position. Patterns anchored elsewhere (tiles, stride
        groups, shifted windows) override it. :func:`subrange_exact` checks a range; the tests check the rules
        against it on random cases."""
        r = self.reach(axis, ndim)
        if r is None:
            return 0, n
        return fit_range(n, r0 - r[0], r1 + r[1], min_len=self.min_extent(axis, ndim))

    def min_extent(self, axis: int, ndim: int) -> int:
        """The fewest positions of ``axis`` the pattern is defined on (its :meth:`validate` minimum)."""
        return 1

    def align(self, axis: int, ndim: int) -> tuple[int, int]:
        """``(unit, offset)``: positions ``p`` of ``axis`` with ``p % unit == offset % unit`` are where the pattern's
        groups (tiles, stride groups, windows) start; a shard boundary there needs the smallest halo."""
        return 1, 0

    def on_subrange(self, axis: int, ndim: int, e0: int) -> "Pattern":
        """The same pattern on the grid whose ``axis`` starts at position ``e0`` (patterns anchored to positions
        other than the borders move their anchors)."""
        return self

    def to_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def describe(self) -> str:
        ps = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            ps.append(f"{f.name}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}")
        return f"{self.name}({', '.join(ps)})" if ps else self.name


def fit_range(n: int, lo: int, hi: int, start_unit: int = 1, end_unit: int = 1, min_len: int = 1,
              end_from_border: bool = True) -> tuple[int, int]:
    """``[lo, hi)`` clipped to ``[0, n)``, its start rounded down to a multiple of ``start_unit``, its end rounded up
    so that ``n - end`` is a multiple of ``end_unit`` (``end_from_border``) or the end is a multiple of it (or
    ``n``), then widened to ``min_len`` positions (toward the end first)."""
    def start(x):
        return max(x, 0) // start_unit * start_unit

    def end(x):
        x = min(x, n)
        return n - (n - x) // end_unit * end_unit if end_from_border else min(-(-x // end_unit) * end_unit, n)

    e0, e1 = start(lo), end(hi)
    if e1 - e0 < min_len:
        e1 = end(e0 + min_len)
        if e1 - e0 < min_len:
            e0 = start(e1 - min_len)
    return e0, e1


def subrange_exact(pattern: Pattern, grid: tuple[int, ...], axis: int, e0: int, e1: int, r0: int, r1: int) -> str:
    """``""`` if ``pattern.on_subrange(axis, ndim, e0)`` on ``grid`` with ``axis`` cut to ``[e0, e1)`` gives every
    query whose ``axis`` coordinate lies in ``[r0, r1)`` the key set it has on the whole grid, else the first
    difference. Patterns are separable, so only ``axis`` is compared: O(r1 - r0)."""
    ndim, n = len(grid), grid[axis]
    if not (0 <= e0 <= r0 < r1 <= e1 <= n):
        return f"range [{e0}, {e1}) does not hold rows [{r0}, {r1}) inside [0, {n})"
    sub = pattern.on_subrange(axis, ndim, e0)
    sub_grid = grid[:axis] + (e1 - e0,) + grid[axis + 1:]
    try:
        sub.validate(sub_grid)
    except PatternError as e:
        return f"{sub.describe()} does not fit the cut grid {sub_grid}: {e}"

    def coord_bounds(pat, c, size, base):
        d = pat.dilation_of(axis, ndim)
        _, _, p, n_g = dilation_groups(c, size, d)
        lo, hi = pat.key_interval(axis, ndim, p, n_g)
        g = c % d
        return base + g + lo * d, base + g + hi * d, lo > hi

    c = torch.arange(r0, r1)
    lo, hi, empty = coord_bounds(pattern, c, n, 0)
    lo2, hi2, empty2 = coord_bounds(sub, c - e0, e1 - e0, e0)
    bad = (empty != empty2) | (~empty & ((lo != lo2) | (hi != hi2)))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return (f"{pattern.describe()} on axis {axis}: query at {r0 + i} sees [{int(lo[i])}, {int(hi[i])}] on the "
                f"whole axis of {n} but [{int(lo2[i])}, {int(hi2[i])}] on [{e0}, {e1})")
    return ""


# ----------------------------------------------------------------------------------------------------------
# The predicate, evaluated on token indices (used by the reference, the partial-block masks of the CPU path,
# and the pictures). Shapes broadcast: qi [..., M, 1], kj [..., 1, N] -> bool [..., M, N].


def token_coords(t: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Row-major grid coordinates of token indices ``t`` (globals get clamped garbage; mask them yourself)."""
    assert layout.grid is not None
    g = (t - layout.prefix).clamp(0, layout.n_grid - 1)
    coords = []
    for n in reversed(layout.grid):
        coords.append(g % n)
        g = g // n
    return coords[::-1]


def is_global(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    return (t < layout.prefix) | (t >= layout.prefix + layout.n_grid)


def query_bounds(pattern: Pattern, layout: Layout, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per grid axis, the u-space key interval ``(lo, hi)`` of query tokens ``t`` (globals: clamped garbage)."""
    assert layout.grid is not None
    grid = layout.grid
    return [pattern.axis_bounds(a, grid, c) for a, c in enumerate(token_coords(t, layout))]


def key_coords(pattern: Pattern, layout: Layout, t: torch.Tensor) -> list[torch.Tensor]:
    """Per grid axis, the u-space coordinate of key tokens ``t``: key j is in query i's window on an axis iff
    ``lo_i <= u_j <= hi_i`` (globals: clamped garbage)."""
    assert layout.grid is not None
    grid = layout.grid
    return [dilation_groups(c, grid[a], pattern.dilation_of(a, len(grid)))[0]
            for a, c in enumerate(token_coords(t, layout))]


def allowed(pattern: Pattern, layout: Layout, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """Pattern predicate ``allowed[i, j]`` for query tokens ``qi`` and key tokens ``kj`` (broadcasting).

    Does *not* include the site's own mask or ``is_causal``; those are combined by the implementations.
    """
    if not pattern.local:
        return torch.ones(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)
    ok = None
    for (lo, hi), ku in zip(query_bounds(pattern, layout, qi), key_coords(pattern, layout, kj)):
        ax = (ku >= lo) & (ku <= hi)
        ok = ax if ok is None else ok & ax
    ok = ok | is_global(qi, layout) | is_global(kj, layout)
    if layout.sinks:
        ok = ok | (kj < layout.sinks)
    return ok


def dense_mask(pattern: Pattern, layout: Layout, s_q: int, s_k: int, device=None) -> torch.Tensor:
    """The full ``[s_q, s_k]`` boolean mask of a pattern (O(S^2): tests, pictures and tiny sites only)."""
    qi = torch.arange(s_q, device=device)[:, None]
    kj = torch.arange(s_k, device=device)[None, :]
    return allowed(pattern, layout, qi, kj)


def count_allowed(pattern: Pattern, layout: Layout, s_q: int, s_k: int, causal: bool = False) -> int:
    """Exact number of allowed (query, key) pairs of the pattern (and of the site's top-left ``causal`` mask,
    ``j <= i``), in O(S * (ndim + sinks)) time and memory, never O(pairs).

    Causal on a grid: tokens are row-major, so key ``j <= i`` iff its coordinates are lexicographically <= the
    query's; inside the query's dilation group coordinate order is u order, so per axis the window keys before
    the query are the u interval ``[lo, min(hi, u - 1)]``.
    """
    if not pattern.local:
        if not causal:
            return s_q * s_k
        m = min(s_q, s_k)  # query i sees keys 0..min(i, s_k - 1)
        return m * (m + 1) // 2 + (s_q - m) * s_k
    grid = layout.grid
    assert grid is not None
    p, n_grid = layout.prefix, layout.n_grid
    t = torch.arange(p, p + n_grid)
    coords = token_coords(t, layout)
    bounds = [pattern.axis_bounds(a, grid, coords[a]) for a in range(len(grid))]
    widths = [(hi - lo + 1).clamp_min(0) for lo, hi in bounds]
    if not causal:
        per_q = torch.ones_like(t)
        for w in widths:
            per_q = per_q * w
        per_q = per_q + p + layout.suffix              # every grid query sees the global keys
        glob_rows = (p + layout.suffix) * s_k          # global queries see every key
    else:
        us = [dilation_groups(c, grid[a], pattern.dilation_of(a, len(grid)))[0] for a, c in enumerate(coords)]
        per_q = torch.zeros_like(t)
        same = torch.ones_like(t)                      # the query's own coordinate lies in the window so far
        for a in range(len(grid)):
            lo, hi = bounds[a]
            before = (torch.minimum(hi, us[a] - 1) - lo + 1).clamp_min(0)
            rest = torch.ones_like(t)
            for w in widths[a + 1:]:
                rest = rest * w
            per_q = per_q + same * before * rest
            same = same * ((lo <= us[a]) & (us[a] <= hi)).to(t.dtype)
        per_q = per_q + same + p                       # the query itself; prefix keys all precede it
        n_glob_q = torch.cat([torch.arange(p), torch.arange(p + n_grid, s_q)])
        glob_rows = int((n_glob_q + 1).clamp_max(s_k).sum())   # a global query sees keys 0..i
    extra_sinks = 0
    n_sink_grid = max(0, min(layout.sinks, p + n_grid) - p)
    if n_sink_grid:
        # grid sink keys that a query's window does not already contain
        sink_tok = torch.arange(p, p + n_sink_grid)
        inside = allowed(pattern, dataclasses.replace(layout, sinks=0), t[:, None], sink_tok[None, :])
        extra = ~inside
        if causal:
            extra = extra & (sink_tok[None, :] <= t[:, None])
        extra_sinks = int(extra.sum())
    return int(per_q.sum()) + extra_sinks + glob_rows
