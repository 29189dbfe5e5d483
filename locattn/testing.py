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
