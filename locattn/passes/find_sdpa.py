"""Find ``F.scaled_dot_product_attention`` calls in a Dynamo graph.

Matches ``call_function`` nodes whose target is SDPA (keyword or positional arguments, any of
``attn_mask``/``is_causal``/``scale``/``enable_gqa``/``dropout_p``). Inputs of rank 4 are used as they are;
rank 3 (``[N, S, D]``) gets a head axis of 1, rank > 4 folds the leading axes into the batch. A float
``attn_mask`` becomes the op's ``bias``, a bool one its ``mask``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .causal_mask import prove_causal
from .sites import AttentionSite, adopt_causal_proof, example, keep_views_valid, module_path, static_int

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind(node: fx.Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    for name, a in zip(_SDPA_PARAMS, node.args):
        args[name] = a
    args.update(node.kwargs)
    return args


def _shape(node) -> tuple[int, ...] | None:
    ev = example(node)
    if not isinstance(ev, torch.Tensor):
        return None
    return tuple(static_int(s) if static_int(s) is not None else -1 for s in ev.shape)


def find_sdpa_sites(gm: fx.GraphModule, start_index: int = 0) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = _bind(node)
        q, k, v = a["query"], a["key"], a["value"]
        qs, ks, vs = _shape(q), _shape(k), _shape(v)
        blocker = ""
        if qs is None or ks is None or vs is None:
            continue
        rank = len(qs)
        ev_q = example(q)
        symbolic = any(not isinstance(s, int) for s in ev_q.shape[-2:]) or \
            any(not isinstance(s, int) for s in example(k).shape[-2:])
        mask = a["attn_mask"]
        mask_node = bias_node = None
        mask_shape = None
        if isinstance(mask, fx.Node):
            ev = example(mask)
            mask_shape = _shape(mask)
            if ev is not None and ev.dtype == torch.bool:
                mask_node = mask
            else:
                bias_node = mask
        elif mask is not None:
            blocker = f"attn_mask of type {type(mask).__name__} is not a graph tensor"
        for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
            if isinstance(a[name], fx.Node):
                blocker = f"{name} is a traced value, not a constant"
        dropout_p = a["dropout_p"] if not isinstance(a["dropout_p"], fx.Node) else 0.0
        if isinstance(dropout_p, (int, float)) and dropout_p > 0:
            blocker = f"dropout_p={dropout_p} > 0 (training dropout is not rewritten)"
        if rank < 3:
            blocker = f"rank-{rank} inputs"
        elif rank == 3 and a["enable_gqa"] is True and qs[0] != ks[0]:
            blocker = "rank-3 GQA inputs (heads on dim 0, the axis a rank-3 site reads as batch)"
        scale = a["scale"]
        if scale is None and not isinstance(ev_q.shape[-1], int):
            blocker = "symbolic head dim with default scale"
        if scale is not None and not isinstance(scale, (int, float)):
            blocker = "non-constant scale"

        # canonical 4-D shapes for the record
        def canon(s):
            if len(s) == 3:
                return (s[0], 1, s[1], s[2])
            if len(s) > 4:
                b = 1
                for x in s[:-3]:
                    b *= x
                return (b, *s[-3:])
            return s

        site = AttentionSite(
            index=start_index + len(sites), path=module_path(node), form=node.meta.get("locattn_form", "sdpa"),
            q=q, k=k, v=v,
            q_shape=canon(qs), k_shape=canon(ks), v_shape=canon(vs), layout="BHSD" if rank == 4 else f"rank{rank}",
            mask=mask_node, bias=bias_node, mask_shape=mask_shape if mask_node is not None else None,
            bias_shape=mask_shape if bias_node is not None else None,
            is_causal=bool(a["is_causal"]) if not isinstance(a["is_causal"], fx.Node) else False,
            scale=float(scale) if isinstance(scale, (int, float)) else None,
            enable_gqa=bool(a["enable_gqa"]) if not isinstance(a["enable_gqa"], fx.Node) else False,
            dropout_p=float(dropout_p) if isinstance(dropout_p, (int, float)) else 0.0,
            symbolic_seq=symbolic, blocker=blocker, replaced=(node.name,),
        )
        adopt_causal_proof(site, prove_causal([(mask_node, True)] if mask_node is not None else [],
                                              [(bias_node, 1.0)] if bias_node is not None else [], gm))
        site.replace = _make_replace(gm, node, site, rank)
        sites.append(site)
    return sites


def _make_replace(gm: fx.GraphModule, node: fx.Node, site: AttentionSite, rank: int):
    def to4(g: fx.Graph, x):
        if x is None or rank == 4:
            return x
        if rank == 3:
            return g.call_method("unsqueeze", (x, 1))
        # fold leading batch axes: [..., H, S, D] -> [-1, H, S, D]
        return g.call_function(_fold_leading, (x,))

    def to4_mask(g: fx.Graph, m):
        """A mask / bias broadcastable to the site's [..., H, Sq, Sk] scores, as the op's 4-D operand."""
        if m is None or rank == 4 or example(m).dim() < 3:
            return m
        if rank == 3:
            return g.call_method("unsqueeze", (m, 1))
        # rank > 4: broadcast over the leading axes first (a mask may have fewer), then fold them like q's
        return g.call_function(_fold_leading_like, (m, site.q))

    def replace(op_call) -> None:
        g = gm.graph
        with g.inserting_before(node):
            q4, k4, v4 = to4(g, site.q), to4(g, site.k), to4(g, site.v)
            mask, bias = (to4_mask(g, m) for m in (site.mask, site.bias))
            res = op_call(g, q4, k4, v4, mask, bias)
            out = g.call_function(operator.getitem, (res, 0))
            if rank == 3:
                out = g.call_method("squeeze", (out, 1))
            elif rank > 4:
                out = g.call_function(_unfold_leading, (out, site.q))
            out = keep_views_valid(g, node, out)
        node.replace_all_uses_with(out)
        g.erase_node(node)

    return replace


def _fold_leading(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:])


def _fold_leading_like(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A mask / bias of a rank > 4 site: right-aligned against q's [..., H, S, D] axes, expanded over q's leading
    axes, folded into one batch axis like :func:`_fold_leading` folds q."""
    m = m.reshape((1,) * (q.dim() - m.dim()) + tuple(m.shape))
    return m.expand(*q.shape[:-3], *m.shape[-3:]).reshape(-1, *m.shape[-3:])


def _unfold_leading(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.reshape(*like.shape[:-1], out.shape[-1])

