"""How a token sequence is split over the ranks of a sequence-parallel group, and the plans the ops carry.

The grid part of a sequence (``[prefix globals][row-major grid][suffix globals]``) is cut along one grid axis
into contiguous runs of rows, one per rank (:func:`split_rows`). A rank holds its rows of the grid and *all*
global tokens: a sharded tensor has ``prefix + local_tokens(rank) + suffix`` entries along its token axis, in
the same order as the whole sequence (so ``is_causal`` on token indices keeps its meaning).

The plans below are frozen dataclasses serialised to canonical JSON strings, which the custom ops take as an
argument (Inductor keeps strings as constants; equal plans compare equal) and parse back, cached.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch


class SequenceParallelError(RuntimeError):
    """A sequence-parallel configuration or input that cannot run (raised alike on every rank)."""


def split_rows(n: int, world: int, unit: int = 1, offset: int = 0,
               slack: float = 1.25) -> tuple[tuple[int, int], ...]:
    """``n`` rows cut into ``world`` contiguous runs: evenly (the first ``n % world`` one row longer), or, with a
    ``unit``, at the positions ``p % unit == offset % unit`` nearest the even cuts (tile / window boundaries, where
    the halo is smallest) when no run then exceeds ``slack`` times the longest even run."""
    base, extra = divmod(n, world)
    even, r0 = [], 0
    for r in range(world):
        even.append((r0, r0 + base + (r < extra)))
        r0 = even[-1][1]
    if unit <= 1:
        return tuple(even)
    points = [p for p in range(1, n) if (p - offset) % unit == 0]
    bounds = [0]
    for i in range(1, world):
        cands = [p for p in points if p > bounds[-1] and n - p >= world - i]
        if not cands:
            return tuple(even)
        bounds.append(min(cands, key=lambda p: (abs(p - i * n / world), p)))
    bounds.append(n)
    rows = tuple(zip(bounds, bounds[1:]))
    if max(b - a for a, b in rows) > slack * (base + (extra > 0)):
        return tuple(even)
    return rows


@dataclass(frozen=True)
class Sharding:
    """The grid, the sharded axis and every rank's rows of it; ``group`` is the process group's name ("" when
    only planning) and ``rank`` the rank the plan runs on."""

    grid: tuple[int, ...]
    axis: int
    rows: tuple[tuple[int, int], ...]
    group: str = ""
    rank: int = 0

    @property
    def world(self) -> int:
        return len(self.rows)

    @property
    def n_grid(self) -> int:
        return math.prod(self.grid)

    def local_grid(self, rank: int | None = None) -> tuple[int, ...]:
        r0, r1 = self.rows[self.rank if rank is None else rank]
        return self.grid[:self.axis] + (r1 - r0,) + self.grid[self.axis + 1:]

    def local_tokens(self, rank: int | None = None) -> int:
        return math.prod(self.local_grid(rank))

    def cut_grid(self, e0: int, e1: int) -> tuple[int, ...]:
        return self.grid[:self.axis] + (e1 - e0,) + self.grid[self.axis + 1:]

    @property
    def row_tokens(self) -> int:
        """Tokens in one row of the sharded axis (the product of the other axes)."""
        return self.n_grid // self.grid[self.axis]

    def global_grid_index(self, rank: int | None = None) -> torch.Tensor:
        """Row-major indices (in the whole grid) of a rank's grid tokens, in their local order: ``[local_tokens]``."""
        r0, r1 = self.rows[self.rank if rank is None else rank]
        idx = torch.arange(self.n_grid).view(self.grid).narrow(self.axis, r0, r1 - r0)
        return idx.reshape(-1)


@dataclass(frozen=True)
class TokenPlan:
    """A tensor whose axis ``dim`` holds the sequence ``[prefix][grid][suffix]`` (globally), and how it is
    sharded: the plan of ``sp_shard`` / ``sp_gather``."""

    sharding: Sharding
    dim: int
    prefix: int = 0
    suffix: int = 0


