"""``nn.MultiheadAttention`` / ``F.multi_head_attention_forward``: expanded into in-projection, SDPA and
out-projection, so its attention is a site (it was not found at all); the calls that cannot be expanded
faithfully are reported with their reason. Forward and gradients equal eager's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn.backend import LocattnBackend

E, H, L, S, N = 32, 4, 10, 7, 2


class Block(nn.Module):
    def __init__(self, batch_first=True, kdim=None, cross=False, **call):
        super().__init__()
        self.cross, self.call = cross, call
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)

    def forward(self, x, ctx=None, **masks):
        kv = ctx if self.cross else x
        return self.attn(x, kv, kv, need_weights=False, **self.call, **masks)[0]


def _inputs(batch_first=True, cross=False, kdim=None, unbatched=False):
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    ctx = torch.randn(N, S, kdim or E) if batch_first else torch.randn(S, N, kdim or E)
    if unbatched:
        x, ctx = x[0] if batch_first else x[:, 0], ctx[0] if batch_first else ctx[:, 0]
    return x, (ctx if cross else None)


def _kpm(s, unbatched=False):
    m = torch.zeros(N, s, dtype=torch.bool)
    m[1, -3:] = True                                  # True = ignore this key
    return m[0] if unbatched else m


CASES = {
    "self-batch-first": (dict(), dict()),
    "self-seq-first-kpm": (dict(batch_first=False), dict(kpm=True)),
    "self-causal-bool-mask": (dict(), dict(am="causal")),
    "self-is-causal-hint": (dict(is_causal=True), dict(am="causal")),
    "self-is-causal-hint-kpm": (dict(is_causal=True), dict(am="causal", kpm=True)),
    "self-3d-float-mask": (dict(), dict(am="float3d")),
    "cross-kpm": (dict(cross=True), dict(kpm=True)),
    "cross-kdim-separate-weights": (dict(cross=True, kdim=24), dict(kpm=True)),
    "self-unbatched": (dict(), dict(unbatched=True)),
}


def _case(name):
    kw, m = CASES[name]
    kw = dict(kw)
    unbatched = m.get("unbatched", False)
    mod_kw = {k: kw.pop(k) for k in ("batch_first", "kdim", "cross") if k in kw}
    torch.manual_seed(0)
    model = Block(**mod_kw, **kw).eval()
    x, ctx = _inputs(mod_kw.get("batch_first", True), mod_kw.get("cross", False), mod_kw.get("kdim"), unbatched)
    s = S if mod_kw.get("cross") else L
    masks = {}
    if m.get("kpm"):
        masks["key_padding_mask"] = _kpm(s, unbatched)
    if m.get("am") == "causal":
        masks["attn_mask"] = torch.ones(L, s, dtype=torch.bool).triu(1)       # True = not allowed
    elif m.get("am") == "float3d":
        masks["attn_mask"] = torch.randn(N * H, L, s)
    return model, x, ctx, masks


def _run(model, x, ctx, masks, backend=None):
    f = torch.compile(model, backend=backend) if backend is not None else model
    x = x.clone().requires_grad_()
    out = f(x, ctx, **masks)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.pow(2).sum(), [x] + params)
    return out.detach(), grads


@pytest.mark.parametrize("name", list(CASES))
def test_mha_expanded_and_rewritten(name):
    model, x, ctx, masks = _case(name)
    backend = LocattnBackend(inductor=False)
    locattn.reset_counters()
    out, grads = _run(model, x, ctx, masks, backend)
    ref, ref_grads = _run(model, x, ctx, masks)
    assert [(d.site.form, d.rewritten, d.site.path) for d in backend.decisions] == [("mha", True, "attn")], \
        [d.reason for d in backend.decisions]
    assert locattn.counters()["rewrite"] == {"mha": 1}
    site = backend.decisions[0].site
    assert (site.batch, site.heads, site.head_dim) == (1 if "unbatched" in name else N, H, E // H)
    assert site.is_causal == (name == "self-is-causal-hint")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_mha_local_policy_and_inductor():
    """A sliding window on the expanded site, through Inductor, equals eager SDPA with the window mask."""
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(N, L, E)
    pol = {"rule": [{"match": "attn", "pattern": "sliding_window", "window": 2}]}
    out = torch.compile(model, backend="locattn", options={"policy": pol})(x)
    a = model.attn
    q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, -1)
    q, k, v = (t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in (q, k, v))
    i = torch.arange(L)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(i[:, None] - i[None, :]).abs() <= 2)
    ref = a.out_proj(ref.transpose(1, 2).flatten(-2))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("what,why", [("weights", "need_weights=True"), ("dropout", "dropout_p=0.1 in training"),
                                      ("bias_kv", "bias_k / bias_v")])
def test_mha_left_alone_with_a_reason(what, why):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dropout=0.1 if what == "dropout" else 0.0,
                                add_bias_kv=what == "bias_kv")
    mha.train(what == "dropout")
    x = torch.randn(N, L, E)

    def f(x):
        out, w = mha(x, x, x, need_weights=what == "weights")
        return out if w is None else out + w.sum()

    backend = LocattnBackend(inductor=False)
    torch.manual_seed(1)
    got = torch.compile(f, backend=backend)(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, f(x))
    (d,) = backend.decisions
    assert d.site.form == "mha" and not d.rewritten and why in d.reason, d.reason


def test_transformer_encoder_layer():
    """nn.TransformerEncoderLayer: under no_grad in eval it takes a fused fast path (reported, with the switch that
    turns it off); with the fast path off, its attention is a rewritten site."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        rep = locattn.explain(enc, x)
        (d,) = rep.decisions
        assert d.site.form == "mha-fused" and "set_fastpath_enabled" in d.reason
        assert (d.site.batch, d.site.heads, d.site.s_q) == (N, H, L)
        old = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            rep = locattn.explain(enc, x)
            torch._dynamo.reset()
            out = torch.compile(enc, backend=locattn.backend(inductor=False))(x)
            ref = enc(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(old)
    assert [(d.site.form, d.rewritten) for d in rep.decisions] == [("mha", True)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
