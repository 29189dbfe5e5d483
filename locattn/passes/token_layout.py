"""Token order proven from the graph: which patch-embedding axis every token axis is made of, in which order.

A forward dataflow over the Dynamo graph gives each tensor a *layout*: per axis, the row-major factors it is
made of. A convolution's output ``[N, C, (T,) H, W]`` starts factors ``n`` (its batch), ``c`` (channels) and
``sp0, sp1(, sp2)`` (its spatial axes); ops that move data between positions transform them exactly (views and
reshapes regroup factors, flatten merges them, permutes / transposes reorder axes, indexing and ``split`` /
``chunk`` / ``unbind`` select, ``cat`` joins segments of other tokens); ops that compute per position keep them
(elementwise ops, norms, softmax, dropout, casts), ``linear`` replaces the last axis by features, contractions
and SDPA carry the query rows through (attention output row i belongs to query token i). Anything else gives no
layout: nothing is guessed.

A site's grid is then read off its query's sequence axis: ``[prefix tokens][factors][suffix tokens]`` where every
factor is a spatial axis or the frames folded into the convolution's batch (CogVideoX), in token order. A patch
embedding flattened W-major (``x.transpose(2, 3).flatten(2)``) therefore gives the grid ``(W, H)``, its true
row-major order, and a site whose tokens pass through an op outside this vocabulary gets no grid, with the op
named in the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .sites import AttentionSite, example, module_path

CONV_TARGETS = {torch.conv2d, torch.conv3d, F.conv2d, F.conv3d}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}

Factor = tuple  # (label, size); labels: ("n",)/("n", "hi"|"lo", ...) batch, ("c",) features, ("sp", k) spatial
Segment = tuple  # ("f", (Factor, ...)) or ("x", size): tokens not from the embedding


@dataclass(frozen=True)
class Layout:
    """Per axis, its segments; ``src``: the convolution the spatial factors come from (not compared)."""

    axes: tuple[tuple[Segment, ...], ...]
    src: str = ""

    def same(self, other: "Layout") -> bool:
        return self.axes == other.axes


def _fsize(factors) -> int:
    return math.prod(s for _, s in factors)


def _seg_size(seg) -> int:
    return seg[1] if seg[0] == "x" else _fsize(seg[1])


def _plain(label, size) -> tuple[Segment, ...]:
    return (("f", ((label, size),) if size != 1 else ()),)


def _opaque(size) -> tuple[Segment, ...]:
    return (("x", size),)


def _shape(n) -> tuple[int, ...] | None:
    ev = example(n)
    if not isinstance(ev, torch.Tensor) or not all(isinstance(s, int) for s in ev.shape):
        return None
    return tuple(int(s) for s in ev.shape)


def _group(a: tuple[int, ...], b: tuple[int, ...]):
    """Pair dims of two shapes with equal products into row-major groups ``(dims of a, dims of b)``."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        fi, cj, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return None
        groups.append((list(range(fi, i)), list(range(cj, j))))
    return groups


