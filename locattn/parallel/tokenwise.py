"""Which token axis each tensor of a Dynamo graph carries, op by op: the proof that a region is token-wise.

A *sharded* tensor carries the sequence ``[prefix globals][grid][suffix globals]`` along one axis
(:class:`Seq`); sequence parallelism replaces it by a rank's part. An op is *token-wise* when its output
carries the sequence along a known axis and each output token depends only on the same token of its inputs
(elementwise ops with broadcasting, linear / norms / softmax over other axes, views that keep the axis whole,
permutes, slices of whole parts, cat of globals onto the grid, ...). :func:`propagate` gives, for one node and
the states of its inputs, the state of its output and what sharding it needs:

* ``enter``: replicated operands (weights, AdaLN modulations) it combines with a sharded one,
* ``shard``: replicated operands that carry the whole sequence themselves (a positional-embedding buffer),
* ``rewrite``: the sizes written into the node (``view(b, 4096, c)``) that must become the rank's sizes,
* ``leave``: the node extracts only global tokens (replicated again).

Anything else raises :class:`NotTokenwise` with the reason (a reduction over tokens, a view that splits the
token axis into the grid, a matmul of two sharded tensors, an unknown op): sequence parallelism gathers the
sequence before such a node, or refuses if an attention site depends on it.

All sizes are the *global* ones of ``node.meta["example_value"]``; rewrites are closures applied per rank.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes.sites import example


@dataclass(frozen=True)
class Seq:
    """The tensor carries the sequence along ``dim``: ``prefix`` globals, the grid, ``suffix`` globals."""

    dim: int
    prefix: int = 0
    suffix: int = 0


class NotTokenwise(Exception):
    """The node mixes tokens (or may): its reason, for the refusal message."""


#: local sizes of one rank: the sharded length of a tensor in state ``seq``, and a global token boundary of
#: that tensor mapped to the local one
@dataclass(frozen=True)
class Local:
    length: Callable[[Seq], int]
    boundary: Callable[[Seq, int], int]


@dataclass
class Effect:
    state: Any                                                # Seq, tuple of states, or None (replicated)
    enter: list[fx.Node] = field(default_factory=list)
    shard: list[tuple[fx.Node, Seq]] = field(default_factory=list)
    rewrite: Callable[[fx.Node, Local], None] | None = None
    leave: bool = False


def _shape(n) -> tuple[int, ...] | None:
    ev = example(n)
    if not isinstance(ev, torch.Tensor):
        return None
    if not all(isinstance(s, int) for s in ev.shape):
        raise NotTokenwise(f"{_name(n)} has symbolic sizes (sequence parallelism needs static shapes)")
    return tuple(ev.shape)


def _name(n) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    t = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    return f"{n.name} ({t})"


def _requires_grad(n) -> bool:
    ev = example(n)
    return isinstance(ev, torch.Tensor) and ev.requires_grad and torch.is_grad_enabled()


def _norm(d: int, rank: int) -> int:
    return d % rank if rank else d


# ------------------------------------------------------------------------------------------------ vocabulary

_ELEMENTWISE_FNS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide, torch.pow,
    torch.neg, torch.abs, torch.exp, torch.expm1, torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.sin,
    torch.cos, torch.tanh, torch.sigmoid, torch.relu, torch.where, torch.clamp, torch.clip, torch.maximum,
    torch.minimum, torch.erf, torch.square, torch.reciprocal, torch.lerp, torch.addcmul, torch.addcdiv,
    torch.logical_not, torch.logical_and, torch.logical_or, torch.sign, torch.floor, torch.ceil, torch.round,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.nan_to_num, torch.masked_fill, torch.tan, torch.atan, torch.erfinv,
    F.gelu, F.silu, F.relu, F.sigmoid, F.tanh, F.mish, F.softplus, F.dropout, F.leaky_relu, F.hardswish, F.elu,
    F.relu6, F.selu, F.logsigmoid, F.hardtanh, F.gelu,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos",
    "tanh", "sigmoid", "relu", "clamp", "clip", "float", "half", "bfloat16", "double", "to", "type", "contiguous",
    "clone", "detach", "masked_fill", "lerp", "where", "square", "reciprocal", "erf", "sign", "floor", "ceil",
    "round", "maximum", "minimum", "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__",
    "add_", "sub_", "mul_", "div_", "masked_fill_", "clamp_", "copy_", "pow_", "neg_", "exp_", "sigmoid_",
    "tanh_", "relu_", "zero_", "fill_", "requires_grad_", "float_", "nan_to_num", "bool", "int", "long",
    "type_as", "logical_not", "expm1", "log1p", "addcmul", "silu", "gelu",
}
#: ops over the last axes: token axis must be elsewhere
_LAST_DIM = {torch._C._nn.linear, F.linear}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod", "logsumexp", "argmax",
               "argmin", "all", "any", "cumsum", "cumprod", "softmax", "log_softmax", "var_mean", "std_mean"}
_REDUCTION_FNS = {getattr(torch, n) for n in _REDUCTIONS if hasattr(torch, n)} | {F.softmax, F.log_softmax,
                                                                                   F.normalize}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
_VIEWS = {"view", "reshape"}


def _fn_name(n: fx.Node) -> str:
    return n.target if n.op == "call_method" else getattr(n.target, "__name__", "")


# ------------------------------------------------------------------------------------------------ rules


def propagate(n: fx.Node, state: dict[fx.Node, Any], n_grid: int) -> Effect:
    """The effect of node ``n`` given its inputs' states (``state[x]``: Seq, tuple, or None / absent =
    replicated). ``n_grid``: tokens of the grid (global). Raises :class:`NotTokenwise`."""
    st = lambda x: state.get(x) if isinstance(x, fx.Node) else None  # noqa: E731
    if n.op == "call_function" and n.target is operator.getitem and isinstance(st(n.args[0]), tuple):
        return Effect(st(n.args[0])[n.args[1]])
    if n.op not in ("call_function", "call_method"):
        raise NotTokenwise(f"{n.op} {n.target}")
    name = _fn_name(n)
    if n.op == "call_function" and n.target is torch.ops.locattn.attention.default:
        return _attention_op(n, st, n_grid)
    if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
        return _sdpa(n, st)
    if n.op == "call_function" and n.target is operator.getitem:
        return _index(n, st, n_grid)
    if n.op == "call_function" and n.target is builtins.getattr:
        if n.args[1] in ("mT", "T"):
            return _permute_like(n, st, None)
        if n.args[1] in ("dtype", "device", "requires_grad", "is_cuda"):
            return Effect(None)
        raise NotTokenwise(f"{_name(n)} reads the attribute {n.args[1]!r} of a sharded tensor")
    if (n.op == "call_function" and n.target in _ELEMENTWISE_FNS) or \
            (n.op == "call_method" and name in _ELEMENTWISE_METHODS):
        return _elementwise(n, st, n_grid)
    if n.op == "call_function" and n.target in _LAST_DIM:
        return _last_dims(n, st, 1, n.args[1:] + tuple(n.kwargs.values()))
    if n.op == "call_function" and n.target in (F.layer_norm, F.rms_norm):
        shape = n.args[1] if len(n.args) > 1 else n.kwargs["normalized_shape"]
        k = len(shape) if isinstance(shape, (list, tuple)) else 1
        return _last_dims(n, st, k, n.args[2:] + tuple(n.kwargs.values()))
    if n.op == "call_function" and n.target is F.embedding:
        return _embedding(n, st)
    if (n.op == "call_function" and n.target in _REDUCTION_FNS) or (n.op == "call_method" and name in _REDUCTIONS):
        return _reduction(n, st)
    if n.op == "call_function" and n.target in _MATMUL or (n.op == "call_method" and name in ("matmul", "bmm")):
        return _matmul(n, st)
    if n.op == "call_function" and n.target in _CAT:
        return _cat(n, st, n_grid)
    if name in ("stack",) and n.op == "call_function":
        return _stack(n, st)
    if name in _VIEWS:
        return _view(n, st)
    if name in ("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"):
        return _permute_like(n, st, name)
    if name in ("unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as", "repeat"):
        return _reshape_like(n, st, name)
    if name in _SPLITS:
        return _split(n, st, n_grid)
    if name == "narrow":
        return _narrow(n, st, n_grid)
    if name == "size" and n.op == "call_method":
        x = n.args[0]
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if d is not None and _norm(d, len(_shape(x))) != st(x).dim:
            return Effect(None)
        raise NotTokenwise(f"{_name(n)} reads the token count of a sharded tensor")
    if name in ("dim", "ndimension", "numel", "element_size", "is_contiguous", "get_device"):
        if name == "numel":
            raise NotTokenwise(f"{_name(n)} reads the element count of a sharded tensor")
        return Effect(None)
    if name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
        return Effect(None)  # a new replicated tensor: only x's dtype / device are read
    raise NotTokenwise(f"{_name(n)} is not a known token-wise op")


def _seq_in(n: fx.Node, st, candidates) -> list[tuple[fx.Node, Seq]]:
    return [(a, st(a)) for a in candidates if isinstance(a, fx.Node) and isinstance(st(a), Seq)]


def _broadcast_operands(n: fx.Node, st, n_grid: int, out_rank: int, out_dim: int, seq: Seq, operands) -> Effect:
    """Operands of an elementwise op against a sharded output axis ``out_dim``: sharded ones must agree, replicated
    ones either broadcast over the axis (entered) or hold the whole sequence there (sharded)."""
    eff = Effect(Seq(out_dim, seq.prefix, seq.suffix))
    total = seq.prefix + n_grid + seq.suffix
    for a in operands:
        if not isinstance(a, fx.Node) or not isinstance(example(a), torch.Tensor):
            continue
        shape = _shape(a)
        d = out_dim - (out_rank - len(shape))
        s = st(a)
        if isinstance(s, Seq):
            if s.dim != d or (s.prefix, s.suffix) != (seq.prefix, seq.suffix):
                raise NotTokenwise(f"{_name(n)} combines sharded tensors whose token axes or globals differ")
            continue
        if s is not None:
            raise NotTokenwise(f"{_name(n)}: unexpected operand {_name(a)}")
        if d < 0 or shape[d] == 1:
            if _requires_grad(a):
                eff.enter.append(a)
        elif shape[d] == total:
            eff.shard.append((a, Seq(d, seq.prefix, seq.suffix)))
        else:
            raise NotTokenwise(f"{_name(n)} broadcasts {_name(a)} of {shape[d]} entries against the token axis")
    return eff


def _elementwise(n, st, n_grid) -> Effect:
    out = _shape(n)
    name = _fn_name(n)
    data = list(n.args) + [v for v in n.kwargs.values()]
    if name in ("type_as", "to"):  # the other argument gives a dtype / device only
        data = [n.args[0]]
    seqs = _seq_in(n, st, data)
    if not seqs:
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    if name.endswith("_") and not isinstance(st(n.args[0]), Seq):
        raise NotTokenwise(f"{_name(n)} writes sharded values into a replicated tensor in place")
    a, s = seqs[0]
    out_dim = s.dim + len(out) - len(_shape(a))
    return _broadcast_operands(n, st, n_grid, len(out), out_dim, s, data)


def _last_dims(n, st, k: int, params) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq) or any(isinstance(st(p), Seq) for p in params if isinstance(p, fx.Node)):
        raise NotTokenwise(f"{_name(n)} takes a sharded tensor as a weight")
    rank = len(_shape(x))
    if s.dim >= rank - k:
        raise NotTokenwise(f"{_name(n)} mixes the token axis (it acts on the last {k} axes)")
    eff = Effect(Seq(s.dim + len(_shape(n)) - rank, s.prefix, s.suffix))
    eff.enter = [p for p in params if isinstance(p, fx.Node) and _requires_grad(p)]
    return eff


def _embedding(n, st) -> Effect:
    ids, w = n.args[0], n.args[1]
    s = st(ids)
    if not isinstance(s, Seq) or isinstance(st(w), Seq):
        raise NotTokenwise(f"{_name(n)} looks up a sharded table")
    return Effect(s, enter=[w] if _requires_grad(w) else [])


def _dims_arg(n: fx.Node):
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return d


def _reduction(n, st) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        raise NotTokenwise(f"{_name(n)} reduces a sharded tensor as a non-data argument")
    rank = len(_shape(x))
    if n.target is F.normalize:
        d = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 1)
    else:
        d = _dims_arg(n)
    if d is None or not isinstance(d, (int, list, tuple)):
        raise NotTokenwise(f"{_name(n)} reduces over every axis, the tokens included")
    dims = [_norm(x_, rank) for x_ in (d if isinstance(d, (list, tuple)) else [d])]
    if s.dim in dims:
        raise NotTokenwise(f"{_name(n)} reduces over the token axis")
    ev = example(n)
    outs = list(ev) if isinstance(ev, (tuple, list)) else [ev]
    out_rank = outs[0].dim()
    new = Seq(s.dim - (0 if out_rank == rank else sum(1 for x_ in dims if x_ < s.dim)), s.prefix, s.suffix)
    return Effect(tuple(new for _ in outs) if isinstance(ev, (tuple, list)) else new)


def _matmul(n, st) -> Effect:
    a, b = n.args[0], n.args[1]
    sa, sb = st(a), st(b)
    if isinstance(sa, Seq) and isinstance(sb, Seq):
        raise NotTokenwise(f"{_name(n)} multiplies two sharded tensors (tokens meet tokens: an attention site "
                           f"the policy left alone, or another token mixer)")
    ra, rb, ro = len(_shape(a)), len(_shape(b)), len(_shape(n))
    if ra < 2 or rb < 2:
        raise NotTokenwise(f"{_name(n)} with a 1-D operand")
    if isinstance(sa, Seq):
        if sa.dim == ra - 1:
            raise NotTokenwise(f"{_name(n)} contracts the token axis")
        if sa.dim < ra - 2 and rb >= ra - sa.dim and _shape(b)[sa.dim - ra] != 1:
            raise NotTokenwise(f"{_name(n)}: the token axis is a batch axis of both operands")
        return Effect(Seq(sa.dim + ro - ra, sa.prefix, sa.suffix), enter=[b] if _requires_grad(b) else [])
    if isinstance(sb, Seq):
        if sb.dim != rb - 1:
            raise NotTokenwise(f"{_name(n)} contracts the token axis")
        return Effect(Seq(ro - 1, sb.prefix, sb.suffix), enter=[a] if _requires_grad(a) else [])
    raise NotTokenwise(f"{_name(n)}: no sharded operand")


def _cat(n, st, n_grid) -> Effect:
    tensors = n.args[0] if n.args else n.kwargs["tensors"]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = _shape(n)
    dim = _norm(dim, len(out))
    seqs = _seq_in(n, st, tensors)
    if not seqs:
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    s = seqs[0][1]
    if s.dim != dim:
        return _broadcast_operands(n, st, n_grid, len(out), s.dim, s, tensors)
    if len(seqs) > 1:
        raise NotTokenwise(f"{_name(n)} joins two sharded sequences along the token axis")
    before = after = 0
    seen = False
    eff = Effect(None)
    for t in tensors:
        if isinstance(st(t), Seq):
            seen = True
            continue
        size = _shape(t)[dim]
        if seen:
            after += size
        else:
            before += size
        if _requires_grad(t):
            eff.enter.append(t)
    eff.state = Seq(dim, s.prefix + before, s.suffix + after)
    return eff


def _stack(n, st) -> Effect:
    tensors = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = _shape(n)
    dim = _norm(dim, len(out))
    seqs = _seq_in(n, st, tensors)
    if len(seqs) != len(tensors) or len({s for _, s in seqs}) != 1:
        raise NotTokenwise(f"{_name(n)} stacks sharded and replicated tensors")
    s = seqs[0][1]
    return Effect(Seq(s.dim + (1 if dim <= s.dim else 0), s.prefix, s.suffix))


def _view_map(ins: tuple[int, ...], outs: tuple[int, ...], d: int) -> int | None:
    """The output axis of a view that carries input axis ``d`` whole (same size, same product before it)."""
    before = math.prod(ins[:d])
    acc = 1
    for j, size in enumerate(outs):
        if acc == before and size == ins[d]:
            return j
        acc *= size
        if acc > before:
            break
    return None


def _view(n, st) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        raise NotTokenwise(f"{_name(n)}: a replicated tensor viewed with a sharded size")
    ins, outs = _shape(x), _shape(n)
    j = _view_map(ins, outs, s.dim)
    if j is None:
        raise NotTokenwise(f"{_name(n)} merges or splits the token axis ({'x'.join(map(str, ins))} -> "
                           f"{'x'.join(map(str, outs))})")
    new = Seq(j, s.prefix, s.suffix)

    def rewrite(node: fx.Node, local: Local) -> None:
        shape = list(outs)
        shape[j] = local.length(new)
        node.args = (node.args[0], *shape)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
    return Effect(new, rewrite=rewrite)


def _permute_like(n, st, name) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    rank = len(_shape(x))
    args = list(n.args[1:])
    if name is None or name == "t":  # mT / .T / t(): the last two axes (T and t() on 2-D)
        perm = list(range(rank))
        perm[-2:] = perm[-2:][::-1] if rank >= 2 else perm[-2:]
        if n.op == "call_function" and n.args[1] == "T":
            perm = perm[::-1]
    elif name == "permute":
        perm = [_norm(p, rank) for p in (args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args)]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = _norm(args[0], rank), _norm(args[1], rank)
        perm = list(range(rank))
        perm[a], perm[b] = b, a
    else:  # movedim(src, dst), single axes only
        if not all(isinstance(a, int) for a in args):
            raise NotTokenwise(f"{_name(n)} with several axes")
        src, dst = _norm(args[0], rank), _norm(args[1], rank)
        perm = [i for i in range(rank) if i != src]
        perm.insert(dst, src)
    return Effect(Seq(perm.index(s.dim), s.prefix, s.suffix))


def _reshape_like(n, st, name) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        if name == "expand_as" and isinstance(st(n.args[1]), Seq):
            raise NotTokenwise(f"{_name(n)} expands a replicated tensor over the token axis")
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    ins, outs = _shape(x), _shape(n)
    rank = len(ins)
    args = list(n.args[1:])
    if name in ("unsqueeze", "squeeze", "flatten"):
        if name == "squeeze" and not args and "dim" not in n.kwargs:
            keep = [i for i in range(rank) if ins[i] != 1]
            if s.dim not in keep:
                raise NotTokenwise(f"{_name(n)} squeezes a one-token axis")
            dims = tuple(i for i in range(rank) if ins[i] == 1)

            def rewrite(node, local, dims=dims):  # explicit axes: a rank's shard could be one token long
                node.args = (node.args[0], dims)
            return Effect(Seq(keep.index(s.dim), s.prefix, s.suffix), rewrite=rewrite)
        j = _view_map(ins, outs, s.dim)
        if j is None:
            raise NotTokenwise(f"{_name(n)} merges the token axis with others")
        return Effect(Seq(j, s.prefix, s.suffix))
    if name == "unflatten":
        d = _norm(args[0] if args else n.kwargs["dim"], rank)
        if d == s.dim:
            raise NotTokenwise(f"{_name(n)} splits the token axis")
        return Effect(Seq(s.dim + (len(outs) - rank if d < s.dim else 0), s.prefix, s.suffix))
    if name == "expand_as":
        raise NotTokenwise(f"{_name(n)}: expand_as of a sharded tensor")
    sizes = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    j = s.dim + len(outs) - rank
    if name == "repeat":
        if sizes[j] != 1:
            raise NotTokenwise(f"{_name(n)} repeats the token axis")
        return Effect(Seq(j, s.prefix, s.suffix))
    # expand: the token axis keeps its size (-1 on every rank)

    def rewrite(node, local, j=j, sizes=list(sizes)):
        sizes[j] = -1
        node.args = (node.args[0], *sizes)
    return Effect(Seq(j, s.prefix, s.suffix), rewrite=rewrite)


def _part_boundaries(s: Seq, n_grid: int) -> list[int]:
    return [0, s.prefix, s.prefix + n_grid, s.prefix + n_grid + s.suffix]


def _select_parts(n, s: Seq, n_grid: int, a: int, b: int):
    """A token range ``[a, b)`` as whole parts: ``(new state or None for globals only, boundaries)``."""
    bounds = _part_boundaries(s, n_grid)
    if a not in bounds or b not in bounds:
        raise NotTokenwise(f"{_name(n)} takes tokens {a}..{b} of [{s.prefix} globals | {n_grid} grid | {s.suffix} "
                           f"globals]: not whole parts")
    if a <= s.prefix and b >= s.prefix + n_grid and n_grid:
        return Seq(s.dim, s.prefix - a, b - s.prefix - n_grid)
    return None


def _index(n, st, n_grid) -> Effect:
    x, idx = n.args[0], n.args[1]
    s = st(x)
    if not isinstance(s, Seq):
        if isinstance(idx, fx.Node) or (isinstance(idx, tuple) and any(isinstance(i, fx.Node) and
                                                                         isinstance(st(i), Seq) for i in idx)):
            raise NotTokenwise(f"{_name(n)} indexes with a sharded tensor")
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    rank = len(_shape(x))
    if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) or isinstance(i, (list,)) for i in items):
        raise NotTokenwise(f"{_name(n)} uses advanced (tensor) indexing on a sharded tensor")
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (rank - n_real) + items[e + 1:]
    items += [slice(None)] * (rank - sum(1 for i in items if i is not None))
    d_in, d_out, tok_item, out_dim = 0, 0, None, None
    for pos, it in enumerate(items):
        if it is None:
            d_out += 1
            continue
        if d_in == s.dim:
            if not isinstance(it, slice):
                raise NotTokenwise(f"{_name(n)} selects single tokens")
            tok_item, out_dim = pos, d_out
        d_in += 1
        if isinstance(it, slice):
            d_out += 1
    it = items[tok_item]
    total = s.prefix + n_grid + s.suffix
    a, b, step = it.indices(total)
    if step != 1:
        raise NotTokenwise(f"{_name(n)} takes every {step}th token")
    if (a, b) == (0, total):
        return Effect(Seq(out_dim, s.prefix, s.suffix))
    new = _select_parts(n, s, n_grid, a, b)

    def rewrite(node, local, a=a, b=b, tok_item=tok_item, items=items):
        new_items = list(items)
        new_items[tok_item] = slice(local.boundary(s, a), local.boundary(s, b))
        node.args = (node.args[0], tuple(new_items) if len(new_items) > 1 else new_items[0])
    return Effect(Seq(out_dim, new.prefix, new.suffix) if new else None, rewrite=rewrite, leave=new is None)


def _narrow(n, st, n_grid) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    dim, start, length = (list(n.args[1:]) + [n.kwargs.get(k) for k in ("dim", "start", "length")])[:3]
    rank = len(_shape(x))
    if _norm(dim, rank) != s.dim:
        return Effect(s)
    new = _select_parts(n, s, n_grid, start, start + length)

    def rewrite(node, local):
        a, b = local.boundary(s, start), local.boundary(s, start + length)
        node.args = (node.args[0], dim, a, b - a)
        node.kwargs = {}
    return Effect(new, rewrite=rewrite, leave=new is None)


def _split(n, st, n_grid) -> Effect:
    x = n.args[0]
    s = st(x)
    if not isinstance(s, Seq):
        raise NotTokenwise(f"{_name(n)}: no sharded operand")
    name = _fn_name(n)
    rank = len(_shape(x))
    outs = example(n)
    if name == "unbind":
        d = _norm(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0), rank)
        if d == s.dim:
            raise NotTokenwise(f"{_name(n)} unbinds the token axis")
        return Effect(tuple(Seq(s.dim - (d < s.dim), s.prefix, s.suffix) for _ in outs))
    d = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    d = _norm(d, rank)
    if d != s.dim:
        return Effect(tuple(s for _ in outs))
    if name != "split" and name != "split_with_sizes":
        raise NotTokenwise(f"{_name(n)} cuts the token axis into equal pieces")
    sizes = [int(o.shape[d]) for o in outs]
    states, at = [], 0
    for size in sizes:
        new = _select_parts(n, s, n_grid, at, at + size)
        states.append(new)
        at += size
    if sum(1 for x_ in states if x_ is not None) > 1:
        raise NotTokenwise(f"{_name(n)} splits the grid")

    def rewrite(node, local, sizes=sizes):
        bounds, at = [0], 0
        for size in sizes:
            at += size
            bounds.append(local.boundary(s, at))
        node.args = (node.args[0], [b - a for a, b in zip(bounds, bounds[1:])], d)
        node.kwargs = {}
    return Effect(tuple(states), rewrite=rewrite, leave=True)


def _attention_op(n, st, n_grid) -> Effect:
    """A rewritten site: token-wise in its queries when k / v are replicated (cross-attention, no causal mask);
    a sharded self-attention site otherwise (the caller replaces it by ``sp_attention``)."""
    q, k, v, mask, bias, _, is_causal = n.args[:7]
    sq, sk, sv = st(q), st(k), st(v)
    if not isinstance(sq, Seq):
        raise NotTokenwise(f"{_name(n)}: attention whose queries are replicated but keys sharded")
    if sq.dim != 2:
        raise NotTokenwise(f"{_name(n)}: queries carry tokens on axis {sq.dim}, not the sequence axis")
    for m in (mask, bias):
        if isinstance(m, fx.Node) and (isinstance(st(m), Seq) or any(x != 1 for x in _shape(m)[-2:-1])):
            raise NotTokenwise(f"{_name(n)} has a mask / bias over its query tokens (not sharded yet)")
    out = Seq(2, sq.prefix, sq.suffix)
    if sk is None and sv is None:
        if is_causal:
            raise NotTokenwise(f"{_name(n)}: causal cross-attention depends on absolute query positions")
        eff = Effect((out, out))
        eff.enter = [x for x in (k, v, bias) if isinstance(x, fx.Node) and _requires_grad(x)]
        return eff
    if not (isinstance(sk, Seq) and isinstance(sv, Seq) and sk == sq and sv == sq):
        raise NotTokenwise(f"{_name(n)}: q, k and v of a self-attention site carry different token layouts")
    for m in (mask, bias):
        if isinstance(m, fx.Node):
            raise NotTokenwise(f"{_name(n)}: a self-attention site with a mask / bias (not sharded yet)")
    return Effect((out, out))


def _sdpa(n, st) -> Effect:
    """An SDPA the policy left alone: token-wise only as cross-attention over replicated keys."""
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), n.args))
    args.update(n.kwargs)
    q, k, v = args["query"], args["key"], args["value"]
    mask = args.get("attn_mask")
    sq = st(q)
    mask_ok = not isinstance(mask, fx.Node) or (st(mask) is None and _shape(mask)[-2] == 1)
    if isinstance(sq, Seq) and st(k) is None and st(v) is None and not args.get("is_causal") and mask_ok \
            and sq.dim == len(_shape(q)) - 2:
        return Effect(Seq(sq.dim, sq.prefix, sq.suffix), enter=[x for x in (k, v, mask) if isinstance(x, fx.Node)
                                                                 and _requires_grad(x)])
    raise NotTokenwise(f"{_name(n)}: an attention site left to SDPA (self-attention needs the rewritten op)")
