"""End-to-end metrics ``metric(reference_output, output) -> float`` (smaller is better; the budget bounds it).

* :func:`relative_l2` (the default): ``||out − ref|| / ||ref||`` of the first tensor of the outputs,
* :func:`perplexity_change`: ``exp(loss − loss_ref) − 1`` for outputs carrying a ``loss`` (a causal LM called
  with ``labels``): the relative change of perplexity, e.g. 0.02 for +2 %.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in order (tensors, tuples / lists, dicts and HF ``ModelOutput``)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors(v)]
    return []


def relative_l2(reference: Any, output: Any) -> torch.Tensor:
    """Relative L2 error of the first output tensor (a 0-d tensor)."""
    a, b = tensors(reference), tensors(output)
    if not a or not b:
        raise ValueError("relative_l2: the model's output holds no tensor; pass metric=")
    a, b = a[0].detach().double(), b[0].double()
    return (b - a).norm() / a.norm().clamp_min(1e-300)


def _loss(x: Any):
    loss = getattr(x, "loss", None)
    if loss is None and isinstance(x, dict):
        loss = x.get("loss")
    if loss is None and isinstance(x, torch.Tensor) and x.numel() == 1:
        loss = x
    if loss is None:
        raise ValueError("perplexity_change: the output has no 'loss' (call the LM with labels=...)")
    return loss


def perplexity_change(reference: Any, output: Any):
    """``ppl / ppl_ref − 1`` from the outputs' mean token cross-entropy (``loss``); a 0-d tensor (differentiable
    in ``output``) when the losses are tensors."""
    a, b = _loss(reference), _loss(output)
    if isinstance(b, torch.Tensor):
        return torch.exp(b.double() - torch.as_tensor(a, dtype=torch.float64).detach()) - 1.0
    return math.exp(b - float(a)) - 1.0


def detach(x: Any) -> Any:
    """Outputs with every tensor detached (references kept between passes)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict) and type(x) is not dict:   # ModelOutput and other dict subclasses: keep the type
        try:
            return type(x)(**{k: detach(v) for k, v in x.items()})
        except TypeError:
            pass
    if isinstance(x, dict):
        return {k: detach(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(detach(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(detach(v) for v in x)
    return x
