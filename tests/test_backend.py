"""The backend end to end: entry point, policy sources, rewrite of SDPA sites, training, graph breaks, dynamic."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from golden import golden_attention, golden_mask

ENV = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}


class SDPA(nn.Module):
    """One attention layer; `kind` selects how SDPA is called."""

    def __init__(self, kind="plain", d=32, heads=4, kv_heads=4):
        super().__init__()
        self.kind, self.h, self.hk, self.dh = kind, heads, kv_heads, d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.dh)
        self.o = nn.Linear(d, d)

    def forward(self, x, mask=None):
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hk, self.dh).permute(2, 0, 3, 1, 4)
        kw = {}
        if self.kind == "causal":
            kw["is_causal"] = True
        if self.kind == "scale":
            kw["scale"] = 0.37
        if self.kind == "gqa":
            kw["enable_gqa"] = True
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        return self.o(o.transpose(1, 2).reshape(b, s, d))


class Net(nn.Module):
    def __init__(self, kind="plain", n=2, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([SDPA(kind, **kw) for _ in range(n)])

    def forward(self, x, mask=None):
        for blk in self.blocks:
            x = x + blk(x, mask)
        return x


def _compile(model, policy=None, **kw):
    return torch.compile(model, backend="locattn", options={"policy": policy} if policy is not None else None, **kw)


def test_entry_point_resolves_in_a_fresh_interpreter():
    code = ("import torch, sys\n"
            "m = torch.nn.Linear(4, 4)\n"
            "c = torch.compile(m, backend='locattn')\n"
            "c(torch.randn(2, 4))\n"
            "assert 'locattn' not in sys.modules or True\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "print(lookup_backend('locattn').__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("locattn.backend")


@pytest.mark.parametrize("kind,mask", [("plain", None), ("plain", "bool"), ("plain", "float"), ("causal", None),
                                       ("gqa", None), ("scale", None)])
def test_dense_policy_equals_eager(kind, mask):
    model = Net(kind, kv_heads=2 if kind == "gqa" else 4)
    x = torch.randn(2, 37, 32)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 37, 37) > 0.2
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(1, 4, 37, 37)
    compiled = _compile(model)
    torch.testing.assert_close(compiled(x, m), model(x, m), atol=2e-5, rtol=1e-4)
    assert locattn.counters()["rewrite"]["sdpa"] == 2
    assert "locattn" in locattn.counters()["dispatch"] or locattn.counters()["dispatch"]


def _window_golden(model, x, window, causal=False, mask=None):
    """Eager model with every SDPA replaced by the written-out fp64 sliding-window attention."""
    def fake_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dropout_p=0.0):
        s = q.shape[-2]
        allowed = golden_mask("sliding_window", {"window": window}, (s,), s)
        if is_causal:
            allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
        if attn_mask is not None:
            allowed = allowed & attn_mask
        return golden_attention(q, k, v, allowed, scale or q.shape[-1] ** -0.5).to(q.dtype)

    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fake_sdpa
    try:
        return model(x, mask)
    finally:
        F.scaled_dot_product_attention = orig


@pytest.mark.parametrize("s", [63, 125, 200])
@pytest.mark.parametrize("kind", ["plain", "causal", "mask"])
def test_sliding_window_matches_fp64_golden_fwd_bwd(s, kind):
    model = Net("causal" if kind == "causal" else "plain").double()
    x = torch.randn(1, s, 32, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(1, 1, s, s) > 0.3) if kind == "mask" else None
    policy = {"rule": [{"match": "blocks.*", "pattern": "sliding_window", "window": 9}]}
    compiled = torch.compile(model, backend=locattn.backend(policy, inductor=False))
    y = compiled(x, mask)
    gx, = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = _window_golden(model, x2, 9, mask=mask)
    gx2, = torch.autograd.grad(y2.sum(), x2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    assert locattn.counters()["rewrite"]["sdpa"] == 2


def test_training_gradients_through_inductor():
    model = Net()
    x = torch.randn(2, 40, 32)
    ref = Net()
    ref.load_state_dict(model.state_dict())
    compiled = _compile(model)
    compiled(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    for (n, p), (_, p2) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=n)

    # window policy: gradients equal the written-out golden
    model.zero_grad()
    pol = {"rule": [{"match": "*", "pattern": "sliding_window", "window": 4}]}
    compiled = _compile(model, pol)
    compiled(x).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _window_golden(model, x, 4).pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


class NormedQK(nn.Module):
    """q / k normalised in fp32 (as models do under autocast), v straight from a linear: under autocast SDPA
    sees fp32 q / k beside a bf16 v and casts them all to bf16."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k = F.layer_norm(q.float(), (self.dh,)), F.layer_norm(k.float(), (self.dh,))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, s, d))


