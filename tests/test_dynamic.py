"""The ``dynamic`` pattern (content-dependent top-p block selection) and queries at an offset, against
definitions written out in the tests: a brute-force selection (Python loops over pooled scores) and fp64
masked attention."""

import itertools
import math

import pytest
import torch

from golden import golden_attention, golden_mask
from locattn.patterns import Dynamic, Layout, Neighborhood, PatternError, SlidingWindow
from locattn.patterns.dynamic import select_blocks
from locattn.patterns.plan import build_plan
from locattn.patterns.spec import HeadGroup, SiteSpec, parse_spec
from locattn.patterns.tables import block_rows, static_tables
from locattn.policy import Policy, PolicyError

IMPLS = ["reference", "blocked", "cpu"]


# ----------------------------------------------------------------------------------------------------------
# the definition, written out


def bf_blocks(grid, tile, prefix):
    """Token lists of the pooling blocks: tiles row-major over the tile grid, tokens row-major in a tile."""
    n_tiles = [math.ceil(n / t) for n, t in zip(grid, tile)]
    out = []
    for ti in itertools.product(*[range(x) for x in n_tiles]):
        toks = []
        for off in itertools.product(*[range(t) for t in tile]):
            c = [a * t + o for a, t, o in zip(ti, tile, off)]
            if all(x < n for x, n in zip(c, grid)):
                tok = 0
                for x, n in zip(c, grid):
                    tok = tok * n + x
                toks.append(prefix + tok)
        out.append(toks)
    return out


