"""The resolved pattern of one site, per head group, and its string form carried by the custom op.

A :class:`SiteSpec` is what the policy decides for one site after its grid/globals are resolved. It travels
into ``torch.ops.locattn.attention`` as a canonical JSON string (custom ops take strings, Inductor keeps them
as constants, and equal specs compare equal); :func:`parse_spec` turns it back into objects, cached.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from . import PATTERNS
from .base import Layout, Pattern
from .mechanism import SOFTMAX, Mechanism


@dataclass(frozen=True)
class HeadGroup:
    """One pattern applied to ``heads`` (query head indices; ``None`` = all heads) on ``layout``, attended by
    ``mechanism`` (:mod:`locattn.patterns.mechanism`; softmax unless a policy asks for linear / hybrid)."""

    heads: tuple[int, ...] | None
    pattern: Pattern
    layout: Layout
    mechanism: Mechanism = SOFTMAX


@dataclass(frozen=True)
class SiteSpec:
    """Per-head plan of one site: disjoint head groups covering every query head. ``site``: the site's module
    path, carried only by specs with a ``dynamic`` group (its measured density is recorded per site).
    ``softcap`` (c > 0, every group): the site's scores are ``c * tanh(scale * q·k / c)`` before its bias / mask
    (0: none)."""

    groups: tuple[HeadGroup, ...]
    site: str = ""
    softcap: float = 0.0

    def __post_init__(self):
        if not (self.softcap >= 0 and math.isfinite(self.softcap)):
            raise ValueError(f"softcap must be a finite number >= 0, got {self.softcap}")

    @property
    def is_dense(self) -> bool:
        """Every group attends every key by exact softmax."""
        return all(not g.pattern.local and g.mechanism.is_softmax for g in self.groups)

    def to_json(self) -> str:
        out = []
        for g in self.groups:
            d = {
                "heads": list(g.heads) if g.heads is not None else None,
                "pattern": g.pattern.name,
                "params": g.pattern.to_params(),
                "grid": list(g.layout.grid) if g.layout.grid is not None else None,
                "prefix": g.layout.prefix, "suffix": g.layout.suffix, "sinks": g.layout.sinks,
            }
            if not g.mechanism.is_softmax:  # absent for softmax: every softmax spec string stays as it was
                d["mechanism"] = g.mechanism.to_params()
            out.append(d)
        d = {"v": 1, "groups": out}
        if self.site:
            d["site"] = self.site
        if self.softcap:  # omitted when 0: spec strings without a score modifier stay as they were
            d["softcap"] = float(self.softcap)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            s = g.pattern.describe()
            lay = g.layout
            extras = []
            if lay.grid is not None and g.pattern.local:
                extras.append("grid=" + "x".join(map(str, lay.grid)))
            if lay.prefix or lay.suffix:
                extras.append(f"globals={lay.prefix}+{lay.suffix}")
            if lay.sinks:
                extras.append(f"sinks={lay.sinks}")
            if extras:
                s += "[" + ", ".join(extras) + "]"
            if not g.mechanism.is_softmax:
                s = f"{g.mechanism.describe()}:{s}"
            if g.heads is not None:
                s = f"h{head_ranges(g.heads)}:" + s
            parts.append(s)
        return "; ".join(parts) + (f" [softcap={self.softcap:g}]" if self.softcap else "")


def head_ranges(heads: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    out, start, prev = [], None, None
    for h in heads:
        if start is None:
            start = prev = h
        elif h == prev + 1:
            prev = h
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = h
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)


def pattern_from_params(name: str, params: dict) -> Pattern:
    """Pattern ``name`` with ``params`` as a spec / policy spells them (lists for tuples, a nested pattern as a
    ``{"pattern": ..., ...}`` dict)."""
    cls = PATTERNS[name]
    kw = {}
    for k, v in params.items():
        if isinstance(v, dict):  # a nested pattern (``dynamic``'s ``base``)
            v = pattern_from_params(v["pattern"], {x: y for x, y in v.items() if x != "pattern"})
        kw[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


@functools.lru_cache(maxsize=1024)
def parse_spec(text: str) -> SiteSpec:
    d = json.loads(text)
    groups = []
    for g in d["groups"]:
        layout = Layout(grid=tuple(g["grid"]) if g["grid"] is not None else None,
                        prefix=g["prefix"], suffix=g["suffix"], sinks=g["sinks"])
        mech = Mechanism.from_params(g["mechanism"]) if "mechanism" in g else SOFTMAX
        groups.append(HeadGroup(tuple(g["heads"]) if g["heads"] is not None else None,
                                pattern_from_params(g["pattern"], g["params"]), layout, mech))
    return SiteSpec(tuple(groups), d.get("site", ""), softcap=float(d.get("softcap", 0.0)))


DENSE_SPEC = SiteSpec((HeadGroup(None, PATTERNS["dense"](), Layout()),))
