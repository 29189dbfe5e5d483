"""Grafting (``locattn.graft``): a short fine-tune lowers each rewritten site's distillation loss against the
dense teacher, trains only what ``params`` names (everything else bit-identical), and refuses bad input."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn.cli import main as cli_main


class Attn(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


class Tiny(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Attn(d), Attn(d)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = h + blk(self.norm(h))
        return self.head(h)


POLICY = {"rule": [{"match": "blocks.*", "pattern": "sliding_window", "window": 3, "mechanism": "hybrid",
                    "feature_map": "favor", "features": 16}]}


def _model_and_samples():
    torch.manual_seed(0)
    return Tiny(), [torch.randn(2, 40, 8) for _ in range(4)]


@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_graft_lowers_site_loss_and_freezes_the_rest(inputs):
    model, samples = _model_and_samples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hist: list = []
    out = locattn.graft(model, POLICY, samples[:1], steps=40, lr=3e-3, progress=False, history=hist, inputs=inputs)
    assert out is model and len(hist) == 40
    assert set(hist[0]["sites"]) == {"blocks.0", "blocks.1"}
    for site in ("blocks.0", "blocks.1"):
        assert hist[-1]["sites"][site] < 0.5 * hist[0]["sites"][site], (site, hist[0], hist[-1])
    after = model.state_dict()
    for name, v in before.items():
        if name.startswith("blocks."):
            assert not torch.equal(after[name], v), f"{name} did not train"
        else:
            assert torch.equal(after[name], v), f"{name} changed but params='attention'"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training  # mode restored (Tiny() starts in training mode)


def test_graft_all_params_and_output_loss(tmp_path):
    model, samples = _model_and_samples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist: list = []
    path = tmp_path / "g.pt"
    locattn.graft(model, POLICY, iter(samples), steps=10, lr=1e-3, params="all", progress=False, output_weight=1.0,
                  inputs="student", history=hist, save=str(path))
    assert len(hist) == 4  # a one-shot iterator: stops when the samples run out
    assert hist[0]["output"] is not None
    assert not torch.equal(model.embed.weight, before["embed.weight"])
    saved = torch.load(path)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=-3), "steps must be an integer >= 1"),
    (dict(steps=2, params="mlp"), "params must be one of"),
    (dict(steps=2, lr=0.0), "lr must be > 0"),
    (dict(steps=2, inputs="mixed"), "inputs must be one of"),
    (dict(steps=2, output_weight=1.0), "output_weight needs inputs='student'"),
    (dict(steps=2, policy={"default": {"pattern": "dense"}}), "changes no attention site"),
    (dict(steps=2, samples=[]), "samples is empty"),
], ids=["steps0", "steps-neg", "params", "lr", "inputs", "output-teacher", "nothing-changed", "no-samples"])
def test_graft_bad_input(kw, msg):
    model, samples = _model_and_samples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = kw.pop("policy", POLICY)
    samples = kw.pop("samples", samples)
    with pytest.raises(ValueError, match=msg):
        locattn.graft(model, policy, samples, progress=False, **kw)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_graft_teacher_inputs_train_only_attention_modules():
    """With the teacher's inputs substituted per module, no gradient reaches parameters outside the site modules
    even with params='all' (they stay bit-identical); the sites' parameters train."""
    model, samples = _model_and_samples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    locattn.graft(model, POLICY, samples, steps=3, lr=1e-3, params="all", progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("blocks."))
    assert not torch.equal(after["blocks.0.qkv.weight"], before["blocks.0.qkv.weight"])


class TwoSites(nn.Module):
    """One module, two attention sites: the second adds a float bias, so a linear mechanism is refused there."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("bias", torch.randn(1, 1, 40, 40) * 0.1)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


def test_graft_teacher_inputs_module_with_differently_decided_sites():
    """A module whose sites got different specs cannot be compiled alone under one spec: it runs inside the
    whole student with the teacher's input substituted; the site loss still falls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), TwoSites())
    x = [torch.randn(2, 40, 8)]
    hist: list = []
    with pytest.warns(locattn.LocattnWarning, match="refused"):
        locattn.graft(model, {"rule": [{"match": "1", "mechanism": "linear"}]}, x, steps=25, lr=3e-3,
                      progress=False, history=hist)
    assert hist[-1]["sites"]["1"] < 0.7 * hist[0]["sites"]["1"], (hist[0], hist[-1])


def test_spec_policy_reproduces_the_decision():
    from locattn.grafting import spec_policy
    from locattn.patterns import Dense, Layout, SlidingWindow
    from locattn.patterns.mechanism import Mechanism
    from locattn.patterns.spec import HeadGroup, SiteSpec
    spec = SiteSpec((HeadGroup((0, 1), SlidingWindow(window=3), Layout(sinks=2), Mechanism("hybrid")),
                     HeadGroup((2, 3), Dense(), Layout())))
    torch.manual_seed(0)
    rep = locattn.explain(Attn(), torch.randn(1, 20, 32), policy=spec_policy(spec))
    assert rep.decisions[0].spec == spec


def test_graft_cli(tmp_path):
    target = tmp_path / "target.py"
    target.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(__import__('os').path.dirname(__file__))!r})\n"
        "from test_graft import _model_and_samples\n"
        "def make():\n"
        "    return _model_and_samples()\n")
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[[rule]]\nmatch = "blocks.*"\npattern = "sliding_window"\nwindow = 3\n')
    out, log = tmp_path / "s.pt", tmp_path / "log.json"
    assert cli_main(["graft", f"{target}:make", "--policy", str(policy), "--steps", "3", "-o", str(out), "--log",
                     str(log), "--quiet"]) == 0
    assert set(torch.load(out)) == set(Tiny().state_dict())
    assert len(json.loads(log.read_text())) == 3
    with pytest.raises(SystemExit, match="steps must be"):
        cli_main(["graft", f"{target}:make", "--policy", str(policy), "--steps", "0", "--quiet"])


@pytest.mark.models
def test_graft_every_layer_of_a_deep_llama_runs_the_rewritten_op():
    """Modules of one class compiled one by one share their forward's code: more layers than Dynamo's default
    recompile limit must still each run the hybrid op (none falls back to eager dense attention)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    pol = {"rule": [{"match": "*", "pattern": "sliding_window", "window": 4, "sinks": 1, "mechanism": "hybrid",
                     "features": 16}]}
    locattn.reset_counters()
    hist: list = []
    locattn.graft(model, pol, [torch.randint(0, 100, (1, 24))], steps=1, progress=False, history=hist)
    assert len(hist[0]["sites"]) == 10
    # discovery (10 forwards) + one step (10 forwards, 10 backwards), every one on the hybrid implementation
    assert locattn.counters()["dispatch"]["linear_chunked"] == 30