def bf_select(q, k, scale, blocks, top_p, min_b, max_b, causal, q_offset=0):
    """kept[b][h] = set of (I, J) by the written definition (fp64, Python loops)."""
    B, Hq, Sq, D = q.shape
    rep = Hq // k.shape[1]
    out = {}
    for b in range(B):
        for h in range(Hq):
            def mean(x, toks):
                rows = [t for t in toks if 0 <= t < x.shape[0]]
                return sum((x[t] for t in rows), torch.zeros(D, dtype=torch.float64)) / max(1, len(rows))
            qbar = [mean(q[b, h].double(), [t - q_offset for t in bl]) for bl in blocks]
            kbar = [mean(k[b, h // rep].double(), bl) for bl in blocks]
            kept = set()
            for i, bi in enumerate(blocks):
                allowed = [j for j, bj in enumerate(blocks) if not causal or min(bj) <= max(bi)]
                s = {j: scale * float(qbar[i] @ kbar[j]) for j in allowed}
                mx = max(s.values())
                e = {j: math.exp(s[j] - mx) for j in allowed}
                z = sum(e.values())
                p = {j: e[j] / z for j in allowed}
                order = sorted(allowed, key=lambda j: (-p[j], j))
                if top_p >= 1:
                    n = len(order)
                else:
                    n, mass = 0, 0.0
                    for j in order:
                        if mass >= top_p:
                            break
                        mass += p[j]
                        n += 1
                n = min(max(n, min_b), len(order))
                if max_b:
                    n = min(n, max_b)
                kept |= {(i, j) for j in order[:n]} | {(i, i)}
            out[b, h] = kept
    return out


def bf_allowed(pattern, layout, kept, s_q, s_k, q_offset, blocks):
    """[B, H, S_q, S_k] bool: the dynamic predicate from a brute-force selection (site terms not included)."""
    blk = {t: i for i, bl in enumerate(blocks) for t in bl}
    grid_toks = set(blk)
    base = (golden_mask(pattern.base.name, pattern.base.to_params(), layout.grid, s_k, layout.prefix, layout.suffix,
                        layout.sinks) if pattern.base is not None else None)
    B = max(b for b, _ in kept) + 1
    H = max(h for _, h in kept) + 1
    out = torch.zeros(B, H, s_q, s_k, dtype=torch.bool)
    for (b, h), ks in kept.items():
        for r in range(s_q):
            i = r + q_offset
            for j in range(s_k):
                ok = i not in grid_toks or j not in grid_toks or j < layout.sinks
                ok = ok or ((blk[i], blk[j]) in ks and (not pattern.causal or j <= i))
                ok = ok or (base is not None and bool(base[i, j]))
                out[b, h, r, j] = ok
    return out


# ----------------------------------------------------------------------------------------------------------

SEL_CASES = [
    # id, pattern, grid, prefix, suffix, hq, hk, s_q offset
    ("1d", Dynamic(block=16, top_p=0.5), None, 0, 0, 2, 2, 0),
    ("1d-causal-gqa", Dynamic(block=8, top_p=0.7, causal=True), None, 0, 0, 4, 2, 0),
    ("1d-minmax", Dynamic(block=12, top_p=0.3, min_blocks=3, max_blocks=4), None, 0, 0, 2, 1, 0),
    ("1d-all", Dynamic(block=16, top_p=1.0, causal=True), None, 0, 0, 2, 2, 0),
    ("1d-offset-causal", Dynamic(block=8, top_p=0.6, causal=True), None, 0, 0, 2, 2, 37),
    ("2d-globals", Dynamic(tile=(3, 4), top_p=0.6), (7, 9), 3, 2, 2, 2, 0),
    ("3d", Dynamic(tile=(2, 2, 4), top_p=0.8, max_blocks=5), (3, 4, 6), 0, 0, 2, 2, 0),
]


@pytest.mark.parametrize("case", SEL_CASES, ids=[c[0] for c in SEL_CASES])
def test_selection_matches_brute_force(case):
    _, pattern, grid, prefix, suffix, hq, hk, off = case
    n = (math.prod(grid) if grid else 61) + prefix + suffix
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix).resolve(n)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, hq, n - off, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, n, 16, generator=g, dtype=torch.float64)
    kept = select_blocks(pattern, layout, q, k, 0.5, off)
    blocks = bf_blocks(layout.grid, pattern.tile_for(layout.grid), prefix)
    want = bf_select(q, k, 0.5, blocks, pattern.top_p, pattern.min_blocks, pattern.max_blocks, pattern.causal, off)
    present = {i for i, bl in enumerate(blocks) if any(t >= off for t in bl)}  # query blocks with a query row
    for (b, h), ks in want.items():
        got = {(i, j) for i, j in torch.nonzero(kept[b, h]).tolist() if i in present}
        assert got == {(i, j) for i, j in ks if i in present}, (b, h)


OP_CASES = [
    # id, pattern, grid, prefix, suffix, sinks, hq, hk, s_q offset, site causal, mask
    ("1d", Dynamic(block=16, top_p=0.5), None, 0, 0, 0, 2, 2, 0, False, False),
    ("1d-causal-base-sinks", Dynamic(block=16, top_p=0.4, causal=True, base=SlidingWindow(window=5, causal=True)),
     None, 0, 0, 3, 4, 2, 0, True, False),
    ("1d-max-mask-gqa", Dynamic(block=8, top_p=0.6, max_blocks=3), None, 0, 0, 0, 4, 1, 0, False, True),
    ("1d-decode-offset", Dynamic(block=16, top_p=0.5, causal=True, base=SlidingWindow(window=9, causal=True)),
     None, 0, 0, 2, 2, 2, 50, False, False),
    ("2d-globals-base", Dynamic(tile=(4, 4), top_p=0.5, base=Neighborhood(kernel=(3, 3))), (9, 10), 2, 3, 0, 2, 2,
     0, False, False),
    ("3d", Dynamic(tile=(2, 4, 4), top_p=0.6), (4, 5, 6), 0, 0, 4, 2, 2, 0, False, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_matches_golden(impl, case):
    _, pattern, grid, prefix, suffix, sinks, hq, hk, off, site_causal, with_mask = case
    n = (math.prod(grid) if grid else 125) + prefix + suffix
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks)
    spec = SiteSpec((HeadGroup(None, pattern, layout),)).to_json()
    g = torch.Generator().manual_seed(3)
    dt = torch.float64
    q = torch.randn(2, hq, n - off, 24, generator=g, dtype=dt, requires_grad=True)
    k = torch.randn(2, hk, n, 24, generator=g, dtype=dt, requires_grad=True)
    v = torch.randn(2, hk, n, 16, generator=g, dtype=dt, requires_grad=True)
    mask = torch.rand(2, 1, 1, n, generator=g) > 0.2 if with_mask else None
    out, lse = torch.ops.locattn.attention(q, k, v, mask, None, 0.4, site_causal, spec, impl)
    go = torch.randn(out.shape, generator=g, dtype=dt)
    grads = torch.autograd.grad(out, (q, k, v), go)

    res = layout.resolve(n)
    blocks = bf_blocks(res.grid, pattern.tile_for(res.grid), prefix)
    kept = bf_select(q.detach(), k.detach(), 0.4, blocks, pattern.top_p, pattern.min_blocks, pattern.max_blocks,
                     pattern.causal, off)
    allowed = bf_allowed(pattern, res, kept, n - off, n, off, blocks)
    if site_causal:
        allowed &= torch.ones(n - off, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed &= mask
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = golden_attention(*leaves, allowed, 0.4)
    want_grads = torch.autograd.grad(want, leaves, go)
    torch.testing.assert_close(out, want.to(out.dtype), atol=1e-9, rtol=1e-9)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


OFFSET_CASES = [
    ("sw-causal-sinks", SlidingWindow(window=7, causal=True), Layout(sinks=4)),
    ("na-causal", Neighborhood(kernel=9, causal=True), Layout()),
    ("sw-causal-dilated-prefix", SlidingWindow(window=8, dilation=2, causal=True), Layout(prefix=3)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s_q", [1, 21, 70])
@pytest.mark.parametrize("case", OFFSET_CASES, ids=[c[0] for c in OFFSET_CASES])
def test_causal_rule_aligns_queries_bottom_right(impl, s_q, case):
    """S_q < S_k under a causal rule: the queries are the last S_q positions (LM decoding with a KV cache)."""
    _, pattern, layout = case
    n = 83
    spec = SiteSpec((HeadGroup(None, pattern, layout),)).to_json()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, s_q, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    out, _ = torch.ops.locattn.attention(q, k, v, None, None, 0.3, False, spec, impl)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go)
    res = layout.resolve(n)
    allowed = golden_mask(pattern.name, pattern.to_params(), res.grid, n, res.prefix, res.suffix, res.sinks)[n - s_q:]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = golden_attention(*leaves, allowed, 0.3)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, torch.autograd.grad(want, leaves, go)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", [c for c in OP_CASES if c[0] in ("1d-causal-base-sinks", "1d-max-mask-gqa",
                                                                     "2d-globals-base")], ids=lambda c: c[0])
def test_cpu_table_executor_split_into_one_row_per_call(monkeypatch, case):
    """The ``cpu`` table executor with one query block per fused call: every call gathers its keys into the same
    per-thread workspace and scatters its key gradients with duplicates across calls (per-(b, h) tables)."""
    from locattn.codegen import cpu_tables

    monkeypatch.setattr(cpu_tables, "CALL_ELEMS", 1)
    test_op_matches_golden("cpu", case)


def test_cpu_table_executor_split_with_shared_tables(monkeypatch):
    """Static tables shared by every (batch, head) (queries at an offset), one query block per call."""
    from locattn.codegen import cpu_tables

    monkeypatch.setattr(cpu_tables, "CALL_ELEMS", 1)
    test_causal_rule_aligns_queries_bottom_right("cpu", 70, OFFSET_CASES[0])


def test_non_causal_local_rule_refuses_fewer_queries():
    spec = SiteSpec((HeadGroup(None, SlidingWindow(window=3), Layout()),)).to_json()
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 9, 8)
    with pytest.raises(PatternError, match="needs self-attention"):
        torch.ops.locattn.attention(q, k, k, None, None, 0.3, False, spec, "reference")