def test_autocast_site_casts_like_sdpa():
    """Under torch.autocast the rewritten site gets the inputs SDPA would (one dtype, the autocast dtype): the
    fast path runs (no mixed-dtype fallback to blocked), forward and backward equal eager autocast."""
    torch.manual_seed(0)
    model = NormedQK()
    x = torch.randn(2, 35, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
    want.float().pow(2).mean().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    locattn.reset_counters()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _compile(model, {"default": {"pattern": "dense"}})(x)
    got.float().pow(2).mean().backward()
    assert locattn.counters()["dispatch"] == {"cpu": 2}, locattn.counters()["dispatch"]  # forward, backward
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for a, b in zip([x.grad] + [p.grad for p in model.parameters()], want_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = SDPA(), SDPA()

    def forward(self, x):
        x = x + self.a(x)
        torch._dynamo.graph_break()
        return x + self.b(x)


def test_graph_break_every_subgraph_rewritten():
    model = Broken()
    x = torch.randn(1, 30, 32)
    b = locattn.backend({"rule": [{"match": "b", "pattern": "sliding_window", "window": 3}]}, inductor=False)
    y = torch.compile(model, backend=b)(x)
    assert b._graphs == 2
    assert [(d.site.path, d.rewritten, d.spec.describe()) for d in b.decisions] == [
        ("a", True, "dense"), ("b", True, "sliding_window(window=3)")]
    torch.testing.assert_close(y, _window_golden_broken(model, x), atol=1e-5, rtol=1e-4)


def _window_golden_broken(model, x):
    h = x + model.a(x)
    blk = model.b
    b_, s, d = h.shape
    q = blk.q(h).view(b_, s, blk.h, blk.dh).transpose(1, 2)
    k, v = blk.kv(h).view(b_, s, 2, blk.hk, blk.dh).permute(2, 0, 3, 1, 4)
    o = golden_attention(q, k, v, golden_mask("sliding_window", {"window": 3}, (s,), s), blk.dh ** -0.5).float()
    return h + blk.o(o.transpose(1, 2).reshape(b_, s, d))


def test_dynamic_sequence_length_no_recompile_per_length():
    model = Net()
    b = locattn.backend({"rule": [{"match": "*", "pattern": "sliding_window", "window": 5}]})
    compiled = torch.compile(model, backend=b, dynamic=True)
    for s in (33, 47, 70, 101):
        x = torch.randn(1, s, 32)
        torch.testing.assert_close(compiled(x), _window_golden(model, x, 5), atol=2e-5, rtol=1e-4)
    assert b._graphs == 1, f"recompiled: {b._graphs} graphs for 4 lengths"


def test_dropout_in_training_is_a_counted_fallback():
    class Drop(SDPA):
        def forward(self, x, mask=None):
            b, s, d = x.shape
            q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5 if self.training else 0.0)

    m = Drop()
    b = locattn.backend(inductor=False)
    torch.compile(m, backend=b)(torch.randn(1, 8, 32))
    assert not b.decisions[0].rewritten and "dropout_p=0.5" in b.decisions[0].reason
    assert locattn.counters()["fallback"]["dropout_p=0.5 > 0"] == 1
    m.eval()
    b = locattn.backend(inductor=False)
    torch.compile(m, backend=b)(torch.randn(1, 8, 32))
    assert b.decisions[0].rewritten


@pytest.mark.parametrize("mask_shape", [(3, 1, 6, 6), (2, 1, 1, 6, 6), (1, 3, 1, 6, 6), (6,)])
def test_rank5_site_with_a_mask_broadcast_over_leading_axes(mask_shape):
    """q/k/v [A, B, H, S, D]: the leading axes fold into the op's batch, and a mask with fewer or size-1 leading
    axes is broadcast over them before it is folded the same way (it used to be folded as it was: shape error)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 6, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = torch.rand(mask_shape, generator=gen) > 0.3
    mask[..., 0] = True

    def f(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    b = locattn.backend()
    got = torch.compile(f, backend=b)(q, k, v, mask)
    assert b.decisions[0].rewritten
    torch.testing.assert_close(got, f(q, k, v, mask))


def test_rank3_gqa_site_is_left_alone_with_a_reason():
    """Rank-3 SDPA with enable_gqa has its heads on dim 0, which a rank-3 site reads as batch: left alone."""
    q, k = torch.randn(4, 6, 8), torch.randn(2, 6, 8)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    b = locattn.backend()
    got = torch.compile(f, backend=b)(q, k, k)
    assert not b.decisions[0].rewritten and "rank-3 GQA" in b.decisions[0].reason
    torch.testing.assert_close(got, f(q, k, k))


@pytest.mark.parametrize("shape", [(1, 9, 16), (9, 16)], ids=["batch1", "unbatched"])
def test_single_head_manual_attention_without_batch_axes(shape):
    """Hand-written single-head attention on [1, S, D] / [S, D]: the operands reach the op 4-D (their leading
    size-1 axes used to be left out, as for a broadcasting mask: the compile failed)."""
    q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3))

    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    b = locattn.backend()
    got = torch.compile(f, backend=b)(q, k, v)
    assert b.decisions[0].rewritten
    torch.testing.assert_close(got, f(q, k, v))


@pytest.mark.parametrize("form", ["sdpa", "manual"])
def test_view_of_the_attention_output(form):
    """``out.view(B * H, S, D)`` is legal on the contiguous output of CPU SDPA / ``p @ v``; the op's output has
    SDPA's [B, S, H, D] memory layout, so such a view gets a contiguous copy first (it failed to compile)."""
    q, k, v = (torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))

    def f(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v) if form == "sdpa" else \
            (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1) @ v
        return o.view(8, 9, 8)

    b = locattn.backend()
    got = torch.compile(f, backend=b)(q, k, v)
    assert b.decisions[0].rewritten
    torch.testing.assert_close(got, f(q, k, v))


