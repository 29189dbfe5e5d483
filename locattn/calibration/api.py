"""``locattn.calibrate(model, samples, budget=...)``: a per-layer, per-head policy within an error budget.

    samples = [(x1,), (x2,), (x3,), (x4,)]                    # argument tuples, or (args, kwargs) pairs
    policy = locattn.calibrate(model, samples, budget=0.02)   # default metric: relative L2 of the output
    open("policy.toml", "w").write(policy.to_toml())          # commented with what was measured
    model = torch.compile(model, backend="locattn", options={"policy": policy})

The procedure is :mod:`locattn.calibration.engine`'s. The model is traced once with ``torch.compile`` and a
recording backend; its weights, modules and hooks are untouched, and Dynamo's caches are reset afterwards (as
``locattn.explain`` does). Call ``model.eval()`` first: dropout makes the metric noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .engine import Calibration, Engine, Options
from .record import CalibrationError, Session, TapBackend


@dataclass
class Sample:
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}[{'x'.join(map(str, x.shape))}]"
    if isinstance(x, (int, float, bool, str)) or x is None:
        return repr(x)
    return type(x).__name__


def as_samples(samples) -> list[Sample]:
    """``samples``: a list whose items are argument tuples / lists, ``(args, kwargs)`` pairs, or one tensor."""
    if isinstance(samples, (torch.Tensor, dict)) or not hasattr(samples, "__iter__"):
        raise CalibrationError(f"locattn.calibrate: samples must be a list of argument tuples (or (args, kwargs) "
                               f"pairs), got {type(samples).__name__}")
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, torch.Tensor):
            out.append(Sample((s,)))
        elif isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], (tuple, list)) and isinstance(s[1], dict):
            out.append(Sample(tuple(s[0]), dict(s[1])))
        elif isinstance(s, (tuple, list)):
            out.append(Sample(tuple(s)))
        else:
            raise CalibrationError(f"locattn.calibrate: sample {i} is a {type(s).__name__}; expected an argument "
                                   f"tuple or an (args, kwargs) pair")
    return out


def _signature(s: Sample) -> tuple:
    def sig(x):
        return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None
    return tuple(sig(a) for a in s.args) + tuple((k, sig(v)) for k, v in sorted(s.kwargs.items()))


def calibrate_with_report(model: torch.nn.Module | Callable, samples, *, budget: float = 0.02,
                          metric: Callable[[Any, Any], float] | None = None, candidates: list | None = None,
                          progress: bool = True, **options) -> Calibration:
    """Like :func:`calibrate`, returning the :class:`~locattn.calibration.engine.Calibration` (policy + report).
    Extra ``options`` are :class:`~locattn.calibration.engine.Options` fields (``cost``, ``rows``,
    ``holdout``, ``max_evals``, ``resolves``, ``backend``, ``resolution``)."""
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"locattn.calibrate: unknown option(s) {sorted(unknown)}")
    opts = Options(budget=budget, metric=metric, candidates=candidates, progress=progress, **options)
    opts.check()
    ss = as_samples(samples)
    if not ss:
        raise CalibrationError("locattn.calibrate: no samples (pass a list of argument tuples)")
    sigs = [_signature(s) for s in ss]
    for i, sg in enumerate(sigs):
        if sg != sigs[0]:
            raise CalibrationError(
                f"locattn.calibrate: inconsistent sample shapes: sample {i} is {ss[i].describe()} but sample 0 is "
                f"{ss[0].describe()}; a calibrated policy is per shape: calibrate samples of one shape at a time")
    session = Session(candidates=candidates, rows=opts.rows, backend=opts.backend)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=TapBackend(session), dynamic=False)
        engine = Engine(session, lambda i: compiled(*ss[i].args, **ss[i].kwargs), len(ss), opts,
                        _model_name(model), [f"{len(ss)} x {ss[0].describe()}"])
        return engine.calibrate()
    finally:
        torch._dynamo.reset()


def calibrate(model: torch.nn.Module | Callable, samples, *, budget: float = 0.02,
              metric: Callable[[Any, Any], float] | None = None, candidates: list | None = None,
              progress: bool = True, **options):
    """Choose a pattern per site and head so that ``metric`` stays within ``budget`` at the least cost.

    model: an ``nn.Module`` (or function) that ``torch.compile`` can trace; samples: a list of argument tuples
    or ``(args, kwargs)`` pairs, all of one shape (the last ``len // 4`` are held out for validation);
    metric: ``metric(reference_output, output) -> float``, default the relative L2 error of the first output
    tensor (:func:`locattn.calibration.metrics.perplexity_change` for an LM called with ``labels``);
    budget: the largest allowed metric (0: all dense); candidates: families, ``Candidate`` s or rule dicts
    (default: every pattern family on each site's grid, :mod:`locattn.calibration.candidates`);
    progress: tqdm bars with ETA.

    Returns a :class:`locattn.Policy` whose ``to_toml()`` carries the provenance and each rule's measured error.
    """
    return calibrate_with_report(model, samples, budget=budget, metric=metric, candidates=candidates,
                                 progress=progress, **options).policy


def _model_name(model) -> str:
    if isinstance(model, torch.nn.Module):
        return f"{type(model).__module__}.{type(model).__qualname__}"
    return getattr(model, "__qualname__", type(model).__name__)
