"""Find hand-written softmax attention in a Dynamo graph, by meaning rather than by spelling.

What it matches: every softmax over the last dimension whose input is an *affine function of one contraction*
``q @ kᵀ`` and whose output (through casts, views and inactive dropout) is the left operand of a second
contraction ``p @ v``. Between the two the matcher canonicalizes instead of pattern-matching spellings:

* contractions: ``@`` / ``torch.matmul`` / ``.matmul``, ``torch.bmm`` on ``[B*H, S, D]``,
  ``torch.baddbmm(bias, q, kᵀ, beta=, alpha=)``, ``torch.einsum`` with any letters (and ``...``);
  ``kᵀ`` through any chain of ``transpose`` / ``permute`` / ``.mT``;
* scores: views and reshapes that keep the last two dims, ``contiguous`` and dtype casts are stripped;
  scalar factors (``* s``, ``s *``, ``/ s``, ``torch.full([], s)``, baddbmm's ``alpha``, factors on q or k
  before the contraction) fold into one ``scale``; tensors added in any view of the scores become one float
  ``bias`` (mapped to ``[B, H, Sq, Sk]``, multiplied by the factors applied after them); ``masked_fill``
  with a very negative value and ``torch.where(m, scores, -big)`` become one bool ``mask`` (True = attend);
  terms constant along the key axis (``- amax(-1, keepdim=True)``) are dropped (softmax ignores them);
* layouts: the score contraction's batch dims become ``[B, H]``: two dims as they are, ``[B*H]`` split
  back into heads when q was reshaped from a ``[B, H, S, D]`` tensor (else ``H = 1``), more dims fold into
  ``B``; einsum operands are permuted into place; ``repeat_kv`` (expand + reshape) and
  ``repeat_interleave(dim=1)`` on both k and v are undone, so the op receives the un-repeated k/v (GQA).

A softmax fed by ``q @ kᵀ`` whose probabilities reach ``p @ v`` but cannot be rewritten faithfully is still
reported, with a ``blocker``: probabilities used elsewhere (returned attention weights), a non-affine op
between scores and softmax (tanh soft-capping), dropout active in training, a non-constant scale. A softmax
that is not fed by a contraction or does not feed one (classifier heads, MoE routers) is not a site.

Numerical caveat: a query row whose keys are *all* masked with a finite fill value (``finfo.min``) gets a
uniform distribution in eager and zeros from the op (SDPA gives NaN); no other difference.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .causal_mask import prove_causal
from .sites import (AttentionSite, SoftmaxLeft, adopt_causal_proof, example, keep_views_valid, module_path,
                    static_int)

#: a fill value at or below this (after the factors applied later) blocks the key: exp() of it is 0
MASK_FILL_MAX = -1e4
_MAX_WALK = 64

# ---------------------------------------------------------------------------------------------------------
# op vocabulary
# ---------------------------------------------------------------------------------------------------------

_SOFTMAX_FNS = {torch.softmax, F.softmax, torch.special.softmax}
_MATMUL_FNS = {operator.matmul, torch.matmul}
_BMM_FNS = {torch.bmm}
_BADDBMM_FNS = {torch.baddbmm}
_EINSUM_FNS = {torch.einsum, torch.functional.einsum}
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_TANH_FNS = {torch.tanh, F.tanh, torch.nn.functional.tanh}

_MUL_FNS = {operator.mul, torch.mul, operator.imul}
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
_ADD_FNS = {operator.add, torch.add, operator.iadd}
_SUB_FNS = {operator.sub, torch.sub, operator.isub}
_INPLACE_FNS = {operator.imul, operator.itruediv, operator.iadd, operator.isub}
_MUL_METHODS = {"mul", "__mul__", "__rmul__", "mul_"}
_DIV_METHODS = {"div", "true_divide", "__truediv__", "div_"}
_ADD_METHODS = {"add", "__add__", "__radd__", "add_"}
_SUB_METHODS = {"sub", "__sub__", "sub_"}

_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}
_COPY_METHODS = {"contiguous", "clone"}
_VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"}
_VIEW_FNS = {torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze}
_PERM_METHODS = {"transpose", "permute", "swapaxes", "swapdims", "t"}
_PERM_FNS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.t}
_CONST_FNS = {torch.full, torch.tensor, torch.scalar_tensor, torch.as_tensor}
_PURE_FNS = {torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.scalar_tensor, getattr,
             operator.eq, operator.ne, operator.invert, operator.getitem, torch.logical_not, torch.where,
             torch.masked_fill} | _MATMUL_FNS | _BMM_FNS | _BADDBMM_FNS | _EINSUM_FNS | _SOFTMAX_FNS \
    | _DROPOUT_FNS | _VIEW_FNS | _PERM_FNS | {operator.mul, operator.truediv, operator.add, operator.sub,
                                              torch.mul, torch.div, torch.add, torch.sub, torch.true_divide}


class _Reject(Exception):
    """This softmax is attention but cannot be rewritten; the message is the site's blocker."""


def _is_method(n: fx.Node, names) -> bool:
    return n.op == "call_method" and n.target in names


def _is_fn(n: fx.Node, fns) -> bool:
    return n.op == "call_function" and n.target in fns


def _opname(n: fx.Node) -> str:
    if n.op == "call_method":
        return f".{n.target}"
    t = n.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    return f"{'torch.' if mod.startswith('torch') and not name.startswith('torch') else ''}{name}"


