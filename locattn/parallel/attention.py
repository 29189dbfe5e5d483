"""Sequence-parallel attention of one site on one rank: the halo exchange, the cut-grid op call, the globals.

A rank holds q, k, v for ``[prefix globals][its grid rows][suffix globals]`` (``[B, H, S_loc, D]``). For a
local pattern it

1. posts the exchange: to every rank whose cut (``plan.ext``) overlaps its rows, those rows of k and v (and,
   from rank 0, copies of sink tokens inside the grid to ranks whose cut misses them);
2. runs ``locattn::attention`` on the *cut grid* (its rows plus the halo, ``Pattern.halo``): queries of the
   halo rows are zero and their outputs discarded; the pattern gives every own query exactly its whole-grid
   keys (``subrange_exact``, checked at compile time). With ``overlap`` the interior rows (whose cut lies in
   the rank's own rows) run first, while the halo travels;
3. global queries attend every rank's keys: each rank attends its own grid rows (rank 0 also the globals)
   with the op, and the partial results are merged by log-sum-exp across ranks (two all-reduces).

A dense site all-gathers k and v (the same exchange with every row) and runs its local queries against all keys.

Backward (``attention_backward``): the op's backward on the same cut, the halo rows' dK / dV sent back to
their owners and added there (the reverse exchange); the global queries' output gradient is all-reduced (the
gradients of replicated global rows are partial per rank, see :mod:`locattn.parallel.ops`) and their partial
attention is differentiated with weights ``exp(lse_r - lse)``. The forward's outputs and lse stand in for the
cut's own rows; the discarded rows get ``lse = +inf`` and zero output gradient, so they contribute nothing.
"""

from __future__ import annotations

import functools
import math

import torch

from ..codegen.registry import lse_dtype
from ..patterns.base import Layout
from ..patterns.spec import DENSE_SPEC, HeadGroup, SiteSpec, parse_spec
from . import comm
from .sharding import AttentionPlan, parse_attention_plan

DENSE_JSON = DENSE_SPEC.to_json()


