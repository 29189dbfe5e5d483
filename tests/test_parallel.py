"""Sequence parallelism on 2 and 4 gloo processes: every rank's result equals the single-process one.

One spawn per group size runs every case (processes cost seconds to start and import torch; the cases cost
little), each rank comparing against the single-process result it computes itself, in float64:

* op level, one case per pattern family: ``sp_attention`` forward and backward (dq, dk, dv) equal
  ``locattn::attention`` on the whole sequence, and the bytes each rank sends equal the plan's prediction;
* model level: small models compiled with ``sequence_parallel`` (a DiT-like 2-D model, text tokens as
  globals, a diffusers DiT) give the single-process output, input gradients and parameter gradients;
* refusals (a reduction over tokens, a pooling over the grid between two sites) give their reason on every
  rank and the model still runs (unsharded); bad input (a group larger than the axis, inputs that differ
  across ranks in debug mode) raises the same error on every rank, without a hang.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from locattn.parallel.launch import run as run_spmd

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


# ------------------------------------------------------------------------------------------------ models


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(o.transpose(1, 2).reshape(b, s, c))
        return x + self.ff(x)


class CausalLM(nn.Module):
    """Token ids -> embedding -> two causal blocks -> logits: a 1-D sequence sharded from its input ids."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, causal=True) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, scale):
        x = self.emb(ids) * scale
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


CAUSAL_POLICY = {"version": 1, "default": {"pattern": "sliding_window", "window": 5, "causal": True}}


