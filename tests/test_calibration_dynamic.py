"""Calibration with ``dynamic`` candidates (issue 15 on issue 14's pattern): the scores of a content-dependent
candidate equal the op's own output on the same tensors, a calibration picks ``dynamic`` on a head whose
attention no static window captures (and a static window on a local head of the same site), and the written
per-head policy round-trips, compiles and runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn.calibration import calibrate_with_report
from locattn.calibration import candidates as C
from locattn.calibration import scoring
from locattn.calibration.candidates import Candidate, DynamicCandidate, SiteShape, candidates_for
from locattn.calibration.cost import block_cost, dynamic_block_cost, spec_json
from locattn.calibration.scoring import SiteStats, score
from locattn.codegen.registry import AttentionCall
from locattn.patterns import Dense, Layout
from locattn.patterns.spec import DENSE_SPEC


def test_dynamic_family_levels():
    lm = [c for c in candidates_for(SiteShape(2048, None, 0, 0, True, True)) if c.family == "dynamic"]
    assert [c.pattern.top_p for c in lm] == list(C.TOP_P)
    for c in lm:
        assert isinstance(c, DynamicCandidate) and not c.static
        assert c.pattern.block == 64 and c.pattern.causal and c.layout.sinks == 4
        assert c.pattern.base.describe() == "sliding_window(window=64, causal=True)"
    grid = [c for c in candidates_for(SiteShape(1024 + 1, (32, 32), 1, 0, False, True)) if c.family == "dynamic"]
    assert grid and all(c.pattern.tile == (8, 8) and c.pattern.base is None and not c.pattern.causal and
                        c.layout.grid == (32, 32) and c.layout.prefix == 1 for c in grid)
    # two blocks or fewer: nothing to select
    assert not [c for c in candidates_for(SiteShape(128, None, 0, 0, True, True)) if c.family == "dynamic"]


def _clustered(b, h, s, d, block, seed):
    """q / k whose blocks share random directions (strong, content-dependent block structure), fp64."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // block)
    topic = torch.randn(b, h, nb, d, generator=g, dtype=torch.float64)
    pick = torch.randint(0, nb, (b, h, nb), generator=g)
    k_top = torch.gather(topic, 2, pick[..., None].expand(-1, -1, -1, d))
    q = 2 * topic.repeat_interleave(block, 2)[:, :, :s] + torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k = 2 * k_top.repeat_interleave(block, 2)[:, :, :s] + torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    return q, k


