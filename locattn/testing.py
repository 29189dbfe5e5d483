"""Test helpers shared by every test module: fp64 goldens and tolerances relative to eager error.

``assert_close_to_golden(actual, golden, eager)`` accepts ``actual`` when its error against the fp64
``golden`` is within ``factor`` times the error of ``eager`` (the same computation done by plain PyTorch in
the same dtype) plus a small absolute floor — FlexAttention's test strategy: a kernel must be about as
accurate as eager PyTorch, whatever the dtype.
"""

from __future__ import annotations

import torch

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0


def assert_close_to_golden(actual: torch.Tensor, golden: torch.Tensor, eager: torch.Tensor | None = None,
                           factor: float = 3.0, name: str = "") -> None:
    floor = FLOOR.get(actual.dtype, 1e-5) * max(1.0, float(golden.double().abs().max()))
    err = max_err(actual, golden)
    bound = floor if eager is None else factor * max_err(eager, golden) + floor
    assert err <= bound, f"{name}: max error {err:.3g} vs fp64 golden exceeds {bound:.3g}"


def fake_sdpa_graph(q_shape: tuple[int, ...], path: str = "blk", **sdpa_kwargs):
    """A Dynamo-like graph holding one ``F.scaled_dot_product_attention(q, q, q, **sdpa_kwargs)`` on FakeTensors of
    ``q_shape`` (``[B, H, S, D]``) in module ``path``: passes and their costs at any size, without allocating
    or running anything. Returns the ``fx.GraphModule``."""
    import torch.fx as fx
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(q_shape)
        out = F.scaled_dot_product_attention(q, q, q, **sdpa_kwargs)
    g = fx.Graph()
    qn = g.placeholder("q")
    qn.meta["example_value"] = q
    node = g.call_function(F.scaled_dot_product_attention, (qn, qn, qn), dict(sdpa_kwargs))
    node.meta["example_value"] = out
    node.meta["nn_module_stack"] = {"m": (f"L['self'].{path}", torch.nn.Module)}
    g.output(node)
    return fx.GraphModule(torch.nn.Module(), g)