def _inplace(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    return n.op == "call_function" and n.target in _INPLACE_FNS


def _shape(n) -> tuple[int, ...] | None:
    ev = example(n)
    if not isinstance(ev, torch.Tensor):
        return None
    return tuple(static_int(s) if static_int(s) is not None else -1 for s in ev.shape)


def _symbolic(n) -> bool:
    ev = example(n)
    return isinstance(ev, torch.Tensor) and any(not isinstance(s, int) for s in ev.shape)


def _dtype(n):
    ev = example(n)
    return ev.dtype if isinstance(ev, torch.Tensor) else None


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _number(x) -> float | None:
    """``x`` as a Python float if it is a compile-time constant (also ``torch.full([], c)`` and friends)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node):
        if _is_fn(x, _CONST_FNS) and x.args:
            shape_or_val = x.args[0]
            if x.target is torch.full:
                if len(x.args) > 1 and tuple(shape_or_val) == () and not isinstance(x.args[1], fx.Node):
                    return _number(x.args[1])
                return None
            return _number(shape_or_val)
        c = _classify(x)
        if c is not None and c[0] in ("cast", "copy"):
            return _number(c[1])
    return None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _perm_of(n: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The permutation σ with ``n = input.permute(σ)`` for transpose-like nodes."""
    ident = list(range(rank))
    if n.op == "call_function" and n.target is getattr:
        attr = n.args[1]
        if attr == "mT" and rank >= 2:
            ident[-2], ident[-1] = ident[-1], ident[-2]
            return tuple(ident)
        if attr == "T":
            return tuple(reversed(ident))
        return None
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    args = n.args[1:]
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _arg(n, 1, "dim0"), _arg(n, 2, "dim1")
        if not all(isinstance(x, int) for x in a):
            return None
        i, j = _norm_dim(a[0], rank), _norm_dim(a[1], rank)
        ident[i], ident[j] = ident[j], ident[i]
        return tuple(ident)
    if name == "t":
        return tuple(reversed(ident))
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = n.kwargs.get("dims", ())
        if len(dims) != rank or not all(isinstance(x, int) for x in dims):
            return None
        return tuple(_norm_dim(d, rank) for d in dims)
    return None


def _classify(n: fx.Node):
    """``(kind, tensor_input, extra)`` for single-tensor ops the matcher sees through, else None.

    kinds: ``scalar`` (extra: the factor), ``cast``, ``copy``, ``view``, ``perm`` (extra: σ). In-place ops are
    not classified (they alias their input).
    """
    if n.op not in ("call_method", "call_function") or _inplace(n) or not n.args:
        return None
    x = n.args[0]
    if n.op == "call_method":
        t = n.target
        if t in _MUL_METHODS | _DIV_METHODS and len(n.args) == 2 and not n.kwargs:
            s = _number(n.args[1])
            if s is None or not isinstance(x, fx.Node) or s == 0:
                return None
            return ("scalar", x, s if t in _MUL_METHODS else 1.0 / s)
        if t in _CAST_METHODS:
            return ("cast", x, None)
        if t in _COPY_METHODS:
            return ("copy", x, None)
        if t in _VIEW_METHODS and not any(isinstance(a, torch.dtype) for a in n.args[1:]):
            return ("view", x, None)
        if t in _PERM_METHODS:
            sh = _shape(x)
            p = _perm_of(n, len(sh)) if sh is not None else None
            return ("perm", x, p) if p is not None else None
        return None
    t = n.target
    if t in _MUL_FNS | _DIV_FNS and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if t in _MUL_FNS:
            if isinstance(a, fx.Node) and _number(b) is not None and _number(a) is None:
                return ("scalar", a, _number(b))
            if isinstance(b, fx.Node) and _number(a) is not None and _number(b) is None:
                return ("scalar", b, _number(a))
            return None
        s = _number(b)
        if isinstance(a, fx.Node) and s is not None and s != 0:
            return ("scalar", a, 1.0 / s)
        return None
    if t is getattr and len(n.args) == 2 and n.args[1] in ("mT", "T"):
        sh = _shape(x)
        p = _perm_of(n, len(sh)) if sh is not None else None
        return ("perm", x, p) if p is not None else None
    if t in _VIEW_FNS and isinstance(x, fx.Node):
        return ("view", x, None)
    if t in _PERM_FNS and isinstance(x, fx.Node):
        sh = _shape(x)
        p = _perm_of(n, len(sh)) if sh is not None else None
        return ("perm", x, p) if p is not None else None
    return None


# ---------------------------------------------------------------------------------------------------------
# contractions
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Operand:
    """One operand of a contraction, and how to reorder it to ``[*lead, X, Y]`` (aligned with the output)."""

    node: fx.Node
    perm: tuple[int, ...]            # x.permute(perm) puts the dims in canonical order
    aligned: tuple[int, ...]         # shape after permute + inserting broadcast dims: [*lead (1 or full), X, Y]


@dataclass
class _Contraction:
    node: fx.Node
    form: str                        # "matmul" | "bmm" | "baddbmm" | "einsum"
    a: _Operand                      # q (scores) / p (values), canonical [*lead, Sq, D] / [*lead, Sq, Sk]
    b: _Operand                      # k (scores) / v (values), canonical [*lead, Sk, D] / [*lead, Sk, Dv]
    lead: tuple[int, ...]            # batch dims of the output
    out_perm: tuple[int, ...] | None = None   # einsum values: canonical [*lead, Sq, Dv] -> output order
    bias: fx.Node | None = None      # baddbmm input (beta != 0)
    beta: float = 0.0
    alpha: float = 1.0
    letters: str = ""                # einsum: q operand letters in canonical roles (for the layout string)


def _matmul_operands(n: fx.Node):
    if _is_fn(n, _MATMUL_FNS) and len(n.args) == 2:
        return "matmul", n.args[0], n.args[1]
    if _is_method(n, {"matmul", "__matmul__"}) and len(n.args) == 2:
        return "matmul", n.args[0], n.args[1]
    if _is_fn(n, _BMM_FNS) and len(n.args) == 2:
        return "bmm", n.args[0], n.args[1]
    if _is_method(n, {"bmm"}) and len(n.args) == 2:
        return "bmm", n.args[0], n.args[1]
    return None


def _pad(shape, rank) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + tuple(shape)


def _matmul_like(n, form, a, b, swap_b: bool) -> _Contraction | None:
    """``a [*ba, M, K] @ b [*bb, K, N]``; with ``swap_b`` the canonical b is bᵀ ``[*bb, N, K]``."""
    sa, sb, so = _shape(a), _shape(b), _shape(n)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        return None
    lead = so[:-2]
    if len(sa) - 2 > len(lead) or len(sb) - 2 > len(lead):
        return None
    rb = len(sb)
    perm_b = tuple(range(rb - 2)) + ((rb - 1, rb - 2) if swap_b else (rb - 2, rb - 1))
    b_last = (sb[-1], sb[-2]) if swap_b else sb[-2:]
    ao = _Operand(a, tuple(range(len(sa))), _pad(sa[:-2], len(lead)) + sa[-2:])
    bo = _Operand(b, perm_b, _pad(sb[:-2], len(lead)) + tuple(b_last))
    return _Contraction(n, form, ao, bo, lead)


def _einsum_parse(n: fx.Node):
    """``(input letter strings, output letters, operand nodes)`` with ``...`` expanded, or None."""
    if not n.args or not isinstance(n.args[0], str):
        return None
    eq = n.args[0].replace(" ", "")
    ops = list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not all(isinstance(o, fx.Node) for o in ops):
        return None
    lhs, _, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ops):
        return None
    shapes = [_shape(o) for o in ops]
    if any(s is None for s in shapes):
        return None
    ell_letters = "ABCDEFGHIJKLMNOP"
    n_ell = 0
    for term, s in zip(ins, shapes):
        if "..." in term:
            n_ell = max(n_ell, len(s) - (len(term) - 3))
    new_ins = []
    for term, s in zip(ins, shapes):
        if "..." in term:
            k = len(s) - (len(term) - 3)
            term = term.replace("...", ell_letters[n_ell - k:n_ell])
        if len(term) != len(s) or len(set(term)) != len(term):
            return None
        new_ins.append(term)
    if "->" not in eq:
        counts = {}
        for t in new_ins:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = ell_letters[:n_ell] + "".join(sorted(c for c, k in counts.items() if k == 1 and c.islower()))
    else:
        out = out.replace("...", ell_letters[:n_ell])
    if len(set(out)) != len(out):
        return None
    return new_ins, out, ops


def _operand_from_letters(node, letters: str, order: str, sizes: dict) -> _Operand:
    """Operand with ``letters`` reordered to ``order`` (letters of ``order`` it lacks become size-1 dims)."""
    present = [c for c in order if c in letters]
    perm = tuple(letters.index(c) for c in present)
    aligned = tuple(sizes[c] if c in letters else 1 for c in order)
    return _Operand(node, perm, aligned)


