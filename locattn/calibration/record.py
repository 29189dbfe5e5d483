"""Recording: every attention site of a model's Dynamo graphs becomes a *tap* that runs the locattn op with the
pattern the calibration currently assigns it (dense while recording) and, while recording, scores the
candidates on the call's q / k / v.

One trace serves the whole calibration: the dense recording passes, the end-to-end evaluations of candidate
policies during the search and the validation all run the same tapped graphs, switching patterns by
changing :attr:`Session.specs`. The graphs run eagerly (no Inductor): the op is what would run compiled.

Nothing is attached to the user's model: ``calibrate`` traces it with ``torch.compile`` (Dynamo's caches are
reset afterwards) and the ``auto`` backend taps a copy of the graph it was handed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..codegen.registry import AttentionCall
from ..counters import bump
from ..passes.grid_infer import infer_token_grids
from ..passes.rewrite import _checkpoint_bodies, find_sites
from ..passes.sites import AttentionSite
from ..patterns.base import Layout
from ..patterns.spec import DENSE_SPEC, SiteSpec
from . import scoring
from .candidates import Candidate, SiteShape, parse_candidates

DENSE_JSON = DENSE_SPEC.to_json()
DENSE = DENSE_SPEC.groups[0].pattern


class CalibrationError(ValueError):
    """Calibration cannot run on this input; the message says which sample, site or option and why."""


@dataclass
class SiteRecord:
    """One policy site (a module path) of the traced model: the traced :class:`AttentionSite` (shapes as the op
    receives them, q ``[B, Hq, Sq, D]``), its candidates and accumulated statistics."""

    site: AttentionSite
    keys: list[str] = field(default_factory=list)      # tap keys (graph.site) sharing this path
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    scale: float = 1.0
    #: every recorded call's mask allowed no key after its query (None: no mask seen yet)
    mask_causal: bool | None = None
    example_mask: torch.Tensor | None = field(default=None, repr=False)
    example_bias: torch.Tensor | None = field(default=None, repr=False)
    #: q / k / v of the first scored call, kept only when a candidate is content-dependent (``dynamic``): its cost
    #: is measured on them (on random tensors it would select other blocks)
    example_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    candidates: list[Candidate] = field(default_factory=list)
    stats: scoring.SiteStats | None = None
    costs: list[float] | None = None                    # per candidate, one call of the whole site
    shapes_seen: dict[int, tuple] = field(default_factory=dict)   # sample index -> call shapes

    @property
    def path(self) -> str:
        return self.site.path

    @property
    def heads(self) -> int:
        return self.site.heads

    @property
    def dense_json(self) -> str:
        """The exact dense spec of this site (its ``softcap`` kept: a soft-capped site's reference is capped)."""
        if not self.site.softcap:
            return DENSE_JSON
        return SiteSpec(DENSE_SPEC.groups, softcap=self.site.softcap).to_json()

    @property
    def causal(self) -> bool:
        return self.site.is_causal or bool(self.mask_causal)

    def shape(self) -> SiteShape:
        s = self.site
        grid, pre, suf = s.token_grid if s.token_grid is not None else (None, 0, 0)
        return SiteShape(s.s_q, grid, pre, suf, self.causal, s.s_q == s.s_k)


def _mask_is_causal(mask: torch.Tensor | None, s_q: int, s_k: int) -> bool:
    """The bool mask allows no key after its query (top-left aligned), on every batch element and head."""
    if mask is None or mask.dtype != torch.bool or s_q != s_k:
        return False
    upper = torch.ones(s_q, s_k, dtype=torch.bool, device=mask.device).triu(1)
    return not bool((mask & upper).any())


class Session:
    """The calibration's view of the tapped graphs: the site records, the current per-site specs, and the
    recording switch. ``specs`` maps a site path to the op's spec JSON (absent: dense)."""

    def __init__(self, candidates=None, rows: int = 128, backend: str = ""):
        self.sites: dict[str, SiteRecord] = {}
        self.by_key: dict[str, SiteRecord] = {}
        self.left_alone: list[tuple[str, str]] = []      # (path, reason)
        self.specs: dict[str, str] = {}
        #: "score" (check shapes, score candidates), "shapes" (check shapes only) or "off"
        self.mode = "off"
        self.sample = -1
        self.candidate_spec = candidates
        self.rows = rows
        self.backend = backend
        self.graphs = 0
        self._keep_cache: dict = {}     # candidates' key sets of the current sample (shared by its sites)
        self._keep_sample = -1
        #: gradient proxy: scored site calls wait for d(metric)/d(out) (see :meth:`score_pending`)
        self.gradients = False
        self.pending: list = []

    # -- tracing ---------------------------------------------------------------------------------------------
    def tap_graph(self, gm: fx.GraphModule) -> list[AttentionSite]:
        """Rewrite every site of ``gm`` (in place) into a tap of this session. Returns the sites."""
        graph_id = self.graphs
        self.graphs += 1
        sites = find_sites(gm, graph_id)
        infer_token_grids(gm, sites)
        for site in sites:
            if site.blocker:
                self.left_alone.append((site.path, site.blocker))
                continue
            key = f"{graph_id}.{site.index}"
            rec = self.sites.get(site.path)
            if rec is None:
                rec = self.sites[site.path] = SiteRecord(site)
            elif (rec.site.q_shape, rec.site.k_shape, rec.site.v_shape, rec.site.is_causal) != \
                    (site.q_shape, site.k_shape, site.v_shape, site.is_causal):
                raise CalibrationError(
                    f"locattn.calibrate: site {site.path or '<root>'!r} is called with different shapes "
                    f"(q {list(rec.site.q_shape)} and {list(site.q_shape)}): a policy rule matches a module path, "
                    f"so calibrate one shape at a time (samples of one shape)")
            rec.keys.append(key)
            self.by_key[key] = rec
            site.replace(_make_tap(self, key, site.effective_scale(), site.is_causal))
        for body in _checkpoint_bodies(gm):
            sites += self.tap_graph(body)
        gm.graph.lint()
        gm.recompile()
        return sites

    # -- at run time -----------------------------------------------------------------------------------------
    def call(self, key: str, q, k, v, mask, bias, scale: float, is_causal: bool):
        rec = self.by_key[key]
        spec = self.specs.get(rec.path) or rec.dense_json
        out = torch.ops.locattn.attention(q, k, v, mask, bias, scale, is_causal, spec, self.backend)
        if self.mode != "off":
            pending = self._record(rec, q, k, v, mask, bias, scale, is_causal, self.mode == "score")
            if pending is not None and self.gradients and torch.is_grad_enabled():
                # gradient proxy: out + z with z a zero leaf: d(metric)/dz = d(metric)/d(out), whether or not the
                # model's parameters require grad; scoring waits for the gradients (score_pending)
                z = torch.zeros_like(out[0], requires_grad=True)
                self.pending.append((pending, z))
                return out[0] + z, out[1]
            if pending is not None:
                self._score(*pending, None)
        return out

    def score_pending(self, grads: list[torch.Tensor | None] | None) -> None:
        """Score the site calls recorded in gradient mode, each weighted by its output's gradient (None: none)."""
        for j, (pending, _) in enumerate(self.pending):
            g = grads[j] if grads is not None else None
            self._score(*pending, g)
        self.pending = []

    def _score(self, rec: SiteRecord, rs: AttentionCall, rows: torch.Tensor, grad: torch.Tensor | None) -> None:
        if self._keep_sample != self.sample:
            self._keep_cache, self._keep_sample = {}, self.sample
        w = grad.index_select(2, rows.to(grad.device)).detach() if grad is not None else None
        scoring.score(rs, rec.candidates, rec.stats, rows, self._keep_cache, weights=w)
        bump("calibration", "site calls scored")

    @torch.no_grad()
    def _record(self, rec: SiteRecord, q, k, v, mask, bias, scale, is_causal, score: bool):
        """Check the call's shapes; when scoring, return what :meth:`_score` needs."""
        shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        if rec.shapes_seen and shapes not in rec.shapes_seen.values():
            other, seen = next(iter(rec.shapes_seen.items()))
            raise CalibrationError(
                f"locattn.calibrate: inconsistent sample shapes: at site {rec.path or '<root>'!r} sample "
                f"{self.sample} gives q {list(q.shape)} but sample {other} gave q {list(seen[0])}; calibrate "
                f"samples of one shape at a time")
        rec.shapes_seen.setdefault(self.sample, shapes)
        if not score:
            return None
        first = rec.stats is None
        mc = _mask_is_causal(mask, q.shape[-2], k.shape[-2]) if mask is not None else None
        if mc is not None:
            rec.mask_causal = mc if rec.mask_causal is None else (rec.mask_causal and mc)
        if first:
            rec.dtype, rec.device, rec.scale = q.dtype, q.device, scale
            rec.example_mask, rec.example_bias = mask, bias
            rec.candidates = parse_candidates(self.candidate_spec, rec.shape())
            rec.stats = scoring.SiteStats(q.shape[1], len(rec.candidates))
            if not all(c.static for c in rec.candidates):
                rec.example_qkv = (q.detach(), k.detach(), v.detach())
        rows = scoring.sample_rows(q.shape[-2], self.rows, seed=self.sample)
        rs = AttentionCall(q.detach(), k.detach(), v.detach(), mask, bias, scale, is_causal, DENSE, Layout(),
                           softcap=rec.site.softcap)
        return rec, rs, rows


def _make_tap(session: Session, key: str, scale: float, is_causal: bool):
    def op_call(g: fx.Graph, q, k, v, mask, bias):
        def tap(q, k, v, mask, bias):
            return session.call(key, q, k, v, mask, bias, scale, is_causal)

        tap.__name__ = f"locattn_calibration_tap_{key.replace('.', '_')}"
        return g.call_function(tap, (q, k, v, mask, bias))

    return op_call


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph (and nested GraphModules, e.g. checkpoint bodies) can be rewritten without
    touching ``gm``; other attributes (constants) are shared. Node meta is copied shallowly (the FakeTensors
    the finders read stay shared)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            setattr(new, name, clone_graph_module(child))
    return new


class TapBackend:
    """A ``torch.compile`` backend that taps every site for ``session`` and runs the graph eagerly."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs) -> Callable:
        self.session.tap_graph(gm)
        return gm.forward
