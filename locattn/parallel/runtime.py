"""What runs around a sharded graph at every call: the debug check that every rank got the same inputs.

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


def wrap_compiled(compiled, gm: fx.GraphModule, cfg: SPConfig, report):
    """``compiled`` with the debug input check in front (when asked and the graph is sharded)."""
    if not (cfg.debug and report.applied and report.live):
        return compiled
    import torch.distributed as dist

    group = cfg.group if cfg.group is not None else dist.group.WORLD
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    def call(*args):  # Dynamo calls the compiled graph with positional inputs
        check_same_inputs(args, names, group)
        return compiled(*args)
    return call
