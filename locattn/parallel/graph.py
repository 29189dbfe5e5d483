"""Sequence parallelism as a graph pass: where to shard, proof that the region is token-wise, the rewrite.

Runs after the attention rewrite, on the Dynamo graph (static shapes). For a graph with rewritten
self-attention sites:

1. **The grid**: the one token grid of the sites' resolved layouts (a dense-only graph: the grid inferred from
   the patch embedding, else the whole sequence as a 1-D grid). ``axis`` of it is cut into one run of rows per
   rank (:func:`~.planner.make_sharding`; a group larger than the axis is an error on every rank).
2. **Shard points**: from each site's queries, walk back through token-wise ops
   (:func:`~.tokenwise.propagate` run on hypotheses) to the nodes that *create* the token axis — the patch
   embedding's ``flatten`` — or hold it from outside (a positional-embedding buffer, an input of tokens).
3. **Proof**: from the shard points, propagate the token axis forward through the whole graph. Every node
   reading a sharded tensor is token-wise, an attention site, or a *boundary*: a node that mixes tokens. A
   boundary no site depends on gets the sequence gathered first (the unpatchify ``reshape`` after the final
   projection, the graph's outputs); a boundary some site depends on refuses the whole graph, with the
   boundary's reason, and the model runs unsharded (counted, warned, shown by ``explain``).
4. **Rewrite** (per rank): ``sp_shard`` after each shard point, ``sp_enter`` on replicated operands that need
   gradients, the rank's sizes in views and slices, ``sp_attention`` for every self-attention site (halo or
   all-gather per :func:`~.planner.plan_attention`), ``sp_gather`` before each boundary.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..counters import bump, log
from ..passes.sites import ancestors, example, module_path
from ..patterns.spec import parse_spec
from . import ops as _sp_ops  # noqa: F401  (registers torch.ops.locattn.sp_*)
from .config import SPConfig
from .planner import Traffic, common_alignment, describe_plan, make_sharding, plan_attention, site_traffic
from .sharding import AttentionPlan, SequenceParallelError, Sharding, TokenPlan, to_json
from .tokenwise import Effect, Local, NotTokenwise, Seq, propagate

ATTENTION = torch.ops.locattn.attention.default
_LAYOUT_OPS = {"cat", "concat", "concatenate", "getitem", "narrow", "split", "split_with_sizes"}


@dataclass
class SiteReport:
    path: str
    mode: str                       # "halo", "all-gather", "cross (token-wise)"
    plan: str = ""                  # the cut of each rank
    traffic: Traffic | None = None
    plan_obj: AttentionPlan | None = None


@dataclass
class ParallelReport:
    """What sequence parallelism did to one graph."""

    applied: bool
    reason: str = ""
    grid: tuple[int, ...] = ()
    axis: int = 0
    world: int = 1
    rows: tuple[tuple[int, int], ...] = ()
    shard_points: list[str] = field(default_factory=list)
    gathers: list[str] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)
    live: bool = True
    #: graph inputs (placeholder positions) used only inside the region: their gradients are summed over the
    #: group around the compiled graph (runtime.wrap_compiled), which spares an in-graph copy of each weight
    enter_inputs: list[int] = field(default_factory=list)

    def describe(self) -> str:
        if not self.applied:
            return f"sequence parallel: not applied ({self.reason}); the graph runs unsharded on every rank"
        lines = [f"sequence parallel over {self.world} ranks: grid {'x'.join(map(str, self.grid))}, axis {self.axis} "
                 f"cut into rows {', '.join(f'{a}-{b}' for a, b in self.rows)}",
                 f"  shard after: {', '.join(self.shard_points)}; gather before: {', '.join(self.gathers) or '-'}"]
        for s in self.sites:
            t = s.traffic
            if t is None:
                lines.append(f"  {s.path or '<root>'}: {s.mode}")
                continue
            uly = _fmt_bytes(t.ulysses) if t.ulysses is not None else "n/a (heads)"
            lines.append(f"  {s.path or '<root>'}: {s.mode}, sent per rank {_fmt_bytes(t.halo)} vs all-gather "
                         f"{_fmt_bytes(t.all_gather)}, ring {_fmt_bytes(t.ring)}, Ulysses {uly}"
                         + (f"; the halo reaches {t.halo_ranks} ranks away" if t.halo_ranks > 1 else ""))
            lines.append(f"    {s.plan}")
        return "\n".join(lines)


def report_dict(r: ParallelReport) -> dict:
    """A :class:`ParallelReport` for JSON."""
    sites = []
    for s in r.sites:
        t = s.traffic
        sites.append({"path": s.path, "mode": s.mode, "plan": s.plan,
                      "bytes_per_rank": None if t is None else {"halo": t.halo, "all_gather": t.all_gather,
                                                                "ring": t.ring, "ulysses": t.ulysses,
                                                                "halo_ranks": t.halo_ranks}})
    return {"applied": r.applied, "reason": r.reason, "grid": list(r.grid), "axis": r.axis, "world": r.world,
            "rows": [list(x) for x in r.rows], "shard_points": r.shard_points, "gathers": r.gathers, "sites": sites}


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


class _Refused(Exception):
    pass


# ------------------------------------------------------------------------------------------------ analysis


def _site_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION]


def _site_path(n: fx.Node) -> str:
    d = n.meta.get("locattn_decision")
    return d.site.path if d is not None else module_path(n)


def _grid_and_globals(sites: list[fx.Node]) -> tuple[tuple[int, ...], int, int] | None:
    """The sharded grid: from the local sites' layouts (all must agree); else a dense site's inferred grid."""
    found = set()
    for n in sites:
        spec = parse_spec(n.args[7])
        s_q = example(n.args[0]).shape[2]
        for g in spec.groups:
            if g.pattern.local:
                lay = g.layout.resolve(s_q)
                found.add((tuple(lay.grid), lay.prefix, lay.suffix))
    grids = {f[0] for f in found}
    if len(grids) > 1:
        raise _Refused(f"the sites use different token grids {sorted(grids)}; one grid is sharded")
    if found:
        return sorted(found)[0]
    for n in sites:
        d = n.meta.get("locattn_decision")
        if d is not None and d.site.token_grid is not None and d.site.s_q == d.site.s_k:
            return d.site.token_grid
    for n in sites:
        q, k = example(n.args[0]), example(n.args[1])
        if q.shape[2] == k.shape[2]:
            return (int(q.shape[2]),), 0, 0
    return None


def _hypotheses(n: fx.Node, a: fx.Node, total_out: int, n_grid: int, target: Seq):
    """States input ``a`` of ``n`` may have if it carries the output's tokens."""
    ev = example(a)
    if not isinstance(ev, torch.Tensor):
        return
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    for c, size in enumerate(ev.shape):
        if not isinstance(size, int):
            continue
        if size == total_out:
            yield Seq(c, target.prefix, target.suffix)
        if name in _LAYOUT_OPS and size >= n_grid:
            for pre in range(size - n_grid + 1):
                if (pre, size - n_grid - pre) != (target.prefix, target.suffix) or size != total_out:
                    yield Seq(c, pre, size - n_grid - pre)