def _regroup(lay: Layout, src: tuple[int, ...], dst: tuple[int, ...]) -> Layout | None:
    """A view / reshape / flatten / unflatten from ``src`` to ``dst``: factors merge and split row-major. An axis of
    other tokens (``cat``) merged with others makes the merged axes opaque."""
    groups = _group(src, dst)
    if groups is None:
        return None
    axes: list = [None] * len(dst)
    for fi, ci in groups:
        if len(fi) == 1 and len(ci) == 1:
            axes[ci[0]] = lay.axes[fi[0]]
            continue
        factors, opaque = [], False
        for a in fi:
            segs = lay.axes[a]
            if src[a] == 1:
                continue
            if len(segs) != 1 or segs[0][0] != "f":
                opaque = True
                break
            factors += list(segs[0][1])
        for c in ci:
            if opaque:
                axes[c] = _opaque(dst[c]) if dst[c] != 1 else _plain(("1",), 1)
                continue
            need, got = dst[c], []
            while need > 1:
                if not factors:
                    return None
                label, size = factors.pop(0)
                if need % size == 0:
                    got.append((label, size))
                    need //= size
                elif size % need == 0:              # the outer part of this factor fills the axis
                    got.append((label + ("hi", need), need))
                    factors.insert(0, (label + ("lo", size // need), size // need))
                    need = 1
                else:
                    return None
            axes[c] = (("f", tuple(got)),)
    return Layout(tuple(axes), lay.src)


def _slice_axis(segs, start: int, stop: int, size: int):
    """Segments of positions ``start:stop`` of an axis of ``size``: whole segments only (else opaque)."""
    out, pos = [], 0
    for seg in segs:
        n = _seg_size(seg)
        if pos >= start and pos + n <= stop:
            out.append(seg)
        elif pos < stop and pos + n > start:       # cuts through a segment
            return _opaque(stop - start)
        pos += n
    return tuple(out) if out else _opaque(stop - start)


def _merge(lays: list[tuple[Layout | None, tuple[int, ...]]], out_shape: tuple[int, ...]) -> Layout | None:
    """Broadcast inputs of an op that keeps positions: each output axis from the tracked inputs of full size there
    (they must agree); None if no input is tracked."""
    if not any(lay is not None for lay, _ in lays):
        return None
    axes, src = [], ""
    for k in range(len(out_shape)):
        cands = []
        for lay, shape in lays:
            j = k - (len(out_shape) - len(shape))
            if lay is None or j < 0 or shape[j] != out_shape[k]:
                continue
            cands.append(lay.axes[j])
            src = src or lay.src
        if any(c != cands[0] for c in cands):
            return None
        axes.append(cands[0] if cands else _opaque(out_shape[k]) if out_shape[k] != 1 else _plain(("1",), 1))
    return Layout(tuple(axes), src)


_ELEMENTWISE_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
                    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
                    torch.exp, torch.tanh, torch.sigmoid, torch.sin, torch.cos, torch.where, torch.masked_fill,
                    torch.clamp, torch.abs, torch.square, F.gelu, F.silu, F.relu, F.mish, F.dropout, torch.dropout,
                    F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.instance_norm, F.softmax, torch.softmax,
                    torch.layer_norm, torch.group_norm, torch.rms_norm, torch.batch_norm, torch.clone,
                    torch.erf, F.leaky_relu, F.hardswish, F.elu}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid",
                        "float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "clone", "softmax",
                        "masked_fill", "clamp", "abs", "__add__", "__radd__", "__mul__", "__rmul__", "__sub__",
                        "__truediv__", "square", "sin", "cos", "add_", "mul_", "detach"}
_VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
_VIEW_FNS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}


