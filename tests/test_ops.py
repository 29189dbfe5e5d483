"""The locattn::attention op (reference and blocked implementations) against written-out fp64 goldens."""

import pytest
import torch

from golden import golden_attention, golden_mask
from locattn.patterns import PATTERNS, Layout
from locattn.patterns.spec import HeadGroup, SiteSpec

IMPLS = ["reference", "blocked"]

CASES = [
    # id, kind, params, grid, prefix, suffix, sinks
    ("sw1d-w5", "sliding_window", {"window": 5}, None, 0, 0, 0),
    ("sw1d-dil2-causal", "sliding_window", {"window": 6, "dilation": 2, "causal": True}, None, 0, 0, 0),
    ("sw2d", "sliding_window", {"window": [1, 2]}, (5, 7), 0, 0, 0),
    ("na2d-dil", "neighborhood", {"kernel": [3, 3], "dilation": [1, 2]}, (5, 7), 2, 3, 0),
    ("na3d", "neighborhood", {"kernel": [3, 3, 3]}, (3, 5, 6), 0, 0, 0),
    ("na1d-causal-sinks", "neighborhood", {"kernel": 7, "causal": True}, None, 0, 0, 4),
    ("strided2d", "strided", {"kernel": [4, 3], "stride": [2, 3]}, (5, 7), 0, 0, 0),
    ("tiled2d", "tiled", {"tile": [2, 2], "window": [1, 3]}, (5, 7), 0, 4, 0),
    ("shifted2d", "shifted_window", {"window": [2, 3], "shift": [1, 1]}, (5, 7), 1, 0, 0),
    ("dense", "dense", {}, None, 0, 0, 0),
]


def _spec(kind, params, grid, prefix, suffix, sinks, heads=None):
    p = PATTERNS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    lay = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks) if p.local else Layout()
    return HeadGroup(heads, p, lay)


def _run(impl, spec, q, k, v, mask, bias, scale, causal):
    leaves = [t for t in (q, k, v, bias) if t is not None]
    out, lse = torch.ops.locattn.attention(q, k, v, mask, bias, scale, causal, spec.to_json(), impl)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return (out, lse, *torch.autograd.grad(out, leaves, g)), g


def _golden(q, k, v, allowed, bias, scale, g):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    out = golden_attention(*leaves, allowed, scale, b)
    grads = torch.autograd.grad(out, leaves + ([b] if b is not None else []), g.double())
    return out, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("site", ["plain", "causal", "mask", "bias-gqa"])
def test_op_matches_golden(impl, case, site):
    name, kind, params, grid, prefix, suffix, sinks = case
    n = (grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1) if grid else 63) + prefix + suffix
    hq, hk = (4, 2) if site == "bias-gqa" else (2, 2)
    dt = torch.float64
    q = torch.randn(2, hq, n, 40, dtype=dt, requires_grad=True)
    k = torch.randn(2, hk, n, 40, dtype=dt, requires_grad=True)
    v = torch.randn(2, hk, n, 24, dtype=dt, requires_grad=True)
    mask = torch.rand(2, 1, n, n) > 0.3 if site == "mask" else None
    bias = torch.randn(1, hq, n, n, dtype=dt, requires_grad=True) if site == "bias-gqa" else None
    causal = site == "causal"
    spec = SiteSpec((_spec(kind, params, grid, prefix, suffix, sinks),))
    got, g = _run(impl, spec, q, k, v, mask, bias, 0.3, causal)
    allowed = golden_mask(kind, params, grid or (n - prefix - suffix,), n, prefix, suffix, sinks)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask
    out, grads = _golden(q, k, v, allowed, bias, 0.3, g)
    torch.testing.assert_close(got[0], out.to(got[0].dtype))
    has_key = allowed.expand(2, hq, n, n).any(-1)
    assert torch.equal(torch.isinf(got[1]), ~has_key)   # empty rows: lse = -inf
    for a, b in zip(got[2:], grads):
        torch.testing.assert_close(a, b.to(a.dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hk,heads", [(2, ((0, 3), (1, 2))), (2, ((0, 1), (2, 3))), (2, ((0, 1, 2), (3,))),
                                     (1, ((0, 1, 3), (2,)))],
                         ids=["one-per-kv-head", "whole-gqa", "repeated-kv", "mqa-subsets"])