def _score_contraction(n: fx.Node) -> _Contraction | None:
    """``n`` as ``q @ kᵀ`` (output ``[*lead, Sq, Sk]``), or None."""
    mm = _matmul_operands(n)
    if mm is not None:
        return _matmul_like(n, mm[0], mm[1], mm[2], swap_b=True)
    if _is_fn(n, _BADDBMM_FNS) or _is_method(n, {"baddbmm"}):
        # positional or keyword: BLOOM writes ``alibi.baddbmm(batch1=q, batch2=kᵀ, beta=, alpha=)``
        inp, a, b = _arg(n, 0, "input"), _arg(n, 1, "batch1"), _arg(n, 2, "batch2")
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        c = _matmul_like(n, "baddbmm", a, b, swap_b=True)
        if c is None:
            return None
        beta, alpha = _number(n.kwargs.get("beta", 1.0)), _number(n.kwargs.get("alpha", 1.0))
        if beta is None or alpha is None:
            raise _Reject("baddbmm with non-constant beta/alpha")
        c.beta, c.alpha = beta, alpha
        c.bias = inp if beta != 0 and isinstance(inp, fx.Node) else None
        return c
    if _is_fn(n, _EINSUM_FNS):
        p = _einsum_parse(n)
        if p is None or len(p[2]) != 2 or len(p[1]) < 2:
            return None
        (ta, tb), out, (na, nb) = p
        qf, kf = out[-2], out[-1]
        if qf in tb or kf in ta:
            ta, tb, na, nb = tb, ta, nb, na
        if not (qf in ta and qf not in tb and kf in tb and kf not in ta):
            return None
        contracted = [c for c in ta if c in tb and c not in out]
        batch = out[:-2]
        if len(contracted) != 1 or any(c not in ta and c not in tb for c in batch):
            return None
        if any(c not in out and c not in contracted for c in ta + tb):
            return None     # a summed-out free axis: not attention
        d = contracted[0]
        sizes = dict(zip(ta, _shape(na)))
        sizes.update(zip(tb, _shape(nb)))
        qo = _operand_from_letters(na, ta, batch + qf + d, sizes)
        ko = _operand_from_letters(nb, tb, batch + kf + d, sizes)
        lead = _shape(n)[:-2]
        role = {qf: "S", d: "D"}
        for i, c in enumerate(batch):
            role[c] = "H" if i == len(batch) - 1 and len(batch) > 1 else "B"
        return _Contraction(n, "einsum", qo, ko, lead, letters="".join(role.get(c, "?") for c in ta))
    return None


def _value_contraction(n: fx.Node, p: fx.Node) -> _Contraction | None:
    """``n`` as ``p @ v`` with ``p [*lead, Sq, Sk]`` the probabilities, or None."""
    mm = _matmul_operands(n)
    if mm is not None:
        if mm[1] is not p or mm[2] is p:
            return None
        c = _matmul_like(n, mm[0], mm[1], mm[2], swap_b=False)
        if c is None or _shape(p)[:-2] != c.lead:
            return None
        return c
    if _is_fn(n, _EINSUM_FNS):
        parsed = _einsum_parse(n)
        if parsed is None or len(parsed[2]) != 2:
            return None
        ins, out, ops = parsed
        if ops[0] is p and ops[1] is not p:
            tp, tv, nv = ins[0], ins[1], ops[1]
        elif ops[1] is p and ops[0] is not p:
            tp, tv, nv = ins[1], ins[0], ops[0]
        else:
            return None
        lead_l, ql, kl = tp[:-2], tp[-2], tp[-1]
        free_v = [c for c in tv if c not in tp]
        if kl not in tv or kl in out or len(free_v) != 1 or free_v[0] not in out:
            return None
        dl = free_v[0]
        if set(out) != set(lead_l) | {ql, dl} or len(out) != len(lead_l) + 2:
            return None
        if any(c not in tp and c != dl for c in tv):
            return None
        sizes = dict(zip(tp, _shape(p)))
        sizes.update(zip(tv, _shape(nv)))
        canon = lead_l + ql + dl
        vo = _Operand(nv, tuple(tv.index(c) for c in lead_l + kl + dl if c in tv),
                      tuple(sizes[c] if c in tv else 1 for c in lead_l + kl + dl))
        po = _Operand(p, tuple(range(len(tp))), _shape(p))
        out_perm = tuple(canon.index(c) for c in out)
        return _Contraction(n, "einsum", po, vo, _shape(p)[:-2],
                            out_perm=None if out_perm == tuple(range(len(out))) else out_perm)
    return None


# ---------------------------------------------------------------------------------------------------------
# scores: softmax input = mult * (q @ kᵀ) + Σ coef·bias, with masks
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Term:
    node: fx.Node
    coef: float
    frame: tuple[int, ...]           # shape of the scores where the bias was added


@dataclass
class _Mask:
    node: fx.Node
    keep_if_true: bool               # where(m, s, -inf): True keeps; masked_fill(m, -inf): True blocks
    frame: tuple[int, ...]
    fill: float                      # fill value times the factors applied after it


@dataclass
class _Scores:
    con: _Contraction
    mult: float
    terms: list[_Term] = field(default_factory=list)
    masks: list[_Mask] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)     # chain nodes, contraction first
    #: soft-capping: the scores are ``mult * tanh(cap_inner * q·kᵀ) + terms`` (None: ``mult * q·kᵀ + terms``)
    cap_inner: float | None = None

    def copy(self) -> "_Scores":
        return self.scaled(1.0)

    def scaled(self, f: float) -> "_Scores":
        return _Scores(self.con, self.mult * f, [_Term(t.node, t.coef * f, t.frame) for t in self.terms],
                       [_Mask(m.node, m.keep_if_true, m.frame, m.fill * f) for m in self.masks], list(self.nodes),
                       self.cap_inner)


