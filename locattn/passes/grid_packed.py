"""Token grids for packed-latent models: ``grid = "auto"`` where no patch convolution names the grid.

Runs after :func:`locattn.passes.grid_infer.infer_token_grids`, for the self-attention sites it left without a
grid. Three kinds of evidence, tried in this order:

1. **The packing chain, evaluated** (AuraFlow, CogView4, Cosmos; conv models whose token order the conv pass
   could not prove, e.g. DINOv2 with registers). From an image-like tensor ``[B, C, (T,) H, W]`` (an input or
   a convolution's output) the pass follows view / reshape / permute / transpose / flatten / slicing / ``cat``
   nodes and linear layers, evaluating them on a tensor of *positions* (each element holds its batch and
   spatial index) instead of data. A ``[B, N, K]`` node whose rows each hold exactly one ``p_t x p_h x p_w``
   patch (every position of the patch equally often), patches in row-major order, proves the grid
   ``(T/p_t,) H/p_h, W/p_w``: an exact check of what the graph does, not a pattern of node names. A linear
   layer mixes the last axis only, so it keeps the proof if every row is one patch.
2. **Positional ids given as an input** (FLUX, Chroma: ``img_ids [S, 3]`` of ``(0, h, w)`` per token). Ids are
   runtime data, so the pass reads the compile-time example and accepts them only if they are exactly the
   row-major enumeration of a grid; then it inserts one ``torch._assert_async`` into the graph that the ids of
   every later call are that same enumeration (a different aspect ratio with the same token count would
   otherwise not recompile and silently use the wrong grid; sync-free, it raises on CPU and is a device-side
   assert on GPU).
3. **A positional table flattened in the graph** (LTX-Video, QwenImage): a node computed from constants and
   parameters only (no input data) that merges ``>= 2`` non-trivial axes ``g`` of a table into one axis of
   ``prod(g)`` = the image tokens, e.g. LTX-Video's rotary coordinates ``[1, 3, T, H, W] -> [1, 3, T*H*W]`` or
   QwenImage's frequencies ``[F, H, W, d] -> [F*H*W, d]``. The shapes come from the model's Python arguments
   (``num_frames/height/width``, ``img_shapes``), which Dynamo guards: another size recompiles.

Kinds 2 and 3 say where each grid position is; the image tokens are then the model's packed input
``hidden_states [B, S, C]`` (the only 3-D data input with ``S`` tokens). In every kind the evidence node and
the image tokens must both feed the site's queries. Text or register tokens joined by ``cat`` become
``prefix`` / ``suffix`` globals as in the conv pass. Axes of size one are dropped from kinds 2 and 3 (an image
model's frame axis); kind 1 keeps the input's axes, as the conv pass does.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .sites import AttentionSite, ancestors, example, module_path
from .token_layout import CAT_TARGETS, CONV_TARGETS

_CASTS = {"to", "float", "half", "bfloat16", "double", "type", "contiguous", "clone", "detach", "type_as"}
_MOVE_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "movedim", "swapaxes", "swapdims", "expand", "repeat"}
_MOVE_FUNCS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.movedim,
               torch.squeeze, torch.unsqueeze, torch.swapaxes, torch.swapdims, operator.getitem}
_MIX_FUNCS = {torch._C._nn.linear, torch.nn.functional.linear}
#: elementwise with other data (a position embedding added, a scale): positions pass through from the one operand
#: that has them when its shape is the result's
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                torch.div, "add", "sub", "mul", "div"}
_IDENTITY_FUNCS = {torch.nn.functional.dropout}
_MERGE_METHODS = {"view", "reshape", "flatten"}
_MERGE_FUNCS = {torch.reshape, torch.flatten}
MAX_EVAL_NUMEL = 1 << 23        # positions evaluated per source (int64): 64 MiB at most
MAX_CHAIN = 64                  # nodes followed from one source


def _is_conv(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in CONV_TARGETS


def _cat_parts(cat: fx.Node, roots, root: fx.Node, seq_len: int):
    """If ``cat`` joins the tokens that depend on ``root`` (one of its inputs, ``roots[node]`` = the roots a node
    depends on) with others into ``seq_len`` tokens: ``(n_img, prefix, suffix)``."""
    ev = example(cat)
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(ev, torch.Tensor) or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    dim = dim % ev.dim()
    if ev.shape[dim] != seq_len:
        return None
    sizes = []
    for t in tensors:
        et = example(t)
        if not isinstance(et, torch.Tensor) or not isinstance(et.shape[dim], int):
            return None
        sizes.append(int(et.shape[dim]))
    img = [i for i, t in enumerate(tensors) if isinstance(t, fx.Node) and root in roots.get(t, ())]
    if len(img) != 1:
        return None
    i = img[0]
    return sizes[i], sum(sizes[:i]), sum(sizes[i + 1:])


@dataclass
class _Root:
    """``node [B, prefix + prod(grid) + suffix, *]``: other tokens, then the image tokens row-major over
    ``grid``, then other tokens; and the evidence."""

    node: fx.Node
    grid: tuple[int, ...]
    desc: str
    prefix: int = 0
    suffix: int = 0
    evidence: fx.Node | None = None     # must also feed the site (kinds 2 and 3)
    ids: tuple | None = None            # kind 2: (placeholder, columns) for the runtime check
    kind: int = 1

    @property
    def tokens(self) -> int:
        return self.prefix + math.prod(self.grid) + self.suffix


# ------------------------------------------------------------------------------------------------ kind 1


def _data_placeholder(n: fx.Node) -> bool:
    """A graph input that is data (an argument of the model), not a parameter, buffer or module attribute
    (Dynamo names those after their source: ``L['self'].x`` -> ``L_self_x``)."""
    name = str(n.target)
    return n.op == "placeholder" and "_parameters_" not in name and "_buffers_" not in name \
        and not name.lower().startswith("l_self_")


def _static(shape) -> tuple[int, ...] | None:
    return tuple(int(d) for d in shape) if all(isinstance(d, int) for d in shape) else None


def _sources(gm: fx.GraphModule) -> list[fx.Node]:
    """Image-like tensors ``[B, C, (T,) H, W]``: data inputs and convolution outputs."""
    out = []
    for n in gm.graph.nodes:
        ev = example(n)
        if (_data_placeholder(n) or _is_conv(n)) and isinstance(ev, torch.Tensor) and ev.dim() in (4, 5) \
                and ev.is_floating_point() and _static(ev.shape) and ev.numel() <= MAX_EVAL_NUMEL:
            out.append(n)
    return out


def _positions(shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, C, *S]`` int64: element (b, c, s) holds ``b * prod(S) + flat(s)`` (channels share a position)."""
    b, c, *s = shape
    ns = math.prod(s)
    pos = (torch.arange(b)[:, None] * ns + torch.arange(ns)[None, :]).view(b, 1, *s)
    return pos.expand(b, c, *s)