def test_per_head_groups(impl, hk, heads):
    grid = (5, 7)
    g1 = _spec("shifted_window", {"window": [2, 3], "shift": [1, 1]}, grid, 0, 0, 0, heads=heads[0])
    g2 = _spec("tiled", {"tile": [2, 2], "window": [1, 3]}, grid, 0, 0, 0, heads=heads[1])
    q = torch.randn(2, 4, 35, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hk, 35, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hk, 35, 16, dtype=torch.float64, requires_grad=True)
    got, g = _run(impl, SiteSpec((g1, g2)), q, k, v, None, None, 0.25, False)
    m1 = golden_mask("shifted_window", {"window": [2, 3], "shift": [1, 1]}, grid, 35)
    m2 = golden_mask("tiled", {"tile": [2, 2], "window": [1, 3]}, grid, 35)
    allowed = torch.stack([m1 if h in heads[0] else m2 for h in range(4)])[None]
    out, grads = _golden(q, k, v, allowed, None, 0.25, g)
    torch.testing.assert_close(got[0], out)
    for a, b in zip(got[2:], grads):
        torch.testing.assert_close(a, b)


def test_head_groups_keep_gqa_without_copies():
    """A head group taking as many query heads from each of its kv heads reads those kv heads once, as views
    when they are one run; a group taking unequal shares reads one kv head per query head (a copy), counted,
    and its kv gradients are summed per kv head before they are scattered."""
    import locattn
    from locattn.ops import _group_calls, _sum_repeated

    q, k, v = torch.randn(2, 8, 35, 16), torch.randn(2, 4, 35, 16), torch.randn(2, 4, 35, 8)
    bias = torch.randn(2, 8, 35, 35)
    sw = {"window": [2, 3], "shift": [1, 1]}
    spec = SiteSpec((_spec("shifted_window", sw, (5, 7), 0, 0, 0, heads=(2, 3, 4, 5)),
                     _spec("dense", {}, None, 0, 0, 0, heads=(0, 1, 6, 7)),
                     ))
    locattn.reset_counters()
    ((qh1, kv1, c1), (qh2, kv2, c2)), _ = _group_calls(q, k, v, None, bias, 0.25, False, spec)
    assert qh1 == (2, 3, 4, 5) and kv1 == (1, 2) and c1.k.shape[1] == 2
    for t, full in ((c1.q, q), (c1.k, k), (c1.v, v), (c1.bias, bias)):  # one run: views
        assert t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    assert kv2 == (0, 3) and c2.k.shape[1] == 2  # whole groups, not one run: kv heads copied once each
    assert "kv_repeated" not in locattn.counters()
    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0, heads=(0, 3, 4)),
                     _spec("dense", {}, None, 0, 0, 0, heads=(1, 2, 5, 6, 7))))
    ((_, kv1, c1), (_, kv2, _)), _ = _group_calls(q, k, v, None, None, 0.25, False, spec)
    assert kv1 == (0, 1, 2) and c1.k.shape[1] == 3 and kv2 == (0, 1, 2, 3, 3)
    # their kv gradients are summed per kv head before the scatter (no repeated index reaches index_add_)
    g = torch.randn(2, 5, 35, 16)
    (red,), kv = _sum_repeated((g,), kv2)
    assert kv == (0, 1, 2, 3) and torch.equal(red[:, :3], g[:, :3]) and torch.equal(red[:, 3], g[:, 3] + g[:, 4])
    assert locattn.counters()["kv_repeated"] == {"query heads 1-2,5-7 take unequal shares of GQA groups of 2": 1}


@pytest.mark.parametrize("s_q,s_k", [(0, 9), (9, 0), (0, 0)])
def test_empty_sequences(s_q, s_k):
    """No queries or no keys: auto dispatch skips the kernels that refuse empty tensors (counted) and returns
    empty / zero outputs with lse = -inf and zero gradients."""
    import locattn

    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    q = torch.randn(2, 2, s_q, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, s_k, 16, requires_grad=True) for _ in range(2))
    locattn.reset_counters()
    out, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.25, False, spec, "")
    assert out.shape == (2, 2, s_q, 16) and not out.any() and bool((lse == float("-inf")).all())
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and not (dq.any() or dk.any() or dv.any())
    assert locattn.counters()["dispatch"]["skip cpu: empty tensor"] == 2  # forward and backward
    if s_k == 0:
        assert locattn.counters()["dispatch"]["skip blocked: no keys (S_k = 0)"] == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_dense_and_fp32(impl):
    q = torch.randn(2, 3, 50, 72, requires_grad=True)
    k = torch.randn(2, 3, 17, 72, requires_grad=True)
    v = torch.randn(2, 3, 17, 40, requires_grad=True)
    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),))
    got, g = _run(impl, spec, q, k, v, None, None, 72 ** -0.5, False)
    out, grads = _golden(q, k, v, torch.ones(50, 17, dtype=torch.bool), None, 72 ** -0.5, g)
    torch.testing.assert_close(got[0], out.float(), atol=1e-5, rtol=1e-4)
    for a, b in zip(got[2:], grads):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-4)


