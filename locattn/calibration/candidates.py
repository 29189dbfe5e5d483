"""Candidate patterns per site: a registry of families, each a generator over a site's shape and grid.

A :class:`Candidate` is one choice the solver can give a (site, head): a pattern with its layout (the
site's grid, inferred globals, sinks), the policy rule that spells it, and how to score it: :meth:`keep`
returns which keys sampled query rows would attend, from the recorded tensors. Static patterns answer from
their predicate alone; a content-dependent pattern answers from the recorded q / k.

Families (``FAMILIES``, in order) build ladders on the site's token grid:

* ``dense`` — always present, error 0 (the solver's fallback),
* ``sliding_window`` — radius ladder (1-D: powers of two; on a causal site causal windows, with 1.5x steps
  between, each with 4 sinks; grids: a fraction of each axis),
* ``neighborhood`` — odd kernel ladder (grids and non-causal 1-D; on a causal 1-D site it equals a causal
  sliding window, so it is skipped),
* ``tiled`` — STA tiles of one kernel block (64 tokens), window ladder in tiles,
* ``strided`` — GNA: the neighborhood ladder with stride = the tile.

Add a family with :func:`register_family`; a family is ``fn(site: SiteShape) -> Iterable[Candidate]``.

* ``dynamic`` — content-dependent top-p block selection (:mod:`locattn.patterns.dynamic`), levels
  :data:`TOP_P`: on a causal 1-D site blocks of 64 tokens, ``causal = true``, an exact causal sliding window of
  64 as ``base`` and 4 sinks; on a non-causal site (1-D or a grid) the site's tile (``tiled``'s) and no base.
  Its key set depends on the recorded q / k, so :class:`DynamicCandidate` overrides :meth:`Candidate.keep`
  with the op's own predicate (:func:`locattn.codegen.reference.keep_mask` on the pattern's
  :func:`~locattn.patterns.dynamic.select_blocks` of the recorded call, per batch element and head).

Costs are measured by running the op on the candidate's spec (:mod:`.cost`); a content-dependent candidate is
timed on the site's recorded tensors (random ones would select other blocks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..codegen.registry import AttentionCall
from ..patterns import PATTERNS
from ..patterns.base import Layout, Pattern, PatternError, allowed
from ..patterns.plan import choose_tile
from ..patterns.spec import pattern_from_params

#: sinks tried beside every causal 1-D window (attention sinks, StreamingLLM)
SINKS = 4
#: tokens of one tile of ``tiled`` / one stride of ``strided`` / one pooling block of ``dynamic`` (one kernel block)
BLOCK = 64
#: ``dynamic`` top-p levels
TOP_P = (0.8, 0.9, 0.95)
#: ``dynamic``'s exact causal base window on causal 1-D sites (with :data:`SINKS` sinks)
DYNAMIC_BASE_WINDOW = 64


@dataclass(frozen=True)
class SiteShape:
    """What candidate families see of a site.

    ``s``: tokens (self-attention); ``grid``: the token grid if one was inferred (``None``: 1-D);
    ``prefix`` / ``suffix``: inferred global tokens; ``causal``: the site attends no key after its query
    (``is_causal``, or a recorded mask that is causal on every sample); ``self_attention``: S_q == S_k.
    """

    s: int
    grid: tuple[int, ...] | None
    prefix: int
    suffix: int
    causal: bool
    self_attention: bool

    @property
    def n_grid(self) -> int:
        return self.s - self.prefix - self.suffix

    @property
    def axes(self) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (self.n_grid,)


@dataclass(frozen=True)
class Candidate:
    """One pattern choice: ``pattern`` on ``layout`` (grid ``None`` = the whole non-global sequence)."""

    family: str
    pattern: Pattern
    layout: Layout = Layout()
    #: the key set depends on positions only (not on the recorded q / k): scorers may share it between sites
    static: bool = True

    @classmethod
    def make(cls, site: SiteShape, name: str, params: dict, sinks: int = 0) -> "Candidate":
        """A candidate of pattern ``name`` with ``params`` on the site's grid and globals."""
        pattern = pattern_from_params(name, params)
        if pattern.dynamic and not issubclass(cls, DynamicCandidate):
            cls = DynamicCandidate
        if not pattern.local:
            return cls(name, pattern)
        grid = site.grid if site.grid is not None and len(site.grid) > 1 else None
        return cls(name, pattern, Layout(grid=grid, prefix=site.prefix, suffix=site.suffix, sinks=sinks))

    @property
    def is_dense(self) -> bool:
        return not self.pattern.local

    @property
    def label(self) -> str:
        s = self.pattern.describe()
        return s + (f"+sinks{self.layout.sinks}" if self.layout.sinks else "")

    def rule(self) -> dict:
        """The policy-rule keys that select this candidate (without ``match`` / ``heads``)."""
        d: dict = {"pattern": self.pattern.name}
        defaults = {f.name: f.default for f in dataclasses.fields(self.pattern)}
        for k, v in self.pattern.to_params().items():
            if v != (list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k]):
                d[k] = v
        lay = self.layout
        if lay.grid is not None:
            d["grid"] = list(lay.grid)
        if lay.prefix or lay.suffix:
            d["globals"] = {k: v for k, v in (("prefix", lay.prefix), ("suffix", lay.suffix)) if v}
        if lay.sinks:
            d["sinks"] = lay.sinks
        return d

    def keep(self, rec: AttentionCall, rows: torch.Tensor) -> torch.Tensor:
        """Keys the pattern lets query ``rows`` attend: bool broadcastable to ``[B, Hq, R, Sk]`` (the site's own
        mask and causality are applied by the scorer). ``rec`` is the recorded call (q / k / v, mask, bias as the
        op receives them; its pattern field is unused). Static patterns: ``[R, Sk]`` from the predicate."""
        s_k = rec.k.shape[-2]
        kj = torch.arange(s_k, device=rows.device)[None, :]
        if self.is_dense:
            return torch.ones(rows.numel(), s_k, dtype=torch.bool, device=rows.device)
        return allowed(self.pattern, self.layout.resolve(s_k), rows[:, None], kj)

    def fits(self, site: SiteShape) -> bool:
        if self.is_dense:
            return True
        if not site.self_attention:
            return False
        try:
            self.pattern.validate(self.layout.resolve(site.s).grid)
        except PatternError:
            return False
        return True


