"""The collectives sequence parallelism uses, on any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU).

Groups travel into the custom ops by name (``ProcessGroup.group_name``) and are resolved here. Point-to-point
exchanges pack everything one rank sends another into one flat buffer (one message per pair and direction,
so no tags are needed) and are posted together with ``batch_isend_irecv``: :func:`start_exchange` returns
the pending work, so a caller can compute while the halo travels. Every byte sent is counted per site in
``locattn.counters()["sp_bytes"]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..counters import bump


def resolve_group(name: str):
    """The process group called ``name`` ("" = the default group)."""
    if not name:
        return dist.group.WORLD
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (P2P ops address global ranks)."""
    return dist.get_global_rank(group, rank) if group is not dist.group.WORLD else rank


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Exchange:
    """Pending point-to-point transfers; :meth:`wait` returns the received buffers by peer."""

    def __init__(self, works, recvs: dict[int, torch.Tensor]):
        self._works, self._recvs = works, recvs

    def wait(self) -> dict[int, torch.Tensor]:
        for w in self._works:
            w.wait()
        self._works = []
        return self._recvs


def start_exchange(group_name: str, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor],
                   label: str) -> Exchange:
    """Post one send per ``sends`` entry (peer -> flat buffer) and one receive into each ``recvs`` buffer."""
    if not sends and not recvs:
        return Exchange([], recvs)
    group = resolve_group(group_name)
    ops = []
    for peer, buf in sends.items():
        ops.append(dist.P2POp(dist.isend, buf.contiguous(), global_rank(group, peer), group))
        bump("sp_bytes", label, nbytes(buf))
    for peer, buf in recvs.items():
        ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, peer), group))
    return Exchange(dist.batch_isend_irecv(ops), recvs)


def all_reduce(t: torch.Tensor, group_name: str, op=dist.ReduceOp.SUM, label: str = "") -> torch.Tensor:
    """In-place all-reduce of ``t``; counts the bytes a ring all-reduce sends per rank (2 (P-1)/P of ``t``)."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    dist.all_reduce(t, op=op, group=group)
    if label:
        bump("sp_bytes", label, 2 * (world - 1) * nbytes(t) // world)
    return t


def all_gather(t: torch.Tensor, group_name: str, label: str = "") -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on every rank); counts the bytes a ring all-gather sends per rank."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    if label:
        bump("sp_bytes", label, (world - 1) * nbytes(t))
    return out