def test_autocast_casts_floating_inputs():
    """Under torch.autocast the op casts q, k, v to the autocast dtype (read per call), as autocast does for
    SDPA; a float bias stays fp32 (added in fp32, as hand-written attention adds it), fp64 and bool masks stay as
    they are; gradients reach the uncast leaves."""
    spec = SiteSpec((_spec("sliding_window", {"window": 4}, None, 0, 0, 0),)).to_json()
    q, k = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 33, 16, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(33, 33, requires_grad=True)
    mask = torch.rand(33, 33) > 0.2
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            out, lse = torch.ops.locattn.attention(q, k, v, mask, bias, 0.2, False, spec, "reference")
        want, _ = torch.ops.locattn.attention(q.to(dt), k.to(dt), v.to(dt), mask, bias, 0.2, False, spec,
                                              "reference")
        assert out.dtype == dt and torch.equal(out, want)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v, bias))
        assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = torch.ops.locattn.attention(q.double(), k.double(), v.double(), None, None, 0.2, False, spec, "")
    assert out.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS + ["cpu"])
def test_inference_mode_then_training(impl):
    """A validation pass under torch.inference_mode between training steps: what an implementation caches in
    the first (workspaces, tables) must serve the next training step, forward and backward, and the one after."""
    from locattn.codegen.cpu_fast import clear_workspace

    clear_workspace()  # the cpu path's per-thread buffers are made by the first call below
    spec = SiteSpec((_spec("neighborhood", {"kernel": [3, 5]}, (5, 7), 0, 0, 0),)).to_json()
    q = torch.randn(1, 2, 35, 16)
    with torch.inference_mode():
        want, _ = torch.ops.locattn.attention(q, q, q, None, None, 0.25, False, spec, impl)
    leaf = q.clone().requires_grad_()
    out, _ = torch.ops.locattn.attention(leaf, leaf, leaf, None, None, 0.25, False, spec, impl)
    out.sum().backward()
    assert torch.equal(out.detach(), want) and leaf.grad.isfinite().all()
    with torch.inference_mode():
        again, _ = torch.ops.locattn.attention(q, q, q, None, None, 0.25, False, spec, impl)
    assert torch.equal(again, want)


@pytest.mark.parametrize("impl", IMPLS + ["cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_like_bias_masks_like_minus_inf(impl, dtype):
    """Float masks far below 0 (finfo.min, HF's -1e9; anything below registry.BIAS_MASK_BELOW = -2**14) act as
    -inf: a row masked entirely that way is an empty row (out 0, lse -inf, no gradient), partially masked rows
    attend their other keys; forward and backward equal the same call with -inf in their place, bit for bit."""
    spec = SiteSpec((_spec("sliding_window", {"window": 9}, None, 0, 0, 0),)).to_json()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=gen).to(dtype) for _ in range(3))
    bias = torch.randn(1, 2, 20, 20, generator=gen).to(dtype)
    bias[:, :, 3] = torch.finfo(dtype).min      # every key of row 3
    bias[:, 1, 5, 4:] = torch.finfo(dtype).min  # all but 4 keys of row 5, head 1
    bias[:, 0, 7] = -1e4 if dtype == torch.float16 else -1e9  # every key of row 7, head 0
    inf_bias = bias.masked_fill(bias < -2 ** 14, float("-inf"))
    res = []
    for b in (bias, inf_bias):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = torch.ops.locattn.attention(*leaves, None, b, 0.25, False, spec, impl)
        res.append((out, lse, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out, lse, dq = res[0][:3]
    assert not out[:, :, 3].any() and bool((lse[:, :, 3] == float("-inf")).all()) and not dq[:, :, 3].any()
    assert out[:, 1, 5].abs().sum() > 0
    assert bool((lse[:, 0, 7] == float("-inf")).all()) == (dtype != torch.float16)  # -1e4: an ordinary bias


@pytest.mark.parametrize("impl", IMPLS + ["cpu"])
def test_rows_biased_far_from_zero_stay_ordinary(impl):
    """A row whose every key carries a -1e4 bias (diffusers' mask value; above BIAS_MASK_BELOW) is the softmax of
    its scores, as in SDPA, forward and backward — to fp32's resolution there: a score near -1e4 has an fp32 ulp
    of ~1e-3, so every fp32 implementation (SDPA's too) is that far from the fp64 answer."""
    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 12, 8, generator=gen, requires_grad=True) for _ in range(3))
    bias = torch.zeros(12, 12)
    bias[4] = -1e4
    g = torch.randn(1, 1, 12, 8, generator=gen)
    out, lse = torch.ops.locattn.attention(q, k, v, None, bias, 0.3, False, spec, impl)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in (q, k, v)),
                                                                attn_mask=bias.double(), scale=0.3)
    assert -1.01e4 < lse[0, 0, 4] < -0.99e4
    torch.testing.assert_close(out, want.float(), atol=2e-3, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g.double())):
        torch.testing.assert_close(a, b.float(), atol=2e-3, rtol=0)