class _Matcher:
    def __init__(self, gm: fx.GraphModule):
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._memo: dict[fx.Node, _Scores | _Reject] = {}
        #: value-contraction nodes already replaced -> their replacement (sites may feed later sites)
        self.alias: dict[fx.Node, fx.Node] = {}

    # -- scores ------------------------------------------------------------------------------------------

    def scores(self, n: fx.Node, depth: int = 0) -> _Scores:
        if n in self._memo:
            r = self._memo[n]
            if isinstance(r, _Reject):
                raise r
            return r
        try:
            r = self._scores(n, depth)
        except _Reject as e:
            self._memo[n] = e
            raise
        self._memo[n] = r
        return r

    def _sub(self, x, parent: fx.Node, depth: int) -> _Scores:
        """Scores of ``x``, the score-path input of ``parent``; checks ``x`` is not mutated elsewhere."""
        if not isinstance(x, fx.Node):
            raise _Reject(f"`{_opname(parent)}` has no tensor score input")
        s = self.scores(x, depth + 1)
        extra = []
        for u in x.users:
            if u is parent or not _inplace(u):
                continue
            is_fill = _is_method(u, {"masked_fill_"}) and len(u.args) >= 3 and u.args[0] is x
            if is_fill and not u.users and self.order[u] < self.order[parent] and len(x.users) == 2:
                extra.append(u)
                continue
            raise _Reject(f"in-place `{_opname(u)}` on the scores")
        if _inplace(parent) and len(x.users) != 1:
            raise _Reject(f"in-place `{_opname(parent)}` on scores that are also used elsewhere")
        for u in extra:
            s = self._with_mask(s, u, u.args[1], u.args[2], keep_if_true=False, frame=_shape(x))
            s.nodes.append(u)
        return s

    def _with_mask(self, s: _Scores, at: fx.Node, m, fill, keep_if_true: bool, frame) -> _Scores:
        v = _number(fill)
        if v is None:
            raise _Reject(f"`{_opname(at)}` with a non-constant fill value")
        if v > MASK_FILL_MAX:
            raise _Reject(f"`{_opname(at)}` fills scores with {v:g}, not a masking value")
        if not isinstance(m, fx.Node):
            raise _Reject(f"`{_opname(at)}` with a constant condition")
        out = s.copy()
        out.masks.append(_Mask(m, keep_if_true, frame, v))
        return out

    def _scores(self, n: fx.Node, depth: int) -> _Scores:
        if depth > _MAX_WALK:
            raise _Reject("score computation too long to follow")
        con = _score_contraction(n)
        if con is not None:
            s = _Scores(con, con.alpha, nodes=[n])
            if con.bias is not None:
                s.terms.append(_Term(con.bias, con.beta, _shape(n)))
            return s
        sh = _shape(n)
        if sh is None:
            raise _Reject(f"`{_opname(n)}` has no shape information")
        c = _classify(n)
        if c is not None:
            kind, x, extra = c
            if kind == "perm":
                raise _Reject(f"`{_opname(n)}` reorders the score matrix")
            if kind == "view" and (_shape(x) is None or _shape(x)[-2:] != sh[-2:]):
                raise _Reject(f"`{_opname(n)}` reshapes the query/key axes of the scores")
            s = self._sub(x, n, depth)
            if kind == "scalar":
                if extra <= 0:
                    raise _Reject(f"non-positive scale {extra:g} on the scores")
                s = s.scaled(extra)
            else:
                s = s.copy()
            s.nodes.append(n)
            return s
        # in-place scalar ops (x *= s) and everything with two operands
        if n.op == "call_function" and n.target in (operator.imul, operator.itruediv) or \
                _is_method(n, {"mul_", "div_"}):
            x, y = n.args[0], n.args[1] if len(n.args) > 1 else None
            f = _number(y)
            if f is None or f <= 0:
                raise _Reject(f"`{_opname(n)}` by {'a tensor' if f is None else f'{f:g}'} on the scores")
            s = self._sub(x, n, depth).scaled(f if (n.target in (operator.imul, "mul_")) else 1.0 / f)
            s.nodes.append(n)
            return s
        is_add = _is_fn(n, _ADD_FNS) or _is_method(n, _ADD_METHODS)
        is_sub = _is_fn(n, _SUB_FNS) or _is_method(n, _SUB_METHODS)
        if is_add or is_sub:
            return self._add(n, is_sub, depth)
        if _is_method(n, {"masked_fill", "masked_fill_"}) or _is_fn(n, {torch.masked_fill}):
            x, m, fill = _arg(n, 0, "input"), _arg(n, 1, "mask"), _arg(n, 2, "value")
            if _shape(x) != sh:
                raise _Reject(f"`{_opname(n)}` broadcasts the scores")
            s = self._sub(x, n, depth)
            s = self._with_mask(s, n, m, fill, keep_if_true=False, frame=sh)
            s.nodes.append(n)
            return s
        if _is_fn(n, {torch.where}) and len(n.args) == 3:
            cond, a, b = n.args
            if _number(a) is None and isinstance(a, fx.Node) and _number(b) is not None:
                s, keep, fill = self._sub(a, n, depth), True, b
            elif _number(b) is None and isinstance(b, fx.Node) and _number(a) is not None:
                s, keep, fill = self._sub(b, n, depth), False, a
            else:
                raise _Reject("`torch.where` between two tensors on the scores")
            if _shape(a if keep else b) != sh:
                raise _Reject("`torch.where` broadcasts the scores")
            s = self._with_mask(s, n, cond, fill, keep_if_true=keep, frame=sh)
            s.nodes.append(n)
            return s
        if _is_fn(n, _TANH_FNS) or _is_method(n, {"tanh"}):
            return self._softcap(n, depth)
        if _is_fn(n, {operator.mul, operator.truediv, torch.mul, torch.div}) or _is_method(n, {"mul", "div"}):
            raise _Reject(f"`{_opname(n)}` by a tensor on the scores: a non-constant scale (a learned "
                          "temperature, a buffer or a computed tensor) is not rewritten")
        raise _Reject(f"`{_opname(n)}` between the scores and the softmax is not affine")

    def _softcap(self, n: fx.Node, depth: int) -> _Scores:
        """``tanh`` of the scaled scores, as Gemma 2 soft-caps them (``c * tanh(s / c)``; the factor ``c`` after the
        tanh folds into ``mult`` like any scale). Sound only on ``mult * q·kᵀ`` itself: a bias or mask already added
        would be capped too, which the op's ``softcap`` (applied before the bias) does not express."""
        x = _arg(n, 0, "input")
        s = self._sub(x, n, depth)
        if s.cap_inner is not None:
            raise _Reject("`tanh` applied twice to the scores")
        if s.terms or s.masks:
            raise _Reject("`tanh` soft-capping of scores that already carry a bias or mask (the op caps before "
                          "the bias)")
        if _shape(x) != _shape(n):
            raise _Reject("`tanh` broadcasts the scores")
        out = _Scores(s.con, 1.0, nodes=list(s.nodes) + [n], cap_inner=s.mult)
        return out

    def _add(self, n: fx.Node, is_sub: bool, depth: int) -> _Scores:
        x, y = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
        alpha = _number(n.kwargs.get("alpha", 1.0))
        if alpha is None:
            raise _Reject(f"`{_opname(n)}` with a non-constant alpha")
        sign = -alpha if is_sub else alpha
        cands = [(x, y, sign, 1.0)]
        if not is_sub:
            cands.append((y, x, 1.0, alpha))
        else:
            cands.append((y, x, 1.0, -1.0))
        err = None
        for score, other, coef_other, coef_score in cands:
            if not isinstance(score, fx.Node) or _number(score) is not None:
                continue
            try:
                s = self._sub(score, n, depth)
            except _Reject as e:
                err = err or e
                continue
            if coef_score <= 0:
                raise _Reject("scores are negated")
            if _shape(score) != _shape(n):
                raise _Reject(f"`{_opname(n)}` broadcasts the scores")
            s = s.scaled(coef_score)
            osh = _shape(other) if isinstance(other, fx.Node) else None
            if isinstance(other, fx.Node) and _number(other) is None and osh is not None:
                if not (len(osh) >= 1 and osh[-1] == 1 and _shape(n)[-1] != 1):   # else constant along keys:
                    s.terms.append(_Term(other, coef_other, _shape(n)))           # the softmax ignores it
            elif _number(other) is None:
                raise _Reject(f"`{_opname(n)}` with an unknown operand")
            s.nodes.append(n)
            return s
        raise err or _Reject(f"`{_opname(n)}` with no score operand")

    # -- probabilities -----------------------------------------------------------------------------------

    def probs(self, sm: fx.Node):
        """``(value contraction, chain nodes, blocker)``; None if the probabilities feed no contraction."""
        cur, nodes, blocker = sm, [], ""
        while True:
            users = list(cur.users)
            if len(users) == 1:
                u = users[0]
                vc = _value_contraction(u, cur)
                if vc is not None:
                    return vc, nodes + [u], blocker
                if self._passthrough(u, cur):
                    why = self._dropout_blocker(u)
                    blocker = blocker or why
                    nodes.append(u)
                    cur = u
                    continue
            break
        # not a clean chain: look a few ops ahead for the value contraction, to report the site
        frontier, seen = [(sm, ())], {sm}
        for _ in range(6):
            nxt = []
            for node, path in frontier:
                for u in node.users:
                    vc = _value_contraction(u, node)
                    if vc is not None:
                        why = self._path_blocker(sm, path, u)
                        return vc, list(path) + [u], blocker or why
                    if u not in seen and u.op in ("call_function", "call_method"):
                        seen.add(u)
                        nxt.append((u, path + (u,)))
            frontier = nxt
        return None

    def _passthrough(self, u: fx.Node, x: fx.Node) -> bool:
        if _is_fn(u, _DROPOUT_FNS):
            return u.args and u.args[0] is x
        c = _classify(u)
        if c is None or c[1] is not x or c[0] not in ("cast", "copy", "view"):
            return False
        if c[0] == "view":
            return _shape(u) is not None and _shape(u)[-2:] == _shape(x)[-2:]
        return True

    @staticmethod
    def _dropout_blocker(u: fx.Node) -> str:
        if not _is_fn(u, _DROPOUT_FNS):
            return ""
        if u.target is torch.dropout:
            p, train = _arg(u, 1, "p", 0.5), _arg(u, 2, "train", True)
        else:
            p, train = _arg(u, 1, "p", 0.5), _arg(u, 2, "training", True)
        if isinstance(train, fx.Node):
            return "dropout with a traced training flag"
        if not train:
            return ""
        if not isinstance(p, (int, float)):
            return "dropout with a traced p in training"
        if p > 0:
            return f"dropout p={p:g} active in training"
        return ""

    def _path_blocker(self, sm: fx.Node, path, contraction: fx.Node) -> str:
        chain = (sm,) + tuple(path) + (contraction,)
        for a, b in zip(chain, chain[1:]):
            if b is not contraction and not self._passthrough(b, a):
                return f"`{_opname(b)}` applied to the attention probabilities"
            others = [u for u in a.users if u is not b]
            if others:
                return (f"the attention probabilities are also used by `{others[0].name}` "
                        f"(e.g. returned attention weights)")
            w = self._dropout_blocker(b)
            if w:
                return w
        return "the attention probabilities are used elsewhere"


