"""``nn.MultiheadAttention`` made visible: each ``F.multi_head_attention_forward`` call becomes its in-projection,
one ``F.scaled_dot_product_attention`` and its out-projection, so the SDPA finder sees the attention inside.

Dynamo keeps ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
call) as one opaque node: without this pass the site is not found at all. The expansion is exactly the function's
own ``need_weights=False`` path: the same projections, its masks merged the same way (``key_padding_mask`` and
``attn_mask``, bool = True means *masked*, or additive floats; a 2-D ``[L, S]`` or 3-D ``[N*H, L, S]`` mask), the
``is_causal`` hint used as the function uses it (only without a key-padding mask), SDPA's default scale. The new
SDPA node carries the module path of the call (the ``MultiheadAttention`` module) and reports its form as
``mha``.

Left alone, each reported as a site with its reason: ``need_weights=True`` (it returns the averaged attention
weights: ``nn.MultiheadAttention``'s default, pass ``need_weights=False``), dropout active in training,
``bias_k`` / ``bias_v`` / ``add_zero_attn``, static keys, non-constant flags, symbolic shapes; and the fused fast
paths ``torch._native_multi_head_attention`` / ``torch._transformer_encoder_layer_fwd`` that eval-mode
``nn.TransformerEncoderLayer`` takes under ``no_grad`` (``torch.backends.mha.set_fastpath_enabled(False)`` makes
it call ``F.multi_head_attention_forward``).
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .sites import AttentionSite, example, module_path, static_int

_MHA = F.multi_head_attention_forward
_MHA_SIG = inspect.signature(_MHA)
#: fused fast paths -> (name, argument index of the head count); their inputs are batch-first [N, L, E]
_FUSED = {torch._native_multi_head_attention: ("torch._native_multi_head_attention", 4),
          torch._transformer_encoder_layer_fwd: ("torch._transformer_encoder_layer_fwd", 2)}
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


class _Emit:
    """Creates nodes before ``at`` with ``at``'s module metadata and a FakeTensor ``example_value`` computed by
    running the op on the inputs' example values (the finders read shapes from it)."""

    def __init__(self, g: fx.Graph, at: fx.Node, fake_mode):
        self.g, self.at, self.mode = g, at, fake_mode

    def __call__(self, kind: str, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.at):
            n = self.g.create_node(kind, target, args, kwargs)
        for k in _META_KEYS:
            if k in self.at.meta:
                n.meta[k] = self.at.meta[k]
        a, kw = fx.node.map_arg((args, kwargs), lambda x: example(x))
        with self.mode:
            n.meta["example_value"] = getattr(a[0], target)(*a[1:], **kw) if kind == "call_method" else \
                target(*a, **kw)
        return n

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self("call_function", target, *args, **kwargs)

    def method(self, name, *args, **kwargs) -> fx.Node:
        return self("call_method", name, *args, **kwargs)


