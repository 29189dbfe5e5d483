"""GPU benchmark of locattn's fused Triton kernels against dense SDPA and FlexAttention.

For each pattern (1-D sliding window at 16k / 64k tokens, 2-D neighborhood and tiled on 64x64 and 128x128
grids, 3-D neighborhood and tiled on a 30x48x80 grid, dense) and head dim (128, then 64), bf16, B=1:

* locattn ``triton`` forward and backward time, plus its plan build time (analytic, no S x S mask); where the
  plan allows table-free addressing (LINEAR / RANGES), the same kernels on the CSR tables too (A/B),
* effective TFLOP/s counting only computed score entries (``count_allowed``: 4·n·D forward, 2.5x that
  backward),
* speedup over dense ``F.scaled_dot_product_attention`` and the fraction of the ideal speedup
  ``1 / density``,
* speedup over compiled ``flex_attention`` with the same mask (its ``mask_mod`` is built from locattn's
  predicate via per-token index tensors), with ``create_block_mask`` time reported separately.

Two passes: first our kernels and SDPA for every case (``--budget-s`` 200 s: cases left after it are skipped),
then FlexAttention, whose compile per case dominates, for as many cases as start before ``--flex-budget-s``
(280 s after the start); the JSON is rewritten after every case. A full run stays near 5 minutes on one H200
(torch >= 2.11, triton >= 3.6). Head dim 128 runs first. Results go to JSON (``--json``).

Usage::

    python benchmarks/gpu_attention.py                  # full sweep
    python benchmarks/gpu_attention.py --quick          # head dim 128, five cases
    python benchmarks/gpu_attention.py --dry-run        # CPU, tiny sizes, TRITON_INTERPRET=1: plumbing only
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before triton is imported anywhere: build the kernels for the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from locattn.codegen.registry import AttentionCall  # noqa: E402
from locattn.codegen.triton_impl import (CONFIG_SPACE, TMA_CANDIDATES, KernelConfig, Triton, _key_str,  # noqa: E402
                                        head_dim_bucket, kernel_tables)
from locattn.patterns import Dense, Layout, Neighborhood, SlidingWindow, Tiled, count_allowed  # noqa: E402
from locattn.patterns.base import Pattern, allowed, dense_mask, is_global, key_coords, query_bounds  # noqa: E402
from locattn.patterns.plan import build_plan  # noqa: E402

T0 = time.time()


@dataclass(frozen=True)
class BenchCase:
    name: str
    pattern: Pattern
    layout: Layout
    seq: int
    heads: int


def gpu_cases() -> list[BenchCase]:
    g2a, g2b, g3 = (64, 64), (128, 128), (30, 48, 80)
    return [
        BenchCase("sw1d-16k", SlidingWindow(window=1024), Layout(), 16384, 16),
        BenchCase("na2d-128x128", Neighborhood(kernel=(17, 17)), Layout(grid=g2b), 16384, 16),
        BenchCase("tiled2d-128x128", Tiled(tile=(8, 16), window=(3, 3)), Layout(grid=g2b), 16384, 16),
        BenchCase("na3d-30x48x80", Neighborhood(kernel=(7, 15, 15)), Layout(grid=g3), math.prod(g3), 8),
        BenchCase("tiled3d-30x48x80", Tiled(tile=(2, 8, 8), window=(3, 3, 5)), Layout(grid=g3), math.prod(g3), 8),
        BenchCase("sw1d-64k", SlidingWindow(window=1024), Layout(), 65536, 8),
        BenchCase("na2d-64x64", Neighborhood(kernel=(17, 17)), Layout(grid=g2a), 4096, 16),
        BenchCase("tiled2d-64x64", Tiled(tile=(8, 16), window=(3, 3)), Layout(grid=g2a), 4096, 16),
        BenchCase("dense-16k", Dense(), Layout(), 16384, 16),
    ]


def dry_cases() -> list[BenchCase]:
    return [
        BenchCase("sw1d", SlidingWindow(window=8), Layout(), 64, 1),
        BenchCase("na2d", Neighborhood(kernel=(3, 3)), Layout(grid=(8, 8)), 64, 1),
        BenchCase("tiled2d", Tiled(tile=(4, 4), window=(1, 3)), Layout(grid=(8, 12)), 96, 1),
        BenchCase("na3d", Neighborhood(kernel=(3, 3, 3), dilation=(1, 1, 2)), Layout(grid=(3, 4, 6)), 72, 1),
        BenchCase("tiled3d", Tiled(tile=(1, 4, 4), window=(1, 1, 1)), Layout(grid=(2, 4, 8)), 64, 1),
        BenchCase("dense", Dense(), Layout(), 64, 1),
    ]


# ----------------------------------------------------------------------------------------------------------
# timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, dev, dry: bool, target_ms: float = 200.0, max_reps: int = 20) -> float:
    """Median wall time of ``fn`` in ms (one warm-up call first; CUDA events on GPU)."""
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    _sync(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    _sync(dev)
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(2, target_ms // est)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        _sync(dev)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_variant(impl, call: AttentionCall, g: torch.Tensor, out: torch.Tensor, dev, dry: bool,
                 backward: bool = True) -> dict:
    """One A/B variant of our kernels on the benchmark's call: its forward (and backward) ms and whether its
    output equals ``out`` bit for bit."""
    res = {}
    rec = dict(fwd_ms=bench_ms(lambda: res.update(o=impl.forward(call)), dev, dry))
    o, lse = res["o"]
    if backward:
        rec["bwd_ms"] = bench_ms(lambda: impl.backward(call, g, o, lse, False), dev, dry)
    rec["same_output"] = bool(torch.equal(o, out))
    return rec


def over_budget(args, flex: bool = False) -> bool:
    return time.time() - T0 > (args.flex_budget_s if flex else args.budget_s)


# ----------------------------------------------------------------------------------------------------------
# FlexAttention mask_mod from locattn's predicate: per-token index tensors, so it compiles


def flex_mask_mod(pattern: Pattern, layout: Layout, seq: int, dev):
    """``mask_mod(b, h, q_idx, kv_idx)`` equal to :func:`locattn.patterns.base.allowed` (None for dense)."""
    if not pattern.local:
        return None
    t = torch.arange(seq)
    axes = [tuple(x.to(device=dev, dtype=torch.int32) for x in (lo, hi, ku))
            for (lo, hi), ku in zip(query_bounds(pattern, layout, t), key_coords(pattern, layout, t))]
    glob_q = is_global(t, layout).to(dev)
    glob_k = (is_global(t, layout) | (t < layout.sinks)).to(dev)

    def mask_mod(b, h, q_idx, kv_idx):
        win = None
        for lo, hi, ku in axes:  # unrolled when traced: one interval test per axis
            u = ku[kv_idx]
            w = (u >= lo[q_idx]) & (u <= hi[q_idx])
            win = w if win is None else win & w
        return win | glob_q[q_idx] | glob_k[kv_idx]

    return mask_mod


# ----------------------------------------------------------------------------------------------------------


def progress(msg: str) -> None:
    print(f"  [{time.time() - T0:6.1f} s] {msg}", flush=True)


def case_layout(case: BenchCase) -> Layout:
    layout = case.layout.resolve(case.seq) if case.pattern.local else case.layout
    if case.pattern.local:
        case.pattern.validate(layout.grid)
    return layout


def make_inputs(case: BenchCase, d: int, dev, dtype):
    """q, k, v, grad_out [1, H, S, d] (seeded: the FlexAttention pass regenerates the same tensors)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    return [torch.randn(1, case.heads, case.seq, d, device=dev, dtype=dtype, generator=gen) for _ in range(4)]