# ----------------------------------------------------------------------------------------------------------
# tables


def test_static_tables_are_the_plan_shared_by_every_head():
    plan = build_plan(Neighborhood(kernel=(3, 5)), Layout(grid=(9, 13), sinks=3).resolve(117), 117, 117, 16, 16)
    t = static_tables(plan, torch.device("cpu"))
    assert t.n_tables == 1 and t.strides(8) == (0, 0)
    want = {(r, int(c), bool(f)) for r, c, f in plan.pairs()}
    got = set()
    for m in range(plan.n_qblocks):
        full, part, _ = block_rows(t, 0, m)
        got |= {(m, c, True) for c in full} | {(m, c, False) for c in part}
    assert got == want


# ----------------------------------------------------------------------------------------------------------
# policy


def test_policy_parses_dynamic_and_round_trips(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[[rule]]\nmatch = "*"\npattern = "dynamic"\nblock = 32\ntop_p = 0.8\nmax_blocks = 6\n'
                 'causal = true\nsinks = 4\nbase = {pattern = "sliding_window", window = 64, causal = true}\n')
    pol = Policy.load(p)
    pat = pol.rules[0].pattern
    assert pat == Dynamic(block=32, top_p=0.8, max_blocks=6, causal=True,
                          base=SlidingWindow(window=64, causal=True))
    again = Policy.from_dict(__import__("tomllib").loads(pol.to_toml()))
    assert again.rules[0].pattern == pat
    spec = SiteSpec((HeadGroup(None, pat, Layout(sinks=4)),))
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize("body,key", [
    ('top_p = 0.0', "top_p"), ('top_p = 1.5', "top_p"), ('min_blocks = 5\nmax_blocks = 2', "min_blocks"),
    ('base = {pattern = "dynamic"}', "base"), ('base = {pattern = "dense"}', "base"),
    ('base = {pattern = "sliding_window", windw = 3}', "base.windw"), ('top_p = "high"', "top_p"),
    ('block = 0', "block"), ('base = 3', "base"),
])
def test_policy_rejects_bad_dynamic_keys(tmp_path, body, key):
    p = tmp_path / "p.toml"
    p.write_text(f'version = 1\n\n[[rule]]\nmatch = "a.*"\npattern = "dynamic"\n{body}\n')
    with pytest.raises(PolicyError, match=rf"p.toml:3: rule #0 \(match=\['a.\*'\]\): key '{key}'"):
        Policy.load(p)