@dataclass(frozen=True)
class AttentionPlan:
    """One self-attention site run sequence-parallel (``sp_attention``).

    ``ext[r] = (e0, e1)``: the rows of the sharded axis rank ``r`` computes its queries on (its rows plus the
    halo; every row for ``dense``). ``sink_grid``: sink tokens inside the grid (the first ones of row 0, which
    rank 0 holds); a rank whose cut misses row 0 gets copies of them as extra prefix tokens. ``label`` names the
    site in counters."""

    sharding: Sharding
    prefix: int
    suffix: int
    ext: tuple[tuple[int, int], ...]
    dense: bool = False
    sink_grid: int = 0
    #: per rank, the pieces its queries are computed in: ``(q0, q1, a0, a1, after_halo)`` = query rows
    #: ``[q0, q1)`` on the cut ``[a0, a1)``; pieces with ``after_halo`` false (interior rows, whose cut lies in
    #: the rank's own rows) run while the halo travels. Empty: one piece, the rank's rows on ``ext``.
    parts: tuple[tuple[tuple[int, int, int, int, bool], ...], ...] = ()
    label: str = ""

    def pieces(self, rank: int) -> tuple[tuple[int, int, int, int, bool], ...]:
        if self.parts and self.parts[rank]:
            return self.parts[rank]
        r0, r1 = self.sharding.rows[rank]
        return ((r0, r1, *self.ext[rank], True),)

    def copies(self, rank: int) -> int:
        """Sink tokens copied to ``rank`` as extra prefix tokens."""
        return self.sink_grid if self.sink_grid and self.ext[rank][0] > 0 else 0

    def recv_rows(self, rank: int, peer: int) -> tuple[int, int] | None:
        """Rows of ``peer`` that ``rank`` needs (global row numbers), or None."""
        if peer == rank:
            return None
        e0, e1 = self.ext[rank]
        s0, s1 = self.sharding.rows[peer]
        lo, hi = max(e0, s0), min(e1, s1)
        return (lo, hi) if lo < hi else None

    def peers(self, rank: int) -> tuple[list[int], list[int]]:
        """``(receive from, send to)``: the ranks this rank exchanges halo rows or sink copies with."""
        world = self.sharding.world
        recv = [s for s in range(world) if self.recv_rows(rank, s) or (s == 0 and self.copies(rank))]
        send = [s for s in range(world) if self.recv_rows(s, rank) or (rank == 0 and s != 0 and self.copies(s))]
        return recv, send

    def tokens_sent(self, rank: int) -> int:
        """Grid tokens (of k and of v each) ``rank`` sends in the forward exchange."""
        rt = self.sharding.row_tokens
        n = 0
        for s in range(self.sharding.world):
            rows = self.recv_rows(s, rank)
            if rows:
                n += (rows[1] - rows[0]) * rt
            if rank == 0 and s != 0:
                n += self.copies(s)
        return n


def to_json(plan) -> str:
    return json.dumps(dataclasses.asdict(plan), sort_keys=True, separators=(",", ":"))


def _sharding(d: dict) -> Sharding:
    return Sharding(tuple(d["grid"]), d["axis"], tuple(tuple(r) for r in d["rows"]), d["group"], d["rank"])


@functools.lru_cache(maxsize=1024)
def parse_token_plan(text: str) -> TokenPlan:
    d = json.loads(text)
    return TokenPlan(_sharding(d["sharding"]), d["dim"], d["prefix"], d["suffix"])


@functools.lru_cache(maxsize=1024)
def parse_attention_plan(text: str) -> AttentionPlan:
    d = json.loads(text)
    return AttentionPlan(_sharding(d["sharding"]), d["prefix"], d["suffix"], tuple(tuple(e) for e in d["ext"]),
                         d["dense"], d["sink_grid"], tuple(tuple(tuple(p) for p in r) for r in d["parts"]),
                         d["label"])
