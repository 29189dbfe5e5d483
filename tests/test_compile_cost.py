"""Compile-time work is O(S) / O(blocks) per site: statistics are exact but analytic, and computed only when read.

Timings are never asserted here (``benchmarks/compile_time.py`` measures them); what is asserted is that the
rewrite does not compute statistics at all, and that the analytic counts equal brute force.
"""

from __future__ import annotations

import pytest
import torch

from locattn.passes import rewrite
from locattn.patterns import PATTERNS
from locattn.patterns.base import Layout, count_allowed, dense_mask
from locattn.policy import Policy
from locattn.testing import fake_sdpa_graph

CASES = [
    ("sliding_window", dict(window=3), (17,)), ("sliding_window", dict(window=2, dilation=3), (20,)),
    ("neighborhood", dict(kernel=(3, 5)), (7, 9)), ("neighborhood", dict(kernel=(3, 3), dilation=(2, 3)), (8, 10)),
    ("neighborhood", dict(kernel=3, causal=True), (6, 5)), ("tiled", dict(tile=(2, 3), window=(3, 1)), (6, 9)),
    ("strided", dict(kernel=(3, 3), stride=(2, 2)), (7, 8)),
    ("shifted_window", dict(window=(3, 4), shift=(1, 2)), (7, 9)),
    ("neighborhood", dict(kernel=(3, 3, 3)), (4, 5, 6)), ("neighborhood", dict(kernel=(3, 3, 3), dilation=(1, 2, 2)),
                                                          (4, 6, 7)),
]


@pytest.mark.parametrize("name,params,grid", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[2]))}" for c in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_count_allowed_equals_brute_force(name, params, grid, causal):
    pattern = PATTERNS[name](**params)
    for pre, suf, sinks in [(0, 0, 0), (2, 1, 0), (1, 0, 4), (0, 3, 7)]:
        lay = Layout(grid=grid, prefix=pre, suffix=suf, sinks=sinks)
        s = lay.seq_len
        ref = dense_mask(pattern, lay, s, s)
        if causal:
            ref = ref & torch.ones(s, s, dtype=torch.bool).tril()
        assert count_allowed(pattern, lay, s, s, causal) == int(ref.sum()), (pre, suf, sinks)


@pytest.mark.parametrize("s_q,s_k", [(5, 9), (9, 5), (7, 7)])
def test_count_allowed_dense_causal(s_q, s_k):
    ref = torch.ones(s_q, s_k, dtype=torch.bool).tril()
    assert count_allowed(PATTERNS["dense"](), Layout(), s_q, s_k, True) == int(ref.sum())


def test_rewrite_computes_no_statistics(monkeypatch):
    """A 3-D neighborhood site of 30x48x80 tokens: the rewrite decides and rewrites without building a plan or
    counting pairs (both used to run at compile time, ~10 s for this site); ``density`` is computed when read."""
    calls = []
    monkeypatch.setattr(rewrite, "_measure", lambda d, block=64: calls.append(d) or (0.5, 1, 2))
    gm = fake_sdpa_graph((1, 2, 30 * 48 * 80, 16))
    pol = Policy.from_dict({"default": {"pattern": "neighborhood", "kernel": [3, 7, 9], "grid": [30, 48, 80]}})
    (d,) = rewrite.rewrite_graph(gm, pol)
    assert d.rewritten and not calls
    assert any(n.target is torch.ops.locattn.attention.default for n in gm.graph.nodes)
    assert (d.density, d.blocks_full, d.blocks_partial) == (0.5, 1, 2) and len(calls) == 1
    assert d.density == 0.5 and len(calls) == 1          # computed once


def test_lazy_statistics_are_exact():
    gm = fake_sdpa_graph((1, 2, 6 * 7, 8), is_causal=True)
    pol = Policy.from_dict({"default": {"pattern": "neighborhood", "kernel": [3, 3], "grid": [6, 7]}})
    (d,) = rewrite.rewrite_graph(gm, pol)
    lay = Layout(grid=(6, 7))
    ref = dense_mask(PATTERNS["neighborhood"](kernel=(3, 3)), lay, 42, 42) & torch.ones(42, 42, dtype=torch.bool).tril()
    assert d.density == pytest.approx(int(ref.sum()) / 42 ** 2)
    assert (d.blocks_full, d.blocks_partial) == (0, 2)                # one partial 64x64 block per head
