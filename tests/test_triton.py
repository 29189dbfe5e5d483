"""The fused Triton kernels (locattn/codegen/triton_impl.py) against the fp64 reference, on CPU under the
Triton interpreter. Every case runs forward and backward, checks out / lse / dq / dk / dv / dbias, that
freshly allocated outputs (NaN-filled) are fully written, and that each kernel visits exactly the plan's
block pairs (full ones as full, partial ones as partial) via the kernels' instrumented mode.

Tolerance: a kernel output is accepted when its max error against the fp64 golden is at most
``FUDGE x`` the max error of eager attention computed in the same dtype (dense masked softmax, autograd
for the gradients) plus a small floor for outputs whose eager error happens to be ~0 (FlexAttention's test
recipe). The kernel differs from eager only in summation order (online softmax) and where it rounds p / ds
to the input dtype, so a small factor suffices: measured ratios are below 2.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are built for the interpreter

import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from locattn.codegen import registry  # noqa: E402
from locattn.codegen.reference import Reference, expand_kv, keep_mask  # noqa: E402
from locattn.codegen.registry import AttentionCall  # noqa: E402
from locattn.codegen.triton_impl import KernelConfig, Triton, interpreted  # noqa: E402
from locattn.patterns import (Dense, Layout, Neighborhood, ShiftedWindow, SlidingWindow, Strided,  # noqa: E402
                              Tiled)
from locattn.patterns.spec import HeadGroup, SiteSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FUDGE = 4.0
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _impl(bm=32, bn=32) -> Triton:
    return Triton(KernelConfig(bm, bn, 1, 1), nan_fill=True, record_visits=True)


# ----------------------------------------------------------------------------------------------------------
# goldens


def _eager(call: AttentionCall, grad_out: torch.Tensor, need_dbias: bool):
    """Dense masked attention in the call's own dtype, gradients by autograd (the tolerance yardstick)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v))
    bias = call.bias.detach().clone().requires_grad_() if call.bias is not None else None
    hq, s_q, s_k = q.shape[1], q.shape[-2], k.shape[-2]
    s = (q @ expand_kv(k, hq).transpose(-2, -1)) * call.scale
    if bias is not None:
        s = s + bias
    keep = keep_mask(call, torch.arange(s_q)[:, None], torch.arange(s_k)[None, :])
    if call.mask is not None:
        keep = keep & call.mask
    s = s.masked_fill(~keep.expand_as(s), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # empty rows: 0 like the op
    out = p @ expand_kv(v, hq)
    ins = [q, k, v] + ([bias] if need_dbias and bias is not None else [])
    grads = torch.autograd.grad(out, ins, grad_out)
    return (out.detach(), lse.detach().float(), *grads)


def _golden(call: AttentionCall, grad_out: torch.Tensor, need_dbias: bool):
    c64 = AttentionCall(call.q.double(), call.k.double(), call.v.double(), call.mask,
                        call.bias.double() if call.bias is not None else None, call.scale, call.is_causal,
                        call.pattern, call.layout)
    ref = Reference()
    out, lse = ref.forward(c64)
    dq, dk, dv, db = ref.backward(c64, grad_out.double(), out, lse, need_dbias)
    return (out, lse, dq, dk, dv) + ((db,) if db is not None else ())


def _check(name, got, gold, eager, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output memory?)"
    got, gold, eager = got.double(), gold.double(), eager.double()
    if name == "lse":  # -inf rows must match exactly, finite ones numerically
        assert torch.equal(torch.isinf(got), torch.isinf(gold)), "lse: empty rows differ"
        fin = torch.isfinite(gold)
        got, gold, eager = got[fin], gold[fin], eager[fin]
    err = (got - gold).abs().max().item() if got.numel() else 0.0
    eager_err = (eager - gold).abs().nan_to_num(0.0).max().item() if got.numel() else 0.0
    tol = FUDGE * eager_err + FLOOR[dtype] * max(1.0, gold.abs().max().item() if gold.numel() else 1.0)
    if os.environ.get("LOCATTN_TEST_RATIOS"):
        print(f"RATIO {name} {dtype} err={err:.3g} eager={eager_err:.3g} ratio={err / max(eager_err, 1e-30):.2f}")
    assert err <= tol, f"{name}: max err {err:.3g} > tol {tol:.3g} (eager same-dtype err {eager_err:.3g})"


def _expected_visits(plan, bh: int) -> torch.Tensor:
    exp = torch.zeros(plan.n_qblocks, plan.n_kblocks, dtype=torch.int32)
    for m, n, full in plan.pairs():
        exp[m, n] = 1 if full else 16
    return exp.expand(bh, -1, -1)


def _run_case(call: AttentionCall, impl: Triton, need_dbias: bool = False):
    out, lse = impl.forward(call)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    dq, dk, dv, db = impl.backward(call, g, out, lse, need_dbias)
    gold = _golden(call, g, need_dbias)
    eager = _eager(call, g, need_dbias)
    got = (out, lse, dq, dk, dv) + ((db,) if db is not None else ())
    assert (db is not None) == (need_dbias and call.bias is not None)
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for name, a, b, e in zip(names, got, gold, eager):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if name != "lse":
            assert a.dtype == (call.bias.dtype if name == "dbias" else call.q.dtype), f"{name}: dtype {a.dtype}"
        _check(name, a, b, e, call.q.dtype)
    # instrumented mode: every kernel visits exactly the plan's block pairs, once each, with their kind
    bh = call.q.shape[0] * call.q.shape[1]
    for kind in ("fwd", "dq", "dkdv"):
        torch.testing.assert_close(impl.visits[kind], _expected_visits(impl.plans[kind], bh), rtol=0, atol=0,
                                   msg=lambda m, kind=kind: f"{kind} kernel block visits differ from the plan: {m}")
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# kernel-level cases


@dataclass
class Case:
    id: str
    pattern: object
    layout: Layout = field(default_factory=Layout)
    s: int = 63
    s_k: int | None = None
    d: int = 40
    dv: int | None = None
    hq: int = 2
    hk: int = 2
    causal: bool = False
    dtype: torch.dtype = torch.float32
    mask: str = ""      # "" | "rand" | "rows" (random, plus whole rows blanked: empty rows)
    bias: str = ""      # "" | "full" | "bcast" ([Sq, Sk], broadcast over B and H)
    block: tuple = (32, 32)

    def call(self) -> AttentionCall:
        gen = torch.Generator().manual_seed(hash(self.id) % 2**31)
        s_k = self.s_k or self.s
        dv = self.dv or self.d

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(self.dtype)

        q, k, v = rnd(1, self.hq, self.s, self.d), rnd(1, self.hk, s_k, self.d), rnd(1, self.hk, s_k, dv)
        mask = bias = None
        if self.mask:
            mask = torch.rand(1, self.hq, self.s, s_k, generator=gen) > 0.25
            if self.mask == "rows":
                mask[:, :, 5:9] = False
        if self.bias == "full":
            bias = rnd(1, self.hq, self.s, s_k)
        elif self.bias == "bcast":
            bias = rnd(self.s, s_k)
        layout = self.layout.resolve(self.s) if self.pattern.local else self.layout
        return AttentionCall(q, k, v, mask, bias, 1.0 / math.sqrt(self.d), self.causal, self.pattern, layout)


CASES = [
    Case("dense-63-d40", Dense()),
    Case("dense-cross-63x125-d72-dv40-gqa-mask-bias", Dense(), s=63, s_k=125, d=72, dv=40, hk=1, mask="rand",
         bias="bcast", block=(16, 32)),
    Case("dense-causal-125-fp16", Dense(), s=125, causal=True, dtype=torch.float16),
    Case("sw1d-200-w7", SlidingWindow(window=7), s=200, block=(16, 16)),
    Case("sw1d-200-dil3-axiscausal-sitecausal-d72", SlidingWindow(window=12, dilation=3, causal=True), s=200,
         d=72, causal=True),
    Case("sw1d-125-globals-sinks-bf16", SlidingWindow(window=9), Layout(prefix=3, suffix=2, sinks=6), s=125,
         dtype=torch.bfloat16),
    Case("na2d-5x7-dil-globals-sinks-causal-d72", Neighborhood(kernel=(3, 3), dilation=(1, 2)),
         Layout(grid=(5, 7), prefix=2, suffix=3, sinks=4), s=40, d=72, causal=True, block=(16, 16)),
    Case("na3d-3x5x6-dil-bf16-gqa", Neighborhood(kernel=(3, 3, 3), dilation=(1, 1, 2)), Layout(grid=(3, 5, 6)),
         s=90, hk=1, dtype=torch.bfloat16),
    Case("strided-9x7", Strided(kernel=(5, 5), stride=(2, 3)), Layout(grid=(9, 7)), s=63, block=(16, 16)),
    Case("tiled-8x12-allfull-bias-gqa-dv24", Tiled(tile=(4, 4), window=(3, 3)), Layout(grid=(8, 12)), s=96,
         dv=24, hk=1, bias="full", block=(16, 16)),
    Case("shifted-9x7-mask-emptyrows-fp16", ShiftedWindow(window=(4, 4), shift=(2, 2)), Layout(grid=(9, 7)),
         s=63, mask="rows", dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_matches_reference(case: Case):
    call = case.call()
    _run_case(call, _impl(*case.block), need_dbias=call.bias is not None)


def test_empty_rows_give_zero_and_neg_inf():
    case = Case("sw-emptyrows", SlidingWindow(window=3), mask="rows")
    out, lse = _impl().forward(case.call())
    assert torch.equal(out[:, :, 5:9], torch.zeros_like(out[:, :, 5:9]))
    assert torch.isneginf(lse[:, :, 5:9]).all()


def test_can_run_reasons():
    assert interpreted()
    impl = Triton()
    c = Case("x", SlidingWindow(window=3)).call()
    assert impl.can_run(c) == (True, "")
    c64 = AttentionCall(c.q.double(), c.k.double(), c.v.double(), None, None, 0.1, False, c.pattern, c.layout)
    ok, why = impl.can_run(c64)
    assert not ok and "float64" in why
    big = AttentionCall(torch.randn(1, 1, 63, 320), torch.randn(1, 1, 63, 320), torch.randn(1, 1, 63, 320),
                        None, None, 0.1, False, c.pattern, c.layout)
    ok, why = impl.can_run(big)
    assert not ok and "head dim" in why


# ----------------------------------------------------------------------------------------------------------
# through the custom op: per-head groups, autograd, dbias


@pytest.fixture
def triton_registered():
    saved = list(registry.IMPLEMENTATIONS)
    impl = Triton(KernelConfig(32, 32, 1, 1), nan_fill=True)
    registry.register(impl, before="blocked")
    yield impl
    registry.IMPLEMENTATIONS[:] = saved


def test_op_head_groups_with_bias(triton_registered):
    import locattn.ops  # noqa: F401  registers torch.ops.locattn

    spec = SiteSpec((HeadGroup((0, 3), ShiftedWindow(window=(2, 3), shift=(1, 1)), Layout(grid=(5, 7))),
                     HeadGroup((1, 2), Tiled(tile=(2, 2), window=(1, 3)), Layout(grid=(5, 7), sinks=2))))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 35, 40, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 35, 40, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 35, 24, generator=gen, requires_grad=True)
    bias = torch.randn(1, 4, 35, 35, generator=gen, requires_grad=True)
    res = {}
    for be in ("reference", "triton"):
        o, lse = torch.ops.locattn.attention(q, k, v, None, bias, 0.2, True, spec.to_json(), be)
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        res[be] = (o, lse, *torch.autograd.grad(o, [q, k, v, bias], g))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias"], res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_end_to_end_torch_compile(triton_registered):
    try:
        import locattn.backend  # noqa: F401
    except ImportError:
        pytest.skip("locattn.backend does not exist yet")
    import locattn

    if not hasattr(locattn, "backend") or not callable(getattr(locattn, "backend")):
        pytest.skip("locattn.backend(policy=...) is not available yet")
    pytest.skip("end-to-end policy API not settled when this test was written")  # see the report


# ----------------------------------------------------------------------------------------------------------
# the GPU benchmark's plumbing, on CPU


def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--dry-run",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 0
    assert time.time() - t0 < 60
