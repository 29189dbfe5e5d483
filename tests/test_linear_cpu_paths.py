"""The CPU hybrid's fast paths against the fp64 reference, forward and backward: the non-causal 1-D ``outside``
sums (every key but the window, one state per block of rows), the slicing of the linear part into (batch,
kv-head group) slices, the softmax part's gradients taking the slices' in place, and the two-level prefix scan.
"""

import pytest
import torch

from locattn.codegen.linear import intervals
from locattn.codegen.linear.chunked import LinearChunked
from locattn.patterns import Layout, SlidingWindow

from linear_golden import Case, check

OUTSIDE = [
    # s a multiple of the chunk: interior runs of step 1 (strided state views, disjoint key windows)
    Case("out-aligned-sinks-gqa", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=32),
         layout=Layout(sinks=2), s=192, hq=4, hk=2),
    Case("out-ragged-keys", kind="hybrid", pattern=SlidingWindow(window=21), s=150, mask="keys", b=2),
    Case("out-dilated-headmask", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=5, dilation=3),
         s=100, mask="heads", hq=4, hk=2),
    Case("out-window>=S", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=300), s=90),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", OUTSIDE, ids=lambda c: c.id)
@pytest.mark.parametrize("outside", [True, False], ids=["outside", "all-minus-window"])
def test_noncausal_outside_sums(case, outside, dtype):
    impl = LinearChunked(chunk=16, outside=outside)
    call = case.call(dtype=dtype)
    assert impl.sums._direct(call)[1] == ("outside" if outside else "")
    check(impl, call)


SLICED = [
    Case("sl-lin-favor-causal-gqa", feature_map="favor", causal=True, hq=4, hk=2, b=2, s=75, dv=24),
    Case("sl-lin-elu-keys", mask="keys", hq=4, hk=4, b=2),
    Case("sl-hyb-sinks-gqa", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=6),
         layout=Layout(sinks=3), hq=6, hk=3, b=2, s=70),
    Case("sl-hyb-headmask-causal", kind="hybrid", feature_map="favor", pattern=SlidingWindow(window=6),
         mask="heads", hq=4, hk=2, causal=True),
]


@pytest.mark.parametrize("case", SLICED, ids=lambda c: c.id)
def test_sliced_linear_part(case):
    """slice_rows below one head's rows: one slice per (batch, kv head), reassembled into the op's tensors."""
    impl = LinearChunked(chunk=16)
    impl.slice_rows = 1
    call = case.call()
    assert len(list(impl._slices(call))) == call.q.shape[0] * call.k.shape[1]
    check(impl, call)
    impl.slice_rows = None
    assert len(list(impl._slices(call))) == 1


@pytest.mark.parametrize("n", [5, 33, 40, 100, 257])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_prefix_sum_two_levels(n, reverse):
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    want = x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
    torch.testing.assert_close(intervals.prefix_sum_(x.clone(), 2, reverse), want)