def _trace_origins(start: fx.Node, seq: Seq, n_grid: int) -> set[tuple[fx.Node, Seq]]:
    """Walk back from ``start`` (carrying ``seq``) through token-wise ops to the nodes that create the tokens."""
    origins: set[tuple[fx.Node, Seq]] = set()
    seen = set()
    stack: list[tuple[fx.Node, Any]] = [(start, seq)]
    while stack:
        node, want = stack.pop()
        if (node, want) in seen:
            continue
        seen.add((node, want))
        item = None
        if isinstance(want, tuple):  # ("item", i, seq): element i of a node returning a tuple
            _, item, want_seq = want
        else:
            want_seq = want
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(example(node.args[0]), (tuple, list)):
            stack.append((node.args[0], ("item", node.args[1], want_seq)))
            continue
        carriers = []
        if node.op == "call_function" and node.target is ATTENTION and item == 0:
            carriers.append((node.args[0], Seq(2, want_seq.prefix, want_seq.suffix)))  # out carries q's tokens
        elif node.op in ("call_function", "call_method"):
            total = want_seq.prefix + n_grid + want_seq.suffix
            for a in dict.fromkeys(node.all_input_nodes):
                for hyp in _hypotheses(node, a, total, n_grid, want_seq):
                    try:
                        eff = propagate(node, {a: hyp}, n_grid)
                    except (NotTokenwise, KeyError, IndexError, TypeError, ValueError, AttributeError):
                        continue
                    got = eff.state[item] if item is not None and isinstance(eff.state, tuple) else eff.state
                    if got == want_seq:
                        carriers.append((a, hyp))
                        break
        if carriers:
            stack.extend(carriers)
        elif item is None:
            origins.add((node, want_seq))
        else:
            raise _Refused(f"{node.name} returns the tokens in a tuple but none of its inputs carries them")
    return origins


