"""The linear and hybrid mechanisms on CPU: the fp64 reference against autograd, ``linear_chunked`` against the
reference (forward and backward: non-causal, causal, key padding, GQA, odd sizes, Sq != Sk), the hybrid's
limits (every key in the pattern = exact softmax), favor's convergence to softmax, the op's checks, the spec and
policy forms, and the rewrite through ``torch.compile`` (and its refusals)."""

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locattn
from locattn import Policy, PolicyError
from locattn.codegen import registry
from locattn.codegen.linear.chunked import LinearChunked
from locattn.codegen.linear.naive import LinearReference, naive_forward
from locattn.codegen.reference import Reference
from locattn.codegen.registry import AttentionCall
from locattn.patterns import Dense, Layout, Neighborhood, SlidingWindow
from locattn.patterns.mechanism import SOFTMAX, Mechanism, MechanismError
from locattn.patterns.spec import HeadGroup, SiteSpec, parse_spec
from locattn.testing import assert_close_to_golden

from linear_golden import Case, call64, check

SW = SlidingWindow(window=6)
CASES = [
    Case("lin-elu"),
    Case("lin-relu", feature_map="relu", d=24, s=50),
    Case("lin-favor", feature_map="favor", s=77),
    Case("lin-elu-causal", causal=True, s=125),
    Case("lin-favor-causal-gqa", feature_map="favor", causal=True, hq=4, hk=2, b=2, s=75, dv=72),
    Case("lin-elu-keys-gqa", mask="keys", hq=6, hk=2, b=2),
    Case("lin-favor-headmask-gqa", feature_map="favor", mask="heads", hq=4, hk=2, b=2, causal=True),
    Case("lin-cross", s=40, s_k=67, d=24, dv=16),
    Case("lin-cross-causal", feature_map="favor", causal=True, s=70, s_k=45),
    Case("hyb-favor-sw", kind="hybrid", feature_map="favor", pattern=SW, s=63),
    Case("hyb-favor-sw-causal-sinks-gqa", kind="hybrid", feature_map="favor", pattern=SW,
         layout=Layout(sinks=3), causal=True, hq=4, hk=2, s=90),
    Case("hyb-elu-sw-keys", kind="hybrid", pattern=SlidingWindow(window=4, dilation=2), mask="keys", b=2),
    Case("hyb-favor-sw-dilated-causal-sinks", kind="hybrid", feature_map="favor",
         pattern=SlidingWindow(window=5, dilation=3), layout=Layout(sinks=2), causal=True, s=70),
    Case("hyb-favor-na2d-globals", kind="hybrid", feature_map="favor", pattern=Neighborhood(kernel=(3, 5)),
         layout=Layout(grid=(7, 9), prefix=2), s=65, d=24),
    Case("hyb-favor-headmask-gqa", kind="hybrid", feature_map="favor", pattern=SW, mask="heads", hq=4, hk=2,
         causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_backward_is_autograd(case):
    """The reference's explicit backward (the op needs one) equals autograd through its own definition."""
    call = call64(case.call())
    q, k, v = (t.clone().requires_grad_() for t in (call.q, call.k, call.v))
    out, _ = naive_forward(dataclasses.replace(call, q=q, k=k, v=v))
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), g)
    ref = LinearReference()
    o, l = ref.forward(call)
    got = ref.backward(call, g, o, l, False)[:3]
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunked_matches_reference(case, dtype):
    check(LinearChunked(chunk=16), case.call(dtype=dtype))


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "hybrid" and len(c.layout.grid or (1,)) == 1
                                  and not c.layout.prefix], ids=lambda c: c.id)
def test_chunked_plan_walk_matches_reference(case):
    """The 1-D hybrids once more through the plan walk instead of the interval prefix sums."""
    check(LinearChunked(chunk=16, intervals=False), case.call())


def test_chunked_default_chunk_and_long_sequence():
    check(LinearChunked(), Case("lin-long-causal", feature_map="favor", causal=True, s=300, d=16).call())