def sdpa_kernels(q, k, v, scale: float, dev) -> list[str]:
    """The GPU kernels one ``F.scaled_dot_product_attention`` forward launches (which SDPA backend PyTorch chose:
    flash, cuDNN, memory-efficient or math), from the profiler; empty on CPU."""
    if dev.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.cuda.synchronize(dev)
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})[:8]


def run_case(case: BenchCase, d: int, args, dev, dry: bool, sdpa_cache: dict, with_flex: bool = True) -> dict:
    dtype = torch.float32 if dry else torch.bfloat16
    b, h, s = 1, case.heads, case.seq
    layout = case_layout(case)
    allowed = count_allowed(case.pattern, layout, s, s)
    density = allowed / (s * s)
    rec = dict(case=case.name, pattern=case.pattern.describe(), grid=list(layout.grid or ()), seq=s, heads=h,
               head_dim=d, dtype=str(dtype).replace("torch.", ""), allowed_per_head=allowed, density=density,
               ideal_speedup=1.0 / density)
    flops_fwd = 4.0 * allowed * d * b * h
    flops_bwd = 2.5 * flops_fwd
    q, k, v, g = make_inputs(case, d, dev, dtype)
    scale = 1.0 / math.sqrt(d)

    # --- locattn triton
    impl = Triton(KernelConfig(32, 32, 1, 1) if dry else None, autotune=args.autotune)
    call = AttentionCall(q, k, v, None, None, scale, False, case.pattern, layout)
    ok, why = impl.can_run(call)
    if not ok:
        rec["ours"] = {"error": why}
        return rec
    first_s = None
    if not dry:  # first call compiles (and autotunes when asked); reported, not timed
        t = time.perf_counter()
        out, lse = impl.forward(call)
        impl.backward(call, g, out, lse, False)
        _sync(dev)
        first_s = time.perf_counter() - t
        progress(f"{case.name} d={d}: first call (plans + compile) {first_s:.1f} s")
    # the tiles each kernel runs with (shipped per-GPU tiles, else the first default that fits)
    tiles = {fam: impl._config(call, fam, None) for fam in ("fwd", "dq", "dkdv")} if not dry else \
        {fam: impl.config for fam in ("fwd", "dq", "dkdv")}
    cfg = tiles["fwd"]
    # plan + device tables of the forward kernel, uncached (the analytic counterpart of create_block_mask)
    t = time.perf_counter()
    plan = build_plan.__wrapped__(case.pattern, layout, s, s, cfg.block_m, cfg.block_n, False)
    kernel_tables.__wrapped__(plan, case.pattern, layout, dev)
    _sync(dev)
    plan_ms = (time.perf_counter() - t) * 1e3
    res = {}
    fwd = bench_ms(lambda: res.update(o=impl.forward(call)), dev, dry)
    out, lse = res["o"]
    bwd = bench_ms(lambda: impl.backward(call, g, out, lse, False), dev, dry)
    rec["ours"] = dict(fwd_ms=fwd, bwd_ms=bwd, plan_ms=plan_ms, first_call_s=first_s,
                       fwd_tflops=flops_fwd / fwd / 1e9, bwd_tflops=flops_bwd / bwd / 1e9,
                       block_density=plan.block_density,
                       # the fraction of the ideal speedup a kernel computing whole blocks at SDPA's rate reaches
                       plan_ceiling=density / plan.block_density,
                       fwd_kernel=impl.launched.get("fwd"),
                       sample_rel_err=sample_error(case, layout, q, k, v, out, scale),
                       tiles={fam: dataclasses.asdict(c) for fam, c in tiles.items()},
                       kernels={fam: kernel_stats(ck) for fam, ck in impl.compiled.items()})
    # A/B of the addressing: where the plan allows table-free loops (LINEAR / RANGES), time the CSR tables too
    tab = kernel_tables(build_plan(case.pattern, layout, s, s, cfg.block_m, cfg.block_n, False), case.pattern,
                        layout, dev)
    rec["ours"]["addressing"] = dict(q_addr=tab.q_addr, k_addr=tab.k_addr, ranges=tab.ranges,
                                     window_only=tab.window_only, nopad=tab.nopad)
    if tab.window_only and tab.has_partial:  # A/B: the partial blocks with their padding test back
        rec["ours_padding_test"] = time_variant(Triton(impl.config, window_only=False), call, g, out, dev, dry,
                                                backward=False)
    if tab.nopad and tab.has_partial:  # A/B: the partial blocks with their row masks back (NOPAD off)
        rec["ours_row_masks"] = time_variant(Triton(impl.config, nopad=False), call, g, out, dev, dry)
    if tab.computed:
        rec["ours_tables"] = time_variant(Triton(impl.config, tables_only=True), call, g, out, dev, dry)

    # --- dense SDPA (same sequence length, no mask): the baseline of the ideal speedup
    key = (s, h, d)
    if key not in sdpa_cache:
        try:
            qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            sf = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=scale), dev, dry)
            sb = bench_ms(lambda: torch.autograd.grad(o, (qs, ks, vs), g, retain_graph=True), dev, dry)
            sdpa_cache[key] = dict(fwd_ms=sf, bwd_ms=sb, kernels=sdpa_kernels(qs, ks, vs, scale, dev))
        except Exception as e:  # OOM on a very long dense sequence: report, keep going
            sdpa_cache[key] = dict(error=f"{type(e).__name__}: {e}"[:300])
    rec["sdpa"] = sdpa_cache[key]
    if "fwd_ms" in rec["sdpa"]:
        for p in ("fwd", "bwd"):
            sp = rec["sdpa"][f"{p}_ms"] / rec["ours"][f"{p}_ms"]
            rec[f"speedup_vs_sdpa_{p}"] = sp
            rec[f"fraction_of_ideal_{p}"] = sp / rec["ideal_speedup"]

    progress(f"{case.name} d={d}: ours and sdpa timed")
    if with_flex:
        add_flex(rec, case, layout, q, k, v, g, scale, out, args, dev, dry)
    return rec