# ---------------------------------------------------------------------------------------------------------
# canonical operands
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Recipe:
    """How to build one canonical tensor at rewrite time: ``base`` then ``steps``.

    step: ``("replay", node)`` re-applies ``node`` (same op and arguments) to the running value;
    ``("method", name, *args)`` calls a tensor method; ``("fn", target, *args)`` a function.
    """

    base: fx.Node
    steps: list = field(default_factory=list)
    shape: tuple[int, ...] = ()

    def emit(self, g: fx.Graph, alias: dict) -> fx.Node:
        x = self.base
        while x in alias:   # the output of a site rewritten earlier in this graph
            x = alias[x]
        for st in self.steps:
            if st[0] == "replay":
                n = st[1]
                x = g.create_node(n.op, n.target, (x,) + tuple(n.args[1:]), dict(n.kwargs))
            elif st[0] == "method":
                x = g.call_method(st[1], (x,) + tuple(st[2:]))
            else:
                x = g.call_function(st[1], (x,) + tuple(st[2:]))
        return x

    @property
    def sized(self) -> bool:
        """Does the recipe bake explicit sizes (a problem under dynamic shapes)?"""
        return any(st[0] == "method" and st[1] in ("reshape", "expand") for st in self.steps)

    def source_axis(self, axis: int) -> int | None:
        """The axis of ``base`` that becomes axis ``axis`` of the emitted tensor (None when a reshape merges or
        splits it): how grid inference finds the sequence axis of a site's query in the graph."""
        shape = _shape(self.base)
        if shape is None:
            return None
        origin = list(range(len(shape)))          # origin[a]: base axis of current axis a (None: inserted)
        for st in self.steps:
            if st[0] != "method":
                continue                          # replayed casts, functions on masks: shape kept
            name, args = st[1], st[2:]
            if name == "permute":
                origin, shape = [origin[p] for p in args], tuple(shape[p] for p in args)
            elif name == "unsqueeze":
                d = _norm_dim(args[0], len(shape) + 1)
                origin.insert(d, None)
                shape = shape[:d] + (1,) + shape[d:]
            elif name == "squeeze":
                d = _norm_dim(args[0], len(shape))
                del origin[d]
                shape = shape[:d] + shape[d + 1:]
            elif name == "expand":
                shape = tuple(args)
            elif name == "reshape":
                groups = _group(tuple(shape), tuple(args))
                if groups is None:
                    return None
                new: list[int | None] = [None] * len(args)
                for fi, ci in groups:
                    if len(fi) == 1 and len(ci) == 1:
                        new[ci[0]] = origin[fi[0]]
                origin, shape = new, tuple(args)
        axis = _norm_dim(axis, len(origin))
        return origin[axis] if 0 <= axis < len(origin) else None


def _group(F_: tuple[int, ...], C: tuple[int, ...]):
    """Pair up dims of two shapes with equal products into groups of equal product (row-major)."""
    groups, i, j = [], 0, 0
    while i < len(F_) or j < len(C):
        fi, cj, pf, pc = i, j, 1, 1
        if i < len(F_):
            pf *= F_[i]
            i += 1
        if j < len(C):
            pc *= C[j]
            j += 1
        while pf != pc:
            if pf < pc and i < len(F_):
                pf *= F_[i]
                i += 1
            elif pc < pf and j < len(C):
                pc *= C[j]
                j += 1
            else:
                return None
        groups.append((list(range(fi, i)), list(range(cj, j))))
    return groups


def _convert_steps(src: tuple[int, ...], F_: tuple[int, ...], C: tuple[int, ...], allow: set[int],
                   full_rank: bool = False):
    """Steps taking a tensor of shape ``src`` (broadcastable to frame ``[*F_, X, Y]``) to ``[*C, X', Y']``.

    Dims of ``C`` in ``allow`` may stay 1 (broadcast); others are expanded to full size. A tensor of lower rank
    that already broadcasts is left at its rank (masks, biases) unless ``full_rank`` (the op's 4-D q / k / v:
    leading size-1 dims are inserted). Returns ``(steps, final_shape)``.
    """
    r = len(F_) + 2
    if len(src) > r:
        raise _Reject(f"tensor of rank {len(src)} in a rank-{r} score frame")
    s = _pad(src, r)
    lead, last2 = s[:-2], s[-2:]
    groups = _group(F_, C)
    if groups is None:
        raise _Reject(f"cannot map batch dims {F_} onto {C}")
    exp, out = list(lead), []
    for fi, ci in groups:
        sv, full, cs = [lead[i] for i in fi], [F_[i] for i in fi], [C[j] for j in ci]
        if sv == full:
            out += cs
        elif all(x == 1 for x in sv) and all(j in allow or C[j] == 1 for j in ci):
            out += [1] * len(ci)
        else:
            for i in fi:
                exp[i] = F_[i]
            out += cs
    steps = []
    cur = tuple(src)
    if tuple(exp) != lead:
        steps.append(("method", "expand", *exp, *last2))
        cur = tuple(exp) + last2
    final = tuple(out) + last2
    if final == cur or (not full_rank and len(cur) < len(final) and final == _pad(cur, len(final))):
        return steps, final if final == cur else _pad(cur, len(final))   # broadcasts as it is
    ins = _inserted_ones(cur, final)
    if ins is not None:
        steps += [("method", "unsqueeze", i) for i in ins]
    else:
        steps.append(("method", "reshape", *final))
    return steps, final


def _inserted_ones(cur: tuple[int, ...], final: tuple[int, ...]) -> list[int] | None:
    """Positions (ascending, in ``final``) of the size-1 dims whose insertion turns ``cur`` into ``final``."""
    out, i = [], 0
    for j, n in enumerate(final):
        if i < len(cur) and cur[i] == n:
            i += 1
        elif n == 1:
            out.append(j)
        else:
            return None
    return out if i == len(cur) else None


@dataclass
class _Walk:
    """An operand traced back through ops that commute with a scalar factor."""

    top: fx.Node                     # after peeling adjacent scalars/copies/transposes
    perm: tuple[int, ...]            # to apply to ``top`` (canonical dim order)
    factor: float                    # scalars peeled between the contraction and ``top``
    steps: list                      # [(node, kind, extra)], steps[i] produces vals[i] from vals[i + 1]
    vals: list