def _arg(a, env, fill):
    """A node's argument with positions for nodes that have them (``fill``: -1 for other tensors)."""
    if isinstance(a, dict):
        return {k: _arg(v, env, fill) for k, v in a.items()}
    if isinstance(a, fx.Node):
        if a in env:
            return env[a][0]
        ev = example(a)
        if fill and isinstance(ev, torch.Tensor) and _static(ev.shape):
            return torch.full(ev.shape, -1, dtype=torch.long)   # data from elsewhere: no position
        raise ValueError("not a position")
    if isinstance(a, (list, tuple)):
        return type(a)(_arg(x, env, fill) for x in a)
    if isinstance(a, slice) and any(isinstance(x, fx.Node) for x in (a.start, a.stop, a.step)):
        raise ValueError("symbolic slice")
    return a


def _row_cells(rows: torch.Tensor, space: tuple[int, ...], patch: tuple[int, ...] | None):
    """``rows [R, K]`` of positions (-1: none). Each row must be one patch of ``space``, every position of it
    equally often (``patch`` given: one position per row, the patch's corner). Returns ``(corner [R], patch)``
    or None."""
    valid = rows >= 0
    if not bool(valid.any(1).all()):
        return None
    ns = math.prod(space)
    batch = torch.where(valid, rows // ns, -1)
    bmax = batch.max(1).values
    if bool((torch.where(valid, batch, bmax[:, None]) != bmax[:, None]).any()):
        return None                                               # a row mixes batch elements
    coords, rest = [], torch.where(valid, rows % ns, 0)
    for n in reversed(space):
        coords.append(rest % n)
        rest = rest // n
    coords = coords[::-1]
    big = max(space)
    lo = [torch.where(valid, c, big).min(1).values for c in coords]
    hi = [torch.where(valid, c, -1).max(1).values for c in coords]
    ext = [h - l + 1 for l, h in zip(lo, hi)]
    if patch is None:
        patch = tuple(int(e[0]) for e in ext)
        if any(bool((e != p).any()) for e, p in zip(ext, patch)):
            return None
        offs = torch.zeros_like(rows)
        for c, l, p in zip(coords, lo, patch):
            offs = offs * p + (c - l[:, None])
        counts = torch.zeros(rows.shape[0], math.prod(patch), dtype=torch.long)
        counts.scatter_add_(1, torch.where(valid, offs, 0), valid.long())
        if bool((counts.min(1).values != counts.max(1).values).any()) or bool((counts == 0).any()):
            return None                                           # a patch position missing or repeated
    elif any(bool((e != 1).any()) for e in ext):
        return None
    if any(s % p for s, p in zip(space, patch)) or any(bool((l % p).any()) for l, p in zip(lo, patch)):
        return None
    corner = bmax * ns
    stride = 1
    for l, n in zip(reversed(lo), reversed(space)):
        corner = corner + l * stride
        stride *= n
    return corner, patch


def _token_grid(pos: torch.Tensor, patch, space: tuple[int, ...], batch: int):
    """``pos [B, N, X]``: ``(grid, prefix, suffix)`` if, in every batch element b, the rows holding positions
    are cells 0, 1, ... (row-major) of b's grid, one run between ``prefix`` and ``suffix`` rows holding none."""
    if pos.dim() != 3 or pos.shape[0] != batch:
        return None
    has = (pos >= 0).any(-1)                                      # [B, N]
    if not bool((has == has[:1]).all()) or not bool(has[0].any()):
        return None
    rows = has[0].nonzero().flatten()
    prefix, n = int(rows[0]), len(rows)
    if int(rows[-1]) - prefix + 1 != n:
        return None                                               # image rows not one run
    cells = _row_cells(pos[:, prefix:prefix + n].reshape(-1, pos.shape[-1]), space, patch)
    if cells is None:
        return None
    corner, patch = cells
    grid = tuple(s // p for s, p in zip(space, patch))
    ns = math.prod(space)
    if n != math.prod(grid):
        return None
    idx = torch.arange(n)
    want, rest, stride = torch.zeros(n, dtype=torch.long), idx, 1
    for g, p, s in zip(reversed(grid), reversed(patch), reversed(space)):
        want = want + (rest % g) * p * stride
        rest = rest // g
        stride *= s
    expect = torch.arange(batch)[:, None] * ns + want[None, :]
    if not torch.equal(corner.view(batch, n), expect):
        return None
    return grid, prefix, pos.shape[1] - prefix - n


def _chain_roots(gm: fx.GraphModule) -> list[_Root]:
    """Kind 1: evaluate each source's movement chain on positions; every ``[B, N, *]`` node that proves a grid
    is a root."""
    roots = []
    for src in _sources(gm):
        shape = _static(example(src).shape)
        batch, space = shape[0], shape[2:]
        env = {src: (_positions(shape), None)}
        queue, seen = [src], 0
        while queue and seen < MAX_CHAIN:
            cur = queue.pop(0)
            for user in cur.users:
                if user in env:
                    continue
                seen += 1
                state = _step(user, env, space)
                if state is None:
                    continue
                env[user] = state
                queue.append(user)
                found = _token_grid(state[0], state[1], space, batch) if state[0].dim() == 3 else None
                if found is not None:
                    grid, pre, suf = found
                    kind = f"conv{len(space)}d at {module_path(src) or src.name}" if _is_conv(src) \
                        else f"input {_arg_name(src)}"
                    extra = f"; globals prefix={pre} suffix={suf}" if pre or suf else ""
                    roots.append(_Root(user, grid, f"{'x'.join(map(str, grid))} from the packing of {kind} "
                                                   f"(positions evaluated up to {user.name}){extra}", pre, suf))
    return roots


def _step(n: fx.Node, env, space: tuple[int, ...]):
    """The positions of ``n`` from its inputs' (``(tensor, patch)``), or None when ``n`` is not a movement of
    them (or a linear layer over whole patches, or elementwise arithmetic with other data)."""
    ev = example(n)
    if not isinstance(ev, torch.Tensor) or not _static(ev.shape):
        return None
    ins = [a for a in n.all_input_nodes if a in env]
    patch = env[ins[0]][1] if ins else None
    if any(env[a][1] != patch for a in ins):
        return None
    fn = n.target
    try:
        if n.op == "call_method" and fn in _CASTS or n.op == "call_function" and fn in _IDENTITY_FUNCS:
            out = env[n.args[0]][0] if isinstance(n.args[0], fx.Node) and n.args[0] in env else None
        elif n.op == "call_method" and fn in _MOVE_METHODS:
            out = getattr(_arg(n.args[0], env, False), fn)(*_arg(n.args[1:], env, False),
                                                            **_arg(n.kwargs, env, False))
        elif n.op == "call_function" and fn in _MOVE_FUNCS:
            out = fn(*_arg(n.args, env, False), **_arg(n.kwargs, env, False))
        elif n.op == "call_function" and fn in CAT_TARGETS:
            out = fn(*_arg(n.args, env, True), **_arg(n.kwargs, env, True))
        elif (n.op == "call_function" or n.op == "call_method") and fn in _ELEMENTWISE and len(ins) == 1:
            out = env[ins[0]][0]
        elif n.op == "call_function" and fn in _MIX_FUNCS and n.args and n.args[0] in env and len(ins) == 1:
            pos = env[n.args[0]][0]
            cells = _row_cells(pos.reshape(-1, pos.shape[-1]), space, patch)
            if cells is None:
                return None
            corner, patch = cells
            out = corner.view(*pos.shape[:-1], 1).expand(*ev.shape)
        else:
            return None
    except Exception:  # an argument that is not a position (data, symbolic sizes): not a movement
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ev.shape):
        return None
    return out, patch


# ------------------------------------------------------------------------------------------------ kinds 2, 3


def _ids_grid(ids: torch.Tensor):
    """``ids [S, k]`` (k = 2 or 3): the grid (varying columns, in order) if the rows enumerate it row-major,
    constant columns allowed; ``(grid, columns)`` where columns = ``[(col, start, size)]`` (size 0: constant)."""
    if ids.dim() != 2 or ids.shape[1] not in (2, 3) or ids.shape[0] < 2 or ids.is_complex():
        return None
    v = ids.double()
    if not bool((v == v.round()).all()):
        return None
    cols, grid = [], []
    for c in range(v.shape[1]):
        lo, hi = float(v[:, c].min()), float(v[:, c].max())
        cols.append((c, lo, 0 if lo == hi else int(hi - lo) + 1))
        if lo != hi:
            grid.append(int(hi - lo) + 1)
    if len(grid) < 2 or math.prod(grid) != v.shape[0]:
        return None
    return (tuple(grid), tuple(cols)) if torch.equal(v, _expected_ids(v.shape[0], cols, torch.float64)) else None


def _expected_ids(s: int, cols, dtype, device=None) -> torch.Tensor:
    idx, out, stride = torch.arange(s, device=device), [None] * len(cols), 1
    for c, lo, n in reversed(cols):
        if n:
            out[c] = (idx // stride) % n + lo
            stride *= n
        else:
            out[c] = torch.full((s,), lo, device=device, dtype=torch.float64)
    return torch.stack([o.to(torch.float64) for o in out], -1).to(dtype)


def _packed_input(gm: fx.GraphModule, tokens: int) -> fx.Node | None:
    """The model's packed latents: the only 3-D floating data input ``[B, tokens, C]``."""
    cands = [n for n in gm.graph.nodes if _data_placeholder(n) and isinstance(example(n), torch.Tensor)
             and example(n).dim() == 3 and example(n).is_floating_point() and example(n).shape[1] == tokens]
    return cands[0] if len(cands) == 1 else None


def _arg_name(n: fx.Node) -> str:
    """``L_kwargs_img_ids_`` -> ``img_ids`` (the model's argument name)."""
    return re.sub(r"^[lL]_(kwargs_)?|_$", "", str(n.target))


def _ids_roots(gm: fx.GraphModule, example_inputs) -> list[_Root]:
    """Kind 2: positional-id inputs whose compile-time values enumerate a grid."""
    if example_inputs is None:
        return []
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        return []
    roots = []
    for n, real in zip(phs, example_inputs):
        if not _data_placeholder(n) or not isinstance(real, torch.Tensor) or \
                isinstance(real, torch._subclasses.FakeTensor) or real.dim() not in (2, 3):
            continue
        rows = real
        if real.dim() == 3:   # [B, S, k]: one enumeration shared by the batch
            if not bool((real == real[:1]).all()):
                continue
            rows = real[0]
        found = _ids_grid(rows.detach().cpu())
        if found is None:
            continue
        grid, cols = found
        packed = _packed_input(gm, rows.shape[0])
        if packed is None:
            continue
        roots.append(_Root(packed, grid, f"{'x'.join(map(str, grid))} from the positional ids input {_arg_name(n)} "
                                         f"(checked at every call)", evidence=n, ids=(n, cols), kind=2))
    return roots


def _merged_run(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[int, int] | None:
    """``(a, b)`` if ``dst`` is ``src`` with the axes ``a..b-1`` (at least two) merged into one."""
    for a in range(len(src)):
        for b in range(a + 2, len(src) + 1):
            if src[:a] + (math.prod(src[a:b]),) + src[b:] == dst:
                return a, b
    return None


def _table_roots(gm: fx.GraphModule) -> list[_Root]:
    """Kind 3: a positional table computed without data inputs, whose grid axes are flattened into tokens."""
    data = set()
    for n in gm.graph.nodes:     # nodes depending on a data input
        if _data_placeholder(n) or any(a in data for a in n.all_input_nodes):
            data.add(n)
    roots = []
    for n in gm.graph.nodes:
        merge = (n.op == "call_method" and n.target in _MERGE_METHODS) or \
                (n.op == "call_function" and n.target in _MERGE_FUNCS)
        if not merge or n in data or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        src, dst = example(n.args[0]), example(n)
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
            continue
        s, d = _static(src.shape), _static(dst.shape)
        run = _merged_run(s, d) if s and d else None
        if run is None:
            continue
        grid = tuple(g for g in s[run[0]:run[1]] if g > 1)
        packed = _packed_input(gm, math.prod(s[run[0]:run[1]])) if len(grid) >= 2 else None
        if packed is not None:
            roots.append(_Root(packed, grid, f"{'x'.join(map(str, grid))} from the positional table {n.name} "
                                             f"{list(s)} -> {list(d)}", evidence=n, kind=3))
    return roots


# ------------------------------------------------------------------------------------------------ sites


def _depends(gm: fx.GraphModule, roots: list[_Root]) -> dict[fx.Node, frozenset[fx.Node]]:
    nodes = {r.node for r in roots}
    deps: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in gm.graph.nodes:
        acc: set[fx.Node] = set()
        for a in n.all_input_nodes:
            acc |= deps.get(a, frozenset())
        if n in nodes:
            acc.add(n)
        deps[n] = frozenset(acc)
    return deps


def _layout(site: AttentionSite, root: _Root, deps, cats, anc: set[fx.Node]) -> tuple[int, int, str] | None:
    """``(prefix, suffix, where)`` of the root's tokens inside the site's sequence (``anc``: the nodes its
    queries depend on)."""
    n = math.prod(root.grid)
    if site.s_q == root.tokens:
        return root.prefix, root.suffix, ""
    if root.prefix or root.suffix:
        return None
    for cat in cats:
        if root.node not in deps.get(cat, ()) or cat not in anc:
            continue
        parts = _cat_parts(cat, deps, root.node, site.s_q)
        if parts is not None and parts[0] == n:
            return parts[1], parts[2], f"; globals prefix={parts[1]} suffix={parts[2]} from {cat.name}"
    return None


def infer_packed_grids(gm: fx.GraphModule, sites: list[AttentionSite], example_inputs=None) -> None:
    """Set ``site.token_grid`` / ``token_grid_desc`` for self-attention sites still without a grid, and add the
    runtime check of every positional-ids input a grid was read from."""
    todo = [s for s in sites if s.token_grid is None and s.s_q == s.s_k and not s.symbolic_seq]
    if not todo:
        return
    roots = _chain_roots(gm) + _ids_roots(gm, example_inputs) + _table_roots(gm)
    if not roots:
        return
    deps = _depends(gm, roots)
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CAT_TARGETS]
    checks = {}
    for site in todo:
        anc = ancestors([site.q])
        for kind in (1, 2, 3):   # the strongest kind of evidence that places the site decides; it must agree
            found = [(root, lay) for root in roots if root.kind == kind and root.node in anc and
                     (root.evidence is None or root.evidence in anc)
                     for lay in [_layout(site, root, deps, cats, anc)] if lay is not None]
            if not found:
                continue
            if len({(root.grid, lay[:2]) for root, lay in found}) == 1:
                root, lay = found[0]
                site.token_grid = (root.grid, lay[0], lay[1])
                site.token_grid_desc = root.desc + lay[2]
                site.token_grid_why = ""
                if root.ids is not None:
                    checks[root.ids[0]] = (root.ids[1], root.grid)
            break
    for ids, (cols, grid) in checks.items():
        _insert_ids_check(gm, ids, cols, grid)


def _insert_ids_check(gm: fx.GraphModule, ids: fx.Node, cols, grid) -> None:
    """``torch._assert_async(ids == the grid's enumeration)`` after the inputs: no recompile happens when only
    the ids change, so every call checks them (on the device, without a sync)."""
    ev = example(ids)
    s = ev.shape[-2]
    g = gm.graph
    # no double quotes or backslashes: Inductor's C++ code prints the message as a string literal unescaped
    msg = (f"locattn: the positional ids input {_arg_name(ids)} no longer enumerate the {'x'.join(map(str, grid))} "
           f"token grid that grid = 'auto' read from them when this graph was compiled (same token count, "
           f"another shape?): write the grid in the policy, or call torch._dynamo.reset() to recompile")
    first = next(n for n in g.nodes if n.op != "placeholder")
    with g.inserting_before(first):
        want = g.call_function(_expected_ids, (s, cols, ev.dtype, ev.device))
        ok = g.call_method("all", (g.call_function(torch.eq, (ids, want)),))
        g.call_function(torch._assert_async, (ok, msg))