def test_attention_inside_activation_checkpointing():
    """torch.utils.checkpoint regions are subgraphs of their own (a higher-order op): their sites are found and
    rewritten too (they were invisible: the policy silently stayed dense), and the model with checkpointing
    equals the one without, forward and backward (the backward recomputes the rewritten op)."""
    import torch.utils.checkpoint as ckpt

    class Ckpt(Net):
        def forward(self, x, mask=None):
            for blk in self.blocks:
                x = x + ckpt.checkpoint(blk, x, use_reentrant=False)
            return x

    pol = {"rule": [{"match": "*", "pattern": "sliding_window", "window": 4}]}
    plain, wrapped = Net(), Ckpt()
    wrapped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 40, 32)
    res = []
    for model in (plain, wrapped):
        locattn.reset_counters()
        xc = x.clone().requires_grad_()
        y = _compile(model, pol)(xc)
        y.pow(2).mean().backward()
        assert locattn.counters()["rewrite"] == {"sdpa": 2}
        res.append([y, xc.grad] + [p.grad for p in model.parameters()])
        torch._dynamo.reset()
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class Cross(nn.Module):
    def forward(self, q, kv):
        return F.scaled_dot_product_attention(q, kv, kv)


def test_cross_attention_keeps_dense_with_one_warning():
    q, kv = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 11, 8)
    b = locattn.backend({"rule": [{"match": "*", "pattern": "sliding_window", "window": 2}]}, inductor=False)
    with pytest.warns(locattn.LocattnWarning, match="cross-attention"):
        y = torch.compile(Cross(), backend=b)(q, kv)
    d = b.decisions[0]
    assert d.rewritten and d.spec.describe() == "dense" and "cross-attention" in d.notes[0]
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, kv, kv))


def test_skip_rule_leaves_sdpa_in_graph():
    model = Net()
    codes = []
    b = locattn.backend({"rule": [{"match": "blocks.0", "skip": True}]}, inductor=False)
    orig = b.__call__

    def spy(gm, ex, **kw):
        out = orig(gm, ex, **kw)
        codes.append(gm.code)
        return out

    torch.compile(model, backend=spy)(torch.randn(1, 10, 32))
    assert [d.rewritten for d in b.decisions] == [False, True]
    assert "policy: skip" in b.decisions[0].reason
    assert codes[0].count("scaled_dot_product_attention") == 1 and codes[0].count("locattn.attention") == 1