def _walk_operand(op: _Operand, strip_scalars: bool = True) -> _Walk:
    """Trace an operand back; ``strip_scalars=False`` (for v) treats scalar factors as opaque."""
    cur, perm, factor = op.node, tuple(op.perm), 1.0
    for _ in range(_MAX_WALK):
        c = _classify(cur)
        if c is None or (c[0] == "scalar" and not strip_scalars):
            break
        kind, x, extra = c
        if kind == "scalar":
            factor *= extra
        elif kind == "perm" and perm != tuple(range(len(perm))):
            perm = tuple(extra[p] for p in perm)
        elif kind != "copy":
            break
        cur = x
    steps, vals, n = [], [cur], cur
    for _ in range(16):
        c = _classify(n)
        if c is None or (c[0] == "scalar" and not strip_scalars):
            break
        steps.append((n, c[0], c[2]))
        n = c[1]
        vals.append(n)
    return _Walk(cur, perm, factor, steps, vals)


def _operand_recipe(op: _Operand, w: _Walk, F_, C, allow: set[int]) -> tuple[_Recipe, float]:
    """Canonical ``[*C, X, Y]`` recipe for an operand and the scalar factor it leaves out."""
    identity = w.perm == tuple(range(len(w.perm)))
    target = tuple(C) + tuple(op.aligned[-2:])
    top_shape = _shape(w.top)
    if identity and top_shape == tuple(op.aligned) and tuple(F_) != tuple(C):
        # a [B*H, S, D] operand reshaped from a [B, H, S, D] tensor: use that tensor
        factor, casts = w.factor, []
        for i, v in enumerate(w.vals):
            if _shape(v) == target and _head_axis(v) == 1:   # its [B, H] order is the fold's (heads inner)
                return _Recipe(v, [("replay", n) for n in reversed(casts)], target), factor
            if i == len(w.steps):
                break
            n, kind, extra = w.steps[i]
            src = _shape(w.vals[i + 1])
            if kind == "view" and (src is None or src[-2:] != _shape(n)[-2:]):
                break
            if kind not in ("scalar", "cast", "copy", "view"):
                break
            if kind == "scalar":
                factor *= extra
            elif kind == "cast":
                casts.append(n)
    scal = [i for i, (_, kind, _) in enumerate(w.steps) if kind == "scalar"]
    factor = w.factor
    if scal:
        last = scal[-1]
        base = w.vals[last + 1]
        steps = [("replay", n) for n, kind, _ in reversed(w.steps[:last + 1]) if kind not in ("scalar", "copy")]
        for n, kind, extra in w.steps[:last + 1]:
            if kind == "scalar":
                factor *= extra
    else:
        base, steps = w.top, []
    if not identity:
        steps.append(("method", "permute", *w.perm))
    cur = tuple(top_shape[p] for p in w.perm) if top_shape is not None else ()
    if cur != tuple(op.aligned):
        steps.append(("method", "reshape", *op.aligned))
    conv, final = _convert_steps(tuple(op.aligned), tuple(F_), tuple(C), allow, full_rank=True)
    return _Recipe(base, steps + conv, final), factor


def _unrepeat(r: _Recipe):
    """``(recipe of the un-repeated tensor, groups, repeat nodes)`` if ``r`` is a bare repeat_kv or
    repeat_interleave over heads."""
    if r.steps:
        return None
    n = r.base
    sh = _shape(n)
    if sh is None or len(sh) != 4:
        return None
    if (_is_method(n, {"repeat_interleave"}) or _is_fn(n, {torch.repeat_interleave})) and n.args:
        z, reps, dim = n.args[0], _arg(n, 1, "repeats"), _arg(n, 2, "dim")
        if isinstance(z, fx.Node) and isinstance(reps, int) and isinstance(dim, int) and _norm_dim(dim, 4) == 1:
            return _Recipe(z, [], _shape(z)), reps, [n]
        return None
    c = _classify(n)
    if c is None or c[0] != "view":
        return None
    e = c[1]
    if not _is_method(e, {"expand"}):
        return None
    es, y = _shape(e), e.args[0]
    ys = _shape(y)
    if es is None or ys is None or len(es) != 5 or len(ys) != 5 or ys[2] != 1:
        return None
    b, hk, g, s, d = es
    if (b, hk * g, s, d) != sh or ys[:2] != (b, hk) or ys[3:] != (s, d):
        return None
    # y = z[:, :, None] or z.unsqueeze(2)
    if _is_fn(y, {operator.getitem}) and isinstance(y.args[0], fx.Node) and _shape(y.args[0]) == (b, hk, s, d):
        return _Recipe(y.args[0], [], (b, hk, s, d)), g, [n, e, y]
    if _is_method(y, {"unsqueeze"}) and _norm_dim(_arg(y, 1, "dim"), 5) == 2:
        return _Recipe(y.args[0], [], (b, hk, s, d)), g, [n, e, y]
    return _Recipe(y, [("method", "squeeze", 2)], (b, hk, s, d)), g, [n, e]


def _mask_recipe(m: _Mask, F_, C) -> _Recipe:
    """Bool ``[.., Sq|1, Sk|1]`` mask, True = attend, broadcastable to ``[*C, Sq, Sk]``."""
    node, steps = m.node, []
    keep = m.keep_if_true
    # ``masked_fill(x == 0, -inf)`` keeps where ``x != 0``; ``~y`` keeps where ``y``
    if not keep and (_is_fn(node, {operator.eq}) or _is_method(node, {"eq", "__eq__"})) and len(node.args) == 2 \
            and isinstance(node.args[0], fx.Node):
        steps.append(("fn", operator.ne, node.args[1]))
        node, keep = node.args[0], True
    elif not keep and (_is_fn(node, {operator.invert, torch.logical_not}) or
                       _is_method(node, {"logical_not", "__invert__"})):
        node, keep = node.args[0], True
    if _dtype(node) is not torch.bool and not steps:
        steps.append(("method", "bool"))
    if not keep:
        steps.append(("fn", torch.logical_not))
    src = _shape(m.node)
    conv, final = _convert_steps(src, tuple(F_), tuple(C), {0, 1})
    return _Recipe(node, steps + conv, final)


def _bias_recipe(t: _Term, F_, C) -> _Recipe:
    steps = []
    if _dtype(t.node) is torch.bool:
        steps.append(("method", "float"))
    conv, final = _convert_steps(_shape(t.node), tuple(F_), tuple(C), {0, 1})
    steps += conv
    if t.coef != 1.0:
        steps.append(("fn", operator.mul, t.coef))
    return _Recipe(t.node, steps, final)


# ---------------------------------------------------------------------------------------------------------
# the finder
# ---------------------------------------------------------------------------------------------------------

def _softmax_input(n: fx.Node) -> tuple[fx.Node | None, str] | None:
    """``(input, "")`` of a softmax over the last dim, ``(None, why)`` of another softmax, None if ``n`` is no
    softmax."""
    if _is_method(n, {"softmax"}):
        x, dim = n.args[0], _arg(n, 1, "dim")
    elif _is_fn(n, _SOFTMAX_FNS):
        x, dim = _arg(n, 0, "input"), _arg(n, 1, "dim")
    else:
        return None
    sh = _shape(x) if isinstance(x, fx.Node) else None
    if sh is None or len(sh) < 2:
        return None, "softmax of a tensor of unknown or rank < 2 shape"
    if not isinstance(dim, int):
        return None, f"softmax over a non-constant dim ({dim!r})"
    if _norm_dim(dim, len(sh)) != len(sh) - 1:
        return None, f"softmax over dim {dim}, not the last (attention normalises over keys, the last dim)"
    return x, ""


def _canon_lead(lead: tuple[int, ...]) -> tuple[int, int]:
    if len(lead) == 0:
        return (1, 1)
    if len(lead) == 1:
        return (lead[0], 1)
    if len(lead) == 2:
        return tuple(lead)
    return (math.prod(lead[:-1]), lead[-1])