@pytest.mark.parametrize("causal", [True, False])
def test_dynamic_scores_equal_the_op(causal, monkeypatch):
    """The scored error, gradient proxy, mass and scores kept of ``dynamic`` candidates (per batch element and
    head, GQA, a site mask) equal ``torch.ops.locattn.attention`` with the candidate's spec on the same q / k / v;
    rows are scored in several chunks."""
    monkeypatch.setattr(scoring, "CHUNK_ELEMS", 3 * 4 * 2 * 200)    # 3 rows per chunk
    b, hq, hk, s, d = 2, 4, 2, 200, 16
    q, _ = _clustered(b, hq, s, d, 16, seed=1)
    _, k = _clustered(b, hk, s, d, 16, seed=1)
    v = torch.randn(b, hk, s, d, dtype=torch.float64)
    mask = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(2)) > 0.1
    site = SiteShape(s, None, 0, 0, causal, True)
    base = {"pattern": "sliding_window", "window": 8, "causal": causal}
    cands = [Candidate.make(site, "dense", {}),
             Candidate.make(site, "dynamic", {"block": 16, "top_p": 0.5, "causal": causal, "base": base}, sinks=2),
             Candidate.make(site, "dynamic", {"block": 32, "top_p": 0.8, "max_blocks": 3})]
    assert all(isinstance(c, DynamicCandidate) for c in cands[1:])
    rows = torch.tensor([0, 5, 17, 31, 32, 100, 150, 199])
    gw = torch.randn(b, hq, rows.numel(), d, dtype=torch.float64)
    stats = SiteStats(hq, len(cands))
    score(AttentionCall(q, k, v, mask, None, 0.3, causal, Dense(), Layout()), cands, stats, rows, weights=gw)

    def op(c):
        spec = DENSE_SPEC.to_json() if c.is_dense else spec_json(c)
        o, lse = torch.ops.locattn.attention(q, k, v, mask, None, 0.3, causal, spec, "reference")
        return o[:, :, rows], lse[:, :, rows]

    o_d, l_d = op(cands[0])
    for j, c in enumerate(cands[1:], 1):
        o_c, l_c = op(c)
        share = ((o_c - o_d) ** 2).sum((0, 2, 3)) / (o_d ** 2).sum()
        torch.testing.assert_close(stats.error()[:, j], share, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.grad_error()[:, j], ((gw * (o_c - o_d)).sum(-1) ** 2).sum((0, 2)),
                                   rtol=1e-9, atol=1e-12)
        mass = torch.exp(l_c - l_d).nan_to_num(1.0).mean((0, 2))
        torch.testing.assert_close(stats.mass_kept()[:, j], mass, rtol=1e-9, atol=1e-12)
        # scores kept: with v = the identity the op's output rows are its probabilities, nonzero on its kept keys
        eye = torch.eye(s, dtype=torch.float64).expand(b, hk, s, s)
        probs, _ = torch.ops.locattn.attention(q, k, eye, mask, None, 0.3, causal, spec_json(c), "reference")
        torch.testing.assert_close(stats.kept[:, j], (probs[:, :, rows] > 0).sum((0, 2, 3)).double(), rtol=0, atol=0)
        assert bool((stats.error()[:, j] > 0).all()) and bool((stats.kept_fraction()[:, j] < 0.9).all())
    # the selection is per head: heads keep different numbers of scores
    assert len(set(stats.kept[:, 1].tolist())) > 1


