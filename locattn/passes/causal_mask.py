"""Prove from the graph that a site's mask or bias is causal, so the op can skip the blocks above the diagonal.

A site's mask is *causal* when every pair it allows has key ``j <= i`` query (top-left aligned, the last two axes
of its ``[.., Sq, Sk]`` frame). Then ``is_causal`` can be added to the site **and the mask kept**: the op attends
``mask & causal = mask``, so nothing the mask says is lost (a causal mask that also pads, or a sliding window
``j > i - w`` beside ``j <= i``, keeps that part), while every implementation skips the upper blocks (the dense
plan visits the lower half). Proofs, all sound (anything not recognised proves nothing):

* comparisons of affine index tensors: ``arange`` (+ constants, scaled), broadcast by indexing with ``None``,
  ``unsqueeze``, ``expand``, views, and gathered by tensor indices (``pos[b_idx, kv_idx] <= pos[b_idx, q_idx]``,
  how transformers builds its bool ``[B, 1, S, S]`` masks under ``torch.compile``); ``f <= 0`` is causal when
  ``f = a * (j - i) + c`` with ``a > 0``, ``c >= 0``;
* ``tril(x, k)`` with ``k <= 0`` (nonzero only on or below the diagonal), ``triu(ones, k)`` with ``k <= 1``
  negated (``masked_fill(triu(ones, 1).bool(), -inf)``), through slices of the last two axes that start together;
* ``and`` of parts (one causal part suffices), ``or`` (every part), ``not``; for a float bias,
  ``where(cond, x, v)`` / ``masked_fill(x, m, v)`` with ``v`` below ``registry.BIAS_MASK_BELOW`` (how transformers
  turns that mask into eager's float mask);
* a mask computed from a module *buffer* (a registered ``tril``): proven from its value at compile time, and
  checked at every call by an assert in the graph (the buffer could be changed after compiling); its cost is
  one pass over the mask.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..codegen.registry import BIAS_MASK_BELOW
from .sites import example

_MAX_DEPTH = 48
_ADD = {operator.add, torch.add, "add", "__add__", "__radd__"}
_SUB = {operator.sub, torch.sub, "sub", "__sub__"}
_MUL = {operator.mul, torch.mul, "mul", "__mul__", "__rmul__"}
_CMP = {operator.le: "le", torch.le: "le", "le": "le", "__le__": "le", operator.lt: "lt", torch.lt: "lt",
        "lt": "lt", "__lt__": "lt", operator.ge: "ge", torch.ge: "ge", "ge": "ge", "__ge__": "ge",
        operator.gt: "gt", torch.gt: "gt", "gt": "gt", "__gt__": "gt"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and, "logical_and", "__and__", "bitwise_and"}
_OR = {operator.or_, torch.logical_or, torch.bitwise_or, "logical_or", "__or__", "bitwise_or"}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "__invert__", "bitwise_not"}
_SAME = {"to", "contiguous", "clone", "long", "int", "float", "double", "half", "bfloat16", "type_as", "cpu",
         "cuda"}
_ONES = {torch.ones, torch.ones_like, "new_ones"}
_TRI = {torch.tril: True, "tril": True, torch.triu: False, "triu": False}
#: dtypes that hold every index exactly (up to 2**24 tokens for float32)
_EXACT = {torch.int64, torch.int32, torch.float32, torch.float64}


def _target(n) -> object:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    return n.target


def _shape(n) -> tuple[int, ...] | None:
    ev = example(n)
    return tuple(int(s) if isinstance(s, int) else -1 for s in ev.shape) if isinstance(ev, torch.Tensor) else None


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    t = _target(x)
    if t in (torch.full, torch.scalar_tensor, torch.tensor) and x.args:
        v = x.args[-1] if t is torch.full else x.args[0]
        return _number(v)
    if t in (torch.zeros, torch.zeros_like, "new_zeros"):
        return 0.0
    return None


# ----------------------------------------------------------------------------------------------------------
# affine index forms: value = c + sum(coef[a] * index along axis a), axes right-aligned (a < 0)


@dataclass(frozen=True)
class _Form:
    c: int = 0
    coef: tuple[tuple[int, int], ...] = ()        # sorted (axis, coefficient), axes of size > 1 only

    def get(self, a: int) -> int:
        return dict(self.coef).get(a, 0)

    def plus(self, o: "_Form", sign: int = 1) -> "_Form":
        d = dict(self.coef)
        for a, k in o.coef:
            d[a] = d.get(a, 0) + sign * k
        return _Form(self.c + sign * o.c, tuple(sorted((a, k) for a, k in d.items() if k)))

    def times(self, f: int) -> "_Form":
        return _Form(self.c * f, tuple((a, k * f) for a, k in self.coef if k * f))


def _relabel(f: _Form, src: tuple[int, ...], dst_of: dict[int, int], out_rank: int) -> _Form | None:
    """Move coefficients from positional axes of a rank-``len(src)`` tensor to positions ``dst_of`` in a rank
    ``out_rank`` one (keys right-aligned)."""
    out = []
    for a, k in f.coef:
        p = a + len(src)
        if p not in dst_of:
            return None
        out.append((dst_of[p] - out_rank, k))
    return _Form(f.c, tuple(sorted(out)))


def _basic_index(idx, shape) -> tuple[dict[int, int], dict[int, int], int] | None:
    """For ``x[idx]`` (ints, slices, None, Ellipsis): (input axis -> output axis, input axis -> slice start,
    output rank)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in idx):
        return None
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    src, dst, start, out_axis = 0, {}, {}, 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(len(shape) - used):
                dst[src], start[src] = out_axis, 0
                src, out_axis = src + 1, out_axis + 1
        elif i is None:
            out_axis += 1
        elif isinstance(i, slice):
            if i.step not in (None, 1) or not all(isinstance(x, (int, type(None))) for x in (i.start, i.stop)):
                return None
            s0 = 0 if i.start is None else (i.start % shape[src] if shape[src] > 0 else 0)
            dst[src], start[src] = out_axis, s0
            src, out_axis = src + 1, out_axis + 1
        else:
            src += 1
    while src < len(shape):
        dst[src], start[src] = out_axis, 0
        src, out_axis = src + 1, out_axis + 1
    return dst, start, out_axis