class Toy(nn.Module):
    """Patch embedding (+ a learned positional table), ``n_text`` text tokens in front (globals), two blocks,
    the text cut off, a projection and an unpatchify. ``mix`` puts a token mixer between the blocks."""

    def __init__(self, n_text: int = 0, mix: str | None = None, dim: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(4, dim, 2, stride=2)
        self.txt = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, 48, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.proj = nn.Linear(dim, 16)
        self.n_text, self.mix = n_text, mix

    def forward(self, img, text):
        b = img.shape[0]
        x = self.embed(img).flatten(2).transpose(1, 2) + self.pos
        if self.n_text:
            x = torch.cat([self.txt(text), x], 1)
        x = self.blocks[0](x)
        if self.mix == "mean":
            x = x + x.mean(1, keepdim=True)
        elif self.mix == "pool":
            t = self.n_text
            g = x[:, t:].transpose(1, 2).reshape(b, -1, 8, 6)
            x = torch.cat([x[:, :t], F.avg_pool2d(g, 3, 1, 1).flatten(2).transpose(1, 2)], 1)
        for blk in self.blocks[1:]:
            x = blk(x)
        y = self.proj(x[:, self.n_text:])
        if self.n_text:  # the whole sequence gathered (a mean over every token), text tokens leaving the region
            y = y + x.mean(1, keepdim=True) * x[:, :self.n_text].sum()
        return y.view(b, 8, 6, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, 4, 16, 12)


def _toy_policy(n_text: int) -> dict:
    rule = {"pattern": "neighborhood", "kernel": [3, 3], "grid": [8, 6]}
    if n_text:
        rule["globals"] = {"prefix": n_text}
    return {"version": 1, "default": rule}


# ------------------------------------------------------------------------------------------------ op cases


def _op_cases():
    from locattn.patterns import Dense, Neighborhood, ShiftedWindow, SlidingWindow, Strided, Tiled

    # name: (pattern, grid, axis, prefix, suffix, sinks, site causal, Hq, Hk, overlap)
    return {
        "1d-window-gqa": (SlidingWindow(window=5), (37,), 0, 0, 0, 0, False, 4, 2, False),
        "1d-causal-dilated": (SlidingWindow(window=6, dilation=2, causal=True), (41,), 0, 0, 0, 0, True, 2, 2, False),
        "1d-causal-globals": (Neighborhood(kernel=5, causal=True), (30,), 0, 2, 2, 0, True, 2, 2, False),
        "2d-neighborhood-dilated-globals": (Neighborhood(kernel=(3, 5), dilation=(2, 1)), (13, 9), 0, 2, 3, 0, False,
                                            2, 1, False),
        "2d-tiled-axis1-text": (Tiled(tile=(2, 3), window=(3, 2)), (11, 12), 1, 0, 4, 0, False, 2, 2, False),
        "2d-shifted-window": (ShiftedWindow(window=(4, 3), shift=(2, 1)), (10, 7), 0, 0, 0, 0, False, 2, 2, False),
        "3d-neighborhood": (Neighborhood(kernel=(3, 3, 3)), (9, 4, 5), 0, 0, 0, 0, False, 2, 2, False),
        "3d-strided-globals": (Strided(kernel=(5, 3, 3), stride=(2, 1, 3)), (12, 4, 5), 0, 1, 0, 0, False, 2, 2,
                               False),
        "sinks": (Neighborhood(kernel=3), (20, 3), 0, 1, 0, 3, False, 2, 2, False),
        "far-halo": (Neighborhood(kernel=(7, 3)), (8, 3), 0, 0, 0, 0, False, 2, 2, False),
        "dense-globals": (Dense(), (9, 4), 0, 2, 1, 0, False, 2, 2, False),
        "dense-causal": (Dense(), (16,), 0, 0, 0, 0, True, 2, 2, False),
        "overlap-globals": (SlidingWindow(window=2), (37,), 0, 1, 1, 0, False, 2, 2, True),
    }


def _run_op_case(rank, world, name, case):
    import torch.distributed as dist

    import locattn
    from locattn.parallel.ops import shard_local
    from locattn.parallel.planner import make_sharding, plan_attention, site_traffic
    from locattn.parallel.sharding import TokenPlan, to_json
    from locattn.patterns import Layout
    from locattn.patterns.spec import HeadGroup, SiteSpec

    pattern, grid, axis, prefix, suffix, sinks, causal, hq, hk, overlap = case
    torch.manual_seed(0)
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks)
    s = layout.seq_len
    spec = SiteSpec((HeadGroup(None, pattern, layout),)).to_json()
    q, k, v = (torch.randn(2, h, s, d, dtype=torch.float64, requires_grad=True) for h, d in ((hq, 8), (hk, 8), (hk, 6)))
    gout = torch.randn(2, hq, s, 6, dtype=torch.float64)
    ref, _ = torch.ops.locattn.attention(q, k, v, None, None, 0.3, causal, spec, "reference")
    ref.backward(gout)
    sh = make_sharding(grid, axis, world, "", rank)
    plan = plan_attention(SiteSpec((HeadGroup(None, pattern, layout),)), sh, prefix, suffix, overlap=overlap,
                          label=name)
    assert not isinstance(plan, str), plan
    tp = TokenPlan(sh, 2, prefix, suffix)
    ql, kl, vl = (shard_local(t.detach(), tp).requires_grad_() for t in (q, k, v))
    args = (0.3, causal, spec, "reference", to_json(plan))
    locattn.reset_counters()
    with torch.no_grad():
        torch.ops.locattn.sp_attention(ql, kl, vl, *args)
    sent = sum(n for key, n in locattn.counters().get("sp_bytes", {}).items() if key.startswith(name))
    predicted = site_traffic(plan, 2, hq, hk, 8, 6, 8, rank=rank).halo
    out = torch.ops.locattn.sp_attention(ql, kl, vl, *args)[0]
    # the global rows are replicated: downstream each rank holds 1/world of their gradient (ops.py)
    go = shard_local(gout, tp)
    go[:, :, :prefix] /= world
    go[:, :, go.shape[2] - suffix:] /= world
    out.backward(go)
    errs = {"out": float((out.detach() - shard_local(ref.detach(), tp)).abs().max())}
    for nm, local, whole in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        g = local.grad.clone()
        if prefix + suffix:  # partial on each rank: summed, as sp_shard's backward does
            glob = torch.cat([g[:, :, :prefix], g[:, :, g.shape[2] - suffix:]], 2).contiguous()
            dist.all_reduce(glob)
            g[:, :, :prefix], g[:, :, g.shape[2] - suffix:] = glob[:, :, :prefix], glob[:, :, prefix:]
        errs[nm] = float((g - shard_local(whole.grad, tp)).abs().max())
    hops = max([abs(p - rank) for p in plan.peers(rank)[0]], default=0)
    return {"errs": errs, "sent": sent, "predicted": predicted, "hops": hops,
            "pieces": len(plan.pieces(rank)), "dense": plan.dense}