class _Propagation:
    def __init__(self, gm: fx.GraphModule):
        self.lay: dict[fx.Node, object] = {}     # Layout, or a tuple of them (split / chunk / unbind)
        self.why: dict[fx.Node, str] = {}        # a node whose tracked input it could not follow, and its op
        self.order: dict[fx.Node, int] = {}
        for n in gm.graph.nodes:
            self.order[n] = len(self.order)
            got = self._node(n)
            if got is not None:
                self.lay[n] = got
            elif any(isinstance(self.lay.get(a), Layout) for a in n.all_input_nodes):
                self.why[n] = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

    def get(self, x) -> Layout | None:
        got = self.lay.get(x) if isinstance(x, fx.Node) else None
        return got if isinstance(got, Layout) else None

    def _node(self, n: fx.Node):
        if n.op not in ("call_function", "call_method"):
            return None
        t, a = n.target, n.args
        if t in CONV_TARGETS:
            return self._conv(n)
        if not a:
            return None
        x = a[0]
        # tuples: split / chunk / unbind, then getitem
        if t is operator.getitem and isinstance(self.lay.get(x), tuple):
            return self.lay[x][a[1]] if isinstance(a[1], int) and -len(self.lay[x]) <= a[1] < len(self.lay[x]) \
                else None
        if t in CAT_TARGETS:
            return self._cat(n)
        if t is torch.stack:
            return None
        out_shape = _shape(n)
        lay = self.get(x)
        if t is F.linear or t is torch.nn.functional.linear:
            if lay is None or out_shape is None:
                return None
            return Layout(lay.axes[:-1] + (_plain(("c",), out_shape[-1]),), lay.src)
        if t in (operator.matmul, torch.matmul, torch.bmm) or (n.op == "call_method" and t in ("matmul", "bmm")):
            return self._matmul(n)
        if t in (F.scaled_dot_product_attention,):
            return None if lay is None or out_shape is None else \
                Layout(lay.axes[:-1] + (_plain(("c",), out_shape[-1]),), lay.src)
        if t in (torch.view_as_complex,):
            return None if lay is None else Layout(lay.axes[:-1], lay.src)
        if t in (torch.view_as_real,):
            return None if lay is None else Layout(lay.axes + (_plain(("c",), 2),), lay.src)
        if lay is None:
            return self._elementwise(n) if self._is_elementwise(n) else None
        in_shape = _shape(x)
        name = t if n.op == "call_method" else getattr(t, "__name__", "")
        if name in ("split", "chunk", "unbind", "tensor_split") and in_shape is not None:
            return self._pieces(n, lay, in_shape)
        if in_shape is None or out_shape is None:
            return None
        if n.op == "call_method" and t in _VIEW_METHODS or n.op == "call_function" and t in _VIEW_FNS:
            return _regroup(lay, in_shape, out_shape)
        if name in ("permute", "transpose", "swapaxes", "swapdims", "movedim") or \
                (t is getattr and a[1] in ("mT", "T")):
            perm = _perm(n, len(in_shape))
            return Layout(tuple(lay.axes[p] for p in perm), lay.src) if perm is not None else None
        if t is operator.getitem:
            return self._index(lay, a[1], in_shape, out_shape)
        if name == "expand":
            lead = len(out_shape) - len(in_shape)
            axes = [_plain(("1",), 1) if out_shape[j] == 1 else _opaque(out_shape[j]) for j in range(lead)]
            axes += [ax if in_shape[j] == out_shape[lead + j] else _opaque(out_shape[lead + j])
                     for j, ax in enumerate(lay.axes)]
            return Layout(tuple(axes), lay.src)
        if name in ("mean", "sum", "amax", "amin") and n.kwargs.get("keepdim", len(a) > 2 and a[2]) is True:
            dims = a[1] if len(a) > 1 else n.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            red = {d % len(in_shape) for d in dims}
            return Layout(tuple(_plain(("1",), 1) if j in red else ax for j, ax in enumerate(lay.axes)), lay.src)
        if self._is_elementwise(n):
            return self._elementwise(n)
        return None

    @staticmethod
    def _is_elementwise(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in _ELEMENTWISE_FNS) or \
            (n.op == "call_method" and n.target in _ELEMENTWISE_METHODS)

    def _elementwise(self, n: fx.Node):
        out_shape = _shape(n)
        if out_shape is None:
            return None
        ins = [(self.get(x), _shape(x)) for x in n.all_input_nodes if _shape(x) is not None]
        return _merge(ins, out_shape)

    def _conv(self, n: fx.Node) -> Layout | None:
        sh = _shape(n)
        if sh is None or len(sh) not in (4, 5):
            return None
        inp = self.get(n.args[0])
        batch = inp.axes[0] if inp is not None else _plain(("n",), sh[0])
        spatial = tuple(_plain(("sp", k), s) for k, s in enumerate(sh[2:]))
        where = f"conv{len(sh) - 2}d at {module_path(n) or n.name}"
        return Layout((batch, _plain(("c",), sh[1])) + spatial, where)

    def _cat(self, n: fx.Node) -> Layout | None:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        out_shape = _shape(n)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
            return None
        dim %= len(out_shape)
        shapes = [_shape(t) for t in tensors]
        if any(s is None for s in shapes):
            return None
        lays = [self.get(t) for t in tensors]
        if not any(lay is not None for lay in lays):
            return None
        segs = []
        for lay, s in zip(lays, shapes):
            segs += list(lay.axes[dim]) if lay is not None else [("x", s[dim])]
        drop = lambda t: t[:dim] + t[dim + 1:]                       # noqa: E731  (the other axes)
        rest = _merge([(lay and Layout(drop(lay.axes), lay.src), drop(s)) for lay, s in zip(lays, shapes)],
                      drop(out_shape))
        if rest is None:
            return None
        axes = list(rest.axes)
        axes.insert(dim, tuple(s for s in segs if _seg_size(s) > 0))
        return Layout(tuple(axes), rest.src)

    def _matmul(self, n: fx.Node) -> Layout | None:
        a, b = n.args[0], n.args[1]
        sa, sb, so = _shape(a), _shape(b), _shape(n)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            return None
        la, lb = self.get(a), self.get(b)
        if la is None and lb is None:
            return None
        batch = _merge([(la and Layout(la.axes[:-2], la.src), sa[:-2]), (lb and Layout(lb.axes[:-2], lb.src), sb[:-2])],
                       so[:-2]) if len(so) > 2 else Layout((), "")
        if batch is None:
            return None
        m = la.axes[-2] if la is not None else _opaque(so[-2])
        k = lb.axes[-1] if lb is not None else _opaque(so[-1])
        return Layout(batch.axes + (m, k), (la or lb).src)

    def _index(self, lay: Layout, idx, in_shape, out_shape) -> Layout | None:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in idx):
            return None
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        axes, src = [], 0
        for i in idx:
            if i is Ellipsis:
                for _ in range(len(in_shape) - used):
                    axes.append(lay.axes[src])
                    src += 1
            elif i is None:
                axes.append(_plain(("1",), 1))
            elif isinstance(i, slice):
                if i.step not in (None, 1):
                    return None
                start, stop, _ = i.indices(in_shape[src])
                axes.append(lay.axes[src] if (start, stop) == (0, in_shape[src]) else
                            _slice_axis(lay.axes[src], start, stop, in_shape[src]))
                src += 1
            else:
                src += 1
        axes += list(lay.axes[src:])
        return Layout(tuple(axes), lay.src) if len(axes) == len(out_shape) else None

    def _pieces(self, n: fx.Node, lay: Layout, in_shape) -> tuple | None:
        ev = example(n)
        if not isinstance(ev, (tuple, list)):
            return None
        name = n.target if n.op == "call_method" else n.target.__name__
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        if name == "unbind":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return None
        dim %= len(in_shape)
        if name == "unbind":
            return tuple(Layout(lay.axes[:dim] + lay.axes[dim + 1:], lay.src) for _ in ev)
        out, pos = [], 0
        for piece in ev:
            size = int(piece.shape[dim])
            axes = list(lay.axes)
            axes[dim] = _slice_axis(lay.axes[dim], pos, pos + size, in_shape[dim])
            out.append(Layout(tuple(axes), lay.src))
            pos += size
        return tuple(out)