def _passthrough_axes(n: fx.Node, x: fx.Node) -> dict[int, int] | None:
    """Input -> output axis map of a shape op that keeps every axis of size > 1 (unsqueeze, expand, views that
    insert or drop size-1 axes, casts)."""
    si, so = _shape(x), _shape(n)
    if si is None or so is None:
        return None
    t = _target(n)
    if t in _SAME or t == "expand" or t is torch.Tensor.expand:
        return {p: p + len(so) - len(si) for p in range(len(si))}
    if t in ("unsqueeze", torch.unsqueeze, "view", "reshape", torch.reshape, "squeeze", torch.squeeze):
        big_i = [p for p, s in enumerate(si) if s != 1]
        big_o = [p for p, s in enumerate(so) if s != 1]
        if [si[p] for p in big_i] != [so[p] for p in big_o]:
            return None
        return dict(zip(big_i, big_o))
    return None


class _Prover:
    def __init__(self, gm: fx.GraphModule | None = None):
        self.gm = gm
        self.forms: dict[fx.Node, _Form | None] = {}
        #: buffer-derived parts proven by value: keep-mask nodes (and whether negated) to assert at run time
        self.guards: list[tuple[fx.Node, bool]] = []

    # -- index forms ---------------------------------------------------------------------------------------
    def form(self, n, depth: int = 0) -> _Form | None:
        if isinstance(n, bool):
            return None
        if isinstance(n, int):
            return _Form(n)
        if not isinstance(n, fx.Node) or depth > _MAX_DEPTH:
            return None
        if n not in self.forms:
            f, sh = self._form(n, depth), _shape(n)
            # an axis of size 1 only ever has index 0 (its offset is in c): it must not read as a broadcast index
            self.forms[n] = _Form(f.c, tuple((a, k) for a, k in f.coef if sh[a] > 1)) if f is not None else None
        return self.forms[n]

    def _form(self, n: fx.Node, depth: int) -> _Form | None:
        t, a = _target(n), n.args
        sh = _shape(n)
        if sh is None:
            return None
        if t is torch.arange:
            ints = [x for x in a if isinstance(x, int) and not isinstance(x, bool)]
            if len(ints) != len(a) or not ints:
                return None
            start, step = (0, 1) if len(ints) == 1 else (ints[0], ints[2] if len(ints) > 2 else 1)
            return _Form(start, ((-1, step),) if sh[-1] > 1 else ())
        if n.kwargs and t not in ("to", "type") and t is not torch.arange:
            return None                               # e.g. add(x, y, alpha=2)
        if t in _ADD | _SUB and len(a) == 2:
            x, y = self.form(a[0], depth + 1), self.form(a[1], depth + 1)
            return x.plus(y, -1 if t in _SUB else 1) if x is not None and y is not None else None
        if t in _MUL and len(a) == 2:
            for p, q in ((a[0], a[1]), (a[1], a[0])):
                if isinstance(q, int) and not isinstance(q, bool):
                    f = self.form(p, depth + 1)
                    return f.times(q) if f is not None else None
            return None
        if t is operator.getitem and isinstance(a[0], fx.Node):
            return self._getitem_form(n, depth)
        if t in ("to", "type") and any(isinstance(x, torch.dtype) and x not in _EXACT for x in
                                      list(a[1:]) + list(n.kwargs.values())):
            return None                               # a narrow dtype may not hold every index
        if t in ("half", "bfloat16", "short", "char", "byte", "bool"):
            return None
        if isinstance(a[0] if a else None, fx.Node):
            m = _passthrough_axes(n, a[0])
            f = self.form(a[0], depth + 1) if m is not None else None
            return _relabel(f, _shape(a[0]), m, len(sh)) if f is not None else None
        return None

    def _getitem_form(self, n: fx.Node, depth: int) -> _Form | None:
        src, idx = n.args
        ss, so = _shape(src), _shape(n)
        f = self.form(src, depth + 1)
        if f is None or ss is None:
            return None
        if isinstance(idx, tuple) and idx and len(idx) == len(ss) and all(
                isinstance(i, fx.Node) and isinstance(example(i), torch.Tensor) and not example(i).is_floating_point()
                and example(i).dtype != torch.bool for i in idx):
            out = _Form(f.c)                      # src[i0(x), ..., i_{r-1}(x)] = c + sum coef_d * i_d(x)
            for d, i in enumerate(idx):
                k = f.get(d - len(ss))
                if k:
                    fi = self.form(i, depth + 1)
                    if fi is None:
                        return None
                    out = out.plus(fi.times(k))
            return out
        m = _basic_index(idx, ss)
        if m is None:
            return None
        dst, start, _ = m
        c = f.c + sum(k * start.get(a + len(ss), 0) for a, k in f.coef)
        g = _relabel(_Form(c, f.coef), ss, dst, len(so))
        return g

    # -- predicates -----------------------------------------------------------------------------------------
    def subset(self, n, neg: bool = False, depth: int = 0) -> bool:
        """Is the set where ``n`` (bool, or nonzero) holds — its complement with ``neg`` — inside ``j <= i``?"""
        if not isinstance(n, fx.Node) or depth > _MAX_DEPTH:
            return False
        t, a = _target(n), n.args
        if t in _AND and len(a) == 2:
            parts = [self.subset(x, neg, depth + 1) for x in a]
            return all(parts) if neg else any(parts)
        if t in _OR and len(a) == 2:
            parts = [self.subset(x, neg, depth + 1) for x in a]
            return any(parts) if neg else all(parts)
        if t in _NOT and a:
            return self.subset(a[0], not neg, depth + 1)
        if t in _CMP and len(a) == 2:
            return self._compare(_CMP[t], a[0], a[1], neg, depth)
        if t in (operator.ne, torch.ne, "ne", "__ne__", operator.eq, torch.eq, "eq", "__eq__") and len(a) == 2:
            x, z = (a[0], a[1]) if _number(a[1]) == 0 else (a[1], a[0]) if _number(a[0]) == 0 else (None, None)
            eq = t in (operator.eq, torch.eq, "eq", "__eq__")
            return x is not None and self.nonzero(x, neg != eq, depth + 1)
        if (t == "bool" or t in _TRI) and a:
            return self.nonzero(n if t in _TRI else a[0], neg, depth + 1)
        if a and isinstance(a[0], fx.Node) and _shape(n) is not None and _shape(a[0]) is not None:
            m = _passthrough_axes(n, a[0])
            if m is not None and _keeps_last2(m, _shape(a[0]), _shape(n)):
                return self.subset(a[0], neg, depth + 1)
        return self._by_value(n, neg)

    def _compare(self, op: str, x, y, neg: bool, depth: int) -> bool:
        fx_, fy = self.form(x, depth + 1), self.form(y, depth + 1)
        if fx_ is None or fy is None:
            return False
        # f <= 0 (integers: f < 0 is f + 1 <= 0); the complement of f <= 0 is -f + 1 <= 0
        f = {"le": fx_.plus(fy, -1), "lt": fx_.plus(fy, -1).plus(_Form(1)),
             "ge": fy.plus(fx_, -1), "gt": fy.plus(fx_, -1).plus(_Form(1))}[op]
        if neg:
            f = f.times(-1).plus(_Form(1))
        k = f.get(-1)
        return k > 0 and f.get(-2) == -k and f.c >= 0 and all(a in (-1, -2) for a, _ in f.coef)

    def nonzero(self, n, neg: bool, depth: int) -> bool:
        """Is ``n != 0`` (``n == 0`` with ``neg``) inside ``j <= i``?"""
        if not isinstance(n, fx.Node) or depth > _MAX_DEPTH:
            return False
        t, a = _target(n), n.args
        if t in _TRI and a:
            k = a[1] if len(a) > 1 else n.kwargs.get("diagonal", 0)
            if not isinstance(k, int):
                return False
            lower = _TRI[t]
            if not neg:                 # nonzero only where j - i <= k (tril)
                return lower and k <= 0
            # zeros where j - i > k (tril) / j - i < k (triu), and wherever x is 0: x must have none
            return (k >= 0 if lower else k <= 1) and self._nonzero_const(a[0])
        if t is operator.getitem and isinstance(a[0], fx.Node):
            ss = _shape(a[0])
            m = _basic_index(a[1], ss) if ss is not None else None
            if m is None:
                return False
            dst, start, rank = m
            r = len(ss)
            if dst.get(r - 1) != rank - 1 or dst.get(r - 2) != rank - 2 or start[r - 1] != start[r - 2]:
                return False            # both last axes kept and sliced from the same offset: diagonal kept
            return self.nonzero(a[0], neg, depth + 1)
        if _shape(n) is not None and example(n).dtype == torch.bool:
            return self.subset(n, neg, depth + 1)
        if a and isinstance(a[0], fx.Node) and _shape(n) is not None and _shape(a[0]) is not None:
            m = _passthrough_axes(n, a[0])
            if m is not None and _keeps_last2(m, _shape(a[0]), _shape(n)):
                return self.nonzero(a[0], neg, depth + 1)
        return self._by_value(n, neg, nonzero=True)

    def _nonzero_const(self, n) -> bool:
        t = _target(n)
        if t in _ONES:
            return True
        if t is torch.full and len(n.args) > 1:
            v = _number(n.args[1])
            return v is not None and v != 0
        return False

    # -- buffers: by value, checked at run time --------------------------------------------------------------
    def _by_value(self, n: fx.Node, neg: bool, nonzero: bool = False) -> bool:
        memo: dict = {}
        val = _concrete(n, self.gm, memo)
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return False
        keep = ~val.bool() if neg else val.bool()          # bool(): nonzero for numbers
        if bool(keep.triu(1).any()):
            return False
        if any(x.op == "placeholder" and v is not None for x, v in memo.items()):
            self.guards.append((n, neg))                   # from a buffer: it could change after compiling
        return True

    # -- float biases ------------------------------------------------------------------------------------------
    def bias(self, n, factor: float = 1.0, depth: int = 0) -> bool:
        """Does the bias ``n * factor`` mask (fall below ``BIAS_MASK_BELOW`` at) every pair with ``j > i``?"""
        if not isinstance(n, fx.Node) or depth > _MAX_DEPTH or factor <= 0:
            return False
        t, a = _target(n), n.args
        if t is torch.where and len(a) == 3:
            cond, x, y = a
            vy, vx = _number(y), _number(x)
            if vy is not None and vy * factor < BIAS_MASK_BELOW:       # allowed only where cond
                return self.subset(cond, False, depth + 1)
            if vx is not None and vx * factor < BIAS_MASK_BELOW:       # allowed only where not cond
                return self.subset(cond, True, depth + 1)
            return False
        if t in ("masked_fill", torch.masked_fill) and len(a) == 3:
            v = _number(a[2])
            if v is not None and v * factor < BIAS_MASK_BELOW and self.subset(a[1], True, depth + 1):
                return True
            return self.bias(a[0], factor, depth + 1)
        if t in _MUL and len(a) == 2:
            for p, q in ((a[0], a[1]), (a[1], a[0])):
                f = _number(q)
                if f is not None and isinstance(p, fx.Node):
                    return self.bias(p, factor * f, depth + 1)
            return False
        if a and isinstance(a[0], fx.Node) and _shape(n) is not None and _shape(a[0]) is not None:
            m = _passthrough_axes(n, a[0])
            if m is not None and _keeps_last2(m, _shape(a[0]), _shape(n)):
                return self.bias(a[0], factor, depth + 1)
        return False