def test_dynamic_tile_must_fit_the_grid():
    with pytest.raises(PatternError, match="tile"):
        Dynamic(tile=(4, 40)).validate((8, 8))
    with pytest.raises(PatternError, match="causal"):
        Dynamic(causal=True).validate((8, 8))


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_dynamic_tables_count_pairs_exactly(case):
    from locattn.codegen.blocked import call_tables
    from locattn.codegen.reference import keep_mask
    from locattn.codegen.registry import AttentionCall
    _, pattern, grid, prefix, suffix, sinks, hq, hk, off, site_causal, _ = case
    n = (math.prod(grid) if grid else 125) + prefix + suffix
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks).resolve(n)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, hq, n - off, 24, generator=g)
    k = torch.randn(2, hk, n, 24, generator=g)
    call = AttentionCall(q, k, k, None, None, 0.4, site_causal, pattern, layout, q_offset=off)
    t = call_tables(call, 64, 64)
    want = keep_mask(call, torch.arange(n - off)[:, None], torch.arange(n)[None, :]).sum((-1, -2)).flatten()
    assert torch.equal(t.pairs, want)


# ----------------------------------------------------------------------------------------------------------
# Triton, under the interpreter (fp32: compared with the reference implementation on the same inputs, whose
# selection is the same fp32 computation; the reference itself is checked against the brute force above)


@pytest.fixture
def interpret(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the Triton kernels run under the interpreter on CPU only")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the kernels are first imported (interpreter mode)
    from locattn.codegen.triton_impl import interpreted
    if not interpreted():
        pytest.skip("the kernels were built without the interpreter in this process")


TRITON_CASES = [c for c in OP_CASES if c[0] in ("1d-causal-base-sinks", "1d-decode-offset", "2d-globals-base")]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(interpret, case):
    from locattn.codegen.triton_impl import Triton
    _, pattern, grid, prefix, suffix, sinks, hq, hk, off, site_causal, with_mask = case
    n = (math.prod(grid) if grid else 125) + prefix + suffix
    layout = Layout(grid=grid, prefix=prefix, suffix=suffix, sinks=sinks)
    spec = SiteSpec((HeadGroup(None, pattern, layout),)).to_json()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, hq, n - off, 24, generator=g, requires_grad=True)
    k = torch.randn(2, hk, n, 24, generator=g, requires_grad=True)
    v = torch.randn(2, hk, n, 16, generator=g, requires_grad=True)
    go = torch.randn(2, hq, n - off, 16, generator=g)
    res = {}
    for impl in ("reference", "triton"):
        out, lse = torch.ops.locattn.attention(q, k, v, None, None, 0.4, site_causal, spec, impl)
        res[impl] = (out, lse, *torch.autograd.grad(out, (q, k, v), go))
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert Triton().can_run(__import__("locattn").codegen.registry.AttentionCall(
        q, k, v, None, None, 0.4, site_causal, pattern, layout.resolve(n), off))[0]