def _recover_heads(w: _Walk, n_bh: int, last2) -> tuple[tuple[int, int] | None, str]:
    """``((B, H), note)``: the batch and head counts of a ``[B, H, S, D]`` tensor the ``[B*H, S, D]`` operand was
    reshaped from, when :func:`_head_axis` proves its axis 1 holds the heads; else ``(None, why)`` (heads stay
    folded into the batch: exact for every pattern, but per-head rules cannot address them)."""
    for i, v in enumerate(w.vals):
        sh = _shape(v)
        if sh is not None and len(sh) == 4 and sh[0] * sh[1] == n_bh and sh[-2:] == tuple(last2):
            axis = _head_axis(v)
            if axis == 1:
                return (sh[0], sh[1]), ""
            why = "a head-major fold ([H, B, S, D] reshaped to [H*B, S, D])" if axis == 0 else \
                f"a [{sh[0]}*{sh[1]}, S, D] fold whose head axis the graph does not show"
            return None, f"{why}: heads kept folded into the batch (per-head rules cannot address them)"
        if i == len(w.steps):
            break
        n, kind, _ = w.steps[i]
        if kind not in ("scalar", "cast", "copy", "view"):
            break
    return None, ""


def _index_axes(n: fx.Node) -> list[int | None] | None:
    """For ``x[idx]`` with ``idx`` of ints, slices, ``None`` and ``...``: the input axis of every output axis
    (``None`` for an inserted axis), else None."""
    if not _is_fn(n, {operator.getitem}) or len(n.args) != 2 or not isinstance(n.args[0], fx.Node):
        return None
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    rank = len(_shape(n.args[0]) or ())
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in idx):
        return None
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, axis = [], 0
    for i in idx:
        if i is Ellipsis:
            out += list(range(axis, axis + rank - used))
            axis += rank - used
        elif i is None:
            out.append(None)
        elif isinstance(i, slice):
            out.append(axis)
            axis += 1
        else:
            axis += 1
    return out + list(range(axis, rank))


def _head_axis(n: fx.Node) -> int | None:
    """Which of axes 0 / 1 of the 4-D tensor ``n [*, *, S, D]`` holds the heads, proven from the graph: the one
    that a view split off the same feature axis as ``D`` (``[.., H*D] -> [.., H, D]``, the head split every
    projection makes), followed back through permutes, copies, casts, scalar factors, size-preserving views and
    basic indexing. None when no such split is found (a placeholder, a merge, an unknown op)."""
    pos = {0: 0, 1: 1, 3: 3}                  # axis of n -> its axis in the current node
    cur = n
    for _ in range(_MAX_WALK):
        c = _classify(cur)
        if c is None:
            back = _index_axes(cur)
            if back is None or any(back[p] is None for p in pos.values()):
                return None
            pos = {a: back[p] for a, p in pos.items()}
            cur = cur.args[0]
            continue
        kind, x, extra = c
        if kind == "perm":
            pos = {a: extra[p] for a, p in pos.items()}
        elif kind == "view":
            src, dst = _shape(x), _shape(cur)
            groups = _group(src, dst) if src is not None and dst is not None and -1 not in src + dst else None
            if groups is None:
                return None
            group = {a: next(g for g in groups if p in g[1]) for a, p in pos.items()}
            fi, ci = group[3]
            if len(ci) > 1:                  # D is part of a split: the heads' split if it is the feature axis's
                if len(fi) != 1 or fi[0] != len(src) - 1 or ci[-1] != pos[3]:
                    return None
                heads = [h for h in (0, 1) if pos[h] in ci]
                return heads[0] if len(heads) == 1 else None
            if any(len(g[0]) != 1 or len(g[1]) != 1 for g in group.values()):
                return None                  # a tracked axis merged or split elsewhere
            pos = {a: g[0][0] for a, g in group.items()}
        cur = x
        if not isinstance(cur, fx.Node):
            return None
    return None


def _layout_name(con: _Contraction, C, recovered: bool) -> str:
    if con.form == "einsum" and con.letters:
        return con.letters
    n = len(con.lead)
    return {0: "SD", 1: "(BH)SD" if recovered else "BSD", 2: "BHSD"}.get(n, "(B" + "*" * (n - 1) + ")HSD")


def find_manual_sites(gm: fx.GraphModule, start_index: int = 0, left: list | None = None) -> list[AttentionSite]:
    """Every hand-written softmax attention in ``gm`` as an :class:`AttentionSite` (see the module doc). Every other
    softmax is appended to ``left`` as a :class:`SoftmaxLeft` with the reason it is not attention."""
    matcher = _Matcher(gm)
    sites: list[AttentionSite] = []
    for node in list(gm.graph.nodes):
        found = _softmax_input(node)
        if found is None:
            continue
        x, why = found
        site = _match(gm, matcher, node, x, start_index + len(sites)) if x is not None else why
        if isinstance(site, AttentionSite):
            sites.append(site)
        elif left is not None:
            left.append(SoftmaxLeft(module_path(node), node.name, site))
    return sites


def _near_contraction(x: fx.Node, last2) -> _Contraction | None:
    """A ``q @ kᵀ`` a few ops above ``x`` with the same score shape (to report a blocked site)."""
    frontier, seen = [x], {x}
    for _ in range(6):
        nxt = []
        for n in frontier:
            try:
                c = _score_contraction(n)
            except _Reject:
                c = None
            if c is not None and _shape(n)[-2:] == tuple(last2):
                return c
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


def _site_path(sm: fx.Node, vcon: _Contraction | None) -> str:
    """Module of the value contraction (a softmax may sit in its own ``nn.Softmax`` submodule)."""
    return module_path(vcon.node) if vcon is not None else module_path(sm)


def _blocked_site(index, sm, con: _Contraction, vcon: _Contraction | None, reason: str,
                  replaced=()) -> AttentionSite:
    C = _canon_lead(con.lead)
    sq, d = con.a.aligned[-2:]
    sk = con.b.aligned[-2]
    hk = C[1]
    dv = vcon.b.aligned[-1] if vcon is not None else d
    return AttentionSite(
        index=index, path=_site_path(sm, vcon), form=con.form, q=con.a.node, k=con.b.node,
        v=vcon.b.node if vcon is not None else con.b.node, q_shape=(C[0], C[1], sq, d),
        k_shape=(C[0], hk, sk, d), v_shape=(C[0], hk, sk, dv), layout=_layout_name(con, C, False),
        scale=None, blocker=reason, replaced=tuple(replaced), symbolic_seq=_symbolic(con.node))


def _match(gm: fx.GraphModule, matcher: _Matcher, sm: fx.Node, x: fx.Node, index: int) -> AttentionSite | str:
    """The site of softmax ``sm`` (rewritable or blocked with a reason), or why ``sm`` is not attention."""
    last2 = _shape(x)[-2:]
    try:
        sc = matcher._sub(x, sm, -1)
        back_err = None
    except _Reject as e:
        sc, back_err = None, e
    fwd = matcher.probs(sm)
    if fwd is None:           # the probabilities feed no contraction: not attention (router, classifier)
        return "its output reaches no `p @ v` contraction within 6 ops: not attention (a classifier, router, ...)"
    vcon, pnodes, blocker = fwd
    if sc is None:
        con = _near_contraction(x, last2)
        if con is None:
            return (f"it feeds a `p @ v` contraction but no `q @ kᵀ` contraction of the same shape feeds it "
                    f"(following the scores back: {back_err})")
        return _blocked_site(index, sm, con, vcon, str(back_err))
    con = sc.con
    replaced = [n.name for n in sc.nodes] + [sm.name] + [n.name for n in pnodes]
    if blocker:
        return _blocked_site(index, sm, con, vcon, blocker)
    try:
        return _plan(gm, sm, sc, vcon, pnodes, index, replaced, matcher.alias)
    except _Reject as e:
        return _blocked_site(index, sm, con, vcon, str(e))


