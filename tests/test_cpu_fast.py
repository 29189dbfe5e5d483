"""The fast CPU implementation ("cpu") against the fp64 reference: every pattern kind, forward and backward."""

import subprocess
import sys
import textwrap

import pytest
import torch

import locattn
import locattn.codegen.cpu_fast as cpu_fast
from locattn.codegen import registry
from locattn.codegen.registry import AttentionCall
from locattn.patterns import PATTERNS, Layout
from locattn.patterns.spec import HeadGroup, SiteSpec
from locattn.testing import assert_close_to_golden

CASES = [
    # id, kind, params, grid, prefix, suffix, sinks, n tokens
    ("dense", "dense", {}, None, 0, 0, 0, 63),
    ("sw1d-w5", "sliding_window", {"window": 5}, None, 0, 0, 0, 63),
    ("sw1d-w20-s200", "sliding_window", {"window": 20}, None, 0, 0, 0, 200),
    ("sw1d-dil2-causal", "sliding_window", {"window": 9, "dilation": 2, "causal": True}, None, 0, 0, 0, 125),
    ("sw2d-sinks", "sliding_window", {"window": [1, 2]}, (5, 7), 0, 0, 3, 35),
    ("na1d-globals-sinks", "neighborhood", {"kernel": 17}, None, 3, 2, 6, 125),
    ("na2d-dil-globals", "neighborhood", {"kernel": [3, 3], "dilation": [1, 2]}, (5, 7), 2, 3, 4, 40),
    ("na2d-84x19", "neighborhood", {"kernel": [7, 5]}, (84, 19), 0, 0, 0, 1596),
    ("na3d-dil", "neighborhood", {"kernel": [3, 3, 3], "dilation": [1, 1, 2]}, (3, 5, 6), 0, 0, 0, 90),
    ("strided2d", "strided", {"kernel": [4, 3], "stride": [2, 3]}, (5, 7), 0, 0, 0, 35),
    ("strided3d-causal", "strided", {"kernel": [2, 3, 4], "stride": [1, 3, 2], "causal": [True, False, False]},
     (3, 5, 6), 0, 0, 0, 90),
    ("tiled2d", "tiled", {"tile": [2, 2], "window": [1, 3]}, (5, 7), 0, 4, 0, 39),
    ("shifted2d", "shifted_window", {"window": [2, 3], "shift": [1, 1]}, (5, 7), 1, 0, 0, 36),
]
SITES = ["plain", "causal", "mask", "bias-gqa"]


def _group(kind, params, grid, prefix, suffix, sinks, heads=None):
    p = PATTERNS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    lay = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks) if p.local else Layout()
    return HeadGroup(heads, p, lay)


def _run(impl, spec, q, k, v, mask, bias, scale, causal, dtype=None):
    """(out, lse, *grads of q, k, v[, bias]) of one op call; inputs cast to ``dtype`` first."""
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    cast = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) if t is not None else None
            for t in (q, k, v, bias)]
    out, lse = torch.ops.locattn.attention(*cast[:3], mask, cast[3], scale, causal, spec.to_json(), impl)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in cast if t is not None and t.requires_grad], g)
    assert len(grads) == len(leaves)
    return (out, lse, *grads)


def _check(got, gold, eager=None, name=""):
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    assert len(got) == len(gold)
    for i, (a, b) in enumerate(zip(got, gold)):
        assert a.shape == b.shape, f"{name} {names[i]}: shape {a.shape} != {b.shape}"
        e = eager[i].detach() if eager is not None else None
        assert_close_to_golden(a.detach(), b.detach(), e, name=f"{name} {names[i]}")