def sample_error(case: BenchCase, layout: Layout, q, k, v, out, scale: float, n_rows: int = 48) -> float:
    """||out - ref|| / ||ref|| over ``n_rows`` query rows spread over the sequence (first and last included),
    the reference computed in fp32 from the pattern's predicate (``allowed``) over all keys: a correctness
    check of every benchmark case at its real size, on the device that times it."""
    s = case.seq
    rows = torch.linspace(0, s - 1, n_rows, device=q.device).round().long()
    keys = torch.arange(s, device=q.device)
    keep = allowed(case.pattern, layout, rows[:, None], keys[None, :])        # [R, S]
    sc = (q[0, :, rows].float() @ k[0].float().transpose(-1, -2)) * scale     # [H, R, S]
    ref = torch.softmax(sc.masked_fill(~keep, float("-inf")), -1) @ v[0].float()
    got = out[0, :, rows].float()
    return ((got - ref).norm() / ref.norm()).item()


def add_flex(rec: dict, case, layout, q, k, v, g, scale, ours_out, args, dev, dry) -> None:
    """FlexAttention with the same mask, and our speedups over it, into ``rec``."""
    rec["flex"] = run_flex(case, layout, q, k, v, g, scale, ours_out, args, dev, dry)
    if "fwd_ms" in rec["flex"]:
        rec["speedup_vs_flex_fwd"] = rec["flex"]["fwd_ms"] / rec["ours"]["fwd_ms"]
    if "bwd_ms" in rec["flex"]:
        rec["speedup_vs_flex_bwd"] = rec["flex"]["bwd_ms"] / rec["ours"]["bwd_ms"]