@dataclass
class _Analysis:
    grid: tuple[int, ...]
    prefix: int
    suffix: int
    origins: dict[fx.Node, Seq]
    state: dict[fx.Node, Any]
    effects: dict[fx.Node, Effect]
    boundary: dict[fx.Node, str]               # boundary node -> why it is not token-wise
    self_sites: list[fx.Node]
    cross_sites: list[fx.Node]


def _refresh_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Fake values for the nodes the attention rewrite added (they have none): FakeTensorProp over the graph
    from the compile's example inputs, in a fake mode of its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        raise _Refused("a graph input is not a tensor (symbolic sizes?): sequence parallelism needs static shapes")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        FakeTensorProp(gm, mode).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure means: do not shard
        raise _Refused(f"shape propagation failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for n in gm.graph.nodes:
        if "example_value" not in n.meta and "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]


def analyze(gm: fx.GraphModule, example_inputs) -> _Analysis:
    """The token-axis analysis of ``gm``; raises :class:`_Refused` with the reason when it cannot be sharded."""
    sites = _site_nodes(gm)
    if not sites:
        raise _Refused("no rewritten attention site in this graph")
    _refresh_shapes(gm, example_inputs)
    found = _grid_and_globals(sites)
    if found is None:
        raise _Refused("no self-attention site to take the token grid from")
    grid, prefix, suffix = found
    n_grid = math.prod(grid)
    origins: dict[fx.Node, Seq] = {}
    for n in sites:
        q = example(n.args[0])
        spec = parse_spec(n.args[7])
        if any(g.pattern.local for g in spec.groups):
            lay = next(g.layout for g in spec.groups if g.pattern.local).resolve(q.shape[2])
            want = Seq(2, lay.prefix, lay.suffix)
        elif q.shape[2] - prefix - suffix == n_grid:
            want = Seq(2, prefix, suffix)
        elif q.shape[2] == n_grid:
            want = Seq(2, 0, 0)
        else:
            continue  # a dense site on other tokens (cross-attention queries of another sequence)
        for origin, seq in _trace_origins(n.args[0], want, n_grid):
            if origins.setdefault(origin, seq) != seq:
                raise _Refused(f"{origin.name} would be sharded with two different token layouts")
    if not origins:
        raise _Refused("no site's queries could be traced back to the token embedding")

    state: dict[fx.Node, Any] = dict(origins)
    effects: dict[fx.Node, Effect] = {}
    boundary: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        if n in origins and any(isinstance(state.get(a), Seq) for a in n.all_input_nodes if a not in origins):
            raise _Refused(f"{n.name} would be sharded where its inputs already are (its tokens come from the "
                           f"sharded region through an op that is not token-wise)")
        if n in origins or n.op == "output":
            continue
        ins = [a for a in n.all_input_nodes if a in state]
        if not ins:
            continue
        try:
            eff = propagate(n, state, n_grid)
        except NotTokenwise as e:
            boundary[n] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - an op form the rules do not expect: not token-wise, say why
            boundary[n] = f"{n.name}: the token-axis rules failed on it ({type(e).__name__}: {e})"
            continue
        effects[n] = eff
        if eff.state is not None:
            state[n] = eff.state
    self_sites = [n for n in sites if isinstance(state.get(n.args[1]), Seq)]
    cross_sites = [n for n in sites if n in effects and n not in self_sites]
    site_ancestors = ancestors([a for n in sites for a in n.all_input_nodes])
    for b, why in boundary.items():
        if b in site_ancestors:
            raise _Refused(f"{why} — between the shard point and an attention site (module "
                           f"{module_path(b) or '<root>'})")
    for n in sites:
        if n in boundary:
            raise _Refused(f"attention site {_site_path(n) or n.name}: {boundary[n]}")
    return _Analysis(grid, prefix, suffix, origins, state, effects, boundary, self_sites, cross_sites)


# ------------------------------------------------------------------------------------------------ rewrite


def _local(sh: Sharding) -> Local:
    L = sh.local_tokens()

    def length(s: Seq) -> int:
        return s.prefix + L + s.suffix

    def boundary(s: Seq, g: int) -> int:
        n, p = sh.n_grid, s.prefix
        return {0: 0, p: p, p + n: p + L, p + n + s.suffix: p + L + s.suffix}[g]
    return Local(length, boundary)


def apply_sequence_parallel(gm: fx.GraphModule, cfg: SPConfig, example_inputs) -> ParallelReport:
    """Shard ``gm`` in place per ``cfg`` (or leave it as it is, with the reason). Bad configurations raise
    :class:`SequenceParallelError` (identically on every rank)."""
    group, rank, world, live = cfg.resolve()
    if world == 1:
        return ParallelReport(False, "a group of one rank: nothing to shard", world=1, live=live)
    if not _site_nodes(gm):  # a graph without attention (after a graph break): nothing to do, nothing to warn
        return ParallelReport(False, "no rewritten attention site in this graph", world=world, live=live)
    try:
        a = analyze(gm, example_inputs)
    except _Refused as e:
        return _refuse(str(e), world, live)
    if not -len(a.grid) <= cfg.axis < len(a.grid):
        make_sharding(a.grid, cfg.axis, world)  # raises with the reason
    align = common_alignment([parse_spec(n.args[7]) for n in a.self_sites], len(a.grid), cfg.axis)
    sh = make_sharding(a.grid, cfg.axis, world, group, rank, align)
    overlap = cfg.overlap_for(live)
    report = ParallelReport(True, grid=sh.grid, axis=sh.axis, world=world, rows=sh.rows, live=live)
    report.shard_points = sorted(f"{n.name}" + (f" ({module_path(n)})" if module_path(n) else "") for n in a.origins)
    plans: dict[fx.Node, AttentionPlan] = {}
    for n in a.self_sites:
        s = a.state[n.args[0]]
        plan = plan_attention(parse_spec(n.args[7]), sh, s.prefix, s.suffix, overlap=overlap,
                              label=_site_path(n) or n.name)
        if isinstance(plan, str):
            return _refuse(f"site {_site_path(n) or n.name}: {plan}", world, live)
        plans[n] = plan
        q, k, v = (example(x) for x in n.args[:3])
        traffic = site_traffic(plan, q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], q.element_size())
        report.sites.append(SiteReport(_site_path(n), "all-gather" if plan.dense else "halo", describe_plan(plan),
                                       traffic, plan))
    for n in a.cross_sites:
        report.sites.append(SiteReport(_site_path(n), "cross-attention (token-wise in its queries)"))
    users_out = [n for n in a.state if any(u.op == "output" or u in a.boundary for u in n.users)]
    report.gathers = sorted({u.name for n in users_out for u in n.users if u in a.boundary or u.op == "output"})
    if live:
        report.enter_inputs = _rewrite(gm, a, sh, plans)
    bump("sequence_parallel", "applied")
    log.info("locattn: %s", report.describe())
    return report