def _inputs(n, hq, hk, d, dv, site, dtype=torch.float64, n_k=None):
    n_k = n_k or n
    q = torch.randn(2, hq, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(2, hk, n_k, d, dtype=dtype, requires_grad=True)
    v = torch.randn(2, hk, n_k, dv, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 1, n, n_k) > 0.3 if site == "mask" else None
    # the bias takes no gradient here (the kernel path); bias gradients are tested separately
    bias = torch.randn(1, hq, n, n_k, dtype=dtype) if site == "bias-gqa" else None
    return q, k, v, mask, bias


@pytest.fixture
def tiles():
    """Force the CPU path's segment sizes (small tiles reach multi-segment runs and folded key windows)."""
    impl = registry.get("cpu")

    def set_tiles(t):
        impl.tiles = t
        cpu_fast.window_plan.cache_clear()

    yield set_tiles
    set_tiles(None)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("site", SITES)
def test_matches_reference_fp64(case, site):
    name, kind, params, grid, prefix, suffix, sinks, n = case
    if name == "na2d-84x19" and site != "plain":
        pytest.skip("the large grid runs once")
    hq, hk = (4, 2) if site == "bias-gqa" else (2, 2)
    d, dv = (72, 72) if name == "na2d-84x19" else (40, 24)
    spec = SiteSpec((_group(kind, params, grid, prefix, suffix, sinks),))
    q, k, v, mask, bias = _inputs(n, hq, hk, d, dv, site)
    args = (spec, q, k, v, mask, bias, 0.3, site == "causal")
    _check(_run("cpu", *args), _run("reference", *args), name=f"{name}/{site}")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "na2d-84x19"], ids=lambda c: c[0])
def test_matches_reference_fp32(case):
    """fp32: error against the fp64 reference within 3x the fp32 reference's own error."""
    name, kind, params, grid, prefix, suffix, sinks, n = case
    spec = SiteSpec((_group(kind, params, grid, prefix, suffix, sinks),))
    q, k, v, mask, bias = _inputs(n, 4, 2, 40, 40, "plain")
    args = (spec, q, k, v, mask, bias, 0.3, True)
    gold = _run("reference", *args)
    _check(_run("cpu", *args, dtype=torch.float32), gold, _run("reference", *args, dtype=torch.float32), name)


TILED = [
    ("sw1d", "sliding_window", {"window": 20}, (200,), (16,), 200),
    ("sw1d-dil", "sliding_window", {"window": 9, "dilation": 2}, (125,), (8,), 125),
    ("na1d-sinks", "neighborhood", {"kernel": 17}, (197,), (32,), 200),
    ("na2d-dil", "neighborhood", {"kernel": [5, 7], "dilation": [1, 2]}, (12, 19), (2, 4), 228),
    ("na3d", "neighborhood", {"kernel": [3, 3, 5]}, (3, 5, 6), (1, 2, 4), 90),
    ("strided3d", "strided", {"kernel": [3, 3, 5], "stride": [1, 2, 3]}, (3, 5, 6), (2, 2, 2), 90),
    ("tiled2d", "tiled", {"tile": [3, 4], "window": [3, 1]}, (12, 19), (4, 4), 228),
    ("shifted2d", "shifted_window", {"window": [4, 6], "shift": [2, 3]}, (12, 19), (4, 8), 228),
]


@pytest.mark.parametrize("case", TILED, ids=[c[0] for c in TILED])
@pytest.mark.parametrize("site", ["plain", "causal", "mask"])
@pytest.mark.parametrize("chunk", ["whole", "chunked"])
def test_forced_tiles(case, site, chunk, tiles, monkeypatch):
    """Small forced segments: runs of overlapping windows, per-block border masks, strips, chunked calls."""
    name, kind, params, grid, t, n = case
    tiles(t)
    if chunk == "chunked":
        monkeypatch.setattr(cpu_fast, "CHUNK_ELEMS", 3000)
    prefix = n - grid[0] if len(grid) == 1 else 0
    spec = SiteSpec((_group(kind, params, grid if len(grid) > 1 else None, prefix, 0, prefix + 2 if prefix else 0),))
    q, k, v, mask, bias = _inputs(n, 2, 1, 32, 32, site)
    args = (spec, q, k, v, mask, bias, 0.25, site == "causal")
    _check(_run("cpu", *args), _run("reference", *args), name=f"{name}/{site}/{chunk}")


