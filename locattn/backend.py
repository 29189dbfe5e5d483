"""The ``locattn`` torch.compile backend.

``torch.compile(model, backend="locattn", options={...})`` resolves through the ``torch_dynamo_backends``
entry point to :func:`locattn_backend`. Options:

* ``policy``: a path, a dict or a :class:`locattn.Policy` (else ``$LOCATTN_POLICY``, else all-dense),
* ``backend``: implementation override for every site (``"reference"``, ``"blocked"``, ...),
* ``timestep_arg``: the model input holding the diffusion timestep for ``timesteps`` rules (default
  ``"timestep"``, diffusers' name),
* ``sequence_parallel``: shard the token sequence over a process group (:mod:`locattn.parallel`),
* ``policy = "auto"`` with ``budget`` (default 0.02), ``calibration_calls`` (default 2), ``save_policy`` (a
  path), ``metric``, ``candidates``, ``cost``, ``progress``, ``rows``: calibrate on the first calls, then
  recompile once with the chosen policy (:mod:`locattn.calibration.auto`),
* any other key is an Inductor config patch, passed to ``compile_fx``.

``locattn.backend(policy=...)`` returns a :class:`LocattnBackend` object for users who prefer objects; it
also keeps the decisions of every graph it compiled (``.decisions``), which ``explain`` reads.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.locattn)
from .passes.rewrite import Decision, rewrite_graph, warn_unmatched
from .passes.sites import SoftmaxLeft
from .policy import Policy

OUR_OPTIONS = {"policy", "backend", "timestep_arg", "sequence_parallel"}
#: options of ``policy = "auto"`` (:class:`locattn.calibration.auto.AutoOptions`)
AUTO_OPTIONS = {"budget", "calibration_calls", "save_policy", "metric", "candidates", "cost", "progress", "rows"}


class LocattnBackend:
    """A torch.compile backend: rewrite attention sites per ``policy``, then Inductor (or eager)."""

    def __init__(self, policy: Any = None, backend: str = "", inductor: bool = True,
                 inductor_config: dict | None = None, timestep_arg: str = "timestep",
                 sequence_parallel: Any = None, auto: dict | None = None):
        self.auto = None
        if isinstance(policy, str) and policy == "auto":
            from .calibration.auto import AutoOptions

            self.auto = AutoOptions.from_options(auto or {})
            policy = None
        elif auto:
            raise ValueError(f"locattn: option(s) {sorted(auto)} need policy = \"auto\"")
        self.policy = Policy.coerce(policy) if self.auto is None else Policy(source="auto")
        self.sequence_parallel = _parallel_config(sequence_parallel)
        if self.auto is not None and self.sequence_parallel is not None:
            raise ValueError("locattn: policy = \"auto\" with sequence_parallel is not supported: calibrate once "
                             "(locattn.calibrate or python -m locattn calibrate) and pass the policy file")
        self.parallel_reports: list = []  # one locattn.parallel.graph.ParallelReport per graph, when sharding
        self.backend = backend
        self.timestep_arg = timestep_arg
        self.inductor = inductor
        self.inductor_config = dict(inductor_config or {})
        self.decisions: list[Decision] = []
        #: softmaxes of the compiled graphs that are not attention, with the reason (``explain`` lists them)
        self.softmax_left: list[SoftmaxLeft] = []
        self._graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs):
        if self.auto is not None:
            from .calibration.auto import AutoGraph

            return AutoGraph(gm, example_inputs, self.auto, self._compile_with)
        graph_id = self._graphs
        self._graphs += 1
        decisions = rewrite_graph(gm, self.policy, self.backend, graph_id=graph_id, timestep_arg=self.timestep_arg,
                                  example_inputs=example_inputs, left=self.softmax_left)
        self.decisions.extend(decisions)
        if self.sequence_parallel is not None:
            from .parallel.graph import apply_sequence_parallel

            self.parallel_reports.append(apply_sequence_parallel(gm, self.sequence_parallel, example_inputs))
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            if self.inductor_config:
                compiled = compile_fx(gm, example_inputs, config_patches=self.inductor_config)
            else:
                compiled = compile_fx(gm, example_inputs)
        else:
            compiled = gm.forward
        if self.sequence_parallel is not None:
            from .parallel.runtime import wrap_compiled

            compiled = wrap_compiled(compiled, gm, self.sequence_parallel, self.parallel_reports[-1])
        return compiled

    def _compile_with(self, policy: Policy, gm: fx.GraphModule, example_inputs):
        """How an ``auto`` graph recompiles once calibrated: this backend's settings with ``policy``; the
        decisions join ours (``explain``)."""
        child = LocattnBackend(policy, backend=self.backend, inductor=self.inductor,
                               inductor_config=self.inductor_config, timestep_arg=self.timestep_arg)
        compiled = child(gm, example_inputs)
        self.decisions.extend(child.decisions)
        self.softmax_left.extend(child.softmax_left)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            child.warn_unmatched()
        return compiled

    def warn_unmatched(self) -> None:
        warn_unmatched(self.policy, self.decisions)

    def __repr__(self) -> str:
        return f"LocattnBackend(policy={self.policy.source!r}, fingerprint={self.policy.fingerprint()})"


def backend(policy: Any = None, backend: str = "", inductor: bool = True, timestep_arg: str = "timestep",
            sequence_parallel: Any = None, **inductor_config) -> LocattnBackend:
    """A backend object: ``torch.compile(model, backend=locattn.backend(policy="p.toml"))``; with
    ``policy="auto"`` the auto options (``budget``, ``calibration_calls``, ...) are keywords too."""
    auto = {k: inductor_config.pop(k) for k in list(inductor_config) if k in AUTO_OPTIONS}
    return LocattnBackend(policy, backend=backend, inductor=inductor, inductor_config=inductor_config,
                          timestep_arg=timestep_arg, sequence_parallel=sequence_parallel, auto=auto)


def _parallel_config(value: Any):
    if value is None or value is False:
        return None
    from .parallel.config import SPConfig

    return SPConfig.coerce(value)


def locattn_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None,
                    **kwargs):
    """Entry point of ``backend="locattn"``. Reads the policy afresh at every compile. ``torch.compile``'s
    ``mode`` (which it does not allow together with ``options``; the policy then comes from
    ``$LOCATTN_POLICY``) becomes Inductor's settings for that mode, e.g. "reduce-overhead" -> CUDA graphs."""
    options = dict(options or {})
    if mode:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    ours = {k: options.pop(k) for k in list(options) if k in OUR_OPTIONS}
    auto = {k: options.pop(k) for k in list(options) if k in AUTO_OPTIONS}
    b = LocattnBackend(ours.get("policy"), backend=ours.get("backend", ""), inductor_config=options,
                       timestep_arg=ours.get("timestep_arg", "timestep"), sequence_parallel=ours.get("sequence_parallel"),
                       auto=auto)
    compiled = b(gm, example_inputs)
    if b.auto is not None:
        return compiled
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        b.warn_unmatched()
    return compiled