def _refuse(reason: str, world: int, live: bool) -> ParallelReport:
    bump("sequence_parallel", "refused")
    if live:
        warnings.warn(f"locattn: sequence parallelism not applied: {reason}; the graph runs unsharded on every rank",
                      stacklevel=3)
    return ParallelReport(False, reason, world=world, live=live)


def _rewrite(gm: fx.GraphModule, a: _Analysis, sh: Sharding, plans: dict[fx.Node, AttentionPlan]) -> list[int]:
    """Rewrite ``gm`` for this rank; returns the placeholder positions whose gradients the caller sums."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    outer: set[fx.Node] = set()
    local = _local(sh)
    region = set(a.state)

    def token_plan(seq: Seq) -> str:
        return to_json(TokenPlan(sh, seq.dim, seq.prefix, seq.suffix))

    # sizes written into nodes -> this rank's
    for n, eff in a.effects.items():
        if eff.rewrite is not None:
            eff.rewrite(n, local)
    # shard points: region users read the rank's part; others keep the whole tensor
    for o, seq in a.origins.items():
        with g.inserting_after(o):
            sn = g.call_function(torch.ops.locattn.sp_shard.default, (o, token_plan(seq)))
        for u in list(o.users):
            if u is not sn and u in a.effects:
                u.replace_input_with(o, sn)
    # replicated operands of sharded ops
    made: dict[tuple, fx.Node] = {}
    world = sh.world
    for n, eff in a.effects.items():
        for x, seq in eff.shard:
            key = ("shard", x, seq)
            if key not in made:
                with g.inserting_after(x):
                    made[key] = g.call_function(torch.ops.locattn.sp_shard.default, (x, token_plan(seq)))
            n.replace_input_with(x, made[key])
        for x in eff.enter:
            if x.op == "placeholder" and all(u in a.effects for u in x.users):
                outer.add(x)  # a weight used only in the region: summed outside the graph, no copy
                continue
            key = ("enter", x)
            if key not in made:
                with g.inserting_after(x):
                    made[key] = g.call_function(torch.ops.locattn.sp_enter.default, (x, sh.group))
            n.replace_input_with(x, made[key])
    # global tokens leaving the region: their gradient is partial inside it
    for n, eff in a.effects.items():
        leave = eff.leave and eff.state is None
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in a.effects and \
                a.effects[n.args[0]].leave and eff.state is None:
            leave = True
        if leave:
            with g.inserting_after(n):
                sg = g.call_function(torch.ops.locattn.sp_scale_grad.default, (n, world))
            for u in list(n.users):
                if u is not sg:
                    u.replace_input_with(n, sg)
    # the sequence gathered before every boundary and output
    for n in list(region):
        if n in a.origins or not isinstance(a.state[n], Seq):
            continue
        outside = [u for u in n.users if u in a.boundary or u.op == "output"]
        if not outside:
            continue
        with g.inserting_after(n):
            gn = g.call_function(torch.ops.locattn.sp_gather.default, (n, token_plan(a.state[n])))
        for u in outside:
            u.replace_input_with(n, gn)
    # sites
    for n, plan in plans.items():
        q, k, v, mask, bias, scale, is_causal, spec, backend = n.args
        n.target = torch.ops.locattn.sp_attention.default
        n.args = (q, k, v, scale, is_causal, spec, backend, to_json(plan))
    g.lint()
    gm.recompile()
    return [i for i, p in enumerate(placeholders) if p in outer]


__all__ = ["ParallelReport", "SiteReport", "apply_sequence_parallel", "analyze", "SequenceParallelError"]
