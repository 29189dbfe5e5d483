"""Decide each site's pattern from the policy, then rewrite it into one ``locattn::attention`` call.

``rewrite_graph(gm, policy)`` runs the finders, asks the policy per site (per head), validates the result
against the site's shapes, replaces the site and returns one :class:`Decision` per site — rewritten or left
alone, always with a reason. Every outcome is counted (``locattn.counters()``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..counters import bump, log
from ..ops_phased import phased_specs  # (and registers torch.ops.locattn.attention_phased)
from ..patterns import PATTERNS
from ..patterns.base import Layout, PatternError, count_allowed
from ..patterns.mechanism import SOFTMAX, Mechanism
from ..patterns.plan import build_plan, count_pairs
from ..patterns.spec import DENSE_SPEC, HeadGroup, SiteSpec, head_ranges
from ..policy import Globals, Policy, PolicyError, Rule
from .causal_mask import emit_guards
from .expand_mha import expand_mha
from .find_sdpa import find_sdpa_sites
from .grid_infer import infer_token_grids
from .grid_packed import infer_packed_grids
from .match_manual import find_manual_sites
from .phases import Phases, find_timestep_input, insert_phase_node, timestep_error
from .sites import AttentionSite, SoftmaxLeft


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
    notes: list[str] = field(default_factory=list)
    #: timestep-dependent sites: ``(phase label, decision in that phase)`` for every phase, in phase order
    phases: tuple[tuple[str, "Decision"], ...] = ()
    #: (density, blocks_full, blocks_partial, linear_flops), computed on first read: compiling never pays for
    #: statistics
    _stats: tuple[float | None, int, int, int] | None = field(default=None, repr=False)

    @property
    def density(self) -> float | None:
        """Fraction of the dense score matrix computed (pattern & causal; the site mask is not counted), exact,
        averaged over head groups; None for a site left alone or one with a ``dynamic`` group (measured at run
        time); a timestep-phased site: its densest phase's."""
        return self._measure()[0]

    @property
    def blocks_full(self) -> int:
        """Full 64 x 64 blocks of the block plan, summed over heads."""
        return self._measure()[1]

    @property
    def blocks_partial(self) -> int:
        return self._measure()[2]

    @property
    def linear_flops(self) -> int:
        """FLOPs of linear / hybrid feature sums (not part of ``density``)."""
        return self._measure()[3]

    def _measure(self) -> tuple[float | None, int, int, int]:
        if self._stats is None:
            self._stats = _measure(self)
        return self._stats

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
                                  f"{site.path or '<root>'!r} (it has {n_heads} heads"
                                  + "".join(f"; {n}" for n in site.notes) + ")")
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
            why = f" ({site.token_grid_why})" if site.token_grid_why else ""
            raise PolicyError(f"{where}: grid/globals = \"auto\" but no token grid could be inferred for this "
                              f"site{why}; give 'grid' (and 'globals') explicitly: its {site.s_q} tokens are "
                              f"[prefix][grid, row-major][suffix], e.g. grid = [H, W] (or [T, H, W]) of the "
                              f"latent after patching and globals = {{prefix = N}} for N text tokens first")
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
            resolved = layout.resolve(site.s_k)
            pattern.validate(resolved.grid)
        except PatternError as e:
            raise PolicyError(f"{where}: {e}") from None
    return layout


def _site_backend(site: AttentionSite, groups, policy: Policy, backend: str) -> str:
    """The one implementation override of a site: ``options={"backend": ...}`` (``backend``) first, then the
    rules' ``backend`` key, then the policy's top-level one. The op runs one backend per call, so head groups whose
    rules name different backends are an error; a rule's backend that the option overrides is a warning."""
    named = {rule.backend for _, rule in groups}
    if len(named) > 1:
        parts = "; ".join(f"heads {head_ranges(heads)}: {rule.backend or '(none)'} from {rule.where(policy.source)}"
                          for heads, rule in groups)
        raise PolicyError(f"site {site.path or '<root>'!r}: its head groups name different backends ({parts}); a "
                          f"site runs one backend: give every rule that matches it the same 'backend', or set the "
                          f"top-level one")
    rule_backend = named.pop() if named else ""
    if backend and backend != "auto":
        if rule_backend and rule_backend != backend:
            warnings.warn(f"locattn: site {site.path or '<root>'!r}: options backend={backend!r} overrides "
                          f"backend={rule_backend!r} of its policy rule", LocattnWarning, stacklevel=3)
        return backend
    return rule_backend or policy.backend


