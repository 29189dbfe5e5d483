"""``policy = "auto"``: calibrate on the first calls, then recompile once with the chosen policy.

    model = torch.compile(model, backend="locattn", options={"policy": "auto", "budget": 0.02})

For each Dynamo graph the backend returns an :class:`AutoGraph`. Its first ``calibration_calls`` calls (default
2) run the graph exactly (every site dense through the op) while each site scores its candidates on the
call's tensors (:mod:`.record`); the call after them calibrates (:mod:`.engine`: costs, search, validation on
the recorded calls, the last ``n // 4`` held out), compiles the graph once more with the chosen policy (the
ordinary locattn backend: rewrite, then Inductor) and from then on runs that compiled graph. Its outputs equal
a model compiled with the saved policy (``save_policy``). Graph breaks: each graph calibrates on its own
outputs; the saved file collects the rules of every graph of that path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..backend import AUTO_OPTIONS
from ..counters import bump, log
from ..policy import Policy
from .engine import Engine, Options
from .metrics import detach
from .record import Session, clone_graph_module

#: rules of every graph saved to one path, so that graph breaks do not overwrite each other's rules
_SAVED: dict[str, list[Policy]] = {}


@dataclass
class AutoOptions:
    budget: float = 0.02
    calibration_calls: int = 2
    save_policy: str | None = None
    metric: Callable[[Any, Any], float] | None = None
    candidates: list | None = None
    cost: str = "time"
    progress: bool = False
    rows: int = 128

    @classmethod
    def from_options(cls, options: dict) -> "AutoOptions":
        ao = cls(**{k: v for k, v in options.items() if k in AUTO_OPTIONS})
        n = ao.calibration_calls
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"locattn: option 'calibration_calls' must be an integer >= 1, got {n!r}")
        Options(budget=ao.budget, metric=ao.metric, cost=ao.cost, rows=ao.rows).check()
        return ao


def _keep(args) -> list:
    """The call's inputs for later replays: parameters by reference, other tensors copied (a caller may reuse
    its input buffers)."""
    return [a if isinstance(a, torch.nn.Parameter) or not isinstance(a, torch.Tensor) else a.detach().clone()
            for a in args]


class AutoGraph:
    """What the backend returns for one graph under ``policy = "auto"`` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, example_inputs, opts: AutoOptions, compile_with: Callable):
        self.opts = opts
        self.pristine = clone_graph_module(gm)
        self.example_inputs = example_inputs
        self.compile_with = compile_with   # (policy, gm, example_inputs) -> compiled (the ordinary backend)
        self.session = Session(candidates=opts.candidates, rows=opts.rows)
        self.tapped = clone_graph_module(gm)
        self.session.tap_graph(self.tapped)
        self.engine = Engine(self.session, self._replay, opts.calibration_calls,
                             Options(budget=opts.budget, metric=opts.metric, candidates=opts.candidates,
                                     progress=opts.progress, cost=opts.cost, rows=opts.rows),
                             model=f"graph of {len(gm.graph.nodes)} nodes (policy = \"auto\")", sample_shapes=[])
        self.inputs: list[list] = []
        self.compiled: Callable | None = None
        self.policy: Policy | None = None
        self.calibration = None

    def _replay(self, i: int):
        return self.tapped(*self.inputs[i])

    def __call__(self, *args):
        if self.compiled is not None:
            return self.compiled(*args)
        i = len(self.inputs)
        if i < self.opts.calibration_calls:
            self.inputs.append(_keep(args))
            s = self.session
            s.sample, s.mode = i, ("score" if i in self.engine.fit else "shapes")
            try:
                out = self.tapped(*args)
            finally:
                s.mode = "off"
            self.engine.refs[i] = detach(out)
            return out
        self._switch()
        return self.compiled(*args)

    def _switch(self) -> None:
        if not self.session.sites:   # nothing to calibrate in this graph: compile it as it is
            self.policy = Policy()
        else:
            self.engine.sample_shapes = [f"{len(self.inputs)} calls"]
            self.calibration = self.engine.calibrate(recorded=True)
            self.policy = self.calibration.policy
            log.info("locattn: policy = \"auto\" calibrated on %d call(s):\n%s", len(self.inputs),
                     self.calibration.report.summary())
            if self.opts.save_policy:
                _save(self.opts.save_policy, self.policy)
        self.compiled = self.compile_with(self.policy, self.pristine, self.example_inputs)
        bump("calibration", "auto recompiled")
        # free what only the calibration needed
        self.inputs, self.tapped, self.session, self.engine.refs = [], None, None, []


def _save(path: str, policy: Policy) -> None:
    """Write ``policy`` to ``path``, with the rules of earlier graphs saved there by this process."""
    earlier = _SAVED.setdefault(path, [])
    earlier.append(policy)
    rules = tuple(r for p in earlier for r in p.rules)
    merged = dataclasses.replace(policy, rules=tuple(dataclasses.replace(r, index=i) for i, r in enumerate(rules)),
                                 comments=tuple(c for p in earlier for c in p.comments))
    with open(path, "w") as f:
        f.write(merged.to_toml())
