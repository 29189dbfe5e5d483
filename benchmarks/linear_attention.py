"""Op-level CPU benchmark of the linear and hybrid mechanisms (``linear_chunked``) against dense SDPA and the
``sliding_window`` alone (``cpu``).

One process, fp32, B=1, H=8, D=64, S=--seq (default 16384), non-causal unless ``--causal``; per variant the
forward and forward + backward (gradients of q, k, v) of ``torch.ops.locattn.attention`` (or SDPA), each the
median of ``--reps`` runs after a warm-up, the variants interleaved rep by rep so machine load hits them alike:

* ``sdpa``: dense ``F.scaled_dot_product_attention`` (``--dense-reps`` runs: it is the slow one),
* ``linear-elu`` / ``linear-favor``: ``mechanism = "linear"`` (favor: ``--features`` random features),
* ``sliding_window``: window ``--window`` (exact, the ``cpu`` path),
* ``hybrid``: the same window exact + favor linear attention over the other keys (the issue's variant),
* ``hybrid-elu``: the same with elu features (no feature GEMMs: shows what favor's feature maps cost).

Reported: times, ``sdpa / linear`` speedups (target >= 10x forward + backward) and the hybrid's overhead over the
window alone (target <= 50%), with ``os.getloadavg()`` before and after (the machine is shared: compare ratios).

Usage::

    python benchmarks/linear_attention.py            # S = 16384, writes benchmarks/out/linear_attention.json
    python benchmarks/linear_attention.py --causal --reps 5
    python benchmarks/linear_attention.py --quick    # S = 512, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

import locattn.ops  # noqa: E402,F401  (registers torch.ops.locattn)
from locattn.patterns import Dense, Layout, SlidingWindow  # noqa: E402
from locattn.patterns.mechanism import Mechanism  # noqa: E402
from locattn.patterns.spec import HeadGroup, SiteSpec  # noqa: E402


def variants(window: int, features: int) -> dict[str, str | None]:
    """name -> spec JSON for the op (None: dense SDPA)."""
    sw = SlidingWindow(window=window)
    return {
        "sdpa": None,
        "linear-elu": SiteSpec((HeadGroup(None, Dense(), Layout(), Mechanism("linear", "elu")),)).to_json(),
        "linear-favor": SiteSpec((HeadGroup(None, Dense(), Layout(),
                                            Mechanism("linear", "favor", features=features)),)).to_json(),
        "sliding_window": SiteSpec((HeadGroup(None, sw, Layout()),)).to_json(),
        "hybrid": SiteSpec((HeadGroup(None, sw, Layout(), Mechanism("hybrid", "favor", features=features)),)).to_json(),
        "hybrid-elu": SiteSpec((HeadGroup(None, sw, Layout(), Mechanism("hybrid", "elu")),)).to_json(),
    }


def run_once(spec: str | None, q, k, v, causal: bool, backward: bool) -> float:
    qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
    t0 = time.perf_counter()
    if spec is None:
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
    else:
        out, _ = torch.ops.locattn.attention(qq, kk, vv, None, None, q.shape[-1] ** -0.5, causal, spec, "")
    if backward:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; on a loaded shared machine 1 is far steadier)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-reps", type=int, default=1)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seq, args.window, args.reps, args.dense_reps = 512, 32, 1, 1
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq, args.dim) for _ in range(3))
    specs = {n: s for n, s in variants(args.window, args.features).items() if not args.only or n in args.only}
    load0 = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in specs}
    for name, spec in specs.items():  # warm-up (plans, workspaces, random features)
        run_once(spec, q, k, v, args.causal, True)
    for rep in range(max(args.reps, args.dense_reps)):
        for name, spec in specs.items():
            if rep >= (args.dense_reps if spec is None else args.reps):
                continue
            for mode, bwd in (("fwd", False), ("fwd_bwd", True)):
                times[name][mode].append(run_once(spec, q, k, v, args.causal, bwd))
            print(f"rep {rep} {name:15s} fwd {times[name]['fwd'][-1] * 1e3:9.1f} ms  fwd+bwd "
                  f"{times[name]['fwd_bwd'][-1] * 1e3:9.1f} ms  (load {os.getloadavg()[0]:.1f})", flush=True)
    med = {n: {m: statistics.median(ts) for m, ts in d.items()} for n, d in times.items()}
    rows = [{"variant": n, "fwd_ms": med[n]["fwd"] * 1e3, "fwd_bwd_ms": med[n]["fwd_bwd"] * 1e3,
             "runs": len(times[n]["fwd"])} for n in med]
    ratios = {}
    if "sdpa" in med:
        for n in ("linear-elu", "linear-favor"):
            if n in med:
                ratios[f"sdpa/{n} fwd"] = med["sdpa"]["fwd"] / med[n]["fwd"]
                ratios[f"sdpa/{n} fwd+bwd"] = med["sdpa"]["fwd_bwd"] / med[n]["fwd_bwd"]
    for n in ("hybrid", "hybrid-elu"):
        if n in med and "sliding_window" in med:
            ratios[f"{n} overhead fwd"] = med[n]["fwd"] / med["sliding_window"]["fwd"] - 1
            ratios[f"{n} overhead fwd+bwd"] = med[n]["fwd_bwd"] / med["sliding_window"]["fwd_bwd"] - 1
    print(f"\nB=1 H={args.heads} D={args.dim} S={args.seq} {'causal' if args.causal else 'non-causal'}, fp32, "
          f"{torch.get_num_threads()} threads, load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print("\n| variant | fwd (ms) | fwd+bwd (ms) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} |")
    for key, val in ratios.items():
        print(f"{key}: {val:+.0%}" if "overhead" in key else f"{key}: {val:.1f}x")
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "args": vars(args), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "ratios": ratios}
    write_results("linear_attention", args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
