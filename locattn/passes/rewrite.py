"""Decide each site's pattern from the policy, then rewrite it into one ``locattn::attention`` call.

``rewrite_graph(gm, policy)`` runs the finders, asks the policy per site (per head), validates the result
against the site's shapes, replaces the site and returns one :class:`Decision` per site — rewritten or left
alone, always with a reason. Every outcome is counted (``locattn.counters()``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..counters import bump, log
from ..patterns import PATTERNS
from ..patterns.base import Layout, PatternError
from ..patterns.mechanism import SOFTMAX, Mechanism
from ..patterns.plan import build_plan, count_pairs
from ..patterns.spec import HeadGroup, SiteSpec
from ..policy import Globals, Policy, PolicyError, Rule
from .find_sdpa import find_sdpa_sites
from .grid_infer import infer_token_grids
from .match_manual import find_manual_sites
from .sites import AttentionSite


class LocattnWarning(UserWarning):
    """Policy rules that match nothing, local patterns on cross-attention, and similar."""


#: finders run in this order; each returns sites of a graph (later issues append the manual matcher)
FINDERS = [find_sdpa_sites, find_manual_sites]


@dataclass(eq=False)
class Decision:
    """What happened to one site."""

    site: AttentionSite
    rewritten: bool
    reason: str = ""                     # why left alone, or notes (e.g. cross-attention kept dense)
    spec: SiteSpec | None = None
    backend: str = ""
    rules: tuple[int, ...] = ()          # indices of the rules used (-1: default)
    density: float | None = None         # fraction of the dense score matrix computed
    blocks_full: int = 0
    blocks_partial: int = 0
    notes: list[str] = field(default_factory=list)
    linear_flops: int = 0                # FLOPs of linear / hybrid feature sums (not part of ``density``)

    @property
    def attn_flops_dense(self) -> int:
        s = self.site
        return 2 * s.batch * s.heads * s.s_q * s.s_k * (s.head_dim + s.v_dim)

    @property
    def attn_flops(self) -> int:
        return int(round(self.attn_flops_dense * (self.density if self.density is not None else 1.0))) + \
            self.linear_flops


def _assign_heads(site: AttentionSite, policy: Policy) -> tuple[list[tuple[tuple[int, ...], Rule]], Rule | None]:
    """Per-head rule assignment: ``([(heads, rule)], skip_rule)``; heads no rule took go to the default."""
    n_heads = site.heads
    remaining = list(range(n_heads))
    groups: list[tuple[tuple[int, ...], Rule]] = []
    for rule in policy.rules:
        if not remaining:
            break
        if not rule.matches(site.path):
            continue
        if rule.skip:
            if len(remaining) == n_heads:
                return [], rule
            continue
        if rule.heads is not None:
            bad = [h for h in rule.heads if h >= n_heads]
            if bad:
                raise PolicyError(f"{rule.where(policy.source)}: key 'heads': heads {bad} do not exist at site "
                                  f"{site.path or '<root>'!r} (it has {n_heads} heads)")
            take = tuple(h for h in remaining if h in rule.heads)
        else:
            take = tuple(remaining)
        if take:
            groups.append((take, rule))
            remaining = [h for h in remaining if h not in take]
    if remaining:
        groups.append((tuple(remaining), policy.default))
    return groups, None


def _layout_for(site: AttentionSite, rule: Rule, policy: Policy) -> Layout:
    pattern = rule.pattern
    where = f"{rule.where(policy.source)} at site {site.path or '<root>'!r}"
    grid = rule.grid
    if grid == "auto" or rule.globals == "auto":
        inferred = site.token_grid
        if inferred is None:
            raise PolicyError(f"{where}: grid/globals = \"auto\" but no token grid could be inferred for this "
                              f"site; give 'grid' (and 'globals') explicitly")
        auto_grid, auto_prefix, auto_suffix = inferred
        if grid == "auto":
            grid = auto_grid
    if grid is None:
        for k, (_, per_axis, _) in pattern.params.items():
            v = getattr(pattern, k)
            if per_axis and isinstance(v, tuple) and len(v) > 1:
                raise PolicyError(f"{where}: key '{k}' has {len(v)} per-axis values but the rule gives no 'grid'")
    glob = rule.globals
    if glob == "auto":
        prefix, suffix = auto_prefix, auto_suffix
    elif isinstance(glob, Globals):
        prefix, suffix = glob.prefix, glob.suffix
    else:
        prefix, suffix = 0, 0
    layout = Layout(grid=tuple(grid) if grid is not None else None, prefix=prefix, suffix=suffix, sinks=rule.sinks)
    if not site.symbolic_seq:
        try:
            resolved = layout.resolve(site.s_q)
            pattern.validate(resolved.grid)
        except PatternError as e:
            raise PolicyError(f"{where}: {e}") from None
    return layout


def decide(site: AttentionSite, policy: Policy, backend: str = "") -> Decision:
    """The policy's decision for one site (no graph change)."""
    if site.blocker:
        return Decision(site, False, reason=site.blocker)
    groups, skip = _assign_heads(site, policy)
    if skip is not None:
        return Decision(site, False, reason=f"policy: skip ({skip.where(policy.source)})", rules=(skip.index,))
    notes: list[str] = []
    head_groups = []
    chosen_backend = ""
    for heads, rule in groups:
        pattern = rule.pattern
        assert pattern is not None
        mech = rule.mechanism
        if rule.backend and not chosen_backend:
            chosen_backend = rule.backend
        if not mech.is_softmax:
            refused = mechanism_refusal(site, mech)
            if refused:
                msg = (f"mechanism {mech.kind} from {rule.where(policy.source)} refused: {refused}; "
                       f"heads {list(heads)} stay exact softmax")
                notes.append(msg)
                warnings.warn(f"locattn: site {site.path or '<root>'!r}: {msg}", LocattnWarning, stacklevel=2)
                bump("fallback", f"mechanism {mech.kind} refused: {refused.split(' (')[0]}")
                head_groups.append((heads, rule, PATTERNS["dense"](), Layout(), SOFTMAX))
                continue
        if pattern.local and site.s_q != site.s_k:
            msg = (f"cross-attention (Sq={site.s_q} != Sk={site.s_k}): {pattern.name} from "
                   f"{rule.where(policy.source)} needs self-attention; kept dense")
            notes.append(msg)
            warnings.warn(f"locattn: site {site.path or '<root>'!r}: {msg}", LocattnWarning, stacklevel=2)
            bump("fallback", "cross-attention kept dense")
            head_groups.append((heads, rule, PATTERNS["dense"](), Layout(), SOFTMAX))
            continue
        layout = _layout_for(site, rule, policy) if pattern.local else Layout()
        head_groups.append((heads, rule, pattern, layout, mech))
    all_heads = len(head_groups) == 1
    spec = SiteSpec(tuple(HeadGroup(None if all_heads else heads, p, lay, mech)
                          for heads, _, p, lay, mech in head_groups))
    d = Decision(site, True, spec=spec, backend=chosen_backend or backend or policy.backend,
                 rules=tuple(r.index for _, r, _, _, _ in head_groups), notes=notes)
    _measure(d)
    return d