def flex_pass(rec: dict, case: BenchCase, args, dev, dry: bool) -> None:
    """Second pass (GPU): FlexAttention for a case whose own numbers are already in ``rec``."""
    dtype = torch.float32 if dry else torch.bfloat16
    layout = case_layout(case)
    q, k, v, g = make_inputs(case, rec["head_dim"], dev, dtype)
    scale = 1.0 / math.sqrt(rec["head_dim"])
    out, _ = Triton().forward(AttentionCall(q, k, v, None, None, scale, False, case.pattern, layout))
    add_flex(rec, case, layout, q, k, v, g, scale, out, args, dev, dry)


def kernel_stats(compiled) -> dict:
    """Resources of one compiled Triton kernel (registers per thread, spilled bytes, shared memory)."""
    md = getattr(compiled, "metadata", None)
    out = {}
    for name, val in (("n_regs", getattr(compiled, "n_regs", None)), ("n_spills", getattr(compiled, "n_spills", None)),
                      ("shared", getattr(md, "shared", None)), ("num_warps", getattr(md, "num_warps", None)),
                      ("num_stages", getattr(md, "num_stages", None))):
        if isinstance(val, int):
            out[name] = val
    return out


def run_flex(case, layout, q, k, v, g, scale, ours_out, args, dev, dry, warm_only: bool = False) -> dict:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention
    except ImportError as e:
        return {"error": f"flex_attention unavailable: {e}"}
    if args.no_flex:
        return {"skipped": "--no-flex"}
    if over_budget(args, flex=True):
        return {"skipped": "flex time budget spent"}
    s = case.seq
    mask_mod = flex_mask_mod(case.pattern, layout, s, dev)
    res: dict = {}
    try:
        block_mask = None
        if mask_mod is not None:
            t = time.perf_counter()
            block_mask = create_block_mask(mask_mod, None, None, s, s, device=dev.type, _compile=not dry)
            _sync(dev)
            res["block_mask_first_s"] = time.perf_counter() - t
            t = time.perf_counter()
            block_mask = create_block_mask(mask_mod, None, None, s, s, device=dev.type, _compile=not dry)
            _sync(dev)
            res["block_mask_ms"] = (time.perf_counter() - t) * 1e3
        if dry:
            # CPU: no compiled flex backward; check the mask_mod against locattn's predicate and the
            # eager flex forward against our kernel instead of timing
            if mask_mod is not None:
                m = create_mask(mask_mod, None, None, s, s, device=dev.type)[0, 0]
                if not torch.equal(m, dense_mask(case.pattern, layout, s, s)):
                    return {"error": "flex mask_mod disagrees with locattn's predicate"}
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
            err = (o.float() - ours_out.float()).abs().max().item()
            res["max_abs_diff_vs_ours"] = err
            if err > 1e-4:
                res["error"] = f"flex output differs from ours by {err:.3g}"
            return res
        flex = _compiled_flex(flex_attention)
        qf, kf, vf = (x.detach().clone().requires_grad_() for x in (q, k, v))
        progress(f"{case.name}: flex block mask {res.get('block_mask_first_s', 0):.1f} s (first call)")
        t = time.perf_counter()
        o = flex(qf, kf, vf, block_mask=block_mask, scale=scale)
        torch.autograd.grad(o, (qf, kf, vf), g)
        _sync(dev)
        res["compile_s"] = time.perf_counter() - t
        progress(f"{case.name}: flex compile (fwd + bwd) {res['compile_s']:.1f} s")
        if warm_only:
            return res
        res["max_abs_diff_vs_ours"] = (o.float() - ours_out.float()).abs().max().item()
        res["fwd_ms"] = bench_ms(lambda: flex(qf, kf, vf, block_mask=block_mask, scale=scale), dev, dry)
        o = flex(qf, kf, vf, block_mask=block_mask, scale=scale)
        res["bwd_ms"] = bench_ms(lambda: torch.autograd.grad(o, (qf, kf, vf), g, retain_graph=True), dev, dry)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:300]
    return res


_FLEX = None


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        # every case brings a new mask_mod closure and shape: allow the recompiles instead of falling back
        # to eager flex (which materialises S x S scores)
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        # the timed backward replays one graph (retain_graph=True): compiled autograd must not donate its
        # saved buffers, or the second backward fails ("compiled with non-empty donated buffers")
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ----------------------------------------------------------------------------------------------------------


