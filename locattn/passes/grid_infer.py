"""Token-grid inference for ``grid = "auto"`` / ``globals = "auto"``.

What it matches: a patch embedding (``conv2d``/``conv3d`` call in the Dynamo graph) whose output
``[N, C, (T,) H, W]`` is flattened into tokens. A site whose queries depend on that convolution gets the grid
``(T,) H, W``; a Conv2d applied to ``B * F`` frames (CogVideoX) gives ``(F, H, W)`` when the image tokens
number ``F * H * W``. Text or class tokens come from a ``cat`` on the sequence axis of a tensor that depends on
the convolution: inputs before the image part are ``prefix`` globals, after it ``suffix`` globals.

Why this way: every model in the issue's list (DiT, PixArt, SD3, CogVideoX, Wan, HunyuanVideo, timm ViT)
embeds patches with a convolution and joins other tokens with ``cat``; following dependencies (not node
names) makes it independent of how a model names things. FLUX packs latents before the model, so there is
no convolution: ``auto`` then fails and asks for an explicit grid.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .sites import AttentionSite, ancestors, example, module_path

CONV_TARGETS = {torch.conv2d, torch.conv3d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}


def _is_conv(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in CONV_TARGETS


def _roots(gm: fx.GraphModule) -> dict[fx.Node, frozenset[fx.Node]]:
    """For every node, the patch-embedding convolutions it depends on."""
    roots: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in gm.graph.nodes:
        acc: set[fx.Node] = set()
        for a in n.all_input_nodes:
            acc |= roots.get(a, frozenset())
        if _is_conv(n):
            acc.add(n)
        roots[n] = frozenset(acc)
    return roots


def _conv_grid(conv: fx.Node) -> tuple[int, ...] | None:
    ev = example(conv)
    if not isinstance(ev, torch.Tensor) or ev.dim() not in (4, 5):
        return None
    dims = ev.shape[2:]
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _grid_for(n_img: int, conv_grid: tuple[int, ...]) -> tuple[int, ...] | None:
    per = math.prod(conv_grid)
    if n_img == per:
        return conv_grid
    if len(conv_grid) == 2 and n_img % per == 0:  # frames folded into the conv's batch (CogVideoX)
        return (n_img // per, *conv_grid)
    return None


def _cat_parts(cat: fx.Node, roots, conv: fx.Node, seq_len: int):
    """If ``cat`` joins image tokens (depending on ``conv``) with others into ``seq_len`` tokens:
    ``(n_img, prefix, suffix)``."""
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
    img = [i for i, t in enumerate(tensors) if isinstance(t, fx.Node) and conv in roots.get(t, ())]
    if len(img) != 1:
        return None
    i = img[0]
    return sizes[i], sum(sizes[:i]), sum(sizes[i + 1:])


def infer_token_grids(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Set ``site.token_grid = (grid, prefix, suffix)`` and ``site.token_grid_desc`` where they can be found."""
    convs = [n for n in gm.graph.nodes if _is_conv(n)]
    if not convs or not sites:
        return
    _ANCESTORS.clear()
    roots = _roots(gm)
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CAT_TARGETS]
    for site in sites:
        if site.s_q != site.s_k or site.symbolic_seq:
            continue
        s = site.s_q
        q_roots = roots.get(site.q, frozenset())
        for conv in convs:
            if conv not in q_roots:
                continue
            cg = _conv_grid(conv)
            if cg is None:
                continue
            where = f"conv{len(cg)}d at {module_path(conv) or conv.name}"
            found = None
            g = _grid_for(s, cg)
            if g is not None:
                found = (g, 0, 0, f"{'x'.join(map(str, g))} from {where}")
            else:
                for cat in cats:
                    if conv not in roots.get(cat, ()) or cat not in _ancestors_cache(site, roots):
                        continue
                    parts = _cat_parts(cat, roots, conv, s)
                    if parts is None:
                        continue
                    n_img, pre, suf = parts
                    g = _grid_for(n_img, cg)
                    if g is not None:
                        found = (g, pre, suf, f"{'x'.join(map(str, g))} from {where}; globals prefix={pre} "
                                              f"suffix={suf} from {cat.name}")
                        break
            if found:
                site.token_grid = found[:3]
                site.token_grid_desc = found[3]
                break
    _ANCESTORS.clear()


def _ancestors_cache(site: AttentionSite, roots) -> set[fx.Node]:
    """Nodes the site's query depends on (computed once per site)."""
    cached = _ANCESTORS.get(id(site))
    if cached is not None and cached[0] is site:
        return cached[1]
    seen = ancestors([site.q])
    _ANCESTORS[id(site)] = (site, seen)
    return seen


_ANCESTORS: dict[int, tuple[AttentionSite, set[fx.Node]]] = {}
