"""The custom ops a sequence-parallel graph calls (``torch.ops.locattn.sp_*``).

Two worlds meet in a sharded graph. *Replicated* values (outside the sharded region, and the global tokens
inside it) are equal on every rank; *sharded* tensors hold a rank's grid rows. Gradients follow Megatron's
convention: a replicated value outside the region has its whole gradient on every rank; inside the region the
gradient of a replicated operand (a weight, an AdaLN scale, the global token rows) is *partial* — each rank
holds the part its own rows contributed — and is summed where the value enters the region.

  sp_shard(x, plan)        replicated -> sharded: the rank's rows (+ globals) of x's token axis;
                           backward: the gradient placed in a zero tensor of x's shape, all-reduced
  sp_gather(x, plan)       sharded -> replicated: every rank's rows, all-gathered; backward: the own rows,
                           the global rows divided by the group size (they were counted on every rank)
  sp_enter(x, group)       replicated operand of a sharded op (identity); backward: all-reduce
  sp_scale_grad(x, world)  global rows leaving the region (identity); backward: divided by the group size
  sp_attention(...)        one attention site, :mod:`locattn.parallel.attention`

Collectives live only in these ops, so Inductor sees them as opaque calls (each forward and backward op has
a fake implementation with the real one's shapes and strides).
"""

from __future__ import annotations

import math

import torch

from ..codegen.registry import lse_dtype
from . import attention, comm
from .attention import _piece_shapes
from .sharding import TokenPlan, parse_attention_plan, parse_token_plan


# ------------------------------------------------------------------------------------------------ shard / gather


def _parts(x: torch.Tensor, tp: TokenPlan, n_grid_tokens: int):
    return (x.narrow(tp.dim, 0, tp.prefix), x.narrow(tp.dim, tp.prefix, n_grid_tokens),
            x.narrow(tp.dim, tp.prefix + n_grid_tokens, tp.suffix))


def shard_local(x: torch.Tensor, tp: TokenPlan) -> torch.Tensor:
    """This rank's part of a whole-sequence tensor: ``[prefix][own grid rows][suffix]`` along ``tp.dim``."""
    sh = tp.sharding
    pre, grid, suf = _parts(x, tp, sh.n_grid)
    r0, r1 = sh.rows[sh.rank]
    own = grid.unflatten(tp.dim, sh.grid).narrow(tp.dim + sh.axis, r0, r1 - r0)
    return torch.cat([pre, own.flatten(tp.dim, tp.dim + len(sh.grid) - 1), suf], tp.dim)


@torch.library.custom_op("locattn::sp_shard", mutates_args=())
def sp_shard(x: torch.Tensor, plan: str) -> torch.Tensor:
    return shard_local(x, parse_token_plan(plan))


@sp_shard.register_fake
def _(x, plan):
    return shard_local(x, parse_token_plan(plan))


@torch.library.custom_op("locattn::sp_unshard", mutates_args=())
def sp_unshard(g: torch.Tensor, plan: str, shape: list[int]) -> torch.Tensor:
    """Backward of ``sp_shard``: ``g`` placed in zeros of the whole shape, summed over ranks."""
    tp = parse_token_plan(plan)
    full = g.new_zeros(shape)
    full_local = shard_local_view(full, tp)
    for dst, src in zip(full_local, _parts(g, tp, tp.sharding.local_tokens())):
        dst.copy_(src.reshape(dst.shape))
    return comm.all_reduce(full, tp.sharding.group)


def shard_local_view(full: torch.Tensor, tp: TokenPlan):
    """Views of ``full`` (whole sequence) at this rank's prefix, own rows (``[..., *local_grid, ...]``), suffix."""
    sh = tp.sharding
    pre, grid, suf = _parts(full, tp, sh.n_grid)
    r0, r1 = sh.rows[sh.rank]
    own = grid.unflatten(tp.dim, sh.grid).narrow(tp.dim + sh.axis, r0, r1 - r0)
    return pre, own, suf


@sp_unshard.register_fake
def _(g, plan, shape):
    return g.new_empty(shape)


def _shard_setup(ctx, inputs, output):
    ctx.plan, ctx.shape = inputs[1], list(inputs[0].shape)


def _shard_backward(ctx, g):
    return torch.ops.locattn.sp_unshard(g, ctx.plan, ctx.shape), None


sp_shard.register_autograd(_shard_backward, setup_context=_shard_setup)


def _gather(x: torch.Tensor, tp: TokenPlan, fake: bool) -> torch.Tensor:
    sh = tp.sharding
    pre, grid, suf = _parts(x, tp, sh.local_tokens())
    d, nd = tp.dim, len(sh.grid)
    g = grid.unflatten(d, sh.local_grid())
    most = max(r1 - r0 for r0, r1 in sh.rows)
    pad = list(g.shape)
    pad[d + sh.axis] = most
    buf = g.new_zeros(pad)
    buf.narrow(d + sh.axis, 0, g.shape[d + sh.axis]).copy_(g)
    if fake:
        every = [torch.empty_like(buf) for _ in range(sh.world)]
    else:
        every = comm.all_gather(buf, sh.group)
    rows = [t.narrow(d + sh.axis, 0, r1 - r0) for t, (r0, r1) in zip(every, sh.rows)]
    whole = torch.cat(rows, d + sh.axis).flatten(d, d + nd - 1)
    return torch.cat([pre, whole, suf], d)