def decide(site: AttentionSite, policy: Policy, backend: str = "") -> Decision:
    """The policy's decision for one site (no graph change)."""
    if site.blocker:
        return Decision(site, False, reason=site.blocker)
    groups, skip = _assign_heads(site, policy)
    if skip is not None:
        return Decision(site, False, reason=f"policy: skip ({skip.where(policy.source)})", rules=(skip.index,))
    notes: list[str] = list(site.notes)
    head_groups = []
    chosen_backend = _site_backend(site, groups, policy, backend)
    for heads, rule in groups:
        pattern = rule.pattern
        assert pattern is not None
        mech = rule.mechanism
        offset = pattern.local and site.s_q < site.s_k and pattern.causal_rule
        if not mech.is_softmax:
            refused = mechanism_refusal(site, mech, offset)
            if refused:
                msg = (f"mechanism {mech.kind} from {rule.where(policy.source)} refused: {refused}; "
                       f"heads {list(heads)} stay exact softmax")
                notes.append(msg)
                warnings.warn(f"locattn: site {site.path or '<root>'!r}: {msg}", LocattnWarning, stacklevel=2)
                bump("fallback", f"mechanism {mech.kind} refused: {refused.split(' (')[0]}")
                head_groups.append((heads, rule, PATTERNS["dense"](), Layout(), SOFTMAX))
                continue
        if pattern.local and site.s_q != site.s_k and not offset:
            msg = (f"cross-attention (Sq={site.s_q} != Sk={site.s_k}): {pattern.name} from "
                   f"{rule.where(policy.source)} needs self-attention (or a causal rule: queries at the end); "
                   f"kept dense")
            notes.append(msg)
            warnings.warn(f"locattn: site {site.path or '<root>'!r}: {msg}", LocattnWarning, stacklevel=2)
            bump("fallback", "cross-attention kept dense")
            head_groups.append((heads, rule, PATTERNS["dense"](), Layout(), SOFTMAX))
            continue
        layout = _layout_for(site, rule, policy) if pattern.local else Layout()
        if offset:
            if layout.grid is not None and len(layout.grid) != 1:
                raise PolicyError(f"{rule.where(policy.source)} at site {site.path or '<root>'!r}: a causal rule on "
                                  f"a site with fewer queries than keys (Sq={site.s_q} < Sk={site.s_k}) needs a 1-D "
                                  f"layout, got grid {list(layout.grid)}")
            notes.append(f"queries are the last {site.s_q} of {site.s_k} positions (causal rule)")
        head_groups.append((heads, rule, pattern, layout, mech))
    all_heads = len(head_groups) == 1
    dynamic = any(p.dynamic for _, _, p, _, _ in head_groups)
    if dynamic:
        notes.append("dynamic: density measured at run time (locattn.densities(), explain after a call)")
    spec = SiteSpec(tuple(HeadGroup(None if all_heads else heads, p, lay, mech)
                          for heads, _, p, lay, mech in head_groups),
                    site=(site.path or "<root>") if dynamic else "", softcap=site.softcap)
    return Decision(site, True, spec=spec, backend=chosen_backend,
                    rules=tuple(r.index for _, r, _, _, _ in head_groups), notes=notes)