# ------------------------------------------------------------------------------------------------ model cases


def _compare_model(model, inputs, policy, sp, inductor=False, kwargs=False):
    """Single-process vs sequence-parallel compile of ``model``: max errors of the output, the inputs' and the
    parameters' gradients (relative to the largest gradient), the report, warnings."""
    import locattn

    ref_m = copy.deepcopy(model)
    ref = torch.compile(ref_m, backend=locattn.backend(policy=policy, inductor=False))
    b = locattn.backend(policy=policy, inductor=inductor, sequence_parallel=sp)
    cm = torch.compile(model, backend=b)

    def run(fn, leaves):
        xs = {k: (t.clone().requires_grad_() if t.is_floating_point() else t) for k, t in inputs.items()}
        y = fn(**xs) if kwargs else fn(*xs.values())
        y = y.sample if hasattr(y, "sample") else y
        y.square().sum().backward()
        return y.detach(), {k: t.grad for k, t in xs.items() if t.grad is not None}

    y_ref, g_ref = run(ref, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, g = run(cm, None)
    errs = {"out": float((y - y_ref).abs().max()) / max(1.0, float(y_ref.abs().max()))}
    scale = max(float(t.abs().max()) for t in list(g_ref.values()) +
                [p.grad for p in ref_m.parameters() if p.grad is not None])
    for k in g_ref:
        errs["d" + k] = float((g[k] - g_ref[k]).abs().max()) / scale
    for (n1, p1), (_, p2) in zip(model.named_parameters(), ref_m.named_parameters()):
        if p2.grad is not None:
            errs[n1] = float((p1.grad - p2.grad).abs().max()) / scale
    rep = b.parallel_reports[0]
    return {"errs": errs, "applied": rep.applied, "reason": rep.reason, "describe": rep.describe(),
            "warnings": [str(w.message) for w in caught]}


def _toy_inputs():
    return {"img": torch.randn(2, 4, 16, 12, dtype=torch.float64), "text": torch.randn(2, 3, 8, dtype=torch.float64)}


def _dit_case():
    import diffusers as D

    torch.manual_seed(0)
    m = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                sample_size=16, patch_size=2, norm_num_groups=4).eval().double()
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16, dtype=torch.float64), "timestep": torch.tensor([3, 5]),
              "class_labels": torch.tensor([1, 2])}
    policy = {"version": 1, "default": {"pattern": "neighborhood", "kernel": [3, 3], "grid": "auto"}}
    return _compare_model(m, inputs, policy, {}, kwargs=True)