def test_triton_declines_pooling_blocks_it_cannot_tile(interpret):
    from locattn.codegen.registry import AttentionCall
    from locattn.codegen.triton_impl import Triton
    q = torch.randn(1, 1, 64, 16)
    ok, why = Triton().can_run(AttentionCall(q, q, q, None, None, 0.3, False, Dynamic(block=24), Layout().resolve(64)))
    assert not ok and "pooling block of 24 tokens" in why


# ----------------------------------------------------------------------------------------------------------
# through torch.compile


class _CausalLM(torch.nn.Module):
    def __init__(self, dim=48, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hk, self.d).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


def _compiled_grads(model, x, policy, backend, inductor):
    import locattn
    torch._dynamo.reset()
    m = torch.compile(model, backend=locattn.backend(policy=policy, backend=backend, inductor=inductor))
    x = x.clone().requires_grad_()
    y = m(x)
    y.square().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("which", ["lm", "dit"])
def test_compiled_models_with_dynamic_policies(which, monkeypatch):
    """Compiled models, forward and backward: the cpu path (through Inductor), the reference and (interpreted)
    Triton (rewritten graphs run eagerly) give the same results, and the sites were rewritten."""
    import locattn
    if which == "lm":
        model = _CausalLM()
        x = torch.randn(2, 150, 48)
        policy = {"rule": [{"match": "*", "pattern": "dynamic", "block": 16, "top_p": 0.6, "causal": True,
                            "sinks": 4, "base": {"pattern": "sliding_window", "window": 16, "causal": True}}]}
    else:
        import importlib.util
        from pathlib import Path
        spec = importlib.util.spec_from_file_location(
            "dit_model", Path(__file__).resolve().parents[1] / "examples" / "dit_model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TinyDiT(dim=32, heads=2, layers=2)
        x = torch.randn(1, 4, 20, 24)
        policy = {"rule": [{"match": "*", "pattern": "dynamic", "tile": [4, 4], "top_p": 0.5, "grid": "auto"}]}
    impls = ["reference", "cpu"]
    if not torch.cuda.is_available() and __import__("importlib").util.find_spec("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from locattn.codegen.triton_impl import interpreted
        if interpreted():
            impls.append("triton")
    results = {}
    for impl in impls:
        locattn.reset_counters()
        for p in model.parameters():
            p.grad = None
        results[impl] = _compiled_grads(model, x, policy, impl, inductor=impl == "cpu")  # one Inductor compile
        assert locattn.counters()["rewrite"].get("sdpa", 0) >= 1
        assert locattn.counters()["dispatch"].get(impl, 0) >= 1
        assert locattn.densities()
    for impl in impls[1:]:
        for a, b in zip(results[impl][:2] + tuple(results[impl][2]), results["reference"][:2] + tuple(
                results["reference"][2])):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (native Triton kernels)")
def test_dynamic_triton_is_captured_by_a_cuda_graph():
    """The dynamic path (selection, tables, kernels, density counters) has no host synchronisation and no
    host-to-device copy per call: it captures into a CUDA graph and a replay on new content selects anew."""
    dev = torch.device("cuda")
    pattern = Dynamic(block=64, top_p=0.5, causal=True, base=SlidingWindow(window=64, causal=True))
    spec = SiteSpec((HeadGroup(None, pattern, Layout(sinks=4)),), site="capture").to_json()
    q, k, v = (torch.randn(1, 4, 1024, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    op = lambda: torch.ops.locattn.attention(q, k, v, None, None, 0.125, False, spec, "triton")
    op()  # compile the kernels, build the cached host tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = op()
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    want, _ = op()
    torch.testing.assert_close(out, want)


def test_sequence_parallel_refuses_dynamic_sites():
    """A shard's halo rows carry no queries, so a dynamic site's pooled queries would differ from the single
    process: the graph is not sharded, and says why."""
    import locattn
    model = _CausalLM()
    policy = {"rule": [{"match": "*", "pattern": "dynamic", "block": 16, "top_p": 0.6, "causal": True}]}
    rep = locattn.explain(model, torch.randn(1, 64, 48), policy=policy, sequence_parallel={"world_size": 2})
    assert rep.parallel and not rep.parallel[0].applied
    assert "dynamic pattern" in rep.parallel[0].reason
