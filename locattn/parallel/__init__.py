"""Sequence parallelism: a model compiled with ``options={"sequence_parallel": {...}}`` runs its token sequence
sharded over a process group, each attention site exchanging only the halo its pattern needs.

Modules: :mod:`.sharding` (row split, plans), :mod:`.planner` (per-site cuts, bytes), :mod:`.comm`
(collectives), :mod:`.attention` (one site on one rank), :mod:`.ops` (the ``locattn::sp_*`` custom ops).
"""

from .sharding import SequenceParallelError

__all__ = ["SequenceParallelError"]