def mechanism_refusal(site: AttentionSite, mech: Mechanism) -> str:
    """Why ``mech`` (linear / hybrid) cannot attend ``site`` ("" if it can): it sums feature products over the
    keys the site allows, so a float bias, or a mask that is not a key-padding mask, has no place to go."""
    if site.bias is not None:
        return f"the site adds a float bias {site.mask_desc} (linear attention has no scores to add it to)"
    if site.mask is not None:
        shape = site.mask_shape
        if shape is None or (len(shape) >= 2 and shape[-2] != 1):
            return (f"the site's bool mask {site.mask_desc} is not a key-padding mask ([..., 1, Sk]; linear "
                    f"attention honours key padding only)")
    return ""


def _measure(d: Decision, block: int = 64) -> None:
    """Density (pattern & causal, site mask not counted) and visited blocks, averaged over head groups; linear /
    hybrid groups count their softmax pairs (none for linear) in the density and their feature sums in
    ``linear_flops``."""
    s = d.site
    if d.spec is None or s.s_q <= 0 or s.s_k <= 0:
        return
    total, full, partial, lin = 0.0, 0, 0, 0
    for g in d.spec.groups:
        n_h = len(g.heads) if g.heads is not None else s.heads
        layout = g.layout.resolve(s.s_q) if g.pattern.local else g.layout
        plan = build_plan(g.pattern, layout, s.s_q, s.s_k, block, block, s.is_causal)
        if s.s_q * s.s_k <= (1 << 26) or g.pattern.local:
            pairs = count_pairs(plan, g.pattern, layout, s.is_causal)
        else:  # huge dense site: only the causal triangle matters
            pairs = s.s_q * s.s_k
        if g.mechanism.kind != "linear":
            total += n_h * pairs / (s.s_q * s.s_k)
            full += plan.n_full * n_h
            partial += (plan.nnz - plan.n_full) * n_h
        if not g.mechanism.is_softmax:
            m = g.mechanism.features if g.mechanism.feature_map == "favor" else s.head_dim
            per_row = 2 * m * (s.v_dim + 1) + (2 * 64 * (m + s.v_dim) if s.is_causal else 0)  # states + intra
            lin_pairs = pairs if g.mechanism.kind == "hybrid" and g.pattern.local else 0       # all - P
            feat = 2 * m * s.head_dim if g.mechanism.feature_map == "favor" else 0
            lin += s.batch * n_h * ((s.s_q + s.s_k) * (per_row + feat) + 2 * lin_pairs * (m + s.v_dim))
    d.density = total / s.heads
    d.blocks_full, d.blocks_partial = full, partial
    d.linear_flops = lin