def fmt(rec: dict) -> str:
    o = rec.get("ours", {})
    if "fwd_ms" not in o:
        return f"{rec['case']:18s} d={rec['head_dim']:<3d} {o}"

    def get(d, k, f="{:.2f}"):
        return f.format(d[k]) if k in d else "-"

    fl = rec.get("flex", {})
    kern = " ".join(f"{f}:{k.get('n_regs', '?')}/{k.get('n_spills', '?')}" for f, k in o.get("kernels", {}).items())
    tiles = " ".join(f"{f}:{_cfg_label(KernelConfig(**t))}" for f, t in o.get("tiles", {}).items() if t)
    kern += f" | tiles {tiles} | sampled rel err {o.get('sample_rel_err', float('nan')):.1e}"
    if "ours_tables" in rec:
        t = rec["ours_tables"]
        kern += (f" | tables fwd {t['fwd_ms']:.2f} bwd {t['bwd_ms']:.2f} ms"
                 f"{'' if t['same_output'] else ' OUTPUT DIFFERS'}")
    if "ours_padding_test" in rec:
        t = rec["ours_padding_test"]
        kern += f" | padding test fwd {t['fwd_ms']:.2f} ms{'' if t['same_output'] else ' OUTPUT DIFFERS'}"
    if "ours_row_masks" in rec:
        t = rec["ours_row_masks"]
        kern += (f" | row masks fwd {t['fwd_ms']:.2f} bwd {t['bwd_ms']:.2f} ms"
                 f"{'' if t['same_output'] else ' OUTPUT DIFFERS'}")
    return (f"{rec['case']:18s} d={rec['head_dim']:<3d} density={rec['density']:.4f} | ours fwd "
            f"{o['fwd_ms']:8.2f} ms {o['fwd_tflops']:6.1f} TF/s  bwd {o['bwd_ms']:8.2f} ms "
            f"{o['bwd_tflops']:6.1f} TF/s  plan {o['plan_ms']:.1f} ms | vs sdpa x{get(rec, 'speedup_vs_sdpa_fwd')}"
            f"/x{get(rec, 'speedup_vs_sdpa_bwd')} (ideal x{rec['ideal_speedup']:.1f}, fraction "
            f"{get(rec, 'fraction_of_ideal_fwd')}/{get(rec, 'fraction_of_ideal_bwd')} of ceiling "
            f"{get(o, 'plan_ceiling')}) {o.get('fwd_kernel') or ''} | vs flex "
            f"x{get(rec, 'speedup_vs_flex_fwd')}/x{get(rec, 'speedup_vs_flex_bwd')} "
            f"(block mask {get(fl, 'block_mask_ms', '{:.1f}')} ms){' ' + fl['error'] if 'error' in fl else ''}"
            f" | regs/spills {kern}")


SWEEP_CASES = ("dense-16k", "sw1d-16k", "na2d-128x128", "tiled2d-128x128", "na3d-30x48x80", "tiled3d-30x48x80",
               "na2d-64x64")


def sweep_case(case: BenchCase, d: int, dev, dry: bool = False) -> dict:
    """Time each kernel family alone for every candidate tile of ``CONFIG_SPACE`` (the data for choosing
    the untuned defaults). Returns {family: [(config, ms), ...] fastest first}."""
    layout = case_layout(case)
    q, k, v, g = make_inputs(case, d, dev, torch.float32 if dry else torch.bfloat16)
    call = AttentionCall(q, k, v, None, None, 1.0 / math.sqrt(d), False, case.pattern, layout)
    out, lse = Triton().forward(call)
    ld = Triton().backward_inputs(call, g, out, lse)
    bucket = head_dim_bucket(d)
    res, default_ms, skipped, launched = {}, {}, [], {}
    for fam in ("fwd", "dq", "dkdv"):
        rows = []
        for cfg in CONFIG_SPACE[(fam, bucket)]:
            impl = Triton(configs={fam: cfg})
            run = {"fwd": lambda: impl.forward(call),
                   "dq": lambda: impl._dq(call, g, ld, cfg, False),
                   "dkdv": lambda: impl._dkdv(call, g, ld, False, cfg, False)}[fam]
            try:
                t = time.perf_counter()
                run()
                _sync(dev)
                compile_s = time.perf_counter() - t
                if cfg.tma and impl.launched.get("fwd") == "attn_fwd":  # the plan cannot use TMA: not a candidate
                    skipped.append(dict(config=dataclasses.asdict(cfg), why=impl.last_tma_unfit))
                    continue
                rows.append((cfg, bench_ms(run, dev, dry), compile_s))
                if cfg.tma:
                    launched[_cfg_label(cfg)] = impl.launched["fwd"]  # attn_fwd_tma(+ws): ws may be refused
            except Exception as e:  # out of resources for this tile
                rows.append((cfg, math.inf, f"{type(e).__name__}: {e}"[:120]))
        res[fam] = sorted(rows, key=lambda r: r[1])
        default_ms[fam] = rows[0][1]  # CONFIG_SPACE order: the first is the untuned default
        progress(f"sweep {case.name} d={d} {fam}: " + ", ".join(
            f"{_cfg_label(c)} {ms:.3f} ms" for c, ms, _ in rows)
            + f" | best/default {res[fam][0][1] / default_ms[fam]:.2f}")
    floor = []
    if not case.pattern.local and not dry:  # the textbook kernel on the same tiles (benchmarks/flash_floor.py)
        for tma, ws, cfg in floor_variants(bucket):
            def run():
                return floor_forward(q, k, v, call.scale, cfg.block_m, cfg.block_n, cfg.num_warps,
                                     cfg.num_stages, tma=tma, ws=ws)
            try:
                o = run()
                err = ((o.float() - out.float()).norm() / out.float().norm()).item()
                floor.append(dict(config=dataclasses.asdict(cfg), tma=tma, ws=ws, ms=bench_ms(run, dev, dry),
                                  rel_diff_vs_ours=err))
            except Exception as e:
                floor.append(dict(config=dataclasses.asdict(cfg), tma=tma, ws=ws, ms=math.inf,
                                  error=f"{type(e).__name__}: {e}"[:120]))
        progress(f"sweep {case.name} d={d} floor fwd: " + ", ".join(
            f"{_cfg_label(KernelConfig(**{**r['config'], 'tma': r['tma'], 'ws': r['ws']}))} {r['ms']:.3f} ms"
            for r in floor))
    probe = Triton()
    return dict(families={fam: [dict(config=dataclasses.asdict(c), ms=ms, first_call=x) for c, ms, x in rows]
                          for fam, rows in res.items()},
                floor_fwd=floor, default_ms=default_ms, tma_skipped=skipped, tma_launched=launched,
                keys={fam: _key_str(probe._tune_key(call, fam)) for fam in res},
                default_keys={fam: _key_str(probe._tune_key(call, fam), wildcard=True) for fam in res})


