"""``locattn.explain``: what the backend does to a model, site by site.

    report = locattn.explain(model, x, policy="policy.toml")
    print(report)            # a table: one row per site, rewritten or left alone with its reason
    report.to_json()         # the same for machines
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .counters import _DENSITY, densities
from .backend import LocattnBackend
from .passes.rewrite import Decision
from .passes.sites import SoftmaxLeft


def _fmt_shape(s) -> str:
    return "x".join(str(x) for x in s)


def _fmt_flops(f: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if f >= div:
            return f"{f / div:.2f}{unit}"
    return f"{f:.0f}"


#: how a calibrated policy's rule comment states the error it measured (``locattn.calibration.report``)
PREDICTED_ERROR = re.compile(r"predicted error ([0-9.]+(?:e[-+]?[0-9]+)?)")


def phase_groups(d: Decision) -> list[tuple[str, Decision]]:
    """A timestep-dependent site's phases, those with the same decision merged: ``[(labels, decision)]``."""
    groups: dict[tuple[str, str], tuple[list[str], Decision]] = {}
    for label, pd in d.phases:
        groups.setdefault((pd.spec.to_json(), pd.backend), ([], pd))[0].append(label)
    return [(" or ".join(labels), pd) for labels, pd in groups.values()]


@dataclass
class Report:
    decisions: list[Decision]
    policy_source: str = ""
    #: measured densities of sites whose pattern is chosen per call (``dynamic``), from the explained run
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    #: one :class:`locattn.parallel.graph.ParallelReport` per graph with ``sequence_parallel``
    parallel: list = field(default_factory=list)
    #: softmaxes that are not attention sites, each with its reason
    softmax_left: list[SoftmaxLeft] = field(default_factory=list)
    #: the policy, when known: a calibrated one's rule comments give each site's predicted error
    policy: Any = None

    def predicted_error(self, d: Decision) -> float | None:
        """A calibrated site's predicted relative output error: its rules' comments combined (root of the sum of
        squares over the site's head groups); None when no rule used says."""
        if self.policy is None:
            return None
        errs = []
        for i in d.rules:
            m = PREDICTED_ERROR.search(self.policy.rules[i].comment) if 0 <= i < len(self.policy.rules) else None
            if m:
                errs.append(float(m.group(1)))
        return math.sqrt(sum(e * e for e in errs)) if errs else None

    @property
    def rewritten(self) -> list[Decision]:
        return [d for d in self.decisions if d.rewritten]

    @property
    def left(self) -> list[Decision]:
        return [d for d in self.decisions if not d.rewritten]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, d in enumerate(self.decisions):
            s = d.site
            meas = self.measured.get(d.spec.site) if d.spec is not None and d.spec.site else None
            density = meas["mean"] if meas else d.density
            out.append({
                "index": i,
                "graph": s.graph_id,
                "path": s.path,
                "form": s.form,
                "q": list(s.q_shape),
                "k": list(s.k_shape),
                "v": list(s.v_shape),
                "layout": s.layout,
                "mask": s.mask_desc,
                "gqa": s.heads != s.kv_heads,
                "rewritten": d.rewritten,
                "pattern": (d.spec.describe() if d.spec is not None else
                            " | ".join(f"{lab}: {pd.spec.describe()}" for lab, pd in phase_groups(d)) if d.phases
                            else None),
                "spec": json.loads(d.spec.to_json()) if d.spec is not None else None,
                "backend": d.backend or "auto",
                "rules": list(d.rules),
                "density": density,
                "density_measured": dict(meas) if meas else None,
                "predicted_error": self.predicted_error(d),
                "blocks_full": d.blocks_full,
                "blocks_partial": d.blocks_partial,
                "attn_flops_dense": d.attn_flops_dense,
                "attn_flops": (int(round(d.attn_flops_dense * density)) if d.rewritten and density is not None
                               else d.attn_flops_dense),
                "reason": d.reason,
                "notes": list(d.notes),
                "replaced": list(s.replaced),
                "token_grid": getattr(s, "token_grid_desc", None),
                "phases": [{"timesteps": lab, "pattern": pd.spec.describe(), "spec": json.loads(pd.spec.to_json()),
                            "backend": pd.backend or "auto", "rules": list(pd.rules), "density": pd.density,
                            "blocks_full": pd.blocks_full, "blocks_partial": pd.blocks_partial}
                           for lab, pd in d.phases],
            })
        return out

    def to_json(self, **kw) -> str:
        out = {"policy": self.policy_source, "sites": self.rows(),
               "softmax_left": [dataclasses.asdict(x) for x in self.softmax_left]}
        if self.parallel:
            from .parallel.graph import report_dict

            out["sequence_parallel"] = [report_dict(p) for p in self.parallel]
        return json.dumps(out, **kw)

    def __str__(self) -> str:
        rows = self.rows()
        calibrated = any(r["predicted_error"] is not None for r in rows)
        head = ["#", "path", "form", "q", "k", "mask", "pattern", "density", "blocks f/p", "FLOPs dense->ours"]
        if calibrated:
            head.insert(8, "pred. err")
        table = []
        for r in rows:
            if r["rewritten"] and r["phases"]:   # one density per distinct phase decision, in the pattern's order
                pat = r["pattern"]
                dens = "|".join(f"{pd.density:.3f}" if pd.density is not None else "?"
                                for _, pd in phase_groups(self.decisions[r["index"]]))
                blocks = f"{r['blocks_full']}/{r['blocks_partial']}"
                flops = f"{_fmt_flops(r['attn_flops_dense'])}->{_fmt_flops(r['attn_flops'])}"
            elif r["rewritten"]:
                pat = r["pattern"]
                dens = f"{r['density']:.3f}" if r["density"] is not None else "?"
                if r["density_measured"]:
                    m = r["density_measured"]
                    dens = f"~{m['mean']:.3f} ({m['min']:.3f}-{m['max']:.3f})"
                blocks = f"{r['blocks_full']}/{r['blocks_partial']}"
                flops = f"{_fmt_flops(r['attn_flops_dense'])}->{_fmt_flops(r['attn_flops'])}"
            else:
                pat, dens, blocks, flops = "(left alone)", "1", "-", _fmt_flops(r["attn_flops_dense"])
            table.append([str(r["index"]), r["path"] or "<root>", r["form"] + (" gqa" if r["gqa"] else ""),
                          _fmt_shape(r["q"]), _fmt_shape(r["k"]), r["mask"], pat, dens, blocks, flops])
            if calibrated:
                e = r["predicted_error"]
                table[-1].insert(8, "0" if e is None and r["rewritten"] else (f"{e:.2e}" if e is not None else "-"))
        widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
        lines = [f"locattn explain: {len(rows)} attention site(s), {len(self.rewritten)} rewritten, "
                 f"{len(self.left)} left alone (policy: {self.policy_source})"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for t in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(t, widths)))
        notes = [(r["index"], r["reason"]) for r in rows if not r["rewritten"]]
        notes += [(r["index"], n) for r in rows for n in r["notes"]]
        notes += [(r["index"], "grid: " + r["token_grid"]) for r in rows if r["token_grid"]]
        notes += [(r["index"], "replaced nodes: " + ", ".join(r["replaced"])) for r in rows if r["form"] != "sdpa"]
        if notes:
            lines.append("")
            lines += [f"  [{i}] {n}" for i, n in sorted(notes, key=lambda x: x[0])]
        if self.softmax_left:
            lines.append("")
            lines.append(f"{len(self.softmax_left)} softmax(es) not attention, left alone:")
            lines += [f"  {x.path or '<root>'} ({x.node}): {x.reason}" for x in self.softmax_left]
        dense = sum(r["attn_flops_dense"] for r in rows)
        ours = sum(r["attn_flops"] for r in rows)
        if dense:
            most = " (timestep-dependent sites counted at their densest phase)" if any(r["phases"] for r in rows) else ""
            lines.append(f"attention FLOPs: dense {_fmt_flops(dense)}, with this policy {_fmt_flops(ours)} "
                         f"({ours / dense:.1%}){most}")
        lines += [p.describe() for p in self.parallel]
        return "\n".join(lines)