def _left_alone(node: fx.Node, query, num_heads, reason: str, index: int, form: str = "mha",
                batch_first: bool = False) -> AttentionSite | None:
    """A reported, not rewritten site for an MHA call (shapes from ``query`` ``[L, N, E]`` / ``[L, E]``, or
    ``[N, L, E]`` when ``batch_first``)."""
    ev = example(query)
    if not isinstance(ev, torch.Tensor) or ev.dim() not in (2, 3):
        return None
    dims = [static_int(s) or -1 for s in ev.shape]
    l, n, e = (dims[0], 1, dims[1]) if ev.dim() == 2 else (dims[1], dims[0], dims[2]) if batch_first else dims
    h = num_heads if isinstance(num_heads, int) and num_heads > 0 else 1
    shape = (n, h, l, e // h if e > 0 else -1)
    return AttentionSite(index=index, path=module_path(node), form=form, q=query, k=query, v=query, q_shape=shape,
                         k_shape=shape, v_shape=shape, layout="LNE", blocker=reason, replaced=(node.name,))


def _why_not(a: dict, node: fx.Node) -> str:
    """Why this call cannot be expanded faithfully ("" if it can)."""
    flags = ("embed_dim_to_check", "num_heads", "add_zero_attn", "dropout_p", "training", "need_weights",
             "use_separate_proj_weight", "average_attn_weights", "is_causal")
    for name in flags:
        if isinstance(a[name], fx.Node):
            return f"{name} is a traced value, not a constant"
    if a["need_weights"]:
        return ("need_weights=True: the call returns the averaged attention weights (nn.MultiheadAttention's "
                "default; pass need_weights=False)")
    if a["training"] and a["dropout_p"] > 0:
        return f"dropout_p={a['dropout_p']:g} in training (training dropout is not rewritten)"
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return "bias_k / bias_v / add_zero_attn (extra key/value tokens)"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k / static_v"
    for name in ("query", "key", "value", "attn_mask", "key_padding_mask"):
        t = a[name]
        if t is None:
            continue
        ev = example(t) if isinstance(t, fx.Node) else None
        if not isinstance(ev, torch.Tensor):
            return f"{name} is not a graph tensor"
        if any(static_int(s) is None or not isinstance(s, int) for s in ev.shape):
            return f"{name} has symbolic sizes (dynamic shapes)"
    q = example(a["query"])
    if q.dim() not in (2, 3) or example(a["key"]).dim() != q.dim():
        return f"query of rank {q.dim()}"
    if q.shape[-1] % a["num_heads"]:
        return f"embed dim {q.shape[-1]} is not a multiple of {a['num_heads']} heads"
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)) or \
                (u.args[1] == 1 and u.users):
            return f"its result is used as a whole by `{u.name}`"
    return ""


def _in_projection(e: _Emit, a: dict, embed: int):
    """q, k, v ``[L|S, N, E]``: ``F._in_projection_packed`` / ``F._in_projection`` as the function calls them."""
    query, key, value, w, b = a["query"], a["key"], a["value"], a["in_proj_weight"], a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        bq = bk = bv = None
        if b is not None:
            parts = e.method("chunk", b, 3)
            bq, bk, bv = (e.fn(operator.getitem, parts, i) for i in range(3))
        return (e.fn(F.linear, query, a["q_proj_weight"], bq), e.fn(F.linear, key, a["k_proj_weight"], bk),
                e.fn(F.linear, value, a["v_proj_weight"], bv))

    def split(t, sizes):
        parts = e.method("split", t, sizes)
        return [e.fn(operator.getitem, parts, i) for i in range(len(sizes))]

    if key is value and query is key:                      # self-attention: one fused projection
        proj = e.method("chunk", e.fn(F.linear, query, w, b), 3, -1)
        return tuple(e.fn(operator.getitem, proj, i) for i in range(3))
    if key is value:                                       # encoder-decoder: q, then one kv projection
        wq, wkv = split(w, [embed, 2 * embed])
        bq, bkv = split(b, [embed, 2 * embed]) if b is not None else (None, None)
        kv = e.method("chunk", e.fn(F.linear, key, wkv, bkv), 2, -1)
        return e.fn(F.linear, query, wq, bq), e.fn(operator.getitem, kv, 0), e.fn(operator.getitem, kv, 1)
    ws = split(w, [embed] * 3)
    bs = split(b, [embed] * 3) if b is not None else [None] * 3
    return tuple(e.fn(F.linear, x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))