@dataclass(frozen=True)
class DynamicCandidate(Candidate):
    """A content-dependent candidate (``dynamic``): the keys a query row keeps come from the pattern's block
    selection on the recorded q / k, per batch element and head, exactly as the op selects them."""

    static: bool = False

    def keep(self, rec: AttentionCall, rows: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, R, Sk]`` bool: the op's predicate (:func:`~locattn.codegen.reference.keep_mask`: the static
        part, sinks and globals OR the selected block pairs) for query ``rows`` of the recorded call."""
        from ..codegen.reference import keep_mask  # noqa: PLC0415 (codegen imports the calibration's users)

        call = self.call(rec.q, rec.k, rec.v, rec.scale, False)
        s_k, dev = rec.k.shape[-2], rec.q.device
        return keep_mask(call, rows.to(dev)[:, None], torch.arange(s_k, device=dev)[None, :])

    def call(self, q, k, v, scale: float, is_causal: bool) -> AttentionCall:
        """The op's call of this candidate on q / k / v (no mask or bias): its ``kept()`` is the selection."""
        s_k = k.shape[-2]
        return AttentionCall(q, k, v, None, None, scale, is_causal, self.pattern, self.layout.resolve(s_k),
                             q_offset=s_k - q.shape[-2])


Family = Callable[[SiteShape], Iterable[Candidate]]
FAMILIES: list[Family] = []


def register_family(fn: Family) -> Family:
    """Add a candidate family (a decorator); families run in registration order."""
    FAMILIES.append(fn)
    return fn


def _odd(x: float, lo: int, hi: int) -> int:
    k = max(lo, min(hi, int(round(x))))
    return k if k % 2 else (k + 1 if k + 1 <= hi else k - 1)