def _keeps_last2(m: dict[int, int], si, so) -> bool:
    """The op keeps the last two axes (query, key) as the last two (size-1 axes may broadcast)."""
    for p, want in ((len(si) - 1, len(so) - 1), (len(si) - 2, len(so) - 2)):
        if p < 0:
            continue
        if si[p] != 1 and m.get(p) != want:
            return False
    return True


_CONCRETE_OPS = 64
_CONCRETE_ELEMS = 1 << 24


def _concrete(n, gm: fx.GraphModule | None, memo: dict):
    """The value of ``n`` when it depends only on module buffers (Dynamo records the real tensor of each),
    constants and shape arithmetic; else None. Small subgraphs (``_CONCRETE_OPS`` nodes) and tensors only."""
    if not isinstance(n, fx.Node):
        return n
    if n in memo:
        return memo[n]
    if len(memo) > _CONCRETE_OPS:
        return None
    memo[n] = None
    val = None
    if n.op == "placeholder":
        ga = n.meta.get("grapharg")
        if ga is not None and "_buffers" in str(getattr(ga, "source", "")):
            val = ga.example
    elif n.op == "get_attr" and gm is not None:
        val = getattr(gm, n.target, None)
    elif n.op in ("call_function", "call_method") and _deterministic_pure(n):
        ins = [_concrete(x, gm, memo) for x in n.all_input_nodes]
        if all(isinstance(v, torch.Tensor) and v.numel() <= _CONCRETE_ELEMS for v in ins):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda x: memo[x])
            try:
                with torch.no_grad():
                    val = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" \
                        else n.target(*args, **kwargs)
            except Exception:
                val = None
    memo[n] = val
    return val