def test_policy_sources_env_and_options(tmp_path, monkeypatch):
    p = tmp_path / "p.toml"
    p.write_text('version = 1\n[[rule]]\nmatch = "blocks.1"\npattern = "sliding_window"\nwindow = 2\n')
    model = Net()
    x = torch.randn(1, 12, 32)
    monkeypatch.setenv("LOCATTN_POLICY", str(p))
    rep = locattn.explain(model, x)
    assert [d.spec.describe() for d in rep.decisions] == ["dense", "sliding_window(window=2)"]
    # options beat the environment; a Policy object and a dict work too
    for pol in ({"default": {"pattern": "sliding_window", "window": 1}},
                locattn.Policy.from_dict({"default": {"pattern": "sliding_window", "window": 1}})):
        rep = locattn.explain(model, x, policy=pol)
        assert [d.spec.describe() for d in rep.decisions] == ["sliding_window(window=1)"] * 2
    monkeypatch.delenv("LOCATTN_POLICY")
    assert [d.spec.describe() for d in locattn.explain(model, x).decisions] == ["dense", "dense"]


def test_backend_override_option_and_rule():
    model = Net(n=1)
    x = torch.randn(1, 12, 32)
    c = torch.compile(model, backend="locattn", options={"backend": "reference"})
    c(x)
    assert locattn.counters()["dispatch"] == {"reference": 1}
    torch._dynamo.reset()
    locattn.reset_counters()
    pol = {"rule": [{"match": "*", "pattern": "sliding_window", "window": 3, "backend": "blocked"}]}
    torch.compile(model, backend="locattn", options={"policy": pol})(x)
    assert locattn.counters()["dispatch"] == {"blocked": 1}


def test_unmatched_rule_warns_with_existing_paths():
    with pytest.warns(locattn.LocattnWarning, match=r"rule #0 \(match=\['nothing\.\*'\]\) matches no attention site; "
                                                    r"sites: \['blocks.0', 'blocks.1'\]"):
        locattn.explain(Net(), torch.randn(1, 8, 32), policy={"rule": [{"match": "nothing.*", "pattern": "dense"}]})


def test_explain_report_and_json():
    rep = locattn.explain(Net(), torch.randn(2, 64, 32),
                          policy={"rule": [{"match": "blocks.1", "pattern": "sliding_window", "window": 8}]})
    text = str(rep)
    assert "2 attention site(s), 2 rewritten" in text and "sliding_window(window=8)" in text
    rows = __import__("json").loads(rep.to_json())["sites"]
    assert rows[1]["density"] == pytest.approx(sum(min(i + 8, 63) - max(i - 8, 0) + 1 for i in range(64)) / 64 ** 2)
    assert rows[1]["attn_flops"] < rows[1]["attn_flops_dense"] == rows[0]["attn_flops"]


def test_cli_explain(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch, torch.nn.functional as F\n"
                 "class M(torch.nn.Module):\n"
                 "    def forward(self, q):\n"
                 "        return F.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
                 "def make():\n"
                 "    return M(), (torch.randn(1, 2, 16, 8),)\n")
    p = tmp_path / "p.toml"
    p.write_text('version = 1\n[default]\npattern = "sliding_window"\nwindow = 3\n')
    out = subprocess.run([sys.executable, "-m", "locattn", "explain", f"{f}:make", "--policy", str(p)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sliding_window(window=3)" in out.stdout and "causal" in out.stdout


@pytest.mark.parametrize("raw,path", [
    ("L['self'].transformer_blocks[0].attn1", "transformer_blocks.0.attn1"),
    ("L['self']._modules['blocks']._modules['0']._modules['attn']", "blocks.0.attn"),
    ("L['self'].__dict__['_modules']['blocks'][1].attn", "blocks.1.attn"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("G['net'].a", "a"),
    ("L['self']", ""),
])
def test_module_paths_are_normalized(raw, path):
    from locattn.passes.sites import normalize_path

    assert normalize_path(raw) == path
