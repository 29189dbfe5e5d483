"""The ``sequence_parallel`` option, typed.

    torch.compile(model, backend="locattn",
                  options={"policy": P, "sequence_parallel": {"group": None, "axis": 0}})

Keys: ``group`` (a ``ProcessGroup``; ``None`` = the default group), ``axis`` (the grid axis to shard; default
0, the outermost), ``overlap`` (run interior query rows while the halo travels; default: on for NCCL, off for
gloo, where a CPU process computes and communicates on the same cores), ``debug`` (compare a checksum of the
inputs across ranks at every call: inputs that differ raise on every rank), ``world_size`` (plan for a group
of this size without running: ``locattn.explain`` on one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sharding import SequenceParallelError

_KEYS = {"group", "axis", "overlap", "debug", "world_size"}


@dataclass(frozen=True)
class SPConfig:
    group: Any = None
    axis: int = 0
    overlap: bool | None = None
    debug: bool = False
    world_size: int | None = None

    @classmethod
    def coerce(cls, value: Any) -> "SPConfig | None":
        if value is None or value is False:
            return None
        if isinstance(value, SPConfig):
            return value
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise SequenceParallelError(f"sequence_parallel: expected a dict, got {type(value).__name__}")
        bad = set(value) - _KEYS
        if bad:
            raise SequenceParallelError(f"sequence_parallel: unknown key(s) {sorted(bad)}; known: {sorted(_KEYS)}")
        axis = value.get("axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise SequenceParallelError(f"sequence_parallel: 'axis' must be an int, got {axis!r}")
        ws = value.get("world_size")
        if ws is not None and (not isinstance(ws, int) or ws < 1):
            raise SequenceParallelError(f"sequence_parallel: 'world_size' must be a positive int, got {ws!r}")
        return cls(value.get("group"), axis, value.get("overlap"), bool(value.get("debug", False)), ws)

    def resolve(self) -> tuple[str, int, int, bool]:
        """``(group name, rank, world size, live)``: ``live`` is False when only planning (``world_size`` given
        and no process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.world_size is None:
                raise SequenceParallelError(
                    "sequence_parallel: torch.distributed is not initialized (call init_process_group on every "
                    "rank first, or give 'world_size' to plan without running)")
            return "", 0, self.world_size, False
        group = self.group if self.group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if self.world_size is not None and self.world_size != world:
            raise SequenceParallelError(f"sequence_parallel: 'world_size' {self.world_size} differs from the group's "
                                        f"{world} ranks")
        name = group.group_name if group is not dist.group.WORLD else ""
        return name, dist.get_rank(group), world, True

    def overlap_for(self, live: bool) -> bool:
        if self.overlap is not None:
            return bool(self.overlap)
        if not live:
            return False
        import torch.distributed as dist

        return dist.get_backend(self.group if self.group is not None else dist.group.WORLD) == "nccl"