def explain(model: torch.nn.Module | Any, *args, policy: Any = None, backend: str = "", dynamic: bool | None = None,
            inductor: bool = False, timestep_arg: str = "timestep", sequence_parallel: Any = None,
            **kwargs) -> Report:
    """Compile ``model`` with the locattn backend, run it once on ``args``/``kwargs`` and report every site.

    Resets Dynamo's caches first (so the model is traced afresh). With ``inductor=False`` (default) the
    rewritten graphs run eagerly, which is enough to see every decision and much faster.
    ``sequence_parallel={"world_size": 4}`` (one process, no process group) adds the plan for a group of that
    size: shard and gather points, each site's cut per rank, and the bytes each rank sends vs all-gather, ring
    and Ulysses attention (or why the graph would not be sharded).
    """
    torch._dynamo.reset()
    b = LocattnBackend(policy, backend=backend, inductor=inductor, timestep_arg=timestep_arg,
                       sequence_parallel=sequence_parallel)
    compiled = torch.compile(model, backend=b, dynamic=dynamic)
    before = _DENSITY.copy()
    _DENSITY.clear()  # measure this run's dynamic sites alone
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
        measured = densities()
    finally:
        _DENSITY.clear()
        _DENSITY.update(before)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        b.warn_unmatched()
    torch._dynamo.reset()
    return Report(b.decisions, b.policy.source, measured, list(b.parallel_reports), b.softmax_left, b.policy)
