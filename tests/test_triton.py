"""The fused Triton kernels (locattn/codegen/triton_impl.py) against the fp64 reference, on CPU under the
Triton interpreter. Every case runs forward and backward, checks out / lse / dq / dk / dv / dbias, that
freshly allocated outputs (NaN-filled) are fully written, and that each kernel visits exactly the plan's
block pairs (full ones as full, partial ones as partial) via the kernels' instrumented mode.

Tolerance (:func:`locattn.testing.assert_close_to_golden`): a kernel output is accepted when its max error
against the fp64 golden is at most ``FUDGE x`` the max error of eager attention computed in the same dtype
(dense masked softmax, autograd for the gradients) plus the helper's small floor. The kernel differs from
eager only in summation order (online softmax) and where it rounds p / ds to the input dtype; measured
kernel/eager error ratios over these cases are 0.3 - 2.1 (fp32, fp16 and bf16 alike), hence FUDGE = 3.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

#: Where the kernels run. With a CUDA device they are compiled natively and every case runs on the GPU (set
#: LOCATTN_TEST_INTERPRET=1 to force the interpreter there too); without one they run on CPU under the Triton
#: interpreter, which must be on (TRITON_INTERPRET=1) before triton / the kernels are imported. The variable is
#: restored right after, so other test modules of the session do not dispatch "auto" to the (slow)
#: interpreter; this module's tests set it again (fixture below).
NATIVE = torch.cuda.is_available() and os.environ.get("LOCATTN_TEST_INTERPRET") != "1"
DEVICE = torch.device("cuda" if NATIVE else "cpu")
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import locattn.codegen.triton_kernels  # noqa: F401  built now (interpreter mode without CUDA)
finally:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

from locattn.codegen import registry  # noqa: E402
from locattn.codegen.reference import Reference, expand_kv, keep_mask  # noqa: E402
from locattn.codegen.registry import AttentionCall  # noqa: E402
from locattn.codegen.triton_impl import CONFIG_SPACE, KernelConfig, Triton, interpreted  # noqa: E402
from locattn.patterns import (Dense, Layout, Neighborhood, ShiftedWindow, SlidingWindow, Strided,  # noqa: E402
                              Tiled)
from locattn.patterns.spec import HeadGroup, SiteSpec  # noqa: E402
from locattn.testing import assert_close_to_golden  # noqa: E402

needs_cuda = pytest.mark.skipif(not NATIVE, reason="needs a CUDA device (native Triton kernels)")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not NATIVE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


REPO = Path(__file__).resolve().parents[1]
FUDGE = 3.0


def _impl(bm=32, bn=32, **kw) -> Triton:
    return Triton(KernelConfig(bm, bn, 1, 1), nan_fill=True, record_visits=True, **kw)


# ----------------------------------------------------------------------------------------------------------
# goldens


def _eager(call: AttentionCall, grad_out: torch.Tensor, need_dbias: bool):
    """Dense masked attention in the call's own dtype, gradients by autograd (the tolerance yardstick)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v))
    bias = call.bias.detach().clone().requires_grad_() if call.bias is not None else None
    hq, s_q, s_k = q.shape[1], q.shape[-2], k.shape[-2]
    s = (q @ expand_kv(k, hq).transpose(-2, -1)) * call.scale
    if call.softcap:
        s = call.softcap * torch.tanh(s / call.softcap)
    if bias is not None:
        s = s + bias
    dev = q.device
    keep = keep_mask(call, torch.arange(s_q, device=dev)[:, None], torch.arange(s_k, device=dev)[None, :])
    if call.mask is not None:
        keep = keep & call.mask
    s = s.masked_fill(~keep.expand_as(s), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # empty rows: 0 like the op
    out = p @ expand_kv(v, hq)
    ins = [q, k, v] + ([bias] if need_dbias and bias is not None else [])
    grads = torch.autograd.grad(out, ins, grad_out)
    return (out.detach(), lse.detach().float(), *grads)


def _call64(call: AttentionCall) -> AttentionCall:
    return AttentionCall(call.q.double(), call.k.double(), call.v.double(), call.mask,
                         call.bias.double() if call.bias is not None else None, call.scale, call.is_causal,
                         call.pattern, call.layout, call.softcap)


def _assert_fp32_forward(call: AttentionCall, out: torch.Tensor, lse: torch.Tensor | None = None):
    """An fp32 forward (and its lse) against the fp64 reference forward."""
    gold_out, gold_lse = Reference().forward(_call64(call))
    torch.testing.assert_close(out.double(), gold_out, rtol=1e-4, atol=1e-5)
    if lse is not None:
        torch.testing.assert_close(lse.double(), gold_lse, rtol=1e-4, atol=1e-5)


def _golden(call: AttentionCall, grad_out: torch.Tensor, need_dbias: bool):
    c64 = _call64(call)
    ref = Reference()
    out, lse = ref.forward(c64)
    dq, dk, dv, db = ref.backward(c64, grad_out.double(), out, lse, need_dbias)
    return (out, lse, dq, dk, dv) + ((db,) if db is not None else ())


def _expected_visits(plan, bh: int) -> torch.Tensor:
    exp = torch.zeros(plan.n_qblocks, plan.n_kblocks, dtype=torch.int32)
    for m, n, full in plan.pairs():
        exp[m, n] = 1 if full else 16
    return exp.expand(bh, -1, -1)


def _run_case(call: AttentionCall, impl: Triton, need_dbias: bool = False) -> tuple[torch.Tensor, ...]:
    """Forward and backward of ``impl`` against the fp64 golden and its block visits against the plan; returns
    (out, lse, dq, dk, dv[, dbias])."""
    out, lse = impl.forward(call)
    assert out.transpose(1, 2).is_contiguous(), "out is not in SDPA's layout ([B, Sq, H, Dv] in memory)"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    dq, dk, dv, db = impl.backward(call, g, out, lse, need_dbias)
    gold = _golden(call, g, need_dbias)
    eager = _eager(call, g, need_dbias)
    got = (out, lse, dq, dk, dv) + ((db,) if db is not None else ())
    assert (db is not None) == (need_dbias and call.bias is not None)
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for name, a, b, e in zip(names, got, gold, eager):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == (torch.float32 if name == "lse" else call.bias.dtype if name == "dbias"
                           else call.q.dtype), f"{name}: dtype {a.dtype}"
        assert not torch.isnan(a).any(), f"{name}: NaN (unwritten output memory?)"
        assert_close_to_golden(a, b, e, factor=FUDGE, name=name)
    # instrumented mode: every kernel visits exactly the plan's block pairs, once each, with their kind
    bh = call.q.shape[0] * call.q.shape[1]
    for kind in ("fwd", "dq", "dkdv"):
        torch.testing.assert_close(impl.visits[kind].cpu(), _expected_visits(impl.plans[kind], bh), rtol=0, atol=0,
                                   msg=lambda m, kind=kind: f"{kind} kernel block visits differ from the plan: {m}")
    return got


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
    b: int = 1
    causal: bool = False
    dtype: torch.dtype = torch.float32
    mask: str = ""      # "" | "rand" ([1, 1, Sq, Sk]) | "rows" (per head, with whole rows blanked: empty rows)
    #                     | "keys" (per batch element [B, 1, 1, Sk]: a key-padding mask, its last keys off)
    bias: str = ""      # "" | "full" | "bcast" ([Sq, Sk], broadcast over B and H)
    block: tuple = (32, 32)
    softcap: float = 0.0

    def call(self) -> AttentionCall:
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        s_k = self.s_k or self.s
        dv = self.dv or self.d

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(DEVICE, self.dtype)

        b = self.b
        q, k, v = rnd(b, self.hq, self.s, self.d), rnd(b, self.hk, s_k, self.d), rnd(b, self.hk, s_k, dv)
        mask = bias = None
        if self.mask == "keys":  # batch element i loses its last 3 + 4i keys
            mask = torch.arange(s_k) < s_k - 3 - 4 * torch.arange(b)[:, None, None, None]
            mask = mask.to(DEVICE)
        elif self.mask:  # "rand": one mask for all heads (stride-0 broadcast); "rows": per head
            mask = torch.rand(1, 1 if self.mask == "rand" else self.hq, self.s, s_k, generator=gen) > 0.25
            if self.mask == "rows":
                mask[:, :, 5:9] = False
            mask = mask.to(DEVICE)
        if self.bias == "full":
            bias = rnd(b, self.hq, self.s, s_k)
        elif self.bias == "bcast":
            bias = rnd(self.s, s_k)
        layout = self.layout.resolve(self.s) if self.pattern.local else self.layout
        scale = 1.0 / math.sqrt(self.d) * (8.0 if self.softcap else 1.0)   # large scores: the cap matters
        return AttentionCall(q, k, v, mask, bias, scale, self.causal, self.pattern, layout, softcap=self.softcap)


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
    # power-of-two head dims: full blocks load K/V without any mask; all-full plans compile no partial loop
    Case("dense-64-d32-allfull", Dense(), s=64, d=32),
    Case("sw1d-200-w40-d32-causal", SlidingWindow(window=40), s=200, d=32, causal=True, block=(16, 16)),
    Case("tiled-8x12-allfull-d16-bf16", Tiled(tile=(4, 4), window=(3, 3)), Layout(grid=(8, 12)), s=96, d=16,
         dtype=torch.bfloat16, block=(16, 16)),
    # no padding slot on one or both sides (NOPAD): partial blocks load their rows unmasked
    Case("sw1d-192-w40-nopad", SlidingWindow(window=40), s=192),
    Case("na2d-8x12-nopad-gqa-fp16", Neighborhood(kernel=(3, 5)), Layout(grid=(8, 12)), s=96, hk=1,
         dtype=torch.float16, block=(16, 16)),
    Case("sw1d-128-dil2-nopad-bf16", SlidingWindow(window=12, dilation=2), s=128, d=72, dtype=torch.bfloat16),
    Case("dense-causal-64-d72-nopad", Dense(), s=64, d=72, causal=True),
    Case("dense-cross-63x64-mask-keys-nopad", Dense(), s=63, s_k=64, mask="rand"),
    Case("dense-cross-64x40-bias-queries-nopad", Dense(), s=64, s_k=40, bias="full"),
    # batch > 1 (per-batch offsets in every kernel and in the backward's row statistics) with GQA of several kv
    # heads (query head h reads kv head h // 2; dK/dV sums each kv head's group), per-batch key-padding masks
    Case("na2d-7x9-b2-gqa4to2-keymask", Neighborhood(kernel=(3, 5)), Layout(grid=(7, 9)), s=63, hq=4, b=2,
         mask="keys", block=(16, 16)),
    Case("sw1d-125-b3-gqa6to3-bias-causal-bf16", SlidingWindow(window=9), s=125, hq=6, hk=3, b=3, bias="full",
         causal=True, dtype=torch.bfloat16),
    # head dims above 128 (BLOCK_D 256 with padding lanes), D_v != D_qk
    Case("dense-40-d160-dv136-fp16", Dense(), s=40, d=160, dv=136, dtype=torch.float16, block=(16, 16)),
    # tanh soft-capping (Gemma 2): capped before the bias / mask, dQ / dK through the cap, dBias of the capped scores
    Case("dense-causal-63-softcap-mask-bias", Dense(), s=63, causal=True, mask="rand", bias="full", softcap=5.0),
    Case("na2d-7x9-softcap-gqa-fp16", Neighborhood(kernel=(3, 5)), Layout(grid=(7, 9)), s=63, hq=4, hk=2,
         dtype=torch.float16, softcap=3.0, block=(16, 16)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_matches_reference(case: Case):
    call = case.call()
    _run_case(call, _impl(*case.block), need_dbias=call.bias is not None)


ADDRESSING = {  # case id -> (query addressing, key addressing, RANGES, HAS_PARTIAL, WINDOW_ONLY, NOPAD) of the tables
    "dense-63-d40": ("linear", "linear", True, True, False, 0),                 # padded last key block
    "dense-cross-63x125-d72-dv40-gqa-mask-bias": ("linear", "linear", True, True, False, 0),
    "dense-causal-125-fp16": ("linear", "linear", True, True, False, 0),
    "sw1d-200-w7": ("linear", "linear", True, True, True, 0),
    "sw1d-200-dil3-axiscausal-sitecausal-d72": ("table", "table", True, True, True, 0),  # dilation: slots not in order
    "sw1d-125-globals-sinks-bf16": ("table", "table", False, True, False, 0),       # global key blocks: no runs
    "na2d-5x7-dil-globals-sinks-causal-d72": ("table", "table", True, True, False, 0),  # prefix globals: slots shifted
    "na3d-3x5x6-dil-bf16-gqa": ("table", "table", True, True, True, 0),             # dilation
    "strided-9x7": ("grid", "grid", True, True, True, 0),
    "tiled-8x12-allfull-bias-gqa-dv24": ("grid", "grid", True, False, False, 3),   # 3 tiles of window on a 2-tile axis
    "shifted-9x7-mask-emptyrows-fp16": ("grid", "grid", True, True, True, 0),
    "dense-64-d32-allfull": ("linear", "linear", True, False, False, 3),
    "sw1d-200-w40-d32-causal": ("linear", "linear", True, True, True, 0),
    "tiled-8x12-allfull-d16-bf16": ("grid", "grid", True, False, False, 3),
    "sw1d-192-w40-nopad": ("linear", "linear", True, True, True, 3),
    "na2d-8x12-nopad-gqa-fp16": ("grid", "grid", True, True, True, 3),
    "sw1d-128-dil2-nopad-bf16": ("table", "table", True, True, True, 3),
    "dense-causal-64-d72-nopad": ("linear", "linear", True, True, False, 3),
    "dense-cross-63x64-mask-keys-nopad": ("linear", "linear", True, True, False, 2),   # partial: padding queries
    "dense-cross-64x40-bias-queries-nopad": ("linear", "linear", True, True, False, 1),  # partial: padding keys
}


def _mode(code: int) -> str:
    from locattn.codegen.triton_impl import GRID_BIT
    return "table" if code == 0 else "linear" if code == 1 else "grid" if code & GRID_BIT else f"?{code}"


@pytest.mark.parametrize("case_id", list(ADDRESSING))
def test_table_free_addressing_is_chosen_and_equal(case_id: str):
    """Computed addressing (LINEAR / GRID tokens from slot indices, RANGES key-block runs walked without an
    index load) is chosen exactly where it reproduces the tables, and gives bit-identical results; plans
    without partial blocks are recognised (HAS_PARTIAL off: no predicate loop compiled); WINDOW_ONLY (no padding
    test in the forward / dQ predicate) exactly for local patterns without globals whose windows lie inside the
    grid, with every padding key's u-coordinate outside all windows; NOPAD exactly for the plan sides without
    padding slots, its unmasked partial-block loads giving the bits of the masked ones."""
    from locattn.codegen.triton_impl import kernel_tables
    from locattn.patterns.plan import build_plan

    case = next(c for c in CASES if c.id == case_id)
    call = case.call()
    plan = build_plan(call.pattern, call.layout, call.q.shape[-2], call.k.shape[-2], *case.block, call.is_causal)
    tab = kernel_tables(plan, call.pattern, call.layout, call.q.device)
    assert (_mode(tab.q_addr), _mode(tab.k_addr), tab.ranges, tab.has_partial, tab.window_only, tab.nopad) == \
        ADDRESSING[case_id]
    assert tab.nopad == int(bool((plan.q_slots >= 0).all())) | 2 * int(bool((plan.k_slots >= 0).all()))
    from locattn.codegen.triton_impl import PAD_U
    pad = plan.k_slots < 0
    assert bool((tab.k_u[:tab.ndim, pad.to(tab.k_u.device)] == PAD_U).all())
    fast = _run_case(call, _impl(*case.block))
    slow = Triton(KernelConfig(*case.block, 1, 1), tables_only=True).forward(call)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if tab.window_only:  # the benchmark's A/B: the padding test back in, the same bits out
        padded = Triton(KernelConfig(*case.block, 1, 1), window_only=False).forward(call)
        for a, b in zip(fast, padded):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if tab.nopad and tab.has_partial:  # NOPAD's A/B: row masks and padding tests back in, forward and backward
        masked = _impl(*case.block, nopad=False)
        for a, b in zip(fast, _run_case(call, masked)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grid_slot_tokens_match_the_plans():
    """The host mirror of the kernels' GRID arithmetic reproduces build_plan's spatial-tile slot tables (odd
    grids, padded tiles, tiles wider than an axis)."""
    from locattn.codegen.triton_impl import grid_code, grid_slot_tokens, grid_tile
    from locattn.patterns.plan import build_plan

    for pattern, grid, bm, bn in [(Neighborhood(kernel=(3, 5)), (9, 13), 16, 32),
                                  (Neighborhood(kernel=(3, 3, 5)), (3, 5, 11), 32, 16),
                                  (Tiled(tile=(2, 4), window=(3, 3)), (6, 20), 64, 16)]:
        s = math.prod(grid)
        plan = build_plan(pattern, Layout(grid=grid).resolve(s), s, s, bm, bn, False)
        for slots, block, tile in ((plan.q_slots, bm, plan.q_tile), (plan.k_slots, bn, plan.k_tile)):
            tok, _ = grid_slot_tokens(slots.numel(), block, tile, grid)
            assert torch.equal(tok, slots), (grid, tile)
            assert grid_tile(grid_code(tile), len(tile)) == tuple(tile)


def test_fp32_divmod_of_grid_addressing_is_exact_below_2_pow_20():
    """GRID addressing divides block indices by tile-grid extents in fp32 (``_divmod``: trunc((x + 0.5) *
    rn(1 / n))): exact for every x < 2**20 and the extents a grid can have (checked exhaustively for a spread of
    them, incl. the worst, large ones); larger plans are caught by the host mirror and use the tables."""
    x = torch.arange(1 << 20)
    xf = x.float() + 0.5
    for n in [1, 2, 3, 5, 7, 10, 13, 30, 48, 80, 127, 255, 641, 1000, 2047, 4095, 8191, 32767]:
        q = (xf * (torch.tensor(1.0) / torch.tensor(float(n)))).long()
        assert torch.equal(q, x // n), n


def test_runs_of_a_plan():
    from locattn.codegen.triton_impl import _runs

    rows = torch.tensor([0, 0, 0, 1, 1, 3])
    cols = torch.tensor([2, 3, 4, 0, 1, 5])
    full = torch.tensor([False, True, False, True, True, False])
    assert _runs(rows, cols, full, 4).tolist() == [[2, 3, 4, 5], [0, 0, 2, 2], [0, 0, 0, 0], [5, 5, 5, 6]]
    assert _runs(rows, torch.tensor([2, 4, 5, 0, 1, 5]), full, 4) is None          # gap in row 0
    assert _runs(rows, cols, torch.tensor([True, False, True, True, True, False]), 4) is None  # full not a run


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_nonpositive_scale(scale: float):
    """The forward folds a positive scale into the softmax (FOLD); zero / negative scales take the plain path."""
    c = Case(f"sw1d-scale{scale}", SlidingWindow(window=9), s=70, d=16).call()
    call = AttentionCall(c.q, c.k, c.v, None, None, scale, False, c.pattern, c.layout)
    _run_case(call, _impl(16, 16))


def test_backward_is_deterministic():
    """Issue 5's deterministic backward is the only backward: no atomics (the GQA sum of dK/dV happens in
    registers, dbias is stored pair by pair and reduced on the host), so two runs agree bit for bit. The
    interpreter runs programs one after another, so there only the source check can fail; natively on a GPU
    the two runs are the real check."""
    import inspect

    import locattn.codegen.triton_kernels as tk
    jitted = {name: obj.fn for name, obj in vars(tk).items() if inspect.isfunction(getattr(obj, "fn", None))}
    atomics = sorted(name for name, fn in jitted.items() if "atomic_" in inspect.getsource(fn))
    assert "attn_bwd_dkdv" in jitted and atomics == ["_record_visit"], f"atomics outside the visit counter: {atomics}"
    case = Case("det-na2d-5x8-b2-gqa4to2-bias", Neighborhood(kernel=(3, 3)), Layout(grid=(5, 8)), s=40, hq=4,
                b=2, bias="bcast", block=(16, 16))
    call = case.call()
    impl = _impl(*case.block)
    out, lse = impl.forward(call)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    first = impl.backward(call, g, out, lse, True)
    for a, b in zip(first, impl.backward(call, g, out, lse, True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_reads_grad_out_through_its_strides():
    """The op hands autograd's grad_out over as it comes: in the model's layout ([B, Sq, H, Dv] in memory) or
    expanded (stride 0, from ``out.sum()``); the kernels give the gradients of its contiguous copy, bit for bit."""
    case = Case("strides-sw1d-50-gqa", SlidingWindow(window=5), s=50, hq=4, b=2, dv=24)
    call = case.call()
    impl = _impl(16, 16)
    out, lse = impl.forward(call)
    g = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3]).to(DEVICE).transpose(1, 2)
    for grad in (g, torch.ones(()).to(DEVICE).expand(out.shape)):
        want = impl.backward(call, grad.contiguous(), out, lse, False)
        for a, b in zip(impl.backward(call, grad, out, lse, False), want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inference_mode_then_training():
    """Tables built during a torch.inference_mode call (an lru cache) serve a later training step."""
    call = Case("infer-sw1d-37", SlidingWindow(window=4), s=37).call()  # a shape no other test builds tables for
    impl = _impl(16, 16)
    with torch.inference_mode():
        want, _ = impl.forward(call)
    out, lse = impl.forward(call)
    grads = impl.backward(call, torch.ones_like(out), out, lse, False)
    assert torch.equal(out, want) and all(g.isfinite().all() for g in grads[:3])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter evaluates both
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # branches of tl.where
def test_mask_like_bias_masks_like_minus_inf(dtype):
    """A bias below BIAS_MASK_BELOW (-2**14: finfo.min, -1e9 masks) masks its key: the bits of -inf masks,
    forward and backward (the op's rule; tests/test_ops.py checks the other implementations)."""
    case = Case("finfo-min-sw1d-40", SlidingWindow(window=9), s=40, bias="full", dtype=dtype, block=(16, 16))
    call = case.call()
    call.bias[:, :, 3] = torch.finfo(dtype).min
    call.bias[:, 1, 5, 4:] = torch.finfo(dtype).min
    call.bias[:, 0, 7] = -2e4 if dtype == torch.float16 else -1e9
    call.bias[:, 0, 9] = -1.6e4  # above the threshold: an ordinary bias
    inf_call = dataclasses.replace(call, bias=call.bias.masked_fill(call.bias < -2 ** 14, float("-inf")))
    impl = _impl(16, 16)
    got, want = _run_case(call, impl, need_dbias=True), _run_case(inf_call, impl, need_dbias=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not got[0][:, :, 3].any() and bool((got[1][:, :, 3] == float("-inf")).all())
    assert bool((got[1][:, 0, 7] == float("-inf")).all()) and bool(got[1][:, 0, 9].isfinite().all())


def test_empty_rows_give_zero_and_neg_inf():
    case = Case("sw-emptyrows", SlidingWindow(window=3), mask="rows")
    out, lse = _impl().forward(case.call())
    assert torch.equal(out[:, :, 5:9], torch.zeros_like(out[:, :, 5:9]))
    assert torch.isneginf(lse[:, :, 5:9]).all()


# ----------------------------------------------------------------------------------------------------------
# the TMA forward (KernelConfig(tma=True[, ws=True])): all-full plans, computed addressing

TMA_CASES = [
    Case("tma-dense-64-d40", Dense(), s=64, d=40, block=(16, 16)),
    Case("tma-dense-64-d32-gqa-dv24-bf16", Dense(), s=64, d=32, dv=24, hk=1, dtype=torch.bfloat16, block=(16, 16)),
    Case("tma-tiled2d-8x12-d40", Tiled(tile=(4, 4), window=(3, 3)), Layout(grid=(8, 12)), s=96, block=(16, 16)),
    Case("tma-tiled3d-2x4x12-d72-gqa-fp16", Tiled(tile=(1, 4, 4), window=(1, 1, 3)), Layout(grid=(2, 4, 12)), s=96,
         d=72, hq=2, hk=1, dtype=torch.float16, block=(16, 16)),
]


@pytest.mark.parametrize("ws", [False, True], ids=["tma", "tma+ws"])
@pytest.mark.parametrize("case", TMA_CASES, ids=[c.id for c in TMA_CASES])
def test_tma_forward_matches_reference(case: Case, ws: bool):
    """The TMA forward (descriptor tiles: LINEAR [B, H, S, D], GRID 2-D [B, H, g0, g1, D], GRID 3-D
    [B * H, g0, g1, g2, D]; out-of-bounds columns of non-power-of-two head dims read as zero) against fp64,
    visiting exactly the plan's blocks; the backward of the same call runs the usual kernels. The interpreter
    ignores warp specialization: ``ws`` checks the dispatch, the device run checks the specialized code."""
    impl = Triton(KernelConfig(*case.block, 1, 1, tma=True, ws=ws), nan_fill=True, record_visits=True)
    _run_case(case.call(), impl)
    assert impl.launched["fwd"] == ("attn_fwd_tma+ws" if ws else "attn_fwd_tma")


def test_tma_forward_on_strided_inputs():
    """q/k/v as models hand them over (a [B, S, H, D] projection transposed to [B, H, S, D]): the descriptors take
    the strides as they are, batch 2, no copy; on a 3-D grid batch and head do not merge: counted, generic kernel."""
    gen = torch.Generator().manual_seed(3)
    for pattern, layout, s, d in ((Dense(), Layout(), 32, 24),
                                  (Tiled(tile=(2, 8), window=(1, 3)), Layout(grid=(4, 16)), 64, 16),
                                  (Tiled(tile=(1, 4, 4), window=(1, 1, 3)), Layout(grid=(2, 4, 8)), 64, 16)):
        q, k, v = (torch.randn(2, s, 2, d, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(3))
        call = AttentionCall(q, k, v, None, None, d ** -0.5, False, pattern,
                             layout.resolve(s) if pattern.local else layout)
        import locattn
        locattn.reset_counters()
        impl = Triton(KernelConfig(16, 16, 1, 1, tma=True), nan_fill=True)
        out, lse = impl.forward(call)
        _assert_fp32_forward(call, out, lse)
        merged = len(layout.grid or ()) != 3
        assert impl.launched["fwd"] == ("attn_fwd_tma" if merged else "attn_fwd"), pattern
        assert merged or "do not merge" in next(iter(locattn.counters()["triton_tma_unfit"]))


def test_tma_unfit_calls_run_the_generic_kernel_counted():
    """Calls the TMA forward cannot take run ``attn_fwd`` on the same tile, each counted with its reason."""
    import locattn

    def ran(call, block=(16, 16), **kw):
        locattn.reset_counters()
        impl = Triton(KernelConfig(*block, 1, 1, tma=True), **kw)
        out, lse = impl.forward(call)
        _assert_fp32_forward(call, out)
        return impl.launched["fwd"], list(locattn.counters().get("triton_tma_unfit", {}))

    base = TMA_CASES[0].call()
    q, k, v = base.q, base.k, base.v
    assert ran(base) == ("attn_fwd_tma", [])
    assert ran(Case("p", Dense(), s=63, block=(16, 16)).call()) == ("attn_fwd", ["the plan has partial blocks"])
    mask = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.2
    assert ran(AttentionCall(q, k, v, mask, None, base.scale, False, base.pattern, base.layout)) == (
        "attn_fwd", ["site mask or bias"])
    assert ran(base, tables_only=True) == ("attn_fwd", ["slot tables (TMA needs computed addressing)"])
    # a base pointer 4 bytes past a 16-byte boundary
    q_off = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)[1:].view(q.shape).copy_(q)
    got = ran(AttentionCall(q_off, k, v, None, None, base.scale, False, base.pattern, base.layout))
    assert got[0] == "attn_fwd" and "q is not TMA-aligned" in got[1][0]
    # a 32-token grid under 64-query blocks: the query tile (the whole 4 x 8 grid) has fewer slots than the
    # block, so every block has padding queries: partial
    small = Case("s", Tiled(tile=(4, 4), window=(1, 3)), Layout(grid=(4, 8)), s=32, d=16).call()
    assert ran(small, (64, 16)) == ("attn_fwd", ["the plan has partial blocks"])


def test_ws_refused_by_the_compiler_runs_tma_without_it(monkeypatch):
    """Where Triton's warp specialization refuses the loop (it does on some versions), the TMA forward runs
    without it: counted once, remembered (no second compile attempt), correct result."""
    import locattn
    from locattn.codegen import triton_impl, triton_kernels

    real = triton_kernels.attn_fwd_tma
    tries = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tries.append(kw["WS"])
                if kw["WS"]:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(triton_kernels, "attn_fwd_tma", Refusing())
    monkeypatch.setattr(triton_impl, "_WS_REFUSED", set())
    locattn.reset_counters()
    call = TMA_CASES[0].call()
    impl = Triton(KernelConfig(16, 16, 1, 1, tma=True, ws=True))
    for _ in range(2):
        out, _ = impl.forward(call)
        assert impl.launched["fwd"] == "attn_fwd_tma"
    assert tries == [True, False, False]
    assert list(locattn.counters()["triton_ws_failed"].values()) == [1]
    _assert_fp32_forward(call, out)


def test_kernel_config_ws_needs_tma():
    with pytest.raises(ValueError, match="tma=True"):
        KernelConfig(128, 64, 4, 2, ws=True)


@pytest.mark.skipif(NATIVE, reason="the CPU / interpreter dispatch reasons")
def test_can_run_reasons(monkeypatch):
    assert interpreted()
    impl = Triton()
    c = Case("x", SlidingWindow(window=3)).call()
    assert impl.can_run(c) == (True, "")
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET")
        ok, why = impl.can_run(c)
        assert not ok and "TRITON_INTERPRET" in why
    c64 = AttentionCall(c.q.double(), c.k.double(), c.v.double(), None, None, 0.1, False, c.pattern, c.layout)
    ok, why = impl.can_run(c64)
    assert not ok and "float64" in why
    big = AttentionCall(torch.randn(1, 1, 63, 320), torch.randn(1, 1, 63, 320), torch.randn(1, 1, 63, 320),
                        None, None, 0.1, False, c.pattern, c.layout)
    ok, why = impl.can_run(big)
    assert not ok and "head dim" in why
    for shape in ((1, 2, 0, 40), (0, 2, 63, 40)):
        empty = AttentionCall(c.q.new_empty(shape), c.k, c.v, None, None, 0.1, False, c.pattern, c.layout)
        assert impl.can_run(empty) == (False, "empty tensor")
    meta_mask = torch.ones(63, 63, dtype=torch.bool, device="meta")
    ok, why = impl.can_run(AttentionCall(c.q, c.k, c.v, meta_mask, None, 0.1, False, c.pattern, c.layout))
    assert not ok and why == "site mask on meta, q on cpu"


@pytest.mark.skipif(NATIVE, reason="CPU dispatch")
def test_auto_dispatch_counts_why_triton_was_skipped(monkeypatch):
    """Auto dispatch past an implementation that cannot run counts the reason and runs the next one."""
    import locattn
    import locattn.ops  # noqa: F401  registers torch.ops.locattn

    monkeypatch.setattr(registry, "IMPLEMENTATIONS", [Triton(), Reference()])
    spec = SiteSpec((HeadGroup(None, SlidingWindow(window=3), Layout()),)).to_json()
    locattn.reset_counters()
    for shape, dt in (((1, 2, 20, 16), torch.float64), ((1, 2, 20, 320), torch.float32)):
        q = torch.randn(*shape, dtype=dt)
        torch.ops.locattn.attention(q, q, q, None, None, 0.1, False, spec, "")
    assert locattn.counters()["dispatch"] == {
        "skip triton: dtype torch.float64 is not supported (fp16, bf16, fp32)": 1,
        "skip triton: head dim 320 > 256": 1, "reference": 2}


# ----------------------------------------------------------------------------------------------------------
# CUDA only: the production tiles (CONFIG_SPACE) on sizes where blocks are large and many


GPU_CASES = [
    Case("gpu-na2d-40x50-d64-bf16-gqa", Neighborhood(kernel=(7, 9)), Layout(grid=(40, 50)), s=2000, d=64,
         hq=4, hk=2, dtype=torch.bfloat16),
    Case("gpu-sw1d-3001-d128-causal-fp16", SlidingWindow(window=301), s=3001, d=128, causal=True,
         dtype=torch.float16),
    Case("gpu-tiled3d-6x20x24-d80-bf16", Tiled(tile=(2, 4, 8), window=(3, 3, 3)), Layout(grid=(6, 20, 24)),
         s=2880, d=80, dtype=torch.bfloat16),
    Case("gpu-na3d-5x21x19-d96-globals-sinks-bf16", Neighborhood(kernel=(3, 7, 5), dilation=(1, 2, 1)),
         Layout(grid=(5, 21, 19), prefix=77, suffix=0, sinks=4), s=5 * 21 * 19 + 77, d=96,
         dtype=torch.bfloat16),
    Case("gpu-dense-1500-d160-dv96-mask-bf16", Dense(), s=1500, d=160, dv=96, mask="rand",
         dtype=torch.bfloat16),
    Case("gpu-strided-30x50-d72-bias-fp32", Strided(kernel=(9, 9), stride=(3, 3)), Layout(grid=(30, 50)),
         s=1500, d=72, bias="bcast"),
    Case("gpu-shifted-28x28-d256-fp16-rows", ShiftedWindow(window=(7, 7), shift=(3, 3)), Layout(grid=(28, 28)),
         s=784, d=256, mask="rows", dtype=torch.float16),
]


@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_gpu_default_configs(case: Case):
    """Default tiles per kernel family: this GPU's shipped tiles, else the first CONFIG_SPACE entry it fits."""
    call = case.call()
    _run_case(call, Triton(nan_fill=True, record_visits=True), need_dbias=call.bias is not None)


def _plain_space(f: str, d: int) -> list[KernelConfig]:
    return [c for c in CONFIG_SPACE[(f, d)] if not c.tma]  # the TMA candidates: test_gpu_tma_candidates


def _space_variants():
    for d in (64, 128, 256):
        n = max(len(_plain_space(f, d)) for f in ("fwd", "dq", "dkdv"))
        for i in range(n):
            yield d, i


@needs_cuda
@pytest.mark.parametrize("d,i", list(_space_variants()))
def test_gpu_every_config_compiles_and_matches(d: int, i: int):
    """Every candidate tile of the autotuning space compiles for this GPU and computes the same attention."""
    configs = {f: _plain_space(f, d)[i % len(_plain_space(f, d))] for f in ("fwd", "dq", "dkdv")}
    case = Case(f"gpu-space-d{d}-{i}", Neighborhood(kernel=(5, 7)), Layout(grid=(24, 40), prefix=3), s=963,
                d=d - 8 if d > 64 else d, hq=4, hk=2, causal=i % 2 == 1, dtype=torch.bfloat16)
    _run_case(case.call(), Triton(configs=configs, nan_fill=True, record_visits=True))


def _tma_variants():
    from locattn.codegen.triton_impl import TMA_CANDIDATES
    for d, cands in TMA_CANDIDATES.items():
        for cfg in cands:
            yield pytest.param(d, cfg, id=f"d{d}-{cfg.block_m}x{cfg.block_n}-{cfg.num_warps}w{cfg.num_stages}s"
                               + ("-ws" if cfg.ws else "-tma"))


@needs_cuda
@pytest.mark.parametrize("d,cfg", list(_tma_variants()))
def test_gpu_tma_candidates(d: int, cfg: KernelConfig):
    """Every TMA / warp-specialized forward candidate on this GPU, on the plans it serves: dense (LINEAR, GQA),
    a 2-D and a 3-D tiled grid (GRID descriptors), bf16, against fp64; which kernel ran is reported (warp
    specialization may be refused by the compiler: counted, then the TMA kernel without it)."""
    import locattn

    for case in (Case(f"gpu-tma-dense-d{d}", Dense(), s=2048, d=d, hq=4, hk=2, dtype=torch.bfloat16),
                 Case(f"gpu-tma-tiled2d-d{d}", Tiled(tile=(8, 16), window=(3, 3)), Layout(grid=(32, 64)), s=2048,
                      d=d, dtype=torch.bfloat16),
                 Case(f"gpu-tma-tiled3d-d{d}", Tiled(tile=(2, 8, 8), window=(3, 3, 3)), Layout(grid=(4, 16, 32)),
                      s=2048, d=d, dtype=torch.bfloat16)):
        call = case.call()
        locattn.reset_counters()
        impl = Triton(configs={"fwd": cfg}, nan_fill=True)
        out, lse = impl.forward(call)
        print(case.id, cfg, impl.launched["fwd"], dict(locattn.counters()))
        assert impl.launched["fwd"].startswith("attn_fwd_tma"), (case.id, impl.last_tma_unfit)
        g = torch.zeros_like(out)
        gold, eager = _golden(call, g, False), _eager(call, g, False)
        assert_close_to_golden(out, gold[0], eager[0], factor=FUDGE, name="out")
        assert_close_to_golden(lse, gold[1], eager[1], factor=FUDGE, name="lse")


@needs_cuda
def test_gpu_cuda_graphs_with_per_head_groups():
    """Inference under CUDA graphs (Inductor's ``triton.cudagraphs``): a per-head policy (two head groups, so the
    op selects heads, scatters outputs and runs two kernels) is captured and replayed with no cudagraph skip,
    and every call equals the same compiled policy on the reference path."""
    import locattn
    from torch._dynamo.utils import counters as dynamo_counters

    torch.manual_seed(0)
    model = _Net(d=64, heads=4).to(DEVICE, torch.bfloat16)
    policy = {"rule": [{"match": "attn", "heads": "0-1", "pattern": "neighborhood", "kernel": [3, 5],
                        "grid": [5, 7]}]}
    xs = [torch.randn(2, 35, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        torch._dynamo.reset()
        ref = torch.compile(model, backend=locattn.backend(policy, backend="reference"))
        want = [ref(x).clone() for x in xs]
        torch._dynamo.reset()
        locattn.reset_counters()
        dynamo_counters.clear()
        fast = torch.compile(model, backend="locattn", options={"policy": policy, "triton.cudagraphs": True})
        got = [fast(x).clone() for x in xs]  # warm-up, record, then replays
    assert dynamo_counters["inductor"]["cudagraph_skips"] == 0, dict(dynamo_counters["inductor"])
    disp = locattn.counters()["dispatch"]
    assert disp.get("triton", 0) >= 2 and not any(k in disp for k in ("blocked", "reference")), disp
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2, msg=lambda m, i=i: f"call {i}: {m}")


@pytest.mark.skipif(not NATIVE or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device (Triton launches on the
    current one) and give the bits they give on cuda:0."""
    call = Case("dev1-na2d-5x7", Neighborhood(kernel=(3, 5)), Layout(grid=(5, 7)), s=35, hq=4,
                dtype=torch.bfloat16).call()
    dev1 = dataclasses.replace(call, q=call.q.to("cuda:1"), k=call.k.to("cuda:1"), v=call.v.to("cuda:1"))
    impl = _impl(32, 32)
    with torch.cuda.device(0):
        want_out, want_lse = impl.forward(call)
        g = torch.randn_like(want_out)
        want = impl.backward(call, g, want_out, want_lse, False)
        out, lse = impl.forward(dev1)
        got = impl.backward(dev1, g.to("cuda:1"), out, lse, False)
    assert out.device == torch.device("cuda:1")
    for a, b in zip((out, lse) + tuple(got[:3]), (want_out, want_lse) + tuple(want[:3])):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)


@needs_cuda
def test_gpu_autocast_runs_the_kernels():
    """Under torch.autocast("cuda", bf16) a site whose q / k come out of an fp32 norm (v bf16) reaches the
    Triton kernels in bf16, forward and backward, and equals eager autocast."""
    import locattn
    from test_backend import NormedQK  # tests/ is on sys.path (pytest's rootdir insertion, as for golden)

    torch.manual_seed(0)
    model = NormedQK(d=64, heads=4).to(DEVICE)
    x = torch.randn(2, 35, 64, device=DEVICE, requires_grad=True)
    res = {}
    for name in ("eager", "compiled"):
        torch._dynamo.reset()
        locattn.reset_counters()
        run = model if name == "eager" else torch.compile(model, backend="locattn",
                                                          options={"policy": {"default": {"pattern": "dense"}}})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = run(x)
        (gx,) = torch.autograd.grad(y.float().pow(2).mean(), (x,))
        res[name] = (y, gx)
    assert locattn.counters()["dispatch"] == {"triton": 2}, locattn.counters()["dispatch"]
    for a, b in zip(res["compiled"], res["eager"]):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@needs_cuda
def test_gpu_auto_dispatch_through_torch_compile():
    """Default registry, no override: CUDA tensors under backend="locattn" run the Triton kernels (bf16, a
    DiT-like block with a 2-D neighborhood policy), forward and backward, and match the reference path."""
    import locattn

    torch.manual_seed(0)
    base = _Net().to(DEVICE)
    x = torch.randn(2, 35, 32, device=DEVICE)
    policy = {"rule": [{"match": "attn", "pattern": "neighborhood", "kernel": [3, 5], "grid": [5, 7]}]}
    res = {}
    # bf16 on the Triton kernels ("auto"), bf16 on the reference path (the yardstick), fp64 reference (golden)
    for name, be, dtype in (("auto", "auto", torch.bfloat16), ("ref", "reference", torch.bfloat16),
                            ("gold", "reference", torch.float64)):
        model = copy.deepcopy(base).to(dtype)
        torch._dynamo.reset()
        locattn.reset_counters()
        xc = x.to(dtype).requires_grad_()
        y = torch.compile(model, backend=locattn.backend(policy, backend=be))(xc)
        y.double().pow(2).mean().backward()
        res[name] = [y, xc.grad] + [p.grad for p in model.parameters()]
        if be == "auto":
            disp = locattn.counters()["dispatch"]
            assert disp.get("triton", 0) >= 2 and not any(k in disp for k in ("blocked", "reference")), disp
    for i, (a, b, e) in enumerate(zip(res["auto"], res["gold"], res["ref"])):
        assert_close_to_golden(a, b, e, factor=FUDGE, name=f"output/grad #{i}")


@needs_cuda
def test_gpu_autotune_picks_a_config_and_persists_it(tmp_path, monkeypatch):
    import locattn
    from locattn.codegen import triton_impl

    monkeypatch.setenv("LOCATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_impl, "_TUNED", {})
    monkeypatch.setattr(triton_impl, "_PERSISTED", {})
    call = Case("gpu-autotune", SlidingWindow(window=129), s=2048, d=64, dtype=torch.bfloat16).call()
    out, lse = Triton(autotune=True).forward(call)
    keys = [k for k in triton_impl._TUNED if k[0] == "fwd"]
    assert len(keys) == 1 and triton_impl._TUNED[keys[0]] in CONFIG_SPACE[("fwd", 64)]
    assert any("fwd d64" in k for k in locattn.counters().get("triton_autotune", {}))
    gold = _golden(call, torch.zeros_like(out), False)
    assert_close_to_golden(out, gold[0], None, name="out")
    # a later process (fresh in-memory state) reuses the file without timing anything
    path = triton_impl.tuning_file(torch.cuda.get_device_name())
    assert path.exists() and triton_impl._key_str(keys[0]) in json.loads(path.read_text())
    best = triton_impl._TUNED[keys[0]]
    monkeypatch.setattr(triton_impl, "_TUNED", {})
    monkeypatch.setattr(triton_impl, "_PERSISTED", {})
    locattn.reset_counters()
    Triton(autotune=True).forward(call)
    assert triton_impl._TUNED[keys[0]] == best and not locattn.counters().get("triton_autotune")


def test_shipped_tiles_and_lookup(tmp_path, monkeypatch):
    """Shipped tiles of a GPU model are read, the user's cache overrides them; lookup: exact key, else (unless
    autotuning) the per-kernel default."""
    from locattn.codegen import triton_impl as ti

    monkeypatch.setenv("LOCATTN_CACHE_DIR", str(tmp_path / "user"))
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(ti, "packaged_tuning_file", lambda name: shipped)
    key = ("fwd", 128, 16384, "neighborhood", torch.bfloat16, 0)
    ti.save_tuned(shipped, ti._key_str(key), KernelConfig(128, 64, 8, 3))
    ti.save_tuned(shipped, ti._key_str(key, wildcard=True), KernelConfig(128, 32, 8, 2))
    ti.save_tuned(ti.tuning_file("GPU X"), ti._key_str(key), KernelConfig(64, 64, 4, 3))
    entries = ti.persisted_configs("GPU X")
    assert ti.lookup_tuned(entries, key, autotune=False) == KernelConfig(64, 64, 4, 3)  # user beats shipped
    other = ("fwd", 128, 4096, "tiled", torch.bfloat16, 0)
    assert ti.lookup_tuned(entries, other, autotune=False) == KernelConfig(128, 32, 8, 2)  # per-kernel default
    assert ti.lookup_tuned(entries, other, autotune=True) is None  # autotuning times the exact key instead
    assert ti.lookup_tuned(entries, ("dq",) + other[1:], autotune=False) is None
    # a pattern's own default sits between the exact key and the kernel's default
    ti.save_tuned(shipped, ti._key_str(other, wildcard=True, keep_pattern=True), KernelConfig(128, 64, 8, 4))
    entries = ti.persisted_configs("GPU X")
    assert ti._key_str(other, wildcard=True, keep_pattern=True) == "fwd|d128|*|tiled|bfloat16"
    assert ti.lookup_tuned(entries, other, autotune=False) == KernelConfig(128, 64, 8, 4)
    assert ti.lookup_tuned(entries, key, autotune=False) == KernelConfig(64, 64, 4, 3)


def test_shipped_h200_tiles_are_candidates():
    """The shipped H200 file loads, every tile in it is a CONFIG_SPACE candidate of its kernel and head dim, and
    each kernel has its default entry (what the device measured, in the format the lookup reads)."""
    from locattn.codegen import triton_impl as ti

    entries = ti.load_tuned(ti.packaged_tuning_file("NVIDIA H200"))
    assert entries
    for key, cfg in entries.items():
        fam, d = key.split("|")[:2]
        assert cfg in CONFIG_SPACE[(fam, int(d[1:]))], key
    for fam in ("fwd", "dq", "dkdv"):
        for d in (64, 128):
            assert f"{fam}|d{d}|*|*|bfloat16" in entries


def test_untuned_default_is_the_first_tile_that_fits():
    """Without tuned tiles, a GPU that refuses a tile at launch (Triton's OutOfResources: too little shared
    memory) gets the next one, counted; the smallest tile is the last resort; other errors are not hidden."""
    from triton.runtime.errors import OutOfResources

    from locattn.codegen import triton_impl as ti
    from locattn.counters import counters, reset_counters

    space = [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2)]
    key = ("fwd", 128, 16384, "dense", torch.bfloat16, 0)

    def fits(limit):
        def run(cfg):
            if cfg.block_m * cfg.block_n * cfg.num_stages > limit:
                raise OutOfResources(cfg.block_m * cfg.block_n * cfg.num_stages, limit, "shared memory")
        return run

    reset_counters()
    assert ti._first_that_fits(space, fits(10**6), key) == space[0]
    assert ti._first_that_fits(space, fits(30000), key) == space[1]
    assert sum(counters().get("triton_tile_too_large", {}).values()) == 1
    assert ti._first_that_fits(space, fits(1024), key) == ti.SMALLEST_CONFIG
    with pytest.raises(OutOfResources):
        ti._first_that_fits(space, fits(10), key)

    def broken(cfg):
        raise RuntimeError("not a resource problem")
    with pytest.raises(RuntimeError):
        ti._first_that_fits(space, broken, key)

    # cached per (key, padded head dims); during CUDA-graph capture an unprobed key gets the smallest tile, no probe
    fit_key = key + (128, 64)
    ti._FITS.pop(fit_key, None)
    calls = []

    def counted(cfg):
        calls.append(cfg)
        fits(30000)(cfg)
    assert ti._untuned_default(space, counted, fit_key, capturing=True) == ti.SMALLEST_CONFIG and not calls
    assert ti._untuned_default(space, counted, fit_key, capturing=False) == space[1]
    assert ti._untuned_default(space, counted, fit_key, capturing=True) == space[1]   # probed before: reused
    assert ti._untuned_default(space, counted, fit_key, capturing=False) == space[1] and len(calls) == 2
    ti._FITS.pop(fit_key)


def test_fold_only_for_a_normal_positive_scale():
    from locattn.codegen.triton_impl import _can_fold
    c = Case("fold", Dense(), s=8, d=16).call()
    for scale, bias, ok in [(0.125, None, True), (1e-20, None, True), (1e-40, None, False), (0.0, None, False),
                            (-0.5, None, False), (0.125, torch.zeros(8, 8), False)]:
        call = AttentionCall(c.q, c.k, c.v, None, bias, scale, False, c.pattern, c.layout)
        assert _can_fold(call) == ok, (scale, bias is not None)


def test_tuning_cache_file(tmp_path, monkeypatch, caplog):
    """The on-disk autotuning cache: one file per GPU model and Triton version, round trip, a corrupt file
    or entry is ignored with a warning, LOCATTN_CACHE_DIR="" turns persistence off."""
    from locattn.codegen import triton_impl as ti

    monkeypatch.setenv("LOCATTN_CACHE_DIR", str(tmp_path))
    path = ti.tuning_file("NVIDIA H200 (sm_90)")
    assert path.parent == tmp_path and "NVIDIA_H200_sm_90" in path.name
    key = ("fwd", 128, 16384, "neighborhood", torch.bfloat16, 0)
    ti.save_tuned(path, ti._key_str(key), KernelConfig(128, 64, 8, 3))
    ti.save_tuned(path, "dq|d128|s16384|neighborhood|bfloat16", KernelConfig(64, 32, 8, 2))
    got = ti.load_tuned(path)
    assert got == {"fwd|d128|s16384|neighborhood|bfloat16": KernelConfig(128, 64, 8, 3),
                   "dq|d128|s16384|neighborhood|bfloat16": KernelConfig(64, 32, 8, 2)}
    raw = json.loads(path.read_text())
    raw["dkdv|d64|s1024|dense|float16"] = {"block_m": 48, "block_n": 64, "num_warps": 4, "num_stages": 2}
    path.write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="locattn"):
        assert len(ti.load_tuned(path)) == 2
    assert "power of two" in caplog.text
    path.write_text("{not json")
    assert ti.load_tuned(path) == {}
    monkeypatch.setenv("LOCATTN_CACHE_DIR", "")
    assert ti.tuning_file("x") is None
    ti.save_tuned(None, "k", KernelConfig(16, 16))  # no-op


# ----------------------------------------------------------------------------------------------------------
# through the custom op: per-head groups, autograd, dbias


@pytest.fixture
def triton_registered():
    saved = list(registry.IMPLEMENTATIONS)
    impl = Triton(KernelConfig(32, 32, 1, 1), nan_fill=True)
    registry.register(impl, before="blocked")
    yield impl
    registry.IMPLEMENTATIONS[:] = saved


@pytest.mark.parametrize("heads", [((0, 3), (1, 2)), ((0, 1), (2, 3)), ((0, 1, 2), (3,))],
                         ids=["one-per-kv-head", "whole-gqa", "repeated-kv"])
def test_op_head_groups_with_bias(triton_registered, heads):
    """Per-head groups through the op, batch 2, forward and backward: groups that keep GQA inside the kernels
    (one query head per kv head; whole GQA groups, as k / v views) and a group taking unequal shares of GQA
    groups (k / v heads repeated per query head, their gradients summed per kv head)."""
    import locattn.ops  # noqa: F401  registers torch.ops.locattn

    spec = SiteSpec((HeadGroup(heads[0], ShiftedWindow(window=(2, 3), shift=(1, 1)), Layout(grid=(5, 7))),
                     HeadGroup(heads[1], Tiled(tile=(2, 2), window=(1, 3)), Layout(grid=(5, 7), sinks=2))))
    gen = torch.Generator().manual_seed(0)
    q, k, v, bias = (torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
                     for shape in ((2, 4, 35, 40), (2, 2, 35, 40), (2, 2, 35, 24), (1, 4, 35, 35)))
    res = {}
    for be in ("reference", "triton"):
        o, lse = torch.ops.locattn.attention(q, k, v, None, bias, 0.2, True, spec.to_json(), be)
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        res[be] = (o, lse, *torch.autograd.grad(o, [q, k, v, bias], g))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias"], res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


class _Attn(nn.Module):
    def __init__(self, d=32, heads=2):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, s, d))


class _Net(nn.Module):
    def __init__(self, d=32, heads=2):
        super().__init__()
        self.attn = _Attn(d, heads)

    def forward(self, x):
        return x + self.attn(x)


def test_end_to_end_torch_compile(triton_registered, monkeypatch):
    """SDPA in a module -> locattn backend (Inductor) -> torch.ops.locattn.attention on the Triton kernels,
    forward and backward, against the eager module with the pattern's dense mask."""
    import locattn
    from locattn.patterns.base import dense_mask

    model = _Net().to(DEVICE)
    x = torch.randn(1, 35, 32, device=DEVICE)
    policy = {"rule": [{"match": "attn", "pattern": "neighborhood", "kernel": [3, 3], "grid": [5, 7]}]}
    xc = x.clone().requires_grad_()
    y = torch.compile(model, backend=locattn.backend(policy, backend="triton"), fullgraph=True)(xc)
    y.pow(2).mean().backward()
    assert locattn.counters()["rewrite"].get("sdpa") == 1
    assert locattn.counters()["dispatch"].get("triton", 0) >= 2  # forward and backward ran the kernels
    got = [y, xc.grad] + [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    mask = dense_mask(Neighborhood(kernel=(3, 3)), Layout(grid=(5, 7)), 35, 35, device=DEVICE)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: sdpa(q, k, v, attn_mask=mask))
    xe = x.clone().requires_grad_()
    ye = model(xe)
    ye.pow(2).mean().backward()
    want = [ye, xe.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# the GPU benchmark's plumbing, on CPU


@pytest.mark.skipif(NATIVE, reason="plumbing check for machines without a GPU")
@pytest.mark.skipif(NATIVE, reason="the GPU run compiles the kernels natively")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter is lenient (tile shapes, descriptor ranks, layouts): every kernel family also compiles for
    sm_90 offline (Triton's bundled ptxas, ``tools/compile_sm90.py``, fresh cache): the generic forward / dQ /
    dK/dV with GRID addressing, RANGES and WINDOW_ONLY at a padded head dim, and on a LINEAR plan without padding
    slots (NOPAD: unmasked row loads in the partial loops), the TMA forward on LINEAR and 3-D GRID
    descriptors, and the per-(batch, head) / per-head-group tables (PER_BH, DYN)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    runs = [("--family fwd dq dkdv --d 72 --ndim 2 --block 64 64 --warps 4 --stages 2 --tile 8 8 --ranges "
             "--window-only", 3),
            ("--family fwd dq dkdv --d 64 --ndim 1 --block 64 32 --warps 4 --stages 2 --linear --ranges --window-only "
             "--nopad 3", 3),
            ("--family fwd --tma --d 40 --ndim 0 --block 64 64 --warps 4 --stages 2 --linear --ranges --no-partial", 1),
            ("--family fwd --tma --d 64 --ndim 3 --block 64 64 --warps 4 --stages 2 --tile 2 4 8 --no-partial", 1),
            # dynamic tables (per (batch, head), WHOLE entries, causal) and per-head-group tables
            ("--family fwd dq dkdv --d 64 --ndim 1 --block 64 64 --warps 4 --stages 2 --linear --dyn --causal", 3),
            ("--family fwd dq dkdv --d 128 --ndim 2 --block 64 64 --warps 4 --stages 2 --tile 8 8 --per-bh", 3)]
    for args, n in runs:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "compile_sm90.py"), *args.split()], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, args + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("fwd", "dq", "dkdv"))]
        assert len(lines) == n and all("reg " in ln for ln in lines), proc.stdout


def test_gpu_benchmark_ceilings(tmp_path):
    """``--ceilings``: per case and tile pair the plan's block density and ceiling = density / block density (no
    GPU, no timing): at most 1, exactly 1 for dense, and equal to the plan's own numbers."""
    from locattn.patterns.plan import build_plan

    out = tmp_path / "ceil.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--ceilings", "--dry-run",
                           "--json", str(out)], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["ceilings"]
    assert len(rows) == 6 * 5
    for r in rows:
        assert 0 < r["ceiling"] <= 1 and r["ceiling"] == pytest.approx(r["density"] / r["block_density"])
        if r["case"] == "dense":
            assert r["ceiling"] == 1
    r = next(r for r in rows if r["case"] == "na2d" and (r["block_m"], r["block_n"]) == (64, 32))
    plan = build_plan(Neighborhood(kernel=(3, 3)), Layout(grid=(8, 8)).resolve(64), 64, 64, 64, 32, False)
    assert r["block_density"] == plan.block_density and r["full_share"] == plan.n_full / plan.nnz


def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--dry-run",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 6
    for c in cases:  # each case checks our output against the predicate on sampled rows (fp32 here)
        assert c["ours"]["sample_rel_err"] < 1e-5, c["case"]
        assert set(c["ours"]["tiles"]) == {"fwd", "dq", "dkdv"}
        for ab in ("ours_tables", "ours_padding_test", "ours_row_masks"):  # the A/Bs give the same bits
            assert c.get(ab, {}).get("same_output", True), (c["case"], ab)
    # NOPAD's A/B where the plan has partial blocks and no padding slot: the 64-token 1-D window, the 8x8 grid, the
    # 3-D tiles of 16 tokens in 32-token blocks (na3d's 72 tokens leave a padded block; tiled2d is all full)
    assert {c["case"] for c in cases if "ours_row_masks" in c} == {"sw1d", "na2d", "tiled3d"}
    # FlexAttention alone against an earlier run's rows (a later device call): the dry run checks its mask and
    # output against ours
    flex = tmp_path / "flex.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--dry-run",
                           "--flex-from", str(out), "--json", str(flex)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(flex.read_text())["cases"]
    assert len(rows) == 6 and all(r["flex"]["max_abs_diff_vs_ours"] < 1e-4 for r in rows), rows
    # the parallel pre-compile of a device run: shard 1 of 2 takes every other case
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--dry-run",
                           "--compile-only", "--shard", "1/2"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "compiled 3 of 6 items" in proc.stdout, proc.stdout[-3000:] + proc.stderr
    # the config sweep (the data behind CONFIG_SPACE's defaults): every candidate of every family timed
    sweep = tmp_path / "sweep.json"
    tuned = tmp_path / "tuned" / "cpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--dry-run", "--sweep",
                           "--json", str(sweep), "--emit-tuned", str(tuned)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(sweep.read_text())["sweep"]
    assert {r["case"] for r in rows} == {"dense", "na2d"}
    for r in rows:
        for fam in ("fwd", "dq", "dkdv"):
            timed = [KernelConfig(**x["config"]) for x in r["families"][fam]]
            skipped = [KernelConfig(**x["config"]) for x in r["tma_skipped"]] if fam == "fwd" else []
            assert sorted(map(repr, timed + skipped)) == sorted(map(repr, CONFIG_SPACE[(fam, 64)]))
            assert all(math.isfinite(x["ms"]) for x in r["families"][fam])
        # the TMA candidates cannot run these tiny plans (padded key blocks: partial): skipped with the reason
        assert r["tma_skipped"] and all(x["why"] == "the plan has partial blocks" for x in r["tma_skipped"])
    # the emitted tiles load as a shipped tuning file: the fastest per case, one default per kernel
    from locattn.codegen.triton_impl import load_tuned
    entries = load_tuned(tuned)
    for fam in ("fwd", "dq", "dkdv"):
        assert entries[f"{fam}|d64|*|*|float32"] in CONFIG_SPACE[(fam, 64)]
        for r in rows:  # each swept pattern's default: one swept case per pattern here, so its fastest tile
            pattern = r["keys"][fam].split("|")[3]
            assert entries[f"{fam}|d64|*|{pattern}|float32"] == KernelConfig(**r["families"][fam][0]["config"])
        for r in rows:
            fastest = KernelConfig(**r["families"][fam][0]["config"])
            assert entries[r["keys"][fam]] == fastest
    # the shipped file rebuilt from saved sweeps (a case swept twice counts once): the same tiles
    again = tmp_path / "again.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_attention.py"), "--tuned-from", str(sweep),
                           str(sweep), "--emit-tuned", str(again)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_tuned(again) == entries
    assert time.time() - t0 < 90


@pytest.mark.parametrize("nopad", [True, False])
def test_nan_key_outside_the_window_stays_out(nopad: bool):
    """A non-finite key reaches only the forward rows whose window holds it, like the reference (which masks the
    scores it computed): partial blocks select masked scores to -inf (an additive 0 / -inf bias would turn the
    NaN score of a key outside the window into a NaN row). Output and lse: NaN exactly in the reference's NaN
    rows, equal to it elsewhere; with and without NOPAD (the 64-token sequence has no padding). (The backward is
    not compared: the dense reference's gradients are NaN everywhere, 0 * NaN in its matmuls.)"""
    from locattn.patterns.base import dense_mask

    case = Case("sw1d-64-w7-nan-key", SlidingWindow(window=7), s=64, d=16, block=(16, 16))
    call = case.call()
    call.k[0, :, 40] = float("nan")
    out, lse = Triton(KernelConfig(16, 16, 1, 1), nopad=nopad).forward(call)
    gold_out, gold_lse = Reference().forward(_call64(call))
    near = dense_mask(call.pattern, call.layout, 64, 64)[:, 40]  # the query rows whose window holds key 40
    assert 0 < int(near.sum()) < 32 and torch.equal(torch.isnan(gold_out[0, 0]).any(dim=-1), near)
    torch.testing.assert_close(out.double().cpu(), gold_out.cpu(), rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse.double().cpu(), gold_lse.cpu(), rtol=1e-4, atol=1e-5, equal_nan=True)
