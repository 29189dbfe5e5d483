"""Op-level CPU benchmark: locattn's ``cpu`` path against ``blocked``, dense SDPA and compiled FlexAttention.

Each case (fp32, B=1, H=8, D=64, ~10% density) times, in one process:

* ``locattn::attention`` with backend ``cpu`` and ``blocked`` (forward; forward + backward),
* dense ``F.scaled_dot_product_attention`` (forward; forward + backward),
* ``torch.compile(flex_attention)`` with the same mask (forward only: FlexAttention has no CPU backward); its
  ``mask_mod`` reads per-token coordinate / interval tables so it compiles; ``create_block_mask`` is timed
  separately,

and reports the density (:func:`locattn.patterns.base.count_allowed`), the forward speedup over SDPA as a
fraction of the ideal ``1 / density``, and the peak RSS growth of one run of each variant after its warm-up
(for ``cpu`` including re-allocating its reusable workspace). Times are the median of ``--reps`` runs after one
warm-up.
``blocked`` is skipped above ``--blocked-max-seq`` tokens (it needs ~10 s per call at 8192 tokens).

Usage::

    python benchmarks/cpu_attention.py            # full sizes, writes benchmarks/out/cpu_attention.json
    python benchmarks/cpu_attention.py --quick    # tiny sizes, < 30 s
    python benchmarks/cpu_attention.py --only sw1d-4096 na2d-64x64 --reps 7
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

import locattn.ops  # noqa: F401  (registers torch.ops.locattn)
from locattn.codegen import cpu_fast
from locattn.patterns import Dense, Layout, Neighborhood, Pattern, SlidingWindow, Tiled, count_allowed
from locattn.patterns.base import key_coords, query_bounds
from locattn.patterns.spec import HeadGroup, SiteSpec



@dataclass
class Case:
    name: str
    pattern: Pattern
    layout: Layout
    seq: int
    heads: int = 8
    dim: int = 64


def _na_kernel(n_tokens: int, ndim: int, density: float = 0.1) -> int:
    return max(1, round((density * n_tokens) ** (1.0 / ndim)))


def full_cases() -> list[Case]:
    cases = []
    for s in (4096, 16384):
        cases.append(Case(f"sw1d-{s}", SlidingWindow(window=int(0.05 * s)), Layout(), s))
    for n in (64, 128):
        k = _na_kernel(n * n, 2)
        cases.append(Case(f"na2d-{n}x{n}", Neighborhood(kernel=(k, k)), Layout(grid=(n, n)), n * n))
    cases.append(Case("na3d-8x32x32", Neighborhood(kernel=(5, 13, 13)), Layout(grid=(8, 32, 32)), 8192))
    cases.append(Case("tiled2d-64x64", Tiled(tile=(4, 4), window=(5, 5)), Layout(grid=(64, 64)), 4096))
    cases.append(Case("dense-4096", Dense(), Layout(), 4096))
    return cases


def quick_cases() -> list[Case]:
    return [
        Case("sw1d-1024", SlidingWindow(window=51), Layout(), 1024, heads=2, dim=32),
        Case("na2d-24x24", Neighborhood(kernel=(7, 7)), Layout(grid=(24, 24)), 576, heads=2, dim=32),
        Case("na3d-4x8x8", Neighborhood(kernel=(3, 3, 3)), Layout(grid=(4, 8, 8)), 256, heads=2, dim=32),
        Case("dense-512", Dense(), Layout(), 512, heads=2, dim=32),
    ]


# ----------------------------------------------------------------------------------------------------------
# measurement


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_growth(fn) -> int | None:
    """Peak RSS growth (bytes) of one call: freed heap is trimmed and the high-water mark reset first."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def timeit(fn, reps: int) -> dict:
    """Median of ``reps`` runs after one warm-up. ``peak_bytes``: peak RSS growth of the first timed run,
    after the warm-up (one-time process initialisation excluded) and with locattn's reusable workspace
    freed first (so it is counted)."""
    fn()
    ts, peak = [], None
    for i in range(reps):
        if i == 0:
            cpu_fast.clear_workspace()
            t0 = time.perf_counter()
            peak = peak_rss_growth(fn)
        else:
            t0 = time.perf_counter()
            fn()
        ts.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "runs_ms": [t * 1e3 for t in ts],
            "peak_bytes": peak}