@pytest.mark.parametrize("kind", ["dense", "sliding_window", "neighborhood"])
def test_strided_inputs(kind):
    """q/k/v as the transposed views a model passes ([B, S, H, D] memory): the kernel reads them in place."""
    params = {"dense": {}, "sliding_window": {"window": 9}, "neighborhood": {"kernel": [3, 5]}}[kind]
    spec = SiteSpec((_group(kind, params, (7, 9) if kind == "neighborhood" else None, 0, 0, 0),))
    x = torch.randn(2, 63, 4, 16, dtype=torch.float64)
    kv = torch.randn(2, 63, 2, 4, 16, dtype=torch.float64)
    q = x.transpose(1, 2).requires_grad_()
    k, v = (t.requires_grad_() for t in kv.permute(2, 0, 3, 1, 4).unbind(0))
    args = (spec, q, k, v, None, None, 0.25, kind == "sliding_window")
    _check(_run("cpu", *args), _run("reference", *args), name=f"strided {kind}")


def test_cross_attention_dense_dv_differs():
    spec = SiteSpec((_group("dense", {}, None, 0, 0, 0),))
    q, k, v, mask, bias = _inputs(50, 6, 3, 72, 40, "mask", n_k=17)
    args = (spec, q, k, v, mask, bias, 72 ** -0.5, True)
    _check(_run("cpu", *args), _run("reference", *args), name="cross")


def test_per_head_groups_and_bias_gradient():
    g1 = _group("shifted_window", {"window": [2, 3], "shift": [1, 1]}, (5, 7), 0, 0, 0, heads=(0, 3))
    g2 = _group("tiled", {"tile": [2, 2], "window": [1, 3]}, (5, 7), 0, 0, 0, heads=(1, 2))
    q, k, v, _, _ = _inputs(35, 4, 2, 16, 16, "plain")
    bias = torch.randn(1, 4, 35, 35, dtype=torch.float64, requires_grad=True)   # dbias: delegated to blocked
    args = (SiteSpec((g1, g2)), q, k, v, None, bias, 0.25, False)
    locattn.reset_counters()
    got = _run("cpu", *args)
    assert len(got) == 6
    # each head group's backward delegated to blocked (the kernel's backward has no dS), counted
    assert locattn.counters()["dispatch"]["blocked: cpu backward with a bias gradient"] == 2
    _check(got, _run("reference", *args), name="per-head")


@pytest.mark.parametrize("kind", ["dense", "neighborhood"])
def test_empty_rows(kind):
    """Rows whose keys are all masked: out = 0, lse = -inf, finite gradients (the kernel itself gives lse 0)."""
    grid = (6, 6)
    spec = SiteSpec((_group(kind, {} if kind == "dense" else {"kernel": [3, 3]}, grid, 0, 0, 0),))
    q, k, v, _, _ = _inputs(36, 2, 2, 16, 16, "plain")
    mask = torch.rand(36, 36) > 0.5
    mask[[0, 7, 35]] = False
    got = _run("cpu", spec, q, k, v, mask, None, 0.25, False)
    assert torch.isneginf(got[1][:, :, [0, 7, 35]]).all()
    assert (got[0][:, :, [0, 7, 35]] == 0).all()
    _check(got, _run("reference", spec, q, k, v, mask, None, 0.25, False), name="empty rows")


def test_bfloat16():
    spec = SiteSpec((_group("neighborhood", {"kernel": [3, 5]}, (8, 9), 0, 0, 0),))
    q, k, v, mask, bias = _inputs(72, 2, 2, 64, 64, "plain")
    args = (spec, q, k, v, mask, bias, 0.125, False)
    gold = _run("reference", *args)
    _check(_run("cpu", *args, dtype=torch.bfloat16), gold, _run("reference", *args, dtype=torch.bfloat16), "bf16")


