"""Op-level CPU benchmark of the ``dynamic`` pattern: locattn (``cpu``) vs dense SDPA vs compiled FlexAttention
given the same selected blocks, in one process.

Per case (fp32, B=1, H=8, D=64 by default): random q / k / v, a ``dynamic`` pattern whose ``top_p`` is chosen so
that about ``--density`` of the blocks are kept (random inputs pool to near-uniform block scores: a top-p of
~density keeps ~density of the blocks), and timings of

* ``select``: the block selection alone (:func:`locattn.patterns.dynamic.select_blocks`),
* ``ours``: ``locattn::attention`` with backend ``cpu`` (selection included), forward and forward + backward,
* ``sdpa``: dense ``F.scaled_dot_product_attention`` (forward; forward + backward),
* ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask.from_kv_blocks`` holding exactly our selected
  blocks (every selected block is full: non-causal, no base), forward only (FlexAttention has no CPU
  backward); building the block mask from the selection is not timed.

It prints the measured density (pairs attended / S^2), the forward speedup over SDPA as a fraction of the ideal
``1 / density``, ``ours / flex`` and ``select / (ours - select)``; times are medians of ``--reps`` runs after a
warm-up. Checks ours against flex's output (same blocks, same math) before timing.

Usage::

    python benchmarks/dynamic_cpu.py                 # S = 16384, writes benchmarks/out/dynamic_cpu.json
    python benchmarks/dynamic_cpu.py --quick         # tiny, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

import locattn  # noqa: E402,F401  (registers torch.ops.locattn)
from locattn.codegen.registry import AttentionCall  # noqa: E402
from locattn.patterns import Dynamic, Layout  # noqa: E402
from locattn.patterns.dynamic import select_blocks  # noqa: E402
from locattn.patterns.spec import HeadGroup, SiteSpec  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _flex_block_mask(kept: torch.Tensor, block: int, s: int):
    """A FlexAttention block mask listing exactly ``kept`` [B, H, NB, NB] as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nb, _ = kept.shape
    cnt = kept.sum(-1).to(torch.int32)
    idx = torch.sort(torch.where(kept, torch.arange(nb), nb), -1).values.clamp_max(nb - 1).to(torch.int32)
    zero_cnt = torch.zeros_like(cnt)
    zero_idx = torch.zeros_like(idx)
    return BlockMask.from_kv_blocks(zero_cnt, zero_idx, cnt, idx, BLOCK_SIZE=block, seq_lengths=(s, s))


def run_case(s: int, heads: int, dim: int, density: float, block: int, reps: int, flex: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, dim, generator=g) for _ in range(3))
    pattern = Dynamic(block=block, top_p=density)
    layout = Layout()
    spec = SiteSpec((HeadGroup(None, pattern, layout),), site="bench").to_json()
    scale = dim ** -0.5
    lay = layout.resolve(s)
    kept = select_blocks(pattern, lay, q, k, scale)
    call = AttentionCall(q, k, v, None, None, scale, False, pattern, lay)
    dens = float(call.dynamic_tables().pairs.double().mean()) / (s * s)
    row = {"case": f"dynamic-{s}", "seq": s, "heads": heads, "dim": dim, "block": block, "top_p": density,
           "density": dens, "blocks_kept": float(kept.float().mean())}
    op = lambda: torch.ops.locattn.attention(q, k, v, None, None, scale, False, spec, "cpu")
    row["select_s"] = _time(lambda: select_blocks(pattern, lay, q, k, scale), reps)
    row["ours_fwd_s"] = _time(op, reps)
    row["sdpa_fwd_s"] = _time(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), reps)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    gout = torch.randn(1, heads, s, dim, generator=g)

    def ours_bwd():
        o, _ = torch.ops.locattn.attention(qg, kg, vg, None, None, scale, False, spec, "cpu")
        torch.autograd.grad(o, (qg, kg, vg), gout)

    def sdpa_bwd():
        torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, scale=scale), (qg, kg, vg), gout)

    row["ours_fwdbwd_s"] = _time(ours_bwd, reps)
    row["sdpa_fwdbwd_s"] = _time(sdpa_bwd, reps)
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        bm = _flex_block_mask(kept, block, s)
        fa = torch.compile(flex_attention, dynamic=False)
        ref = fa(q, k, v, block_mask=bm, scale=scale)
        ours = op()[0]
        row["flex_max_abs_diff"] = float((ref - ours).abs().max())
        row["flex_fwd_s"] = _time(lambda: fa(q, k, v, block_mask=bm, scale=scale), reps)
        row["ours_over_flex"] = row["flex_fwd_s"] / row["ours_fwd_s"]
    row["speedup_fwd"] = row["sdpa_fwd_s"] / row["ours_fwd_s"]
    row["ideal_fraction_fwd"] = row["speedup_fwd"] * dens
    row["speedup_fwdbwd"] = row["sdpa_fwdbwd_s"] / row["ours_fwdbwd_s"]
    row["ideal_fraction_fwdbwd"] = row["speedup_fwdbwd"] * dens
    row["select_over_sparse"] = row["select_s"] / max(1e-9, row["ours_fwd_s"] - row["select_s"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq", type=int, nargs="+", default=[16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.heads, args.dim, args.reps = [512], 2, 32, 1
    rows = []
    for s in args.seq:
        r = run_case(s, args.heads, args.dim, args.density, args.block, args.reps, not args.no_flex)
        rows.append(r)
        print(f"{r['case']}: density {r['density']:.3f} | select {r['select_s'] * 1e3:.1f} ms | fwd ours "
              f"{r['ours_fwd_s'] * 1e3:.1f} ms, sdpa {r['sdpa_fwd_s'] * 1e3:.1f} ms -> {r['speedup_fwd']:.2f}x "
              f"({r['ideal_fraction_fwd']:.2f} of ideal) | fwd+bwd ours {r['ours_fwdbwd_s'] * 1e3:.1f} ms, sdpa "
              f"{r['sdpa_fwdbwd_s'] * 1e3:.1f} ms -> {r['speedup_fwdbwd']:.2f}x ({r['ideal_fraction_fwdbwd']:.2f}"
              f" of ideal) | select/sparse {r['select_over_sparse']:.2f}"
              + (f" | flex {r['flex_fwd_s'] * 1e3:.1f} ms, ours {r['ours_over_flex']:.2f}x flex (max diff "
                 f"{r['flex_max_abs_diff']:.1e})" if "flex_fwd_s" in r else ""))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg()}
    write_results("dynamic_cpu", args.quick, meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