def floor_forward(*args, **kwargs):
    """The calibration kernel (``benchmarks/flash_floor.py``, imported on first use: it needs a Triton build)."""
    from flash_floor import floor_forward as run
    return run(*args, **kwargs)


def _cfg_label(c: KernelConfig) -> str:
    return f"{c.block_m}x{c.block_n}/{c.num_warps}w/{c.num_stages}s" + ("/ws" if c.ws else "/tma" if c.tma else "")


def floor_variants(bucket: int) -> list[tuple[bool, bool, KernelConfig]]:
    """(tma, ws, tile) of the calibration kernel timed by the sweep: the generic forward's pointer tiles, plain
    and with TMA, and the TMA candidates' tiles with their warp specialization (``TMA_CANDIDATES``)."""
    plain = [c for c in CONFIG_SPACE[("fwd", bucket)] if not c.tma]
    return ([(False, False, c) for c in plain] + [(True, False, c) for c in plain]
            + [(True, True, c) for c in TMA_CANDIDATES.get(bucket, []) if c.ws])


def tuned_entries(sweep: list[dict]) -> dict[str, dict]:
    """Tiles to ship for the swept GPU (format of ``locattn/codegen/tuned/<device>.json``): per swept case and
    kernel its fastest tile (exact key); per (kernel, head dim, pattern, dtype) and per (kernel, head dim,
    dtype) the tile with the best geometric mean of time / default time over the swept cases of that pattern,
    resp. all of them (wildcard keys ``family|d<D>|*|<pattern>|dtype`` and ``family|d<D>|*|*|dtype``)."""
    entries: dict[str, dict] = {}
    groups: dict[str, list[dict[tuple, float]]] = {}
    for rec in sweep:
        for fam, rows in rec["families"].items():
            ok = [r for r in rows if math.isfinite(r["ms"])]
            if not ok:
                continue
            exact = rec["keys"][fam]
            entries[exact] = ok[0]["config"]
            rel = {tuple(sorted(r["config"].items())): r["ms"] / rec["default_ms"][fam] for r in ok}
            f, d, _, pattern, dt = exact.split("|")
            for wild in (rec["default_keys"][fam], f"{f}|{d}|*|{pattern}|{dt}"):
                groups.setdefault(wild, []).append(rel)
    for wild, cases in groups.items():
        common = set.intersection(*(set(c) for c in cases))
        if common:
            best = min(common, key=lambda cfg: sum(math.log(c[cfg]) for c in cases))
            entries[wild] = dict(best)
    return entries


CEILING_TILES = ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128))


def ceilings(cases: list[BenchCase]) -> list[dict]:
    """Per case and (BLOCK_M, BLOCK_N): the plan's block density, its share of full blocks and its ceiling
    ``density / block density`` — the fraction of the ideal speedup over SDPA that a kernel computing whole
    blocks at SDPA's rate would reach. Plans only: no GPU, deterministic."""
    rows = []
    for case in cases:
        layout = case_layout(case)
        density = count_allowed(case.pattern, layout, case.seq, case.seq) / case.seq ** 2
        for bm, bn in CEILING_TILES:
            plan = build_plan(case.pattern, layout, case.seq, case.seq, bm, bn, False)
            rows.append(dict(case=case.name, block_m=bm, block_n=bn, q_tile=plan.q_tile, k_tile=plan.k_tile,
                             density=density, block_density=plan.block_density, full_share=plan.n_full / plan.nnz,
                             blocks_per_row=plan.nnz / plan.n_qblocks, ceiling=density / plan.block_density))
            r = rows[-1]
            print(f"{case.name:18s} {bm:3d}x{bn:<3d} tiles {str(plan.q_tile):12s} {str(plan.k_tile):12s} density "
                  f"{density:.4f} block density {r['block_density']:.4f} full {r['full_share']:.2f} blocks/row "
                  f"{r['blocks_per_row']:6.1f} ceiling {r['ceiling']:.2f}", flush=True)
    return rows