def _windows_1d(n: int, half_steps: bool = False) -> list[int]:
    """1-D window radii: powers of two from 16 up to n / 2 (with ``half_steps`` also 1.5x each), and 3n / 4."""
    out, w = [], 16
    while w <= n // 2:
        out.append(w)
        if half_steps and 3 * w // 2 <= n // 2:
            out.append(3 * w // 2)
        w *= 2
    if n >= 32:
        out.append(3 * n // 4)
    return out


#: fraction of each grid axis a 2-D / 3-D neighborhood covers, smallest first
GRID_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


def _kernels(site: SiteShape) -> list[tuple[int, ...]]:
    axes = site.axes
    out = []
    for f in GRID_FRACTIONS:
        k = tuple(_odd(f * n, min(3, n), n) for n in axes)
        if k not in out:
            out.append(k)
    return out


def _per_axis(t: tuple[int, ...]) -> int | list[int]:
    return t[0] if len(set(t)) == 1 else list(t)


@register_family
def dense(site: SiteShape) -> Iterable[Candidate]:
    yield Candidate.make(site, "dense", {})


@register_family
def sliding_window(site: SiteShape) -> Iterable[Candidate]:
    if len(site.axes) == 1:
        # causal 1-D (LMs): the finer ladder, always with sinks (4 keys: they cost nothing and only add mass)
        for w in _windows_1d(site.n_grid, half_steps=site.causal):
            yield Candidate.make(site, "sliding_window", {"window": w, "causal": site.causal},
                                 sinks=SINKS if site.causal else 0)
        return
    for k in _kernels(site):
        yield Candidate.make(site, "sliding_window", {"window": _per_axis(tuple(x // 2 for x in k))})


@register_family
def neighborhood(site: SiteShape) -> Iterable[Candidate]:
    if len(site.axes) == 1:
        if site.causal:  # a causal 1-D neighborhood is a causal sliding window
            return
        for w in _windows_1d(site.n_grid):
            yield Candidate.make(site, "neighborhood", {"kernel": min(2 * w + 1, site.n_grid)})
        return
    for k in _kernels(site):
        yield Candidate.make(site, "neighborhood", {"kernel": _per_axis(k)})


def _tile(site: SiteShape) -> tuple[int, ...]:
    axes = site.axes
    return (min(BLOCK, axes[0]),) if len(axes) == 1 else choose_tile(axes, BLOCK)


@register_family
def tiled(site: SiteShape) -> Iterable[Candidate]:
    tile = _tile(site)
    n_tiles = [-(-n // t) for n, t in zip(site.axes, tile)]
    seen = set()
    for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4):
        w = tuple(_odd(f * n, 1, n) for n in n_tiles)
        if w in seen or all(x == n for x, n in zip(w, n_tiles)):
            continue
        seen.add(w)
        yield Candidate.make(site, "tiled", {"tile": _per_axis(tile), "window": _per_axis(w)},
                             sinks=SINKS if site.causal else 0)


@register_family
def strided(site: SiteShape) -> Iterable[Candidate]:
    tile = _tile(site)
    kernels = [(min(2 * w + 1, site.n_grid),) for w in _windows_1d(site.n_grid)] if len(site.axes) == 1 \
        else _kernels(site)
    for k in kernels:
        stride = tuple(min(t, x) for t, x in zip(tile, k))
        if all(s == 1 for s in stride):
            continue
        params = {"kernel": _per_axis(k), "stride": _per_axis(stride)}
        if site.causal:
            params["causal"] = True
        yield Candidate.make(site, "strided", params, sinks=SINKS if site.causal else 0)


@register_family
def dynamic(site: SiteShape) -> Iterable[Candidate]:
    tile = _tile(site)
    n_blocks = math.prod(-(-n // t) for n, t in zip(site.axes, tile))
    if n_blocks < 3:      # two blocks or fewer: nothing for a selection to leave out
        return
    if len(site.axes) == 1 and site.causal:
        base = {"pattern": "sliding_window", "window": DYNAMIC_BASE_WINDOW, "causal": True}
        params, sinks = {"block": tile[0], "causal": True, "base": base}, SINKS
    else:
        params = {"block": tile[0]} if len(tile) == 1 else {"tile": list(tile)}
        sinks = 0
    for p in TOP_P:
        yield DynamicCandidate.make(site, "dynamic", {**params, "top_p": p}, sinks=sinks)


def candidates_for(site: SiteShape, families: Iterable[Family] | None = None) -> list[Candidate]:
    """Every candidate of ``families`` (default :data:`FAMILIES`) that fits the site, dense first, deduplicated."""
    out: list[Candidate] = []
    seen: set[tuple] = set()
    for fam in (FAMILIES if families is None else families):
        for c in fam(site):
            key = (c.pattern, c.layout)
            if key in seen or not c.fits(site):
                continue
            seen.add(key)
            out.append(c)
    if not out or not out[0].is_dense:
        out = [c for c in out if not c.is_dense]
        out.insert(0, Candidate.make(site, "dense", {}))
    return out


def parse_candidates(spec, site: SiteShape) -> list[Candidate]:
    """User ``candidates=``: a list of families (callables), of :class:`Candidate`, or of rule dicts
    (``{"pattern": "sliding_window", "window": 64, "sinks": 4}``); dense is always added."""
    if spec is None:
        return candidates_for(site)
    fams: list[Family] = []
    fixed: list[Candidate] = []
    for c in spec:
        if isinstance(c, Candidate):
            fixed.append(c)
        elif callable(c):
            fams.append(c)
        elif isinstance(c, dict):
            d = dict(c)
            name = d.pop("pattern", None)
            if name not in PATTERNS:
                raise ValueError(f"locattn.calibrate: candidate {c!r}: unknown pattern {name!r}; "
                                 f"known: {sorted(PATTERNS)}")
            sinks = d.pop("sinks", 0)
            try:
                fixed.append(Candidate.make(site, name, d, sinks=sinks))
            except (TypeError, PatternError) as e:
                raise ValueError(f"locattn.calibrate: candidate {c!r}: {e}") from None
        else:
            raise ValueError(f"locattn.calibrate: a candidate is a family (callable), a Candidate or a rule dict, "
                             f"got {c!r}")

    def given(_site):
        return iter(fixed)

    return candidates_for(site, [dense, *fams, given])
