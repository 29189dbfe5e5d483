"""``locattn::attention_phased``: one site whose pattern depends on the diffusion timestep's phase.

``locattn::attention_phased(q, k, v, mask, bias, phase, scale, is_causal, specs, backend) -> (out, lse)``

  q, k, v, mask, bias, scale, is_causal: as ``locattn::attention`` (:mod:`locattn.ops`)
  phase: int32 on the host, the phase of every timestep element of this model call (:mod:`locattn.passes.phases`):
         ``[N]`` for a 0-/1-D timestep (``N`` = 1 or the batch), ``[1, N]`` for a per-token timestep
  specs: :func:`phased_specs`: per phase, a ``locattn::attention`` spec string and backend
  backend: the backend of phases whose own is "" (as in ``locattn::attention``)

The op runs ``locattn::attention`` with the spec of the call's phase; its results are exactly those of the plain
op with that spec. A batch whose elements lie in different phases (training with a timestep per sample) runs
each phase on its batch rows. The backward is ``locattn::attention_phased_backward``.

Both ops are tagged ``cudagraph_unsafe``: they read the phase on the host, so Inductor runs them outside CUDA
graphs (a replay would repeat the phase the graph was recorded with).

Example::

    specs = phased_specs([dense_spec.to_json(), window_spec.to_json()])
    out, lse = torch.ops.locattn.attention_phased(q, k, v, None, None, torch.tensor([1], dtype=torch.int32),
                                                  0.125, False, specs, "")
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import torch

from . import ops
from .codegen.registry import lse_dtype
from .counters import bump

_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def phased_specs(specs: list[str] | tuple[str, ...], backends: list[str] | tuple[str, ...] | None = None) -> str:
    """The ``specs`` argument: one ``SiteSpec.to_json()`` string (and backend name, "" for the op's) per phase,
    in phase order."""
    backends = list(backends) if backends is not None else [""] * len(specs)
    if len(backends) != len(specs):
        raise ValueError(f"locattn: {len(specs)} phase specs but {len(backends)} backends")
    return json.dumps({"v": 1, "phases": list(specs), "backends": backends}, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def parse_phased(text: str) -> tuple[tuple[str, str], ...]:
    """``((spec, backend), ...)`` per phase."""
    d = json.loads(text)
    return tuple(zip(d["phases"], d["backends"]))


def _phase_rows(phase: torch.Tensor, batch: int, n: int) -> list[tuple[int, list[int] | None]]:
    """``[(phase, batch rows or None for all)]`` of one call. ``phase`` is a host tensor in compiled graphs
    (the graph copied it once per call), so reading it costs no device sync."""
    vals = phase.reshape(-1).tolist()
    bad = sorted({v for v in vals if not 0 <= v < n})
    if not vals or bad:
        raise ValueError(f"locattn: phase values {bad or vals} outside the {n} phases of this site")
    if len(set(vals)) == 1:
        return [(vals[0], None)]
    if phase.dim() != 1 or len(vals) != batch:
        raise ValueError(f"locattn: the timestep elements of this call lie in different phases {sorted(set(vals))} "
                         f"but do not map to the {batch} batch rows of the attention (timestep shape "
                         f"{tuple(phase.shape)}): give every element of a call the same timestep phase")
    rows: dict[int, list[int]] = {}
    for i, p in enumerate(vals):
        rows.setdefault(p, []).append(i)
    return sorted(rows.items())


def _rows(t: Optional[torch.Tensor], idx: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """Batch rows ``idx`` of ``t`` when it has a batch axis (a mask / bias broadcast over the batch stays)."""
    if t is None or t.dim() < 4 or t.shape[-4] == 1:
        return t
    if t.dim() > 4 or t.shape[0] != batch:
        raise ValueError(f"locattn: cannot split a {tuple(t.shape)} mask/bias by batch rows ({batch}) for a call "
                         f"whose batch elements lie in different timestep phases")
    return t.index_select(0, idx)


@torch.library.custom_op("locattn::attention_phased", mutates_args=(), tags=_UNSAFE)
def attention_phased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], phase: torch.Tensor, scale: float, is_causal: bool, specs: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = parse_phased(specs)
    groups = _phase_rows(phase, q.shape[0], len(table))
    if len(groups) == 1:
        spec, be = table[groups[0][0]]
        bump("phase", str(groups[0][0]))
        return ops.attention(q, k, v, mask, bias, scale, is_causal, spec, be or backend)
    b, hq, s_q, _ = q.shape
    out = ops._new_out(q, v)
    lse = q.new_empty(b, hq, s_q, dtype=lse_dtype(q.dtype))
    for p, rows in groups:
        bump("phase", str(p))
        spec, be = table[p]
        idx = torch.tensor(rows, dtype=torch.long, device=q.device)
        o, l = ops.attention(*(_rows(t, idx, b) for t in (q, k, v, mask, bias)), scale, is_causal, spec, be or backend)
        out.index_copy_(0, idx, o)
        lse.index_copy_(0, idx, l)
    return out, lse


@attention_phased.register_fake
def _(q, k, v, mask, bias, phase, scale, is_causal, specs, backend):
    b, hq, s_q, _ = q.shape
    return ops._new_out(q, v), q.new_empty(b, hq, s_q, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("locattn::attention_phased_backward", mutates_args=(), tags=_UNSAFE)
def attention_phased_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], phase: torch.Tensor, scale: float, is_causal: bool,
                              specs: str, backend: str, need_dbias: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``locattn::attention_backward`` with the spec of each batch row's phase."""
    table = parse_phased(specs)
    groups = _phase_rows(phase, q.shape[0], len(table))
    if len(groups) == 1:
        spec, be = table[groups[0][0]]
        return ops.attention_backward(grad_out, q, k, v, out, lse, mask, bias, scale, is_causal, spec, be or backend,
                                      need_dbias)
    b = q.shape[0]
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    want_dbias = need_dbias and bias is not None
    dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if want_dbias else q.new_empty(0)
    for p, rows in groups:
        idx = torch.tensor(rows, dtype=torch.long, device=q.device)
        sub = [_rows(t, idx, b) for t in (grad_out, q, k, v, out, lse.unsqueeze(-1), mask, bias)]
        sub[5] = sub[5].squeeze(-1)
        spec, be = table[p]
        *g, gb = ops.attention_backward(*sub, scale, is_causal, spec, be or backend, need_dbias)
        for acc, gr in zip(grads, g):
            acc.index_copy_(0, idx, gr)
        if want_dbias:
            if sub[7] is not bias:
                dbias.index_copy_(0, idx, gb)
            else:
                dbias += gb
    return (*grads, dbias)


@attention_phased_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, bias, phase, scale, is_causal, specs, backend, need_dbias):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if (need_dbias and bias is not None) \
        else q.new_empty(0)
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, phase, scale, is_causal, specs, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, bias, phase)
    ctx.meta = (scale, is_causal, specs, backend)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, bias, phase = ctx.saved_tensors
    scale, is_causal, specs, backend = ctx.meta
    dq, dk, dv, dbias = attention_phased_backward(grad_out, q, k, v, out, lse, mask, bias, phase, scale, is_causal,
                                                  specs, backend, ctx.bias_grad)
    return dq, dk, dv, None, (dbias if ctx.bias_grad else None), None, None, None, None, None


attention_phased.register_autograd(_backward, setup_context=_setup_context)

_AUTOCAST_LIB = torch.library.Library("locattn", "IMPL")


def _register_autocast(device_type: str) -> None:
    """Under autocast the op casts q, k, v as ``locattn::attention`` does (see ``ops._register_autocast``)."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(t):
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
        return t.to(torch.get_autocast_dtype(device_type)) if ok and t.dtype != torch.float64 else t

    def kernel(_keys, q, k, v, *rest):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.locattn.attention_phased.default(cast(q), cast(k), cast(v), *rest)

    _AUTOCAST_LIB.impl("attention_phased", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