def flex_warm(args, dev, cases: list[BenchCase], dims: list[int]) -> int:
    """Compile FlexAttention's block masks and kernels for every case, in the order of the FlexAttention pass,
    untimed: run beside the first pass with Inductor's on-disk caches on (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE=1``, here and in the timed run), so that pass finds its graphs compiled.
    FlexAttention is torch's own code: the caches' blind spot (locattn's custom ops) does not apply.
    ``--shard K/N``: this process compiles every N-th (head dim, case) from the K-th (N processes in parallel:
    each case is a separate compile of FlexAttention's forward and backward, tens of seconds each)."""
    k_shard, n_shard = (int(x) for x in args.shard.split("/"))
    items = [(d, case) for d in dims for case in cases]
    for d, case in items[k_shard::n_shard]:
        q, k, v, g = make_inputs(case, d, dev, torch.bfloat16)
        res = run_flex(case, case_layout(case), q, k, v, g, 1.0 / math.sqrt(d), None, args, dev, False,
                       warm_only=True)
        print(f"flex warm {case.name} d={d}: {json.dumps(res)}", flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()
    return 0


def warm(args, dev, cases: list[BenchCase], dims: list[int], dry: bool) -> int:
    """Compile the kernels a run would time, shard K of N (Triton's disk cache is shared by processes): the
    sweep's candidate tiles per kernel, or the benchmark's kernels (tables A/B included)."""
    k, n = (int(x) for x in args.shard.split("/"))
    dtype = torch.float32 if dry else torch.bfloat16
    if args.sweep:  # the sweep's cases, as in main()
        names = args.cases or (("dense", "na2d") if dry else SWEEP_CASES)
        cases = [c for c in (dry_cases() if dry else gpu_cases()) if c.name in names]
    items = []
    for d in dims:
        bucket = head_dim_bucket(d)
        for case in cases:
            if not args.sweep:
                items.append((case, d, None, None))
                continue
            for fam in ("fwd", "dq", "dkdv"):
                items += [(case, d, fam, c) for c in CONFIG_SPACE[(fam, bucket)]]
            if not case.pattern.local:
                items += [(case, d, "floor", v) for v in floor_variants(bucket)]
    t0, done = time.time(), 0
    for i, (case, d, fam, cfg) in enumerate(items):
        if i % n != k:
            continue
        q, kk, v, g = make_inputs(case, d, dev, dtype)
        call = AttentionCall(q, kk, v, None, None, 1.0 / math.sqrt(d), False, case.pattern, case_layout(case))
        try:
            if fam is None:  # the benchmark's kernels, on the computed addressing and on the tables
                for impl in (Triton(KernelConfig(32, 32, 1, 1) if dry else None), Triton(tables_only=True)):
                    out, lse = impl.forward(call)
                    impl.backward(call, g, out, lse, False)
                Triton(KernelConfig(32, 32, 1, 1) if dry else None, window_only=False).forward(call)  # its A/Bs
                masked = Triton(KernelConfig(32, 32, 1, 1) if dry else None, nopad=False)
                out, lse = masked.forward(call)
                masked.backward(call, g, out, lse, False)
            elif fam == "floor":
                tma, ws, c = cfg
                floor_forward(q, kk, v, call.scale, c.block_m, c.block_n, c.num_warps, c.num_stages, tma=tma,
                              ws=ws)
            else:  # one sweep candidate: that kernel alone, like sweep_case
                impl = Triton(configs={fam: cfg})
                out, lse = impl.forward(call)
                ld = impl.backward_inputs(call, g, out, lse)
                if fam == "dq":
                    impl._dq(call, g, ld, cfg, False)
                elif fam == "dkdv":
                    impl._dkdv(call, g, ld, False, cfg, False)
        except Exception as e:  # a tile that does not fit: the timed run reports it
            print(f"shard {k}/{n}: {case.name} d={d} {fam} {cfg}: {type(e).__name__}", flush=True)
        done += 1
        del q, kk, v, g, call
    print(f"shard {k}/{n}: compiled {done} of {len(items)} items in {time.time() - t0:.1f} s", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny sizes, no timing")
    ap.add_argument("--quick", action="store_true", help="head dim 128 only, the first five cases")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--autotune", action="store_true", help="autotune the Triton configs (costs compile time)")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="first pass: skip the cases left after this many seconds")
    ap.add_argument("--flex-budget-s", type=float, default=280.0,
                    help="skip FlexAttention (a compile per case) after this many seconds")
    ap.add_argument("--sweep", action="store_true",
                    help=f"time every CONFIG_SPACE tile per kernel family on {', '.join(SWEEP_CASES)} "
                         "(or --cases) instead of the benchmark")
    ap.add_argument("--emit-tuned", default=None, metavar="PATH",
                    help="with --sweep: write the winning tiles for shipping (locattn/codegen/tuned/<device>.json)")
    ap.add_argument("--tuned-from", nargs="+", default=None, metavar="SWEEP_JSON",
                    help="with --emit-tuned: write the shipped tiles from saved sweep JSONs (same GPU model), no "
                         "timing; a case swept twice keeps its later record")
    ap.add_argument("--json", default="gpu_attention.json")
    ap.add_argument("--compile-only", action="store_true",
                    help="only compile (into Triton's on-disk cache) what the run would time; with --shard, "
                         "several such processes in parallel warm the cache for the timed run")
    ap.add_argument("--shard", default="0/1", metavar="K/N",
                    help="with --compile-only or --flex-warm: this process's share")
    ap.add_argument("--flex-from", default=None, metavar="JSON",
                    help="FlexAttention pass only, for the cases of an earlier run's JSON (same GPU, e.g. the "
                         "previous device call): its rows get the FlexAttention columns, written to --json")
    ap.add_argument("--ceilings", action="store_true",
                    help="no timing, no GPU: each case's plan at several tiles, its block density and the ceiling "
                         "density / block density of the fraction of the ideal speedup")
    ap.add_argument("--flex-warm", action="store_true",
                    help="only compile FlexAttention for every case (beside the timed run, Inductor caches on)")
    args = ap.parse_args(argv)

    if args.tuned_from:  # no device needed: the shipped tiles from saved sweeps (e.g. two runs on one GPU model)
        latest = {(rec["case"], rec["head_dim"]): rec for f in args.tuned_from
                  for rec in json.loads(Path(f).read_text())["sweep"]}
        sweep = list(latest.values())
        if not args.emit_tuned:
            ap.error("--tuned-from needs --emit-tuned PATH")
        Path(args.emit_tuned).write_text(json.dumps(tuned_entries(sweep), indent=1, sort_keys=True))
        print(f"wrote {len(tuned_entries(sweep))} tuned tiles from {len(sweep)} swept cases to {args.emit_tuned}")
        return 0
    if args.ceilings:
        rows = ceilings([c for c in (dry_cases() if args.dry_run else gpu_cases())
                         if not args.cases or c.name in args.cases])
        Path(args.json).write_text(json.dumps(dict(ceilings=rows), indent=1))
        return 0
    dry = args.dry_run
    if dry:
        dev = torch.device("cpu")
        cases, dims = dry_cases(), [16]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to exercise the plumbing on CPU", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        cases, dims = gpu_cases(), args.head_dims
        if args.quick:
            cases, dims = cases[:5], [128]
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               dry_run=dry, args=vars(args))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if args.compile_only:
        return warm(args, dev, cases, dims, dry)
    if args.flex_warm:
        args.flex_budget_s = math.inf
        return flex_warm(args, dev, cases, dims)
    print(json.dumps(env))
    if args.sweep:
        names = args.cases or (("dense", "na2d") if dry else SWEEP_CASES)
        sweep = []
        for d in dims:
            for case in (c for c in (dry_cases() if dry else gpu_cases()) if c.name in names):
                if over_budget(args):
                    break
                sweep.append(dict(case=case.name, head_dim=d, **sweep_case(case, d, dev, dry)))
                # rewritten after every case: a run stopped by its time limit keeps what it measured
                Path(args.json).write_text(json.dumps(dict(env=env, sweep=sweep), indent=1, default=str))
                if args.emit_tuned:
                    entries = tuned_entries(sweep)
                    Path(args.emit_tuned).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.emit_tuned).write_text(json.dumps(entries, indent=1, sort_keys=True))
        if args.emit_tuned:
            print(f"wrote {len(tuned_entries(sweep))} tuned tiles to {args.emit_tuned}")
        return 0

    records, sdpa_cache = [], {}

    def save():
        out = dict(env=env, cases=records, wall_s=time.time() - T0)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    def flex_rows(pairs):
        """FlexAttention for each (record, case) whose own numbers exist; the JSON is rewritten after each."""
        for rec, case in pairs:
            if "fwd_ms" not in rec.get("ours", {}):
                continue
            try:
                flex_pass(rec, case, args, dev, dry)
            except Exception as e:
                rec["flex"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(fmt(rec), flush=True)
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    if args.flex_from:  # FlexAttention only, against our numbers from an earlier run on this GPU
        prev = json.loads(Path(args.flex_from).read_text())
        records = prev["cases"]
        env["ours_from"] = dict(file=args.flex_from, env=prev.get("env"))
        by_name = {c.name: c for c in (dry_cases() if dry else gpu_cases())}
        flex_rows([(rec, by_name[rec["case"]]) for rec in records if rec["case"] in by_name])
        return 0

    # pass 1: our kernels and dense SDPA for every case; pass 2 (GPU): FlexAttention, whose compile per case
    # dominates, while its budget lasts. The JSON is rewritten after every case, so a killed run keeps its rows.
    todo = []
    for d in dims:
        for case in cases:
            if over_budget(args):
                records.append(dict(case=case.name, head_dim=d, skipped="time budget spent"))
                print(f"{case.name:18s} d={d:<3d} skipped: time budget spent", flush=True)
                continue
            try:
                rec = run_case(case, d, args, dev, dry, sdpa_cache, with_flex=dry)
                todo.append((rec, case))
            except Exception as e:  # keep the sweep going; the JSON says what failed
                rec = dict(case=case.name, head_dim=d, ours={"error": f"{type(e).__name__}: {e}"[:300]})
            records.append(rec)
            print(fmt(rec), flush=True)
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if not dry:
        print("== FlexAttention pass", flush=True)
        flex_rows(todo)
    save()
    print(f"wrote {args.json} ({len(records)} records, {time.time() - T0:.1f} s)")
    failed = [r for r in records if "error" in r.get("ours", {}) or "error" in r.get("flex", {})
              or r.get("ours_tables", {}).get("same_output") is False]
    if dry and failed:
        print(f"dry run: {len(failed)} case(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