def _grid(t: torch.Tensor, start: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Tokens ``[start, start + prod(grid))`` of ``t [B, H, S, D]`` as a ``[B, H, *grid, D]`` view."""
    return t.narrow(2, start, math.prod(grid)).unflatten(2, grid)


def _rows(gv: torch.Tensor, axis: int, lo: int, n: int) -> torch.Tensor:
    return gv.narrow(2 + axis, lo, n)


@functools.lru_cache(maxsize=1024)
def cut_spec(spec_json: str, plan_json: str, a0: int, a1: int) -> str:
    """The site's spec on the grid cut to rows ``[a0, a1)`` of the sharded axis, with this rank's sink copies as
    extra prefix tokens (its ``softcap`` kept; linear / hybrid groups never get here: the planner refuses them)."""
    plan = parse_attention_plan(plan_json)
    sh, rank = plan.sharding, plan.sharding.rank
    copies = plan.copies(rank)
    groups = []
    spec = parse_spec(spec_json)
    for g in spec.groups:
        pattern = g.pattern.on_subrange(sh.axis, len(sh.grid), a0)
        layout = Layout(grid=sh.cut_grid(a0, a1), prefix=plan.prefix + copies, suffix=plan.suffix,
                        sinks=0 if copies else g.layout.sinks)
        groups.append(HeadGroup(g.heads, pattern, layout))
    return SiteSpec(tuple(groups), softcap=spec.softcap).to_json()   # the site's score modifier travels too


@functools.lru_cache(maxsize=256)
def _global_index(plan_json: str) -> torch.Tensor:
    """Token indices (in the whole sequence) of this rank's local tokens: ``[S_loc]``."""
    plan = parse_attention_plan(plan_json)
    sh = plan.sharding
    return torch.cat([torch.arange(plan.prefix), plan.prefix + sh.global_grid_index(),
                      plan.prefix + sh.n_grid + torch.arange(plan.suffix)])


class _Sizes:
    """Token counts of one rank's tensors under ``plan``."""

    def __init__(self, plan: AttentionPlan):
        sh = plan.sharding
        self.plan, self.sh, self.rank = plan, sh, sh.rank
        self.P, self.U = plan.prefix, plan.suffix
        self.r0, self.r1 = sh.rows[self.rank]
        self.e0, self.e1 = (0, sh.grid[sh.axis]) if plan.dense else plan.ext[self.rank]
        self.C = 0 if plan.dense else plan.copies(self.rank)
        self.local_grid = sh.local_grid()
        self.L = math.prod(self.local_grid)
        self.ext_grid = sh.cut_grid(self.e0, self.e1)
        self.S_ext = self.P + self.C + math.prod(self.ext_grid) + self.U


# ---------------------------------------------------------------------------------------------------- exchange


def _piece_shapes(plan: AttentionPlan, rank: int, peer: int, k: torch.Tensor, v: torch.Tensor):
    """What ``peer`` sends ``rank``: ``[(kind, rows, k shape, v shape)]`` with kind "rows" (global rows
    ``rows``) or "sinks"."""
    sh = plan.sharding
    b, hk = k.shape[0], k.shape[1]
    out = []
    rows = plan.recv_rows(rank, peer)
    if rows:
        g = sh.cut_grid(*rows)
        out.append(("rows", rows, (b, hk, *g, k.shape[-1]), (b, hk, *g, v.shape[-1])))
    if peer == 0 and not plan.dense and plan.copies(rank):
        n = plan.sink_grid
        out.append(("sinks", None, (b, hk, n, k.shape[-1]), (b, hk, n, v.shape[-1])))
    return out


#: send buffers kept per (site, peer, direction): a fresh CPU buffer of the halo's size costs more in page faults
#: than the copy into it. Only send buffers are reused (the exchange completes before the op returns); received
#: ones are saved for the backward.
_SEND_BUFFERS: dict[tuple, torch.Tensor] = {}


def _pack(tensors, key: tuple) -> torch.Tensor:
    """One flat buffer of ``tensors`` (strided views: one copy each, straight into the buffer)."""
    n = sum(t.numel() for t in tensors)
    like = tensors[0]
    key = (*key, n, like.dtype, like.device)
    buf = _SEND_BUFFERS.get(key)
    if buf is None:
        buf = _SEND_BUFFERS[key] = like.new_empty(n)
    at = 0
    for t in tensors:
        buf[at:at + t.numel()].view(t.shape).copy_(t)
        at += t.numel()
    return buf


def _unpack(buf: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[at:at + n].view(s))
        at += n
    return out


def _send_buffers(plan: AttentionPlan, z: _Sizes, k: torch.Tensor, v: torch.Tensor) -> dict[int, torch.Tensor]:
    """This rank's rows (and sink copies) for every peer that needs them, packed."""
    me, sh = z.rank, z.sh
    kg, vg = _grid(k, z.P, z.local_grid), _grid(v, z.P, z.local_grid)
    sends = {}
    for peer in plan.peers(me)[1]:
        parts = []
        for kind, rows, _, _ in _piece_shapes(plan, peer, me, k, v):
            if kind == "rows":
                lo, hi = rows
                parts += [_rows(kg, sh.axis, lo - z.r0, hi - lo), _rows(vg, sh.axis, lo - z.r0, hi - lo)]
            else:
                parts += [k.narrow(2, z.P, plan.sink_grid), v.narrow(2, z.P, plan.sink_grid)]
        sends[peer] = _pack(parts, (plan.label, me, peer, "fwd"))
    return sends


def _recv_buffers(plan: AttentionPlan, z: _Sizes, k: torch.Tensor, v: torch.Tensor) -> dict[int, torch.Tensor]:
    recvs = {}
    for peer in plan.peers(z.rank)[0]:
        n = sum(math.prod(ks) + math.prod(vs) for _, _, ks, vs in _piece_shapes(plan, z.rank, peer, k, v))
        recvs[peer] = k.new_empty(n)
    return recvs


def _assemble_kv(plan: AttentionPlan, z: _Sizes, x: torch.Tensor, recvd: dict[int, torch.Tensor], which: int,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k (``which`` 0) or v (1) on the cut: ``[B, H, S_ext, D]`` = prefix, sink copies, cut grid, suffix."""
    b, h, s_loc, d = x.shape
    out = x.new_empty(b, h, z.S_ext, d)
    out[:, :, :z.P] = x[:, :, :z.P]
    out[:, :, z.S_ext - z.U:] = x[:, :, s_loc - z.U:]
    gv = _grid(out, z.P + z.C, z.ext_grid)
    _rows(gv, z.sh.axis, z.r0 - z.e0, z.r1 - z.r0).copy_(_grid(x, z.P, z.local_grid))
    for peer, buf in recvd.items():
        shapes = _piece_shapes(plan, z.rank, peer, k, v)
        tensors = _unpack(buf, [s for _, _, ks, vs in shapes for s in (ks, vs)])
        for (kind, rows, _, _), t in zip(shapes, tensors[which::2]):
            if kind == "rows":
                _rows(gv, z.sh.axis, rows[0] - z.e0, rows[1] - rows[0]).copy_(t)
            else:
                out[:, :, z.P:z.P + z.C] = t
    return out


def _scatter_back(plan: AttentionPlan, z: _Sizes, d_ext: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                  dk: torch.Tensor, dv: torch.Tensor) -> None:
    """The reverse exchange: gradients of the rows (and sink copies) received from each peer go back to it and
    are added to the sender's own rows."""
    me, sh = z.rank, z.sh
    recv_from, send_to = plan.peers(me)
    back = {}
    for peer in recv_from:
        parts = []
        for kind, rows, _, _ in _piece_shapes(plan, me, peer, k, v):
            for g in d_ext:
                if kind == "rows":
                    parts.append(_rows(_grid(g, z.P + z.C, z.ext_grid), sh.axis, rows[0] - z.e0, rows[1] - rows[0]))
                else:
                    parts.append(g.narrow(2, z.P, z.C))
        back[peer] = _pack(parts, (plan.label, me, peer, "bwd"))
    incoming = {peer: k.new_empty(sum(math.prod(ks) + math.prod(vs)
                                      for _, _, ks, vs in _piece_shapes(plan, peer, me, k, v)))
                for peer in send_to}
    got = comm.start_exchange(sh.group, back, incoming, plan.label).wait()
    dkg, dvg = _grid(dk, z.P, z.local_grid), _grid(dv, z.P, z.local_grid)
    for peer, buf in got.items():
        shapes = _piece_shapes(plan, peer, me, k, v)
        tensors = _unpack(buf, [s for _, _, ks, vs in shapes for s in (ks, vs)])
        for (kind, rows, _, _), tk, tv in zip(shapes, tensors[0::2], tensors[1::2]):
            if kind == "rows":
                _rows(dkg, sh.axis, rows[0] - z.r0, rows[1] - rows[0]).add_(tk)
                _rows(dvg, sh.axis, rows[0] - z.r0, rows[1] - rows[0]).add_(tv)
            else:
                dk.narrow(2, z.P, plan.sink_grid).add_(tk)
                dv.narrow(2, z.P, plan.sink_grid).add_(tv)


def _start_halo(plan: AttentionPlan, z: _Sizes, k: torch.Tensor, v: torch.Tensor) -> comm.Exchange:
    return comm.start_exchange(z.sh.group, _send_buffers(plan, z, k, v), _recv_buffers(plan, z, k, v), plan.label)


def start_halo(plan_json: str, k: torch.Tensor, v: torch.Tensor) -> comm.Exchange:
    """Post this rank's halo exchange of ``k``, ``v`` (local, ``[B, Hk, S_loc, D]``) for a site's plan; ``wait()``
    returns the received buffers by peer (what ``forward`` does first; benchmarks time it alone)."""
    plan = parse_attention_plan(plan_json)
    return _start_halo(plan, _Sizes(plan), k, v)


# ---------------------------------------------------------------------------------------------------- pieces


def _on_cut(z: _Sizes, x: torch.Tensor, a0: int, a1: int) -> torch.Tensor:
    """Rows ``[a0, a1)`` of a cut tensor ``[B, H, S_ext, D]`` with its globals (a copy unless it is the cut)."""
    if (a0, a1) == (z.e0, z.e1):
        return x
    g = _rows(_grid(x, z.P + z.C, z.ext_grid), z.sh.axis, a0 - z.e0, a1 - a0).flatten(2, 1 + len(z.ext_grid))
    return torch.cat([x[:, :, :z.P + z.C], g, x[:, :, z.S_ext - z.U:]], 2)


def _queries_on_cut(z: _Sizes, q: torch.Tensor, q0: int, q1: int, a0: int, a1: int) -> torch.Tensor:
    """Queries ``[B, Hq, S_cut, D]`` for a piece: this rank's rows ``[q0, q1)`` in place, zeros elsewhere."""
    b, hq, _, d = q.shape
    grid = z.sh.cut_grid(a0, a1)
    out = q.new_zeros(b, hq, z.P + z.C + math.prod(grid) + z.U, d)
    src = _rows(_grid(q, z.P, z.local_grid), z.sh.axis, q0 - z.r0, q1 - q0)
    _rows(_grid(out, z.P + z.C, grid), z.sh.axis, q0 - a0, q1 - q0).copy_(src)
    return out


def _local_rows(z: _Sizes, t: torch.Tensor, q0: int, q1: int, a0: int, a1: int) -> torch.Tensor:
    """Rows ``[q0, q1)`` of a piece's result ``[B, H, S_cut, ...]``, flattened: ``[B, H, tokens, ...]``."""
    grid = z.sh.cut_grid(a0, a1)
    x = t.unsqueeze(-1) if t.dim() == 3 else t  # lse: [B, H, S]
    out = _rows(_grid(x, z.P + z.C, grid), z.sh.axis, q0 - a0, q1 - q0).flatten(2, 1 + len(grid))
    return out[..., 0] if t.dim() == 3 else out


def _put_rows(z: _Sizes, dst: torch.Tensor, src: torch.Tensor, q0: int, q1: int) -> None:
    """Write flattened rows ``[q0, q1)`` (``src [B, H, n, ...]``) into a local tensor's grid part."""
    if dst.dim() == 3:
        dst, src = dst.unsqueeze(-1), src.unsqueeze(-1)
    _rows(_grid(dst, z.P, z.local_grid), z.sh.axis, q0 - z.r0, q1 - q0).copy_(
        src.unflatten(2, z.sh.cut_grid(q0, q1)))


# ---------------------------------------------------------------------------------------------------- forward


def forward(q, k, v, scale: float, is_causal: bool, spec: str, backend: str, plan_json: str):
    """``(out [B, Hq, S_loc, Dv] in SDPA layout, lse [B, Hq, S_loc], halo (flat, received k / v), lse_part
    [B, Hq, G] (the global queries' partial lse on this rank; empty without globals))``."""
    plan = parse_attention_plan(plan_json)
    z = _Sizes(plan)
    b, hq, s_loc, _ = q.shape
    dv_ = v.shape[-1]
    ex = _start_halo(plan, z, k, v)
    if plan.dense:
        recvd = ex.wait()
        kf, vf = (_assemble_kv(plan, z, x, recvd, i, k, v) for i, x in enumerate((k, v)))
        mask = _causal_mask(plan_json, True, q.device) if is_causal else None
        out, lse = torch.ops.locattn.attention.default(q, kf, vf, mask, None, scale, False, spec, backend)
        return out, lse, _halo(recvd, k), q.new_empty(0, dtype=lse.dtype)

    out = q.new_empty(b, s_loc, hq, dv_).transpose(1, 2)
    lse = q.new_empty(b, hq, s_loc, dtype=lse_dtype(q.dtype))
    pieces = plan.pieces(z.rank)
    early = [p for p in pieces if not p[4]]
    if early:  # interior rows: their cut lies in this rank's rows (globals and own rows only: no halo needed)
        own = _Sizes(plan)
        own.e0, own.e1, own.ext_grid = z.r0, z.r1, z.local_grid
        own.S_ext = s_loc
        for q0, q1, a0, a1, _ in early:
            _run_piece(own, plan_json, q, k, v, scale, is_causal, spec, backend, q0, q1, a0, a1, out, lse)
    recvd = ex.wait()
    kc, vc = (_assemble_kv(plan, z, x, recvd, i, k, v) for i, x in enumerate((k, v)))
    for q0, q1, a0, a1, after in pieces:
        if after:
            _run_piece(z, plan_json, q, kc, vc, scale, is_causal, spec, backend, q0, q1, a0, a1, out, lse)
    lse_part = q.new_empty(0, dtype=lse.dtype)
    if z.P + z.U:
        lse_part = _global_queries(plan, plan_json, z, q, k, v, scale, is_causal, backend, out, lse)
    return out, lse, _halo(recvd, k), lse_part


def _halo(recvd: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([recvd[p] for p in sorted(recvd)]) if recvd else like.new_empty(0)


def _run_piece(z, plan_json, q, kc, vc, scale, is_causal, spec, backend, q0, q1, a0, a1, out, lse) -> None:
    """Queries of rows ``[q0, q1)`` on the cut ``[a0, a1)``: one op call; their rows of ``out`` / ``lse``."""
    qc = _queries_on_cut(z, q, q0, q1, a0, a1)
    o, l = torch.ops.locattn.attention.default(qc, _on_cut(z, kc, a0, a1), _on_cut(z, vc, a0, a1), None, None, scale,
                                               is_causal, cut_spec(spec, plan_json, a0, a1), backend)
    _put_rows(z, out, _local_rows(z, o, q0, q1, a0, a1), q0, q1)
    _put_rows(z, lse, _local_rows(z, l, q0, q1, a0, a1), q0, q1)


@functools.lru_cache(maxsize=256)
def _causal_mask(plan_json: str, dense: bool, device: torch.device) -> torch.Tensor:
    """``is_causal`` on whole-sequence token indices: for a dense site, local queries x all keys ``[S_loc, S]``;
    for the global queries, ``[G, own keys]``. Made once per device (no host-to-device copy per call)."""
    plan = parse_attention_plan(plan_json)
    sh = plan.sharding
    idx = _global_index(plan_json)
    if dense:
        return (idx[:, None] >= torch.arange(plan.prefix + sh.n_grid + plan.suffix)[None, :]).to(device)
    qi, ki = _global_query_index(plan), _own_key_index(plan, plan_json)
    return (qi[:, None] >= ki[None, :]).to(device)


def _global_query_index(plan: AttentionPlan) -> torch.Tensor:
    n = plan.prefix + plan.sharding.n_grid
    return torch.cat([torch.arange(plan.prefix), n + torch.arange(plan.suffix)])


def _own_key_index(plan: AttentionPlan, plan_json: str) -> torch.Tensor:
    idx = _global_index(plan_json)
    if plan.sharding.rank == 0:
        return idx
    return idx[plan.prefix:plan.prefix + plan.sharding.local_tokens()]


def _own_keys(z: _Sizes, x: torch.Tensor) -> torch.Tensor:
    """Keys this rank contributes to the global queries: its grid rows (rank 0: every local token)."""
    return x if z.rank == 0 else x.narrow(2, z.P, z.L)


def _global_rows(z: _Sizes, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, :, :z.P], x[:, :, z.P + z.L:]], 2)


def _set_global_rows(z: _Sizes, dst: torch.Tensor, src: torch.Tensor) -> None:
    dst[:, :, :z.P] = src[:, :, :z.P]
    dst[:, :, z.P + z.L:] = src[:, :, z.P:]


def _global_queries(plan, plan_json, z, q, k, v, scale, is_causal, backend, out, lse) -> torch.Tensor:
    """The global queries over every rank's keys: a partial attention per rank merged by log-sum-exp; writes the
    merged rows of ``out`` / ``lse`` and returns this rank's partial lse (for the backward)."""
    mask = _causal_mask(plan_json, False, q.device) if is_causal else None
    o_r, l_r = torch.ops.locattn.attention.default(_global_rows(z, q), _own_keys(z, k), _own_keys(z, v), mask, None,
                                                   scale, False, DENSE_JSON, backend)
    m = comm.all_reduce(l_r.clone(), z.sh.group, torch.distributed.ReduceOp.MAX, plan.label + ":globals")
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(l_r - m)                                          # 0 where this rank has no key for the row
    acc = torch.cat([o_r.to(w.dtype) * w[..., None], w[..., None]], -1)
    acc = comm.all_reduce(acc, z.sh.group, label=plan.label + ":globals")
    den = acc[..., -1]
    merged = acc[..., :-1] / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    _set_global_rows(z, out, merged.to(out.dtype))
    _set_global_rows(z, lse.unsqueeze(-1), (m + torch.log(den)).unsqueeze(-1).to(lse.dtype))
    return l_r


# ---------------------------------------------------------------------------------------------------- backward


def backward(grad_out, q, k, v, out, lse, halo, lse_part, scale: float, is_causal: bool, spec: str, backend: str,
             plan_json: str):
    """``(dq, dk, dv)`` of this rank's q, k, v (shapes of q, k, v)."""
    plan = parse_attention_plan(plan_json)
    z = _Sizes(plan)
    recvd = _split_halo(plan, z, halo, k, v)
    kc, vc = (_assemble_kv(plan, z, x, recvd, i, k, v) for i, x in enumerate((k, v)))
    if plan.dense:
        mask = _causal_mask(plan_json, True, q.device) if is_causal else None
        dq, dkc, dvc, _ = torch.ops.locattn.attention_backward.default(
            grad_out, q, kc, vc, out, lse, mask, None, scale, False, spec, backend, False)
    else:
        b, hq, _, d = q.shape
        qc = _queries_on_cut(z, q, z.r0, z.r1, z.e0, z.e1)
        oc = out.new_zeros(b, hq, z.S_ext, out.shape[-1])
        gc = grad_out.new_zeros(b, hq, z.S_ext, grad_out.shape[-1])
        lc = torch.full((b, hq, z.S_ext), float("inf"), dtype=lse.dtype, device=lse.device)  # rows not ours: P = 0
        for src, dst in ((out, oc), (grad_out, gc), (lse, lc)):
            sub = src.narrow(2, z.P, z.L)
            if dst.dim() == 3:
                dst, sub = dst.unsqueeze(-1), sub.unsqueeze(-1)
            _rows(_grid(dst, z.P + z.C, z.ext_grid), z.sh.axis, z.r0 - z.e0, z.r1 - z.r0).copy_(
                sub.unflatten(2, z.local_grid))
        dqc, dkc, dvc, _ = torch.ops.locattn.attention_backward.default(
            gc, qc, kc, vc, oc, lc, None, None, scale, is_causal, cut_spec(spec, plan_json, z.e0, z.e1), backend, False)
        dq = torch.zeros_like(q)
        _put_rows(z, dq, _local_rows(z, dqc, z.r0, z.r1, z.e0, z.e1), z.r0, z.r1)
    dk, dv = _own_part(z, dkc, k), _own_part(z, dvc, v)
    _scatter_back(plan, z, [dkc, dvc], k, v, dk, dv)
    if not plan.dense and z.P + z.U:
        _global_queries_backward(plan, plan_json, z, grad_out, q, k, v, out, lse, lse_part, scale, is_causal,
                                 backend, dq, dk, dv)
    return dq, dk, dv


def _split_halo(plan, z, halo, k, v) -> dict[int, torch.Tensor]:
    out, at = {}, 0
    for peer in sorted(plan.peers(z.rank)[0]):
        n = sum(math.prod(ks) + math.prod(vs) for _, _, ks, vs in _piece_shapes(plan, z.rank, peer, k, v))
        out[peer] = halo[at:at + n]
        at += n
    return out


def _own_part(z: _Sizes, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's tokens of a gradient over the cut (globals and own rows; the sink copies and halo rows go
    back to their owners)."""
    own = torch.empty_like(like)
    own[:, :, :z.P] = g[:, :, :z.P]
    own[:, :, z.P + z.L:] = g[:, :, z.S_ext - z.U:]
    _grid(own, z.P, z.local_grid).copy_(_rows(_grid(g, z.P + z.C, z.ext_grid), z.sh.axis, z.r0 - z.e0, z.r1 - z.r0))
    return own


def _global_queries_backward(plan, plan_json, z, grad_out, q, k, v, out, lse, lse_part, scale, is_causal, backend,
                             dq, dk, dv) -> None:
    """Gradients of the merged global queries: the output gradient made whole across ranks, then this rank's
    partial attention differentiated with its weight ``exp(lse_r - lse)`` and the merged output (whose
    ``rowsum(dO * out)`` is the softmax term of every rank)."""
    g = comm.all_reduce(_global_rows(z, grad_out).contiguous(), z.sh.group, label=plan.label + ":globals")
    l_all = _global_rows(z, lse.unsqueeze(-1))[..., 0]
    w = torch.exp(lse_part - torch.where(torch.isinf(l_all), torch.zeros_like(l_all), l_all))
    w = torch.where(torch.isneginf(lse_part), torch.zeros_like(w), w)
    mask = _causal_mask(plan_json, False, q.device) if is_causal else None
    dqg, dko, dvo, _ = torch.ops.locattn.attention_backward.default(
        (g.to(w.dtype) * w[..., None]).to(g.dtype), _global_rows(z, q), _own_keys(z, k), _own_keys(z, v),
        _global_rows(z, out).contiguous(), lse_part, mask, None, scale, False, DENSE_JSON, backend, False)
    _set_global_rows(z, dq, dqg)
    if z.rank == 0:
        dk += dko
        dv += dvo
    else:
        dk.narrow(2, z.P, z.L).add_(dko)
        dv.narrow(2, z.P, z.L).add_(dvo)