def _suite(rank, world, which):
    """Every case of one group size, on one rank."""
    from locattn.parallel import SequenceParallelError

    torch.manual_seed(0)
    out = {"ops": {}, "models": {}}
    for name, case in _op_cases().items():
        out["ops"][name] = _run_op_case(rank, world, name, case)
    for name, (n_text, mix) in {"toy": (0, None), "toy-text-globals": (3, None), "refuse-mean": (3, "mean"),
                                "refuse-pool": (0, "pool")}.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        out["models"][name] = _compare_model(Toy(n_text, mix).double(), _toy_inputs(), _toy_policy(n_text), {})
    torch._dynamo.reset()
    torch.manual_seed(0)
    out["models"]["causal-1d"] = _compare_model(CausalLM().double(), {"ids": torch.randint(0, 50, (2, 29)),
                                                "scale": torch.tensor(1.5, dtype=torch.float64)}, CAUSAL_POLICY, {})
    if "inductor" in which:
        torch._dynamo.reset()
        torch.manual_seed(0)
        out["models"]["toy-inductor"] = _compare_model(Toy(3, layers=1).double(), _toy_inputs(), _toy_policy(3), {},
                                                       inductor=True)
    if "dit" in which and HAVE_DIFFUSERS:
        torch._dynamo.reset()
        out["models"]["diffusers-dit"] = _dit_case()
    if world == 4:  # two groups of two ranks each, sharding independently
        import torch.distributed as dist

        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        torch._dynamo.reset()
        torch.manual_seed(0)
        out["models"]["subgroup"] = _compare_model(Toy(3).double(), _toy_inputs(), _toy_policy(3),
                                                   {"group": pairs[rank // 2]})
    # bad input: inputs that differ across ranks (debug mode)
    torch._dynamo.reset()
    torch.manual_seed(0)
    inputs = _toy_inputs()
    inputs["img"] = inputs["img"] + rank
    try:
        _compare_model(Toy().double(), inputs, _toy_policy(0), {"debug": True})
        out["differ"] = "no error"
    except Exception as e:  # noqa: BLE001
        out["differ"] = f"{type(e).__name__}: {e}"
    # bad input: a group larger than the sharded axis (a 3-row grid)
    if world > 3:
        torch._dynamo.reset()
        import locattn

        m = Toy().double()
        b = locattn.backend(policy={"version": 1, "default": {"pattern": "neighborhood", "kernel": 3, "grid": [3, 16]}},
                            inductor=False, sequence_parallel={})
        try:
            torch.compile(m.blocks[0], backend=b)(torch.randn(1, 48, 16, dtype=torch.float64))
            out["too-many-ranks"] = "no error"
        except Exception as e:  # noqa: BLE001
            out["too-many-ranks"] = f"{type(e).__name__}: {e}"
        assert SequenceParallelError
    return out


_RESULTS: dict[int, list] = {}


def _results(world: int):
    if world not in _RESULTS:
        which = ("inductor", "dit") if world == 2 else ("dit",)
        _RESULTS[world] = run_spmd(_suite, world, which, timeout=600)
    return _RESULTS[world]


WORLDS = [2, 4]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(_op_cases()))
def test_op_equals_single_process(world, name):
    for rank, res in enumerate(_results(world)):
        r = res["ops"][name]
        bad = {k: v for k, v in r["errs"].items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_sent_equal_the_plan(world):
    for rank, res in enumerate(_results(world)):
        for name, r in res["ops"].items():
            assert r["sent"] == r["predicted"], (rank, name, r["sent"], r["predicted"])
    # the rows really travel: every rank sends something in a halo case, a 7-kernel on 2-row shards reaches
    # two ranks away, the overlap case computes its interior first
    res = _results(world)
    assert all(r["ops"]["2d-neighborhood-dilated-globals"]["sent"] > 0 for r in res)
    if world == 4:
        assert max(r["ops"]["far-halo"]["hops"] for r in res) >= 2
    assert max(r["ops"]["overlap-globals"]["pieces"] for r in res) >= 2


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["toy", "toy-text-globals", "causal-1d", "subgroup", "toy-inductor",
                                  "diffusers-dit"])
def test_model_equals_single_process(world, name):
    if name == "diffusers-dit" and not HAVE_DIFFUSERS:
        pytest.skip("needs diffusers")
    for rank, res in enumerate(_results(world)):
        if name not in res["models"]:
            pytest.skip(f"{name} runs in the {'4' if name == 'subgroup' else '2'}-rank suite only")
        r = res["models"][name]
        assert r["applied"], r["reason"]
        bad = {k: v for k, v in r["errs"].items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}\n{r['describe']}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name, why", [("refuse-mean", "reduces over the token axis"),
                                       ("refuse-pool", "merges or splits the token axis")])