@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow(window=200)], ids=["dense", "window>=S"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_hybrid_with_every_key_is_softmax(pattern, causal):
    """A pattern that allows every key leaves nothing to the linear term: exact softmax attention."""
    case = Case("hyb-all", kind="hybrid", feature_map="favor", pattern=pattern, causal=causal, mask="keys", b=2,
                hq=4, hk=2)
    call = case.call()
    out, lse = LinearChunked().forward(call)
    soft = dataclasses.replace(call64(call), mechanism=SOFTMAX)
    gold_o, gold_l = Reference().forward(soft)
    assert_close_to_golden(out, gold_o, Reference().forward(dataclasses.replace(call, mechanism=SOFTMAX))[0],
                           name="out")
    torch.testing.assert_close(lse.double(), gold_l, rtol=1e-5, atol=1e-5)


def test_favor_error_falls_with_features():
    """favor's kernel estimates exp(scale q.k): with more random features, linear attention approaches exact
    softmax attention (averaged over seeds; orthogonal features)."""
    gen = torch.Generator().manual_seed(0)
    b, h, s, d = 1, 2, 48, 16
    q, k, v = (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = []
    for m in (16, 256, 4096):
        e = 0.0
        for seed in range(4):
            call = AttentionCall(q, k, v, None, None, d ** -0.5, False, Dense(), Layout(),
                                 mechanism=Mechanism("linear", "favor", features=m, seed=seed))
            e += float((LinearChunked().forward(call)[0] - exact).abs().mean())
        errs.append(e / 4)
    assert errs[0] > 1.5 * errs[1] > 2.25 * errs[2], errs  # ~1/sqrt(m) once m >> D
    assert errs[2] < 0.01, errs


def test_zero_denominator_outputs_zero():
    """relu features of all-negative queries: every kernel value is 0, so the row outputs 0 (lse -inf) and
    gets no gradient."""
    case = Case("zero-den", feature_map="relu", s=20, d=8)
    call = case.call(dtype=torch.float64)
    q = call.q.clone()
    q[:, :, 3] = -q[:, :, 3].abs() - 0.1
    call = dataclasses.replace(call, q=q)
    for impl in (LinearReference(), LinearChunked(chunk=8)):
        out, lse = impl.forward(call)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        assert torch.isneginf(lse[:, :, 3]).all() and torch.isfinite(lse[:, :, 4:]).all()
        dq, dk, dv, _ = impl.backward(call, torch.ones_like(out), out, lse, False)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert torch.equal(dq[:, :, 3], torch.zeros_like(dq[:, :, 3]))


def test_favor_features_are_reproducible():
    from locattn.codegen.linear.features import favor_matrix
    a, b = favor_matrix(16, 40, 7), favor_matrix.__wrapped__(16, 40, 7)
    assert torch.equal(a, b) and not torch.equal(a, favor_matrix.__wrapped__(16, 40, 8))
    assert torch.allclose(a[:16] @ a[:16].T / (a[:16].norm(dim=1)[:, None] * a[:16].norm(dim=1)[None]),
                          torch.eye(16, dtype=torch.float64), atol=1e-12)   # orthogonal blocks


# ----------------------------------------------------------------------------------------------------------
# dispatch, the op and the spec


def test_softmax_implementations_decline_other_mechanisms():
    call = Case("dispatch").call()
    cands = {name: (ok, why) for name, ok, why in registry.candidates(call)}
    for name in ("cpu", "blocked", "reference"):
        assert cands[name] == (False, "mechanism linear (runs softmax only)"), cands[name]
    assert cands["linear_chunked"][0] and cands["linear_reference"][0]
    soft = dataclasses.replace(call, mechanism=SOFTMAX)
    cands = {name: (ok, why) for name, ok, why in registry.candidates(soft)}
    assert cands["linear_chunked"] == (False, "mechanism softmax (runs hybrid/linear only)")
    with pytest.raises(registry.BackendUnavailable, match="runs softmax only"):
        registry.select(call, "cpu")


def test_spec_json_softmax_unchanged_and_mechanism_round_trip():
    soft = SiteSpec((HeadGroup(None, SlidingWindow(window=4), Layout(sinks=2)),))
    assert soft.to_json() == ('{"groups":[{"grid":null,"heads":null,"params":{"causal":false,"dilation":1,'
                              '"window":4},"pattern":"sliding_window","prefix":0,"sinks":2,"suffix":0}],"v":1}')
    mech = Mechanism("hybrid", "favor", features=16, seed=3)
    spec = SiteSpec((HeadGroup((0, 1), SlidingWindow(window=4), Layout(), mech),
                     HeadGroup((2, 3), Dense(), Layout(), Mechanism("linear"))))
    text = spec.to_json()
    assert json.loads(text)["groups"][0]["mechanism"] == {"kind": "hybrid", "feature_map": "favor",
                                                          "features": 16, "seed": 3}
    assert parse_spec(text) == spec
    assert spec.describe() == "h0-1:hybrid[favorx16,seed=3]:sliding_window(window=4); h2-3:linear[elu]:dense"


def test_mechanism_validation():
    for bad, msg in [(dict(kind="lin"), "unknown mechanism"), (dict(kind="linear", feature_map="tanh"),
                                                               "unknown feature_map"),
                     (dict(kind="linear", feature_map="favor", features=0), "features must be >= 1"),
                     (dict(kind="linear", feature_map="elu", features=32), "apply to feature_map = 'favor'"),
                     (dict(kind="softmax", feature_map="elu"), "takes no feature_map")]:
        with pytest.raises(MechanismError, match=msg):
            Mechanism(**bad)
    assert Mechanism("linear").feature_map == "elu" and Mechanism("hybrid").feature_map == "favor"


def _op(call: AttentionCall, spec: SiteSpec, backend=""):
    return torch.ops.locattn.attention(call.q, call.k, call.v, call.mask, call.bias, call.scale, call.is_causal,
                                       spec.to_json(), backend)


def test_op_per_head_groups_mix_softmax_and_linear():
    """One site: heads 0-1 linear (favor), 2-3 hybrid, 4-5 exact softmax, under GQA with a key-padding mask:
    the op (through autograd) equals each group's definition, forward and backward."""
    call = Case("op-groups", hq=6, hk=3, b=2, mask="keys", s=45).call(dtype=torch.float64)
    lin, hyb = Mechanism("linear", "favor", features=16), Mechanism("hybrid", "favor", features=16)
    groups = (((0, 1), lin, Dense()), ((2, 3), hyb, SW), ((4, 5), SOFTMAX, Dense()))
    spec = SiteSpec(tuple(HeadGroup(h, p, Layout(), m) for h, m, p in groups))
    g = torch.randn(2, 6, 45, 40, dtype=torch.float64)
    results = []
    for via_op in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (call.q, call.k, call.v))
        if via_op:
            out, _ = torch.ops.locattn.attention(q, k, v, call.mask, None, call.scale, False, spec.to_json(), "")
        else:  # each group by its definition: naive linear / hybrid, dense masked softmax for softmax heads
            outs = []
            for heads, mech, pat in groups:
                kv = heads[0] // 2
                sub = AttentionCall(q[:, list(heads)], k[:, kv:kv + 1], v[:, kv:kv + 1], call.mask, None, call.scale,
                                    False, pat, Layout().resolve(45) if pat.local else Layout(), mechanism=mech)
                if mech.is_softmax:
                    outs.append(F.scaled_dot_product_attention(sub.q, sub.k.expand(-1, 2, -1, -1),
                                                               sub.v.expand(-1, 2, -1, -1), attn_mask=call.mask,
                                                               scale=call.scale))
                else:
                    outs.append(naive_forward(sub)[0])
            out = torch.cat(outs, 1)
        results.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_op_refuses_bias_and_full_masks():
    call = Case("op-bad").call()
    spec = SiteSpec((HeadGroup(None, Dense(), Layout(), Mechanism("linear")),))
    with pytest.raises(ValueError, match="cannot take a float bias"):
        _op(dataclasses.replace(call, bias=torch.zeros(63, 63)), spec)
    with pytest.raises(ValueError, match="key-padding mask"):
        _op(dataclasses.replace(call, mask=torch.ones(63, 63, dtype=torch.bool)), spec)
    _op(dataclasses.replace(call, mask=torch.ones(63, dtype=torch.bool)), spec)  # [Sk]: a key mask


# ----------------------------------------------------------------------------------------------------------
# policy


def test_policy_mechanism_keys_round_trip(tmp_path):
    text = """version = 1
[[rule]]
match = "blocks.0.attn"
mechanism = "linear"
feature_map = "favor"
features = 32
seed = 5

[[rule]]
match = "blocks.*.attn"
pattern = "sliding_window"
window = 8
sinks = 4
mechanism = "hybrid"
"""
    path = tmp_path / "p.toml"
    path.write_text(text)
    p = Policy.load(path)
    assert p.rules[0].mechanism == Mechanism("linear", "favor", features=32, seed=5)
    assert p.rules[0].pattern == Dense()
    assert p.rules[1].mechanism == Mechanism("hybrid", "favor")
    assert Policy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("rule,key,msg", [
    (dict(mechanism="linear", feature_map="tanh"), "feature_map", "unknown feature map"),
    (dict(mechanism="linear", feature_map="favor", features=0), "features", "must be >= 1"),
    (dict(mechanism="linear", feature_map="favor", features=-3), "features", "must be >= 1"),
    (dict(mechanism="linear", features=8), "features", "apply to feature_map = 'favor' only"),
    (dict(mechanism="quadratic"), "mechanism", "unknown mechanism"),
    (dict(pattern="dense", feature_map="elu"), "feature_map", "applies to mechanism"),
    (dict(mechanism="linear", pattern="sliding_window", window=4), "pattern", "attends every key"),
], ids=["feature_map", "features0", "features-neg", "features-elu", "kind", "no-mechanism", "local-linear"])
def test_policy_mechanism_errors(tmp_path, rule, key, msg):
    path = tmp_path / "bad.toml"
    lines = ["version = 1", "", "[[rule]]", 'match = "x"'] + [f"{k} = {json.dumps(v)}" for k, v in rule.items()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError, match=f"bad.toml:3: rule #0.*key '{key}': .*{msg}"):
        Policy.load(path)


# ----------------------------------------------------------------------------------------------------------
# through torch.compile


class Attn(nn.Module):
    def __init__(self, d=32, h=4, causal=False):
        super().__init__()
        self.h, self.causal = h, causal
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask=None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


class Two(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.a, self.b = Attn(causal=causal), Attn(causal=causal)

    def forward(self, x, mask=None):
        return self.b(self.a(x, mask) + x, mask)


POLICY = {"rule": [{"match": "a", "mechanism": "linear", "feature_map": "favor", "features": 16},
                   {"match": "b", "heads": "0-1", "mechanism": "hybrid", "pattern": "sliding_window", "window": 5,
                    "sinks": 2}]}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_compiled_model_matches_reference_backend(causal):
    """Forward and parameter gradients through torch.compile (Inductor) with the auto-dispatched CPU paths
    equal the same model run on the fp64-capable reference implementations; the rewrite is counted."""
    torch.manual_seed(0)
    model = Two(causal).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    mask = torch.rand(2, 1, 1, 40) > 0.2
    grads = []
    for backend in ("", "reference-per-mechanism"):
        model.zero_grad()
        if backend:
            registry.IMPLEMENTATIONS[:] = [i for i in registry.IMPLEMENTATIONS
                                           if i.name in ("reference", "linear_reference")]
        try:
            locattn.reset_counters()
            cm = torch.compile(model, backend="locattn", options={"policy": POLICY}, fullgraph=True)
            y = cm(x, mask)
            y.square().sum().backward()
            grads.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
            c = locattn.counters()
        finally:
            torch._dynamo.reset()
            import locattn.ops as ops_mod
            registry.IMPLEMENTATIONS.clear()
            ops_mod._register_implementations()
        assert c["rewrite"]["sdpa"] == 2
        want = {"": ("linear_chunked", "cpu (hybrid softmax part)"),
                "reference-per-mechanism": ("linear_reference", "reference")}[backend]
        for name in want:
            assert c["dispatch"].get(name), (name, c["dispatch"])
    (y0, g0), (y1, g1) = grads
    torch.testing.assert_close(y0, y1, rtol=1e-9, atol=1e-9)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_rewrite_refuses_bias_and_full_mask_sites():
    """A float bias, or a bool mask over queries and keys, cannot be honoured by linear attention: the heads
    stay exact softmax, counted, warned and explained; a key-padding mask is taken."""
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(1, 24, 32)
    pol = {"rule": [{"match": "*", "mechanism": "linear"}]}
    for mask, refused in ((torch.randn(1, 1, 24, 24), "float bias"), (torch.rand(24, 24) > 0.3, "not a key-padding"),
                          (torch.rand(1, 1, 1, 24) > 0.3, "")):
        locattn.reset_counters()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rep = locattn.explain(model, x, mask, policy=pol)
        assert all(d.rewritten for d in rep.decisions)
        for d in rep.decisions:
            if refused:
                assert d.spec.describe() == "dense" and refused in d.notes[0], d.notes
            else:
                assert d.spec.describe() == "linear[elu]:dense" and not d.notes
        fb = locattn.counters().get("fallback", {})
        if refused:
            assert sum(v for k, v in fb.items() if k.startswith("mechanism linear refused")) == 2, fb
            assert any(refused in str(x.message) for x in w)
            assert refused in str(rep)
        else:
            assert not any(k.startswith("mechanism") for k in fb), fb


@pytest.mark.parametrize("kind", ["linear", "hybrid"])
def test_bf16_through_the_op(kind):
    """bf16 q, k, v (as autocast hands them over): features and sums in fp32, outputs and gradients in bf16,
    close to the fp64 definition."""
    case = Case(f"bf16-{kind}", kind=kind, feature_map="favor", pattern=SW if kind == "hybrid" else Dense(),
                causal=True, hq=4, hk=2, s=70)
    call = case.call(dtype=torch.bfloat16)
    spec = SiteSpec((HeadGroup(None, call.pattern, Layout(), call.mechanism),))
    q, k, v = (t.clone().requires_grad_() for t in (call.q, call.k, call.v))
    out, lse = torch.ops.locattn.attention(q, k, v, None, None, call.scale, True, spec.to_json(), "")
    out.float().square().sum().backward()
    assert out.dtype == q.grad.dtype == torch.bfloat16 and lse.dtype == torch.float32
    gold = naive_forward(call64(call))[0]
    torch.testing.assert_close(out.double(), gold, rtol=0.05, atol=0.02)
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()