def decide_phased(site: AttentionSite, policy: Policy, phases: Phases, backend: str = "") -> Decision:
    """The policy's decision for one site in every timestep phase: a plain :class:`Decision` when the phases
    agree, else one whose ``phases`` hold each phase's decision (a phase where the site is skipped runs the
    exact dense pattern inside the phased op)."""
    per = [decide(site, phases.policy_for(policy, k), backend) for k in range(phases.count)]
    key = [(d.rewritten, d.spec.to_json() if d.spec is not None else d.reason, d.backend) for d in per]
    if len(set(key)) == 1:
        return per[0]
    for k, d in enumerate(per):
        if not d.rewritten:  # only a skip rule differs between phases (a site blocker applies to all)
            dense = DENSE_SPEC if not site.softcap else SiteSpec(DENSE_SPEC.groups, softcap=site.softcap)
            per[k] = Decision(site, True, spec=dense, backend=d.backend or backend or policy.backend,
                              rules=d.rules, notes=[f"{d.reason}: runs dense in this phase"])
    rules = tuple(dict.fromkeys(r for d in per for r in d.rules))
    return Decision(site, True, rules=rules, notes=[n for d in per for n in d.notes],
                    phases=tuple((phases.label(k), d) for k, d in enumerate(per)))


def mechanism_refusal(site: AttentionSite, mech: Mechanism, offset: bool = False) -> str:
    """Why ``mech`` (linear / hybrid) cannot attend ``site`` ("" if it can): it sums feature products over the
    keys the site allows, so a float bias, or a mask that is not a key-padding mask, has no place to go; a soft
    cap bends the scores the features estimate; queries at the end of the keys (``offset``: a causal rule with
    S_q < S_k) are not among the linear sums' alignments."""
    if site.softcap:
        return f"the site soft-caps its scores (softcap={site.softcap:g}; linear features estimate exp(q·k) only)"
    if offset:
        return f"queries at the end of the keys (Sq={site.s_q} < Sk={site.s_k}) under a causal rule"
    if site.bias is not None:
        return f"the site adds a float bias {site.mask_desc} (linear attention has no scores to add it to)"
    if site.mask is not None:
        shape = site.mask_shape
        if shape is None or (len(shape) >= 2 and shape[-2] != 1):
            return (f"the site's bool mask {site.mask_desc} is not a key-padding mask ([..., 1, Sk]; linear "
                    f"attention honours key padding only)")
    return ""


def _measure(d: Decision, block: int = 64) -> tuple[float | None, int, int, int]:
    """``(density, full blocks, partial blocks)`` of a rewritten site: density exact in O(S) per head group
    (:func:`count_allowed`, pattern & causal), blocks from the block plan in O(blocks visited). A phased site
    reports its densest phase; a site with a ``dynamic`` group has no static density (None). Linear / hybrid
    groups count their softmax pairs (none for linear) in the density and their feature sums in ``linear_flops``."""
    if d.phases:
        stats = [pd._measure() for _, pd in d.phases]
        if any(st[0] is None for st in stats):
            return None, 0, 0, 0
        return max(stats, key=lambda st: st[0])
    s = d.site
    if d.spec is None or s.s_q <= 0 or s.s_k <= 0:
        return None, 0, 0, 0
    total, full, partial, lin = 0.0, 0, 0, 0
    for g in d.spec.groups:
        n_h = len(g.heads) if g.heads is not None else s.heads
        if g.pattern.dynamic:  # chosen per call: measured at run time
            return None, 0, 0, 0
        layout = g.layout.resolve(s.s_k) if g.pattern.local else g.layout
        off = s.s_k - s.s_q if g.pattern.local else 0
        plan = build_plan(g.pattern, layout, s.s_q, s.s_k, block, block, s.is_causal, off)
        if off:  # queries at the end of the keys (a causal rule, LM decoding): few rows, walk the plan
            pairs = count_pairs(plan, g.pattern, layout, s.is_causal)
        else:
            pairs = count_allowed(g.pattern, layout, s.s_q, s.s_k, s.is_causal)
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
    return total / s.heads, full, partial, lin


def find_sites(gm: fx.GraphModule, graph_id: int = 0, left: list[SoftmaxLeft] | None = None) -> list[AttentionSite]:
    """Every site of ``gm``; softmaxes that are not attention go to ``left`` with their reason."""
    sites: list[AttentionSite] = expand_mha(gm)        # F.multi_head_attention_forward -> SDPA (or reported)
    for finder in FINDERS:
        found = finder(gm, start_index=len(sites), left=left) if finder is find_manual_sites else \
            finder(gm, start_index=len(sites))
        sites += found
    for site in sites:
        site.graph_id = graph_id
    return sites


