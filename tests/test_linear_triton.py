"""The Triton linear / hybrid kernels (``linear_triton``) against the fp64 reference, forward and backward,
on CPU under the Triton interpreter (natively when a CUDA device is present). Small odd shapes: the
interpreter runs every program serially."""

import os

import pytest
import torch

NATIVE = torch.cuda.is_available() and os.environ.get("LOCATTN_TEST_INTERPRET") != "1"
DEVICE = torch.device("cuda" if NATIVE else "cpu")
_PREV = os.environ.get("TRITON_INTERPRET")
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import locattn.codegen.linear.triton_kernels  # noqa: F401  built now (interpreter mode without CUDA)
    import locattn.codegen.triton_kernels  # noqa: F401  the hybrid's softmax part
finally:
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV

import locattn  # noqa: E402
from locattn.codegen.linear.triton import LinearTriton  # noqa: E402
from locattn.patterns import Layout, Neighborhood, SlidingWindow  # noqa: E402

from linear_golden import Case, check  # noqa: E402
from test_graft import Attn  # noqa: E402  (a causal SDPA attention module)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not NATIVE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


CASES = [
    Case("t-lin-elu", s=37, d=24, dv=20),
    Case("t-lin-favor-causal-keys-gqa", feature_map="favor", causal=True, mask="keys", hq=4, hk=2, b=2, s=45,
         d=24, dv=20),
    Case("t-lin-relu-cross-causal", feature_map="relu", causal=True, s=29, s_k=40, d=16),
    Case("t-lin-elu-headmask-gqa", mask="heads", hq=4, hk=2, s=33, d=16),
    Case("t-hyb-favor-sw-sinks", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=5),
         layout=Layout(sinks=2), s=41, d=24, dv=20, mask="keys"),
    Case("t-hyb-favor-sw-causal-gqa", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=4),
         causal=True, hq=4, hk=2, s=50, d=16),
    Case("t-hyb-elu-na2d-globals", kind="hybrid", pattern=Neighborhood(kernel=(3, 3)),
         layout=Layout(grid=(5, 7), prefix=1, suffix=1), s=37, d=16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    impl = LinearTriton()
    call = case.call(device=DEVICE)
    assert impl.can_run(call) == (True, "")
    check(impl, call)


def test_triton_declines_what_it_cannot_run():
    impl = LinearTriton()
    call = Case("t-decline").call(device=DEVICE, dtype=torch.float64)
    assert impl.can_run(call) == (False, "dtype torch.float64 / torch.float64 is not supported (fp16, bf16, fp32)")


def test_triton_through_torch_compile():
    """A causal hybrid site compiled with the linear_triton implementation forced equals linear_chunked."""
    torch.manual_seed(0)
    model = Attn(h=2).to(DEVICE)
    x = torch.randn(1, 33, 32, device=DEVICE)
    pol = {"rule": [{"match": "*", "mechanism": "hybrid", "pattern": "sliding_window", "window": 4, "sinks": 1}]}
    outs = []
    for be in ("linear_triton", "linear_chunked" if not NATIVE else "linear_reference"):
        model.zero_grad()
        locattn.reset_counters()
        cm = torch.compile(model, backend="locattn", options={"policy": pol, "backend": be})
        y = cm(x)
        y.square().sum().backward()
        outs.append((y.detach(), model.qkv.weight.grad.clone()))
        assert locattn.counters()["dispatch"].get(be), locattn.counters()["dispatch"]
        torch._dynamo.reset()
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-4)