def find_sites(gm: fx.GraphModule, graph_id: int = 0) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for finder in FINDERS:
        for site in finder(gm, start_index=len(sites)):
            site.graph_id = graph_id
            sites.append(site)
    return sites


def rewrite_graph(gm: fx.GraphModule, policy: Policy, backend: str = "", graph_id: int = 0) -> list[Decision]:
    """Find, decide and rewrite every attention site of ``gm`` in place. Returns the decisions."""
    decisions = []
    sites = find_sites(gm, graph_id)
    if any(r.grid == "auto" or r.globals == "auto" for r in (*policy.rules, policy.default)):
        infer_token_grids(gm, sites)
    for site in sites:
        d = decide(site, policy, backend)
        decisions.append(d)
        if not d.rewritten:
            bump("fallback", d.reason.split(" (")[0])
            log.info("locattn: site %s (%s) left alone: %s", site.path or "<root>", site.form, d.reason)
            continue
        spec_json = d.spec.to_json()
        scale = site.effective_scale()

        def op_call(g: fx.Graph, q, k, v, mask, bias, _site=site, _spec=spec_json, _scale=scale, _be=d.backend):
            return g.call_function(torch.ops.locattn.attention.default,
                                   (q, k, v, mask, bias, float(_scale), bool(_site.is_causal), _spec, _be))

        site.replace(op_call)
        bump("rewrite", site.form)
        log.info("locattn: site %s (%s) -> %s", site.path or "<root>", site.form, d.spec.describe())
    if decisions:
        gm.graph.lint()
        gm.recompile()
    for body in _checkpoint_bodies(gm):  # attention inside activation checkpointing: its own subgraph
        decisions += rewrite_graph(body, policy, backend, graph_id)
    return decisions


_CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def _checkpoint_bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The subgraphs of ``torch.utils.checkpoint`` regions in ``gm`` (Dynamo keeps each as a
    ``tag_activation_checkpoint`` higher-order op over a ``get_attr`` GraphModule; recomputation in the backward
    reruns the body, the rewritten op included)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and _CHECKPOINT is not None and node.target is _CHECKPOINT \
                and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            body = getattr(gm, node.args[0].target, None)
            if isinstance(body, fx.GraphModule):
                out.append(body)
    return out


def warn_unmatched(policy: Policy, decisions: list[Decision]) -> None:
    """One warning per rule that matched no site, listing the site paths that exist."""
    paths = sorted({d.site.path for d in decisions})
    for rule in policy.rules:
        if not any(rule.matches(p) for p in paths):
            warnings.warn(f"locattn: {rule.where(policy.source)} matches no attention site; sites: "
                          f"{[p or '<root>' for p in paths]}", LocattnWarning, stacklevel=2)