def rewrite_graph(gm: fx.GraphModule, policy: Policy, backend: str = "", graph_id: int = 0,
                  timestep_arg: str = "timestep", example_inputs=None,
                  left: list[SoftmaxLeft] | None = None) -> list[Decision]:
    """Find, decide and rewrite every attention site of ``gm`` in place. Returns the decisions; softmaxes that
    are not attention are appended to ``left`` (each counted and logged with its reason).

    With ``timesteps`` rules (:mod:`.phases`) the graph input named ``timestep_arg`` gives each call's phase.
    ``example_inputs`` (the compile-time inputs) let ``grid = "auto"`` read positional ids (:mod:`.grid_packed`)."""
    decisions = []
    mine: list[SoftmaxLeft] = []
    sites = find_sites(gm, graph_id, mine)
    for sm in mine:
        sm = dataclasses.replace(sm, graph_id=graph_id)
        bump("softmax_left", sm.reason.split(":")[0])
        log.info("locattn: softmax %s in %s is not attention: %s", sm.node, sm.path or "<root>", sm.reason)
        if left is not None:
            left.append(sm)
    if any(r.grid == "auto" or r.globals == "auto" for r in (*policy.rules, policy.default)):
        infer_token_grids(gm, sites)
        infer_packed_grids(gm, sites, example_inputs)
    phases = Phases.of(policy) if policy.timestep_rules else None
    phase_node = None
    if phases is not None and find_timestep_input(gm, timestep_arg) is None:
        for site in sites:  # a timestep rule that takes a site needs the input even if the phases agree
            rule = next((r for r in policy.timestep_rules if r.matches(site.path)), None)
            if rule is not None and not site.blocker:
                raise timestep_error(rule, policy, site, gm, timestep_arg)
    for site in sites:
        d = decide(site, policy, backend) if phases is None else decide_phased(site, policy, phases, backend)
        decisions.append(d)
        if not d.rewritten:
            bump("fallback", d.reason.split(" (")[0])
            log.info("locattn: site %s (%s) left alone: %s", site.path or "<root>", site.form, d.reason)
            continue
        scale = site.effective_scale()
        if d.phases:
            if phase_node is None:
                phase_node = insert_phase_node(gm, find_timestep_input(gm, timestep_arg), phases,
                                               f"{policy.timestep_rules[0].where(policy.source)}: key 'timesteps'")
            payload = phased_specs([pd.spec.to_json() for _, pd in d.phases], [pd.backend for _, pd in d.phases])

            def op_call(g: fx.Graph, q, k, v, mask, bias, _site=site, _p=payload, _scale=scale, _ph=phase_node, _d=d):
                node = g.call_function(torch.ops.locattn.attention_phased.default,
                                       (q, k, v, mask, bias, _ph, float(_scale), bool(_site.is_causal), _p, ""))
                node.meta["locattn_decision"] = _d
                return node
            what = "; ".join(f"{label}: {pd.spec.describe()}" for label, pd in d.phases)
        else:
            spec_json = d.spec.to_json()

            def op_call(g: fx.Graph, q, k, v, mask, bias, _site=site, _spec=spec_json, _scale=scale, _be=d.backend,
                        _d=d):
                node = g.call_function(torch.ops.locattn.attention.default,
                                       (q, k, v, mask, bias, float(_scale), bool(_site.is_causal), _spec, _be))
                node.meta["locattn_decision"] = _d  # later passes (sequence parallelism) find the site's decision
                return node
            what = d.spec.describe()

        if site.causal_proof is not None:   # before the rewrite, while the mask's nodes are certainly alive
            emit_guards(gm.graph, site.causal_proof)
            bump("causal_proven", site.form)
        site.replace(op_call)
        bump("rewrite", site.form)
        log.info("locattn: site %s (%s) -> %s", site.path or "<root>", site.form, what)
    if decisions:
        gm.graph.lint()
        gm.recompile()
    for body in _checkpoint_bodies(gm):  # attention inside activation checkpointing: its own subgraph
        decisions += rewrite_graph(body, policy, backend, graph_id, timestep_arg, left=left)
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