def _deterministic_pure(n: fx.Node) -> bool:
    """May ``n`` run at compile time: no randomness, no uninitialised memory, no in-place write (it would write
    the module's buffer)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if n.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand,
                    operator.ior):
        return False
    if name.endswith("_") and not name.endswith("__"):
        return False
    return not any(w in name for w in ("rand", "bernoulli", "multinomial", "normal", "dropout", "uniform",
                                       "exponential", "poisson", "cauchy", "geometric", "empty", "manual_seed"))


@dataclass
class CausalProof:
    """Result of :func:`prove_causal`: ``why`` (empty: not proven) and the run-time checks it needs."""

    why: str = ""
    guards: list = field(default_factory=list)


def prove_causal(masks: list[tuple[fx.Node, bool]], biases: list[tuple[fx.Node, float]],
                 gm: fx.GraphModule | None = None) -> CausalProof:
    """Whether a site's mask parts (``(node, keep_if_true)``: the part allows where ``node`` is True, or False)
    or its single bias term (``(node, coefficient)``) allow only ``j <= i``. With several bias terms nothing is
    proven (a sum's other terms are not bounded)."""
    for node, keep_if_true in masks:
        p = _Prover(gm)
        if p.subset(node, neg=not keep_if_true):
            return CausalProof(f"the mask `{node.name}` allows only keys j <= i", p.guards)
    if len(biases) == 1:
        node, coef = biases[0]
        p = _Prover(gm)
        if p.bias(node, coef):
            return CausalProof(f"the bias `{node.name}` masks every key j > i", p.guards)
    return CausalProof()


def emit_guards(g: fx.Graph, proof: CausalProof) -> None:
    """Insert after each buffer-derived part proven causal by value a run-time check that it still is
    (``keep.triu(1)`` empty; a failure raises instead of attending what the mask allows)."""
    msg = ("locattn: a mask buffer proven causal at compile time now allows a key after its query; recompile "
           "(torch._dynamo.reset())")
    for node, neg in proof.guards:
        cur = node

        def add(target, *args, kind="call_function"):
            nonlocal cur
            with g.inserting_after(cur):
                cur = g.create_node(kind, target, args)
            return cur

        keep = add("bool", node, kind="call_method")
        if neg:
            keep = add(torch.logical_not, keep)
        bad = add("any", add(torch.triu, keep, 1), kind="call_method")
        add(torch._assert_async, add(torch.logical_not, bad), msg)