# ----------------------------------------------------------------------------------------------------------
# the variants


def flex_mask_mod(pattern: Pattern, layout: Layout, seq: int):
    """A FlexAttention ``mask_mod`` of a local pattern from per-token tables (compiles: index reads only)."""
    lay = layout.resolve(seq)
    assert not (lay.prefix or lay.suffix or lay.sinks), "benchmark cases have no globals"
    t = torch.arange(seq)
    tables = [(lo, hi, ku) for (lo, hi), ku in zip(query_bounds(pattern, lay, t), key_coords(pattern, lay, t))]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for lo, hi, ku in tables:
            m = (ku[kv_idx] >= lo[q_idx]) & (ku[kv_idx] <= hi[q_idx])
            ok = m if ok is None else ok & m
        return ok

    return mask_mod


def run_case(c: Case, reps: int, with_flex: bool, with_blocked: bool) -> dict:
    torch.manual_seed(0)
    s, h, d = c.seq, c.heads, c.dim
    scale = d ** -0.5
    q, k, v = (torch.randn(1, h, s, d) for _ in range(3))
    g = torch.randn(1, h, s, d)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    spec = SiteSpec((HeadGroup(None, c.pattern, c.layout),)).to_json()
    lay = c.layout.resolve(s) if c.pattern.local else c.layout
    density = count_allowed(c.pattern, lay, s, s) / (s * s)
    row: dict = {"case": c.name, "pattern": c.pattern.describe(), "seq": s, "heads": h, "dim": d,
                 "grid": list(lay.grid) if c.pattern.local else None, "density": density}

    def op(backend):
        def fwd():
            with torch.no_grad():
                return torch.ops.locattn.attention(q, k, v, None, None, scale, False, spec, backend)

        def fwd_bwd():
            o, _ = torch.ops.locattn.attention(qg, kg, vg, None, None, scale, False, spec, backend)
            return torch.autograd.grad(o, (qg, kg, vg), g)
        return fwd, fwd_bwd

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def sdpa_fwd_bwd():
        return torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, scale=scale), (qg, kg, vg), g)

    variants = {"cpu": op("cpu"), "sdpa": (sdpa_fwd, sdpa_fwd_bwd)}
    if with_blocked:
        variants["blocked"] = op("blocked")
    ref_out = None
    for name, (fwd, fwd_bwd) in variants.items():
        for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            row[f"{name}_{kind}"] = timeit(fn, reps)
            row[f"{name}_{kind}_peak_bytes"] = row[f"{name}_{kind}"]["peak_bytes"]
            print(f"  {c.name:>14} {name:>7} {kind:>7}: {row[f'{name}_{kind}']['median_ms']:10.1f} ms", flush=True)
        if name == "cpu":
            ref_out = fwd()[0]
    if with_flex:
        try:
            run_flex(c, row, q, k, v, scale, ref_out, reps)
        except Exception as e:  # noqa: BLE001  (a FlexAttention compile failure is a result, not a crash)
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"  {c.name:>14}    flex     fwd: failed ({row['flex_error'][:120]})", flush=True)
    med = lambda key: row[key]["median_ms"] if key in row else float("nan")
    row["fwd_speedup_vs_sdpa"] = med("sdpa_fwd") / med("cpu_fwd")
    row["fwd_fraction_of_ideal"] = row["fwd_speedup_vs_sdpa"] * density
    row["fwd_bwd_speedup_vs_sdpa"] = med("sdpa_fwd_bwd") / med("cpu_fwd_bwd")
    row["fwd_speedup_vs_flex"] = med("flex_fwd") / med("cpu_fwd")
    return row