class Retrieval(nn.Module):
    """One causal attention site, 2 heads of dim 16 whose q = k are the input's channels: head 0 retrieves far
    blocks by content (:func:`retrieval_sample`), head 1 attends its neighbours (positional features)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.v = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        qk = x.view(b, s, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, c // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(qk, qk, v, is_causal=True).transpose(1, 2).reshape(b, s, c)


def retrieval_sample(g, s=1024, block=64):
    """Head 0: every 64-token block has its own orthonormal topic, except that the last two blocks repeat the
    first two's, in a random order per sample: their queries attend ~half their mass 896+ tokens back, in a
    block only the content tells. Head 1: cos / sin positional features (sharply local attention)."""
    nb = s // block
    topics = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:nb]
    topics[nb - 2:] = topics[torch.randperm(2, generator=g)]
    head0 = 8.0 * topics.repeat_interleave(block, 0) + 0.3 * torch.randn(s, 16, generator=g)
    pos = torch.arange(s, dtype=torch.float32)[:, None]
    w = 0.6 * 0.7 ** torch.arange(8, dtype=torch.float32)[None]
    head1 = 3.0 * torch.cat([torch.cos(w * pos), torch.sin(w * pos)], 1)
    return (torch.cat([head0, head1], 1)[None],)


def test_calibration_picks_dynamic_where_no_static_window_meets_the_budget(tmp_path):
    budget = 0.05
    g = torch.Generator().manual_seed(0)
    samples = [retrieval_sample(g) for _ in range(4)]
    torch.manual_seed(0)
    model = Retrieval().eval()
    static = [f for f in C.FAMILIES if f is not C.dynamic]
    # without dynamic candidates, head 0 stays dense: no static window reaches its partner block
    cal = calibrate_with_report(model, samples, budget=budget, cost="blocks", candidates=static, progress=False)
    assert [r.heads for r in cal.policy.rules] == [(1,)] and cal.policy.rules[0].pattern.name != "dynamic"
    # with them (the default families), head 0 gets a dynamic level and head 1 keeps its cheaper static window
    cal = calibrate_with_report(model, samples, budget=budget, cost="blocks", progress=False)
    rules = {r.heads: r for r in cal.policy.rules}
    assert set(rules) == {(0,), (1,)}
    assert rules[(0,)].pattern.name == "dynamic" and rules[(0,)].pattern.top_p in C.TOP_P
    assert rules[(0,)].sinks == 4 and rules[(0,)].pattern.base.window == 64
    assert rules[(1,)].pattern.name in ("sliding_window", "tiled", "strided")
    assert cal.report.holdout_error <= budget

    # the written TOML round-trips, compiles, and the op runs the per-head policy: head 0 as the dynamic pattern
    # alone would select on that head, head 1 as the window
    path = tmp_path / "p.toml"
    path.write_text(cal.policy.to_toml())
    loaded = locattn.Policy.load(path)
    assert loaded == cal.policy and loaded.fingerprint() == cal.policy.fingerprint()
    compiled = torch.compile(model, backend="locattn", options={"policy": str(path)})
    x = retrieval_sample(torch.Generator().manual_seed(7))[0]
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert locattn.counters()["rewrite"]["sdpa"] == 1
    assert float((out - ref).norm() / ref.norm()) <= budget
    b, s, c = x.shape
    qk = x.view(b, s, 2, 16).transpose(1, 2)
    with torch.no_grad():
        v = model.v(x).view(b, s, 2, 16).transpose(1, 2)
    site = SiteShape(s, None, 0, 0, True, True)
    want = []
    for h in (0, 1):
        r = rules[(h,)]
        cand = Candidate.make(site, r.pattern.name, r.pattern.to_params(), sinks=r.sinks)
        o, _ = torch.ops.locattn.attention(qk, qk, v, None, None, 0.25, True, spec_json(cand), "")
        want.append(o[:, h])                      # [B, S, D]
    want = torch.stack(want, 2).reshape(b, s, c)   # [B, S, H, D] -> the model's [B, S, C]
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    # the dynamic level's block count measured on this input: below dense's on the retrieval head (diagonal, base
    # window and sink blocks are partial, 2x), and content-dependent (the local head keeps more far blocks)
    dyn = Candidate.make(site, "dynamic", rules[(0,)].pattern.to_params(), sinks=4)
    per_head = [dynamic_block_cost(dyn, qk[:, h:h + 1], qk[:, h:h + 1], v[:, h:h + 1], 0.25, True) for h in (0, 1)]
    assert per_head[0] < 0.65 * block_cost(Candidate.make(site, "dense", {}), s, s, True) < per_head[1]


def test_softcap_site_scores_equal_the_op():
    """A soft-capped site (Gemma 2) is scored with its cap: candidates' errors and mass equal the op with the
    site's softcap, against the capped dense reference (without it the scores measured another attention)."""
    from locattn.patterns.spec import SiteSpec, parse_spec

    b, h, s, d = 1, 2, 96, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    site = SiteShape(s, None, 0, 0, True, True)
    cands = [Candidate.make(site, "dense", {}), Candidate.make(site, "sliding_window", {"window": 16, "causal": True})]
    rows = torch.tensor([0, 7, 40, 95])
    stats = SiteStats(h, len(cands))
    score(AttentionCall(q, k, v, None, None, 0.4, True, Dense(), Layout(), softcap=2.0), cands, stats, rows)

    def op(c):
        spec = parse_spec(DENSE_SPEC.to_json() if c.is_dense else spec_json(c))
        capped = SiteSpec(spec.groups, softcap=2.0).to_json()
        o, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.4, True, capped, "reference")
        return o[:, :, rows], lse[:, :, rows]

    o_d, l_d = op(cands[0])
    o_c, l_c = op(cands[1])
    torch.testing.assert_close(stats.error()[:, 1], ((o_c - o_d) ** 2).sum((0, 2, 3)) / (o_d ** 2).sum(),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mass_kept()[:, 1], torch.exp(l_c - l_d).mean((0, 2)), rtol=1e-9, atol=1e-12)