def test_refusal_gives_its_reason_on_every_rank(world, name, why):
    for res in _results(world):
        r = res["models"][name]
        assert not r["applied"] and why in r["reason"]
        assert any(why in w for w in r["warnings"])
        assert max(r["errs"].values()) <= 1e-12   # and the model runs, unsharded


@pytest.mark.parametrize("world", WORLDS)
def test_inputs_differing_across_ranks_raise_on_every_rank(world):
    for res in _results(world):
        assert "SequenceParallelError" in res["differ"] and "l_img_" in res["differ"], res["differ"]


def test_group_larger_than_the_axis_raises_on_every_rank():
    for res in _results(4):
        assert "4 ranks but axis 0" in res["too-many-ranks"] and "only 3 rows" in res["too-many-ranks"], \
            res["too-many-ranks"]


def test_explain_plans_without_a_group():
    import locattn

    torch.manual_seed(0)
    rep = locattn.explain(Toy(3).double(), *_toy_inputs().values(), policy=_toy_policy(3),
                          sequence_parallel={"world_size": 4})
    text = str(rep)
    assert "sequence parallel over 4 ranks: grid 8x6, axis 0" in text and "vs all-gather" in text
    p = rep.parallel[0]
    assert p.applied and not p.live and len(p.sites) == 2
    assert all(s.traffic.halo < s.traffic.all_gather for s in p.sites)
    assert '"sequence_parallel"' in rep.to_json()
    rep = locattn.explain(Toy(0, "mean").double(), *_toy_inputs().values(), policy=_toy_policy(0),
                          sequence_parallel={"world_size": 2})
    assert "not applied" in str(rep) and "reduces over the token axis" in str(rep)


def test_cut_spec_keeps_the_sites_softcap():
    """The halo-cut spec a rank runs keeps the site's score modifier (it used to drop it: a soft-capped site ran
    uncapped on every rank)."""
    import json

    from locattn.parallel.attention import cut_spec
    from locattn.parallel.planner import make_sharding, plan_attention
    from locattn.parallel.sharding import to_json
    from locattn.patterns import Layout, SlidingWindow
    from locattn.patterns.spec import HeadGroup, SiteSpec, parse_spec

    spec = SiteSpec((HeadGroup(None, SlidingWindow(window=2), Layout(grid=(16,))),), softcap=5.0)
    plan = plan_attention(spec, make_sharding((16,), 0, 2, "", 0), 0, 0)
    assert not isinstance(plan, str), plan
    cut = parse_spec(cut_spec(spec.to_json(), to_json(plan), 0, 10))
    assert cut.softcap == 5.0 and json.loads(cut.to_json())["softcap"] == 5.0


def test_linear_and_hybrid_sites_are_not_sharded():
    """A linear / hybrid group sums over every key, which a shard's halo does not hold: refused with the reason."""
    import locattn
    from locattn.parallel.planner import make_sharding, plan_attention
    from locattn.patterns import Dense, Layout, SlidingWindow
    from locattn.patterns.mechanism import Mechanism
    from locattn.patterns.spec import HeadGroup, SiteSpec

    sh = make_sharding((16,), 0, 2, "", 0)
    for pattern, kind in ((Dense(), "linear"), (SlidingWindow(window=2), "hybrid")):
        lay = Layout(grid=(16,)) if pattern.local else Layout()
        spec = SiteSpec((HeadGroup(None, pattern, lay, Mechanism(kind, "elu")),))
        why = plan_attention(spec, sh, 0, 0)
        assert isinstance(why, str) and f"a {kind} mechanism sums over every key" in why, why
    policy = {"version": 1, "default": {**_toy_policy(0)["default"], "mechanism": "hybrid", "feature_map": "elu"}}
    rep = locattn.explain(Toy(0).double(), *_toy_inputs().values(), policy=policy,
                          sequence_parallel={"world_size": 2})
    assert rep.parallel and not rep.parallel[0].applied and "hybrid mechanism" in rep.parallel[0].reason
