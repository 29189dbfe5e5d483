"""The one ordered registry of implementations of ``locattn::attention``.

Each implementation answers ``can_run(call) -> (ok, reason)``; dispatch walks the list in order and takes the
first that can run, counting why the ones before it could not (``counters()["dispatch"]``). An explicit
override (policy ``backend = "..."`` or ``torch.compile(..., options={"backend": ...})``) picks one by name and
raises :class:`BackendUnavailable` with its reason if it cannot run — an override never silently degrades.

Later implementations (Triton, fast CPU) are one entry each: subclass :class:`Implementation` and add an
instance to ``IMPLEMENTATIONS`` at the position where it should be preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..counters import bump, log
from ..patterns.base import Layout, Pattern
from ..patterns.mechanism import SOFTMAX, Mechanism


class BackendUnavailable(RuntimeError):
    """An explicitly requested implementation cannot run this call."""


@dataclass
class AttentionCall:
    """One head group of one op call. Shapes (4-D, contiguous not required):

    q: [B, Hq, Sq, D]; k: [B, Hk, Sk, D]; v: [B, Hk, Sk, Dv] with Hq % Hk == 0 (GQA);
    mask: bool, broadcastable to [B, Hq, Sq, Sk] (True = attend) or None;
    bias: float, broadcastable to [B, Hq, Sq, Sk] (added to the scaled scores) or None.
    ``layout`` is resolved (concrete grid) for local patterns. ``mechanism``: softmax, or linear / hybrid
    (:mod:`locattn.patterns.mechanism`); an implementation runs only the kinds in its ``mechanisms``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    bias: torch.Tensor | None
    scale: float
    is_causal: bool
    pattern: Pattern
    layout: Layout
    mechanism: Mechanism = SOFTMAX

    @property
    def empty(self) -> bool:
        """No batch, head, query or key: nothing to compute (implementations with kernels decline it)."""
        return min(self.q.shape[0], self.q.shape[1], self.q.shape[-2], self.k.shape[-2]) == 0


#: A site bias value below this masks its key, like -inf: -2**14. Below it an fp32 logsumexp keeps fewer than 10
#: fractional bits, so a row whose every score lay there would be normalised ~1e-3 off by the lse-based backward
#: of the fused kernels (Triton, cpu; SDPA's fused kernels too), and at HF-style -1e9 / ``finfo.min`` masks the
#: lse absorbs log(sum) altogether (the gradient of a sum, not of an average). Only a row whose allowed keys *all*
#: carry such a bias is affected: it is an empty row (out 0, lse -inf, no gradient) in every implementation,
#: where SDPA averages v (fp32 rounds every score to the same value) or softmaxes the scores; in any other row a
#: key below -2**14 has weight exp(-16000) = 0 either way. diffusers' -10000.0 masks stay ordinary biases.
BIAS_MASK_BELOW = -float(2 ** 14)


def bias_scores(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A site bias as additive scores in ``dtype``: values below :data:`BIAS_MASK_BELOW` become -inf."""
    b = bias.to(dtype)
    return b.masked_fill(b < BIAS_MASK_BELOW, float("-inf"))


def lse_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The op's log-sum-exp dtype: float32, or float64 for float64 inputs (fp64 goldens stay exact)."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


class Implementation:
    name: str = ""
    #: the mechanism kinds this implementation computes; dispatch declines any other before asking ``can_run``
    mechanisms: frozenset[str] = frozenset({"softmax"})

    def can_run(self, call: AttentionCall) -> tuple[bool, str]:
        return True, ""

    def supports(self, call: AttentionCall) -> tuple[bool, str]:
        """``can_run`` behind the mechanism check every dispatch makes: an implementation of softmax attention
        declines a linear / hybrid call (and vice versa) with the reason, without each ``can_run`` spelling it."""
        if call.mechanism.kind not in self.mechanisms:
            return False, f"mechanism {call.mechanism.kind} (runs {'/'.join(sorted(self.mechanisms))} only)"
        return self.can_run(call)

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``out [B, Hq, Sq, Dv]`` (q's dtype) and ``lse [B, Hq, Sq]`` (:func:`lse_dtype`; -inf for empty
        rows)."""
        raise NotImplementedError

    def backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns ``dq, dk, dv`` shaped like q, k, v and ``dbias`` shaped like ``call.bias`` (or None)."""
        raise NotImplementedError


IMPLEMENTATIONS: list[Implementation] = []


def register(impl: Implementation, before: str | None = None) -> None:
    """Add an implementation (before the one named ``before``, else at the end)."""
    names = [i.name for i in IMPLEMENTATIONS]
    if impl.name in names:
        IMPLEMENTATIONS[names.index(impl.name)] = impl
        return
    IMPLEMENTATIONS.insert(names.index(before) if before in names else len(IMPLEMENTATIONS), impl)


def get(name: str) -> Implementation:
    for impl in IMPLEMENTATIONS:
        if impl.name == name:
            return impl
    raise BackendUnavailable(f"unknown locattn backend {name!r}; known: {[i.name for i in IMPLEMENTATIONS]}")


def candidates(call: AttentionCall) -> list[tuple[str, bool, str]]:
    """Which implementations could run ``call``: ``[(name, ok, reason)]`` in dispatch order."""
    return [(impl.name, *impl.supports(call)) for impl in IMPLEMENTATIONS]


def select(call: AttentionCall, override: str = "") -> Implementation:
    if override and override != "auto":
        impl = get(override)
        ok, why = impl.supports(call)
        if not ok:
            raise BackendUnavailable(f"locattn backend {override!r} was requested but cannot run: {why}")
        bump("dispatch", impl.name)
        return impl
    for impl in IMPLEMENTATIONS:
        ok, why = impl.supports(call)
        if ok:
            bump("dispatch", impl.name)
            return impl
        bump("dispatch", f"skip {impl.name}: {why}")
        log.debug("locattn: %s cannot run (%s)", impl.name, why)
    raise BackendUnavailable("no locattn implementation can run this call")  # reference always can