def _sdpa_mask(e: _Emit, a: dict, heads: int, dtype: torch.dtype):
    """``(attn_mask for SDPA or None, is_causal)``: the function's mask merge, broadcastable to ``[N, H, L, S]``
    (bool True = attend when every part is bool, else an additive float mask; bool parts mask with -inf)."""
    am, kpm = a["attn_mask"], a["key_padding_mask"]
    if a["is_causal"] and kpm is None:                     # the function hands is_causal to SDPA, the mask unused
        return None, True
    parts = []                                             # (node, is_bool)
    if am is not None:
        am4 = e.method("unflatten", am, 0, (-1, heads)) if example(am).dim() == 3 else \
            e.method("unsqueeze", e.method("unsqueeze", am, 0), 0)
        parts.append((am4, example(am).dtype == torch.bool))
    if kpm is not None:
        parts.append((e.method("unsqueeze", e.method("unsqueeze", kpm, 1), 1), example(kpm).dtype == torch.bool))
    if not parts:
        return None, False
    if all(is_bool for _, is_bool in parts):
        keep = None
        for p, _ in parts:                                 # True = masked in nn.MultiheadAttention's convention
            k = e.fn(torch.logical_not, p)
            keep = k if keep is None else e.fn(operator.and_, keep, k)
        return keep, False
    total = None
    for p, is_bool in parts:
        if is_bool:                                        # F._canonical_mask: bool -> 0 / -inf in q's dtype
            p = e.method("masked_fill", e.fn(torch.zeros_like, p, dtype=dtype), p, float("-inf"))
        total = p if total is None else e.fn(operator.add, total, p)
    return total, False


def _expand(gm: fx.GraphModule, node: fx.Node, a: dict) -> None:
    query = a["query"]
    q_ev = example(query)
    e = _Emit(gm.graph, node, q_ev.fake_mode)
    heads, embed = a["num_heads"], q_ev.shape[-1]
    batched = q_ev.dim() == 3
    if not batched:  # [L, E] -> [L, 1, E] (one node per distinct input: `query is key` survives); kpm [S] -> [1, S]
        batch1: dict[fx.Node, fx.Node] = {}
        a = dict(a)
        for name in ("query", "key", "value"):
            if a[name] not in batch1:
                batch1[a[name]] = e.method("unsqueeze", a[name], 1)
            a[name] = batch1[a[name]]
        if a["key_padding_mask"] is not None:
            a["key_padding_mask"] = e.method("unsqueeze", a["key_padding_mask"], 0)
    q, k, v = _in_projection(e, a, embed)
    # [L, N, E] -> [N, H, L, D]
    q, k, v = (e.method("permute", e.method("unflatten", x, -1, (heads, embed // heads)), 1, 2, 0, 3)
               for x in (q, k, v))
    mask, causal = _sdpa_mask(e, a, heads, q_ev.dtype)
    dropout = a["dropout_p"] if a["training"] else 0.0
    out = e.fn(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out.meta["locattn_form"] = "mha"
    out = e.method("flatten", e.method("permute", out, 2, 0, 1, 3), -2)         # [L, N, E]
    out = e.fn(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
    if not batched:
        out = e.method("squeeze", out, 1)
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


def expand_mha(gm: fx.GraphModule, start_index: int = 0) -> list[AttentionSite]:
    """Expand every ``F.multi_head_attention_forward`` call of ``gm`` that can be expanded faithfully (module doc);
    returns a left-alone site, with its reason, for each one that cannot and for each fused fast-path call."""
    left: list[AttentionSite] = []
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FUSED:
            name, heads_at = _FUSED[node.target]
            site = _left_alone(node, node.args[0] if node.args else None,
                               node.args[heads_at] if len(node.args) > heads_at else 0,
                               f"{name}: a fused fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer "
                               "(eval under no_grad); torch.backends.mha.set_fastpath_enabled(False) lets locattn see "
                               "its attention", start_index + len(left), form="mha-fused", batch_first=True)
            if site is not None:
                left.append(site)
            continue
        if node.target is not _MHA:
            continue
        try:
            bound = _MHA_SIG.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        a = dict(bound.arguments)
        why = _why_not(a, node)
        if why:
            site = _left_alone(node, a["query"], a["num_heads"], why, start_index + len(left))
            if site is not None:
                left.append(site)
            continue
        _expand(gm, node, a)
        changed = True
    if changed:
        gm.graph.lint()
    return left