def run_flex(c: Case, row: dict, q, k, v, scale: float, ref_out, reps: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = c.seq
    torch._dynamo.reset()  # a second sequence length would recompile with dynamic shapes (slower, and in
    block_mask = None      # torch 2.13 the dynamic CPU flex template fails to build)
    if c.pattern.local:
        mm = flex_mask_mod(c.pattern, c.layout, s)
        t0 = time.perf_counter()
        block_mask = create_block_mask(mm, None, None, s, s, device="cpu")
        row["flex_create_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
        row["flex_block_sparsity"] = float(block_mask.sparsity())
    flex = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = flex(q, k, v, block_mask=block_mask, scale=scale)
    row["flex_first_call_s"] = time.perf_counter() - t0
    row["flex_max_abs_diff_vs_cpu"] = float((out - ref_out).abs().max())

    def flex_fwd():
        with torch.no_grad():
            return flex(q, k, v, block_mask=block_mask, scale=scale)
    row["flex_fwd"] = timeit(flex_fwd, reps)
    row["flex_fwd_peak_bytes"] = row["flex_fwd"]["peak_bytes"]
    print(f"  {c.name:>14} {'flex':>7} {'fwd':>7}: {row['flex_fwd']['median_ms']:10.1f} ms", flush=True)


# ----------------------------------------------------------------------------------------------------------
# report


def _fmt(x, spec="{:.1f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def print_table(rows: list[dict]) -> None:
    med = lambda r, key: r[key]["median_ms"] if key in r else None
    mib = lambda r, key: r.get(key) / 2**20 if r.get(key) is not None else None
    head = ("case", "dens", "cpu fwd", "cpu f+b", "blk fwd", "blk f+b", "sdpa fwd", "sdpa f+b", "flex fwd",
            "bmask", "fwd/ideal", "x flex", "f+b x sdpa", "MiB cpu fwd", "MiB cpu f+b", "MiB sdpa f+b")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r["case"], _fmt(r["density"], "{:.3f}")]
        cells += [_fmt(med(r, k)) for k in ("cpu_fwd", "cpu_fwd_bwd", "blocked_fwd", "blocked_fwd_bwd", "sdpa_fwd",
                                            "sdpa_fwd_bwd", "flex_fwd")]
        cells += [_fmt(r.get("flex_create_block_mask_ms"), "{:.0f}"), _fmt(r["fwd_fraction_of_ideal"], "{:.2f}"),
                  _fmt(r["fwd_speedup_vs_flex"], "{:.2f}"), _fmt(r["fwd_bwd_speedup_vs_sdpa"], "{:.2f}"),
                  _fmt(mib(r, "cpu_fwd_peak_bytes"), "{:.0f}"), _fmt(mib(r, "cpu_fwd_bwd_peak_bytes"), "{:.0f}"),
                  _fmt(mib(r, "sdpa_fwd_bwd_peak_bytes"), "{:.0f}")]
        print("| " + " | ".join(cells) + " |")
    print("\ntimes in ms (median); fwd/ideal = (sdpa fwd / cpu fwd) x density; x flex = flex fwd / cpu fwd; "
          "bmask = create_block_mask ms")


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": model,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 30 s)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per variant after one warm-up (default 5)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-blocked", action="store_true", help="skip the blocked implementation")
    ap.add_argument("--blocked-max-seq", type=int, default=4096, help="skip blocked on longer sequences")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/cpu_attention[_quick].json)")
    args = ap.parse_args(argv)
    cases = quick_cases() if args.quick else full_cases()
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    reps = args.reps or (3 if args.quick else 5)
    meta = {**machine(), "argv": sys.argv[1:], "reps": reps, "loadavg_start": os.getloadavg(),
            "blocked_max_seq": None if args.no_blocked else args.blocked_max_seq}
    print(f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}, load {meta['loadavg_start']}")
    rows = []
    for i, c in enumerate(cases):
        # quick mode compiles FlexAttention for the first case only (each compile costs seconds)
        flex = not args.no_flex and (not args.quick or i == 0)
        rows.append(run_case(c, reps, flex, not args.no_blocked and c.seq <= args.blocked_max_seq))
    meta["loadavg_end"] = os.getloadavg()
    print_table(rows)
    write_results("cpu_attention", args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
