"""Timestep phases: rules with ``timesteps = [lo, hi]`` inside one compiled graph, without recompiling.

A diffusion model is called once per denoising step with a ``timestep`` tensor. A rule with
``timesteps = [lo, hi]`` applies only to calls whose timestep lies in that inclusive range. The bounds of all
such rules cut the real line into **phases** (at most ``2R + 1`` for ``R`` ranges); inside a phase every rule is
either active or not, so a site's decision is fixed per phase. The backend decides every site once per phase at
compile time; a site whose decisions differ between phases is rewritten into ``locattn::attention_phased``,
which carries every phase's spec string and picks one at run time.

How the phase reaches the op (one decision per model call, no recompile, no sync per attention call):

1. The graph computes the phase once per call from the timestep input, on the timestep's device:
   ``phase = sum_e (t >= x_e  or  t > x_e)`` over the sorted range bounds (``int32``, one entry per timestep
   element; ``t`` compared in float32), then copies it to the host (``.to("cpu")``): one small device-to-host
   copy per model call, the only synchronisation the schedule adds.
2. Every phased op of the graph takes that CPU tensor as an input and reads it without a device sync.
   The phase is data, not a guard: Dynamo never specialises on the timestep's value, so switching phase
   never recompiles.
3. Under CUDA graphs (``options={"triton.cudagraphs": True}``, what ``mode="reduce-overhead"`` turns on) the
   phased op is tagged ``cudagraph_unsafe``: Inductor's graph partitioning runs it (and the device-to-host
   copy) outside the recorded graphs, so a replay never bakes in the phase of the recording; the rest of the
   model is still replayed from CUDA graphs.

Sites that no timestep rule changes keep the plain ``locattn::attention`` op with the same spec string as
without ``timesteps`` (byte-identical).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..policy import Policy, PolicyError, Rule
from .sites import AttentionSite, example


@dataclass(frozen=True)
class Phases:
    """The phases of a policy: ``edges`` sorted; a timestep ``t`` is in phase ``#{e: t >= x_e}`` where an edge
    ``(x, strict)`` counts when ``t > x`` (strict, just above a range's ``hi``) or ``t >= x`` (a range's ``lo``)."""

    edges: tuple[tuple[float, bool], ...]

    @classmethod
    def of(cls, policy: Policy) -> "Phases":
        edges = set()
        for r in policy.timestep_rules:
            lo, hi = r.timesteps
            edges.add((float(lo), False))
            edges.add((float(hi), True))
        return cls(tuple(sorted(edges)))  # (x, False) before (x, True): the indicators are monotone in t

    @property
    def count(self) -> int:
        return len(self.edges) + 1

    def of_timestep(self, t: float) -> int:
        """The phase of timestep ``t`` (the host mirror of the graph's computation)."""
        return sum(1 for x, strict in self.edges if (t > x if strict else t >= x))

    def representative(self, k: int) -> float:
        """A timestep inside phase ``k`` (phases between ``(x, >=)`` and ``(x, >)`` are the single point x)."""
        if not self.edges:
            return 0.0
        if k == 0:
            return self.edges[0][0] - 1.0
        if k == len(self.edges):
            return self.edges[-1][0] + 1.0
        (a, _), (b, _) = self.edges[k - 1], self.edges[k]
        return a if a == b else (a + b) / 2

    def label(self, k: int) -> str:
        """``"t in [800, 1000]"``, ``"t < 800"``, ``"t > 1000"``, ``"t in (200, 800)"``, ``"t = 500"``."""
        lo = self.edges[k - 1] if k > 0 else None
        hi = self.edges[k] if k < len(self.edges) else None
        f = _num
        if lo is None and hi is None:
            return "any t"
        if lo is None:
            return f"t {'<=' if hi[1] else '<'} {f(hi[0])}"
        if hi is None:
            return f"t {'>' if lo[1] else '>='} {f(lo[0])}"
        if lo[0] == hi[0]:
            return f"t = {f(lo[0])}"
        return f"t in {'(' if lo[1] else '['}{f(lo[0])}, {f(hi[0])}{']' if hi[1] else ')'}"

    def policy_for(self, policy: Policy, k: int) -> Policy:
        """``policy`` as it stands in phase ``k``: its rules without ``timesteps`` and the ranges covering k."""
        t = self.representative(k)
        return dataclasses.replace(policy, rules=tuple(r for r in policy.rules if r.active_at(t)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def find_timestep_input(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The graph input that is the model's argument ``name``. Dynamo names a placeholder after its source:
    ``L['timestep']`` -> ``l_timestep_``; an argument reached through ``**kwargs`` (diffusers' decorated
    ``forward``) -> ``l_kwargs_timestep_``. A graph built otherwise (``symbolic_trace``) uses the name itself."""
    want = {name, f"l_{name}_", f"l_kwargs_{name}_", f"L_{name}_", f"L_kwargs_{name}_"}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target in want:
            return n
    return None


def _placeholders(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes  # parameters and buffers are graph inputs too: not worth listing
            if n.op == "placeholder" and not re.search(r"_(parameters|buffers)_", str(n.target))]


def insert_phase_node(gm: fx.GraphModule, t: fx.Node, phases: Phases, where: str) -> fx.Node:
    """Nodes computing the phase of every element of the timestep input ``t`` (int32, on the host): shape
    ``[N]`` for a 0-/1-D timestep (per batch element), ``[1, N]`` for more dims (per token: one phase per call
    is required). Placed right after the graph's inputs."""
    ev = example(t)
    if not isinstance(ev, torch.Tensor):
        raise PolicyError(f"{where}: the timestep input {t.target!r} is a Python number, which Dynamo turns into a "
                          f"constant (a recompile per value): pass the timestep as a tensor")
    if ev.dtype == torch.bool or ev.is_complex():
        raise PolicyError(f"{where}: the timestep input {t.target!r} has dtype {ev.dtype}; expected numbers")
    g = gm.graph
    first = next(n for n in g.nodes if n.op != "placeholder")
    with g.inserting_before(first):  # nodes created here keep their order
        tf = g.call_method("to", (g.call_method("reshape", (t, (-1,) if ev.dim() <= 1 else (1, -1))), torch.float32))
        phase = None
        for x, strict in phases.edges:
            ind = g.call_method("to", (g.call_function(torch.gt if strict else torch.ge, (tf, x)), torch.int32))
            phase = ind if phase is None else g.call_function(torch.add, (phase, ind))
        host = g.call_method("to", (phase, "cpu"))
    return host


def timestep_error(rule: Rule, policy: Policy, site: AttentionSite, gm: fx.GraphModule, name: str) -> PolicyError:
    return PolicyError(
        f"{rule.where(policy.source)}: key 'timesteps': site {site.path or '<root>'!r} depends on the timestep but "
        f"its graph has no input named {name!r} (inputs: {_placeholders(gm)}). Give the model's timestep argument "
        f"with options={{'timestep_arg': NAME}}; a Python-number timestep must be passed as a tensor; a graph "
        f"break between the model's inputs and this attention (see fullgraph=True) or a torch.utils.checkpoint "
        f"region around it also hides the input")
