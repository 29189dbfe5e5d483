"""What a calibration decided and measured, and the policy it writes.

:func:`build_policy` turns a per-(site, head) choice into a :class:`locattn.Policy` whose rules name each site
by its exact module path (glob characters escaped), one rule per distinct non-dense candidate of a site
(``heads = ...`` when a site mixes candidates; dense heads fall to the dense ``[default]``), each commented
with the error it measured. :class:`CalibrationReport` carries the provenance that heads the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from ..patterns.spec import head_ranges
from ..policy import Policy
from .candidates import Candidate
from .cost import head_costs


def escape_glob(path: str) -> str:
    """A module path as an fnmatch pattern matching exactly that path."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


@dataclass
class SiteResult:
    """One site's outcome. ``predicted_error``: the site's relative output error on the sampled rows
    (``sqrt`` of its heads' summed squared shares); ``scores_kept`` / ``mass_kept``: over heads."""

    path: str
    heads: int
    choice: list[str]
    predicted_error: float
    mass_kept: float
    scores_kept: float
    cost_dense: float
    cost: float
    backed_off: bool = False


@dataclass
class CalibrationReport:
    """Provenance and measurements of one calibration (``Calibration.report``)."""

    model: str
    sample_shapes: list[str]
    n_fit: int
    n_holdout: int
    budget: float
    metric: str
    cost_mode: str
    proxy: str = "output"
    fit_error: float | None = None
    holdout_error: float | None = None
    met: bool = True
    note: str = ""
    scores_kept: float = 1.0
    time_ratio: float = 1.0
    evaluations: list[tuple[str, float, float]] = field(default_factory=list)   # (what, proxy E, metric)
    backed_off: list[str] = field(default_factory=list)
    #: held-out validation's re-solved choices: (proxy E, held-out metric) of each, in order
    resolved: list[tuple[float, float]] = field(default_factory=list)
    sites: list[SiteResult] = field(default_factory=list)
    wall_s: float = 0.0
    #: phase -> (wall s, process CPU s): record, cost, search, validate
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    versions: str = ""

    def header(self) -> list[str]:
        held = (f"{self.n_holdout} held out" if self.n_holdout else "no held-out sample: validated in-sample")
        lines = [
            f"locattn calibrate: model {self.model}",
            f"samples: {', '.join(self.sample_shapes)} ({self.n_fit} to fit, {held})",
            f"budget {self.budget:g} on {self.metric}; measured end-to-end: "
            f"{_fmt(self.holdout_error)} held out, {_fmt(self.fit_error)} on the fit samples",
            f"predicted savings: attention scores kept {self.scores_kept:.1%} of those the sites allow; "
            f"attention time {self.time_ratio:.1%} of dense (cost: {self.cost_mode}, per-head error proxy: "
            f"{self.proxy})",
        ]
        if self.resolved:
            steps = ", ".join(f"E {e:.3g}: {m:.4g}" for e, m in self.resolved)
            lines.append(f"held-out validation re-solved the knapsack {len(self.resolved)} time(s) (proxy error: "
                         f"held-out metric: {steps}); the fit-sample figure is the search's choice")
        if self.backed_off:
            lines.append(f"validation backed off {len(self.backed_off)} site(s) to dense: {', '.join(self.backed_off)}")
        if self.note:
            lines.append(self.note)
        split = ", ".join(f"{k} {w:.0f}" for k, (w, _) in self.phases.items())
        lines.append(f"{self.versions}; calibration took {self.wall_s:.0f} s" + (f" ({split})" if split else ""))
        return lines

    def summary(self) -> str:
        return "\n".join(self.header())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def rule_comment(path: str, heads: list[int], n_heads: int, err: torch.Tensor, mass: torch.Tensor,
                 kept: torch.Tensor, ratio: float) -> str:
    """One rule's comment: its heads' predicted error (relative output error, sqrt of summed shares), mass
    and scores kept (mean over its heads), and its time relative to dense."""
    e = math.sqrt(float(err.sum()))
    who = "all heads" if len(heads) == n_heads else f"heads {head_ranges(tuple(heads))} of {n_heads}"
    return (f"{path or '<root>'} ({who}): predicted error {e:.3e} (relative output), mass kept "
            f"{float(mass.mean()):.1%}, scores kept {float(kept.mean()):.1%}, time {ratio:.2f}x dense")


def build_policy(sites: list, choice: dict[str, torch.Tensor], header: list[str] | None = None,
                 source: str = "<calibrated>") -> Policy:
    """The policy selecting ``choice[path][h]`` (a candidate index of ``sites``' records) per head."""
    rules = []
    comments = []
    for rec in sites:
        ch = choice.get(rec.path)
        if ch is None:
            continue
        groups: dict[int, list[int]] = {}
        for h, c in enumerate(ch.tolist()):
            if not rec.candidates[c].is_dense:
                groups.setdefault(c, []).append(h)
        err, mass, kept = rec.stats.error(), rec.stats.mass_kept(), rec.stats.kept_fraction()
        for c, heads in groups.items():
            cand: Candidate = rec.candidates[c]
            r = {"match": escape_glob(rec.path), **cand.rule()}
            if len(heads) != rec.heads:
                r = {"match": r.pop("match"), "heads": head_ranges(tuple(heads)), **r}
            rules.append(r)
            idx = torch.tensor(heads)
            ratio = float("nan")
            if rec.costs is not None and rec.costs[0] > 0:   # the rule's heads' share of the cost vs dense's
                ratio = float(head_costs(cand, rec.costs[c], rec.stats.kept[:, c])[idx].sum()) / \
                    (rec.costs[0] * len(heads) / rec.heads)
            comments.append(rule_comment(rec.path, heads, rec.heads, err[idx, c], mass[idx, c], kept[idx, c], ratio))
    d = {"version": 1, "default": {"pattern": "dense"}}
    if rules:
        d["rule"] = rules
    policy = Policy.from_dict(d, source=source)
    return dataclasses.replace(policy, comments=tuple(header or ()),
                               rules=tuple(dataclasses.replace(r, comment=c) for r, c in zip(policy.rules, comments)))
