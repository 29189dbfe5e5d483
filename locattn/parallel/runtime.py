"""What runs around a sharded graph at every call: gradient sums of its weights, and the debug input check.

Weights used only inside the sharded region get a gradient from each rank's rows: :class:`_SumGrad` (identity
forward) sums it over the group in the backward, around the compiled graph rather than as an in-graph op (a
custom op may not return its input, so that would copy every weight at every call).

Sequence parallelism assumes every rank calls the model with the same inputs (as data-parallel replicas do):
each rank keeps its rows of them. Inputs that differ would give each rank a different model, silently. With
``{"debug": True}`` every call first all-gathers one float64 checksum per tensor input (parameters included)
and raises :class:`SequenceParallelError` on every rank, naming the inputs that differ, before any rank
starts the graph — so no rank waits alone in a collective.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .config import SPConfig
from .sharding import SequenceParallelError


def _checksums(args) -> torch.Tensor:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            t = a.detach()
            # sum and a position-weighted sum: a permutation of the same values also differs
            flat = t.reshape(-1).to(torch.float64)
            w = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) / max(1, flat.numel())
            out.append(torch.stack([flat.sum(), (flat * w).sum()]).cpu())
        else:
            out.append(torch.zeros(2, dtype=torch.float64))
    return torch.stack(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def check_same_inputs(args, names: list[str], group) -> None:
    """Raise on every rank if the tensor inputs differ across the ranks of ``group``."""
    import torch.distributed as dist

    mine = _checksums(args)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    bad = set()
    for other in every[1:]:
        diff = ~torch.isclose(other, every[0], rtol=1e-9, atol=1e-12).all(-1)
        bad |= {i for i in diff.nonzero().flatten().tolist()}
    if bad:
        which = ", ".join(names[i] if i < len(names) else f"input {i}" for i in sorted(bad))
        raise SequenceParallelError(f"sequence_parallel (debug): the inputs differ across ranks: {which}; every rank "
                                    f"must call the model with the same inputs")


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def wrap_compiled(compiled, gm: fx.GraphModule, cfg: SPConfig, report):
    """``compiled`` with the gradient sums of ``report.enter_inputs`` and the debug input check (when asked)."""
    if not (report.applied and report.live and (cfg.debug or report.enter_inputs)):
        return compiled
    import torch.distributed as dist

    group = cfg.group if cfg.group is not None else dist.group.WORLD
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    summed = set(report.enter_inputs)

    def call(*args):  # Dynamo calls the compiled graph with positional inputs
        if cfg.debug:
            check_same_inputs(args, names, group)
        if summed and torch.is_grad_enabled():
            args = tuple(_SumGrad.apply(a, group) if i in summed and a.requires_grad else a
                         for i, a in enumerate(args))
        return compiled(*args)
    return call
