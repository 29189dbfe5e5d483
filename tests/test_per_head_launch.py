"""Per-head rules of one site run as one launch of each Triton kernel (per-head-group tables, no gather / scatter
of heads), checked under the interpreter against the reference; groups that cannot share a launch run one by
one, with the reason."""

import pytest
import torch

import locattn
from locattn.codegen.registry import AttentionCall
from locattn.patterns import Dense, Layout, Neighborhood, SlidingWindow, Tiled
from locattn.patterns.spec import HeadGroup, SiteSpec


@pytest.fixture
def interpret(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the Triton kernels run under the interpreter on CPU only")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from locattn.codegen.triton_impl import interpreted
    if not interpreted():
        pytest.skip("the kernels were built without the interpreter in this process")


CASES = [
    # id, groups, hq, hk, s, site causal
    ("1d-window-na-dense-gqa-split",
     ((0, 1, 4), SlidingWindow(window=5), Layout(sinks=3)), ((2, 5), Neighborhood(kernel=9), Layout(sinks=3)),
     ((3,), Dense(), Layout()), 6, 3, 100, False),
    ("2d-globals-causal",
     ((0, 2), Neighborhood(kernel=(3, 3)), Layout(grid=(9, 10), prefix=2)),
     ((1, 3), Tiled(tile=(3, 3), window=(1, 2)), Layout(grid=(9, 10), prefix=2)), None, 4, 2, 92, True),
]


def _run(spec, q, k, v, causal, impl, go):
    out, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.3, causal, spec.to_json(), impl)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_per_head_groups_run_in_one_launch(interpret, case):
    _, *groups, hq, hk, s, causal = case
    spec = SiteSpec(tuple(HeadGroup(*g) for g in groups if g is not None))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, hq, s, 24, generator=g, requires_grad=True)
    k = torch.randn(2, hk, s, 24, generator=g, requires_grad=True)
    v = torch.randn(2, hk, s, 16, generator=g, requires_grad=True)
    go = torch.randn(2, hq, s, 16, generator=g)
    want = _run(spec, q, k, v, causal, "reference", go)
    locattn.reset_counters()
    got = _run(spec, q, k, v, causal, "triton", go)
    c = locattn.counters()
    assert c["triton_launch"] == {"fwd": 1, "dq": 1, "dkdv": 1}
    assert c["dispatch"] == {"triton (per-head groups, one call)": 2}
    assert "kv_repeated" not in c  # GQA kept: no kv head copied for a group that splits GQA groups
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_groups_on_different_layouts_run_one_by_one(interpret):
    from locattn.codegen.triton_impl import Triton
    spec = SiteSpec((HeadGroup((0,), SlidingWindow(window=5), Layout(sinks=3)),
                     HeadGroup((1,), SlidingWindow(window=5), Layout())))
    q = torch.randn(1, 2, 64, 16)
    groups = tuple((g.heads, g.pattern, g.layout.resolve(64)) for g in spec.groups)
    call = AttentionCall(q, q, q, None, None, 0.3, False, groups[0][1], groups[0][2], head_groups=groups)
    ok, why = Triton().can_run(call)
    assert not ok and "different layouts" in why
    locattn.reset_counters()
    out, _ = torch.ops.locattn.attention(q, q, q, None, None, 0.3, False, spec.to_json(), "triton")
    assert locattn.counters()["triton_launch"] == {"fwd": 2}
    ref, _ = torch.ops.locattn.attention(q, q, q, None, None, 0.3, False, spec.to_json(), "reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
