"""``AttentionSite``: one softmax-attention computation found in a Dynamo graph, in canonical form.

Every finder (SDPA calls here, hand-written attention in :mod:`locattn.passes.match_manual`) produces sites
with the same fields, so the policy, the rewrite and ``explain`` never care how a site was spelled.

Canonical form: ``q [B, Hq, Sq, D]``, ``k [B, Hk, Sk, D]``, ``v [B, Hk, Sk, Dv]`` as graph nodes (a finder may
insert view nodes to get there), an optional bool ``mask`` and float ``bias`` node (broadcastable to
``[B, Hq, Sq, Sk]``), a static ``scale`` and ``is_causal``. ``replace`` swaps the original computation for the
op's output; it is the finder's job to map ``[B, Hq, Sq, Dv]`` back to the layout the model expects.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx


def normalize_path(raw: str) -> str:
    """``"L['self'].blocks[0]._modules['attn']"`` -> ``"blocks.0.attn"``; root-level ops give ``""``."""
    # the root object: L['self'], G['model'], or an argument reached by index (L['args'][0] when a wrapper
    # such as transformers' decorators calls forward(*args))
    p = re.sub(r"^[LG]\['[^']*'\](?:\[\d+\])*", "", raw)
    p = re.sub(r"(?:\.)?__dict__\['_modules'\]\['([^']*)'\]", r".\1", p)
    p = re.sub(r"(?:\.)?_modules\['([^']*)'\]", r".\1", p)
    p = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", p)
    p = re.sub(r"\.{2,}", ".", p)
    return p.strip(".")


def module_path(node: fx.Node) -> str:
    """Normalized path of the innermost module whose forward produced ``node`` (``""`` at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1]
    raw = raw[0] if isinstance(raw, tuple) else raw
    return normalize_path(str(raw))


def example(node: Any) -> Any:
    """The FakeTensor (or value) a Dynamo-level node stands for."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def keep_views_valid(g: fx.Graph, old: fx.Node, out: fx.Node) -> fx.Node:
    """``out`` (the op's output, in SDPA's ``[B, Sq, H, Dv]`` memory layout) made contiguous when the node it
    replaces was contiguous (CPU SDPA, a hand-written ``p @ v``) and a user calls ``.view`` on it: a view that
    merges the head and sequence axes is valid only on the contiguous tensor (a copy, only in such graphs)."""
    viewed = any((u.op == "call_method" and u.target in ("view", "view_as")) or
                 (u.op == "call_function" and u.target is torch.Tensor.view) for u in old.users)
    ev = example(old)
    if viewed and isinstance(ev, torch.Tensor) and ev.is_contiguous():
        return g.call_method("contiguous", (out,))
    return out


def ancestors(nodes) -> set[fx.Node]:
    """``nodes`` and every node they depend on."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def static_int(x) -> int | None:
    """``x`` as a Python int if it is static (or a SymInt with a hint we may use for reporting), else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.hint) if x.node.hint is not None else None
        except Exception:
            return None
    return None


@dataclass(eq=False)
class AttentionSite:
    """One attention site. Shapes are tuples of ints (symbolic sizes reported by their example hint)."""

    index: int
    path: str
    form: str                          # "sdpa", "matmul", "bmm", "baddbmm", "einsum", ...
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    layout: str = "BHSD"               # layout the model used, e.g. "BHSD", "(BH)SD", "BSHD"
    mask: fx.Node | None = None        # bool, True = attend
    mask_shape: tuple[int, ...] | None = None
    bias: fx.Node | None = None        # float, added to the scaled scores
    bias_shape: tuple[int, ...] | None = None
    is_causal: bool = False
    scale: float | None = None
    softcap: float = 0.0               # c > 0: scores c * tanh(scale * q·kᵀ / c) before bias / mask (Gemma 2)
    enable_gqa: bool = False
    dropout_p: float = 0.0
    replaced: tuple[str, ...] = ()     # names of the nodes a manual site replaces (explain)
    replace: Callable[[fx.Node], None] | None = field(default=None, repr=False)
    symbolic_seq: bool = False         # sequence length is symbolic (dynamic shapes)
    graph_id: int = 0
    #: a finder's reason not to rewrite even before the policy is consulted (e.g. dropout in training)
    blocker: str = ""
    #: inferred token layout ``(grid, prefix, suffix)`` and where it came from (:mod:`.grid_infer`)
    token_grid: tuple[tuple[int, ...], int, int] | None = None
    token_grid_desc: str | None = None
    #: the axis of the ``q`` node that holds the sequence (None: not known); why no grid was inferred
    q_seq_axis: int | None = -2
    token_grid_why: str = ""
    #: what a finder could not do but did not need to block on (e.g. heads it kept folded into the batch), and
    #: what it proved (a causal mask)
    notes: tuple[str, ...] = ()
    #: run-time checks the rewrite must add (:class:`locattn.passes.causal_mask.CausalProof` of a buffer mask)
    causal_proof: Any = field(default=None, repr=False)

    @property
    def heads(self) -> int:
        return self.q_shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k_shape[1]

    @property
    def s_q(self) -> int:
        return self.q_shape[2]

    @property
    def s_k(self) -> int:
        return self.k_shape[2]

    @property
    def batch(self) -> int:
        return self.q_shape[0]

    @property
    def head_dim(self) -> int:
        return self.q_shape[3]

    @property
    def v_dim(self) -> int:
        return self.v_shape[3]

    @property
    def mask_desc(self) -> str:
        parts = []
        if self.mask is not None:
            parts.append("bool" + ("[" + "x".join(map(str, self.mask_shape)) + "]" if self.mask_shape else ""))
        if self.bias is not None:
            parts.append("float" + ("[" + "x".join(map(str, self.bias_shape)) + "]" if self.bias_shape else ""))
        if self.is_causal:
            parts.append("causal")
        if self.softcap:
            parts.append(f"softcap {self.softcap:g}")
        return "+".join(parts) or "-"

    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class SoftmaxLeft:
    """A softmax the finders did not take as attention, and why (``explain`` lists them: no softmax is left
    alone silently)."""

    path: str
    node: str
    reason: str
    graph_id: int = 0


def adopt_causal_proof(site: AttentionSite, proof) -> None:
    """``site.is_causal`` when its mask / bias is proven causal (:func:`locattn.passes.causal_mask.prove_causal`):
    the op then skips the blocks above the diagonal, and still applies the mask (nothing of it is lost)."""
    if proof.why and not site.is_causal:
        site.is_causal = True
        site.causal_proof = proof
        site.notes = site.notes + (f"causal: {proof.why}; the op skips the blocks above the diagonal, the mask is "
                                   "kept",)