def test_auto_dispatch_of_causal_nonpositive_scale():
    """ATen's CPU flash kernel returns NaN rows for causal attention with scale <= 0: the cpu path declines it
    (counted) and auto dispatch runs blocked, equal to the reference."""
    import locattn

    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    for scale in (0.0, -0.25):
        locattn.reset_counters()
        out, lse = torch.ops.locattn.attention(q, k, v, None, None, scale, True, spec, "")
        assert locattn.counters()["dispatch"]["skip cpu: causal with scale <= 0 (ATen's CPU flash kernel returns NaN " \
            "rows)"] == 1
        want, want_lse = torch.ops.locattn.attention(q, k, v, None, None, scale, True, spec, "reference")
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("impl", IMPLS + ["cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_bias_beside_half_inputs(impl, dtype):
    """An fp32 bias beside fp16 / bf16 q, k, v is added in fp32 by every implementation (the cpu path used to
    round it to q's dtype: a 7e4 bias became inf in fp16, and bf16 rounding moved lse by ~0.2)."""
    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 8, 8, generator=gen).to(dtype) for _ in range(3))
    bias = 30 * torch.randn(8, 8, generator=gen)
    bias[1, :2] = 7e4
    out, lse = torch.ops.locattn.attention(q, k, v, None, bias, 0.3, False, spec, impl)
    want, want_lse = torch.ops.locattn.attention(q.double(), k.double(), v.double(), None, bias.double(), 0.3,
                                                 False, spec, "reference")
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_bad_inputs_get_clear_errors():
    """The op checks its contract before any implementation runs (shapes, dtypes, a finite scale, head groups
    covering every head once); patterns and layouts check their parameters when built (the policy checks them
    with file and line; this guards code and hand-written specs)."""
    from locattn.patterns import Layout as L, SlidingWindow, Strided, Tiled
    from locattn.patterns.base import PatternError

    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    q = torch.randn(1, 4, 12, 8)
    kv = torch.randn(1, 2, 12, 8)
    bad = [((q[0], q[0], q[0], None, None, 1.0), "must be 4-D"),
           ((q, kv.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1), None, None, 1.0), "batch sizes differ"),
           ((q, kv, kv[:, :, :11], None, None, 1.0), "differ in heads or length"),
           ((q, kv[..., :7], kv, None, None, 1.0), "head dim 8 != k head dim 7"),
           ((q, kv[:, :1].expand(1, 3, 12, 8), kv[:, :1].expand(1, 3, 12, 8), None, None, 1.0), "not a multiple"),
           ((q, kv, kv, torch.zeros(12, 12), None, 1.0), "mask must be bool"),
           ((q, kv, kv, None, torch.zeros(12, 12, dtype=torch.int32), 1.0), "bias must be floating point"),
           ((q, kv, kv, None, None, float("nan")), "scale must be finite")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            torch.ops.locattn.attention(*args, False, spec, "")
    partial = SiteSpec((_spec("dense", {}, None, 0, 0, 0, heads=(0, 1)),)).to_json()
    with pytest.raises(ValueError, match="cover heads 0..3 once each"):
        torch.ops.locattn.attention(q, kv, kv, None, None, 1.0, False, partial, "")
    for make, msg in ((lambda: SlidingWindow(window=-1), "'window' must be >= 0"),
                      (lambda: Tiled(tile=(0, 2), window=(1, 1)), "'tile' must be >= 1"),
                      (lambda: Strided(kernel=(3, 3), stride=(2, 0)), "'stride' must be >= 1"),
                      (lambda: L(prefix=-1), "prefix must be >= 0"), (lambda: L(grid=(0, 4)), "grid sizes")):
        with pytest.raises(PatternError, match=msg):
            make()


def test_opcheck():
    spec = SiteSpec((_spec("sliding_window", {"window": 4}, None, 0, 0, 0),)).to_json()
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 33, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.locattn.attention.default, (q, k, v, None, bias, 0.2, True, spec, ""))
    for impl in IMPLS + ["cpu"]:  # every implementation returns SDPA's memory layout: [B, S, H, Dv] transposed
        out, _ = torch.ops.locattn.attention(q, k, v, None, None, 0.2, False, spec, impl)
        assert out.transpose(1, 2).is_contiguous(), impl


def test_override_that_cannot_run_raises():
    from locattn.codegen.registry import BackendUnavailable

    spec = SiteSpec((_spec("dense", {}, None, 0, 0, 0),)).to_json()
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(BackendUnavailable, match="unknown locattn backend 'nope'"):
        torch.ops.locattn.attention(q, q, q, None, None, 1.0, False, spec, "nope")