def test_dispatch_and_can_run():
    """CPU tensors dispatch to "cpu" before "blocked"; tensors elsewhere are declined with a reason."""
    names = [i.name for i in registry.IMPLEMENTATIONS]
    assert names.index("cpu") < names.index("blocked")
    p = PATTERNS["sliding_window"](window=2)
    cpu = torch.randn(1, 1, 8, 4)
    call = AttentionCall(cpu, cpu, cpu, None, None, 0.5, False, p, Layout(grid=(8,)))
    assert registry.select(call).name == "cpu"
    meta = torch.empty(1, 1, 8, 4, device="meta")
    ok, why = registry.get("cpu").can_run(AttentionCall(meta, meta, meta, None, None, 0.5, False, p, Layout(grid=(8,))))
    assert not ok and "meta" in why


def test_opcheck():
    spec = SiteSpec((_group("neighborhood", {"kernel": [3, 3]}, (4, 5), 1, 0, 2),)).to_json()
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.locattn.attention.default, (q, k, v, None, None, 0.2, True, spec, "cpu"))


def test_memory_is_linear_in_sequence_length():
    """S = 32768, window 128: forward + backward peak RSS growth far below one S x S fp32 matrix (4 GiB)."""
    code = textwrap.dedent("""
        import resource, torch, locattn.ops
        from locattn.patterns import Layout, SlidingWindow
        from locattn.patterns.spec import HeadGroup, SiteSpec
        S = 32768
        spec = SiteSpec((HeadGroup(None, SlidingWindow(window=128), Layout()),)).to_json()
        q, k, v = (torch.randn(1, 1, S, 32, requires_grad=True) for _ in range(3))
        g = torch.randn(1, 1, S, 32)
        small = [t[:, :, :1024].detach().requires_grad_() for t in (q, k, v)]
        o, _ = torch.ops.locattn.attention(*small, None, None, 0.2, False, spec, "cpu")   # warm up, small
        o.backward(g[:, :, :1024])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        o, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.2, False, spec, "cpu")
        o.backward(g)
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    peak = int(res.stdout.strip().splitlines()[-1])
    assert peak < (1 << 30), f"peak RSS grew by {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 50), (1, 1, 40, 50), (2, 3, 1, 50), (40, 50)],
                         ids=["key-padding", "shared", "per-head-row", "2d"])
def test_dense_broadcast_mask_passed_as_it_is(shape, causal, monkeypatch):
    """A broadcast mask reaches ATen's kernel in its own shape (a key-padding mask is not expanded to S x S), in the
    forward and the backward; rows left empty by mask and causal together get lse = -inf like the reference."""
    seen = []
    flash, flash_bwd = cpu_fast._FLASH, cpu_fast._FLASH_BWD
    monkeypatch.setattr(cpu_fast, "_FLASH", lambda *a, **k: seen.append(k["attn_mask"].shape) or flash(*a, **k))
    monkeypatch.setattr(cpu_fast, "_FLASH_BWD", lambda *a, **k: seen.append(k["attn_mask"].shape) or
                        flash_bwd(*a, **k))
    spec = SiteSpec((_group("dense", {}, None, 0, 0, 0),))
    q, k, v, _, _ = _inputs(40, 3, 3, 16, 16, "plain", n_k=50)
    mask = torch.rand(shape) > 0.4
    mask[..., :3] = False                     # causal rows 0-2 have no key left
    if shape[-2] > 1:
        mask[..., 7, :] = False               # a row with no key at all
    args = (spec, q, k, v, mask, None, 0.25, causal)
    got = _run("cpu", *args)
    want4 = (1,) * (4 - len(shape)) + tuple(shape)
    assert seen == [torch.Size(want4)] * 2
    if causal:
        assert torch.isneginf(got[1][:, :, :3]).all()
    _check(got, _run("reference", *args), name=f"mask {shape}")
