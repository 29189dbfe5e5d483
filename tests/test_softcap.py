"""Tanh soft-capping as a score modifier of the op (Gemma 2's ``attn_logit_softcapping``, FlexAttention's
``score_mod``): ``scores = c * tanh(scale * q·kᵀ / c) + bias``, masked. The reference is checked against autograd
of that formula; ``blocked`` against the reference; ``cpu`` declines with a reason (ATen's flash kernel takes no
score modifier) and dispatch falls back, counted. The Triton kernels are checked in ``test_triton.py``."""

from __future__ import annotations

import pytest
import torch

import locattn
from locattn.codegen import registry
from locattn.codegen.blocked import Blocked
from locattn.codegen.reference import Reference, expand_kv, keep_mask
from locattn.codegen.registry import AttentionCall
from locattn.patterns import Dense, Layout, Neighborhood, SlidingWindow
from locattn.patterns.spec import HeadGroup, SiteSpec, parse_spec
from locattn.testing import assert_close_to_golden

CASES = [
    ("dense-causal-mask-bias", Dense(), Layout(), 33, True),
    ("sw1d-gqa", SlidingWindow(window=5), Layout(grid=(40,)), 40, False),
    ("na2d-globals-bias", Neighborhood(kernel=(3, 3)), Layout(grid=(5, 7), prefix=2), 37, False),
]


def _call(pattern, layout, s, causal, dtype=torch.float64, softcap=2.5):
    g = torch.Generator().manual_seed(s)
    q = torch.randn(2, 4, s, 16, generator=g, dtype=dtype) * 2
    k = torch.randn(2, 2, s, 16, generator=g, dtype=dtype) * 2
    v = torch.randn(2, 2, s, 8, generator=g, dtype=dtype)
    mask = torch.rand(1, 1, s, s, generator=g) > 0.2
    bias = torch.randn(2, 4, s, s, generator=g, dtype=dtype).requires_grad_()
    lay = layout.resolve(s) if pattern.local else layout
    return AttentionCall(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, bias, 0.5, causal,
                         pattern, lay, softcap=softcap)


def _formula(call: AttentionCall, grad_out):
    """Out and gradients by autograd of the defining formula (independent of every implementation)."""
    hq, s_q, s_k = call.q.shape[1], call.q.shape[-2], call.k.shape[-2]
    s = (call.q @ expand_kv(call.k, hq).transpose(-2, -1)) * call.scale
    s = call.softcap * torch.tanh(s / call.softcap) + call.bias
    keep = keep_mask(call, torch.arange(s_q)[:, None], torch.arange(s_k)[None, :]) & call.mask
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    out = p @ expand_kv(call.v, hq)
    return (out, *torch.autograd.grad(out, [call.q, call.k, call.v, call.bias], grad_out))


def _impl(impl, call, grad_out):
    with torch.no_grad():
        out, lse = impl.forward(call)
        return (out, *impl.backward(call, grad_out, out, lse, True))


@pytest.mark.parametrize("name,pattern,layout,s,causal", CASES, ids=[c[0] for c in CASES])
def test_reference_and_blocked_follow_the_formula(name, pattern, layout, s, causal):
    call = _call(pattern, layout, s, causal)
    g = torch.randn(2, 4, s, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = _formula(call, g)
    for impl in (Reference(), Blocked()):
        got = _impl(impl, call, g)
        for w, a, what in zip(want, got, ["out", "dq", "dk", "dv", "dbias"]):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"{impl.name} {what}: {m}")
    uncapped = _impl(Reference(), AttentionCall(*[getattr(call, f) for f in ("q", "k", "v", "mask", "bias", "scale",
                                                                             "is_causal", "pattern", "layout")]), g)
    assert (uncapped[0] - want[0]).abs().max() > 1e-2, "the cap must matter in these cases"


def test_blocked_fp32_close_to_golden():
    call64 = _call(Neighborhood(kernel=(3, 5)), Layout(grid=(6, 9)), 54, True)
    g = torch.randn(2, 4, 54, 8, dtype=torch.float64)
    gold = _impl(Reference(), call64, g)
    f32 = AttentionCall(*(t.detach().float() for t in (call64.q, call64.k, call64.v)), call64.mask,
                        call64.bias.detach().float(), call64.scale, True, call64.pattern, call64.layout, softcap=call64.softcap)
    eager = _impl(Reference(), f32, g.float())
    for a, b, e in zip(_impl(Blocked(), f32, g.float()), gold, eager):
        assert_close_to_golden(a, b, e)


def test_cpu_declines_and_dispatch_falls_back_counted():
    call = _call(Dense(), Layout(), 20, False, dtype=torch.float32)
    ok, why = registry.get("cpu").can_run(call)
    assert not ok and "score modifier" in why
    locattn.reset_counters()
    assert registry.select(call).name == "blocked"
    assert any("skip cpu: softcap" in k for k in locattn.counters()["dispatch"])


def test_op_end_to_end_and_spec_strings():
    spec = SiteSpec((HeadGroup(None, SlidingWindow(window=3), Layout()),), softcap=2.5)
    plain = SiteSpec((HeadGroup(None, SlidingWindow(window=3), Layout()),))
    assert '"softcap":2.5' in spec.to_json() and "softcap" not in plain.to_json()   # old spec strings unchanged
    assert parse_spec(spec.to_json()) == spec and parse_spec(plain.to_json()).softcap == 0.0
    assert spec.describe() == "sliding_window(window=3) [softcap=2.5]"
    with pytest.raises(ValueError, match="softcap"):
        SiteSpec(plain.groups, softcap=-1.0)
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64) * 3 for _ in range(3))
    out, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.5, True, spec.to_json(), "")
    ref = Reference().forward(AttentionCall(q, k, v, None, None, 0.5, True, SlidingWindow(window=3),
                                            Layout().resolve(24), softcap=2.5))
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(lse, ref[1])
    torch.library.opcheck(torch.ops.locattn.attention.default, (q.float(), k.float(), v.float(), None, None, 0.5,
                                                                True, spec.to_json(), ""))