def _plan(gm, sm, sc: _Scores, vcon: _Contraction, pnodes, index, replaced, alias: dict) -> AttentionSite:
    con = sc.con
    bs = tuple(con.lead)
    for m in sc.masks:
        if m.fill > MASK_FILL_MAX:
            raise _Reject(f"masked scores are scaled to {m.fill:g}, not a masking value")
    if sc.mult <= 0:
        raise _Reject("non-positive scale on the scores")
    wq, wk, wv = _walk_operand(con.a), _walk_operand(con.b), _walk_operand(vcon.b, strip_scalars=False)
    C = _canon_lead(bs)
    recovered, notes = False, ()
    if len(bs) == 1:
        bh, why = _recover_heads(wq, bs[0], con.a.aligned[-2:])
        if bh is not None:
            C, recovered = bh, True
        elif why:
            notes = (why,)
    q_r, fq = _operand_recipe(con.a, wq, bs, C, set())
    k_r, fk = _operand_recipe(con.b, wk, bs, C, {1})
    v_r, _ = _operand_recipe(vcon.b, wv, tuple(vcon.lead), C, {1})
    # GQA: repeat_kv / repeat_interleave on both k and v -> pass the un-repeated tensors
    uk, uv = _unrepeat(k_r), _unrepeat(v_r)
    gqa = False
    if uk is not None and uv is not None and uk[1] == uv[1] and uk[1] > 1:
        k_r, v_r, gqa = uk[0], uv[0], True
        if not k_r.steps:   # a factor on k before the repeat (k * s, then repeat_kv) folds too
            z = _Operand(k_r.base, tuple(range(4)), k_r.shape)
            wz = _walk_operand(z)
            k_r, fz = _operand_recipe(z, wz, k_r.shape[:2], k_r.shape[:2], {1})
            fk *= fz
    if k_r.shape[1] != v_r.shape[1]:
        # k broadcast over heads but v not (or the reverse): give both the full head count
        for r in (k_r, v_r):
            if r.shape[1] == 1 and C[1] != 1:
                r.steps.append(("method", "expand", C[0], C[1], *r.shape[2:]))
                r.shape = (C[0], C[1], *r.shape[2:])
    # soft-capped scores: mult * tanh(inner * q·kᵀ) = c * tanh(scale * q·kᵀ / c) with c = mult, scale = inner * c
    softcap = sc.mult if sc.cap_inner is not None else 0.0
    scale = (sc.cap_inner * sc.mult if sc.cap_inner is not None else sc.mult) * fq * fk
    if not math.isfinite(scale) or scale <= 0:
        raise _Reject(f"scale {scale:g} is not positive")
    masks = [_mask_recipe(m, m.frame[:-2], C) for m in sc.masks]
    biases = [_bias_recipe(t, t.frame[:-2], C) for t in sc.terms]
    out_node = vcon.node
    o_dtype = _dtype(out_node)
    vlead = tuple(vcon.lead)
    sq, d = q_r.shape[-2:]
    sk, dv = v_r.shape[-2], v_r.shape[-1]
    if k_r.shape[-2:] != (sk, d) or q_r.shape[:2] != tuple(C):
        raise _Reject(f"contraction dims do not line up: q {q_r.shape}, k {k_r.shape}, v {v_r.shape}")
    if C[1] % k_r.shape[1] or C[1] % v_r.shape[1] or k_r.shape[0] != C[0] or v_r.shape[0] != C[0]:
        raise _Reject(f"kv heads {k_r.shape[1]} do not divide query heads {C[1]}")
    symbolic = any(_symbolic(n) for n in (con.node, vcon.node, con.a.node, con.b.node, vcon.b.node))
    out_squeeze = _inserted_ones(vlead + (sq, dv), tuple(C) + (sq, dv)) if vlead != tuple(C) else []
    out_sized = out_squeeze is None
    if symbolic and (out_sized or any(r.sized for r in [q_r, k_r, v_r, *masks, *biases])):
        raise _Reject("dynamic shapes with a layout change (sizes would be baked in)")

    mask_shape = tuple(torch.broadcast_shapes(*[r.shape for r in masks])) if masks else None
    bias_shape = tuple(torch.broadcast_shapes(*[r.shape for r in biases])) if biases else None
    chain = list(sc.nodes) + [sm] + list(pnodes)

    site = AttentionSite(
        index=index, path=_site_path(sm, vcon), form=con.form, q=q_r.base, k=k_r.base, v=v_r.base,
        q_shape=tuple(q_r.shape), k_shape=tuple(k_r.shape), v_shape=tuple(v_r.shape),
        layout=_layout_name(con, C, recovered), mask=masks[0].base if masks else None, mask_shape=mask_shape,
        bias=biases[0].base if biases else None, bias_shape=bias_shape, is_causal=False, scale=float(scale),
        enable_gqa=gqa, replaced=tuple(replaced), symbolic_seq=_symbolic(con.node), notes=notes, softcap=softcap,
        q_seq_axis=q_r.source_axis(2))

    adopt_causal_proof(site, prove_causal([(m.node, m.keep_if_true) for m in sc.masks],
                                          [(t.node, t.coef) for t in sc.terms], gm))

    def replace(op_call) -> None:
        g = gm.graph
        with g.inserting_before(out_node):
            q4, k4, v4 = q_r.emit(g, alias), k_r.emit(g, alias), v_r.emit(g, alias)
            mask = None
            for r in masks:
                mnode = r.emit(g, alias)
                mask = mnode if mask is None else g.call_function(operator.and_, (mask, mnode))
            bias = None
            for r in biases:
                bnode = r.emit(g, alias)
                bias = bnode if bias is None else g.call_function(operator.add, (bias, bnode))
            res = op_call(g, q4, k4, v4, mask, bias)
            out = g.call_function(operator.getitem, (res, 0))
            if out_squeeze:
                for i in reversed(out_squeeze):
                    out = g.call_method("squeeze", (out, i))
            elif out_sized:
                out = g.call_method("reshape", (out, *vlead, sq, dv))
            if vcon.out_perm is not None:
                out = g.call_method("permute", (out, *vcon.out_perm))
            if o_dtype is not None and o_dtype != _dtype(con.a.node):
                out = g.call_method("to", (out, o_dtype))
            out = keep_views_valid(g, out_node, out)
        out_node.replace_all_uses_with(out)
        alias[out_node] = out
        _erase_unused(g, chain)

    site.replace = replace
    return site


def _erase_unused(g: fx.Graph, chain) -> None:
    """Erase the site's ``chain`` once nothing uses it, users first, then the pure producers this leaves
    without users (what only fed the replaced computation: scaled q, repeated k/v, mask helpers)."""
    in_chain = set(chain)
    order = {n: i for i, n in enumerate(g.nodes)}
    todo = sorted((n for n in in_chain if n in order), key=order.__getitem__, reverse=True)
    while todo:
        n = todo.pop(0)
        if n.users or n.op in ("placeholder", "output", "get_attr") or n not in order:
            continue
        if n in in_chain or _pure(n):
            inputs = [a for a in n.all_input_nodes if a in order]
            g.erase_node(n)
            del order[n]
            todo = sorted(set(todo) | set(inputs), key=order.__getitem__, reverse=True)


def _pure(n: fx.Node) -> bool:
    if n.op == "call_method":
        return not _inplace(n)
    return n.op == "call_function" and not _inplace(n) and (
        n.target in _PURE_FNS or n.target in _MUL_FNS | _DIV_FNS | _ADD_FNS | _SUB_FNS | _CONST_FNS)
