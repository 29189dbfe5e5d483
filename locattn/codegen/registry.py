"""The one ordered registry of implementations of ``locattn::attention``.

Each implementation answers ``can_run(call) -> (ok, reason)``; dispatch walks the list in order and takes the
first that can run, counting why the ones before it could not (``counters()["dispatch"]``). An explicit
override (policy ``backend = "..."`` or ``torch.compile(..., options={"backend": ...})``) picks one by name and
raises :class:`BackendUnavailable` with its reason if it cannot run — an override never silently degrades.

Later implementations (Triton, fast CPU) are one entry each: subclass :class:`Implementation` and add an
instance to ``IMPLEMENTATIONS`` at the position where it should be preferred.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    ``layout`` is resolved (concrete grid, over the keys) for local patterns. ``q_offset``: query row r is token
    ``r + q_offset`` of the layout (a causal rule on a site with S_q < S_k: the last S_q positions); the site's
    own mask, bias and ``is_causal`` keep SDPA's meaning on query rows.
    ``softcap``: c > 0 caps the scaled scores before the bias, ``s = c * tanh(scale * q·k / c)`` (Gemma 2's
    logit soft-capping, FlexAttention's ``score_mod``); 0 = none. Fields after ``layout`` are passed by keyword.
    ``mechanism``: softmax, or linear / hybrid (:mod:`locattn.patterns.mechanism`); an implementation runs only
    the kinds in its ``mechanisms``.
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
    q_offset: int = 0
    #: a call over every head of a site whose heads follow different rules: ``((heads, pattern, layout), ...)``
    #: covering each head once (``pattern`` / ``layout`` above are then the first local group's). Only
    #: implementations with ``multi_group`` see such calls (:func:`select_multi`).
    head_groups: tuple | None = None
    softcap: float = 0.0
    mechanism: Mechanism = SOFTMAX
    _kept: torch.Tensor | None = field(default=None, repr=False)
    _tables: object = field(default=None, repr=False)

    def kept(self) -> torch.Tensor:
        """A ``dynamic`` pattern's selection for this call: bool ``[B, Hq, NB, NB]`` (computed once per call on
        the tensors' device; :func:`locattn.patterns.dynamic.select_blocks`). The backward recomputes it from
        the same q and k, which gives the same blocks (the selection is a deterministic function of them)."""
        if self._kept is None:
            from ..patterns.dynamic import select_blocks  # noqa: PLC0415
            self._kept = select_blocks(self.pattern, self.layout, self.q, self.k, self.scale, self.q_offset)
        return self._kept

    def dynamic_tables(self):
        """A ``dynamic`` call's :class:`~locattn.patterns.tables.BlockTables` (its pooling blocks as plan blocks,
        whatever the implementation), made once per call."""
        if self._tables is None:
            from ..patterns.dynamic import token_blocks  # noqa: PLC0415
            from ..patterns.plan import build_plan  # noqa: PLC0415
            from ..patterns.tables import dynamic_tables  # noqa: PLC0415
            p, lay = self.pattern, self.layout
            tile, bt = p.tile_for(lay.grid), p.block_tokens(lay.grid)
            plan = build_plan(p.static, lay, self.q.shape[-2], self.k.shape[-2], bt, bt, self.is_causal,
                              self.q_offset, (tile, tile))
            self._tables = dynamic_tables(plan, token_blocks(p, lay, self.q.device), self.kept(), p.static, lay,
                                          p.causal, self.is_causal)
        return self._tables

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


def site_scores(term: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A site mask (bool: 0 where True, -inf where False) or bias (:func:`bias_scores`) as additive scores."""
    if term.dtype == torch.bool:
        return torch.zeros(term.shape, dtype=dtype).masked_fill_(~term, float("-inf"))
    return bias_scores(term, dtype)


def lse_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The op's log-sum-exp dtype: float32, or float64 for float64 inputs (fp64 goldens stay exact)."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


class Implementation:
    name: str = ""
    #: runs a site's per-head rules as one call (``AttentionCall.head_groups``), e.g. one kernel launch
    multi_group: bool = False
    #: the mechanism kinds this implementation computes; dispatch declines any other before asking ``can_run``
    mechanisms: frozenset[str] = frozenset({"softmax"})

    def can_run(self, call: AttentionCall) -> tuple[bool, str]:
        return True, ""

    def supports(self, call: AttentionCall) -> tuple[bool, str]:
        """``can_run`` behind the mechanism check every dispatch makes: an implementation of softmax attention
        declines a linear / hybrid call (and vice versa) with the reason, without each ``can_run`` spelling it."""
        if call.mechanism.kind not in self.mechanisms:
            return False, f"mechanism {call.mechanism.kind} (runs {'/'.join(sorted(self.mechanisms))} only)"
        if call.softcap and not call.mechanism.is_softmax:
            return False, f"softcap with mechanism {call.mechanism.kind} (the features estimate exp(q·k) only)"
        if call.q_offset and not call.mechanism.is_softmax:
            return False, f"queries at an offset with mechanism {call.mechanism.kind}"
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


def select_multi(call: AttentionCall, override: str = "") -> Implementation | None:
    """The implementation that runs a per-head call (``call.head_groups``) at once, or None: then the op runs
    each head group on its own. Taken only where that implementation is the one dispatch would pick for the
    groups anyway (the first in order that can run the call), or the explicit override."""
    if override and override != "auto":
        impl = get(override)
        if impl.multi_group and impl.can_run(call)[0]:
            bump("dispatch", f"{impl.name} (per-head groups, one call)")
            return impl
        return None
    for impl in IMPLEMENTATIONS:
        if impl.multi_group:
            if impl.can_run(call)[0]:
                bump("dispatch", f"{impl.name} (per-head groups, one call)")
                return impl
            continue
        first = dataclasses.replace(call, head_groups=None)
        if impl.can_run(first)[0]:
            return None  # a single-group implementation would run the groups
    return None


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