def _perm(n: fx.Node, rank: int) -> tuple[int, ...] | None:
    """``σ`` with ``n = input.permute(σ)``."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    ident = list(range(rank))
    if n.target is getattr:
        if n.args[1] == "mT":
            ident[-2], ident[-1] = ident[-1], ident[-2]
            return tuple(ident)
        return tuple(reversed(ident))
    args = n.args[1:]
    if name in ("transpose", "swapaxes", "swapdims"):
        if len(args) != 2 or not all(isinstance(x, int) for x in args):
            return None
        i, j = args[0] % rank, args[1] % rank
        ident[i], ident[j] = ident[j], ident[i]
        return tuple(ident)
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return tuple(d % rank for d in dims) if len(dims) == rank and all(isinstance(d, int) for d in dims) else None
    if name == "movedim" and len(args) == 2 and all(isinstance(x, int) for x in args):
        src, dst = args[0] % rank, args[1] % rank
        rest = [d for d in ident if d != src]
        rest.insert(dst, src)
        return tuple(rest)
    return None


def _grid_axis(label) -> bool:
    """Factors that may be grid axes: whole spatial axes of the embedding, and frames folded into its batch (the
    batch factor itself or the inner part of its split)."""
    if label[0] == "sp":
        return len(label) == 2
    return label[0] == "n" and (len(label) == 1 or label[1] == "lo")


def _describe(factors, src: str) -> str:
    grid = "x".join(str(s) for _, s in factors)
    order = [label[1] for label, _ in factors if label[0] == "sp"]
    desc = f"{grid} from {src}" + (" (frames folded into its batch first)" if factors[0][0][0] == "n" else "")
    if order != sorted(order):
        desc += (f"; tokens run over the convolution's spatial axes in the order {order} (a permuted flatten): "
                 f"the grid is given in token order")
    return desc


def site_grids(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Set ``token_grid`` (and ``token_grid_desc``) of every self-attention site whose query tokens' order is
    proven, else ``token_grid_why``."""
    prop = _Propagation(gm)
    for site in sites:
        if site.s_q != site.s_k or site.symbolic_seq:
            continue
        lay = prop.get(site.q)
        axis = site.q_seq_axis
        if lay is None or axis is None or not -len(lay.axes) <= axis < len(lay.axes):
            site.token_grid_why = _why(prop, site)
            continue
        segs = lay.axes[axis]
        grid_segs = [i for i, sg in enumerate(segs) if sg[0] == "f"]
        if len(grid_segs) != 1 or not segs[grid_segs[0]][1] or \
                not all(_grid_axis(lbl) for lbl, _ in segs[grid_segs[0]][1]):
            site.token_grid_why = ("the query tokens are not one run of patch-embedding positions (features, or "
                                   "several runs)")
            continue
        i = grid_segs[0]
        factors = segs[i][1]
        prefix = sum(_seg_size(s) for s in segs[:i])
        suffix = sum(_seg_size(s) for s in segs[i + 1:])
        grid = tuple(s for _, s in factors)
        if prefix + math.prod(grid) + suffix != site.s_q:
            site.token_grid_why = "the proven token layout does not add up to the sequence length"
            continue
        site.token_grid = (grid, prefix, suffix)
        desc = _describe(factors, lay.src)
        if prefix or suffix:
            desc += f"; globals prefix={prefix} suffix={suffix}"
        site.token_grid_desc = desc


def _why(prop: _Propagation, site: AttentionSite) -> str:
    """Name the op where the patch embedding's layout was lost on the way to the site's queries."""
    if site.q_seq_axis is None:
        return "the queries' sequence axis is not known (a reshape merges it)"
    seen, stack, found = set(), [site.q], []
    while stack and len(seen) < 20000:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in prop.why:
            found.append(n)
            continue
        stack.extend(n.all_input_nodes)
    if not found:
        return "no patch-embedding convolution feeds the queries"
    last = max(found, key=prop.order.__getitem__)
    return f"the token order is lost at `{prop.why[last]}` ({last.name}), which the proof does not follow"