@torch.library.custom_op("locattn::sp_gather", mutates_args=())
def sp_gather(x: torch.Tensor, plan: str) -> torch.Tensor:
    return _gather(x, parse_token_plan(plan), False)


@sp_gather.register_fake
def _(x, plan):
    return _gather(x, parse_token_plan(plan), True)


def _gather_setup(ctx, inputs, output):
    ctx.plan = inputs[1]


def _gather_backward(ctx, g):
    tp = parse_token_plan(ctx.plan)
    pre, own, suf = _parts(shard_local(g, tp), tp, tp.sharding.local_tokens())
    w = tp.sharding.world
    return torch.cat([pre / w, own, suf / w], tp.dim), None


sp_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# ------------------------------------------------------------------------------------------------ enter / leave


@torch.library.custom_op("locattn::sp_enter", mutates_args=())
def sp_enter(x: torch.Tensor, group: str) -> torch.Tensor:
    return x.clone()


@sp_enter.register_fake
def _(x, group):
    return torch.empty_like(x)


@torch.library.custom_op("locattn::sp_all_reduce", mutates_args=())
def sp_all_reduce(g: torch.Tensor, group: str) -> torch.Tensor:
    return comm.all_reduce(g.clone(memory_format=torch.contiguous_format), group)


@sp_all_reduce.register_fake
def _(g, group):
    return torch.empty_like(g, memory_format=torch.contiguous_format)


def _enter_setup(ctx, inputs, output):
    ctx.group = inputs[1]


def _enter_backward(ctx, g):
    return torch.ops.locattn.sp_all_reduce(g, ctx.group), None


sp_enter.register_autograd(_enter_backward, setup_context=_enter_setup)


@torch.library.custom_op("locattn::sp_scale_grad", mutates_args=())
def sp_scale_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    return x.clone()


@sp_scale_grad.register_fake
def _(x, world):
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output):
    ctx.world = inputs[1]


def _scale_backward(ctx, g):
    return g / ctx.world, None


sp_scale_grad.register_autograd(_scale_backward, setup_context=_scale_setup)


# ------------------------------------------------------------------------------------------------ attention


@torch.library.custom_op("locattn::sp_attention", mutates_args=())
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool, spec: str,
                 backend: str, plan: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, halo, lse_part)``: out / lse as ``locattn::attention`` gives them for this rank's tokens; the
    received halo and the global queries' partial lse are kept for the backward."""
    out, lse, halo, lse_part = attention.forward(q, k, v, scale, is_causal, spec, backend, plan)
    return out, lse.contiguous(), halo, lse_part


def _halo_numel(plan_json: str, k: torch.Tensor, v: torch.Tensor) -> int:
    plan = parse_attention_plan(plan_json)
    me = plan.sharding.rank
    return sum(math.prod(ks) + math.prod(vs) for peer in plan.peers(me)[0]
               for _, _, ks, vs in _piece_shapes(plan, me, peer, k, v))


@sp_attention.register_fake
def _(q, k, v, scale, is_causal, spec, backend, plan):
    b, hq, s_loc, _ = q.shape
    p = parse_attention_plan(plan)
    g = 0 if p.dense else p.prefix + p.suffix
    ld = lse_dtype(q.dtype)
    return (q.new_empty(b, s_loc, hq, v.shape[-1]).transpose(1, 2), q.new_empty(b, hq, s_loc, dtype=ld),
            k.new_empty(_halo_numel(plan, k, v)), q.new_empty((b, hq, g) if g else (0,), dtype=ld))


@torch.library.custom_op("locattn::sp_attention_backward", mutates_args=())
def sp_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, halo: torch.Tensor, lse_part: torch.Tensor,
                          scale: float, is_causal: bool, spec: str, backend: str,
                          plan: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = attention.backward(grad_out, q, k, v, out, lse, halo, lse_part, scale, is_causal, spec, backend,
                                    plan)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@sp_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, halo, lse_part, scale, is_causal, spec, backend, plan):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attn_setup(ctx, inputs, output):
    q, k, v, scale, is_causal, spec, backend, plan = inputs
    out, lse, halo, lse_part = output
    ctx.save_for_backward(q, k, v, out, lse, halo, lse_part)
    ctx.meta = (scale, is_causal, spec, backend, plan)
    ctx.mark_non_differentiable(lse, halo, lse_part)


def _attn_backward(ctx, grad_out, *_):
    q, k, v, out, lse, halo, lse_part = ctx.saved_tensors
    scale, is_causal, spec, backend, plan = ctx.meta
    dq, dk, dv = torch.ops.locattn.sp_attention_backward(grad_out, q, k, v, out, lse, halo, lse_part, scale,
                                                         is_causal, spec, backend, plan)
    return dq, dk, dv, None, None, None, None, None


sp_attention.register_autograd(_attn_backward, setup_context=_attn_setup)
